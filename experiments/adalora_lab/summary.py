#!/usr/bin/env python
"""Summarize a sweep of AdaLoRA runs: tables with paired statistics, and figures.

    python experiments/summarize.py MULTIRUN_DIR [--out DIR] [--which final|best] [--by KEY ...]
        [--where KEY=VALUE ...] [--no-plots]

Walks MULTIRUN_DIR for run folders (any folder holding ``summary.json``, ``config.yaml``, ``metrics.jsonl``
or ``.hydra/config.yaml``; folder names are not relied on) and writes into ``--out`` (default MULTIRUN_DIR):

- ``summary.md`` (also printed):
  - the results table: one row per (method, target_r), one column per task with ``mean ± std`` over seeds of the
    task's main metric (sample std, ddof=1), the seed count, trainable parameters and wall time;
  - "Final and best-epoch dev metric": per (task, method, target_r) the final and the best evaluation, mean ±
    std and n, and the plateau check: the mean over seeds of the last evaluation's gain over the one before
    (in points, x100, for scores in [-1, 1]; in % of the previous value for losses), flagged above 0.5, and
    the late trend: the slope over the last half of the evaluations, with its 95% interval over seeds;
  - "Paired differences vs LoRA": every method − LoRA at the same task and budget (and ``--by`` values), paired
    by seed (the seeds present in both), mean, 95% Student-t confidence interval, two-sided p-value of the paired
    t-test and whether the interval excludes 0, for the final and the best evaluation;
  - with ``--by KEY`` on a numeric key (``optim.lr``), the grid check: whether the best value lies at an edge of
    the grid;
  - "Where the budget went": mean final rank per module type and per layer, for adaptive methods;
  - the failed or incomplete runs, with their folder and error.
- ``summary.csv``: the same numbers in long form: one row per (task, method, target_r, metric, which, stat),
  ``stat`` one of ``value`` (mean, std, n over seeds), ``diff_vs_lora`` (paired difference: mean, std, n pairs,
  ci_low, ci_high, p_value, significant), ``last_eval_gain`` (plateau check, ``which`` curve; ``flag``: still
  improving), ``late_trend`` (the slope over the last half of the evaluations, mean over seeds with its
  interval; ``flag``: still rising) and ``grid_best`` (grid check; ``flag``: best at an edge).
- figures: ``comparison.png`` (per task, mean ± std and every seed; LoRA and AdaLoRA at one budget in one hue;
  the majority class for classification, the planted task's rank_recovery), ``learning_curves_<task>.png``
  (dev metric against step, mean ± std band per method and budget; with ``--by``, of each method's chosen
  setting, and ``learning_curves_<task>_grid.png`` of every grid cell), ``budget_vs_metric.png`` (with several
  target_r), ``growth_<task>_r<target_r>_seed<seed>.png`` (LoRA's and AdaLoRA's σ_max(ΔW) per module type, when
  logged) and ``rank_heatmap_<task>_<method>_r<target_r>.png`` (mean rank per module over seeds, beside the
  planted ranks when the run has ``planted_ranks.json``, with per-layer rank bars) for adaptive methods.

``--by optim.lr`` (any dotted key of the runs' resolved config.yaml, repeatable) splits each row by that value,
e.g. ``lora optim.lr=0.001``: the table of a learning-rate sweep.

``--where epochs=30`` (repeatable) keeps only the runs whose config has that value (numbers compare as numbers,
so ``30`` matches ``30.0``; ``null`` matches an unset key): the summary of one slice of a folder, such as one
training length, with its own chosen cells and paired differences. It needs ``--out``, so that the slice never
overwrites the folder's own summary.

Methods appear in a fixed order (:data:`METHOD_ORDER`: LoRA, AdaLoRA, its variants, then the rivals), split rows
by their ``--by`` values in numeric order.

Importable: ``summarize(multirun_dir, out_dir=None) -> dict``, ``collect_runs(dir)``, ``load_run(dir)``,
``paired_stats(differences)``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import yaml

from . import rundir
from .schema import result_config


def _plots():
    """adalora_lab.plots, imported on first use so that a bad argument fails before torch loads."""
    from . import plots

    return plots

__all__ = ["SummarizeError", "METHOD_ORDER", "BASELINE", "PLATEAU_POINTS", "read_json", "read_jsonl", "eval_records",
           "load_run", "collect_runs", "split_by", "aggregate", "pooling_problems", "paired_stats",
           "paired_differences", "plateau_rows", "grid_checks", "reference_lines", "allocation_rows",
           "summarize", "main"]

# Extra final metrics given their own column (and CSV rows) when a task reports them.
EXTRA_METRICS = ("rank_recovery",)
# Display order: LoRA, AdaLoRA, AdaLoRA's variants (the paper's ablations), then the rivals; full fine-tuning, the
# reference, first. Other methods / tasks follow in alphabetical order.
METHOD_ORDER = ("full", "lora", "adalora", "adalora_lambda_lr", "adalora_sensitivity_only", "adalora_magnitude",
                "adalora_no_orth", "svd_lora", "prune_lora", "sora", "sora_budget", "sora_schedule", "increlora",
                "increlora_no_advance")
TASK_ORDER = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "planted_rank")
# Every other method is compared with this one, paired by seed, at the same task and budget.
BASELINE = "lora"
# The plateau check flags a cell whose last evaluation still gained more than this (points, or % for losses).
PLATEAU_POINTS = 0.5
CONFIDENCE = 0.95
CSV_COLUMNS = ("task", "method", "target_r", "metric", "mean", "std", "n", "trainable_params", "adapter_params",
               "wall_time_s", "is_main", "higher_is_better", "which", "stat", "baseline", "ci_low", "ci_high",
               "p_value", "significant", "flag", "note")


class SummarizeError(RuntimeError):
    """No usable input: the folder is missing or holds no run."""


# ------------------------------------------------------------------------------------------------ reading


def read_json(path):
    """The parsed JSON file, or None if it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def read_jsonl(path) -> list[dict]:
    """Records of a JSON-lines file ([] if missing); a torn last line (run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def eval_records(records: list[dict]) -> list[dict]:
    """The ``split: eval`` records of metrics.jsonl by step; of several at one step (a resumed run evaluates that
    step again) the last written."""
    by_step = {}
    for m in records:
        if isinstance(m, dict) and m.get("split") == "eval" and _num(m.get("step")) is not None:
            by_step[m["step"]] = m
    return [by_step[s] for s in sorted(by_step)]


def _cfg_get(cfg, dotted: str, default=None):
    node = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _truthy(v) -> bool:
    return v.strip().lower() not in ("false", "0", "no", "") if isinstance(v, str) else bool(v)


def _is_run_dir(d: Path) -> bool:
    return any((d / m).is_file() for m in rundir.RUN_MARKERS) or (d / ".hydra" / "config.yaml").is_file()


def load_run(run_dir, root=None) -> dict:
    """Everything the summary needs from one run folder, with missing pieces as None.

    Keys: path, rel (path relative to ``root``), status ("completed" | "failed" | "running" | "incomplete"),
    error, task, method, target_r, seed, main_metric, higher_is_better, final, best, trainable_params,
    adapter_params, final_budget, wall_time_s, total_steps, rank_pattern, planted_ranks, has_history, config, evals (the
    eval records of metrics.jsonl, see :func:`eval_records`), base_method (the method; ``method`` becomes a label
    with the ``--by`` values in :func:`split_by`) and by ({key: value} of ``--by``).
    """
    run_dir = Path(run_dir)
    rel = os.path.relpath(run_dir, root) if root is not None else str(run_dir)
    cfg = {}
    for cfg_path in (run_dir / rundir.CONFIG, run_dir / ".hydra" / "config.yaml"):
        if cfg_path.is_file():
            try:
                cfg = yaml.safe_load(cfg_path.read_text()) or {}
            except yaml.YAMLError:
                cfg = {}
            break
    method_cfg = cfg.get("method") if isinstance(cfg, dict) else None
    cfg_method = method_cfg if isinstance(method_cfg, str) else _cfg_get(cfg, "method.name")
    task_cfg = cfg.get("task") if isinstance(cfg, dict) else None
    cfg_task = task_cfg if isinstance(task_cfg, str) else _cfg_get(cfg, "task.name")

    metrics = read_jsonl(run_dir / rundir.METRICS)
    error = None
    try:
        summary = read_json(run_dir / rundir.SUMMARY)
    except (json.JSONDecodeError, OSError) as e:
        summary, error = None, f"unreadable summary.json: {e}"
    if not isinstance(summary, dict):
        if summary is not None:
            error = "summary.json is not a JSON object"
        summary = {}
        status = "failed" if error else "incomplete"
        if error is None:
            last = max((m.get("step", -1) for m in metrics if isinstance(m, dict)), default=None)
            error = "no summary.json (crashed or still running)" + (
                f"; last logged step {last}" if last is not None else "; no metrics logged")
    else:
        status = summary.get("status") or "incomplete"
        error = summary.get("error")

    def pick(key, cfg_value):
        v = summary.get(key)
        return cfg_value if v is None else v

    rec = {
        "path": str(run_dir),
        "rel": rel,
        "status": status,
        "error": error,
        "task": pick("task", cfg_task),
        "method": pick("method", cfg_method),
        "target_r": pick("target_r", _cfg_get(cfg, "method.target_r")),
        "seed": pick("seed", _cfg_get(cfg, "seed")),
        "main_metric": summary.get("main_metric"),
        "higher_is_better": _truthy(summary.get("higher_is_better", True)),
        "final": summary.get("final") or {},
        "best": summary.get("best") or {},
        "trainable_params": summary.get("trainable_params"),
        "adapter_params": summary.get("adapter_params"),
        "final_budget": summary.get("final_budget"),
        "wall_time_s": summary.get("wall_time_s"),
        "total_steps": summary.get("total_steps"),
        "rank_pattern": None,
        "planted_ranks": None,
        "has_history": (run_dir / rundir.RANK_HISTORY).is_file(),
        "config": cfg if isinstance(cfg, dict) else {},
        "evals": eval_records(metrics),
        "by": {},
    }
    rec["base_method"] = rec["method"]
    for key, fname in (("rank_pattern", rundir.RANK_PATTERN), ("planted_ranks", rundir.PLANTED)):
        try:
            rec[key] = read_json(run_dir / fname)
        except (json.JSONDecodeError, OSError):
            rec[key] = None
    return rec


def collect_runs(multirun_dir) -> list[dict]:
    """:func:`load_run` for every run folder under ``multirun_dir`` (itself included), sorted by path.

    Hidden folders (``.hydra``), ``figures/`` and ``adapter/`` are skipped, and a run folder is not searched
    for nested runs.
    """
    root = Path(multirun_dir)
    runs = []
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        if _is_run_dir(d):
            runs.append(load_run(d, root))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(x for x in dirnames if not x.startswith(".") and x not in rundir.INNER_DIRS)
    return sorted(runs, key=lambda r: r["rel"])


# -------------------------------------------------------------------------------------------- aggregating


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _problem(run: dict, which: str) -> str | None:
    """Why a run cannot enter the table (None if it can)."""
    if run["status"] != "completed":
        return run["error"] or f"status {run['status']!r}"
    metric = run["main_metric"]
    if not metric:
        return "summary.json has no main_metric"
    if _num(run[which].get(metric)) is None:
        return f"summary.json '{which}' has no numeric {metric!r}"
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, std


def _order(value, order) -> tuple:
    return (order.index(value), "") if value in order else (len(order), str(value))


def _r_key(r) -> tuple:
    n = _num(r)
    return (0, n) if n is not None else (1, 0.0)


def _value_key(v) -> tuple:
    """Numbers in numeric order (0.001 before 0.003 before 0.01), then other values as text."""
    n = _num(v)
    return (0, n, "") if n is not None and not isinstance(v, bool) else (1, 0.0, str(v))


def _cell_key(base_method, target_r, by: dict) -> tuple:
    """Display order of a (method, budget, --by values) cell: method order, budget, then the --by values."""
    return (_order(base_method, METHOD_ORDER), _r_key(target_r), tuple(_value_key(v) for v in by.values()))


def _groups(runs: list[dict], which: str) -> tuple[dict[tuple, list[dict]], list[dict]]:
    """({(task, method label, target_r): usable runs}, unusable runs with a ``problem`` key)."""
    groups: dict[tuple, list[dict]] = {}
    bad = []
    for run in runs:
        problem = _problem(run, which)
        if problem is not None:
            bad.append({**run, "problem": problem})
            continue
        groups.setdefault((run["task"], run["method"], run["target_r"]), []).append(run)
    return groups, bad


def aggregate(runs: list[dict], which: str = "final") -> tuple[list[dict], list[dict]]:
    """(summary rows, unusable runs).

    One row per (task, method, target_r, metric) for the main metric (``is_main``) and for each of
    :data:`EXTRA_METRICS` present, with mean, sample std (NaN for n=1), n, ``values`` ([(seed, value)]), ``which``,
    ``base_method``, ``by`` and the mean trainable parameters and wall time over the runs used, in display order
    (:data:`METHOD_ORDER`, budget, ``--by`` values, task). Unusable runs are returned with a ``problem`` key.
    """
    groups, bad = _groups(runs, which)
    rows = []
    for (task, method, target_r), group in groups.items():
        metric = Counter(r["main_metric"] for r in group).most_common(1)[0][0]
        used = [r for r in group if _num(r[which].get(metric)) is not None]
        params = [p for p in (_num(r["trainable_params"]) for r in used) if p is not None]
        final_params = [p for p in (_num(r["adapter_params"]) for r in used) if p is not None]
        walls = [w for w in (_num(r["wall_time_s"]) for r in used) if w is not None]
        common = {
            "task": task,
            "method": method,
            "base_method": group[0]["base_method"],
            "by": dict(group[0]["by"]),
            "target_r": target_r,
            "which": which,
            "trainable_params": statistics.fmean(params) if params else float("nan"),
            "adapter_params": statistics.fmean(final_params) if final_params else float("nan"),
            "wall_time_s": statistics.fmean(walls) if walls else float("nan"),
        }
        for m, is_main in [(metric, True)] + [(x, False) for x in EXTRA_METRICS if x != metric]:
            pairs = [(r["seed"], v) for r, v in ((r, _num(r[which].get(m))) for r in used) if v is not None]
            if not pairs:
                continue
            vals = [v for _, v in pairs]
            mean, std = _mean_std(vals)
            hib = all(r["higher_is_better"] for r in used) if is_main else True
            seeds = sorted((s for s, _ in pairs if s is not None), key=_r_key)
            rows.append({**common, "metric": m, "mean": mean, "std": std, "n": len(vals), "is_main": is_main,
                         "higher_is_better": hib, "seeds": seeds,
                         "values": sorted(pairs, key=lambda p: _r_key(p[0]))})
    rows.sort(key=lambda r: (_cell_key(r["base_method"], r["target_r"], r["by"]), _order(r["task"], TASK_ORDER),
                             not r["is_main"], r["metric"]))
    return rows, bad


def pooling_problems(runs: list[dict], which: str = "final") -> list[dict]:
    """What would make a cell's mean pool different experiments: per (task, method label, target_r) of the usable
    runs, a run that is there twice (the same config and seed: published twice, or copied in under another
    name), and each result-affecting config field other than the seed whose value differs between the cell's runs
    (a length or learning rate the cell was not split by). Each: {task, method, target_r, problem, fix}."""
    groups, _ = _groups(runs, which)
    out = []
    for (task, method, target_r), group in groups.items():
        cell = {"task": task, "method": method, "target_r": target_r}
        configs = [result_config(r["config"]) for r in group]
        same: dict[str, list[str]] = {}  # one experiment (its config, the seed included) -> its run folders
        for r, c in zip(group, configs):
            same.setdefault(json.dumps(c, sort_keys=True, default=str), []).append(r["rel"])
        for where in same.values():
            if len(where) > 1:
                out.append({**cell, "problem": f"one run is here {len(where)} times ({', '.join(where)})",
                            "fix": "keep one of them (republishing with collect_results.py drops renamed copies)"})
        for key in sorted({k for c in configs for k in c} - {"seed"}):
            values = sorted({json.dumps(c.get(key), sort_keys=True, default=str) for c in configs})
            if len(values) > 1:
                out.append({**cell, "problem": f"{key} differs between its runs ({', '.join(values)})",
                            "fix": f"split the cells with --by {key}"})
    return out


def _pooling_markdown(problems: list[dict]) -> list[str]:
    lines = ["## Pooling check", "",
             "Every cell should pool one experiment over its seeds: no run twice, no result-affecting config "
             "field other than the seed differing between its runs.", ""]
    if not problems:
        return lines + ["None found.", ""]
    lines += ["| task | method | target_r | problem | fix |", "|---|---|---:|---|---|"]
    lines += [f"| {_md_cell(p['task'])} | {_md_cell(p['method'])} | {_fmt_r(p['target_r'])} | {_md_cell(p['problem'])} "
              f"| {_md_cell(p['fix'])} |" for p in problems]
    return lines + [""]


# -------------------------------------------------------------------------------------------- statistics


def paired_stats(differences: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean, sample std (ddof=1), Student-t confidence interval and two-sided p-value of paired differences.

    The interval is mean ± t_{(1+confidence)/2, n-1} · std / √n and the p-value that of the paired t-test of
    mean 0; ``significant``: the interval excludes 0. With n < 2 there is no interval (NaN, ``significant`` None
    and a ``note`` saying so); with n ≥ 2 identical differences the interval is the point itself.
    """
    d = [float(x) for x in differences]
    n = len(d)
    nan = float("nan")
    out = {"n": n, "mean": statistics.fmean(d) if d else nan, "std": nan, "ci_low": nan, "ci_high": nan,
           "p_value": nan, "significant": None, "note": ""}
    if n < 2:
        out["note"] = "no seed in both" if n == 0 else "n<2: no CI"
        return out
    from scipy import stats

    mean, std = out["mean"], statistics.stdev(d)
    se = std / math.sqrt(n)
    if se == 0.0:
        half, p = 0.0, (1.0 if mean == 0.0 else 0.0)
        out["note"] = "all differences equal"
    else:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
        p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    lo, hi = mean - half, mean + half
    out.update(std=std, ci_low=lo, ci_high=hi, p_value=p, significant=bool(lo > 0 or hi < 0))
    return out


