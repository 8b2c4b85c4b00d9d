"""SVDLinear / LoRALinear: identity at init, merge/unmerge, delta_weight, Conv1D layout, rank 0."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora import LoRALinear, SVDLinear

N_IN, N_OUT, R = 6, 5, 3


def _base(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(N_IN, N_OUT)
    layer = Conv1D(N_OUT, N_IN)  # Conv1D(nf=out, nx=in): weight (in, out)
    nn.init.normal_(layer.weight, std=0.5)
    nn.init.normal_(layer.bias, std=0.5)
    return layer


def _make(adapter: str, kind: str, **kw):
    base = _base(kind)
    ref = copy.deepcopy(base)
    layer = SVDLinear(base, R, lora_alpha=4.0, **kw) if adapter == "svd" else LoRALinear(base, R, lora_alpha=4.0, **kw)
    return layer, ref


def _randomise(layer) -> None:
    """A non-trivial adapter: non-zero E for SVD, non-zero B for LoRA."""
    with torch.no_grad():
        if isinstance(layer, SVDLinear):
            layer.lora_E.normal_(std=1.0)
            layer.lora_A.normal_(std=0.5)
            layer.lora_B.normal_(std=0.5)
        else:
            layer.lora_B.normal_(std=0.5)


ADAPTERS = ["svd", "lora"]
KINDS = ["linear", "conv1d"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_identity_at_init(adapter, kind):
    layer, ref = _make(adapter, kind)
    x = torch.randn(2, 4, N_IN)
    assert torch.equal(layer(x), ref(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0
    if adapter == "svd":
        assert torch.count_nonzero(layer.lora_E) == 0
        assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() > 0  # A, B random, only E is zero
    else:
        assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().sum() > 0


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_shapes_and_conv1d_layout(adapter):
    lin, _ = _make(adapter, "linear")
    conv, _ = _make(adapter, "conv1d")
    for layer in (lin, conv):
        assert (layer.in_features, layer.out_features) == (N_IN, N_OUT)
        assert layer.lora_A.shape == (R, N_IN) and layer.lora_B.shape == (N_OUT, R)
        assert layer.delta_weight().shape == layer.base_layer.weight.shape
        assert layer.r == R and layer.init_r == R
    assert not lin.fan_in_fan_out and conv.fan_in_fan_out
    assert conv.base_layer.weight.shape == (N_IN, N_OUT)  # Conv1D keeps (in, out)
    if adapter == "svd":
        assert lin.lora_E.shape == (R, 1)
    names = {n for n, _ in conv.named_parameters()}
    assert {n for n in names if not n.startswith("base_layer.")} == (
        {"lora_A", "lora_E", "lora_B"} if adapter == "svd" else {"lora_A", "lora_B"})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_delta_weight_is_the_forward_change(adapter, kind):
    layer, ref = _make(adapter, kind)
    _randomise(layer)
    x = torch.randn(7, N_IN)
    dw = layer.delta_weight()
    change = x @ dw if kind == "conv1d" else x @ dw.T  # Conv1D stores W as (in, out)
    assert change.abs().max() > 1e-3
    torch.testing.assert_close(layer(x), ref(x) + change, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer(x) - ref(x), layer._adapter_out(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_conv1d_equals_linear_with_transposed_weight(adapter):
    """The same adapter on a Conv1D and on the equivalent nn.Linear (weight transposed) agrees."""
    conv_base = _base("conv1d")
    lin_base = nn.Linear(N_IN, N_OUT)
    with torch.no_grad():
        lin_base.weight.copy_(conv_base.weight.T)
        lin_base.bias.copy_(conv_base.bias)
    cls = SVDLinear if adapter == "svd" else LoRALinear
    conv, lin = cls(conv_base, R, lora_alpha=4.0), cls(lin_base, R, lora_alpha=4.0)
    _randomise(conv)
    lin.load_state_dict({k: v for k, v in conv.state_dict().items() if k.startswith("lora_")}, strict=False)
    x = torch.randn(3, N_IN)
    torch.testing.assert_close(conv(x), lin(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(conv.delta_weight(), lin.delta_weight().T)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_merge_equals_unmerged_and_unmerge_restores(adapter, kind):
    layer, _ = _make(adapter, kind)
    _randomise(layer)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, N_IN)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert not torch.allclose(layer.base_layer.weight, w0)  # the delta went into W
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight(), atol=1e-6, rtol=0)

    def boom(*_args):
        raise AssertionError("a merged layer must not run the adapter path")

    layer._add_adapter = boom
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    del layer._add_adapter
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=1e-6)
    layer.unmerge()  # idempotent
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_svd_scale_and_masking():
    """Masking a triplet (what RankAllocator does) is a zero singular value: it drops out of ΔW, shapes stay."""
    layer, ref = _make("svd", "linear")
    assert layer.scale == pytest.approx(4.0 / R)
    _randomise(layer)
    full = layer.delta_weight().clone()
    with torch.no_grad():
        layer.lora_E[1] = 0.0
    assert not torch.allclose(layer.delta_weight(), full)
    A, E, B = layer.lora_A, layer.lora_E, layer.lora_B
    expected = (B[:, [0, 2]] @ (A[[0, 2]] * E[[0, 2]])) * (4.0 / R)  # the masked triplet contributes nothing
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-6, rtol=1e-5)
    assert layer.r == R  # masking does not change the shapes


def test_lora_scale_rslora_and_gate():
    plain = LoRALinear(nn.Linear(N_IN, N_OUT), 4, lora_alpha=8.0)
    rs = LoRALinear(nn.Linear(N_IN, N_OUT), 4, lora_alpha=8.0, use_rslora=True)
    assert plain.scale == pytest.approx(2.0) and rs.scale == pytest.approx(4.0)
    assert plain.lora_mask is None  # no gate unless asked for (prune-LoRA)
    gated = LoRALinear(nn.Linear(N_IN, N_OUT), R, lora_alpha=4.0, rank_mask=True)
    assert torch.equal(gated.lora_mask, torch.ones(R))
    _randomise(gated)
    full = gated.delta_weight().clone()
    gated.lora_mask[1] = 0.0  # what RankAllocator writes for a pruned component
    A, B = gated.lora_A, gated.lora_B
    torch.testing.assert_close(gated.delta_weight(), (B[:, [0, 2]] @ A[[0, 2]]) * gated.scale, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(gated.delta_weight(), full)
    assert "lora_mask" not in {n for n, _ in gated.named_parameters()}  # a buffer, not trained


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_rank_zero_layer_is_base_and_skips_adapter(adapter):
    base = nn.Linear(N_IN, N_OUT)
    ref = copy.deepcopy(base)
    layer = SVDLinear(base, 0) if adapter == "svd" else LoRALinear(base, 0, rank_mask=True)
    assert layer.r == 0

    def boom(*_args):
        raise AssertionError("rank 0 must skip the adapter matmuls")

    layer._add_adapter = boom
    x = torch.randn(3, N_IN)
    assert torch.equal(layer(x), ref(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0


def test_dropout_only_on_adapter_path():
    layer, ref = _make("svd", "linear", lora_dropout=0.5)
    _randomise(layer)
    x = torch.randn(64, N_IN)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)  # dropout active in training
    layer.eval()
    torch.testing.assert_close(layer(x), ref(x) + x @ layer.delta_weight().T, atol=1e-6, rtol=1e-5)
    layer.lora_E.data.zero_()
    layer.train()
    assert torch.equal(layer(x), ref(x))  # the base path never sees dropout


def test_wraps_only_linear_layers():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        SVDLinear(nn.Conv2d(3, 3, 1), 2)
    layer = SVDLinear(nn.Linear(N_IN, N_OUT), 2)
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias


def test_gradients_reach_all_adapter_parameters():
    layer, _ = _make("svd", "linear")
    with torch.no_grad():
        layer.lora_E.fill_(0.5)
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    layer(torch.randn(4, N_IN)).square().sum().backward()
    for name in ("lora_A", "lora_E", "lora_B"):
        g = getattr(layer, name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert layer.base_layer.weight.grad is None
