"""Every task, method and experiment preset runs a few steps and leaves a complete run folder.

GLUE tasks read the session's fixture folder (``glue_dir``) through ADALORA_GLUE_DIR, set for every test here
(subprocesses inherit it), so nothing reads ../shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adalora_lab.loop import train
from helpers import FOLDERS, ROOT, compose_run, options

RUN_FILES = ["config.yaml", "metrics.jsonl", "summary.json", "rank_pattern.json", "rank_history.jsonl",
             "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, glue_dir):
    monkeypatch.setenv("ADALORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ADALORA_GLUE_DIR", str(glue_dir))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def run(overrides: list[str], run_dir: Path) -> dict:
    cfg = compose_run(["debug=fast", "logger=none"] + overrides)  # later overrides win
    return train(cfg, run_dir)


def check_run_folder(run_dir: Path, adaptive: bool = True) -> dict:
    for f in RUN_FILES:
        assert (run_dir / f).is_file(), f"{f} missing in {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["trainable_params"] > 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {m["split"] for m in metrics} == {"train", "eval"}
    assert all("budget" in m for m in metrics)
    ranks = json.loads((run_dir / "rank_pattern.json").read_text())
    assert sum(ranks.values()) == summary["final_budget"]
    if adaptive:
        history = [json.loads(line) for line in (run_dir / "rank_history.jsonl").read_text().splitlines()]
        assert history[0]["budget"] == summary["init_budget"]
        assert history[-1]["budget"] == summary["final_budget"] == sum(history[-1]["ranks"].values())
    return summary


MAIN_METRIC = {"sst2": "accuracy", "rte": "accuracy", "mrpc": "accuracy", "cola": "matthews", "stsb": "pearson",
               "qnli": "accuracy", "mnli": "accuracy", "qqp": "accuracy"}


@pytest.mark.parametrize("task", sorted(FOLDERS))
def test_every_glue_task_runs(task, tmp_path):
    s = run(["model=tiny_bert", f"task={task}", "method=adalora", "method.target_r=2"], tmp_path / "run")
    check_run_folder(tmp_path / "run")
    assert s["main_metric"] == MAIN_METRIC[task] and MAIN_METRIC[task] in s["final"]
    if MAIN_METRIC[task] == "accuracy":
        assert 0.0 <= s["final"]["accuracy"] <= 1.0
    assert s["final_budget"] == 2 * 12  # 6 matrix types x 2 layers, average rank 2


@pytest.mark.parametrize("method", options("method"))
def test_every_method_runs(method, tmp_path):
    run_dir = tmp_path / "run"
    s = run(["model=tiny_bert", "task=rte", f"method={method}", "method.target_r=2"], run_dir)
    if method == "full":
        assert s["status"] == "completed" and (run_dir / "model.pt").is_file()
        return
    check_run_folder(run_dir, adaptive=method not in ("lora", "svd_lora"))
    ranks = json.loads((run_dir / "rank_pattern.json").read_text())
    if method in ("sora", "sora_schedule"):  # no explicit budget: the run reports where its sparsity landed
        assert 0 <= sum(ranks.values()) == s["final_budget"] <= s["init_budget"]
    else:
        assert sum(ranks.values()) == 2 * len(ranks)  # every budgeted method meets the same final budget


def test_a_run_writes_its_figures_unless_told_not_to(tmp_path):
    """figures=true (the default outside debug=fast) writes the run's figures; debug=fast leaves them out."""
    run(["model=tiny_bert", "task=rte", "method=adalora", "method.target_r=2", "figures=true"], tmp_path / "on")
    names = ["rank_heatmap.png", "rank_history.png", "learning_curves.png", "growth.png"]
    assert all((tmp_path / "on" / "figures" / n).stat().st_size > 5000 for n in names)
    run(["model=tiny_bert", "task=rte", "method=lora", "method.target_r=2"], tmp_path / "off")
    assert not list((tmp_path / "off").glob("figures/*.png"))
    assert compose_run([]).figures and not compose_run(["debug=fast"]).figures


