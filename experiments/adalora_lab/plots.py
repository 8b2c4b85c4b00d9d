"""Figures for AdaLoRA runs: rank heat maps, rank histories, method comparisons.

Every function takes plain data (dicts and lists read from a run folder), writes one PNG and returns its
path. Figures are built with the object-oriented API on the Agg canvas, never through pyplot, so importing
or calling this module changes no global matplotlib state (no backend switch, no open figure to leak)
and works on a headless machine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "TYPE_ORDER",
    "module_grid",
    "rank_matrix",
    "format_rank",
    "display_scale",
    "rank_heatmap_figure",
    "rank_heatmap",
    "rank_history_plot",
    "comparison_plot",
]

# Transformer sub-module (the name after the layer index) -> short type shown on the heat map.
_TYPE_ALIASES = {
    # BERT / RoBERTa / DeBERTa-v3
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.self.query_proj": "query",
    "attention.self.key_proj": "key",
    "attention.self.value_proj": "value",
    "attention.output.dense": "attn.out",
    "intermediate.dense": "ffn.in",
    "output.dense": "ffn.out",
}

# Known types come first, in this order; any other type follows in order of first appearance.
TYPE_ORDER = (
    # BERT family (the AdaLoRA paper's Figure 3 rows: Wq, Wk, Wv, Wo, Wf1, Wf2)
    "query", "key", "value", "attn.out", "ffn.in", "ffn.out",
    # GPT-2
    "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj",
    # LLaMA / Mistral
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def _parse(name: str) -> tuple[int, str, str]:
    """(layer, type, prefix) of one module name; prefix is the path before the layer index."""
    parts = name.split(".") if name else [""]
    for i, p in enumerate(parts):
        if p.isdigit():
            prefix = ".".join(parts[:i])
            rest = ".".join(parts[i + 1:])
            if not rest:  # a bare index: nn.Sequential child "0", or "blocks.3" in a ModuleList of Linear
                rest = prefix or "linear"
            return int(p), _TYPE_ALIASES.get(rest, rest), prefix
    return 0, _TYPE_ALIASES.get(name, name), ""


def module_grid(names) -> tuple[list[int], list[str], dict[str, tuple[int, str]]]:
    """Place module names on a (layer, module type) grid.

    The first integer component of the dotted name is the layer; what follows it is the type, shortened
    for BERT-like models (``...layer.3.attention.self.query`` -> (3, "query"), ``attention.output.dense`` ->
    "attn.out", ``intermediate.dense`` -> "ffn.in", ``output.dense`` -> "ffn.out"). GPT-2 gives
    ``transformer.h.2.attn.c_attn`` -> (2, "attn.c_attn"); MLPs ``blocks.4.up`` -> (4, "up"); a bare
    ``nn.Sequential`` child ``"2"`` -> (2, "linear"). A name with no integer is put on layer 0 with the whole
    name as its type. If two names would land on the same cell (e.g. an encoder and a decoder stack), their
    types are prefixed with the path before the layer index.

    Returns (sorted layers, types in display order, {name: (layer, type)}).
    """
    names = list(dict.fromkeys(names))
    parsed = {n: _parse(n) for n in names}
    cells: dict[tuple[int, str], list[str]] = {}
    for n, (layer, typ, _) in parsed.items():
        cells.setdefault((layer, typ), []).append(n)
    clashing = {typ for (_, typ), ns in cells.items() if len(ns) > 1}
    index: dict[str, tuple[int, str]] = {}
    for n, (layer, typ, prefix) in parsed.items():
        if typ in clashing and prefix:
            typ = f"{prefix}.{typ}"
        index[n] = (layer, typ)
    layers = sorted({layer for layer, _ in index.values()})
    seen = list(dict.fromkeys(typ for _, typ in index.values()))
    known = [t for t in TYPE_ORDER if t in seen]
    types = known + [t for t in seen if t not in known]
    return layers, types, index


def rank_matrix(rank_pattern: dict, names=None) -> tuple[np.ndarray, list[int], list[str]]:
    """(matrix [n_types, n_layers] with NaN where no module, layers, types) for ``{module name: rank}``."""
    names = list(rank_pattern) if names is None else list(names)
    layers, types, index = module_grid(names)
    mat = np.full((len(types), len(layers)), np.nan)
    col = {layer: j for j, layer in enumerate(layers)}
    row = {t: i for i, t in enumerate(types)}
    for n in names:
        v = rank_pattern.get(n)
        if v is None:
            continue
        layer, typ = index[n]
        mat[row[typ], col[layer]] = float(v)
    return mat, layers, types


def format_rank(v) -> str:
    """Cell label: integers as ints ("3"), means with one decimal ("2.7"), NaN as ""."""
    v = float(v)
    if math.isnan(v):
        return ""
    return f"{v:.0f}" if v.is_integer() else f"{v:.1f}"


def display_scale(metric: str, values, higher_is_better: bool = True) -> float:
    """100 for a score that lies in [-1, 1] (accuracy, F1, MCC, correlations: shown x100 as in the paper), else 1.

    Losses (``higher_is_better`` false, or "loss" in the name) are never scaled.
    """
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not higher_is_better or "loss" in metric.lower() or not vals:
        return 1.0
    return 100.0 if all(-1.0 <= v <= 1.0 for v in vals) else 1.0


def _save(fig: Figure, path) -> str:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    fig.clear()  # nothing else references the figure: it is freed with it
    return os.fspath(path)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(min(max(width, 3.0), 24.0), min(max(height, 2.2), 16.0)), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# --------------------------------------------------------------------------------------------- heat map


def rank_heatmap_figure(rank_pattern: dict, title: str | None = None, planted: dict | None = None) -> Figure:
    """The heat map of :func:`rank_heatmap` as a Figure (one axes per panel, then the colour bar).

    Each panel's ``ax.texts`` hold the cell labels, row by row (module types top to bottom), layers left to right.
    """
    panels = [("learned", rank_pattern)]
    if planted:
        panels = [("planted", planted), ("learned", rank_pattern)]
    names = list(dict.fromkeys([*rank_pattern, *(planted or {})]))
    if not names:
        fig = _new_figure(4.0, 2.5)
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no adapted module", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        if title:
            fig.suptitle(title, fontsize=10)
        return fig
    mats = [(label, rank_matrix(data, names)) for label, data in panels]
    _, layers, types = mats[0][1]
    finite = np.concatenate([m[np.isfinite(m)] for _, (m, _, _) in mats])
    vmax = float(finite.max()) if finite.size else 1.0
    vmax = max(vmax, 1.0)

    cell_w = 0.42 if len(layers) <= 16 else 0.3
    width = len(panels) * (1.6 + cell_w * max(len(layers), 1)) + 1.2
    height = 1.3 + 0.38 * max(len(types), 1)
    fig = _new_figure(width, height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    fontsize = 8 if len(layers) <= 16 else 6

    import matplotlib as mpl

    cmap = mpl.colormaps["YlGnBu"].with_extremes(bad="white")
    image = None
    for ax, (label, (mat, _, _)) in zip(axes, mats):
        image = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=fontsize)
        ax.set_yticks(range(len(types)), types, fontsize=fontsize + 1)
        ax.set_xlabel("layer")
        if len(panels) > 1:
            ax.set_title(label, fontsize=10)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if np.isfinite(mat[i, j]):
                    dark = mat[i, j] / vmax > 0.6
                    ax.text(j, i, format_rank(mat[i, j]), ha="center", va="center", fontsize=fontsize,
                            color="white" if dark else "black")
        ax.set_xticks(np.arange(-0.5, len(layers), 1), minor=True)
        ax.set_yticks(np.arange(-0.5, len(types), 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="rank", shrink=0.9, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def rank_heatmap(rank_pattern: dict, path, title: str | None = None, planted: dict | None = None) -> str:
    """Layers x module types heat map of ``{module name: rank}`` (the AdaLoRA paper's Figure 3).

    x: layer, y: module type; each cell is annotated with its rank (integers as ints, means with one decimal);
    cells with no module stay blank. With ``planted`` ({module name: planted rank}) the planted and the learned
    patterns are drawn side by side on one colour scale. Returns the PNG path.
    """
    return _save(rank_heatmap_figure(rank_pattern, title=title, planted=planted), path)


# ---------------------------------------------------------------------------------------- rank history


def _type_colours(types: list[str]) -> dict[str, tuple]:
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10" if len(types) <= 10 else "tab20"]
    return {t: cmap(i % cmap.N) for i, t in enumerate(types)}


def rank_history_plot(history: list[dict], path, title: str | None = None) -> str:
    """Two panels from ``rank_history.jsonl`` records ``{"step", "budget", "ranks": {module: rank}}``.

    Left: the total budget vs step (and the sum of kept ranks, dashed, when it differs). Right: every module's
    rank vs step, one thin line per module coloured by module type, with one legend entry per type.
    """
    history = sorted((h for h in history if "step" in h), key=lambda h: h["step"])
    fig = _new_figure(11.0, 3.8)
    ax_b, ax_r = fig.subplots(1, 2)
    if not history:
        for ax in (ax_b, ax_r):
            ax.text(0.5, 0.5, "no rank history", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return _save(fig, path)

    steps = np.array([h["step"] for h in history], dtype=float)
    names = list(dict.fromkeys(n for h in history for n in (h.get("ranks") or {})))
    ranks = np.array([[float((h.get("ranks") or {}).get(n, np.nan)) for n in names] for h in history])
    ranks = ranks.reshape(len(history), len(names))
    budget = np.array([float(h["budget"]) if h.get("budget") is not None else np.nan for h in history])

    marker = "." if len(history) <= 200 else None  # the last logged value shows even when it is a single step
    ax_b.plot(steps, budget, drawstyle="steps-post", color="C0", lw=1.5, marker=marker, ms=4, label="budget")
    if names:
        kept = np.nansum(ranks, axis=1)
        if not np.allclose(kept, budget, equal_nan=True):
            ax_b.plot(steps, kept, drawstyle="steps-post", color="C3", lw=1.0, ls="--", label="sum of ranks")
            ax_b.legend(fontsize=8)
    ax_b.set_xlabel("step")
    ax_b.set_ylabel("total budget (kept singular values)")
    ax_b.set_title("budget", fontsize=10)
    ax_b.grid(alpha=0.3)

    _, types, index = module_grid(names)
    colours = _type_colours(types)
    for k, n in enumerate(names):
        ax_r.plot(steps, ranks[:, k], drawstyle="steps-post", lw=0.7, alpha=0.6, color=colours[index[n][1]])
    if names:  # the final ranks, which hold from the last masking step to the end of training
        ax_r.scatter(np.full(len(names), steps[-1]), ranks[-1], s=8, zorder=3,
                     color=[colours[index[n][1]] for n in names])
    for ax in (ax_b, ax_r):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[t], lw=1.5, label=t) for t in types]
    if handles:
        ax_r.legend(handles=handles, fontsize=7, title="module type", title_fontsize=7,
                    loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("rank")
    ax_r.set_title(f"per-module rank ({len(names)} modules)", fontsize=10)
    ax_r.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ comparison


def _label(row: dict) -> str:
    r = row.get("target_r")
    return f"{row['method']}" if r is None or r == "" else f"{row['method']} r={r}"


def comparison_plot(rows: list[dict], path, title: str | None = None) -> str:
    """Grouped bar chart with std error bars: x = task, one bar per method / budget.

    ``rows`` are summary rows (as ``experiments/summarize.py`` builds them) with keys ``task, method, target_r,
    metric, mean, std`` and optionally ``is_main`` (rows with ``is_main`` false are skipped) and
    ``higher_is_better``. Tasks are grouped in one panel per metric, so accuracies and losses never share an
    axis; scores in [-1, 1] are drawn x100 as in the summary table.
    """
    rows = [r for r in rows if r.get("is_main", True) and r.get("mean") is not None
            and not math.isnan(float(r["mean"]))]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    labels = list(dict.fromkeys(_label(r) for r in rows))
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colours = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    n_tasks = {m: len({r["task"] for r in rows if r["metric"] == m}) for m in metrics}
    width = sum(1.2 + 0.25 * len(labels) * n for n in n_tasks.values()) + 2.5
    fig = _new_figure(width, 4.0)
    if not rows:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)

    axes = fig.subplots(1, len(metrics), squeeze=False, width_ratios=[max(n_tasks[m], 1) for m in metrics])[0]
    bar_w = 0.8 / max(len(labels), 1)
    for ax, metric in zip(axes, metrics):
        mrows = [r for r in rows if r["metric"] == metric]
        hib = all(r.get("higher_is_better", True) in (True, "True", "true", 1) for r in mrows)
        scale = display_scale(metric, [r["mean"] for r in mrows], hib)
        tasks = list(dict.fromkeys(r["task"] for r in mrows))
        by = {(r["task"], _label(r)): r for r in mrows}
        for k, lab in enumerate(labels):
            xs, ys, es = [], [], []
            for i, task in enumerate(tasks):
                r = by.get((task, lab))
                if r is None:
                    continue
                std = r.get("std")
                std = 0.0 if std is None or std == "" or math.isnan(float(std)) else float(std)
                xs.append(i - 0.4 + bar_w * (k + 0.5))
                ys.append(float(r["mean"]) * scale)
                es.append(std * scale)
            if xs:
                ax.bar(xs, ys, bar_w * 0.92, yerr=es, capsize=2, color=colours[lab], label=lab,
                       error_kw={"lw": 0.8})
        ax.set_xticks(range(len(tasks)), tasks)
        unit = " (x100)" if scale != 1.0 else ""
        arrow = "higher is better" if hib else "lower is better"
        ax.set_ylabel(f"{metric}{unit}, {arrow}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ys_all = [float(r["mean"]) * scale for r in mrows]
        if hib and ys_all and min(ys_all) > 0 and scale != 1.0:
            ax.set_ylim(bottom=max(0.0, min(ys_all) - 0.15 * (max(ys_all) - min(ys_all) + 10)))
    handles, labs = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labs:
                handles.append(h)
                labs.append(lab)
    fig.legend(handles, labs, loc="outside right center", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def run_figures(run_dir, summary: dict) -> list:
    """The figures of one run folder, written to ``<run>/figures/``; returns their paths.

    ``summary``: the run's summary dict (task, method, target_r, seed, main_metric). Reads rank_pattern.json,
    rank_history.jsonl and planted_ranks.json from the folder.
    """
    from .rundir import RunDir, read_json
    from .summary import read_jsonl

    run = RunDir(run_dir)
    ranks = read_json(run.rank_pattern) or {}
    if not ranks:
        return []
    run.figures.mkdir(exist_ok=True)
    out = [rank_heatmap(ranks, run.figures / "rank_heatmap.png", title="kept rank per module",
                        planted=read_json(run.planted))]
    history = read_jsonl(run.rank_history)
    if history:
        out.append(rank_history_plot(history, run.figures / "rank_history.png"))
    return [p for p in out if p]
