"""A sweep in which some jobs fail: the others finish, and summarize.py lists the failures beside the table.

    python experiments/train.py -m debug=fast model=tiny_bert logger=none method=lora,adalora method.target_r=2 \
        method.lora_dropout=0.0,1.0 hydra.sweep.dir=<tmp>

runs 4 jobs; the two with lora_dropout=1.0 fail at config time (LoRAConfig / AdaLoRAConfig reject it).
The data is the session's fixture GLUE folder (``glue_dir``), given through ADALORA_GLUE_DIR (conf/paths reads it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adalora_lab import summary
from adalora_lab.loop import train
from helpers import ROOT, compose_run

SWEEP = ["debug=fast", "model=tiny_bert", "logger=none", "method=lora,adalora", "method.target_r=2",
         "method.lora_dropout=0.0,1.0"]


def _env(tmp: Path, glue: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(ADALORA_CACHE=str(tmp / "cache"), ADALORA_GLUE_DIR=str(glue), WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1")
    return env


def _run_dirs(sweep: Path) -> list[Path]:
    """Job folders: those holding the run's own config.yaml (not .hydra/config.yaml)."""
    return sorted(p.parent for p in sweep.rglob("config.yaml") if p.parent.name != ".hydra")


def _status(run_dir: Path) -> str | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, glue_dir):
    tmp = tmp_path_factory.mktemp("sweep_failures")
    sweep_dir = tmp / "multirun"
    env = _env(tmp, glue_dir)
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), "-m", *SWEEP,
                          f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    summ = subprocess.run([sys.executable, str(ROOT / "experiments" / "summarize.py"), str(sweep_dir)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    return {"tmp": tmp, "glue": glue_dir, "dir": sweep_dir, "run": run, "summarize": summ}


def test_other_jobs_complete(sweep):
    run = sweep["run"]
    assert run.returncode == 1, run.stderr  # the sweep reports that jobs failed ...
    dirs = _run_dirs(sweep["dir"])
    assert len(dirs) == 4, dirs  # ... after running every job
    good = [d for d in dirs if "lora_dropout-0.0" in str(d)]
    bad = [d for d in dirs if "lora_dropout-1.0" in str(d)]
    assert len(good) == len(bad) == 2
    assert {json.loads((d / "summary.json").read_text())["method"] for d in good} == {"lora", "adalora"}
    for d in good:
        assert _status(d) == "completed", d
        assert (d / "adapter" / "adapter_model.safetensors").is_file()
    for d in bad:
        assert _status(d) in (None, "failed"), d  # failed at config time: a config.yaml, no completed summary
        assert (d / "config.yaml").is_file() and not (d / "adapter").exists()
    errors = [line for line in run.stderr.splitlines() if line.startswith("adalora: error: ")]
    assert len(errors) == 2 and all("lora_dropout=1.0" in e for e in errors), run.stderr


def test_summarize_lists_failed_runs_and_writes_table(sweep):
    summ = sweep["summarize"]
    assert summ.returncode == 0, summ.stderr
    md = (sweep["dir"] / "summary.md").read_text()
    assert summ.stdout.startswith(md.splitlines()[0])  # also printed
    assert "4 runs: 2 completed, 2 failed or incomplete" in md
    table, _, failed = md.partition("## Failed / incomplete runs")
    assert failed, md
    rows = [line for line in table.splitlines() if line.startswith("| lora |") or line.startswith("| adalora |")]
    assert len(rows) == 2 and all(" | 2 | " in r for r in rows), table
    listed = [line for line in failed.splitlines() if "lora_dropout-1.0" in line]
    assert len(listed) == 2, failed
    assert {line.split(" | ")[2] for line in listed} == {"lora", "adalora"}  # method column
    assert all(" | failed | " in line or " | incomplete | " in line for line in listed)
    import csv

    with open(sweep["dir"] / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["task", "method", "target_r", "metric"]
    main = [r for r in rows if r["metric"] == "accuracy" and r.get("is_main") in ("True", "true", "1")
            and r["stat"] == "value" and r["which"] == "final"]
    assert sorted(r["method"] for r in main) == ["adalora", "lora"]  # one final row per completed cell
    assert (sweep["dir"] / "comparison.png").is_file()


def test_failed_run_says_why(sweep):
    listed = [line for line in (sweep["dir"] / "summary.md").read_text().splitlines() if "lora_dropout-1.0" in line]
    assert len(listed) == 2
    assert all(" | failed | " in line and "must be in [0, 1)" in line for line in listed), listed


def test_published_runs_restore_to_the_folders_the_sweep_gave_them(sweep, tmp_path):
    """collect_results.py --restore puts each published run back at the folder Hydra's sweep gave it (so the
    tuning protocol on a fresh clone counts it as done), with its files, and never overwrites a folder there."""
    from adalora_lab.publish import collect

    copied, _ = collect(sweep["dir"], tmp_path / "published")
    finished = {d.relative_to(sweep["dir"]) for d in _run_dirs(sweep["dir"]) if _status(d) in ("completed", "failed")}
    assert len(copied) == len(finished) >= 2  # the published names are not the sweep's: lora_r2_method.lora_...
    restored = tmp_path / "restored"
    cmd = [sys.executable, str(ROOT / "experiments" / "collect_results.py"), "--restore", str(restored),
           str(tmp_path / "published")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert f"restored {len(finished)} run folders" in out.stdout
    assert {d.relative_to(restored) for d in _run_dirs(restored)} == finished
    for rel in finished:
        assert (restored / rel / "summary.json").read_bytes() == (sweep["dir"] / rel / "summary.json").read_bytes()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "restored 0 run folders" in again.stdout and again.stdout.count("already exists") == len(finished)
    wrong = subprocess.run(cmd[:3] + [str(tmp_path / "published"), str(restored)], cwd=ROOT, capture_output=True,
                           text=True)
    assert wrong.returncode == 2 and "sweep folder first" in wrong.stderr and "Traceback" not in wrong.stderr


def test_sweep_stderr_has_no_traceback(sweep):
    assert "Traceback" not in sweep["run"].stderr


def test_failure_during_training_is_listed_with_its_error(sweep, tmp_path, monkeypatch):
    """A run that fails mid-training (non-finite loss) has summary.json status=failed; the summary quotes it."""
    monkeypatch.setenv("ADALORA_CACHE", str(sweep["tmp"] / "cache"))
    monkeypatch.setenv("ADALORA_GLUE_DIR", str(sweep["glue"]))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    folder = tmp_path / "runs"
    completed = next(d for d in _run_dirs(sweep["dir"]) if _status(d) == "completed")
    shutil.copytree(completed, folder / "ok")
    cfg = compose_run(["debug=fast", "model=tiny_bert", "logger=none", "method=adalora", "method.target_r=2",
                       "optim.lr=1e30", "optim.max_grad_norm=null"])
    with pytest.raises(FloatingPointError, match="non-finite training loss at step"):
        train(cfg, folder / "nan")
    assert _status(folder / "nan") == "failed"
    result = summary.summarize(folder, plots_=False)
    assert [f["status"] for f in result["failed"]] == ["failed"]
    assert "FloatingPointError: non-finite training loss at step" in result["failed"][0]["problem"]
    assert "| nan | rte | adalora | 2 | 0 | failed | FloatingPointError: non-finite" in result["markdown"]
    assert len([r for r in result["rows"] if r["is_main"]]) == 1  # the completed run still makes the table
