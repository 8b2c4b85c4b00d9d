"""Figures for AdaLoRA runs and sweeps: rank heat maps, rank histories, learning curves, method comparisons,
budget curves and the growth diagnostic.

Every function takes plain data (dicts and lists read from a run folder), writes one PNG and returns its
path. Figures are built with the object-oriented API on the Agg canvas, never through pyplot, so importing
or calling this module changes no global matplotlib state (no backend switch, no open figure to leak)
and works on a headless machine.

Colours: LoRA and AdaLoRA at one budget share a hue (LoRA light, AdaLoRA dark; :func:`method_colours`), so the
pair the paper compares reads as a pair in every figure.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from adalora.diagnostics import module_type

__all__ = [
    "TYPE_ORDER",
    "module_grid",
    "rank_matrix",
    "format_rank",
    "display_scale",
    "split_label",
    "method_colours",
    "rank_heatmap_figure",
    "rank_heatmap",
    "rank_history_figure",
    "rank_history_plot",
    "comparison_figure",
    "comparison_plot",
    "learning_curves_plot",
    "sweep_curves_plot",
    "budget_plot",
    "growth_types",
    "growth_figure",
    "growth_plot",
    "growth_comparison_figure",
    "growth_comparison_plot",
    "run_title",
    "run_figures",
]

# The methods drawn as a pair (one hue: the first light, the second dark) at each budget.
PAIRED_METHODS = ("lora", "adalora")
# The growth diagnostic's keys in the eval lines of metrics.jsonl: "<key>/<module type>", and the bound.
SIGMA_MAX = "sigma_max"
SCALE_LAMBDA_MAX = "scale_lambda_max"
GROWTH_BOUND = "growth_bound"

# Module types (the name after the layer index, shortened: query, attn.out, ffn.in, ...) have one owner,
# adalora.diagnostics.module_type, shared with the growth diagnostic's keys.

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
            return int(p), module_type(name), prefix
    return 0, module_type(name), ""


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


def _say_empty(ax, message: str) -> None:
    """An axes that says why there is nothing to draw, in its middle, without ticks or frame."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


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


def _wrapped_suptitle(fig: Figure, title: str, fontsize: float = 10) -> None:
    """The figure's title, wrapped at its width (about 0.6 em per character), so that a long sweep-cell name in a
    narrow figure is not cut at both edges."""
    chars = max(int(fig.get_figwidth() * 72 / (0.6 * fontsize)), 20)
    fig.suptitle(textwrap.fill(title, chars, break_on_hyphens=False), fontsize=fontsize)


# ---------------------------------------------------------------------------------------------- colours


def split_label(label) -> tuple[str, str]:
    """(method, ``--by`` tags) of a summary method label: ``"lora optim.lr=0.001"`` -> ("lora", "optim.lr=0.001")."""
    method, _, tags = str(label).partition(" ")
    return method, tags


def _colour_pairs() -> list[tuple]:
    """(dark, light) shades of one hue each: tab20's 10 families, then tab20b's and tab20c's."""
    import matplotlib as mpl

    tab20 = mpl.colormaps["tab20"]
    pairs = [(tab20(2 * i), tab20(2 * i + 1)) for i in range(10)]
    for name in ("tab20b", "tab20c"):
        cmap = mpl.colormaps[name]
        pairs += [(cmap(4 * i), cmap(4 * i + 2)) for i in range(5)]
    # tab20's light shades are pale on white: move them a third of the way to the dark one
    return [(dark, tuple(0.67 * x + 0.33 * y for x, y in zip(light, dark))) for dark, light in pairs]


def method_colours(keys) -> dict:
    """``{(method label, target_r): RGBA}`` for the keys, in display order.

    LoRA and AdaLoRA at the same budget (and the same ``--by`` values) share one hue, LoRA light and AdaLoRA
    dark, one hue per budget; every other (method, budget) gets the dark shade of a hue of its own, and full
    fine-tuning is drawn in dark grey.
    """
    keys = list(dict.fromkeys(keys))
    pairs = _colour_pairs()
    family: dict = {}
    for label, r in keys:
        method, tags = split_label(label)
        if method in PAIRED_METHODS:
            family.setdefault((r, tags), len(family))
    out, n = {}, len(family)
    for label, r in keys:
        method, tags = split_label(label)
        if method in PAIRED_METHODS:
            dark, light = pairs[family[r, tags] % len(pairs)]
            out[label, r] = light if method == PAIRED_METHODS[0] else dark
        elif method == "full":
            out[label, r] = (0.25, 0.25, 0.25, 1.0)
        else:
            out[label, r] = pairs[n % len(pairs)][0]
            n += 1
    return out


_MARKERS = ("^", "v", "P", "X", "<", ">", "p", "h")


def method_markers(keys) -> dict:
    """``{(method label, target_r): marker}``: LoRA squares, AdaLoRA circles, full fine-tuning diamonds, every
    other method a marker of its own (the same at every budget), so the methods read apart without colour."""
    fixed = {PAIRED_METHODS[0]: "s", PAIRED_METHODS[1]: "o", "full": "D"}
    methods = {key: split_label(key[0])[0] for key in keys}
    others = list(dict.fromkeys(m for m in methods.values() if m not in fixed))
    return {key: fixed.get(m) or _MARKERS[others.index(m) % len(_MARKERS)] for key, m in methods.items()}


def _key_label(label, r) -> str:
    return str(label) if r is None or r == "" else f"{label} r={r}"


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _hib(row: dict) -> bool:
    return row.get("higher_is_better", True) in (True, "True", "true", 1)