def paired_differences(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """Every method − ``baseline`` per (task, target_r, metric, ``--by`` values), paired by seed.

    ``rows`` from :func:`aggregate` (one ``which``). Only the seeds present in both cells enter; a cell with no
    baseline at its budget is left out. Each dict: task, method (label), base_method, baseline (label), target_r,
    metric, is_main, which, higher_is_better, seeds, :func:`paired_stats`'s keys and ``favours`` (the better
    method's label when the interval excludes 0, else None).
    """
    base = {(r["task"], r["target_r"], r["metric"], tuple(r["by"].items())): r for r in rows
            if r["base_method"] == baseline}
    out = []
    for r in rows:
        b = base.get((r["task"], r["target_r"], r["metric"], tuple(r["by"].items())))
        if r["base_method"] == baseline or b is None:
            continue
        mine, theirs = dict(r["values"]), dict(b["values"])
        seeds = sorted((s for s in mine if s in theirs and s is not None), key=_r_key)
        st = paired_stats([mine[s] - theirs[s] for s in seeds])
        favours = None
        if st["significant"]:
            favours = r["method"] if (st["mean"] > 0) == bool(r["higher_is_better"]) else b["method"]
        out.append({"task": r["task"], "method": r["method"], "base_method": r["base_method"],
                    "baseline": b["method"], "target_r": r["target_r"], "metric": r["metric"],
                    "is_main": r["is_main"], "which": r["which"], "higher_is_better": r["higher_is_better"],
                    "by": r["by"], "seeds": seeds, **st, "favours": favours})
    return out


def chosen_cells(rows: list[dict], of: list[dict] | None = None) -> list[dict]:
    """With ``--by``: per (task, method, target_r), the rows of one ``--by`` cell, the chosen setting: the cell
    with the most seeds (a tuning protocol runs its extra seeds at the chosen point only); among cells with as
    many seeds, the best main metric at the tuning seed (the smallest seed, which the protocol chose on), then
    the best mean. Not the best mean first: when a second cell also ran every seed (a choice that moved, say,
    when γ was added), picking by the mean would choose on the very seeds that report the result. With ``of``
    (chosen rows of the other evaluation), the same cells as those. Their ``by`` is emptied, so that
    :func:`paired_differences` pairs each method at its chosen setting with LoRA at its own; ``method`` (the
    label) keeps the values."""
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["base_method"], r["target_r"]), {}).setdefault(r["method"], []).append(r)
    picked = None if of is None else {(r["task"], r["base_method"], r["target_r"]): r["method"] for r in of}

    def rank(cell_rows):
        main = next((r for r in cell_rows if r["is_main"]), None)
        if main is None:
            return (-1, 0.0, 0.0)
        sign = 1.0 if main["higher_is_better"] else -1.0
        values = dict(main["values"])
        seeds = sorted((s for s in values if s is not None), key=_r_key)
        tuning = values[seeds[0]] if seeds else main["mean"]
        return (main["n"], sign * tuning, sign * main["mean"])

    out = []
    for key, group in cells.items():
        if picked is None:
            best = max(group.values(), key=rank)
        elif picked.get(key) in group:
            best = group[picked[key]]
        else:
            continue
        out += [{**r, "by": {}} for r in best]
    return out


