"""inject_adapters: target matching, freezing, gradients, modules_to_save, error messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora import (
    AdaLoRAConfig,
    ConfigError,
    LoRAConfig,
    LoRALinear,
    SVDLinear,
    count_trainable,
    inject_adapters,
    trainable_state_dict,
)
from adalora.inject import find_targets

ADA = dict(init_r=4, target_r=2, total_steps=50)


def _grad_names(model):
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_bert_targets_are_wrapped_and_base_frozen(tiny_bert, bert_batch):
    with torch.no_grad():
        before = tiny_bert(**bert_batch).logits
    adapters = inject_adapters(tiny_bert, AdaLoRAConfig(target_modules=["query", "value"], **ADA))
    want = [f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")]
    assert list(adapters) == want
    for name, a in adapters.items():
        assert isinstance(a, SVDLinear) and tiny_bert.get_submodule(name) is a and a.r == 4
    for n, p in tiny_bert.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
    assert count_trainable(tiny_bert) == 4 * (4 * 32 + 4 + 32 * 4)
    with torch.no_grad():
        assert torch.equal(tiny_bert(**bert_batch).logits, before)  # identity at init, whole model


def test_only_adapters_and_modules_to_save_get_gradients(tiny_bert, bert_batch):
    cfg = AdaLoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"], **ADA)
    adapters = inject_adapters(tiny_bert, cfg)
    for a in adapters.values():  # E = 0 at init blocks the gradient of A and B; open it
        a.lora_E.data.fill_(0.1)
    frozen = {n: p.detach().clone() for n, p in tiny_bert.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in tiny_bert.parameters() if p.requires_grad], lr=0.1)
    tiny_bert.train()
    tiny_bert(**bert_batch).loss.backward()
    got = _grad_names(tiny_bert)
    want = {n for n, _ in tiny_bert.named_parameters() if "lora_" in n or n.startswith("classifier.")}
    assert got == want
    for n in got:
        assert tiny_bert.get_parameter(n).grad.abs().sum() > 0, n
    opt.step()
    for n, p in tiny_bert.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the base did not move


def test_gpt2_conv1d_c_attn_targeted_and_trained(tiny_gpt2, gpt2_batch):
    assert isinstance(tiny_gpt2.transformer.h[0].attn.c_attn, Conv1D)
    with torch.no_grad():
        before = tiny_gpt2(**gpt2_batch).logits
    cfg = AdaLoRAConfig(target_modules=["c_attn"], **ADA)
    adapters = inject_adapters(tiny_gpt2, cfg)
    assert list(adapters) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    a = adapters["transformer.h.0.attn.c_attn"]
    assert a.fan_in_fan_out and (a.in_features, a.out_features) == (32, 96)
    assert a.lora_A.shape == (4, 32) and a.lora_B.shape == (96, 4)
    with torch.no_grad():
        assert torch.equal(tiny_gpt2(**gpt2_batch).logits, before)
    opt = torch.optim.AdamW([p for p in tiny_gpt2.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = tiny_gpt2(**gpt2_batch).loss
        loss.backward()
        assert _grad_names(tiny_gpt2) == {n for n, _ in tiny_gpt2.named_parameters() if "lora_" in n}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.count_nonzero(a.lora_E) > 0  # the singular values moved off zero


def test_misspelled_target_lists_close_names(tiny_bert):
    with pytest.raises(ConfigError, match="qurey") as exc:
        inject_adapters(tiny_bert, AdaLoRAConfig(target_modules=["qurey", "value"], **ADA))
    assert "'query'" in str(exc.value)
    assert not any(isinstance(m, SVDLinear) for m in tiny_bert.modules())  # nothing was half-injected
    assert all(p.requires_grad for p in tiny_bert.parameters())


def test_suffix_matches_at_module_boundary_only(make_mlp):
    model = nn.Sequential(make_mlp(), nn.Linear(4, 2))
    # "0" matches "0" (the inner MLP, not linear) and "0.0"; suffixes never match inside a name
    assert find_targets(model, ["1"]) == ["0.1", "1"]
    with pytest.raises(ConfigError, match="not nn.Linear"):
        inject_adapters(model, LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match=r"0\.1 \(ReLU\)"):  # "1" also selects the ReLU "0.1"
        inject_adapters(model, LoRAConfig(r=2, target_modules=["1"]))
    adapters = inject_adapters(model, LoRAConfig(r=2, target_modules=["0.0", "0.2"]))
    assert list(adapters) == ["0.0", "0.2"]
    assert isinstance(model[1], nn.Linear)


def test_regex_targets_keep_linear_layers(tiny_bert):
    adapters = inject_adapters(tiny_bert, LoRAConfig(r=2, target_modules=r".*layer\.1\..*(query|key)"))
    assert list(adapters) == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    assert all(isinstance(a, LoRALinear) and a.lora_mask is None for a in adapters.values())
    with pytest.raises(ConfigError, match="regex"):
        find_targets(tiny_bert, r"nothing\.here")


def test_inject_twice_and_bad_modules_to_save_raise(make_mlp):
    model = make_mlp()
    inject_adapters(model, LoRAConfig(r=2, target_modules=["0", "2"]))
    with pytest.raises(ConfigError, match="already holds adapters"):
        inject_adapters(model, LoRAConfig(r=2, target_modules=["0", "2"]))
    with pytest.raises(ConfigError, match="modules_to_save"):
        inject_adapters(make_mlp(), LoRAConfig(r=2, target_modules=["0"], modules_to_save=["clasifier"]))


def test_rank_pattern_overrides_init_r(make_mlp):
    adapters = inject_adapters(make_mlp(), AdaLoRAConfig(target_modules=["0", "2"], rank_pattern={"2": 6}, **ADA))
    assert adapters["0"].r == 4 and adapters["2"].r == 6
    assert adapters["2"].scale == pytest.approx(16.0 / 6)  # alpha / its own initial rank
    with pytest.raises(ConfigError, match="rank_pattern"):
        inject_adapters(make_mlp(), LoRAConfig(r=2, target_modules=["0"], rank_pattern={"2": 3}))


def test_rank_pattern_zero_builds_an_empty_adapter(make_mlp):
    model = make_mlp()
    adapters = inject_adapters(model, LoRAConfig(r=2, target_modules=["0", "2"], rank_pattern={"0": 0}))
    assert adapters["0"].r == 0 and adapters["2"].r == 2
    model(torch.randn(3, 8)).sum().backward()


def test_prune_lora_injects_gated_lora(make_mlp):
    adapters = inject_adapters(make_mlp(), AdaLoRAConfig(target_modules=["0", "2"], adapter="lora", **ADA))
    for a in adapters.values():
        assert isinstance(a, LoRALinear) and a.lora_mask is not None and torch.equal(a.lora_mask, torch.ones(4))


def test_trainable_state_dict_has_adapters_and_head(tiny_bert):
    inject_adapters(tiny_bert, LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    keys = set(trainable_state_dict(tiny_bert))
    assert keys == {k for k in tiny_bert.state_dict() if "lora_" in k} | {"classifier.weight", "classifier.bias"}
    assert not any("base_layer" in k or "embeddings" in k for k in keys)