def _unit(metric: str, scale: float, hib: bool) -> str:
    return f"{metric}{' (x100)' if scale != 1.0 else ''}, {'higher' if hib else 'lower'} is better"


_LEGEND_ROW_IN = 0.19  # inches per legend entry at fontsize 8
_LABEL_CHAR_IN = 0.06  # mean width of a character of an 8-point legend label, in inches
_TITLE_CHAR_IN = 0.075  # the same for the 10-point title


def _legend_columns(n_entries: int, fig_height_in: float) -> int:
    """How many columns keep a legend of ``n_entries`` inside a figure of that height."""
    return math.ceil(n_entries / max(1, int((fig_height_in - 0.8) / _LEGEND_ROW_IN)))


def _outside_legend(fig: Figure, axes, title: str | None = None) -> None:
    """One legend for the figure, right of the axes, each label once; in as many columns as keep it inside the
    figure's height (a sweep's every grid cell is many entries)."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False, title=title,
                   title_fontsize=8, ncols=_legend_columns(len(handles), fig.get_figheight()))


def _log_if_wide(ax, values, ratio: float = 10.0) -> None:
    """Log y when every value is positive and they span more than ``ratio``."""
    vals = np.asarray([v for v in values if _finite(v)], dtype=float)
    if vals.size and vals.min() > 0 and vals.max() / vals.min() > ratio:
        _log_y(ax)


def _log_y(ax) -> None:
    """Log y with plain tick labels (0.5, 2, 30; not 5x10^-1) and minor ticks at 2 and 5 only, labelled when the
    axis spans less than two decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")

    def minor(v, _):
        lo, hi = ax.get_ylim()
        return f"{v:g}" if lo > 0 and hi / lo <= 100 else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(LogLocator(base=10.0, subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _step_axis(ax, nbins: int = 6) -> None:
    """An x axis of optimizer steps: at most ``nbins`` integer ticks at 1, 2, 2.5 or 5 times a power of ten, and
    from 10,000 on every label in thousands ("2.5k", "10k") so that five-digit labels do not run together."""
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=nbins, steps=[1, 2, 2.5, 5, 10]))

    def label(v, _):
        if max(abs(x) for x in ax.get_xlim()) < 10_000 or v == 0:
            return f"{v:g}"
        return f"{v / 1000:g}k"

    ax.xaxis.set_major_formatter(FuncFormatter(label))


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


# --------------------------------------------------------------------------------------------- heat map


def rank_heatmap_figure(rank_pattern: dict, title: str | None = None, planted: dict | None = None,
                        bars: bool = True) -> Figure:
    """The heat map of :func:`rank_heatmap` as a Figure: the heat map axes first (one per panel), then the bar axes
    below them (``bars``), then the colour bar.

    Each heat map's ``ax.texts`` hold the cell labels, row by row (module types top to bottom), layers left to right.
    """
    panels = [("learned", rank_pattern)]
    if planted:
        panels = [("planted", planted), ("learned", rank_pattern)]
    names = list(dict.fromkeys([*rank_pattern, *(planted or {})]))
    if not names:
        fig = _new_figure(4.0, 2.5)
        ax = fig.subplots()
        _say_empty(ax, "no adapted module")
        if title:
            _wrapped_suptitle(fig, title)
        return fig
    mats = [(label, rank_matrix(data, names)) for label, data in panels]
    _, layers, types = mats[0][1]
    finite = np.concatenate([m[np.isfinite(m)] for _, (m, _, _) in mats])
    vmax = float(finite.max()) if finite.size else 1.0
    vmax = max(vmax, 1.0)

    cell_w = 0.42 if len(layers) <= 16 else 0.3
    width = len(panels) * (1.6 + cell_w * max(len(layers), 1)) + 2.4
    map_h = 0.9 + 0.38 * max(len(types), 1)
    bar_h = 1.9 if bars else 0.0
    fig = _new_figure(width, map_h + bar_h + 0.6)
    grid = fig.subplots(2 if bars else 1, len(panels), squeeze=False, sharex="col",
                        height_ratios=[map_h, bar_h] if bars else None)
    axes = grid[0]
    fontsize = 8 if len(layers) <= 16 else 6

    import matplotlib as mpl

    cmap = mpl.colormaps["YlGnBu"].with_extremes(bad="white")
    image = None
    for k, (ax, (label, (mat, _, _))) in enumerate(zip(axes, mats)):
        image = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=fontsize)
        ax.set_yticks(range(len(types)), types, fontsize=fontsize + 1)
        ax.tick_params(axis="x", labelbottom=True)
        ax.set_xlabel("layer", fontsize=9)
        if k == 0:
            ax.set_ylabel("module type", fontsize=9)
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
        fig.colorbar(image, ax=list(axes), label="rank", shrink=0.9, pad=0.02,
                     ticks=MaxNLocator(integer=True, nbins=6))
    if bars:
        _layer_bars(grid[1], [m for _, (m, _, _) in mats], layers, types, fontsize)
    if title:
        _wrapped_suptitle(fig, title)
    return fig