def _values(evals: list[dict], metric: str) -> list[float]:
    return [v for v in (_num(m.get(metric)) for m in evals) if v is not None]


def _in_unit(change: float, ref: float, hib: bool, scale: float) -> float | None:
    """An improvement (positive = better) in points (x scale) for scores, in % of ``ref`` for metrics shown
    unscaled (losses)."""
    change = change if hib else -change
    if scale != 1.0:
        return change * scale
    return change / abs(ref) * 100.0 if ref != 0 else None


def _gain(evals: list[dict], metric: str, hib: bool, scale: float) -> float | None:
    """The last evaluation's improvement over the one before (``_in_unit`` of the previous value); None with
    fewer than two evaluations."""
    vals = _values(evals, metric)
    return _in_unit(vals[-1] - vals[-2], vals[-2], hib, scale) if len(vals) >= 2 else None


def _late_trend(evals: list[dict], metric: str, hib: bool, scale: float) -> float | None:
    """The least-squares slope of the metric over the last half of the evaluations (at least 3), per evaluation,
    in the unit of ``_gain`` (of the half's mean); None with fewer than 3 evaluations. Less noisy than the last
    gain, a difference of two single evaluations, and not driven by the last one alone (which a schedule
    decaying to 0 tends to lift)."""
    vals = _values(evals, metric)
    if len(vals) < 3:
        return None
    ys = vals[-max(3, math.ceil(len(vals) / 2)):]
    slope = statistics.linear_regression(range(len(ys)), ys).slope
    return _in_unit(slope, statistics.fmean(ys), hib, scale)


