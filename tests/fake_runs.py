"""Fake run folders in the run-folder format, with known metric values, and a fake Hydra multirun built from them.

Used by test_summarize.py (the summary's numbers are checked against ``ACC``, ``BEST_BONUS``, ``GAIN``, ``LOSS``,
``RECOVERY`` and ``expected_mean_pattern``), test_plots.py and test_notebook.py (the notebook runs on
``make_multirun``).
"""

from __future__ import annotations

import json
from pathlib import Path

BERT = [f"bert.encoder.layer.{i}.{s}" for i in range(2)
        for s in ("attention.self.query", "attention.self.value", "intermediate.dense")]
MLP = [f"blocks.{i}.{s}" for i in range(2) for s in ("up", "down")]
SEEDS = (0, 1, 2)

# Main metric per (task, method, target_r), one value per seed.
ACC = {("lora", 2): [0.60, 0.62, 0.64], ("lora", 4): [0.65, 0.66, 0.70],
       ("adalora", 2): [0.70, 0.72, 0.74], ("adalora", 4): [0.75, 0.75, 0.78]}
# The rte runs evaluate at steps 10, 20, 30: acc + BEST_BONUS, acc - GAIN, acc (acc: the final ACC value), so the
# best evaluation is the first when BEST_BONUS > 0 and the last one gained GAIN (x100: points) over the one before.
BEST_BONUS = {("lora", 2): 0.02, ("lora", 4): -0.05, ("adalora", 2): -0.05, ("adalora", 4): -0.05}
GAIN = {("lora", 2): 0.010, ("lora", 4): 0.002, ("adalora", 2): 0.008, ("adalora", 4): 0.004}
EVAL_STEPS = (10, 20, 30)
LOSS = {("lora", 2): [0.02, 0.03, 0.04], ("lora", 4): [0.012, 0.014, 0.016],
        ("adalora", 2): [0.01234, 0.01334, 0.01434], ("adalora", 4): [0.005, 0.008, None]}  # seed 2 fails
# The planted runs evaluate at steps 10, 20: LOSS_BEFORE x loss, then loss (a gain of 1/3 of the previous value).
LOSS_BEFORE = 1.5
RECOVERY = {("lora", 2): [0.25] * 3, ("lora", 4): [0.25] * 3,
            ("adalora", 2): [0.5, 0.6, 0.7], ("adalora", 4): [0.8, 0.9, None]}
PLANTED = {"blocks.0.up": 4, "blocks.0.down": 1, "blocks.1.up": 0, "blocks.1.down": 3}


def adalora_pattern(task: str, r: int, seed: int) -> dict:
    """A seed-dependent pattern whose mean over seeds 0..2 is known (see ``expected_mean_pattern``)."""
    names = BERT if task == "rte" else MLP
    pat = {n: r for n in names}
    pat[names[0]] = (1, 2, 4)[seed] + r  # mean r + 7/3
    pat[names[1]] = r - 1 + (seed == 1)  # mean r - 2/3
    pat[names[-1]] = 0
    return pat


def expected_mean_pattern(task: str, r: int, seeds=SEEDS) -> dict:
    pats = [adalora_pattern(task, r, s) for s in seeds]
    return {n: sum(p[n] for p in pats) / len(pats) for n in pats[0]}


