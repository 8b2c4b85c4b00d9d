#!/usr/bin/env python
"""Summarize a sweep of AdaLoRA runs: a mean ± std table, a comparison plot and aggregate rank heat maps.

    python experiments/summarize.py MULTIRUN_DIR [--out DIR] [--which final|best] [--by KEY ...] [--no-plots]

Walks MULTIRUN_DIR for run folders (any folder holding ``summary.json``, ``config.yaml``, ``metrics.jsonl``
or ``.hydra/config.yaml``; folder names are not relied on) and writes into ``--out`` (default MULTIRUN_DIR):

- ``summary.md``: one row per (method, target_r), one column per task with ``mean ± std`` over seeds of the
  task's main metric (sample std, ddof=1), the seed count, trainable parameters and wall time; failed or
  incomplete runs are listed with their folder and error. Also printed to stdout.
- ``summary.csv``: the same numbers in long form, one row per (task, method, target_r, metric).
- a "Where the budget went" table: mean final rank per module type and per layer, for adaptive methods.
- ``comparison.png`` and ``rank_heatmap_<task>_<method>_r<target_r>.png`` (mean rank per module over seeds,
  beside the planted ranks when the run has ``planted_ranks.json``) for adaptive methods.

``--by optim.lr`` (any dotted key of the runs' resolved config.yaml, repeatable) splits each row by that value,
e.g. ``lora optim.lr=0.001``: the table of a learning-rate sweep.

Importable: ``summarize(multirun_dir, out_dir=None) -> dict``, ``collect_runs(dir)``, ``load_run(dir)``.
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


def _plots():
    """adalora_lab.plots, imported on first use so that a bad argument fails before torch loads."""
    from . import plots

    return plots

__all__ = ["SummarizeError", "read_json", "read_jsonl", "load_run", "collect_runs", "aggregate", "allocation_rows",
           "summarize", "main"]

# Extra final metrics given their own column (and CSV rows) when a task reports them.
EXTRA_METRICS = ("rank_recovery",)
# Display order; other methods / tasks follow in alphabetical order.
METHOD_ORDER = ("full", "lora", "svd_lora", "prune_lora", "adalora", "adalora_sensitivity_only",
                "adalora_magnitude", "adalora_no_orth")
TASK_ORDER = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "planted_rank")
CSV_COLUMNS = ("task", "method", "target_r", "metric", "mean", "std", "n", "trainable_params", "adapter_params",
               "wall_time_s", "is_main", "higher_is_better")



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
    adapter_params, final_budget, wall_time_s, rank_pattern, planted_ranks, has_history.
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
            metrics = read_jsonl(run_dir / rundir.METRICS)
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
        "rank_pattern": None,
        "planted_ranks": None,
        "has_history": (run_dir / rundir.RANK_HISTORY).is_file(),
        "config": cfg if isinstance(cfg, dict) else {},
    }
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


def aggregate(runs: list[dict], which: str = "final") -> tuple[list[dict], list[dict]]:
    """(summary rows, unusable runs).

    One row per (task, method, target_r, metric) for the main metric (``is_main``) and for each of
    :data:`EXTRA_METRICS` present, with mean, sample std (NaN for n=1), n and the mean trainable parameters and
    wall time over the runs used. Unusable runs are returned with a ``problem`` key.
    """
    groups: dict[tuple, list[dict]] = {}
    bad = []
    for run in runs:
        problem = _problem(run, which)
        if problem is not None:
            bad.append({**run, "problem": problem})
            continue
        groups.setdefault((run["task"], run["method"], run["target_r"]), []).append(run)

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
            "target_r": target_r,
            "trainable_params": statistics.fmean(params) if params else float("nan"),
            "adapter_params": statistics.fmean(final_params) if final_params else float("nan"),
            "wall_time_s": statistics.fmean(walls) if walls else float("nan"),
        }
        for m, is_main in [(metric, True)] + [(x, False) for x in EXTRA_METRICS if x != metric]:
            vals = [v for v in (_num(r[which].get(m)) for r in used) if v is not None]
            if not vals:
                continue
            mean, std = _mean_std(vals)
            hib = all(r["higher_is_better"] for r in used) if is_main else True
            seeds = sorted((r["seed"] for r in used if r["seed"] is not None), key=_r_key)
            rows.append({**common, "metric": m, "mean": mean, "std": std, "n": len(vals), "is_main": is_main,
                         "higher_is_better": hib, "seeds": seeds})
    rows.sort(key=lambda r: (_order(r["method"], METHOD_ORDER), _r_key(r["target_r"]),
                             _order(r["task"], TASK_ORDER), not r["is_main"], r["metric"]))
    return rows, bad


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


def _markdown(rows: list[dict], bad: list[dict], runs: list[dict], title: str, which: str,
              heatmaps: list[str], comparison: str | None) -> tuple[str, str]:
    """(full markdown, the results table alone)."""
    main = [r for r in rows if r["is_main"]]
    tasks = sorted({r["task"] for r in main}, key=lambda t: _order(t, TASK_ORDER))
    metric_of = {r["task"]: r["metric"] for r in main}
    scales = {m: _plots().display_scale(m, [r["mean"] for r in rows if r["metric"] == m],
                                     all(r["higher_is_better"] for r in rows if r["metric"] == m))
              for m in {r["metric"] for r in rows}}
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
    out += [table if main else "_No completed run._", ""]
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
    if comparison or heatmaps:
        out += ["## Figures", ""]
        if comparison:
            out += [f"![comparison]({Path(comparison).name})", ""]
        for h in heatmaps:
            out += [f"![{Path(h).stem}]({Path(h).name})", ""]
    return "\n".join(out), table


def _write_csv(rows: list[dict], path: Path) -> None:
    def cell(v):
        if isinstance(v, float) and math.isnan(v):
            return ""
        return "" if v is None else v

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([cell(r[c]) for c in CSV_COLUMNS])


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
        _order(kv[0][0], TASK_ORDER), _order(kv[0][1], METHOD_ORDER), _r_key(kv[0][2])))
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


def split_by(runs: list[dict], keys: list[str]) -> list[dict]:
    """Runs whose method label carries the value of each dotted config key (``lora optim.lr=0.001``)."""
    out = []
    for run in runs:
        tags = [f"{k}={_cfg_get(run['config'], k, 'unset')}" for k in keys]
        out.append({**run, "method": " ".join([str(run["method"])] + tags)})
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


def summarize(multirun_dir, out_dir=None, which: str = "final", plots_: bool = True, quiet: bool = True,
              by: list[str] | None = None) -> dict:
    """Collect, aggregate and write the summary of ``multirun_dir`` (see the module docstring).

    Returns ``{"runs", "rows", "failed", "markdown", "table", "files": {"md", "csv", "comparison", "heatmaps"}}``
    where ``rows`` are the CSV rows as dicts and ``failed`` the unusable runs (with ``rel`` and ``problem``).
    Raises :class:`SummarizeError` if the folder does not exist or holds no run.
    """
    if which not in ("final", "best"):
        raise ValueError(f"which={which!r}: expected 'final' or 'best'")
    root = Path(multirun_dir)
    if not root.is_dir():
        raise SummarizeError(f"{root} does not exist or is not a folder")
    runs = collect_runs(root)
    if not runs:
        raise SummarizeError(f"no run folder (with summary.json or config.yaml) found under {root}")
    if by:
        runs = split_by(runs, list(by))
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)

    rows, bad = aggregate(runs, which)
    comparison, heatmaps = None, []
    if plots_:
        metrics = ", ".join(sorted({r["metric"] for r in rows if r["is_main"]}))
        comparison = _plots().comparison_plot(rows, out / "comparison.png",
                                              title=f"{which} {metrics} (mean ± std over seeds)")
        heatmaps = _heatmaps(runs, rows, out)
    markdown, table = _markdown(rows, bad, runs, str(root), which, heatmaps, comparison)
    alloc = allocation_rows(runs, rows)
    if alloc:
        head, sep, figures = markdown.partition("## Figures")
        markdown = head + "\n".join(_allocation_markdown(alloc)) + "\n" + sep + figures
    md_path, csv_path = out / "summary.md", out / "summary.csv"
    md_path.write_text(markdown)
    _write_csv(rows, csv_path)
    if not quiet:
        print(markdown)
    return {"runs": runs, "rows": rows, "failed": bad, "markdown": markdown, "table": table, "allocation": alloc,
            "files": {"md": str(md_path), "csv": str(csv_path), "comparison": comparison, "heatmaps": heatmaps}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun folder (or any folder of run folders, or one run)")
    parser.add_argument("--out", default=None, help="output folder (default: MULTIRUN_DIR)")
    parser.add_argument("--which", choices=("final", "best"), default="final",
                        help="use each run's final (default) or best eval metrics")
    parser.add_argument("--by", action="append", default=[], metavar="KEY",
                        help="also split rows by this dotted config key, e.g. --by optim.lr (repeatable)")
    parser.add_argument("--no-plots", action="store_true", help="write only summary.md and summary.csv")
    args = parser.parse_args(argv)
    try:
        result = summarize(args.multirun_dir, args.out, which=args.which, plots_=not args.no_plots, quiet=False,
                           by=args.by)
    except SummarizeError as e:
        print(f"summarize.py: error: {e}", file=sys.stderr)
        return 2
    files = result["files"]
    print(f"\nwrote {files['md']}, {files['csv']}" + (f", {files['comparison']}" if files["comparison"] else "")
          + (f" and {len(files['heatmaps'])} rank heat map(s)" if files["heatmaps"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
