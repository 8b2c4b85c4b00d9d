"""adalora_lab.plots: module-name parsing and the PNGs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
