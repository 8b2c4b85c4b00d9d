"""save_adapter / load_adapter: PEFT's own folder format, exact round trips, checksums, atomic writes.

The PEFT direction that matters most, our folder -> ``peft.PeftModel.from_pretrained``, runs in a fresh Python
process that never imports adalora, so nothing of ours in memory can help PEFT load the files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adalora import (
    AdaLoRAConfig,
    IncreLoRAConfig,
    LoRAConfig,
    LoRALinear,
    RankAllocator,
    SoRAConfig,
    SVDLinear,
    adaptive,
    from_pretrained,
    inject_adapters,
    inject_method,
    load_adapter,
    load_config,
    make_controller,
    orthogonal_regularization,
    save_adapter,
    save_pretrained,
)
from adalora.checkpoint import CONFIG_NAME, SIDECAR_NAME, WEIGHTS_NAME, CorruptFileError, atomic_write
from adalora.config import ConfigError

TESTS = Path(__file__).resolve().parent
TARGETS = ["query", "value", "intermediate.dense"]  # 2 layers x 3 = 6 adapted matrices
# PEFT's own loading warns about fan_in_fan_out, a deprecated transformers call, and (RuntimeWarning) that the
# AdaLoRA rank_pattern keys "<module>.lora_E" match no module under LoRA's meaning of rank_pattern; it says the
# same for checkpoints that PEFT itself saved, and resizes by them all the same.
peft_mark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                       "ignore:The following rank_pattern keys:RuntimeWarning")


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


def _random_bert_loss(model, t):
    g = torch.Generator().manual_seed(t)
    ids, labels = torch.randint(0, 100, (8, 10), generator=g), torch.randint(0, 2, (8,), generator=g)
    return model(input_ids=ids, labels=labels).loss


def _mlp_loss(model, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    return F.mse_loss(model(x), y)


def _ids(seed: int = 5, shape=(6, 10)):
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _json(path):
    return json.loads(Path(path).read_text())


# ================================================================================================ round trips
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
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, SIDECAR_NAME])  # no temp
    peft_cfg, side = _json(folder / CONFIG_NAME), _json(folder / SIDECAR_NAME)
    assert peft_cfg["peft_type"] == "ADALORA" and peft_cfg["init_r"] == 4 and peft_cfg["task_type"] is None
    assert peft_cfg["target_modules"] == list(pattern) and peft_cfg["modules_to_save"] == ["classifier"]
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in peft_cfg["rank_pattern"].items()} == pattern
    assert side["method"] == "adalora" and side["rank_pattern"] == pattern and side["compacted"] is False
    assert side["config"]["score"] == "ipt" and side["init_ranks"] == {n: 4 for n in pattern}
    tensors = load_file(str(folder / WEIGHTS_NAME))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(tensors)
    assert not any("base_layer" in k or "embeddings" in k for k in tensors)
    for name, r in pattern.items():
        key = f"base_model.model.{name}"
        assert tensors[f"{key}.lora_A"].shape == (r, 32) and tensors[f"{key}.lora_B"].shape == (32, r)
        assert tensors[f"{key}.lora_E"].shape == (r, 1) and torch.count_nonzero(tensors[f"{key}.lora_E"]) == r
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
        keep = alloc.keep_masks()[n].nonzero().view(-1)
        # Λ is stored times our scale / PEFT's; undoing it returns ours to within one float32 rounding
        torch.testing.assert_close(a.lora_E, adapters[n].lora_E.detach()[keep], rtol=1.2e-7, atol=0)
        assert torch.equal(a.lora_A, adapters[n].lora_A.detach()[keep])
    with torch.no_grad():
        torch.testing.assert_close(fresh(**bert_batch).logits, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert load_config(folder) == cfg  # every field of our config, score variant included


def test_round_trip_after_compaction(make_mlp, tmp_path):
    cfg = AdaLoRAConfig(init_r=4, target_r=2, target_modules=["0", "2"], total_steps=12, tinit=2, tfinal=4,
                        score="sensitivity")
    model = make_mlp(0)
    _, alloc, opt = _train(model, cfg, _mlp_loss, 10)
    pattern = alloc.compact(opt)
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
    save_adapter(tmp_path / "c", model, cfg, alloc)
    side = _json(tmp_path / "c" / SIDECAR_NAME)
    assert side["compacted"] is True and side["rank_pattern"] == pattern
    masks = _json(tmp_path / "c" / CONFIG_NAME)["rank_pattern"]  # compacted: the kept triplets come first
    assert masks == {f"{n}.lora_E": [True] * r + [False] * (4 - r) for n, r in pattern.items()}
    fresh = make_mlp(0)
    loaded = load_adapter(fresh, tmp_path / "c")
    assert {n: a.r for n, a in loaded.items()} == pattern
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=1e-6, rtol=1e-6)
    assert load_config(tmp_path / "c").score == "sensitivity"


def test_lora_round_trip_keeps_the_head(make_bert, bert_batch, tmp_path):
    cfg = LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], use_rslora=True)
    model = make_bert(0)
    _train(model, cfg, _bert_loss(bert_batch), 3, allocator=False)
    with torch.no_grad():
        want = model(**bert_batch).logits
    save_adapter(tmp_path / "lora", model, cfg)
    peft_cfg = _json(tmp_path / "lora" / CONFIG_NAME)
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 2 and peft_cfg["use_rslora"] is True
    assert peft_cfg["rank_pattern"] == {} and peft_cfg["alpha_pattern"] == {}  # every module at r, alpha
    tensors = load_file(str(tmp_path / "lora" / WEIGHTS_NAME))
    name = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert tensors[f"{name}.lora_A.weight"].shape == (2, 32) and tensors[f"{name}.lora_B.weight"].shape == (32, 2)
    fresh = make_bert(0)
    loaded = load_adapter(fresh, tmp_path / "lora")
    assert all(isinstance(a, LoRALinear) and a.r == 2 for a in loaded.values())
    assert fresh.classifier.weight.requires_grad  # still trainable, as listed in modules_to_save
    with torch.no_grad():
        torch.testing.assert_close(fresh(**bert_batch).logits, want, atol=0, rtol=0)  # LoRA tensors: bit for bit
    assert load_config(tmp_path / "lora") == cfg


def test_prune_lora_round_trip_and_rank_zero_lora_modules(make_mlp, tmp_path):
    cfg = AdaLoRAConfig(init_r=4, target_r=1, target_modules=["0", "2"], adapter="lora", total_steps=12, tinit=2,
                        tfinal=4)
    model = make_mlp(0)
    _, alloc, _ = _train(model, cfg, _mlp_loss, 10)
    assert sum(alloc.rank_pattern().values()) == 2
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
    save_adapter(tmp_path / "pl", model, cfg, alloc)
    assert _json(tmp_path / "pl" / CONFIG_NAME)["peft_type"] == "LORA"  # B A components: PEFT's LoRA
    fresh = make_mlp(0)
    loaded = load_adapter(fresh, tmp_path / "pl")
    assert {n: a.r for n, a in loaded.items()} == alloc.rank_pattern()
    assert all(a.lora_mask is not None and a.scale == 16.0 / 4 for a in loaded.values())  # alpha / init_r
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=1e-6, rtol=1e-6)

    # a LoRA module of rank 0 is left out of PEFT's file (PEFT refuses r=0) and comes back from the sidecar
    lcfg = LoRAConfig(r=2, target_modules=["0", "2"], rank_pattern={"0": 0})
    model = make_mlp(0)
    adapters = inject_adapters(model, lcfg)
    torch.nn.init.normal_(adapters["2"].lora_B)
    save_adapter(tmp_path / "z", model, lcfg)
    assert _json(tmp_path / "z" / CONFIG_NAME)["target_modules"] == ["2"]
    fresh = make_mlp(0)
    loaded = load_adapter(fresh, tmp_path / "z")
    assert loaded["0"].r == 0 and loaded["2"].r == 2
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


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


def test_save_pretrained_from_pretrained_and_task_type(make_bert, bert_batch, tmp_path):
    """The PEFT-named pair: from_pretrained returns the model frozen in eval mode, like PeftModel.from_pretrained,
    unless is_trainable=True. task_type lands in both configs; a wrong one is refused."""
    cfg = LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    model = make_bert(0)
    _train(model, cfg, _bert_loss(bert_batch), 2, allocator=False)
    for task in ("SEQ_CLS", "CAUSAL_LM", None):
        folder = save_pretrained(model, tmp_path / str(task), cfg, task_type=task)
        assert _json(folder / CONFIG_NAME)["task_type"] == task == _json(folder / SIDECAR_NAME)["task_type"]
    frozen = from_pretrained(make_bert(0).train(), tmp_path / "SEQ_CLS")
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trainable = from_pretrained(make_bert(0), tmp_path / "SEQ_CLS", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        torch.testing.assert_close(frozen(**bert_batch).logits, model.eval()(**bert_batch).logits, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="task_type='seq_cls'.*SEQ_CLS"):
        save_adapter(tmp_path / "bad", model, cfg, task_type="seq_cls")


def test_reads_the_earlier_adalora_format(make_mlp, tmp_path):
    """Folders written before the PEFT layout (version 1: our JSON in adapter_config.json, unprefixed tensors,
    no checksum) still load."""
    cfg = AdaLoRAConfig(init_r=3, target_r=2, target_modules=["0", "2"], total_steps=9)
    model = make_mlp(0)
    adapters = inject_adapters(model, cfg)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_E.normal_()
    folder = tmp_path / "v1"
    folder.mkdir()
    save_file({f"{n}.{p}": getattr(a, p).detach().clone() for n, a in adapters.items()
               for p in ("lora_A", "lora_E", "lora_B")}, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps({
        "format": "adalora-adapter", "version": 1, "method": "adalora",
        "config": {**cfg.__dict__, "target_modules": ["0", "2"]}, "rank_pattern": {"0": 3, "2": 3},
        "scales": {n: a.scale for n, a in adapters.items()}, "init_ranks": {"0": 3, "2": 3}}))
    x = torch.randn(4, 8)
    fresh = make_mlp(0)
    load_adapter(fresh, folder)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    assert load_config(folder) == cfg


# ================================================================================================ SoRA, IncreLoRA
RIVALS = {  # a high threshold and L1 weight so that gates reach 0 in a few steps; IncreLoRA grows after steps 3, 5
    "sora": lambda: SoRAConfig(r=4, lora_alpha=8.0, target_modules=TARGETS, modules_to_save=["classifier"],
                               threshold=4e-3, l1_weight=1.0),
    "increlora": lambda: IncreLoRAConfig(init_r=1, target_r=3, lora_alpha=8.0, target_modules=TARGETS,
                                         modules_to_save=["classifier"], tinit=1, delta_t=2, top_h=3,
                                         incre_rank_num=1, total_steps=20, restart_warmup=2),
}


def _train_rival(model, cfg, steps, lr=2e-2):
    """The generic loop of adalora.adaptive over ``steps`` random BERT batches; returns (adapters, ctrl, opt)."""
    adapters = inject_method(model, cfg)
    ctrl = make_controller(adapters, cfg, lr=lr)
    own = {id(p) for p in adaptive.own_parameters(ctrl)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in own], lr=lr)
    adaptive.attach_optimizer(ctrl, opt)
    for t in range(1, steps + 1):
        adaptive.set_lr(ctrl, lr)
        reg = adaptive.regularization(ctrl)
        loss = _random_bert_loss(model, t)
        (loss if reg is None else loss + reg).backward()
        opt.step()
        ctrl.step(t)
        opt.zero_grad()
        adaptive.zero_grad(ctrl)
    return adapters, ctrl, opt


def _rival_case(make_bert, method, steps, finish=False):
    cfg = RIVALS[method]()
    model = make_bert(0)
    adapters, ctrl, opt = _train_rival(model, cfg, steps)
    if finish:  # SoRA: drop the zero-gate components; IncreLoRA: grown to the target, dead reserves dropped
        ctrl.compact(opt)
    return cfg, model, adapters, ctrl


@peft_mark
@pytest.mark.parametrize("method, steps, finish", [("sora", 12, False), ("sora", 12, True), ("increlora", 6, False),
                                                    ("increlora", 12, True)])
def test_rival_round_trips_ours_and_peft(make_bert, peft_installed, tmp_path, method, steps, finish):
    """A SoRA run with zero gates, and an IncreLoRA run that has grown (mid-growth, with reserves, or at its target
    and compacted): the folder holds the controller's components only, loads as SVDLinear layers of the saved ranks
    and scales with our exact outputs and config, and PEFT's from_pretrained gives the same logits."""
    cfg, model, adapters, ctrl = _rival_case(make_bert, method, steps, finish)
    kept = {n: int(m.sum()) for n, m in ctrl.keep_masks().items()}
    assert kept == ctrl.rank_pattern()
    if method == "sora":
        assert sum(kept.values()) < 4 * len(adapters)  # some gates reached 0
        assert all(a.scale == 8.0 / 4 for a in adapters.values())  # alpha / r_max, also after compaction
    else:
        assert ctrl.rounds and sum(kept.values()) > len(adapters)  # grown from init_r = 1
        assert ctrl.done == finish and len({a.scale for a in adapters.values()}) > 1  # alpha / current rank
    ids = _ids()
    want = _logits(model, ids)
    folder = save_adapter(tmp_path / method, model, cfg, ctrl, task_type="SEQ_CLS")
    side, peft_cfg = _json(folder / SIDECAR_NAME), _json(folder / CONFIG_NAME)
    assert side["method"] == method and side["compacted"] is finish and peft_cfg["peft_type"] == "ADALORA"
    saved = side["rank_pattern"]
    reserves = {n: sum(1 for st in a.part_status if st == "reserve") for n, a in adapters.items()} \
        if method == "increlora" else dict.fromkeys(adapters, 0)
    assert saved == {n: kept[n] + reserves[n] for n in kept}  # IncreLoRA's reserves still act (λ = 1e-5)
    assert (sum(reserves.values()) > 0) == (method == "increlora" and not finish)
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in peft_cfg["rank_pattern"].items()} == saved
    assert load_config(folder) == cfg

    fresh = make_bert(0)
    loaded = load_adapter(fresh, folder)
    assert all(type(a) is SVDLinear for a in loaded.values())
    assert {n: a.r for n, a in loaded.items()} == saved
    assert {n: a.scale for n, a in loaded.items()} == {n: a.scale for n, a in adapters.items()}
    torch.testing.assert_close(_logits(fresh, ids), want, atol=1e-6, rtol=0)
    frozen = from_pretrained(make_bert(0), folder)
    torch.testing.assert_close(_logits(frozen, ids), want, atol=1e-6, rtol=0)

    ns: dict = {}
    exec(PEFT_LOADER, ns)
    got = ns["peft_results"]({method: {"model": "bert", "folder": str(folder), "ids": ids.tolist()}})[method]
    assert got["cls"] == "PeftModelForSequenceClassification"
    assert {n: r for n, r in got["ranks"].items() if r} == {n: r for n, r in saved.items() if r}
    torch.testing.assert_close(torch.tensor(got["logits"]), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", list(RIVALS))
def test_rival_saved_without_controller_keeps_every_component(make_bert, tmp_path, method):
    cfg, model, adapters, _ = _rival_case(make_bert, method, 6)
    folder = save_adapter(tmp_path / method, model, cfg)
    assert _json(folder / SIDECAR_NAME)["rank_pattern"] == {n: a.r for n, a in adapters.items()}
    fresh = make_bert(0)
    load_adapter(fresh, folder)
    ids = _ids()
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="has no keep_masks"):
        save_adapter(tmp_path / "bad", model, cfg, object())


