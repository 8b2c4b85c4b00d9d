"""A run killed anywhere and restarted ends exactly like the uninterrupted run (CPU, deterministic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adalora_lab.loop import train
from adalora_lab.resume import FAULT_ENV, latest_checkpoint, save_checkpoint
from helpers import ROOT, compose_run

# 24 steps; masking every 2 steps from step 3; final phase (frozen pattern, compaction) from step 13
BASE = ["debug=fast", "logger=none", "model=tiny_bert", "task=rte", "method=adalora", "method.target_r=2",
        "max_steps=24", "checkpoint_every=3", "keep_checkpoints=2", "deterministic=true", "log_every=1",
        "eval_every=8", "method.tinit=0.1", "method.tfinal=0.45", "method.delta_t=2", "threads=1"]


@pytest.fixture(scope="module")
def overrides(glue_dir) -> list[str]:
    """The run's overrides, on the RTE fixture data."""
    return [*BASE, f"paths.glue_dir={glue_dir}"]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADALORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(FAULT_ENV, raising=False)


def outcome(run_dir: Path) -> tuple:
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = (run_dir / "rank_history.jsonl").read_text()
    return summary, weights, metrics, history


def assert_same(a: tuple, b: tuple) -> None:
    (sa, wa, ma, ha), (sb, wb, mb, hb) = a, b
    assert sa["status"] == sb["status"] == "completed"
    assert sa["final"] == sb["final"] and sa["best"] == sb["best"]
    assert json.dumps(ma) == json.dumps(mb)  # every logged loss and metric, once, in order
    assert ha == hb  # the same rank pattern at every masking step
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bitwise
    # one environment, from step 0: a resume on the same machine adds none
    assert [e["from_step"] for e in sa["environments"]] == [e["from_step"] for e in sb["environments"]] == [0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, overrides) -> tuple:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADALORA_CACHE", str(run_dir.parent / "cache"))
        mp.delenv(FAULT_ENV, raising=False)
        train(compose_run(overrides), run_dir)
    return outcome(run_dir)


@pytest.mark.parametrize("fault", ["step:5", "checkpoint:6", "step:14", "checkpoint:15", "step:23"])
def test_interrupted_run_resumes_exactly(fault, reference, overrides, tmp_path, monkeypatch):
    """In process: the run dies (exception) at a step or inside a checkpoint write, then restarts in its folder."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, f"raise@{fault}")
    with pytest.raises(KeyboardInterrupt):
        train(compose_run(overrides), run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))  # a torn write leaves no half file behind
    monkeypatch.delenv(FAULT_ENV)
    train(compose_run(overrides), run_dir)
    assert_same(outcome(run_dir), reference)


def test_resume_refuses_another_config(overrides, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "raise@step:7")
    with pytest.raises(KeyboardInterrupt):
        train(compose_run(overrides), run_dir)
    monkeypatch.delenv(FAULT_ENV)
    with pytest.raises(ValueError, match="optim.lr"):
        train(compose_run(overrides + ["optim.lr=0.5"]), run_dir)


def test_resume_from_explicit_checkpoint(reference, overrides, tmp_path, monkeypatch):
    src = tmp_path / "src"
    monkeypatch.setenv(FAULT_ENV, "raise@step:10")
    with pytest.raises(KeyboardInterrupt):
        train(compose_run(overrides), src)
    monkeypatch.delenv(FAULT_ENV)
    path, state = latest_checkpoint(src)
    assert state["state"]["step"] == 9
    dst = tmp_path / "dst"
    summary = train(compose_run(overrides + [f"resume={path}"]), dst)
    assert summary["final"] == reference[0]["final"]


def test_a_resume_in_another_environment_warns_and_is_recorded_from_its_step(overrides, tmp_path, monkeypatch,
                                                                               capsys):
    """The run records where it computes (versions, CPU); resumed under another torch version (faked: the
    checkpoint's record is rewritten), it says so and summary.json lists both environments with their steps."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "raise@step:10")
    with pytest.raises(KeyboardInterrupt):
        train(compose_run(overrides), run_dir)
    monkeypatch.delenv(FAULT_ENV)
    path, ckpt = latest_checkpoint(run_dir)
    (first,) = ckpt["state"]["environments"]
    assert first["from_step"] == 0 and first["torch"] == torch.__version__ and first["threads"] == 1
    assert first["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    first["torch"] = "0.0.1"
    save_checkpoint(run_dir, ckpt, keep=2)
    capsys.readouterr()
    summary = train(compose_run(overrides), run_dir)
    out = capsys.readouterr().out
    assert f"resumes at step 9 in another environment than the one it trained in (torch: 0.0.1 -> " \
           f"{torch.__version__})" in out and "not bit-identical" in out
    envs = json.loads((run_dir / "summary.json").read_text())["environments"]
    assert summary["environments"] == envs
    assert [(e["from_step"], e["torch"]) for e in envs] == [(0, "0.0.1"), (9, torch.__version__)]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill@step:4", "kill@checkpoint:12", "kill@step:17"])
def test_sigkill_then_rerun_same_command(fault, reference, overrides, tmp_path):
    """A real SIGKILL (also inside a checkpoint write and in the final phase); the same command resumes."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "ADALORA_CACHE": str(tmp_path / "cache"), FAULT_ENV: fault}
    killed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    env.pop(FAULT_ENV)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert_same(outcome(run_dir), reference)
