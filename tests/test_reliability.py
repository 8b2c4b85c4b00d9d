"""Nothing lost, nothing stale, nothing silently wrong: the run folder's guarantees, case by case.

Each test is one way a run used to lose or falsify results: a data change under a finished run, two runs in one
folder, flipped bits in a checkpoint, a checkpoint from beyond the run, failed training reported as success,
a kill while the final files are written, a full disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adalora.config import ConfigError
from adalora_lab.loop import TrainingFailed, train
from adalora_lab.resume import FAULT_ENV, latest_checkpoint, load_checkpoint, save_checkpoint
from adalora_lab.rundir import RunDir
from adalora_lab.summary import summarize
from helpers import ROOT, compose_run, make_glue_dir

BASE = ["debug=fast", "logger=none", "model=tiny_bert", "task=rte", "method=adalora", "method.target_r=2",
        "max_steps=8", "checkpoint_every=2", "eval_every=4", "threads=1", "deterministic=true"]


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A private copy of the GLUE fixtures (some tests edit it) and a private tokenization cache."""
    monkeypatch.setenv("ADALORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(FAULT_ENV, raising=False)
    return make_glue_dir(tmp_path / "glue")


def _run(data: Path, *extra: str) -> list[str]:
    return [*BASE, f"paths.glue_dir={data}", *extra]


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run folder but the ones that hold wall time or the run folder's own path."""
    skip = {"summary.json", ".lock"}
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in skip and "checkpoints" not in p.parts}


def _interrupt(data: Path, run_dir: Path, monkeypatch, where: str) -> None:
    """Run until the fault point ``where`` (``step:N``, ``finish:N``) stops it, as a kill would."""
    monkeypatch.setenv(FAULT_ENV, f"raise@{where}")
    with pytest.raises(KeyboardInterrupt):
        train(compose_run(_run(data)), run_dir)
    monkeypatch.delenv(FAULT_ENV)


def _summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in ("wall_time_s", "run_dir")}