def write_run(folder: Path, *, task: str, method: str, target_r: int, seed: int, status: str | None = "completed",
              final: dict | None = None, main_metric: str = "accuracy", higher_is_better: bool = True,
              rank_pattern: dict | None = None, planted: dict | None = None, history: bool = False,
              trainable_params: int = 1000, wall_time_s: float = 1.0, error: str | None = None,
              evals: list[dict] | None = None, best: dict | None = None, lr: float = 0.001) -> Path:
    """One run folder in the contract's format; ``status=None`` writes no summary.json (a crashed run).

    ``evals``: the eval lines of metrics.jsonl (``split`` added; default one at step 3 with the main metric 0.5);
    ``best``: summary.json's best (default ``final``); ``lr``: ``optim.lr`` in config.yaml.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".hydra").mkdir(exist_ok=True)
    cfg = (f"method:\n  name: {method}\n  target_r: {target_r}\n  init_r: {int(target_r * 1.5)}\n"
           f"task:\n  name: {task}\nseed: {seed}\noptim:\n  lr: {lr}\n")
    (folder / "config.yaml").write_text(cfg)
    (folder / ".hydra" / "config.yaml").write_text(cfg)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- method={method}\n- seed={seed}\n")
    metrics = [{"step": s, "split": "train", "loss": 1.0 / s, "lr": 1e-3, "budget": 10} for s in (1, 2, 3)]
    if evals is None:
        evals = [{"step": 3, "loss": 0.5, "lr": 1e-3, "budget": 10, main_metric: 0.5}]
    metrics += [{**e, "split": "eval"} for e in evals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if status is not None:
        summary = {"status": status, "task": task, "method": method, "target_r": target_r, "seed": seed,
                   "main_metric": main_metric, "final": final or {}, "best": best or final or {},
                   "trainable_params": trainable_params, "adapter_params": trainable_params // 2,
                   "final_budget": target_r * 4, "wall_time_s": wall_time_s, "error": error,
                   "total_steps": 30}
        if not higher_is_better:
            summary["higher_is_better"] = False
        (folder / "summary.json").write_text(json.dumps(summary))
    if rank_pattern is not None:
        (folder / "rank_pattern.json").write_text(json.dumps(rank_pattern))
    if planted is not None:
        (folder / "planted_ranks.json").write_text(json.dumps(planted))
    if history and rank_pattern is not None:
        init = {n: int(target_r * 1.5) for n in rank_pattern}
        lines = [{"step": 0, "budget": sum(init.values()), "ranks": init},
                 {"step": 5, "budget": (sum(init.values()) + sum(rank_pattern.values())) // 2,
                  "ranks": {n: (init[n] + v) // 2 for n, v in rank_pattern.items()}},
                 {"step": 10, "budget": sum(rank_pattern.values()), "ranks": rank_pattern}]
        (folder / "rank_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in lines))
    (folder / "figures").mkdir(exist_ok=True)
    (folder / "adapter").mkdir(exist_ok=True)
    (folder / "adapter" / "config.yaml").write_text("not: a run\n")
    return folder


def rte_evals(method: str, r: int, seed: int) -> list[dict]:
    """The eval lines of a fake rte run (see ``BEST_BONUS`` and ``GAIN``), with the growth diagnostic: σ_max per
    module type for every method, scale·max|λ| and the bound for AdaLoRA."""
    acc = ACC[method, r][seed]
    out = []
    for k, (step, a) in enumerate(zip(EVAL_STEPS, (acc + BEST_BONUS[method, r], acc - GAIN[method, r], acc))):
        e = {"step": step, "accuracy": a, "eval_loss": 0.7 - 0.01 * k, "budget": 10}
        for t, size in (("query", 1.0), ("value", 2.0), ("ffn.in", 3.0)):
            e[f"sigma_max/{t}"] = size * step / 100
            if method == "adalora":
                e[f"scale_lambda_max/{t}"] = size * step / 90
        if method == "adalora":
            e["growth_bound"] = step / 10
        out.append(e)
    return out


def make_multirun(root: Path) -> Path:
    """2 tasks x 2 methods x 2 budgets x 3 seeds, one run with status "failed", one crashed run (no summary)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for task in ("rte", "planted_rank"):
        for method in ("lora", "adalora"):
            for r in (2, 4):
                for seed in SEEDS:
                    folder = root / f"method.target_r={r},method={method},task={task}" / f"seed={seed}"
                    names = BERT if task == "rte" else MLP
                    pattern = adalora_pattern(task, r, seed) if method == "adalora" else {n: r for n in names}
                    if task == "rte":
                        evals = rte_evals(method, r, seed)
                        best = max(evals, key=lambda e: e["accuracy"])
                        write_run(folder, task=task, method=method, target_r=r, seed=seed,
                                  final={"accuracy": ACC[method, r][seed], "loss": 0.5}, evals=evals,
                                  best={"accuracy": best["accuracy"], "step": best["step"]},
                                  rank_pattern=pattern, history=(method == "adalora" and seed == 0),
                                  trainable_params=1_000_000 + 1000 * r, wall_time_s=10.0 + seed)
                        continue
                    loss = LOSS[method, r][seed]
                    if loss is None:
                        write_run(folder, task=task, method=method, target_r=r, seed=seed, status="failed",
                                  main_metric="distill_loss", higher_is_better=False,
                                  error="RuntimeError: CUDA out of memory")
                        continue
                    write_run(folder, task=task, method=method, target_r=r, seed=seed,
                              final={"distill_loss": loss, "rank_recovery": RECOVERY[method, r][seed],
                                     "rank_recovery_uniform": 0.25, "rank_spearman": 0.5},
                              evals=[{"step": 10, "distill_loss": LOSS_BEFORE * loss},
                                     {"step": 20, "distill_loss": loss}],
                              main_metric="distill_loss", higher_is_better=False, rank_pattern=pattern,
                              planted=PLANTED, trainable_params=2000 * r, wall_time_s=2.0)
    write_run(root / "method.target_r=2,method=lora,task=rte" / "seed=3", task="rte", method="lora", target_r=2,
              seed=3, status=None)
    return root