# ================================================================================================ integrity
def test_bit_flips_are_refused(make_bert, tmp_path):
    cfg = AdaLoRAConfig(init_r=2, target_r=1, target_modules=["query"], modules_to_save=["classifier"],
                        total_steps=10)
    model = make_bert(0)
    inject_adapters(model, cfg)
    good = save_adapter(tmp_path / "good", model, cfg)
    size = (good / WEIGHTS_NAME).stat().st_size
    for where in (size // 2, 40, size - 3):  # in the tensor data, in the JSON header, in the last tensor
        bad = tmp_path / f"flip{where}"
        shutil.copytree(good, bad)
        data = bytearray((bad / WEIGHTS_NAME).read_bytes())
        data[where] ^= 0x10
        (bad / WEIGHTS_NAME).write_bytes(bytes(data))
        with pytest.raises(CorruptFileError, match=rf"{WEIGHTS_NAME} is corrupt") as exc:
            load_adapter(make_bert(0), bad)
        assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    bad = tmp_path / "config"
    shutil.copytree(good, bad)
    text = (bad / CONFIG_NAME).read_text()
    (bad / CONFIG_NAME).write_text(text.replace('"init_r": 2', '"init_r": 3'))
    with pytest.raises(CorruptFileError, match=rf"{CONFIG_NAME} is corrupt"):
        load_adapter(make_bert(0), bad)
    with pytest.raises(CorruptFileError, match=rf"{CONFIG_NAME} is corrupt"):
        load_config(bad)
    # without our sidecar the folder is an ordinary PEFT folder: no checksum to check, and it loads
    (good / SIDECAR_NAME).unlink()
    assert len(load_adapter(make_bert(0), good)) == 2


def test_atomic_write_respects_the_umask(make_mlp, tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        cfg = LoRAConfig(r=2, target_modules=["0"])
        model = make_mlp(0)
        inject_adapters(model, cfg)
        folder = save_adapter(tmp_path / "ad", model, cfg)
        os.umask(0o002)
        atomic_write(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("y"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o664
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o640}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "ad", "b.txt"]  # no temp file left

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.txt", fail)
    assert (tmp_path / "a.txt").read_text() == "x" and len(list(tmp_path.iterdir())) == 3


def test_load_errors(make_mlp, tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        load_adapter(make_mlp(), tmp_path / "nothing")
    cfg = LoRAConfig(r=2, target_modules=["0", "2"])
    model = make_mlp()
    inject_adapters(model, cfg)
    save_adapter(tmp_path / "m", model, cfg)
    with pytest.raises(ValueError, match=r"adapted modules \['0', '2'\] do not exist in BertForSequence"):
        load_adapter(tiny_bert, tmp_path / "m")  # another architecture
    with pytest.raises(ValueError, match="shape"):
        load_adapter(make_mlp(n_in=6), tmp_path / "m")
    with pytest.raises(ConfigError, match="already holds adapters"):
        load_adapter(model, tmp_path / "m")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_NAME).write_text(json.dumps({"peft_type": "IA3"}))
    shutil.copy(tmp_path / "m" / WEIGHTS_NAME, tmp_path / "bad")
    with pytest.raises(ValueError, match="peft_type='IA3'; only LORA and ADALORA"):
        load_adapter(make_mlp(), tmp_path / "bad")
    (tmp_path / "m" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_adapter(make_mlp(), tmp_path / "m")


# ================================================================================================ PEFT
# Loads each saved folder with PEFT alone; run in-process, and as a script in a fresh python (argv: tests folder,
# cases json, output json) that never imports adalora.
PEFT_LOADER = """
import json, sys, warnings
import torch


def peft_results(cases):
    import peft
    from conftest import _bert, _gpt2

    out = {}
    for name, case in cases.items():
        base = {"bert": _bert, "gpt2": _gpt2}[case["model"]](0)
        pm = peft.PeftModel.from_pretrained(base, case["folder"]).eval()
        with torch.no_grad():
            logits = pm(input_ids=torch.tensor(case["ids"])).logits
        ranks = {n: m.r["default"] for n, m in pm.base_model.model.named_modules()
                 if isinstance(getattr(m, "r", 0), dict)}
        out[name] = {"logits": logits.tolist(), "cls": type(pm).__name__, "ranks": ranks}
    return out


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    sys.path.insert(0, sys.argv[1])
    out = peft_results(json.loads(open(sys.argv[2]).read()))
    out["adalora imported"] = "adalora" in sys.modules
    open(sys.argv[3], "w").write(json.dumps(out))
"""
PEFT_CLASSES = {"SEQ_CLS": "PeftModelForSequenceClassification", "CAUSAL_LM": "PeftModelForCausalLM",
                None: "PeftModel"}


@pytest.fixture
def peft_installed():
    return pytest.importorskip("peft")


def _save_cases(tmp_path, make_bert, make_gpt2) -> tuple[dict, dict, dict, dict]:
    """AdaLoRA just masked mid-schedule, AdaLoRA compacted with a user-set scale, LoRA with a rank_pattern and a
    user-set scale, prune-LoRA and a GPT-2 Conv1D rsLoRA, each with a task type and (BERT) the classifier in
    modules_to_save. Returns (cases for PEFT_LOADER, our logits, our kept ranks, task types)."""
    cases, want, ranks, tasks = {}, {}, {}, {}

    def add(name, model, cfg, alloc, task, kind="bert"):
        ids = _ids(shape=(6, 10) if kind == "bert" else (2, 8))
        want[name] = _logits(model, ids)
        folder = save_adapter(tmp_path / name, model, cfg, alloc, task_type=task)
        ranks[name], tasks[name] = _json(folder / SIDECAR_NAME)["rank_pattern"], task
        cases[name] = {"model": kind, "folder": str(folder), "ids": ids.tolist()}

    ada = dict(init_r=4, target_r=1, lora_alpha=8.0, target_modules=TARGETS, modules_to_save=["classifier"],
               tinit=4, tfinal=10, total_steps=40)
    model = make_bert(0)
    _, alloc, _ = _train(model, AdaLoRAConfig(**ada, delta_t=5), _random_bert_loss, 15)
    add("adalora_masked", model, AdaLoRAConfig(**ada, delta_t=5), alloc, "SEQ_CLS")
    masks = _json(tmp_path / "adalora_masked" / CONFIG_NAME)["rank_pattern"]
    assert any(not all(m) for m in masks.values()) and any(any(m) for m in masks.values())  # a real pattern

    model = make_bert(0)
    adapters, alloc, opt = _train(model, AdaLoRAConfig(**ada), _random_bert_loss, 40)
    alloc.compact(opt)
    assert len(set(alloc.rank_pattern().values())) > 1
    for a in adapters.values():  # a user-set scale: folded into PEFT's Λ (the default's factor is only 1 + 2.5e-6)
        a.scale *= 1.5
    add("adalora_compacted", model, AdaLoRAConfig(**ada), alloc, None)

    lcfg = LoRAConfig(r=3, lora_alpha=6.0, target_modules=["query", "value"], modules_to_save=["classifier"],
                      rank_pattern={"bert.encoder.layer.1.attention.self.value": 2})
    model = make_bert(0)
    adapters, _, _ = _train(model, lcfg, _random_bert_loss, 3, allocator=False)
    adapters["bert.encoder.layer.0.attention.self.query"].scale = 0.7  # a user-set scale: PEFT's alpha_pattern
    add("lora", model, lcfg, None, "SEQ_CLS")
    assert _json(tmp_path / "lora" / CONFIG_NAME)["alpha_pattern"] == \
        {"bert.encoder.layer.0.attention.self.query": pytest.approx(0.7 * 3)}

    pcfg = AdaLoRAConfig(**{**ada, "total_steps": 16, "tinit": 2, "tfinal": 4}, adapter="lora")
    model = make_bert(0)
    _, alloc, _ = _train(model, pcfg, _random_bert_loss, 16)
    add("prune_lora", model, pcfg, alloc, "SEQ_CLS")

    gcfg = LoRAConfig(r=2, target_modules=["c_attn", "c_fc"], use_rslora=True)
    model = make_gpt2(0)
    for a in inject_adapters(model, gcfg).values():
        torch.nn.init.normal_(a.lora_B, std=0.1)
    add("gpt2_lora", model, gcfg, None, "CAUSAL_LM", kind="gpt2")
    return cases, want, ranks, tasks


def _check_peft_results(got, want, ranks, tasks):
    assert set(got) == set(want)
    for name, res in got.items():
        assert res["cls"] == PEFT_CLASSES[tasks[name]], name
        assert {n: r for n, r in ranks[name].items() if r} == {n: r for n, r in res["ranks"].items() if r}, name
        torch.testing.assert_close(torch.tensor(res["logits"]), want[name], atol=1e-6, rtol=0, msg=name)


@peft_mark
def test_our_folders_load_in_peft(make_bert, make_gpt2, peft_installed, tmp_path):
    """Each folder loads with PeftModel.from_pretrained at our kept ranks and gives our logits."""
    cases, want, ranks, tasks = _save_cases(tmp_path, make_bert, make_gpt2)
    ns: dict = {}
    exec(PEFT_LOADER, ns)  # the loader the fresh-process test runs, here in this process
    _check_peft_results(ns["peft_results"](cases), want, ranks, tasks)


@pytest.mark.slow  # the child's `import peft` alone takes about 10 s on a shared 2-core machine
@peft_mark
def test_our_folders_load_in_peft_in_a_fresh_process(make_bert, make_gpt2, peft_installed, tmp_path):
    """The same folders, loaded by a fresh python that imports peft and never adalora: nothing of ours in memory
    helps PEFT read them."""
    cases, want, ranks, tasks = _save_cases(tmp_path, make_bert, make_gpt2)
    spec, out = tmp_path / "cases.json", tmp_path / "out.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", PEFT_LOADER, str(TESTS), str(spec), str(out)], check=True, env=env,
                   cwd=tmp_path, timeout=300)
    got = _json(out)
    assert got.pop("adalora imported") is False
    _check_peft_results(got, want, ranks, tasks)


@peft_mark
def test_peft_saved_lora_folder_loads_with_same_outputs(make_bert, peft_installed, tmp_path):
    """PEFT trains a LoRA (rank_pattern, alpha_pattern, SEQ_CLS head) and saves it; load_adapter gives PEFT's
    outputs and a LoRAConfig of the saved ranks."""
    peft = peft_installed
    base = make_bert(0)
    pcfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                           rank_pattern={"layer.0.attention.self.query": 2}, alpha_pattern={"value": 3.0})
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    for t in range(1, 4):
        _random_bert_loss(pm, t).backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(str(tmp_path))
    ids = _ids()
    theirs = _logits(pm, ids)
    fresh = copy.deepcopy(base)
    adapters = load_adapter(fresh, tmp_path)
    assert {n: a.r for n, a in adapters.items()}["bert.encoder.layer.0.attention.self.query"] == 2
    assert adapters["bert.encoder.layer.0.attention.self.value"].scale == 3.0 / 4
    assert adapters["bert.encoder.layer.1.attention.self.query"].scale == 8 / 4
    torch.testing.assert_close(_logits(fresh, ids), theirs, atol=1e-6, rtol=0)
    cfg = load_config(tmp_path)
    assert isinstance(cfg, LoRAConfig) and cfg.r == 4 and cfg.modules_to_save == ["classifier"]
    assert cfg.rank_pattern["bert.encoder.layer.0.attention.self.query"] == 2