def test_all_linear_from_the_command_line(tmp_path):
    """model.target_modules=[all-linear]: every linear layer but the classification head (PEFT's "all-linear")."""
    run(["model=tiny_bert", "task=rte", "method=lora", "method.target_r=2", "model.target_modules=[all-linear]"],
        tmp_path / "run")
    ranks = json.loads((tmp_path / "run" / "rank_pattern.json").read_text())
    assert len(ranks) == 2 * 6 + 1 and "bert.pooler.dense" in ranks  # 6 per layer, and the pooler
    assert not any(n.startswith("classifier") for n in ranks)


def test_gpt2_conv1d_runs(tmp_path):
    run(["model=tiny_gpt2", "task=rte", "method=adalora", "method.target_r=2"], tmp_path / "run")
    summary = check_run_folder(tmp_path / "run")
    assert summary["final_budget"] == 2 * 8  # 4 Conv1D types x 2 layers


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_experiment_preset_runs(preset, tmp_path):
    run([f"experiment={preset}"], tmp_path / "run")
    check_run_folder(tmp_path / "run")


@pytest.mark.slow
def test_multirun_sweep_and_summary(tmp_path):
    """`-m method=lora,adalora method.target_r=2,4 seed=0,1 debug=fast` runs 8 jobs; summarize makes one table."""
    sweep = tmp_path / "multirun"
    env = dict(os.environ)  # ADALORA_CACHE, ADALORA_GLUE_DIR, WANDB_MODE from _isolated
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "-m", "method=lora,adalora",
           "method.target_r=2,4", "seed=0,1", "debug=fast", "model=tiny_bert", "logger=none",
           f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    summaries = sorted(sweep.rglob("summary.json"))
    assert len(summaries) == 8
    assert all(json.loads(p.read_text())["status"] == "completed" for p in summaries)
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "summarize.py"), str(sweep)], check=True,
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    table = (sweep / "summary.md").read_text()
    for method in ("lora", "adalora"):
        assert method in table
    assert (sweep / "summary.csv").is_file() and (sweep / "comparison.png").is_file()
    assert "adalora" in out.stdout


def test_wandb_offline_logs_inside_run_folder(tmp_path, monkeypatch):
    """logger=wandb writes an offline run inside the run folder and never asks for a login."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    run_dir = tmp_path / "run"
    run(["model=tiny_bert", "task=rte", "method=adalora", "method.target_r=2", "logger=wandb"], run_dir)
    check_run_folder(run_dir)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    assert any(offline[0].rglob("*.wandb"))


def test_compaction_on_off_same_losses(tmp_path):
    """Compaction in the final phase is an optimisation only: same losses and metrics (with γ > 0 and clipping)."""
    losses = {}
    for compact in (True, False):
        run_dir = tmp_path / f"compact={compact}"
        s = run(["model=tiny_bert", "task=rte", "method=adalora", "method.target_r=2", "max_steps=24",
                 "log_every=1", "eval_every=12", "method.tfinal=0.5", "method.delta_t=2",
                 "method.orth_reg_weight=0.3", "optim.max_grad_norm=0.5", f"method.compact={compact}"], run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[compact] = ([r["loss"] for r in rows if r["split"] == "train"], s)
    (on, s_on), (off, s_off) = losses[True], losses[False]
    assert len(on) == 24
    assert on[:12] == off[:12]  # identical up to the final phase (step 12)
    assert on == pytest.approx(off, rel=1e-5, abs=1e-7)  # and to float tolerance after compaction
    assert s_on["final"]["eval_loss"] == pytest.approx(s_off["final"]["eval_loss"], rel=1e-5)
    assert s_on["final_budget"] == s_off["final_budget"] == 24
    assert s_on["adapter_params"] == s_off["adapter_params"]


def test_bf16_autocast_close_to_fp32(tmp_path):
    """precision=bf16 autocasts the forward only: same trainable set, losses within bf16 rounding of fp32."""
    losses = {}
    for precision in ("fp32", "bf16"):
        run_dir = tmp_path / precision
        s = run(["model=tiny_bert", "task=rte", "method=adalora", "method.target_r=2", "log_every=1",
                 f"precision={precision}"], run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = ([r["loss"] for r in rows if r["split"] == "train"], s)
    (l32, s32), (l16, s16) = losses["fp32"], losses["bf16"]
    assert l32 != l16  # autocast really ran in bf16
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert s16["trainable_params"] == s32["trainable_params"] and s16["final_budget"] == s32["final_budget"]


@pytest.mark.parametrize("task,epochs,lr,subset", [("sst2", 2.0, 3e-3, 8000), ("cola", 3.0, 3e-3, None),
                                                   ("stsb", 3.0, 3e-3, None)])
def test_glue_compare_protocol_per_task(task, epochs, lr, subset):
    """The preset's per-task protocol resolves; a task it does not list (cola, stsb) takes the default row."""
    cfg = compose_run(["experiment=glue_compare", f"task={task}"])
    assert (cfg.epochs, cfg.optim.lr, cfg.task.max_train_examples) == (epochs, lr, subset)
    assert cfg.precision == "bf16" and cfg.method.tinit + cfg.method.tfinal == 0.5  # decreasing phase = half
    for method in ("lora", "prune_lora"):  # B A adapters: LoRA's lr
        assert compose_run(["experiment=glue_compare", f"task={task}", f"method={method}"]).optim.lr == 1e-3


