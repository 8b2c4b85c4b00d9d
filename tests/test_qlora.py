"""The 4-bit base: NF4Linear (torchao) under our adapters, quantize/dequantize a model, the benchmark."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adalora import AdaLoRAConfig, LoRAConfig, inject_adapters
from adalora.config import ConfigError

pytest.importorskip("torchao")

from adalora_lab.quant import NF4Linear, dequantize_model, param_bytes, quantize_model  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(conf).eval()


def test_nf4_linear_is_a_close_4bit_linear():
    lin = nn.Linear(256, 128)
    q = NF4Linear.from_linear(lin)
    assert isinstance(q, nn.Linear) and q.weight.shape == lin.weight.shape and q.weight.dtype == torch.float32
    assert not q.weight.requires_grad
    x = torch.randn(4, 256)
    err = (q(x) - lin(x)).norm() / lin(x).norm()
    assert 0 < err < 0.15  # 4 bits per weight: close, not exact
    w = lin.weight.numel()
    assert w / 2 <= param_bytes(q) - 4 * 128 < w / 2 * 1.1  # half a byte per weight + a few % of scales (+ bias)
    assert torch.equal(q.dequantize().weight, q.weight.get_original_weight())


@pytest.mark.parametrize("cfg", [LoRAConfig(r=4, target_modules=["0"]),
                                 AdaLoRAConfig(init_r=4, target_r=2, target_modules=["0"], total_steps=10,
                                               tinit=1, tfinal=1)])
def test_adapters_wrap_nf4_in_fp32_and_train(cfg):
    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(64, 64)))
    adapters = inject_adapters(model, cfg)
    a = adapters["0"]
    assert isinstance(a.base_layer, NF4Linear) and (a.in_features, a.out_features) == (64, 64)
    assert all(p.dtype == torch.float32 for n, p in a.named_parameters() if "lora_" in n)
    with torch.no_grad():
        a.lora_B.normal_()
        if hasattr(a, "lora_E"):
            a.lora_E.fill_(1.0)
    x = torch.randn(3, 64, requires_grad=True)
    model(x).pow(2).sum().backward()
    assert x.grad is not None and a.lora_A.grad is not None and a.lora_A.grad.abs().sum() > 0
    assert a.base_layer.weight.grad is None


def test_quantize_model_keeps_the_head_and_stays_close():
    model = _llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    dense_bytes = param_bytes(model)
    names = quantize_model(model)
    assert len(names) == 2 * len(LLAMA_TARGETS) and "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, NF4Linear)
    assert param_bytes(model) < dense_bytes
    out = model(input_ids=ids).logits
    assert (out - ref).norm() / ref.norm() < 0.2
    inject_adapters(model, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="before injecting"):
        quantize_model(model)


def test_merge_needs_a_dense_base():
    model = _llama()
    quantize_model(model)
    adapters = inject_adapters(model, LoRAConfig(r=4, target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    unmerged = model(input_ids=ids).logits
    with pytest.raises(NotImplementedError):  # W += ΔW is not defined on an NF4 weight
        next(iter(adapters.values())).merge()
    assert dequantize_model(model) == len(adapters)
    assert torch.allclose(model(input_ids=ids).logits, unmerged, atol=1e-5)  # dequantized = what NF4 computed
    for a in adapters.values():
        a.merge()
    assert torch.allclose(model(input_ids=ids).logits, unmerged, atol=1e-4)


def test_gpt2_has_no_linear_to_quantize():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ConfigError, match="Conv1D"):
        quantize_model(model)


def test_bench_counts_the_4bit_base_and_times_both():
    from adalora_lab.bench_qlora import VARIANTS, _child, _timed

    bf16, nf4 = _child("bf16", "quick", "cpu"), _child("nf4", "quick", "cpu")
    assert nf4["linear_bytes"] < bf16["linear_bytes"] / 3  # 4.x bits against 16
    assert nf4["base_bytes"] < bf16["base_bytes"] and nf4["adapter_bytes"] == bf16["adapter_bytes"] > 0
    assert abs(nf4["loss0"] - bf16["loss0"]) < 0.05 * bf16["loss0"]
    times = _timed("quick", torch.device("cpu"))
    assert set(times) == set(VARIANTS) and all(w > 0 and c > 0 for w, c in times.values())


@pytest.mark.slow
def test_bench_qlora_quick_prints_its_tables(capsys):
    from adalora_lab.bench_qlora import main

    assert main(["--quick", "--threads", "1", "--layer-reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "nf4/bf16" in out and "torchao nf4" in out and "our adapters wrap it: yes" in out