def plateau_rows(runs: list[dict], rows: list[dict], scales: dict[str, float],
                 threshold: float = PLATEAU_POINTS) -> list[dict]:
    """The plateau check per main-metric cell of ``rows``: the mean over seeds of the last evaluation's gain over
    the previous one (see ``_gain``; ``unit`` says which), with ``still_improving`` when it exceeds ``threshold``.
    Runs with fewer than two evaluations do not count (``n`` is the number that do). ``trend``: the
    :func:`paired_stats` over seeds of each run's slope over the last half of its evaluations (``_late_trend``);
    ``trend["significant"]`` with a positive mean says the curves were still rising."""
    groups, _ = _groups(runs, rows[0]["which"] if rows else "final")
    out = []
    for r in rows:
        if not r["is_main"]:
            continue
        scale = scales.get(r["metric"], 1.0)
        group = groups.get((r["task"], r["method"], r["target_r"]), [])
        gains = [g for g in (_gain(run["evals"], r["metric"], r["higher_is_better"], scale) for run in group)
                 if g is not None]
        mean, std = _mean_std(gains) if gains else (float("nan"), float("nan"))
        slopes = [t for t in (_late_trend(run["evals"], r["metric"], r["higher_is_better"], scale) for run in group)
                  if t is not None]
        out.append({"task": r["task"], "method": r["method"], "target_r": r["target_r"], "metric": r["metric"],
                    "n": len(gains), "mean": mean, "std": std, "unit": "points" if scale != 1.0 else "%",
                    "still_improving": bool(gains) and mean > threshold, "trend": paired_stats(slopes)})
    return out


def grid_checks(rows: list[dict], keys: list[str], failed: list[dict] | None = None) -> list[dict]:
    """For each numeric ``--by`` key: per (task, method, target_r, metric, other --by values), the grid of values,
    the best one by the mean main metric, and ``edge``: "low" / "high" when the best is the smallest / largest
    value of the grid (the optimum may lie outside it), "no" when inside. Where some values have more seeds than
    others (a tuning protocol's seed-0 grid plus seeds at its choice), the values are compared on the seeds all of
    them have (``seeds``; None when every value has the same). A value at which every run failed
    (``failed``: the unusable runs, e.g. diverged) is part of the grid, listed in ``failed_values``, and never the
    best. Keys with non-numeric values and grids of one value are skipped."""
    out = []
    for key in keys:
        cells: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["is_main"] and key in r["by"]:
                others = tuple((k, v) for k, v in r["by"].items() if k != key)
                cells.setdefault((r["task"], r["base_method"], r["target_r"], r["metric"], others), []).append(r)
        for (task, method, target_r, metric, others), group in cells.items():
            if any(_num(g["by"][key]) is None or isinstance(g["by"][key], bool) for g in group):
                continue
            done = {float(g["by"][key]) for g in group}
            lost = sorted({float(b["by"][key]) for b in failed or [] if b.get("status") == "failed"
                           and (b["task"], b["base_method"], b["target_r"]) == (task, method, target_r)
                           and tuple((k, v) for k, v in b["by"].items() if k != key) == others
                           and _num(b["by"].get(key)) is not None and float(b["by"][key]) not in done})
            grid = sorted(done | set(lost))
            if len(grid) < 2:
                continue
            hib = all(g["higher_is_better"] for g in group)
            # values are compared on the seeds they all have (a tuning protocol's seed 0), so that a value whose
            # extra seeds pulled its mean down is not ranked against other values' single lucky seed
            shared = set.intersection(*({s for s, _ in g["values"]} for g in group))
            if shared and any(len(g["values"]) > len(shared) for g in group):
                stats = {id(g): _mean_std([v for s, v in g["values"] if s in shared]) + (len(shared),)
                         for g in group}
            else:
                shared, stats = None, {id(g): (g["mean"], g["std"], g["n"]) for g in group}
            best = (max if hib else min)(group, key=lambda g: stats[id(g)][0])
            v = float(best["by"][key])
            edge = "low" if v == grid[0] else "high" if v == grid[-1] else "no"
            out.append({"task": task, "method": method, "target_r": target_r, "metric": metric, "key": key,
                        "others": dict(others), "grid": grid, "best_value": best["by"][key],
                        "best_label": best["method"], "best_mean": stats[id(best)][0],
                        "best_std": stats[id(best)][1], "best_n": stats[id(best)][2],
                        "means": {float(g["by"][key]): stats[id(g)][0] for g in group},
                        "seeds": sorted(shared, key=_r_key) if shared else None,
                        "failed_values": lost, "edge": edge})
    out.sort(key=lambda g: (_order(g["task"], TASK_ORDER), _order(g["method"], METHOD_ORDER),
                            _r_key(g["target_r"]), g["key"]))
    return out


def _dev_majority(run: dict) -> float | None:
    """Majority-class accuracy of the dev labels the run evaluated on (its local GLUE folder), or None."""
    task_cfg = run["config"].get("task") if isinstance(run["config"].get("task"), dict) else {}
    data_dir = task_cfg.get("data_dir")
    if not data_dir or task_cfg.get("hub") or not Path(str(data_dir)).expanduser().is_dir():
        return None
    try:
        from .data import DataError, load_task
        from .metrics import majority_class_accuracy

        examples = load_task(run["task"], data_dir, "dev", max_examples=task_cfg.get("max_eval_examples"))
        return majority_class_accuracy([e.label for e in examples])
    except (DataError, OSError, ValueError):
        return None


def reference_lines(runs: list[dict], rows: list[dict]) -> dict:
    """``{(task, metric): (value, label)}``: the chance levels the comparison draws.

    Accuracy tasks: the majority class, from the dev labels when a run's ``task.data_dir`` is here (its first
    ``max_eval_examples``), else :data:`adalora_lab.metrics.MAJORITY_CLASS` for a full dev set. The planted
    task's rank_recovery: the uniform allocation's (``rank_recovery_uniform`` in the runs' final metrics).
    """
    from .metrics import MAJORITY_CLASS

    out = {}
    metric_of = {r["task"]: r["metric"] for r in rows if r["is_main"]}
    for task, metric in metric_of.items():
        used = [r for r in runs if r["task"] == task and r["status"] == "completed"]
        if metric == "accuracy":
            value = next((v for v in map(_dev_majority, used) if v is not None), None)
            full_dev = all(_cfg_get(r["config"], "task.max_eval_examples") is None for r in used)
            if value is None and full_dev:
                value = MAJORITY_CLASS.get(str(task).lower().replace("-", "").replace("_", ""))
            if value is not None:
                out[task, metric] = (value, "majority class")
        uniform = [v for v in (_num(r["final"].get("rank_recovery_uniform")) for r in used) if v is not None]
        if uniform and any(r["task"] == task and r["metric"] == "rank_recovery" for r in rows):
            out[task, "rank_recovery"] = (statistics.fmean(uniform), "uniform allocation")
    return out


# ------------------------------------------------------------------------------------------------ writing


def _fmt_value(mean: float, std: float, n: int, scale: float) -> str:
    if scale != 1.0:
        m, s = f"{mean * scale:.2f}", f"{std * scale:.2f}"
    else:
        m, s = f"{mean:.4g}", f"{std:.4g}"
    return f"{m} (n=1)" if n == 1 or math.isnan(std) else f"{m} ± {s}"


def _fmt_params(p: float) -> str:
    if p is None or math.isnan(p):
        return "-"
    if p >= 1e6:
        return f"{p / 1e6:.2f}M"
    if p >= 1e3:
        return f"{p / 1e3:.1f}k"
    return f"{p:.0f}"


def _fmt_r(r) -> str:
    return "-" if r is None else str(r)


def _md_cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _per_task(values: dict[str, str]) -> str:
    """One value when every task agrees, else ``task: value`` pairs."""
    distinct = set(values.values())
    if len(distinct) <= 1:
        return next(iter(distinct), "-")
    return "; ".join(f"{t}: {v}" for t, v in values.items())


def _scales(rows: list[dict]) -> dict[str, float]:
    """{metric: display scale}: x100 for a score whose means all lie in [-1, 1], else 1 (see plots.display_scale)."""
    return {m: _plots().display_scale(m, [r["mean"] for r in rows if r["metric"] == m],
                                      all(r["higher_is_better"] for r in rows if r["metric"] == m))
            for m in dict.fromkeys(r["metric"] for r in rows)}