def test_data_change_under_a_finished_run_is_refused(data, tmp_path):
    run_dir = tmp_path / "run"
    first = train(compose_run(_run(data)), run_dir)
    before = _files(run_dir)
    train_tsv = data / "RTE" / "train.tsv"
    lines = train_tsv.read_text().splitlines()
    flip = {"entailment": "not_entailment", "not_entailment": "entailment"}
    train_tsv.write_text("\n".join([lines[0]] + ["\t".join([*ln.split("\t")[:-1], flip[ln.split("\t")[-1]]])
                                                 for ln in lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match=r"trained on other inputs .*changed: .*train_examples.*train_file"):
        train(compose_run(_run(data)), run_dir)
    assert _files(run_dir) == before and _summary(run_dir)["final"] == first["final"]  # nothing changed


def test_same_inputs_reuse_the_finished_run(data, tmp_path):
    run_dir = tmp_path / "run"
    first = train(compose_run(_run(data)), run_dir)
    again = train(compose_run(_run(data, "progress=false", "threads=2")), run_dir)  # no-effect fields differ
    assert again == json.loads((run_dir / "summary.json").read_text()) and again["final"] == first["final"]


def test_a_held_run_folder_stops_a_second_run_at_once(data, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.create()
    run_dir.acquire()  # as a running job would
    try:
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+ on .*\)\. Fix: wait"):
            train(compose_run(_run(data)), run_dir.path)
        assert not (run_dir.path / "summary.json").exists()  # the second run wrote nothing
    finally:
        run_dir.release()
    assert train(compose_run(_run(data)), run_dir.path)["status"] == "completed"


@pytest.mark.slow
def test_default_run_folders_are_unique_per_process(data, tmp_path):
    """Two entry-point runs started together, without hydra.run.dir, get a folder each."""
    env = {**os.environ, "ADALORA_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), *_run(data, "max_steps=4", "eval_every=4"),
           "progress=false"]
    procs = [subprocess.Popen([*cmd, f"seed={s}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    summaries = sorted(tmp_path.glob("outputs/rte/adalora_r2/*/summary.json"))
    assert len(summaries) == 2
    assert sorted(json.loads(s.read_text())["seed"] for s in summaries) == [0, 1]


def test_flipped_bits_in_the_newest_checkpoint_are_skipped(data, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    train(compose_run(_run(data)), reference)
    run_dir = tmp_path / "run"
    _interrupt(data, run_dir, monkeypatch, "step:7")
    newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    raw = bytearray(newest.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    newest.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="fails its checksum"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest.name}: .*fails its checksum"):
        train(compose_run(_run(data)), run_dir)  # resumes from the older one
    assert _summary(run_dir) == _summary(reference)
    assert _files(run_dir) == _files(reference)


def test_a_checkpoint_beyond_the_run_is_refused(data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _interrupt(data, run_dir, monkeypatch, "step:5")
    path, payload = latest_checkpoint(run_dir)
    payload.pop("format")
    payload["state"]["step"] = 100  # a well-formed, checksummed checkpoint of a step this run never has
    save_checkpoint(tmp_path / "other", payload, keep=1)
    with pytest.raises(ConfigError, match=r"is at step 100, outside this run's 0\.\.8 steps"):
        train(compose_run(_run(data, f"resume={tmp_path / 'other'}")), tmp_path / "run2")


def test_mostly_skipped_training_ends_failed(data, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingFailed, match=r"\d+ of 8 steps were skipped for a non-finite loss"):
        train(compose_run(_run(data, "skip_nonfinite=true", "optim.lr=1e30", "optim.max_grad_norm=null",
                               "method=lora")), run_dir)
    summary = _summary(run_dir)
    assert summary["status"] == "failed" and "max_skipped_ratio" in summary["error"]


def test_divergence_ends_failed(data, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingFailed, match="training diverged"):
        train(compose_run(_run(data, "divergence_ratio=1.0001", "method=lora", "optim.lr=0.5",
                               "optim.max_grad_norm=null", "max_steps=8")), run_dir)
    assert _summary(run_dir)["status"] == "failed"
    result = summarize(tmp_path, plots_=False)  # a failed run counts nowhere
    assert not [r for r in result["rows"] if r["is_main"]] and result["failed"]


def test_a_kill_while_the_final_files_are_written_changes_nothing(data, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    train(compose_run(_run(data)), reference)
    run_dir = tmp_path / "run"
    _interrupt(data, run_dir, monkeypatch, "finish:8")
    (run_dir / "checkpoints" / ".step_00000008.pt.orphan.tmp").write_bytes(b"torn")  # a killed write's leftover
    train(compose_run(_run(data)), run_dir)
    history = [json.loads(x) for x in (run_dir / "rank_history.jsonl").read_text().splitlines()]
    assert sum(1 for h in history if h.get("final")) == 1  # the last line is written once
    assert _files(run_dir) == _files(reference) and _summary(run_dir) == _summary(reference)
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_resumes(data, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "ADALORA_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled",
           FAULT_ENV: "enospc@checkpoint:6"}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), *_run(data), "progress=false",
           f"hydra.run.dir={run_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("adalora: error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "rerun the same command" in lines[0]
    env.pop(FAULT_ENV)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert _summary(run_dir)["status"] == "completed"


@pytest.mark.parametrize("where", ["run", "checkpoints"])
def test_a_file_where_a_folder_belongs_stops_before_compute(data, tmp_path, where):
    run_dir = tmp_path / "run"
    target = run_dir if where == "run" else run_dir / "checkpoints"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("not a folder")
    with pytest.raises(ConfigError, match=rf"{target} is a file, not a folder.*Fix: move the file away"):
        train(compose_run(_run(data)), run_dir)
    assert target.read_text() == "not a folder"


def test_a_regex_target_reaches_the_library_from_the_command_line(data, tmp_path):
    cfg = compose_run(_run(data, r"method.target_modules='.*\.(query|value)$'"))
    train(cfg, tmp_path / "run")
    pattern = json.loads((tmp_path / "run" / "rank_pattern.json").read_text())
    assert pattern and all(n.endswith(("query", "value")) for n in pattern)


def test_saved_files_respect_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        train(compose_run(_run(data)), tmp_path / "run")
    finally:
        os.umask(old)
    for name in ("summary.json", "config.yaml", "rank_pattern.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name
