"""experiments/reproduce.py: a finished run reruns from its recorded command with every logged number compared;
a command that composes to another config in this checkout is named before any compute; and every published
result's command still composes to the config it recorded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adalora_lab.publish import collect
from adalora_lab.reproduce import ReproduceError, compare_runs, config_drift, explain, main, parse_command, reproduce
from helpers import ROOT

RUN = ["model=tiny_bert", "task=rte", "method=adalora", "method.target_r=2", "debug=fast", "logger=none", "threads=1"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, glue_dir):
    monkeypatch.setenv("ADALORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ADALORA_GLUE_DIR", str(glue_dir))
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def published(tmp_path_factory, glue_dir) -> Path:
    """One short AdaLoRA run, trained by `train.py` and published by collect_results (command.txt)."""
    tmp = tmp_path_factory.mktemp("reproduce")
    env = {**os.environ, "ADALORA_CACHE": str(tmp / "cache"), "ADALORA_GLUE_DIR": str(glue_dir),
           "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "experiments/train.py", *RUN, f"hydra.run.dir={tmp / 'sweep' / 'run'}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    copied, _ = collect(tmp / "sweep", tmp / "published")
    assert len(copied) == 1
    return copied[0]


def test_a_rerun_is_identical_and_a_changed_number_is_seen(published, tmp_path, capsys):
    assert (published / "command.txt").read_text().split()[2:] == RUN
    out = tmp_path / "rerun"
    assert main([str(published), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "identical: every logged number" in text and f"into {out}" in text
    res = compare_runs(published, out)
    assert res["identical"] and res["reproduced"] and res["diffs"] == {} and res["missing"] == []
    # the recorded run with one dev accuracy changed by 0.05, and one evaluation missing
    changed = tmp_path / "changed"
    shutil.copytree(published, changed)
    lines = [json.loads(x) for x in (changed / "metrics.jsonl").read_text().splitlines()]
    evals = [i for i, rec in enumerate(lines) if rec["split"] == "eval"]
    assert len(evals) >= 2
    lines[evals[0]]["accuracy"] += 0.05
    (changed / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = compare_runs(changed, out)
    assert not res["identical"] and not res["reproduced"]
    assert list(res["diffs"]) == ["eval/accuracy"] and res["diffs"]["eval/accuracy"] == pytest.approx(0.05)
    assert compare_runs(changed, out, tol=0.1)["reproduced"]
    last = lines.pop(evals[-1])
    (changed / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = compare_runs(changed, out, tol=0.1)
    assert not res["reproduced"] and res["missing"] == [f"eval step {last['step']}"]
    assert main([str(changed), "--out", str(tmp_path / "rerun2")]) == 1
    assert "NOT reproduced" in capsys.readouterr().out


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_rerun_that_differs_says_where_it_parts_what_environment_differed_and_the_seed_spread(published,
                                                                                                  tmp_path):
    """Not identical: the earliest differing record, the environment's differences (or that the recorded run has
    none), and the final metric's difference against the standard deviation over the cell's seeds."""
    cell = tmp_path / "cell"
    recorded, rerun, other = cell / "seed0", tmp_path / "rerun", cell / "seed1"
    for dst in (recorded, rerun, other):
        shutil.copytree(published, dst)
    lines = [json.loads(x) for x in (recorded / "metrics.jsonl").read_text().splitlines()]
    train = [i for i, rec in enumerate(lines) if rec["split"] == "train"]
    lines[train[1]]["loss"] += 1e-5  # the second logged loss: where the runs part
    lines[train[-1]]["loss"] += 0.3  # a larger difference later does not move the first one
    (recorded / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    metric = json.loads((published / "summary.json").read_text())["main_metric"]
    final = json.loads((published / "summary.json").read_text())["final"][metric]
    _edit_json(recorded / "summary.json", lambda d: d["final"].update({metric: final + 0.02}))
    _edit_json(other / "summary.json", lambda d: d["final"].update({metric: final - 0.02}))
    _edit_json(recorded / "summary.json", lambda d: d["environments"][0].update(torch="0.0.1", cpu="another CPU"))
    res = compare_runs(recorded, rerun)
    assert not res["identical"]
    step = lines[train[1]]["step"]
    assert res["first_difference"] == {"split": "train", "step": step, "field": "loss",
                                       "recorded": lines[train[1]]["loss"], "rerun": lines[train[1]]["loss"] - 1e-5}
    assert res["environment"] == [f"torch: 0.0.1 -> {torch.__version__}",
                                  f"cpu: another CPU -> {res_env(rerun)['cpu']}"]
    assert res["seed_spread"] == (pytest.approx(0.04 / 2 ** 0.5), 2)  # seeds 0 and 1 of the cell: ±0.02
    text = "\n".join(explain(res))
    assert f"first difference: train step {step}, loss" in text and "the environment differs: torch: 0.0.1" in text
    assert "over the cell's 2 seeds it has a standard deviation of 0.0283 (0.71x)" in text
    _edit_json(recorded / "summary.json", lambda d: d.pop("environments"))  # a run from before the record
    res = compare_runs(recorded, rerun)
    assert res["environment"] is None and "did not record its environment" in "\n".join(explain(res))
    assert compare_runs(rerun, rerun)["environment"] == [] and compare_runs(rerun, rerun)["first_difference"] is None


def res_env(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["environments"][0]


def test_a_changed_default_is_named_before_any_compute(published, tmp_path, capsys):
    stale = tmp_path / "stale"
    shutil.copytree(published, stale)
    cfg = yaml.safe_load((stale / "config.yaml").read_text())
    cfg["optim"]["lr"] = 0.123  # as if the checkout's default had changed since the run
    cfg["task"]["data_dir"] = "/elsewhere/glue"  # where the data lies is not part of the experiment
    (stale / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert config_drift(stale, parse_command(stale)) == [f"optim.lr: 0.123 -> {published_lr(published)!r}"]
    out = tmp_path / "never"
    assert main([str(stale), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.123 ->" in err and "Fix: add these values to the command" in err
    assert not out.exists()  # nothing ran
    with pytest.raises(ReproduceError, match="already holds a run"):
        reproduce(published, out=published)  # a rerun never reuses a folder


def published_lr(run: Path) -> float:
    return yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"]


def test_a_folder_without_a_command_or_a_run_says_what_it_needs(published, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(published, bare)
    (bare / "command.txt").unlink()
    assert main([str(bare), "--check-only"]) == 2
    assert "no command.txt and no .hydra/overrides.yaml" in capsys.readouterr().err
    (bare / "command.txt").write_text("bash train.sh\n")
    with pytest.raises(ReproduceError, match=r"not `python experiments/train.py \.\.\.`"):
        parse_command(bare)
    with pytest.raises(ReproduceError, match="not a finished run folder"):
        reproduce(tmp_path)


def _first_seed_of_each_cell() -> list[Path]:
    cells: dict[Path, Path] = {}
    for command in sorted((ROOT / "experiments" / "results").rglob("command.txt")):
        cells.setdefault(command.parent.parent, command.parent)
    return list(cells.values())


@pytest.mark.parametrize("run", _first_seed_of_each_cell(), ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_published_results_compose_to_their_recorded_configs(run):
    """A changed default or preset that would make a published command train another experiment fails here,
    naming the field (republish the results, or keep the default)."""
    assert config_drift(run, parse_command(run)) == []
