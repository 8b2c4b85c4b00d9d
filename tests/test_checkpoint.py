"""save_adapter / load_adapter: exact round trips, sliced to the kept ranks, with the head."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adalora import (
    AdaLoRAConfig,
    LoRAConfig,
    LoRALinear,
    RankAllocator,
    SVDLinear,
    inject_adapters,
    load_adapter,
    orthogonal_regularization,
    save_adapter,
)
from adalora.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def _train(model, cfg, batch_fn, steps, allocator=True):
    adapters = inject_adapters(model, cfg)
    alloc = None
    if allocator:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alloc = RankAllocator(adapters, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t in range(1, steps + 1):
        loss = batch_fn(model, t) + 0.1 * orthogonal_regularization(adapters)
        loss.backward()
        opt.step()
        if alloc is not None:
            alloc.step(t)
        opt.zero_grad()
    return adapters, alloc, opt


def _bert_loss(batch):
    return lambda model, t: model(**batch).loss


def _mlp_loss(model, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    return F.mse_loss(model(x), y)


def test_adalora_round_trip_after_pruning_is_exact_and_smaller(make_bert, bert_batch, tmp_path):
    cfg = AdaLoRAConfig(init_r=4, target_r=2, target_modules=["query", "value"], modules_to_save=["classifier"],
                        total_steps=20, tinit=2, tfinal=6, delta_t=2)
    model = make_bert(0)
    adapters, alloc, _ = _train(model, cfg, _bert_loss(bert_batch), 16)
    pattern = alloc.rank_pattern()
    assert sum(pattern.values()) == 8 and len(set(pattern.values())) > 1  # uneven ranks, sum = b(T)
    with torch.no_grad():
        want = model(**bert_batch).logits
    folder = save_adapter(tmp_path / "ada", model, cfg, alloc)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files left
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["method"] == "adalora" and meta["rank_pattern"] == pattern
    tensors = load_file(str(folder / WEIGHTS_NAME))
    assert {"classifier.weight", "classifier.bias"} <= set(tensors)
    assert not any("base_layer" in k or "embeddings" in k for k in tensors)
    for name, r in pattern.items():
        assert tensors[f"{name}.lora_A"].shape == (r, 32) and tensors[f"{name}.lora_B"].shape == (32, r)
        assert tensors[f"{name}.lora_E"].shape == (r, 1) and torch.count_nonzero(tensors[f"{name}.lora_E"]) == r
    n_saved = sum(t.numel() for k, t in tensors.items() if "lora_" in k)
    assert n_saved < sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    fresh = make_bert(0)
    with torch.no_grad():
        assert not torch.allclose(fresh(**bert_batch).logits, want)  # the adapter and head matter
    loaded = load_adapter(fresh, folder)
    assert {n: a.r for n, a in loaded.items()} == pattern
    assert all(isinstance(a, SVDLinear) for a in loaded.values())
    for n, a in loaded.items():
        assert a.scale == adapters[n].scale == pytest.approx(16.0 / 4)  # alpha / init_r, not / kept r
    with torch.no_grad():
        torch.testing.assert_close(fresh(**bert_batch).logits, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)


def test_round_trip_after_compaction(make_mlp, tmp_path):
    cfg = AdaLoRAConfig(init_r=4, target_r=2, target_modules=["0", "2"], total_steps=12, tinit=2, tfinal=4)
    model = make_mlp(0)
    _, alloc, opt = _train(model, cfg, _mlp_loss, 10)
    pattern = alloc.compact(opt)
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
    save_adapter(tmp_path / "c", model, cfg, alloc)
    fresh = make_mlp(0)
    loaded = load_adapter(fresh, tmp_path / "c")
    assert {n: a.r for n, a in loaded.items()} == pattern
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=1e-6, rtol=1e-6)


def test_lora_round_trip_keeps_the_head(make_bert, bert_batch, tmp_path):
    cfg = LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], use_rslora=True)
    model = make_bert(0)
    _train(model, cfg, _bert_loss(bert_batch), 3, allocator=False)
    with torch.no_grad():
        want = model(**bert_batch).logits
    save_adapter(tmp_path / "lora", model, cfg)
    assert json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())["method"] == "lora"
    fresh = make_bert(0)
    loaded = load_adapter(fresh, tmp_path / "lora")
    assert all(isinstance(a, LoRALinear) and a.r == 2 for a in loaded.values())
    assert fresh.classifier.weight.requires_grad  # still trainable, as listed in modules_to_save
    with torch.no_grad():
        torch.testing.assert_close(fresh(**bert_batch).logits, want, atol=1e-6, rtol=1e-6)


def test_prune_lora_round_trip(make_mlp, tmp_path):
    cfg = AdaLoRAConfig(init_r=4, target_r=1, target_modules=["0", "2"], adapter="lora", total_steps=12, tinit=2,
                        tfinal=4)
    model = make_mlp(0)
    _, alloc, _ = _train(model, cfg, _mlp_loss, 10)
    assert sum(alloc.rank_pattern().values()) == 2
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
    save_adapter(tmp_path / "pl", model, cfg, alloc)
    fresh = make_mlp(0)
    loaded = load_adapter(fresh, tmp_path / "pl")
    assert {n: a.r for n, a in loaded.items()} == alloc.rank_pattern()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=1e-6, rtol=1e-6)


def test_module_pruned_to_rank_zero_round_trip(make_mlp, tmp_path):
    cfg = AdaLoRAConfig(init_r=2, target_r=1, target_modules=["0", "2"], total_steps=6, tinit=0, tfinal=1,
                        score="magnitude")
    model = make_mlp(0)
    adapters = inject_adapters(model, cfg)
    alloc = RankAllocator(adapters, cfg)
    adapters["0"].lora_E.data.copy_(torch.tensor([[1.0], [2.0]]))
    adapters["2"].lora_E.data.copy_(torch.tensor([[0.1], [0.2]]))
    for t in range(1, 6):
        alloc.step(t)
    assert alloc.rank_pattern() == {"0": 2, "2": 0}
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
    save_adapter(tmp_path / "z", model, cfg, alloc)
    fresh = make_mlp(0)
    loaded = load_adapter(fresh, tmp_path / "z")
    assert loaded["2"].r == 0 and loaded["0"].r == 2
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=1e-6, rtol=1e-6)


def test_load_errors(make_mlp, tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        load_adapter(make_mlp(), tmp_path / "nothing")
    cfg = LoRAConfig(r=2, target_modules=["0", "2"])
    model = make_mlp()
    inject_adapters(model, cfg)
    save_adapter(tmp_path / "m", model, cfg)
    with pytest.raises(Exception, match="match no module"):
        load_adapter(tiny_bert, tmp_path / "m")  # another architecture
    with pytest.raises(ValueError, match="shape"):
        load_adapter(make_mlp(n_in=6), tmp_path / "m")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an adalora adapter"):
        load_adapter(make_mlp(), tmp_path / "bad")