def _markdown(rows: list[dict], bad: list[dict], runs: list[dict], title: str, which: str, scales: dict,
              sections: list[str], figures: list[str]) -> tuple[str, str]:
    """(full markdown, the results table alone); ``sections`` (markdown) follow the table, then the failed runs
    and the ``figures``."""
    main = [r for r in rows if r["is_main"]]
    tasks = sorted({r["task"] for r in main}, key=lambda t: _order(t, TASK_ORDER))
    metric_of = {r["task"]: r["metric"] for r in main}
    hib_of = {t: all(r["higher_is_better"] for r in main if r["task"] == t) for t in tasks}
    extras = [(t, m) for t in tasks for m in EXTRA_METRICS
              if any(r["task"] == t and r["metric"] == m and not r["is_main"] for r in rows)]
    keys = list(dict.fromkeys((r["method"], r["target_r"]) for r in rows))
    by = {(r["task"], r["method"], r["target_r"], r["metric"]): r for r in rows}

    best = {}
    for t in tasks:
        means = [r["mean"] for r in main if r["task"] == t]
        best[t] = (max if hib_of[t] else min)(means)

    def head(t, m, hib):
        unit = " ×100" if scales[m] != 1.0 else ""
        return f"{t} {m}{unit} {'↑' if hib else '↓'}"

    header = ["method", "target_r"] + [head(t, metric_of[t], hib_of[t]) for t in tasks]
    header += [head(t, m, True) for t, m in extras]
    header += ["seeds (n)", "trainable params", "adapter params at final budget", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---:"] + ["---:"] * (len(header) - 2)) + "|"]
    for method, target_r in keys:
        cells = [_md_cell(method), _fmt_r(target_r)]
        ns, params, finals, walls = {}, {}, {}, {}
        for t in tasks:
            r = by.get((t, method, target_r, metric_of[t]))
            if r is None:
                cells.append("-")
                continue
            text = _fmt_value(r["mean"], r["std"], r["n"], scales[r["metric"]])
            cells.append(f"**{text}**" if r["mean"] == best[t] and len(keys) > 1 else text)
            ns[t], params[t] = str(r["n"]), _fmt_params(r["trainable_params"])
            finals[t] = _fmt_params(r["adapter_params"])
            walls[t] = "-" if math.isnan(r["wall_time_s"]) else f"{r['wall_time_s']:.1f}"
        for t, m in extras:
            r = by.get((t, method, target_r, m))
            cells.append("-" if r is None else _fmt_value(r["mean"], r["std"], r["n"], scales[m]))
        cells += [_per_task(ns), _per_task(params), _per_task(finals), _per_task(walls)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    n_ok = len(runs) - len(bad)
    out = [f"# Summary: {title}", "",
           f"{len(runs)} runs: {n_ok} completed, {len(bad)} failed or incomplete. "
           f"Cells: {which} value of each task's main metric, mean ± sample std (ddof=1) over seeds; "
           "scores in [-1, 1] ×100, losses as-is (4 significant digits); ↑ higher / ↓ lower is better; "
           "best per task in bold.", ""]
    done = [r for r in runs if r["status"] == "completed"]
    wall = sum(_num(r["wall_time_s"]) or 0.0 for r in done)
    steps = sum(int(_num(r["total_steps"]) or 0) for r in done)
    out += [f"Compute: {wall / 3600:.2f} h of run wall time and {steps:,} optimizer steps over the {len(done)} "
            "completed runs (each run's own time, summed; parallel runs overlap in real time).", ""]
    out += [table if main else "_No completed run._", ""]
    out += sections
    out += ["## Failed / incomplete runs", ""]
    if bad:
        out += ["| folder | task | method | target_r | seed | status | error |", "|---|---|---|---:|---:|---|---|"]
        for b in bad:
            err = _md_cell(b["problem"] or "")
            err = err if len(err) <= 300 else err[:297] + "..."
            out.append(f"| {_md_cell(b['rel'])} | {_md_cell(b['task'] or '-')} | {_md_cell(b['method'] or '-')} | "
                       f"{_fmt_r(b['target_r'])} | {_fmt_r(b['seed'])} | {b['status']} | {err} |")
    else:
        out.append("None.")
    out.append("")
    if figures:
        out += ["## Figures", ""]
        for f in figures:
            out += [f"![{Path(f).stem}]({Path(f).name})", ""]
    return "\n".join(out), table


def _table(header: list[str], align: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + \
        ["| " + " | ".join(row) + " |" for row in body]


def _by_task(items: list[dict]) -> list[dict]:
    """Stable sort by task (the items are in display order within a task)."""
    return sorted(items, key=lambda x: _order(x["task"], TASK_ORDER))


def _cells_markdown(final: list[dict], best: list[dict], plateau: list[dict], scales: dict) -> list[str]:
    main = _by_task([r for r in final if r["is_main"]])
    if not main:
        return []
    best_of = {(r["task"], r["method"], r["target_r"], r["metric"]): r for r in best}
    gain_of = {(g["task"], g["method"], g["target_r"]): g for g in plateau}
    body = []
    for r in main:
        scale = scales[r["metric"]]
        b = best_of.get((r["task"], r["method"], r["target_r"], r["metric"]))
        g = gain_of.get((r["task"], r["method"], r["target_r"]))
        gain, flag, trend = "-", "-", "-"
        if g is not None and g["n"]:
            unit = " pts" if g["unit"] == "points" else "%"
            spread = "" if math.isnan(g["std"]) else f" ± {g['std']:.2f}"
            gain = f"{g['mean']:+.2f}{spread}{unit} (n={g['n']})"
            flag = "**yes**" if g["still_improving"] else "no"
        t = g["trend"] if g is not None else None
        if t is not None and t["n"]:
            ci = f" [{t['ci_low']:+.2f}, {t['ci_high']:+.2f}]" if not math.isnan(t["ci_low"]) else ""
            trend = f"{t['mean']:+.2f}{ci}" + (" **rising**" if t["significant"] and t["mean"] > 0 else "")
        body.append([r["task"], _md_cell(r["method"]), _fmt_r(r["target_r"]), str(r["n"]),
                     _fmt_value(r["mean"], r["std"], r["n"], scale),
                     "-" if b is None else _fmt_value(b["mean"], b["std"], b["n"], scale), gain, flag, trend])
    head = ["task", "method", "target_r", "n", "final", "best epoch", "last-eval gain", "still improving",
            "late trend / eval [95% CI]"]
    return ["## Final and best-epoch dev metric", "",
            "Main metric per cell, mean ± sample std (ddof=1) over seeds (n); best epoch: each run's best "
            "evaluation on the dev set (an optimistic pick). Last-eval gain: mean over seeds of the last evaluation "
            "minus the one before, in points (×100) for scores and in % of the previous value for losses "
            f"(positive = improving); **yes** when above {PLATEAU_POINTS}: the runs had not plateaued. Late trend: "
            "each run's least-squares slope over the last half of its evaluations (at least 3), in the same unit "
            "per evaluation, mean over seeds with its 95% Student-t interval; **rising** when the interval lies "
            "above 0.", "",
            *_table(head, ["---", "---", "---:", "---:", "---:", "---:", "---:", "---", "---:"], body), ""]


def _fmt_diff(d: dict, scale: float) -> str:
    if d["n"] == 0:
        return "-"
    fmt = (lambda v: f"{v * scale:+.2f}") if scale != 1.0 else (lambda v: f"{v:+.3g}")
    if d["n"] < 2:
        return f"{fmt(d['mean'])} (n=1, no CI)"
    return f"{fmt(d['mean'])} [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]"


def _fmt_p(p: float) -> str:
    return "-" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_sig(d: dict) -> str:
    if d["significant"] is None:
        return d["note"] or "-"
    text = f"**yes** ({_md_cell(d['favours'])})" if d["significant"] else "no"
    return f"{text}; {d['note']}" if d["note"] else text


def _paired_markdown(final: list[dict], best: list[dict], scales: dict) -> list[str]:
    if not final:
        return []
    best_of = {(d["task"], d["method"], d["target_r"], d["metric"]): d for d in best}
    body = []
    for d in _by_task(final):
        scale = scales[d["metric"]]
        b = best_of.get((d["task"], d["method"], d["target_r"], d["metric"]))
        seeds = ", ".join(str(s) for s in d["seeds"]) or "-"
        row = [d["task"], d["metric"], f"{_md_cell(d['method'])} − {_md_cell(d['baseline'])}",
               _fmt_r(d["target_r"]), f"{d['n']} ({seeds})", _fmt_diff(d, scale), _fmt_p(d["p_value"]), _fmt_sig(d)]
        row += ["-"] * 3 if b is None else [_fmt_diff(b, scale), _fmt_p(b["p_value"]), _fmt_sig(b)]
        body.append(row)
    head = ["task", "metric", "difference", "target_r", "pairs (seeds)", "final: Δ [95% CI]", "p", "significant",
            "best epoch: Δ [95% CI]", "p", "significant"]
    return ["## Paired differences vs LoRA", "",
            f"Each method minus {BASELINE} at the same task and budget (and the same --by values), paired by seed "
            "(only seeds present in both); Δ in the table's units (×100 for scores); 95% Student-t confidence "
            "interval of the mean difference and the two-sided p-value of the paired t-test, not adjusted for "
            "multiple comparisons; **yes** when the interval excludes 0, with the better method (lower is better "
            "for losses).", "",
            *_table(head, ["---", "---", "---", "---:", "---:", "---:", "---:", "---", "---:", "---:", "---"], body),
            ""]


def _chosen_markdown(final: list[dict], best: list[dict], paired_final: list[dict], paired_best: list[dict],
                     scales: dict) -> list[str]:
    if not final:
        return []
    best_of = {(r["task"], r["method"], r["target_r"], r["metric"]): r for r in best}
    diff_of = {(d["task"], d["method"], d["target_r"], d["metric"]): d for d in paired_final}
    bdiff_of = {(d["task"], d["method"], d["target_r"], d["metric"]): d for d in paired_best}
    body = []
    for r in [r for r in final if r["is_main"]]:
        key = (r["task"], r["method"], r["target_r"], r["metric"])
        scale = scales[r["metric"]]
        b, d, bd = best_of.get(key), diff_of.get(key), bdiff_of.get(key)
        row = [r["task"], _md_cell(r["method"]), _fmt_r(r["target_r"]), str(r["n"]), _fmt_params(r["adapter_params"]),
               _fmt_value(r["mean"], r["std"], r["n"], scale),
               "-" if b is None else _fmt_value(b["mean"], b["std"], b["n"], scale)]
        for x in (d, bd):
            row += ["—", "", ""] if x is None else [_fmt_diff(x, scale), _fmt_p(x["p_value"]), _fmt_sig(x)]
        body.append(row)
    head = ["task", "method (chosen setting)", "target_r", "n", "adapter params at the end", "final", "best epoch",
            "final: Δ vs LoRA [95% CI]", "p", "significant", "best epoch: Δ vs LoRA [95% CI]", "p", "significant"]
    return ["## At each method's chosen setting", "",
            "Per task, method and budget, the --by cell with the most seeds (where a tuning protocol ran its extra "
            "seeds), then the best score at the tuning seed (the smallest), then the best mean: each method at its "
            "own chosen setting, and its paired difference with "
            f"{BASELINE} at {BASELINE}'s chosen setting (paired by seed, 95% Student-t interval, as above).", "",
            *_table(head, ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---", "---:",
                           "---:", "---"], body), ""]


def _grid_markdown(grid: list[dict], scales: dict) -> list[str]:
    if not grid:
        return []
    body = []
    for g in grid:
        scale = scales[g["metric"]]
        points = {**{v: _fmt_value(m, float("nan"), 1, scale).split(" ")[0] for v, m in g["means"].items()},
                  **{v: "failed" for v in g.get("failed_values", [])}}
        means = ", ".join(f"{_fmt_num(v)}: {text}" for v, text in sorted(points.items()))
        edge = "no" if g["edge"] == "no" else f"**yes ({g['edge']} edge)**"
        if len(g["grid"]) == 2:
            edge += ", 2-point grid"
        others = " ".join(f"{k}={v}" for k, v in g["others"].items() if v not in (None, "unset"))
        if g.get("seeds"):
            means += f" (seeds {', '.join(map(str, g['seeds']))}, which every value has)"
        body.append([g["task"], _md_cell(" ".join(filter(None, [g["method"], others]))), _fmt_r(g["target_r"]),
                     g["key"], means, _fmt_num(g["best_value"]),
                     _fmt_value(g["best_mean"], g["best_std"], g["best_n"], scale), edge])
    head = ["task", "method", "target_r", "key", "grid (value: mean)", "best", "best mean ± std", "at an edge"]
    return ["## Grid check", "",
            "Per cell and numeric --by key: the grid's mean main metric at each value (\"failed\": every run "
            "there failed, e.g. diverged) and whether the best value is the grid's smallest or largest (then the "
            "optimum may lie outside the grid: extend it).", "",
            *_table(head, ["---", "---", "---:", "---", "---", "---:", "---:", "---"], body), ""]


def _fmt_num(v) -> str:
    n = _num(v)
    return f"{n:g}" if n is not None else str(v)


def _csv_rows(final: list[dict], best: list[dict], paired: list[dict], plateau: list[dict],
              grid: list[dict]) -> list[dict]:
    out = [{**r, "stat": "value"} for r in final + best]
    for d in paired:
        out.append({**d, "stat": "diff_vs_lora", "note": d["note"]})
    for g in plateau:
        unit = "points" if g["unit"] == "points" else "% of the previous value"
        row = {k: v for k, v in g.items() if k != "trend"}
        out.append({**row, "which": "curve", "stat": "last_eval_gain", "is_main": True, "flag": g["still_improving"],
                    "note": unit})
        t = g["trend"]
        out.append({**row, **{k: t[k] for k in ("n", "mean", "std", "ci_low", "ci_high", "p_value", "significant")},
                    "which": "curve", "stat": "late_trend", "is_main": True,
                    "flag": bool(t["significant"]) and t["mean"] > 0,
                    "note": "; ".join(x for x in (f"{unit} per evaluation, slope over the last half", t["note"]) if x)})
    for g in grid:
        out.append({"task": g["task"], "method": g["best_label"], "target_r": g["target_r"], "metric": g["metric"],
                    "mean": g["best_mean"], "std": g["best_std"], "n": g["best_n"], "is_main": True,
                    "which": final[0]["which"] if final else "", "stat": "grid_best", "flag": g["edge"] != "no",
                    "note": f"{g['key']}={_fmt_num(g['best_value'])} of [{', '.join(map(_fmt_num, g['grid']))}]; "
                            f"edge: {g['edge']}"})
    return out


def _write_csv(rows: list[dict], path: Path) -> None:
    def cell(v):
        if isinstance(v, float) and math.isnan(v):
            return ""
        return "" if v is None else v

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([cell(r.get(c)) for c in CSV_COLUMNS])


def _safe(s) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(s)).strip("-") or "x"


def _mean_pattern(patterns: list[dict]) -> dict:
    acc: dict[str, list[float]] = {}
    for p in patterns:
        for name, r in p.items():
            if _num(r) is not None:
                acc.setdefault(name, []).append(float(r))
    return {name: statistics.fmean(v) for name, v in acc.items()}


def _is_adaptive(method, patterns: list[dict]) -> bool:
    m = str(method or "")
    if m.startswith("adalora") or "prune" in m:
        return True
    return any(len({float(v) for v in p.values() if _num(v) is not None}) > 1 for p in patterns)


def _adaptive_groups(runs: list[dict], rows: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """Completed runs with a rank pattern, grouped by (task, method, target_r) in table order, adaptive methods only."""
    usable = {(r["task"], r["method"], r["target_r"]) for r in rows if r["is_main"]}
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (run["task"], run["method"], run["target_r"])
        if key in usable and run["status"] == "completed" and isinstance(run["rank_pattern"], dict) \
                and run["rank_pattern"]:
            groups.setdefault(key, []).append(run)
    ordered = sorted(groups.items(), key=lambda kv: (
        _order(kv[0][0], TASK_ORDER), _cell_key(kv[1][0]["base_method"], kv[0][2], kv[1][0]["by"])))
    return [(key, group) for key, group in ordered if _is_adaptive(key[1], [g["rank_pattern"] for g in group])]


def _heatmaps(runs: list[dict], rows: list[dict], out: Path) -> list[str]:
    paths = []
    for (task, method, target_r), group in _adaptive_groups(runs, rows):
        patterns = [g["rank_pattern"] for g in group]
        planted = [g["planted_ranks"] for g in group if isinstance(g["planted_ranks"], dict) and g["planted_ranks"]]
        n = len(group)
        title = f"{task} / {method} / target_r={_fmt_r(target_r)}: " + (
            f"mean rank over {n} seeds" if n > 1 else "rank (1 seed)")
        path = out / f"rank_heatmap_{_safe(task)}_{_safe(method)}_r{_safe(_fmt_r(target_r))}.png"
        paths.append(_plots().rank_heatmap(_mean_pattern(patterns), path, title=title,
                                        planted=_mean_pattern(planted) if planted else None))
    return paths


def _same_value(value, text: str) -> bool:
    """Whether a config value equals a command-line VALUE: numbers as numbers, booleans and null by name."""
    if value in (None, "unset"):
        return text.strip().lower() in ("null", "none", "unset")
    if isinstance(value, bool):
        return text.strip().lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return math.isclose(float(value), float(text), rel_tol=1e-12, abs_tol=0.0)
        except ValueError:
            return False
    return str(value) == text


def _where_text(where: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in where.items())


def parse_where(items: list[str]) -> dict[str, str]:
    """``["epochs=30", "task.name=mrpc"]`` -> ``{"epochs": "30", "task.name": "mrpc"}``; raises SummarizeError naming
    an item without ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SummarizeError(f"--where {item!r}: expected KEY=VALUE with a dotted config key, "
                                 f"e.g. --where epochs=30")
        out[key.strip()] = value.strip()
    return out


def filter_runs(runs: list[dict], where: dict[str, str]) -> list[dict]:
    """The runs whose resolved config has every ``where`` value. Raises SummarizeError when none is left, naming
    the values the runs do have, so that a typo in the key or the value is not an empty summary."""
    kept = runs
    for key, text in where.items():
        left = [r for r in kept if _same_value(_cfg_get(r["config"], key, "unset"), text)]
        if not left:
            seen = sorted({str(_cfg_get(r["config"], key, "unset")) for r in kept})
            raise SummarizeError(f"--where {key}={text}: no run matches; the runs have {key} in {{{', '.join(seen)}}}"
                                 f". Fix: use one of these values, or check the key's spelling in a run's config.yaml")
        kept = left
    return kept


def split_by(runs: list[dict], keys: list[str]) -> list[dict]:
    """Runs whose method label carries the value of each dotted config key (``lora optim.lr=0.001``); ``by``
    holds the values ({key: value}, "unset" where the config lacks the key) and ``base_method`` the method. A key
    that is null or unset in a run (``method.orth_reg_weight`` of LoRA) stays out of its label."""
    out = []
    for run in runs:
        by = {k: _cfg_get(run["config"], k, "unset") for k in keys}
        label = " ".join([str(run["base_method"])] + [f"{k}={v}" for k, v in by.items() if v not in (None, "unset")])
        out.append({**run, "method": label, "by": by})
    return out


def allocation_rows(runs: list[dict], rows: list[dict]) -> list[dict]:
    """Where the final budget went, per adaptive (task, method, target_r): the mean final rank of each module type
    (over layers) and of each layer (over types), averaged over seeds."""
    import numpy as np

    out = []
    for (task, method, target_r), group in _adaptive_groups(runs, rows):
        mean = _mean_pattern([g["rank_pattern"] for g in group])
        mat, layers, types = _plots().rank_matrix(mean)  # (types, layers), NaN = no module
        out.append({"task": task, "method": method, "target_r": target_r, "n": len(group),
                    "by_type": dict(zip(types, np.nanmean(mat, axis=1).tolist())),
                    "by_layer": dict(zip(layers, np.nanmean(mat, axis=0).tolist()))})
    return out


def _allocation_markdown(alloc: list[dict]) -> list[str]:
    if not alloc:
        return []
    types = list(dict.fromkeys(t for a in alloc for t in a["by_type"]))
    layers = sorted({layer for a in alloc for layer in a["by_layer"]})
    head = ["task", "method", "target_r", "seeds"] + types + [f"layer {x}" for x in layers]
    lines = ["## Where the budget went", "",
             "Mean final rank per module type (over layers) and per layer (over module types), mean over seeds.",
             "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for a in alloc:
        cells = [a["task"], _md_cell(a["method"]), _fmt_r(a["target_r"]), str(a["n"])]
        cells += [f"{a['by_type'][t]:.2f}" if t in a["by_type"] else "-" for t in types]
        cells += [f"{a['by_layer'][x]:.2f}" if x in a["by_layer"] else "-" for x in layers]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _curve_figures(runs: list[dict], rows: list[dict], refs: dict, out: Path, suffix: str = "") -> list[str]:
    """learning_curves_<task><suffix>.png: the dev main metric against step, mean ± std over seeds per cell of
    ``rows``."""
    groups, _ = _groups(runs, rows[0]["which"] if rows else "final")
    paths = []
    for task in dict.fromkeys(r["task"] for r in _by_task([r for r in rows if r["is_main"]])):
        cells = [r for r in rows if r["is_main"] and r["task"] == task]
        metric = cells[0]["metric"]
        series = []
        for r in cells:
            curves = [[(m["step"], v) for m in run["evals"] if (v := _num(m.get(metric))) is not None]
                      for run in groups.get((task, r["method"], r["target_r"]), [])]
            if any(curves):
                series.append({"method": r["method"], "target_r": r["target_r"], "curves": [c for c in curves if c]})
        if series:
            hib = all(r["higher_is_better"] for r in cells)
            paths.append(_plots().sweep_curves_plot(
                series, out / f"learning_curves_{_safe(task)}{suffix}.png", metric=metric, higher_is_better=hib,
                title=f"{task}: dev {metric} during training", reference=refs.get((task, metric))))
    return paths


def _growth_figures(runs: list[dict], rows: list[dict], out: Path, chosen: list[dict] | None = None) -> list[str]:
    """growth_<task>_r<target_r>_seed<seed>.png: LoRA's and AdaLoRA's σ_max(ΔW) per module type over steps, for the
    smallest seed both completed with the diagnostic logged; one figure per task, budget and --by values, or,
    with ``chosen`` (:func:`chosen_cells`), one per task and budget: each method at its chosen setting."""
    plots = _plots()
    groups, _ = _groups(runs, rows[0]["which"] if rows else "final")
    allowed = None if chosen is None else {(r["task"], r["base_method"], r["target_r"]): r["method"]
                                           for r in chosen if r["is_main"]}
    pairs: dict[tuple, dict[str, dict]] = {}
    for (task, _, target_r), group in groups.items():
        for run in group:
            if allowed is not None and allowed.get((task, run["base_method"], target_r)) != run["method"]:
                continue
            if run["base_method"] in plots.PAIRED_METHODS and plots.growth_types(run["evals"]):
                key = (task, target_r, () if allowed is not None else tuple(run["by"].items()))
                pairs.setdefault(key, {}).setdefault(run["base_method"], {})[run["seed"]] = run
    paths = []
    for (task, target_r, by), found in sorted(pairs.items(), key=lambda kv: (
            _order(kv[0][0], TASK_ORDER), _r_key(kv[0][1]), tuple(_value_key(v) for _, v in kv[0][2]))):
        if len(found) < 2:
            continue
        common = sorted((s for s in found[plots.PAIRED_METHODS[0]] if s in found[plots.PAIRED_METHODS[1]]),
                        key=_r_key)
        if not common:
            continue
        seed = common[0]
        series = [{"method": found[m][seed]["method"], "target_r": target_r, "evals": found[m][seed]["evals"]}
                  for m in plots.PAIRED_METHODS]
        tags = "".join(f"_{_safe(k)}-{_safe(v)}" for k, v in by)
        title = f"{task} / target_r={_fmt_r(target_r)}{''.join(f' / {k}={v}' for k, v in by)} / seed {seed}: " \
                "σ_max(ΔW) per module type, LoRA vs AdaLoRA"
        paths.append(plots.growth_comparison_plot(
            series, out / f"growth_{_safe(task)}_r{_safe(_fmt_r(target_r))}{tags}_seed{_safe(seed)}.png", title=title))
    return paths


def summarize(multirun_dir, out_dir=None, which: str = "final", plots_: bool = True, quiet: bool = True,
              by: list[str] | None = None, where: dict[str, str] | None = None) -> dict:
    """Collect, aggregate and write the summary of ``multirun_dir`` (see the module docstring); ``where``
    ({dotted key: value}) keeps only the matching runs (:func:`filter_runs`) and then needs ``out_dir``.

    Returns ``{"runs", "rows", "final_rows", "best_rows", "failed", "paired", "paired_final", "paired_best",
    "plateau", "grid", "references", "allocation", "chosen", "pooling", "markdown", "table", "files"}``:
    ``chosen`` (with ``by`` only) {"final", "best": :func:`chosen_cells`, "paired_final", "paired_best": their
    paired differences}; ``rows`` the ``which`` rows of :func:`aggregate` (``final_rows`` / ``best_rows``: those of
    the final / the best evaluation), ``failed`` the unusable runs (with ``rel`` and ``problem``), ``paired``
    (``paired_final``, ``paired_best``) the :func:`paired_differences` of the rows (final, best), ``plateau`` the
    :func:`plateau_rows`, ``grid`` the :func:`grid_checks` of ``by``, ``references`` the :func:`reference_lines`,
    ``pooling`` the :func:`pooling_problems` (listed first in summary.md when there are any, and printed as
    warnings), and ``files``: {"md", "csv", "comparison", "heatmaps", "learning_curves", "budget", "growth"}.
    Raises :class:`SummarizeError` if the folder does not exist or holds no run.
    """
    if which not in ("final", "best"):
        raise ValueError(f"which={which!r}: expected 'final' or 'best'")
    root = Path(multirun_dir)
    if not root.is_dir():
        raise SummarizeError(f"{root} does not exist or is not a folder")
    if where and (out_dir is None or Path(out_dir).resolve() == root.resolve()):
        raise SummarizeError(f"--where {_where_text(where)} writes a summary of part of "
                             f"{root}: give --out DIR, so that it does not overwrite {root}/summary.md")
    runs = collect_runs(root)
    if not runs:
        raise SummarizeError(f"no run folder (with summary.json or config.yaml) found under {root}")
    if where:
        runs = filter_runs(runs, where)
    if by:
        runs = split_by(runs, list(by))
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)

    rows, bad = aggregate(runs, which)
    other, _ = aggregate(runs, "best" if which == "final" else "final")
    final, best = (rows, other) if which == "final" else (other, rows)
    scales = _scales(rows + other)
    paired, paired_other = paired_differences(rows), paired_differences(other)
    paired_final, paired_best = (paired, paired_other) if which == "final" else (paired_other, paired)
    plateau = plateau_rows(runs, final, scales)
    grid = grid_checks(rows, list(by or []), failed=bad)
    chosen = {}
    if by:  # each method at its chosen setting, paired with LoRA at its own
        chosen["final"] = chosen_cells(final)
        chosen["best"] = chosen_cells(best, of=chosen["final"])  # the same cells, at their best evaluation
        for name in ("final", "best"):
            chosen[f"paired_{name}"] = paired_differences(chosen[name])
    refs = reference_lines(runs, rows)
    alloc = allocation_rows(runs, rows)
    pooling = pooling_problems(runs, which)

    files = {"comparison": None, "heatmaps": [], "learning_curves": [], "budget": None, "growth": []}
    if plots_:
        plots = _plots()
        metrics = ", ".join(dict.fromkeys(r["metric"] for r in rows if r["is_main"]))
        files["comparison"] = plots.comparison_plot(
            rows, out / "comparison.png", references=refs,
            title=f"{which} {metrics}: mean ± std over seeds (error bar), every seed (dot)")
        if chosen:  # the chosen cells' curves; every grid cell's in learning_curves_<task>_grid.png
            files["learning_curves"] = (_curve_figures(runs, chosen["final"], refs, out)
                                        + _curve_figures(runs, rows, refs, out, suffix="_grid"))
        else:
            files["learning_curves"] = _curve_figures(runs, rows, refs, out)
        if any(len({_num(r["target_r"]) for r in rows if r["is_main"] and r["task"] == t} - {None}) > 1
               for t in {r["task"] for r in rows}):
            files["budget"] = plots.budget_plot(
                rows, out / "budget_vs_metric.png",
                title=f"{which} metric against the budget: mean ± std over seeds, every seed (dot)")
        files["growth"] = _growth_figures(runs, rows, out, chosen.get("final"))
        files["heatmaps"] = _heatmaps(runs, rows, out)
    figures = [f for f in [files["comparison"], files["budget"], *files["learning_curves"], *files["growth"],
                           *files["heatmaps"]] if f]
    sections = _pooling_markdown(pooling) if pooling else []  # first: every table below is suspect
    sections += _cells_markdown(final, best, plateau, scales) + _paired_markdown(paired_final, paired_best, scales)
    if chosen:
        sections += _chosen_markdown(chosen["final"], chosen["best"], chosen["paired_final"], chosen["paired_best"],
                                     scales)
    sections += _grid_markdown(grid, scales) + _allocation_markdown(alloc)
    if not pooling:
        sections += _pooling_markdown(pooling)
    title = str(root) + (f" (runs with {_where_text(where)})" if where else "")
    markdown, table = _markdown(rows, bad, runs, title, which, scales, sections, figures)
    md_path, csv_path = out / "summary.md", out / "summary.csv"
    md_path.write_text(markdown)
    _write_csv(_csv_rows(final, best, paired_final + paired_best, plateau, grid), csv_path)
    if not quiet:
        print(markdown)
    return {"runs": runs, "rows": rows, "final_rows": final, "best_rows": best, "failed": bad, "paired": paired,
            "paired_final": paired_final, "paired_best": paired_best, "plateau": plateau, "grid": grid,
            "references": refs, "allocation": alloc, "chosen": chosen, "pooling": pooling, "markdown": markdown,
            "table": table,
            "files": {"md": str(md_path), "csv": str(csv_path), **files}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun folder (or any folder of run folders, or one run)")
    parser.add_argument("--out", default=None, help="output folder (default: MULTIRUN_DIR)")
    parser.add_argument("--which", choices=("final", "best"), default="final",
                        help="use each run's final (default) or best eval metrics")
    parser.add_argument("--by", action="append", default=[], metavar="KEY",
                        help="also split rows by this dotted config key, e.g. --by optim.lr (repeatable)")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="keep only runs whose config has this value, e.g. --where epochs=30 (repeatable; "
                             "needs --out)")
    parser.add_argument("--no-plots", action="store_true", help="write only summary.md and summary.csv")
    args = parser.parse_args(argv)
    try:
        result = summarize(args.multirun_dir, args.out, which=args.which, plots_=not args.no_plots, quiet=False,
                           by=args.by, where=parse_where(args.where))
    except SummarizeError as e:
        print(f"summarize.py: error: {e}", file=sys.stderr)
        return 2
    for p in result["pooling"]:
        print(f"summarize.py: warning: {p['task']} / {p['method']} / target_r={p['target_r']}: {p['problem']}. "
              f"Fix: {p['fix']}", file=sys.stderr)
    files = result["files"]
    figures = [f for f in [files["comparison"], files["budget"], *files["learning_curves"], *files["growth"],
                           *files["heatmaps"]] if f]
    print(f"\nwrote {files['md']}, {files['csv']}" + (f" and {len(figures)} figure(s)" if figures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
