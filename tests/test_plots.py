"""adalora_lab.plots: module-name parsing and the PNGs."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from adalora_lab import plots

REPO = Path(__file__).resolve().parents[1]

BERT_SUFFIXES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")


def test_module_grid_bert():
    names = [f"bert.encoder.layer.{i}.{s}" for i in (3, 0) for s in reversed(BERT_SUFFIXES)]
    layers, types, index = plots.module_grid(names)
    assert layers == [0, 3]
    assert types == ["query", "key", "value", "attn.out", "ffn.in", "ffn.out"]  # fixed order, not appearance
    assert index["bert.encoder.layer.3.attention.self.query"] == (3, "query")
    assert index["bert.encoder.layer.3.attention.output.dense"] == (3, "attn.out")
    assert index["bert.encoder.layer.0.intermediate.dense"] == (0, "ffn.in")
    assert index["bert.encoder.layer.0.output.dense"] == (0, "ffn.out")
    # RoBERTa / DeBERTa-v3 spellings land on the same rows
    _, types, index = plots.module_grid(["roberta.encoder.layer.11.attention.self.value",
                                         "deberta.encoder.layer.1.attention.self.query_proj"])
    assert index["roberta.encoder.layer.11.attention.self.value"] == (11, "value")
    assert index["deberta.encoder.layer.1.attention.self.query_proj"] == (1, "query")
    assert types == ["query", "value"]


def test_module_grid_gpt2_mlp_and_unknown():
    gpt = ["transformer.h.2.mlp.c_proj", "transformer.h.2.attn.c_attn", "transformer.h.10.mlp.c_fc",
           "transformer.h.0.attn.c_proj"]
    layers, types, index = plots.module_grid(gpt)
    assert layers == [0, 2, 10]
    assert types == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert index["transformer.h.2.attn.c_attn"] == (2, "attn.c_attn")
    assert index["transformer.h.2.mlp.c_proj"] == (2, "mlp.c_proj")

    layers, types, index = plots.module_grid(["blocks.4.up", "blocks.4.down", "blocks.0.up", "blocks.0.down"])
    assert (layers, types) == ([0, 4], ["up", "down"])  # first appearance
    assert index["blocks.4.down"] == (4, "down")

    layers, types, index = plots.module_grid(["0", "2", "4"])  # a bare nn.Sequential
    assert (layers, types) == ([0, 2, 4], ["linear"])
    assert index["2"] == (2, "linear")

    layers, types, index = plots.module_grid(["net.1", "net.3", "head", "model.stack.7.mix.proj"])
    assert index["net.3"] == (3, "net")
    assert index["head"] == (0, "head")  # no integer: layer 0, the whole name as type
    assert index["model.stack.7.mix.proj"] == (7, "mix.proj")
    assert types == ["net", "head", "mix.proj"]

    # two stacks on one cell: the type keeps the stack's prefix
    _, types, index = plots.module_grid(["encoder.layer.0.attention.self.query",
                                         "decoder.layer.0.attention.self.query"])
    assert len(set(index.values())) == 2


def test_rank_matrix_and_labels():
    pattern = {"blocks.0.up": 3, "blocks.1.up": 2.5, "blocks.1.down": 0}
    mat, layers, types = plots.rank_matrix(pattern)
    assert (layers, types) == ([0, 1], ["up", "down"])
    assert mat[0].tolist() == [3.0, 2.5]
    assert math.isnan(mat[1, 0]) and mat[1, 1] == 0.0
    assert [plots.format_rank(v) for v in (3, 3.0, 2.25, 2.0 + 1 / 3, float("nan"))] == ["3", "3", "2.2", "2.3", ""]
    assert plots.display_scale("accuracy", [0.8, 0.9]) == 100.0
    assert plots.display_scale("matthews_correlation", [-0.1, 0.6]) == 100.0
    assert plots.display_scale("distill_loss", [0.01], higher_is_better=False) == 1.0
    assert plots.display_scale("eval_loss", [0.5]) == 1.0
    assert plots.display_scale("perplexity", [12.0]) == 1.0


def _bert_pattern(n_layers=12):
    rng = np.random.default_rng(0)
    return {f"bert.encoder.layer.{i}.{s}": int(rng.integers(0, 13)) for i in range(n_layers) for s in BERT_SUFFIXES}


def test_rank_heatmap_annotations_equal_ranks(tmp_path):
    pattern = _bert_pattern()
    pattern.pop("bert.encoder.layer.5.attention.self.key")  # a blank cell
    fig = plots.rank_heatmap_figure(pattern, title="t")
    ax = fig.axes[0]
    mat, layers, types = plots.rank_matrix(pattern)
    expected = [plots.format_rank(mat[i, j]) for i in range(len(types)) for j in range(len(layers))
                if not math.isnan(mat[i, j])]
    assert [t.get_text() for t in ax.texts] == expected
    assert len(ax.texts) == 12 * 6 - 1
    assert [t.get_text() for t in ax.get_yticklabels()] == list(types)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(12)]

    path = plots.rank_heatmap(pattern, tmp_path / "sub" / "h.png", title="RTE")
    assert path == str(tmp_path / "sub" / "h.png")
    assert (tmp_path / "sub" / "h.png").stat().st_size > 5000


def test_rank_heatmap_with_planted_has_two_panels(tmp_path):
    learned = {"blocks.0.up": 2.5, "blocks.0.down": 1, "blocks.1.up": 4}
    planted = {"blocks.0.up": 3, "blocks.0.down": 1, "blocks.1.up": 4, "blocks.1.down": 2}
    fig = plots.rank_heatmap_figure(learned, planted=planted)
    planted_ax, learned_ax = fig.axes[:2]
    assert (planted_ax.get_title(), learned_ax.get_title()) == ("planted", "learned")
    assert [t.get_text() for t in planted_ax.texts] == ["3", "4", "1", "2"]
    assert [t.get_text() for t in learned_ax.texts] == ["2.5", "4", "1"]  # blocks.1.down blank
    path = plots.rank_heatmap(learned, tmp_path / "p.png", planted=planted)
    assert (tmp_path / "p.png").stat().st_size > 5000 and path.endswith("p.png")


def test_rank_history_plot(tmp_path):
    names = list(_bert_pattern(4))
    history = []
    for step in range(0, 200, 10):
        ranks = {n: max(0, 12 - step // 20 - (k % 3)) for k, n in enumerate(names)}
        history.append({"step": step, "budget": sum(ranks.values()), "ranks": ranks})
    path = plots.rank_history_plot(history, tmp_path / "hist.png", title="history")
    assert (tmp_path / "hist.png").stat().st_size > 5000 and path.endswith("hist.png")
    # an empty history still gives a figure
    assert (tmp_path / "empty.png").exists() is False
    plots.rank_history_plot([], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_comparison_plot(tmp_path):
    rows = []
    for task, metric, hib, base in (("rte", "accuracy", True, 0.7), ("sst2", "accuracy", True, 0.9),
                                    ("planted_rank", "distill_loss", False, 0.01)):
        for k, (method, r) in enumerate((("lora", 2), ("lora", 8), ("adalora", 2), ("adalora", 8))):
            rows.append({"task": task, "method": method, "target_r": r, "metric": metric, "mean": base * (1 + k / 50),
                         "std": base / 50 if k else float("nan"), "n": 3, "is_main": True, "higher_is_better": hib})
    rows.append({"task": "planted_rank", "method": "lora", "target_r": 2, "metric": "rank_recovery", "mean": 0.3,
                 "std": 0.1, "n": 3, "is_main": False, "higher_is_better": True})
    path = plots.comparison_plot(rows, tmp_path / "c.png", title="cmp")
    assert (tmp_path / "c.png").stat().st_size > 5000 and path.endswith("c.png")
    plots.comparison_plot([], tmp_path / "none.png")
    assert (tmp_path / "none.png").stat().st_size > 0


def test_no_open_pyplot_figure():
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_imports_neither_hydra_nor_wandb_nor_pyplot():
    """Checked in a fresh interpreter: hydra's pytest plugin is loaded into this one."""
    code = ("import adalora_lab.summary, adalora_lab.plots; import sys; "
            "bad = [m for m in ('hydra', 'wandb', 'matplotlib.pyplot') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("bad", [{}, {"x": None}])
def test_heatmap_degenerate_inputs(tmp_path, bad):
    plots.rank_heatmap(bad, tmp_path / "d.png")
    assert (tmp_path / "d.png").exists()


# ------------------------------------------------------------------------------------ colours and markers


def _hue(c) -> float:
    from matplotlib.colors import rgb_to_hsv

    return float(rgb_to_hsv(np.array(c[:3]))[0])


def test_method_colours_pair_lora_with_adalora_at_each_budget():
    keys = [("lora", 2), ("lora", 8), ("adalora", 2), ("adalora", 8), ("sora", 2), ("increlora", 2),
            ("lora optim.lr=0.001", 2), ("adalora optim.lr=0.001", 2), ("full", None)]
    colours = plots.method_colours(keys)
    assert set(colours) == set(keys)
    for r, tag in ((2, ""), (8, ""), (2, " optim.lr=0.001")):
        lora, ada = colours[f"lora{tag}", r], colours[f"adalora{tag}", r]
        assert lora != ada and abs(_hue(lora) - _hue(ada)) < 0.03  # one hue ...
        assert sum(lora[:3]) > sum(ada[:3])  # ... LoRA the light shade, AdaLoRA the dark one
    hues = [_hue(colours[k]) for k in (("adalora", 2), ("adalora", 8), ("adalora optim.lr=0.001", 2))]
    assert min(abs(a - b) for i, a in enumerate(hues) for b in hues[i + 1:]) > 0.03  # one hue per budget
    others = [colours[k] for k in (("sora", 2), ("increlora", 2), ("full", None))]
    assert len(set(colours.values())) == len(keys) and not set(others) & {colours[k] for k in keys[:4]}
    markers = plots.method_markers(keys)
    assert (markers["lora", 2], markers["adalora", 8], markers["full", None]) == ("s", "o", "D")
    assert markers["sora", 2] != markers["increlora", 2] and markers["lora optim.lr=0.001", 2] == "s"


# ------------------------------------------------------------------------------------------ comparison


def _comparison_rows():
    rows = []
    for k, (method, r) in enumerate((("lora", 2), ("adalora", 2), ("lora", 8), ("adalora", 8))):
        vals = [0.6 + 0.02 * k + 0.01 * s for s in range(3)]
        rows.append({"task": "rte", "method": method, "target_r": r, "metric": "accuracy", "is_main": True,
                     "mean": sum(vals) / 3, "std": 0.01, "n": 3, "higher_is_better": True,
                     "values": list(enumerate(vals))})
        rows.append({"task": "planted_rank", "method": method, "target_r": r, "metric": "rank_recovery",
                     "is_main": False, "mean": 0.3 + 0.1 * k, "std": float("nan"), "n": 1, "higher_is_better": True,
                     "values": [(0, 0.3 + 0.1 * k)]})
    return rows


def test_comparison_figure_draws_means_seeds_and_the_majority_class():
    rows = _comparison_rows()
    fig = plots.comparison_figure(rows, references={("rte", "accuracy"): (0.527, "majority class"),
                                                    ("planted_rank", "rank_recovery"): (0.25, "uniform")})
    acc_ax, rec_ax = fig.axes[:2]  # the main metric, then rank_recovery in a panel of its own
    assert "accuracy (x100)" in acc_ax.get_ylabel() and "rank_recovery (x100)" in rec_ax.get_ylabel()
    dots = sorted(round(float(y), 6) for c in acc_ax.collections if c.get_offsets().shape[0] == 3
                  for y in c.get_offsets()[:, 1])
    assert dots == sorted(round(100 * v, 6) for r in rows if r["metric"] == "accuracy" for _, v in r["values"])
    points = [c.lines[0] for c in acc_ax.containers]  # the error bars' data lines: one mean each
    means = [round(float(line.get_ydata()[0]), 6) for line in points]
    assert sorted(means) == sorted(round(100 * r["mean"], 6) for r in rows if r["metric"] == "accuracy")
    errs = [c.lines[2][0].get_segments()[0][:, 1] for c in acc_ax.containers]
    assert all(np.allclose(seg, [m - 1.0, m + 1.0]) for seg, m in zip(errs, means))  # ± std x100
    refs = [seg for c in acc_ax.collections if hasattr(c, "get_segments")
            for seg in c.get_segments() if np.allclose(seg[:, 1], 52.7)]
    assert refs, "no majority-class line at 52.7"
    assert acc_ax.get_ylim()[0] < 52.7 < acc_ax.get_ylim()[1]
    # x positions: budget-major, LoRA beside AdaLoRA
    order = [m for _, m in sorted((float(line.get_xdata()[0]), m) for line, m in zip(points, means))]
    expected = [round(100 * r["mean"], 6) for r in rows if r["metric"] == "accuracy"]
    assert order == expected  # rows were given as lora 2, adalora 2, lora 8, adalora 8


def test_a_long_legend_stays_inside_the_figure():
    """A sweep's 26 grid cells: the legend takes columns rather than running over the title and off the figure."""
    rows = [{"task": "mrpc", "method": f"lora optim.lr={lr:g}", "target_r": 2, "metric": "accuracy", "mean": 0.8,
             "std": 0.01, "n": 1, "higher_is_better": True, "values": [(0, 0.8)]} for lr in np.geomspace(1e-5, 1, 26)]
    fig = plots.comparison_figure(rows)
    FigureCanvasAgg(fig).draw()
    (legend,) = fig.legends
    box, height = legend.get_window_extent(), fig.get_figheight() * fig.dpi
    assert legend._ncols == 2 and 0 <= box.y0 and box.y1 <= height
    assert box.y1 < fig._suptitle.get_window_extent().y0 or box.x0 > fig._suptitle.get_window_extent().x1


def test_one_task_with_long_labels_keeps_its_axes_and_its_title():
    """One task (a --where slice) and --by labels: the figure widens for the legend and the title, where a fixed
    margin collapsed the axes to nothing (matplotlib warned) and cut the title off on both sides."""
    labels = ["lora optim.lr=0.0003", "adalora optim.lr=0.001 method.orth_reg_weight=0.3"]
    rows = [{"task": "mrpc", "method": m, "target_r": 2, "metric": "accuracy", "mean": 0.8, "std": 0.01, "n": 3,
             "higher_is_better": True, "values": [(0, 0.8)]} for m in labels]
    title = "final accuracy: mean ± std over seeds (error bar), every seed (dot)"
    fig = plots.comparison_figure(rows, title=title)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied because axes sizes collapsed to zero"
        FigureCanvasAgg(fig).draw()
    ax_box, fig_w = fig.axes[0].get_window_extent(), fig.get_figwidth() * fig.dpi
    assert ax_box.width > 0.9 * fig.dpi  # the panel keeps about an inch
    title_box = fig._suptitle.get_window_extent()
    assert 0 <= title_box.x0 and title_box.x1 <= fig_w
    (legend,) = fig.legends
    assert legend.get_window_extent().x1 <= fig_w and legend.get_window_extent().x0 >= ax_box.x1


def test_budget_and_sweep_curve_plots(tmp_path):
    rows = _comparison_rows()
    assert plots.budget_plot(rows, tmp_path / "b.png").endswith("b.png")
    assert (tmp_path / "b.png").stat().st_size > 5000
    plots.budget_plot([r for r in rows if r["target_r"] == 2], tmp_path / "one.png")  # one budget: a note
    assert (tmp_path / "one.png").stat().st_size > 0
    series = [{"method": m, "target_r": 2, "curves": [[(s, 0.5 + 0.01 * s + 0.02 * k + 0.01 * seed) for s in (1, 2, 3)]
                                                      for seed in range(3)]} for k, m in enumerate(("lora", "adalora"))]
    plots.sweep_curves_plot(series, tmp_path / "s.png", metric="accuracy", reference=(0.5, "majority class"))
    assert (tmp_path / "s.png").stat().st_size > 5000
    plots.sweep_curves_plot([], tmp_path / "s0.png", metric="accuracy")
    assert (tmp_path / "s0.png").stat().st_size > 0


# ---------------------------------------------------------------------------------- rank history, heat map


def _is_int(v: float) -> bool:
    return abs(v - round(v)) < 1e-9


def test_rank_history_figure_panels():
    """Budget, mean rank per module type, and the module x step map of every rank, on one step axis."""
    names = [f"bert.encoder.layer.{i}.{s}" for i in range(3) for s in ("intermediate.dense", "attention.self.query")]
    history = [{"step": step, "budget": 0, "ranks": {n: max(0, 6 - step // 10 - k % 3) for k, n in enumerate(names)}}
               for step in (0, 10, 20, 30)]
    for h in history:
        h["budget"] = sum(h["ranks"].values())
    fig = plots.rank_history_figure(history, title="t")
    budget_ax, type_ax, map_ax = fig.axes[:3]
    np.testing.assert_allclose(budget_ax.lines[0].get_ydata(), [h["budget"] for h in history])
    query, ffn = names[1::2], names[0::2]  # display order: query before ffn.in
    assert [line.get_label() for line in type_ax.lines] == ["query", "ffn.in"]
    for line, group in zip(type_ax.lines, (query, ffn)):
        np.testing.assert_allclose(line.get_ydata(), [np.mean([h["ranks"][n] for n in group]) for h in history])
    (mesh,) = map_ax.collections
    expected = [[h["ranks"][n] for h in history] for n in query + ffn]  # rows by type, layers top to bottom
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(6, 4), expected)
    assert [t.get_text() for t in map_ax.get_yticklabels()] == ["query", "ffn.in"]
    for ax in (budget_ax, type_ax):
        assert ax.get_ylim()[0] == 0 and all(_is_int(t) for t in ax.get_yticks())
    assert budget_ax.get_ylim()[1] >= history[0]["budget"]
    assert map_ax.get_xlim()[0] == 0 and map_ax.get_xlim()[1] > 30  # the last record holds a little


@pytest.mark.parametrize("steps", [(0, 300), (0,)])
def test_rank_history_figure_of_constant_ranks(steps):
    """LoRA: a flat budget on an axis from 0, and one bar per module type with its rank: no degenerate axis."""
    ranks = {"blocks.0.up": 2, "blocks.0.down": 2, "blocks.1.up": 2, "blocks.1.down": 2}
    history = [{"step": s, "budget": 8, "ranks": ranks} for s in steps]
    fig = plots.rank_history_figure(history)
    budget_ax, bar_ax = fig.axes[:2]
    lo, hi = budget_ax.get_ylim()
    assert lo == 0 and hi > 8 and budget_ax.get_xlim()[1] > budget_ax.get_xlim()[0]
    assert [p.get_height() for p in bar_ax.patches] == [2, 2]
    assert [t.get_text() for t in bar_ax.get_xticklabels()] == ["up", "down"]
    assert bar_ax.get_ylim()[0] == 0 and bar_ax.get_ylim()[1] > 2
    assert all(_is_int(t) for ax in (budget_ax, bar_ax) for t in ax.get_yticks())


def test_rank_heatmap_bars_sum_each_layer_by_module_type():
    pattern = _bert_pattern(4)
    fig = plots.rank_heatmap_figure(pattern, title="rte / adalora / target_r=2 / seed 0")
    heat, bars = fig.axes[:2]
    assert (heat.get_ylabel(), heat.get_xlabel(), bars.get_xlabel()) == ("module type", "layer", "layer")
    mat, layers, types = plots.rank_matrix(pattern)
    tops = {}
    for p in bars.patches:
        x = round(p.get_x() + p.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), p.get_y() + p.get_height())
    assert [tops[j] for j in range(len(layers))] == pytest.approx(np.nansum(mat, axis=0).tolist())
    assert len(bars.patches) == len(types) * len(layers)
    assert fig.get_suptitle() == "rte / adalora / target_r=2 / seed 0"


# ------------------------------------------------------------------------------ growth, curves, one run


def _evals(adalora: bool) -> list[dict]:
    out = []
    for step in (10, 20, 30):
        e = {"step": step, "accuracy": 0.5 + step / 100, "eval_loss": 0.7}
        for t, size in (("ffn.in", 3.0), ("query", 1.0)):
            e[f"sigma_max/{t}"] = size * step / 100
            if adalora:
                e[f"scale_lambda_max/{t}"] = size * step / 90
        if adalora:
            e["growth_bound"] = step / 10
        out.append(e)
    return out


def test_growth_figure():
    """One log axis: per module type sigma_max then scale * max|lambda|, then the bound scale * sum(lr)."""
    fig = plots.growth_figure(_evals(adalora=True))
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    lines = [line.get_ydata() for line in ax.lines]
    assert len(lines) == 2 * 2 + 1
    np.testing.assert_allclose(lines[0], [0.1, 0.2, 0.3])  # query (display order) sigma_max
    np.testing.assert_allclose(lines[1], [1 / 9, 2 / 9, 3 / 9])  # query scale * max|lambda|
    np.testing.assert_allclose(lines[2], [0.3, 0.6, 0.9])  # ffn.in sigma_max
    np.testing.assert_allclose(lines[4], [1.0, 2.0, 3.0])  # the bound
    assert ax.lines[0].get_color() == ax.lines[1].get_color() != ax.lines[2].get_color()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["query", "ffn.in", "σ_max(ΔW)", "scale·max|λ|", "bound scale·Σlr"]
    assert len(plots.growth_figure(_evals(adalora=False)).axes[0].lines) == 2  # LoRA: sigma_max only
    assert plots.growth_types([{"step": 1}]) == []


def test_growth_comparison_figure():
    """One panel per module type; LoRA draws sigma_max only, AdaLoRA sigma_max, scale * max|lambda| and the bound."""
    fig = plots.growth_comparison_figure([{"method": "lora", "target_r": 2, "evals": _evals(adalora=False)},
                                          {"method": "adalora", "target_r": 2, "evals": _evals(adalora=True)}])
    axes = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in axes] == ["query", "ffn.in"]
    query = axes[0]
    assert query.get_yscale() == "log"
    labels = [line.get_label() for line in query.lines]
    assert labels == ["lora r=2: σ_max(ΔW)", "adalora r=2: σ_max(ΔW)", "adalora r=2: scale·max|λ|",
                      "adalora r=2: bound scale·Σlr"]
    np.testing.assert_allclose(query.lines[2].get_ydata(), [1 / 9, 2 / 9, 3 / 9])
    np.testing.assert_allclose(query.lines[3].get_ydata(), [1.0, 2.0, 3.0])
    assert [line.get_linestyle() for line in query.lines[1:]] == ["-", "--", ":"]
    assert query.lines[1].get_color() == query.lines[2].get_color() != query.lines[0].get_color()


def test_run_figures_writes_every_figure_of_a_run(tmp_path):
    from fake_runs import write_run

    pattern = {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.0.intermediate.dense": 1}
    run = write_run(tmp_path / "run", task="rte", method="adalora", target_r=2, seed=0, final={"accuracy": 0.8},
                    rank_pattern=pattern, history=True, evals=_evals(adalora=True))
    summary = {"task": "rte", "method": "adalora", "target_r": 2, "seed": 0, "main_metric": "accuracy"}
    paths = plots.run_figures(run, summary)
    assert [Path(p).name for p in paths] == ["rank_heatmap.png", "rank_history.png", "learning_curves.png",
                                             "growth.png"]
    assert all(Path(p).parent == run / "figures" and Path(p).stat().st_size > 5000 for p in paths)
    assert plots.run_title(summary) == "rte / adalora / target_r=2 / seed 0"
    assert plots.run_title({"task": "rte", "method": "full", "target_r": None, "seed": 1}) == "rte / full / seed 1"
    plain = write_run(tmp_path / "full", task="rte", method="full", target_r=2, seed=0, final={"accuracy": 0.8})
    assert [Path(p).name for p in plots.run_figures(plain, summary)] == ["learning_curves.png"]


def test_a_long_heatmap_title_is_wrapped_inside_the_figure():
    """A sweep cell's name with its seed count is wider than the 6-layer heat map: it wraps, not runs off both edges."""
    pattern = {f"encoder.layer.{i}.attention.self.{t}": 2 for i in range(6) for t in ("query", "key", "value")}
    title = "mrpc / adalora optim.lr=0.01 method.orth_reg_weight=0.1 / target_r=2: mean rank over 4 seeds"
    fig = plots.rank_heatmap_figure(pattern, title=title)
    FigureCanvasAgg(fig).draw()
    box, width = fig._suptitle.get_window_extent(), fig.get_figwidth() * fig.dpi
    assert 0 <= box.x0 and box.x1 <= width
    assert fig.get_suptitle().replace("\n", " ") == title


# ---------------------------------------------------------------------------------- step axes


LONG_CELLS = ("lora optim.lr=0.001", "adalora optim.lr=0.003 method.orth_reg_weight=0.3")  # the legend narrows the axes


def _step_figures(monkeypatch, last: int) -> dict:
    """Every figure with a step axis, its steps running to ``last``: {name: (figure, the axes with a step axis)}."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or str(path))
    steps = np.linspace(0, last, 60).round().astype(int)
    evals = [{"step": int(s), "accuracy": 0.5 + 0.3 * k / 60, "eval_loss": 0.7, "sigma_max/query": 0.1 + k,
              "scale_lambda_max/query": 0.1 + k, "growth_bound": 1.0 + k} for k, s in enumerate(steps)]
    train = [{"step": int(s), "loss": 0.7 - 0.3 * k / 60} for k, s in enumerate(steps)]
    plots.learning_curves_plot(train, evals, "l.png", metric="accuracy")
    series = [{"method": m, "target_r": 2, "curves": [[(int(s), 0.5 + 0.001 * k + 0.01 * seed) for k, s in
                                                        enumerate(steps)] for seed in range(3)]} for m in LONG_CELLS]
    plots.sweep_curves_plot(series, "s.png", metric="accuracy")
    learning, sweep = drawn
    names = [f"encoder.layer.{i}.attention.self.query" for i in range(3)]
    history = [{"step": int(s), "budget": 6 - k // 20, "ranks": {n: 2 - (k // 20 if j == 0 else 0) for j, n in
                                                                 enumerate(names)}} for k, s in enumerate(steps)]
    ranks = plots.rank_history_figure(history)
    growth = plots.growth_figure(evals)
    growth_cmp = plots.growth_comparison_figure([{"method": "adalora", "target_r": 2, "evals": evals}])
    return {"learning curves": (learning, learning.axes[:2]), "sweep curves": (sweep, sweep.axes[:1]),
            "rank history": (ranks, ranks.axes[2:3]), "growth": (growth, growth.axes[:1]),
            "growth comparison": (growth_cmp, [ax for ax in growth_cmp.axes if ax.lines])}


@pytest.mark.parametrize("last", [300, 3_450, 12_630, 125_000])
def test_step_tick_labels_do_not_run_together(monkeypatch, last):
    """SST-2 at 6 epochs runs 12,630 steps: its labels at 10,500 and 12,000 ran into each other. Every step axis
    keeps at least three labels, each clear of the next, and writes five-digit steps in thousands."""
    for name, (fig, axes) in _step_figures(monkeypatch, last).items():
        FigureCanvasAgg(fig).draw()
        for ax in axes:
            lo, hi = ax.get_xlim()
            shown = [t for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
            assert len(shown) >= 3, (name, last, [t.get_text() for t in shown])
            boxes = sorted((t.get_window_extent() for t in shown), key=lambda b: b.x0)
            assert all(a.x1 + 2 <= b.x0 for a, b in zip(boxes, boxes[1:])), (name, last, [t.get_text() for t in shown])
            texts = [t.get_text() for t in shown]
            if last >= 10_000:
                assert all(t == "0" or t.endswith("k") for t in texts), (name, texts)
            else:
                assert all(t.replace("−", "-").lstrip("-").isdigit() for t in texts), (name, texts)