def _layer_bars(axes, mats, layers, types, fontsize) -> None:
    """Under each heat map: the rank of every layer as a bar stacked by module type, the total on top."""
    colours = _type_colours(types)
    top = max(float(np.nansum(m, axis=0).max()) for m in mats)
    for k, (ax, mat) in enumerate(zip(axes, mats)):
        bottom = np.zeros(len(layers))
        for i, t in enumerate(types):
            vals = np.nan_to_num(mat[i])
            ax.bar(range(len(layers)), vals, 0.8, bottom=bottom, color=colours[t], label=t)
            bottom += vals
        if len(layers) <= 16:
            for j, total in enumerate(bottom):
                ax.text(j, total, format_rank(total), ha="center", va="bottom", fontsize=fontsize - 1)
        ax.set_ylim(0, max(top, 1.0) * 1.18)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=fontsize)
        ax.set_xlabel("layer", fontsize=9)
        if k == 0:
            ax.set_ylabel("rank per layer", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    axes[-1].figure.legend(handles, labels, loc="outside lower center", ncols=min(len(types), 8), fontsize=7,
                           title="bars: module type", title_fontsize=7, frameon=False)


def rank_heatmap(rank_pattern: dict, path, title: str | None = None, planted: dict | None = None,
                 bars: bool = True) -> str:
    """Layers x module types heat map of ``{module name: rank}`` (the AdaLoRA paper's Figure 3).

    x: layer, y: module type; each cell is annotated with its rank (integers as ints, means with one decimal);
    cells with no module stay blank. With ``planted`` ({module name: planted rank}) the planted and the learned
    patterns are drawn side by side on one colour scale. ``bars``: under each heat map, the rank of every layer
    as a bar stacked by module type. Returns the PNG path.
    """
    return _save(rank_heatmap_figure(rank_pattern, title=title, planted=planted, bars=bars), path)


# ---------------------------------------------------------------------------------------- rank history


def _type_colours(types: list[str]) -> dict[str, tuple]:
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10" if len(types) <= 10 else "tab20"]
    return {t: cmap(i % cmap.N) for i, t in enumerate(types)}


def _clean_history(history: list[dict]) -> list[dict]:
    """Records with a step, by step; of several at one step (a resumed run writes again) the last written."""
    by_step = {}
    for h in history:
        if isinstance(h, dict) and _finite(h.get("step")):
            by_step[h["step"]] = h
    return [by_step[s] for s in sorted(by_step)]


def rank_history_figure(history: list[dict], title: str | None = None) -> Figure:
    """The figure of :func:`rank_history_plot`, from ``rank_history.jsonl`` records
    ``{"step", "budget", "ranks": {module: rank}}``; axes in this order:

    1. the total budget against step (and the sum of kept ranks, dashed, when it differs), from 0;
    2. the mean rank of each module type against step, one line per type, from 0;
    3. a module x step heat map of every module's rank, rows grouped by module type (layers top to bottom),
       each record's ranks holding until the next record; then its colour bar.

    When no rank ever changes (LoRA) there is no step axis to speak of: two panels instead, the constant budget
    against step and the rank of each module type as bars, both from 0. Rank axes have integer ticks.
    """
    history = _clean_history(history)
    if not history:
        fig = _new_figure(8.0, 3.0)
        for ax in fig.subplots(1, 2):
            _say_empty(ax, "no rank history")
        return fig

    steps = np.array([h["step"] for h in history], dtype=float)
    names = list(dict.fromkeys(n for h in history for n in (h.get("ranks") or {})))
    ranks = np.array([[float((h.get("ranks") or {}).get(n, np.nan)) for n in names] for h in history])
    ranks = ranks.reshape(len(history), len(names))  # (records, modules)
    budget = np.array([float(h["budget"]) if _finite(h.get("budget")) else np.nan for h in history])
    _, types, index = module_grid(names)
    colours = _type_colours(types)
    constant = bool(np.all((ranks == ranks[:1]) | np.isnan(ranks))) and len(set(budget[np.isfinite(budget)])) <= 1
    x_lo = float(steps[0])
    x_hi = float(steps[-1]) + max(1.0, 0.01 * float(steps[-1] - steps[0]))  # the last record holds a little

    if constant:
        fig = _new_figure(10.0, 3.4)
        ax_b, ax_r = fig.subplots(1, 2)
    else:
        map_h = min(max(0.14 * len(names), 1.6), 8.0)
        fig = _new_figure(9.5, 3.6 + map_h)
        ax_b, ax_t, ax_m = fig.subplots(3, 1, sharex=True, height_ratios=[1.5, 1.8, map_h])

    kept = np.nansum(ranks, axis=1) if names else budget
    ax_b.plot(steps, budget, drawstyle="steps-post", color="C0", lw=1.5, label="budget")
    if names and not np.allclose(kept, budget, equal_nan=True):
        ax_b.plot(steps, kept, drawstyle="steps-post", color="C3", lw=1.0, ls="--", label="sum of ranks")
        ax_b.legend(fontsize=7)
    both = np.concatenate([budget, kept])
    ax_b.set_ylim(0, max(float(np.nanmax(both)) if np.isfinite(both).any() else 1.0, 1.0) * 1.12)
    ax_b.set_title("total budget (kept singular values)" + (", constant" if constant else ""), fontsize=9)
    ax_b.set_ylabel("budget")
    ax_b.set_xlim(x_lo, x_hi)

    rmax = max(float(np.nanmax(ranks)) if np.isfinite(ranks).any() else 1.0, 1.0)
    by_type = {t: [k for k, n in enumerate(names) if index[n][1] == t] for t in types}
    if constant:
        lo = [float(np.nanmin(ranks[0, by_type[t]])) for t in types]
        hi = [float(np.nanmax(ranks[0, by_type[t]])) for t in types]
        ax_r.bar(range(len(types)), hi, 0.6, color=[colours[t] for t in types])
        for j, (a, b) in enumerate(zip(lo, hi)):
            ax_r.text(j, b, format_rank(b) if a == b else f"{format_rank(a)}-{format_rank(b)}", ha="center",
                      va="bottom", fontsize=8)
        ax_r.set_xticks(range(len(types)), types, fontsize=8, rotation=30 if len(types) > 6 else 0)
        ax_r.set_ylim(0, rmax * 1.2 + 0.5)
        ax_r.set_xlabel("module type")
        ax_r.set_title(f"rank per module type, constant from step {x_lo:g} to {float(steps[-1]):g} "
                       f"({len(names)} modules)", fontsize=9)
        ax_r.set_ylabel("rank")
        ax_r.grid(axis="y", alpha=0.3)
        ax_b.set_xlabel("step")
        rank_axes = [ax_r]
    else:
        for t in types:
            ax_t.plot(steps, np.nanmean(ranks[:, by_type[t]], axis=1), drawstyle="steps-post", lw=1.6,
                      color=colours[t], label=t)
        ax_t.set_ylim(0, rmax * 1.08 + 0.1)
        ax_t.set_ylabel("mean rank")
        ax_t.set_title("mean rank per module type (over layers)", fontsize=9)
        ax_t.legend(fontsize=7, loc="best", ncols=min(len(types), 3), framealpha=0.8)
        rank_axes = [ax_t]
        _module_step_map(fig, ax_m, steps, x_hi, ranks, names, types, index, by_type, rmax)
    for ax in [ax_b, *rank_axes]:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        ax.grid(alpha=0.3)
    _step_axis(ax_b)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _module_step_map(fig, ax, steps, x_hi, ranks, names, types, index, by_type, rmax) -> None:
    """Rows: modules by type, layers top to bottom; columns: the history records, each until the next."""
    import matplotlib as mpl

    order = [k for t in types for k in sorted(by_type[t], key=lambda k: index[names[k]][0])]
    edges = np.append(steps, x_hi)
    cmap = mpl.colormaps["YlGnBu"].with_extremes(bad="white")
    mesh = ax.pcolormesh(edges, np.arange(len(order) + 1), np.ma.masked_invalid(ranks[:, order].T), cmap=cmap,
                         vmin=0.0, vmax=rmax, shading="flat")
    ax.set_ylim(len(order), 0)  # first module on top
    bounds = np.cumsum([len(by_type[t]) for t in types])
    for b in bounds[:-1]:
        ax.axhline(b, color="black", lw=0.8)
    centres = bounds - np.array([len(by_type[t]) for t in types]) / 2
    ax.set_yticks(centres, types, fontsize=8 if len(types) <= 8 else 6)
    ax.tick_params(axis="y", length=0)
    ax.set_ylabel("module (layers top to bottom)", fontsize=8)
    ax.set_xlabel("step")
    ax.set_title(f"rank of every module ({len(names)})", fontsize=9)
    fig.colorbar(mesh, ax=ax, label="rank", pad=0.01, ticks=MaxNLocator(integer=True, nbins=6))


def rank_history_plot(history: list[dict], path, title: str | None = None) -> str:
    """:func:`rank_history_figure` written to ``path``; returns the PNG path."""
    return _save(rank_history_figure(history, title=title), path)


def _budget_major(keys: list[tuple]) -> list[tuple]:
    """(method label, target_r) keys grouped by budget and ``--by`` values (so LoRA stands beside AdaLoRA),
    methods in their given order within a group."""
    tags = list(dict.fromkeys(split_label(label)[1] for label, _ in keys))

    def group(k):
        return ((0, float(k[1])) if _finite(k[1]) else (1, 0.0), tags.index(split_label(k[0])[1]))

    return sorted(keys, key=group)


def comparison_figure(rows: list[dict], title: str | None = None, references: dict | None = None,
                      extra_metrics=("rank_recovery",)) -> Figure:
    """The figure of :func:`comparison_plot`: per task, one point per (method, budget): the mean over seeds with
    a ± std error bar, every seed as a dot.

    ``rows``: summary rows (as ``experiments/summarize.py`` builds them) with ``task, method, target_r, metric,
    mean, std`` and optionally ``is_main``, ``higher_is_better`` and ``values`` (``[(seed, value), ...]``, the
    dots). Rows of a main metric are drawn, and rows of ``extra_metrics`` (the planted task's rank_recovery) in
    panels of their own; one panel per metric, so accuracies and losses never share an axis; scores in [-1, 1]
    are drawn x100 as in the summary table. LoRA and AdaLoRA at one budget share a hue (light, dark) and stand
    side by side. ``references``: ``{(task, metric): (value, label)}``, drawn as a dashed line over the task
    (the majority class; the uniform allocation's rank recovery).
    """
    rows = [r for r in rows if (r.get("is_main", True) or r["metric"] in extra_metrics) and _finite(r.get("mean"))]
    metrics = list(dict.fromkeys(r["metric"] for r in rows if r.get("is_main", True)))
    metrics += [m for m in dict.fromkeys(r["metric"] for r in rows) if m not in metrics]
    keys = list(dict.fromkeys((r["method"], r.get("target_r")) for r in rows))
    colours, markers = method_colours(keys), method_markers(keys)
    references = references or {}
    panel_keys = {m: _budget_major([k for k in keys if any((r["method"], r.get("target_r")) == k
                                                           and r["metric"] == m for r in rows)]) for m in metrics}
    n_tasks = {m: len({r["task"] for r in rows if r["metric"] == m}) for m in metrics}
    # the panels, then room for the legend's longest label and for the title: with one task and --by labels a
    # fixed margin left the axes no width at all
    panels = sum(1.4 + 0.32 * len(panel_keys[m]) * n for m, n in n_tasks.items())
    height = 4.2
    legend = 0.3 + _legend_columns(len(keys), height) * (0.6 + _LABEL_CHAR_IN * max(
        (len(_key_label(*k)) for k in keys), default=0))
    width = max(panels + max(legend, 2.5), _TITLE_CHAR_IN * len(title or "") + 0.5)
    fig = _new_figure(width, height)
    if not rows:
        ax = fig.subplots()
        _say_empty(ax, "no completed runs")
        return fig

    axes = fig.subplots(1, len(metrics), squeeze=False, width_ratios=[max(n_tasks[m], 1) for m in metrics])[0]
    for ax, metric in zip(axes, metrics):
        mrows = [r for r in rows if r["metric"] == metric]
        hib = all(_hib(r) for r in mrows)
        seed_vals = [v for r in mrows for _, v in (r.get("values") or [])]
        scale = display_scale(metric, [r["mean"] for r in mrows] + seed_vals, hib)
        tasks = list(dict.fromkeys(r["task"] for r in mrows))
        by = {(r["task"], r["method"], r.get("target_r")): r for r in mrows}
        pk = panel_keys[metric]
        slot = 0.8 / max(len(pk), 1)
        for k, key in enumerate(pk):
            label = _key_label(*key)
            for i, task in enumerate(tasks):
                r = by.get((task, *key))
                if r is None:
                    continue
                x = i - 0.4 + slot * (k + 0.5)
                std = float(r["std"]) if _finite(r.get("std")) else 0.0
                ax.errorbar([x + 0.12 * slot], [float(r["mean"]) * scale], yerr=[std * scale], fmt=markers[key],
                            ms=6, capsize=3, lw=1.2, color=colours[key], mec="black", mew=0.6, zorder=3, label=label)
                label = "_"  # one legend entry per (method, budget)
                vals = [float(v) * scale for _, v in (r.get("values") or []) if _finite(v)]
                if vals:  # the seeds in a narrow column left of the mean, so that none hides behind it
                    offsets = np.linspace(-0.06, 0.06, len(vals)) * slot if len(vals) > 1 else np.zeros(1)
                    ax.scatter(x - 0.2 * slot + offsets, vals, s=11, color=colours[key], edgecolors="black",
                               linewidths=0.3, alpha=0.75, zorder=2)
        for i, task in enumerate(tasks):
            ref = references.get((task, metric))
            if ref is not None and _finite(ref[0]):
                y = float(ref[0]) * scale
                ax.hlines(y, i - 0.45, i + 0.45, colors="0.35", linestyles=(0, (4, 2)), lw=1.0, zorder=1)
                ax.text(i - 0.44, y, f"{ref[1]} {y:.1f}" if scale != 1.0 else f"{ref[1]} {y:.3g}", fontsize=7,
                        color="0.3", va="bottom", ha="left")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_xlim(-0.5, len(tasks) - 0.5)
        ax.set_ylabel(_unit(metric, scale, hib), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        for i in range(1, len(tasks)):
            ax.axvline(i - 0.5, color="0.85", lw=0.8)
        if not hib:
            _log_if_wide(ax, [float(r["mean"]) for r in mrows])
    _outside_legend(fig, axes, title="method")
    fig.suptitle(title or "mean ± std over seeds; dots: seeds", fontsize=10)
    return fig


# -------------------------------------------------------------------------------------- learning curves


def comparison_plot(rows: list[dict], path, title: str | None = None, references: dict | None = None,
                    extra_metrics=("rank_recovery",)) -> str:
    """:func:`comparison_figure` written to ``path``; returns the PNG path."""
    return _save(comparison_figure(rows, title=title, references=references, extra_metrics=extra_metrics), path)


def learning_curves_plot(train: list[dict], evals: list[dict], path, metric: str | None = None,
                         higher_is_better: bool = True, title: str | None = None) -> str:
    """One run's learning curves, two panels against step: the train loss (and the dev loss when the evaluations
    carry ``eval_loss``), and the dev main metric ``metric`` (x100 for a score in [-1, 1]) with its best
    evaluation marked. ``train`` / ``evals``: the metrics.jsonl records of split train / eval."""
    fig = _new_figure(10.0, 3.6)
    ax_l, ax_m = fig.subplots(1, 2)
    tr = [(m["step"], float(m["loss"])) for m in train if _finite(m.get("loss")) and _finite(m.get("step"))]
    dev_loss = [(m["step"], float(m["eval_loss"])) for m in evals if _finite(m.get("eval_loss"))]
    if tr:
        ax_l.plot(*zip(*tr), color="C0", lw=1.2, marker="." if len(tr) <= 60 else None, label="train loss")
    if dev_loss:
        ax_l.plot(*zip(*dev_loss), color="C1", lw=1.2, marker="o", ms=3, label="dev loss")
    if tr or dev_loss:
        ax_l.legend(fontsize=8)
        _log_if_wide(ax_l, [v for _, v in tr + dev_loss])
        ax_l.set_ylabel("loss")
    else:
        ax_l.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax_l.transAxes)
    ax_l.set_title("loss", fontsize=10)

    pts = [(m["step"], float(m[metric])) for m in evals if metric and _finite(m.get(metric))]
    if pts:
        scale = display_scale(metric, [v for _, v in pts], higher_is_better)
        steps, vals = zip(*pts)
        ys = [v * scale for v in vals]
        ax_m.plot(steps, ys, color="C2", lw=1.4, marker="o", ms=3, label=f"dev {metric}")
        b = int(np.argmax(ys) if higher_is_better else np.argmin(ys))
        ax_m.scatter([steps[b]], [ys[b]], marker="*", s=90, color="C3", zorder=3,
                     label=f"best {ys[b]:.2f} at step {steps[b]}" if scale != 1.0
                     else f"best {ys[b]:.4g} at step {steps[b]}")
        ax_m.legend(fontsize=8)
        ax_m.set_ylabel(_unit(metric, scale, higher_is_better), fontsize=9)
        if not higher_is_better:
            _log_if_wide(ax_m, ys)
    else:
        ax_m.text(0.5, 0.5, "no evaluation" if metric else "no main metric", ha="center", va="center",
                  transform=ax_m.transAxes)
    ax_m.set_title(f"dev {metric or 'metric'}", fontsize=10)
    for ax in (ax_l, ax_m):
        ax.set_xlabel("step")
        _step_axis(ax)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _band(curves: list[list[tuple]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, sample std (NaN where one seed), seeds per step) over curves of (step, value) pairs."""
    at: dict[float, list[float]] = {}
    for curve in curves:
        for s, v in curve:
            at.setdefault(float(s), []).append(float(v))
    steps = np.array(sorted(at))
    mean = np.array([np.mean(at[s]) for s in steps])
    std = np.array([np.std(at[s], ddof=1) if len(at[s]) > 1 else np.nan for s in steps])
    return steps, mean, std, np.array([len(at[s]) for s in steps])


def sweep_curves_plot(series: list[dict], path, metric: str, higher_is_better: bool = True,
                      title: str | None = None, reference: tuple | None = None) -> str:
    """Dev ``metric`` against step for one task: per (method, budget) the mean over seeds as a line and ± one
    sample std as a band (where two or more seeds evaluated at that step).

    ``series``: ``[{"method": label, "target_r": r, "curves": [[(step, value), ...] per seed]}]`` in display
    order; ``reference``: ``(value, label)`` drawn as a dashed line (the majority class).
    """
    fig = _new_figure(8.5, 4.0)
    ax = fig.subplots()
    values = [v for s in series for c in s["curves"] for _, v in c]
    if not values:
        _say_empty(ax, "no evaluation logged")
        return _save(fig, path)
    scale = display_scale(metric, values, higher_is_better)
    keys = [(s["method"], s.get("target_r")) for s in series]
    colours, markers = method_colours(keys), method_markers(keys)
    lows = []
    for s in _budget_major_series(series):
        steps, mean, std, n = _band(s["curves"])
        key = (s["method"], s.get("target_r"))
        colour = colours[key]
        ax.plot(steps, mean * scale, color=colour, lw=1.6, marker=markers[key] if len(steps) <= 30 else None, ms=3.5,
                label=f"{_key_label(*key)} (n={int(n.max())})")
        ok = n > 1
        lows += list((mean - std)[ok])
        ax.fill_between(steps[ok], (mean - std)[ok] * scale, (mean + std)[ok] * scale, color=colour, alpha=0.18,
                        lw=0)
    if reference is not None and _finite(reference[0]):
        ax.axhline(float(reference[0]) * scale, color="0.35", ls=(0, (4, 2)), lw=1.0,
                   label=f"{reference[1]} ({float(reference[0]) * scale:.1f})")
    if not higher_is_better and min(lows, default=0.0) > 0:  # a log axis would hide a band that reaches 0
        _log_if_wide(ax, np.asarray(values) * scale)
    ax.set_xlabel("step")
    ax.set_ylabel(f"dev {_unit(metric, scale, higher_is_better)}", fontsize=9)
    _step_axis(ax)
    ax.grid(alpha=0.3)
    _outside_legend(fig, [ax], title="mean ± std over seeds")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _budget_major_series(series: list[dict]) -> list[dict]:
    order = _budget_major([(s["method"], s.get("target_r")) for s in series])
    return sorted(series, key=lambda s: order.index((s["method"], s.get("target_r"))))


# ------------------------------------------------------------------------------------- budget vs metric


def _shift(x: float, d: float, span: float, log_x: bool) -> float:
    """x moved by the fraction d of the axis span (multiplicatively on a log2 axis)."""
    return x * 2 ** (d * span) if log_x else x + d * span


def budget_plot(rows: list[dict], path, title: str | None = None, extra_metrics=("rank_recovery",)) -> str:
    """The metric against the budget (target_r), one line per method, mean ± std over seeds with every seed as a
    dot; one panel per (task, metric) that has two or more budgets (main metrics, then ``extra_metrics``).
    ``rows`` as for :func:`comparison_plot`. LoRA and AdaLoRA share a hue (light, dark)."""
    rows = [r for r in rows if (r.get("is_main", True) or r["metric"] in extra_metrics) and _finite(r.get("mean"))
            and _finite(r.get("target_r"))]
    panels = [p for p in dict.fromkeys((r["task"], r["metric"]) for r in sorted(rows, key=lambda r: not r.get(
        "is_main", True))) if len({float(r["target_r"]) for r in rows if (r["task"], r["metric"]) == p}) > 1]
    nr, nc = _grid(max(len(panels), 1), 3)
    fig = _new_figure(3.8 * nc + 2.2, 3.3 * nr + 0.6)
    if not panels:
        ax = fig.subplots()
        _say_empty(ax, "no task with two or more budgets")
        return _save(fig, path)
    axes = list(fig.subplots(nr, nc, squeeze=False).ravel())
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours, markers = method_colours([(m, None) for m in methods]), method_markers([(m, None) for m in methods])
    for ax, (task, metric) in zip(axes, panels):
        prow = [r for r in rows if (r["task"], r["metric"]) == (task, metric)]
        hib = all(_hib(r) for r in prow)
        scale = display_scale(metric, [r["mean"] for r in prow], hib)
        budgets = sorted({float(r["target_r"]) for r in prow})
        log_x = budgets[0] > 0 and budgets[-1] / budgets[0] >= 4
        span = math.log2(budgets[-1] / budgets[0]) if log_x else budgets[-1] - budgets[0]
        present = [m for m in methods if any(r["method"] == m for r in prow)]

        for k, m in enumerate(present):
            mr = sorted((r for r in prow if r["method"] == m), key=lambda r: float(r["target_r"]))
            dodge = (k - (len(present) - 1) / 2) * 0.04  # methods side by side at one budget
            xs = np.array([_shift(float(r["target_r"]), dodge, span, log_x) for r in mr])
            ys = np.array([float(r["mean"]) * scale for r in mr])
            es = np.array([float(r["std"]) * scale if _finite(r.get("std")) else 0.0 for r in mr])
            ax.errorbar(xs, ys, yerr=es, fmt="-" + markers[m, None], ms=5, capsize=3, lw=1.3, color=colours[m, None],
                        mec="black", mew=0.5, label=m, zorder=3)
            for x, r in zip(xs, mr):  # the seeds a little left of their mean, so that none hides behind it
                vals = [float(v) * scale for _, v in (r.get("values") or []) if _finite(v)]
                ax.scatter([_shift(x, -0.015, span, log_x)] * len(vals), vals, s=10, color=colours[m, None], alpha=0.7,
                           edgecolors="none", zorder=2)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [format_rank(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("target_r (final average rank)")
        ax.set_ylabel(_unit(metric, scale, hib), fontsize=8)
        ax.set_title(f"{task}: {metric}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    _outside_legend(fig, axes, title="method")
    fig.suptitle(title or "metric against budget: mean ± std over seeds; dots: seeds", fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------------- growth diagnostic


def growth_types(evals: list[dict]) -> list[str]:
    """Module types with a ``sigma_max/<type>`` entry in the eval records, in display order."""
    seen = list(dict.fromkeys(k.split("/", 1)[1] for m in evals for k in m if k.startswith(SIGMA_MAX + "/")))
    return [t for t in TYPE_ORDER if t in seen] + [t for t in seen if t not in TYPE_ORDER]


def _series(evals: list[dict], key: str) -> tuple[list, list]:
    pts = [(m["step"], float(m[key])) for m in evals if _finite(m.get(key)) and _finite(m.get("step"))]
    return (list(zip(*pts)) if pts else ([], []))  # type: ignore[return-value]


def _growth_axes(fig: Figure, types: list[str]):
    nr, nc = _grid(len(types), 3)
    axes = list(fig.subplots(nr, nc, squeeze=False, sharex=True, sharey=True).ravel())
    for ax in axes[len(types):]:
        ax.set_axis_off()
    return axes[:len(types)]


def _finish_growth_axes(axes, types, values) -> None:
    cols = axes[0].get_subplotspec().get_gridspec().ncols
    for i, (ax, t) in enumerate(zip(axes, types)):
        ax.set_title(t, fontsize=10)
        if i + cols >= len(axes):  # the lowest panel of its column
            ax.set_xlabel("step")
            ax.tick_params(labelbottom=True)
        ax.grid(alpha=0.3, which="both")
        _step_axis(ax, nbins=5)
    vals = [v for v in values if _finite(v)]
    if vals and min(vals) > 0:
        _log_y(axes[0])  # the axes share y
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("spectral norm")


def growth_figure(evals: list[dict], title: str | None = None) -> Figure:
    """The figure of :func:`growth_plot`: the growth diagnostic of one run against step on one log axis, one
    colour per module type: σ_max(ΔW), the largest over the modules of the type (``sigma_max/<type>``, solid);
    scale·max|λ| (``scale_lambda_max/<type>``, AdaLoRA, dashed) and the bound scale·Σlr (``growth_bound``,
    AdaLoRA, dotted black: how far Adam's steps can have moved λ from 0). ``ax.lines`` hold, per type, σ_max then
    scale·max|λ| (when logged), then the bound."""
    from matplotlib.lines import Line2D

    types = growth_types(evals)
    fig = _new_figure(8.0, 3.8)
    ax = fig.subplots()
    if not types:
        _say_empty(ax, "no growth diagnostic logged")
        return fig
    colours = _type_colours(types)
    values, styles = [], {}
    for t in types:
        for key, style in ((SIGMA_MAX, "-"), (SCALE_LAMBDA_MAX, "--")):
            xs, ys = _series(evals, f"{key}/{t}")
            if xs:
                ax.plot(xs, ys, ls=style, color=colours[t], lw=1.4 if style == "-" else 1.1,
                        marker="o" if style == "-" and len(xs) <= 30 else None, ms=3)
                values += list(ys)
                styles[key] = style
    bound = _series(evals, GROWTH_BOUND)
    if bound[0]:
        ax.plot(*bound, ls=":", color="black", lw=1.5)
        values += list(bound[1])
        styles[GROWTH_BOUND] = ":"
    if values and min(values) > 0:
        _log_y(ax)
    names = {SIGMA_MAX: "σ_max(ΔW)", SCALE_LAMBDA_MAX: "scale·max|λ|", GROWTH_BOUND: "bound scale·Σlr"}
    handles = [Line2D([], [], color=colours[t], lw=3, label=t) for t in types]
    handles += [Line2D([], [], color="black", ls=style, lw=1.4, label=names[key]) for key, style in styles.items()]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              title="module type / quantity", title_fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("spectral norm (max over modules of the type)", fontsize=8)
    _step_axis(ax)
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(title or "growth diagnostic", fontsize=10)
    return fig


def growth_plot(evals: list[dict], path, title: str | None = None) -> str:
    """:func:`growth_figure` written to ``path``; returns the PNG path."""
    return _save(growth_figure(evals, title=title), path)


def growth_comparison_plot(series: list[dict], path, title: str | None = None) -> str:
    """:func:`growth_comparison_figure` written to ``path``; returns the PNG path."""
    return _save(growth_comparison_figure(series, title=title), path)


def growth_comparison_figure(series: list[dict], title: str | None = None):
    """σ_max(ΔW) per module type against step for several runs on the same axes (log y), e.g. LoRA and AdaLoRA
    at one budget and seed; for an AdaLoRA run also scale·max|λ| (dashed: σ_max when P and Q are orthonormal,
    so a gap between the two is P and Q away from orthonormal) and the bound scale·Σlr (dotted).
    ``series``: ``[{"method": label, "target_r": r, "evals": eval records}]``."""
    types = list(dict.fromkeys(t for s in series for t in growth_types(s["evals"])))
    types = [t for t in TYPE_ORDER if t in types] + [t for t in types if t not in TYPE_ORDER]
    nr, nc = _grid(max(len(types), 1), 3)
    fig = _new_figure(3.6 * nc + 2.0, 3.0 * nr + 0.6)
    if not types:
        ax = fig.subplots()
        _say_empty(ax, "no growth diagnostic logged")
        return fig
    axes = _growth_axes(fig, types)
    keys = [(s["method"], s.get("target_r")) for s in series]
    colours, markers = method_colours(keys), method_markers(keys)
    values = []
    for s in series:
        key = (s["method"], s.get("target_r"))
        bound = _series(s["evals"], GROWTH_BOUND)
        for ax, t in zip(axes, types):
            xs, ys = _series(s["evals"], f"{SIGMA_MAX}/{t}")
            if xs:
                ax.plot(xs, ys, color=colours[key], lw=1.6, marker=markers[key] if len(xs) <= 30 else None, ms=4,
                        label=f"{_key_label(*key)}: σ_max(ΔW)")
                values += list(ys)
            xs, ys = _series(s["evals"], f"{SCALE_LAMBDA_MAX}/{t}")
            if xs:
                ax.plot(xs, ys, ls="--", color=colours[key], lw=1.0, label=f"{_key_label(*key)}: scale·max|λ|")
                values += list(ys)
            if bound[0]:
                ax.plot(*bound, ls=":", color=colours[key], lw=1.2, label=f"{_key_label(*key)}: bound scale·Σlr")
        values += list(bound[1])
    _finish_growth_axes(axes, types, values)
    _outside_legend(fig, axes)
    fig.suptitle(title or "σ_max(ΔW) per module type", fontsize=10)
    return fig


# -------------------------------------------------------------------------------------------- one run


def run_title(summary: dict) -> str:
    """``task / method / target_r=R / seed S`` of a run's summary (the parts it has)."""
    parts = [str(summary[k]) for k in ("task", "method") if summary.get(k) not in (None, "")]
    if summary.get("target_r") not in (None, ""):
        parts.append(f"target_r={summary['target_r']}")
    if summary.get("seed") not in (None, ""):
        parts.append(f"seed {summary['seed']}")
    return " / ".join(parts) or "run"


def run_figures(run_dir, summary: dict) -> list:
    """The figures of one run folder, written to ``<run>/figures/``; returns their paths.

    ``summary``: the run's summary dict (task, method, target_r, seed, main_metric, higher_is_better). Reads
    metrics.jsonl, rank_pattern.json, rank_history.jsonl and planted_ranks.json from the folder and writes
    ``rank_heatmap.png`` (with a rank pattern), ``rank_history.png`` (with a history), ``learning_curves.png``
    (with logged metrics) and ``growth.png`` (when the evaluations carry ``sigma_max/<type>``).
    """
    from .rundir import RunDir, read_json
    from .summary import eval_records, read_jsonl

    run = RunDir(run_dir)
    title = run_title(summary)
    records = read_jsonl(run.metrics)
    train = [m for m in records if m.get("split") == "train"]
    evals = eval_records(records)
    ranks = read_json(run.rank_pattern) or {}
    history = read_jsonl(run.rank_history)
    out = []
    if not (ranks or history or train or evals):
        return out
    run.figures.mkdir(parents=True, exist_ok=True)
    if ranks:
        out.append(rank_heatmap(ranks, run.figures / "rank_heatmap.png", title=f"{title}: final rank per module",
                                planted=read_json(run.planted)))
    if history:
        out.append(rank_history_plot(history, run.figures / "rank_history.png", title=f"{title}: rank history"))
    if train or evals:
        out.append(learning_curves_plot(train, evals, run.figures / "learning_curves.png",
                                        metric=summary.get("main_metric"),
                                        higher_is_better=summary.get("higher_is_better", True) is not False,
                                        title=f"{title}: learning curves"))
    if growth_types(evals):
        out.append(growth_plot(evals, run.figures / "growth.png", title=f"{title}: growth diagnostic"))
    return [p for p in out if p]