@pytest.mark.parametrize("task,metric", [("cola", "matthews"), ("stsb", "pearson")])
def test_glue_compare_preset_on_other_tasks(task, metric, tmp_path, glue_dir, monkeypatch):
    """A GLUE task the preset does not list (CoLA, STS-B) runs from it by pointing task.data_dir at a GLUE folder."""
    monkeypatch.delenv("ADALORA_GLUE_DIR")
    s = run(["experiment=glue_compare", f"task={task}", f"task.data_dir={glue_dir}", "debug=fast"],
            tmp_path / "run")
    check_run_folder(tmp_path / "run")
    assert s["main_metric"] == metric and metric in s["final"]


def _fake_glue_hub(task: str, n: int) -> dict:
    """GLUE's Hub columns: CoLA ``sentence, label``; STS-B ``sentence1, sentence2, label``
    (a float score); built from the fixture rows so that the labels are learnable."""
    import random

    from helpers import LABELS, _fields

    rng = random.Random(0)
    rows = [_fields(task, i, LABELS[task][i % len(LABELS[task])], rng, "train") for i in range(n)]
    if task == "cola":
        return {"sentence": [r[3] for r in rows], "label": [int(r[1]) for r in rows], "idx": list(range(n))}
    return {"sentence1": [r[7] for r in rows], "sentence2": [r[8] for r in rows],
            "label": [float(r[9]) for r in rows], "idx": list(range(n))}


@pytest.mark.parametrize("task,metric", [("cola", "matthews"), ("stsb", "pearson")])
def test_glue_converged_preset_runs_a_held_out_task_from_the_hub(task, metric, tmp_path, monkeypatch):
    """What a new user online runs on a task not in ../shared: the converged preset, each method at its MRPC
    choice, `task.hub=true` (datasets.load_dataset faked here: no network in tests)."""
    import types

    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return _fake_glue_hub(name, 16)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("ADALORA_GLUE_DIR")  # the Hub, not a folder
    for method, lr in (("lora", 3e-4), ("adalora", 1e-3)):
        cfg = compose_run(["experiment=glue_converged", f"task={task}", "task.hub=true", f"method={method}",
                           "method.target_r=2", "model=tiny_bert", "debug=fast", "logger=none"])
        assert cfg.optim.lr == lr and cfg.task.hub
        s = train(cfg, tmp_path / method)
        check_run_folder(tmp_path / method, adaptive=method == "adalora")
        assert s["main_metric"] == metric and metric in s["final"]
    assert {c[1] for c in calls} == {task} and {c[2].split("[")[0] for c in calls} == {"train", "validation"}


