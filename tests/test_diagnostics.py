"""Spectral diagnostics: the cheap exact σ_max(ΔW) against the dense one, scale·max|λ|, the per-type summary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adalora import AdaLoRAConfig, LoRAConfig, LoRALinear, SVDLinear, inject_adapters
from adalora.diagnostics import (
    delta_spectral_norm,
    growth_bound,
    lambda_spectral_bound,
    module_type,
    spectral_report,
    summarize_by_type,
)


def _dense_sigma(adapter) -> float:
    return float(torch.linalg.matrix_norm(adapter.delta_weight().detach(), ord=2))


def _randomise(adapter, g, e_scale=1.0):
    with torch.no_grad():
        adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g))
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g))
        if isinstance(adapter, SVDLinear):
            adapter.lora_E.copy_(torch.randn(adapter.lora_E.shape, generator=g) * e_scale)


# (in, out, r): tall, wide, r above out (R_B is not square), r above both
SHAPES = [(16, 24, 4), (40, 8, 6), (12, 3, 5), (4, 5, 7)]


@pytest.mark.parametrize("n_in, n_out, r", SHAPES)
def test_svd_sigma_max_equals_dense_matrix_norm(n_in, n_out, r):
    g = torch.Generator().manual_seed(n_in * 100 + r)
    for trial in range(5):
        layer = SVDLinear(nn.Linear(n_in, n_out), r, lora_alpha=8.0)
        _randomise(layer, g, e_scale=10.0 ** (trial - 2))
        torch.testing.assert_close(float(delta_spectral_norm(layer)), _dense_sigma(layer), rtol=1e-5, atol=0)


@pytest.mark.parametrize("n_in, n_out, r", SHAPES)
@pytest.mark.parametrize("gated", [False, True])
def test_lora_sigma_max_equals_dense_matrix_norm(n_in, n_out, r, gated):
    g = torch.Generator().manual_seed(7 + r)
    layer = LoRALinear(nn.Linear(n_in, n_out), r, lora_alpha=4.0, use_rslora=gated, rank_mask=gated)
    _randomise(layer, g)
    if gated:  # prune-LoRA: some rank components gated off
        layer.lora_mask[: r // 2] = 0.0
    torch.testing.assert_close(float(delta_spectral_norm(layer)), _dense_sigma(layer), rtol=1e-5, atol=0)


def test_conv1d_and_rank_zero(tiny_gpt2):
    adapters = inject_adapters(tiny_gpt2, AdaLoRAConfig(init_r=3, target_r=1, target_modules=["c_attn"],
                                                        rank_pattern={"transformer.h.1.attn.c_attn": 0}))
    g = torch.Generator().manual_seed(1)
    a0, a1 = adapters["transformer.h.0.attn.c_attn"], adapters["transformer.h.1.attn.c_attn"]
    _randomise(a0, g)
    assert a0.fan_in_fan_out  # ΔW stored (in, out): the norm is the same
    torch.testing.assert_close(float(delta_spectral_norm(a0)), _dense_sigma(a0), rtol=1e-5, atol=0)
    assert a1.r == 0 and float(delta_spectral_norm(a1)) == 0.0 == float(lambda_spectral_bound(a1))


def test_scale_lambda_max_is_sigma_max_for_orthonormal_factors():
    """scale · max|λ| is exactly that, and it equals σ_max(ΔW) when P and Q are orthonormal (only then)."""
    g = torch.Generator().manual_seed(3)
    layer = SVDLinear(nn.Linear(10, 12), 4, lora_alpha=6.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.linalg.qr(torch.randn(10, 4, generator=g)).Q.T)  # orthonormal rows
        layer.lora_B.copy_(torch.linalg.qr(torch.randn(12, 4, generator=g)).Q)  # orthonormal columns
        layer.lora_E.copy_(torch.tensor([[0.5], [-3.0], [2.0], [0.0]]))
    assert float(lambda_spectral_bound(layer)) == pytest.approx(layer.scale * 3.0, rel=1e-7)
    assert layer.scale == 6.0 / 4
    torch.testing.assert_close(float(delta_spectral_norm(layer)), layer.scale * 3.0, rtol=1e-5, atol=0)
    with torch.no_grad():
        layer.lora_B.mul_(2.0)  # no longer orthonormal: σ_max doubles, the λ value does not move
    torch.testing.assert_close(float(delta_spectral_norm(layer)), 2 * layer.scale * 3.0, rtol=1e-5, atol=0)
    assert float(lambda_spectral_bound(layer)) == pytest.approx(layer.scale * 3.0, rel=1e-7)
    with pytest.raises(TypeError, match="SVDLinear"):
        lambda_spectral_bound(LoRALinear(nn.Linear(4, 4), 2))


def test_module_type_names():
    assert module_type("bert.encoder.layer.3.attention.self.query") == "query"
    assert module_type("roberta.encoder.layer.0.attention.self.value_proj") == "value"
    assert module_type("bert.encoder.layer.11.attention.output.dense") == "attn.out"
    assert module_type("bert.encoder.layer.11.intermediate.dense") == "ffn.in"
    assert module_type("bert.encoder.layer.11.output.dense") == "ffn.out"
    assert module_type("transformer.h.2.attn.c_attn") == "attn.c_attn"
    assert module_type("model.layers.5.mlp.down_proj") == "mlp.down_proj"
    assert module_type("2") == "linear" and module_type("blocks.4") == "blocks"
    assert module_type("classifier") == "classifier"


def test_module_type_agrees_with_the_heat_map_rows():
    """The summary's types are the rank heat map's rows (adalora_lab.plots places modules by module_type)."""
    plots = pytest.importorskip("adalora_lab.plots")
    names = [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")] + ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "0"]
    _, _, index = plots.module_grid(names)
    assert {n: module_type(n) for n in names} == {n: typ for n, (_, typ) in index.items()}


def test_report_and_summary_on_a_bert(tiny_bert):
    cfg = AdaLoRAConfig(init_r=4, target_r=2, target_modules=["query", "value", "intermediate.dense"])
    adapters = inject_adapters(tiny_bert, cfg)
    g = torch.Generator().manual_seed(5)
    for a in adapters.values():
        _randomise(a, g)
    report = spectral_report(adapters)
    assert list(report) == list(adapters)
    for name, row in report.items():
        assert row["sigma_max"] == pytest.approx(_dense_sigma(adapters[name]), rel=1e-5)
        assert row["scale_lambda_max"] == pytest.approx(float(lambda_spectral_bound(adapters[name])))
    summary = summarize_by_type(report)
    assert list(summary) == ["query", "value", "ffn.in"]
    for typ, agg in summary.items():
        rows = [r for n, r in report.items() if module_type(n) == typ]
        assert len(rows) == 2  # one per layer
        assert agg == {k: max(r[k] for r in rows) for k in ("sigma_max", "scale_lambda_max")}
    lora = inject_adapters(type(tiny_bert)(tiny_bert.config), LoRAConfig(r=2, target_modules=["query"]))
    assert set(next(iter(spectral_report(lora).values()))) == {"sigma_max"}  # no λ for plain LoRA


def test_growth_bound_against_adam_from_zero():
    """Adam's first step moves every λ by exactly lr, so scale·max|λ| == scale·lr; after 30 steps of a decaying
    schedule it is of the size scale·Σlr (below Kingma & Ba's worst case (1 − β1)/√(1 − β2) times it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    adapters = inject_adapters(model, AdaLoRAConfig(init_r=4, target_r=2, target_modules=["0", "2"]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-12)  # eps << |g|
    lrs = [1e-2 * (1 - i / 40) for i in range(30)]  # a decaying schedule
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for i, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if i == 0:
            for a in adapters.values():
                assert float(lambda_spectral_bound(a)) == pytest.approx(growth_bound(a.scale, lr), rel=1e-5)
    worst = (1 - 0.9) / (1 - 0.999) ** 0.5
    for a in adapters.values():
        bound = growth_bound(a.scale, sum(lrs))
        assert bound == pytest.approx(a.scale * sum(lrs))
        assert 0.3 * bound < float(lambda_spectral_bound(a)) < worst * bound