def test_rerun_of_a_finished_run_reuses_it(tmp_path):
    """Rerunning a finished run (a sweep started again) touches nothing and returns the recorded summary."""
    run_dir = tmp_path / "run"
    args = ["model=tiny_bert", "task=rte", "method=adalora", "method.target_r=2"]
    first = run(args, run_dir)
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run(args, run_dir) == first
    assert run(args + ["+extra.table=edited"], run_dir) == first  # `extra` only feeds interpolation
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files
    with pytest.raises(Exception, match="another config"):  # a changed config is still refused
        run(args + ["optim.lr=0.5"], run_dir)


@pytest.mark.slow
def test_parallel_launcher_shares_the_cores(tmp_path):
    """With threads unset, each of the parallel launcher's jobs takes cores // jobs threads (recorded in its
    config.yaml), so that parallel jobs never oversubscribe the machine."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "-m", "hydra/launcher=parallel", "debug=fast",
           "model=tiny_bert", "task=rte", "method=lora", "logger=none", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, check=True, capture_output=True,
                   timeout=600)
    import yaml

    threads = [yaml.safe_load(p.read_text())["threads"] for p in sweep.rglob("config.yaml")
               if p.parent.name != ".hydra"]
    assert threads == [max(1, (os.cpu_count() or 1) // 2)] * 2


def test_lambda_lr_scale_moves_only_lambda_faster(tmp_path):
    """method=adalora_lambda_lr (opt-in): at step 1 Adam moves every λ from 0 by scale x lr, P, Q and the
    classifier exactly as the reference run does (same forward, same gradients). Read from the step-1 checkpoint."""
    from adalora_lab.resume import checkpoint_path, load_checkpoint

    weights = {}
    for name in ("adalora", "adalora_lambda_lr"):
        run(["model=tiny_bert", "task=rte", f"method={name}", "method.target_r=2", "max_steps=4", "method.tinit=0.5",
             "method.tfinal=0.25", "optim.weight_decay=0", "optim.warmup_ratio=0", "checkpoint_every=1",
             "keep_checkpoints=4"], tmp_path / name)
        weights[name] = load_checkpoint(checkpoint_path(tmp_path / name, 1))["model"]
    ref, fast = weights["adalora"], weights["adalora_lambda_lr"]
    lam = [k for k in ref if k.endswith("lora_E")]
    assert lam and set(ref) == set(fast)
    for k in ref:
        if k.endswith("lora_E"):
            assert ref[k].abs().max() > 0
            torch.testing.assert_close(fast[k], 10.0 * ref[k], rtol=1e-3, atol=1e-9)
        else:
            assert torch.equal(fast[k], ref[k]), k
    # the logged growth bound is Λ's (scale x Σ 10·lr), and scale·max|λ| stays under it
    evals = {name: [e for e in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                    if e["split"] == "eval"] for name in weights}
    assert evals["adalora"] and evals["adalora"][-1]["growth_bound"] > 0
    assert [e["growth_bound"] for e in evals["adalora_lambda_lr"]] == pytest.approx(
        [10.0 * e["growth_bound"] for e in evals["adalora"]])
    for e in evals["adalora_lambda_lr"]:
        assert all(v <= e["growth_bound"] * 1.001 for k, v in e.items() if k.startswith("scale_lambda_max/"))


def test_lambda_lr_scale_is_refused_where_there_is_no_lambda(tmp_path):
    from adalora.config import ConfigError

    with pytest.raises(ConfigError, match=r"method\.lambda_lr_scale.*method=adalora_lambda_lr"):
        run(["model=tiny_bert", "task=rte", "method=lora", "method.lambda_lr_scale=10"], tmp_path / "r")
