"""transformers.Trainer integration (AdaLoRACallback / AdaLoRATrainer) and PEFT's on-disk AdaLoRA format.

Tiny random BERTs built from configs (conftest ``make_bert``), float32, CPU; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from adalora import (
    AdaLoRAConfig,
    IncreLoRAConfig,
    RankAllocator,
    SoRAConfig,
    inject_adapters,
    inject_method,
    load_adapter,
    make_controller,
    orthogonal_regularization,
)
from adalora.increlora import GROUP_KEY, restart_lr_factor
from adalora.integrations import AdaLoRACallback, AdaLoRATrainer, export_to_peft, import_from_peft, peft_scale

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

TARGETS = ["query", "value", "intermediate.dense"]  # 2 layers x 3 = 6 adapted matrices
N_MODULES = 6


def _dataset(n: int = 64, seq: int = 10, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (seq,), generator=g),
             "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": int(torch.randint(0, 2, (1,), generator=g))} for _ in range(n)]


def _cfg(total: int, **kw) -> AdaLoRAConfig:
    base = dict(init_r=4, target_r=2, lora_alpha=8.0, target_modules=TARGETS, modules_to_save=["classifier"],
                tinit=2, tfinal=3, delta_t=1, orth_reg_weight=0.1, total_steps=total)
    return AdaLoRAConfig(**{**base, **kw})


def _build(make_bert, cfg: AdaLoRAConfig, seed: int = 0):
    model = make_bert(seed)
    torch.manual_seed(seed + 100)  # adapter init
    adapters = inject_adapters(model, cfg)
    return model, adapters, RankAllocator(adapters, cfg)


def _args(tmp_path, max_steps: int, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, report_to=[], use_cpu=True, logging_steps=4, save_strategy="no",
                learning_rate=1e-2, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def _record_steps(allocator: RankAllocator) -> list:
    calls: list = []
    step = allocator.step

    def recording(t=None):
        calls.append(t)
        return step(t)

    allocator.step = recording
    return calls


def test_integrations_import_neither_peft_nor_trainer():
    """peft is a dev dependency only; importing our package (and its integrations namespace) must not pull it."""
    code = ("import sys, adalora, adalora.integrations; from adalora.integrations import export_to_peft; "
            "print('peft' in sys.modules, 'adalora.integrations.hf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# ================================================================================================ Trainer
def test_trainer_drives_allocator_with_optimizer_steps(make_bert, tmp_path):
    """gradient_accumulation_steps=2: the allocator sees t = 1..max_steps once per optimizer step (not per
    micro-batch), reaches target_r * n at the end, the regularizer is in every training micro-batch's loss and the
    budget shows up in the Trainer's logs."""
    T = 12
    cfg = _cfg(T)
    model, adapters, alloc = _build(make_bert, cfg)
    calls = _record_steps(alloc)
    trainer = AdaLoRATrainer(model=model, args=_args(tmp_path, T), train_dataset=_dataset(), allocator=alloc)
    trainer.train()

    assert calls == list(range(1, T + 1))
    assert trainer.state.global_step == T
    assert sum(alloc.rank_pattern().values()) == cfg.target_r * N_MODULES
    assert sum(int((a.lora_E != 0).sum()) for a in adapters.values()) <= cfg.target_r * N_MODULES
    assert trainer.adalora_callback.regularizer_calls == T * 2  # one per micro-batch
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [4, 8, 12]
    assert train_logs[-1]["adalora_budget"] == cfg.target_r * N_MODULES
    assert train_logs[-1]["adalora_kept_rank"] == cfg.target_r * N_MODULES
    assert train_logs[0]["adalora_budget"] > train_logs[-1]["adalora_budget"]


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_regularizer_gradient_enters_once_per_optimizer_step(make_bert, tmp_path, accepts_loss_kwargs):
    """At the first optimizer step (same init, same batches), the accumulated gradients with AdaLoRATrainer minus
    those without the regularizer are exactly orth_reg_weight * dR/dθ with gradient_accumulation_steps=2, both when
    the Trainer leaves the loss to the model's num_items_in_batch (BERT's forward takes **kwargs) and when it divides
    by the accumulation steps itself; evaluation losses stay the task loss."""
    T, gamma = 8, 0.3
    captured = {}

    class Capture(TrainerCallback):
        def __init__(self, key, adapters):
            self.key, self.adapters = key, adapters

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if state.global_step == 0:
                params = [p for a in self.adapters.values() for p in (a.lora_A, a.lora_B)]
                captured[self.key] = [p.grad.clone() for p in params]
                if self.key == "reg":  # dR/dθ at the same (initial) parameters
                    r = gamma * orthogonal_regularization(self.adapters)
                    captured["dR"] = torch.autograd.grad(r, params)

    for key, weight in (("reg", gamma), ("plain", 0.0)):
        cfg = _cfg(T, orth_reg_weight=weight)
        model, adapters, alloc = _build(make_bert, cfg)
        args = _args(tmp_path / key, T, max_grad_norm=0.0)
        trainer = AdaLoRATrainer(model=model, args=args, train_dataset=_dataset(), allocator=alloc,
                                 callbacks=[Capture(key, adapters)])
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
        trainer.train()
    for g_reg, g_plain, d in zip(captured["reg"], captured["plain"], captured["dR"]):
        assert torch.allclose(g_reg - g_plain, d, atol=1e-6, rtol=1e-4)
    assert max(d.abs().max() for d in captured["dR"]) > 1e-3  # the regularizer's gradient is not negligible

    batch = {k: torch.stack([torch.as_tensor(x[k]) for x in _dataset(4)]) for k in ("input_ids", "attention_mask",
                                                                                    "labels")}
    model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.compute_loss(model, batch), model(**batch).loss)


def test_plain_trainer_one_liner_warns_without_regularizer(make_bert, tmp_path):
    T = 10
    model, _, alloc = _build(make_bert, _cfg(T))
    calls = _record_steps(alloc)
    trainer = Trainer(model=model, args=_args(tmp_path, T), train_dataset=_dataset(),
                      callbacks=[AdaLoRACallback(alloc)])
    with pytest.warns(UserWarning, match="orthogonal regularizer is not in the loss"):
        trainer.train()
    assert calls == list(range(1, T + 1))
    assert sum(alloc.rank_pattern().values()) == 2 * N_MODULES
    assert [h["adalora_kept_rank"] for h in trainer.state.log_history if "loss" in h][-1] == 2 * N_MODULES


def test_total_steps_mismatch_fails_at_train_begin(make_bert, tmp_path):
    model, _, alloc = _build(make_bert, _cfg(12))
    trainer = AdaLoRATrainer(model=model, args=_args(tmp_path, 10), train_dataset=_dataset(), allocator=alloc)
    with pytest.raises(ValueError, match=r"total_steps=12.*max_steps=10.*Fix: build the config with total_steps=10"):
        trainer.train()
    assert alloc.last_step == 0


def test_trainer_checks_allocator_and_model(make_bert, tmp_path):
    model, _, alloc = _build(make_bert, _cfg(8))
    with pytest.raises(ValueError, match="needs allocator"):
        AdaLoRATrainer(model=model, args=_args(tmp_path, 8), train_dataset=_dataset())
    other, _, _ = _build(make_bert, _cfg(8))  # the allocator drives adapters of another model object
    trainer = AdaLoRATrainer(model=other, args=_args(tmp_path, 8), train_dataset=_dataset(), allocator=alloc)
    with pytest.raises(ValueError, match="not modules of the model being trained"):
        trainer.train()
    with pytest.raises(TypeError):
        AdaLoRACallback(object())


def test_trainer_resume_restores_allocator_state(make_bert, tmp_path):
    """The allocator's state rides in every Trainer checkpoint: resuming at step 5 of 12 ends exactly where the
    uninterrupted run ends (weights, scores, pattern). Without the saved state resuming is an error."""
    T = 12
    data = _dataset()
    args = dict(save_strategy="steps", save_steps=5)
    model1, _, alloc1 = _build(make_bert, _cfg(T))
    AdaLoRATrainer(model=model1, args=_args(tmp_path, T, **args), train_dataset=data, allocator=alloc1).train()
    ckpt = tmp_path / "checkpoint-5"
    assert (ckpt / "adalora_allocator.pt").exists()

    model2, _, alloc2 = _build(make_bert, _cfg(T))
    calls = _record_steps(alloc2)
    AdaLoRATrainer(model=model2, args=_args(tmp_path, T, **args), train_dataset=data,
                   allocator=alloc2).train(resume_from_checkpoint=str(ckpt))
    assert calls == list(range(6, T + 1))
    assert alloc2.rank_pattern() == alloc1.rank_pattern()
    assert torch.equal(alloc2.final_scores, alloc1.final_scores)
    sd1, sd2 = model1.state_dict(), model2.state_dict()
    assert max((sd1[k] - sd2[k]).abs().max().item() for k in sd1) < 1e-6

    os.remove(ckpt / "adalora_allocator.pt")
    model3, _, alloc3 = _build(make_bert, _cfg(T))
    trainer = AdaLoRATrainer(model=model3, args=_args(tmp_path, T, **args), train_dataset=data, allocator=alloc3)
    with pytest.raises(ValueError, match="resuming at optimizer step 5"):
        trainer.train(resume_from_checkpoint=str(ckpt))


# ================================================================================================ SoRA, IncreLoRA
LR = 1e-2


def _rival(make_bert, method: str, T: int, **kw):
    if method == "sora":
        cfg = SoRAConfig(**{**dict(r=4, lora_alpha=8.0, target_modules=TARGETS, modules_to_save=["classifier"],
                                   threshold=4e-3, l1_weight=1.0), **kw})
    else:
        cfg = IncreLoRAConfig(**{**dict(init_r=1, target_r=3, lora_alpha=8.0, target_modules=TARGETS,
                                        modules_to_save=["classifier"], tinit=1, delta_t=2, top_h=3,
                                        incre_rank_num=1, total_steps=T, restart_warmup=2), **kw})
    model = make_bert(0)
    torch.manual_seed(100)
    adapters = inject_method(model, cfg)
    return model, adapters, make_controller(adapters, cfg, lr=LR)


def _record_lrs(ctrl, optimizer_of) -> list:
    """(t, [lr of every param group], [the step each group was added after]) as the optimizer stepped at t."""
    calls: list = []
    step = ctrl.step

    def recording(t=None):
        groups = optimizer_of().param_groups
        calls.append((t, [g["lr"] for g in groups], [g.get(GROUP_KEY) for g in groups]))
        return step(t)

    ctrl.step = recording
    return calls


def test_trainer_drives_sora(make_bert, tmp_path):
    """The gates stay out of the Trainer's optimizer and are trained by SoRAGates at the main schedule's lr, the
    L1 term is in every training micro-batch's loss, and gates reach 0 (the kept rank shows in the logs)."""
    T = 12
    model, adapters, gates = _rival(make_bert, "sora", T)
    before = gates.gates()
    trainer = AdaLoRATrainer(model=model, args=_args(tmp_path, T, warmup_steps=3), train_dataset=_dataset(),
                             allocator=gates)
    lrs = _record_lrs(gates, lambda: trainer.optimizer)
    gate_lrs = []
    set_lr = gates.set_lr
    gates.set_lr = lambda lr: (set_lr(lr), gate_lrs.append(gates.gate_lr))
    trainer.train()

    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for p in gates.own_parameters())
    assert all(id(a.lora_A) in held and id(a.lora_B) in held for a in adapters.values())
    assert [t for t, _, _ in lrs] == list(range(1, T + 1))
    assert gate_lrs == [lr[0] for _, lr, _ in lrs]  # the gates follow the main schedule (sparse_lr = lr)
    assert gate_lrs[0] < gate_lrs[2] and gate_lrs[-1] < gate_lrs[3]  # warm-up, then the linear decay
    assert trainer.adalora_callback.regularizer_calls == T * 2
    after = gates.gates()
    assert not torch.equal(before, after) and int((after == 0).sum()) > 0
    assert gates.last_step == T
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert train_logs[-1]["adalora_kept_rank"] == int((after != 0).sum()) == gates.budget


def test_plain_trainer_refuses_sora_gates_in_its_optimizer(make_bert, tmp_path):
    model, _, gates = _rival(make_bert, "sora", 4)
    trainer = Trainer(model=model, args=_args(tmp_path, 4), train_dataset=_dataset(),
                      callbacks=[AdaLoRACallback(gates)])
    with pytest.raises(ValueError, match="holds 6 parameters that SoRAGates trains itself.*AdaLoRATrainer"):
        trainer.train()
    assert gates.last_step == 0


@pytest.mark.parametrize("warmup", [2, None])
def test_trainer_drives_increlora_and_the_groups_it_adds(make_bert, tmp_path, warmup):
    """Growth rounds add param groups mid-run: the Trainer's scheduler is extended to them (torch's LambdaLR would
    refuse a step otherwise) and every step runs them at the restart warm-up (or, without it, on the main
    schedule). The grower reaches its target exactly."""
    T = 10
    model, adapters, grower = _rival(make_bert, "increlora", T, restart_warmup=warmup)
    trainer = AdaLoRATrainer(model=model, args=_args(tmp_path, T), train_dataset=_dataset(), allocator=grower)
    lrs = _record_lrs(grower, lambda: trainer.optimizer)
    trainer.train()

    assert [t for t, _, _ in lrs] == list(range(1, T + 1))
    assert [r["step"] for r in grower.rounds] == [3, 5, 7, 9] and grower.done and grower.budget == 3 * N_MODULES
    assert len(trainer.optimizer.param_groups) == 2 + len(grower.rounds)
    assert len(trainer.lr_scheduler.base_lrs) == len(trainer.optimizer.param_groups)
    added = [t for t, lr, at in lrs if len(at) > 2]
    assert added and added[0] == grower.rounds[0]["step"] + 1
    for t, lr, at in lrs:
        assert lr[0] == lr[1] and len(lr) == 2 + sum(r["step"] < t for r in grower.rounds)
        for g_lr, g_at in zip(lr[2:], at[2:]):
            want = LR * restart_lr_factor(t, g_at, warmup, T) if warmup is not None else lr[0]
            assert g_lr == pytest.approx(want, rel=1e-12, abs=1e-15), (t, g_at)
    assert any(g_lr > 0 for _, lr, _ in lrs for g_lr in lr[2:])
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for a in adapters.values() for p in a.parameters() if p.requires_grad)


def test_trainer_resumes_increlora_after_growth(make_bert, tmp_path):
    """Resuming at step 6, after two growth rounds, ends where the uninterrupted run ends: the grower's state comes
    back before the Trainer loads the grown weights and the optimizer with its added groups."""
    T = 10
    args = dict(save_strategy="steps", save_steps=6)
    model1, _, grower1 = _rival(make_bert, "increlora", T)
    AdaLoRATrainer(model=model1, args=_args(tmp_path, T, **args), train_dataset=_dataset(), allocator=grower1).train()
    ckpt = tmp_path / "checkpoint-6"
    saved = torch.load(ckpt / "adalora_allocator.pt", weights_only=True)
    assert len(saved["rounds"]) == 2 and not saved["done"]

    model2, _, grower2 = _rival(make_bert, "increlora", T)
    calls = _record_steps(grower2)
    AdaLoRATrainer(model=model2, args=_args(tmp_path, T, **args), train_dataset=_dataset(),
                   allocator=grower2).train(resume_from_checkpoint=str(ckpt))
    assert calls == list(range(7, T + 1))
    assert grower2.rank_pattern() == grower1.rank_pattern() and grower2.rounds == grower1.rounds
    sd1, sd2 = model1.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert max((sd1[k] - sd2[k]).abs().max().item() for k in sd1) < 1e-6

    model3, _, grower3 = _rival(make_bert, "increlora", T)
    trainer = Trainer(model=model3, args=_args(tmp_path, T, **args), train_dataset=_dataset(),
                      callbacks=[AdaLoRACallback(grower3)])
    # a plain Trainer loads the weights and the optimizer (with the added groups) before any callback runs
    with pytest.raises(ValueError, match="different number of parameter groups"):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_callback_refuses_what_the_trainer_cannot_do(make_bert, tmp_path):
    """One clear error each: IncreLoRA in a distributed Trainer, SoRA under fp16, a controller built for another
    learning rate or another number of steps."""
    from types import SimpleNamespace

    def begin(ctrl, max_steps=8, **kw):
        args = SimpleNamespace(**{**dict(world_size=1, fp16=False, max_steps=max_steps, num_train_epochs=1,
                                         gradient_accumulation_steps=1), **kw})
        AdaLoRACallback(ctrl).on_train_begin(args, SimpleNamespace(max_steps=max_steps, global_step=0), None)

    _, _, grower = _rival(make_bert, "increlora", 10)
    begin(grower, max_steps=10)
    with pytest.raises(ValueError, match="IncreLoRA under a distributed Trainer"):
        begin(grower, max_steps=10, world_size=2)
    _, _, gates = _rival(make_bert, "sora", 8)
    with pytest.raises(ValueError, match="fp16=True is not supported"):
        begin(gates, fp16=True)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2 * LR)
    with pytest.raises(ValueError, match=r"built with lr=0.01 but the Trainer's optimizer peaks at lr=0.02"):
        AdaLoRACallback(gates).on_train_begin(SimpleNamespace(world_size=1, fp16=False), SimpleNamespace(
            max_steps=8, global_step=0), None, optimizer=opt)
    _, _, capped = _rival(make_bert, "sora", 8, target_r=2, total_steps=12)
    with pytest.raises(ValueError, match=r"SoRAConfig.total_steps=12.*max_steps=8.*total_steps=8"):
        begin(capped)
    _, _, staged = _rival(make_bert, "sora", 8, lambda_schedule="linear", max_lambda=1e-2, lambda_num=3,
                          lambda_stage_steps=2, total_steps=4)
    begin(staged)  # 4 steps of the main run + 2 stages of 2
    with pytest.raises(ValueError, match=r"total_steps=4 optimizer steps \+ 4 of later stages.*max_steps=8"):
        begin(staged, max_steps=9)


# ================================================================================================ PEFT format
# PEFT's own loading warns about fan_in_fan_out, a deprecated transformers call, and (RuntimeWarning) that the
# AdaLoRA rank_pattern keys "<module>.lora_E" match no module under LoRA's meaning of rank_pattern; it says the
# same for checkpoints that PEFT itself saved, and resizes by them all the same.
peft_mark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                       "ignore:The following rank_pattern keys:RuntimeWarning")


def _peft():
    return pytest.importorskip("peft")


def _train_ours(model, adapters, alloc, steps: int, seed: int = 1, lr: float = 2e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        ids, labels = torch.randint(0, 100, (8, 10), generator=g), torch.randint(0, 2, (8,), generator=g)
        loss = model(input_ids=ids, labels=labels).loss
        loss = loss + alloc.cfg.orth_reg_weight * orthogonal_regularization(adapters)
        loss.backward()
        opt.step()
        alloc.step(t)
        opt.zero_grad()
    return opt


def _inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (6, 10), generator=g)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def pruned(make_bert):
    """Ours trained 40 steps, init_r 4 -> target_r 1 over 6 matrices: heterogeneous ranks, some 0.
    Returns (fresh copy of the base, trained model, adapters, allocator, cfg, optimizer)."""
    T = 40
    cfg = _cfg(T, target_r=1, tinit=4, tfinal=10)
    model = make_bert(0)
    base = copy.deepcopy(model)
    torch.manual_seed(100)
    adapters = inject_adapters(model, cfg)
    alloc = RankAllocator(adapters, cfg)
    opt = _train_ours(model, adapters, alloc, T)
    return base, model, adapters, alloc, cfg, opt


@peft_mark
def test_export_loads_in_peft_with_same_outputs(pruned, tmp_path):
    peft = _peft()
    base, model, adapters, alloc, cfg, _ = pruned
    ranks = alloc.rank_pattern()
    assert len(set(ranks.values())) > 1 and 0 in ranks.values(), ranks  # heterogeneous, with a rank-0 module
    assert sum(ranks.values()) == N_MODULES
    ids = _inputs()
    ours = _logits(model, ids)
    assert (ours - _logits(copy.deepcopy(base), ids)).abs().max() > 1e-3  # the adapters matter

    export_to_peft(model, cfg, alloc, tmp_path, base_model_name_or_path="tiny-bert")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "ADALORA" and meta["init_r"] == 4 and meta["base_model_name_or_path"] == "tiny-bert"
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in meta["rank_pattern"].items()} == ranks
    assert all(len(v) == 4 for v in meta["rank_pattern"].values())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query"
    assert tensors[f"base_model.model.{name}.lora_A"].shape == (ranks[name], 32)
    assert tensors[f"base_model.model.{name}.lora_B"].shape == (32, ranks[name])
    assert "base_model.model.classifier.weight" in tensors and "base_model.model.classifier.bias" in tensors

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.allclose(_logits(pm, ids), ours, atol=1e-6, rtol=0)
    for n, r in ranks.items():  # PEFT resized every module to its kept rank; ranknum stays init_r
        layer = pm.base_model.model.get_submodule(n)
        assert layer.r["default"] == r and layer.lora_A["default"].shape[0] == r
        assert layer.ranknum["default"].item() == (4.0 if r else 0.0)  # rank 0: an empty layer, adds nothing

    # and back into our layers
    fresh = copy.deepcopy(base)
    adapters2, cfg2 = import_from_peft(fresh, tmp_path)
    assert {n: a.r for n, a in adapters2.items()} == ranks and cfg2.rank_pattern == ranks
    assert (cfg2.init_r, cfg2.target_r, cfg2.lora_alpha, cfg2.total_steps, cfg2.modules_to_save) == \
        (4, 1, 8.0, 40, ["classifier"])
    assert torch.allclose(_logits(fresh, ids), ours, atol=1e-6, rtol=0)
    assert all(p.requires_grad for p in fresh.classifier.parameters())


@peft_mark
def test_export_after_compact_and_exact_scale_folding(pruned, tmp_path):
    """After compact() the kept triplets are the first slots of PEFT's rank_pattern; a non-standard layer scale is
    folded into the exported Λ (E_peft = E * scale / PEFT's scale), so every layer's ΔW equals PEFT's."""
    peft = _peft()
    base, model, adapters, alloc, cfg, opt = pruned
    ids = _inputs()
    alloc.compact(opt)
    name = "bert.encoder.layer.1.intermediate.dense"
    if adapters[name].r == 0:
        name = max(adapters, key=lambda n: adapters[n].r)
    adapters[name].scale = 3.7  # e.g. a user-set scale
    ours = _logits(model, ids)

    export_to_peft(model, cfg, alloc, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    r = adapters[name].r
    assert meta["rank_pattern"][f"{name}.lora_E"] == [True] * r + [False] * (4 - r)
    E = load_file(str(tmp_path / "adapter_model.safetensors"))[f"base_model.model.{name}.lora_E"]
    assert torch.allclose(E, adapters[name].lora_E.detach() * (3.7 / peft_scale(8.0, 4)), rtol=1e-6, atol=0)
    assert peft_scale(8.0, 4) == pytest.approx(8.0 / (4 + 1e-5), rel=1e-7)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.allclose(_logits(pm, ids), ours, atol=1e-6, rtol=0)
    for n, a in adapters.items():
        if a.r:
            theirs = pm.base_model.model.get_submodule(n).get_delta_weight("default")
            assert torch.allclose(theirs, a.delta_weight().detach(), rtol=1e-5, atol=1e-9)


@peft_mark
def test_export_mid_schedule_keeps_revived_singular_values(make_bert, tmp_path):
    """Between masking steps (delta_t=5, stopped at step 17) masked singular values train back; they still act, so
    they are exported and PEFT's outputs equal ours."""
    peft = _peft()
    cfg = _cfg(40, target_r=1, tinit=4, tfinal=10, delta_t=5)
    model = make_bert(0)
    base = copy.deepcopy(model)
    torch.manual_seed(100)
    adapters = inject_adapters(model, cfg)
    alloc = RankAllocator(adapters, cfg)
    _train_ours(model, adapters, alloc, 17)
    export_to_peft(model, cfg, alloc, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    exported = {k.removesuffix(".lora_E"): sum(v) for k, v in meta["rank_pattern"].items()}
    kept = alloc.rank_pattern()
    assert all(exported[n] >= kept[n] for n in kept) and sum(exported.values()) > sum(kept.values())
    ids = _inputs()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.allclose(_logits(pm, ids), _logits(model, ids), atol=1e-6, rtol=0)


@peft_mark
def test_peft_trained_checkpoint_imports_with_same_outputs(make_bert, tmp_path):
    """PEFT trains with its own allocator (steps 1..T), saves; we import into a fresh base: same outputs as PEFT's
    in-memory model and as PeftModel.from_pretrained; exporting the import reproduces PEFT's file bit for bit."""
    peft = _peft()
    T = 30
    model = make_bert(0)
    base = copy.deepcopy(model)
    pcfg = peft.AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=1, lora_alpha=8, target_modules=TARGETS,
                              lora_dropout=0.0, tinit=3, tfinal=8, deltaT=1, total_step=T, orth_reg_weight=0.1)
    torch.manual_seed(100)
    pm = peft.get_peft_model(model, pcfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(1)
    for t in range(1, T + 1):
        ids, labels = torch.randint(0, 100, (8, 10), generator=g), torch.randint(0, 2, (8,), generator=g)
        pm(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(t)
        opt.zero_grad()
    pm.save_pretrained(str(tmp_path / "peft"))
    ids = _inputs()
    theirs = _logits(pm, ids)

    fresh = copy.deepcopy(base)
    adapters, cfg = import_from_peft(fresh, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert {n: a.r for n, a in adapters.items()} == {k.removesuffix(".lora_E"): sum(v) for k, v in saved.items()}
    assert sum(a.r for a in adapters.values()) == N_MODULES  # PEFT's final budget, target_r * n
    assert cfg.orth_reg_weight == 0.1 and cfg.modules_to_save == ["classifier"] and not cfg.prune
    assert all(a.scale == peft_scale(8, 4) for a in adapters.values())
    ours = _logits(fresh, ids)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    loaded = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")), ids)
    assert torch.allclose(ours, loaded, atol=1e-6, rtol=0)
    fresh2 = copy.deepcopy(base)
    load_adapter(fresh2, tmp_path / "peft")  # the same reader under its main name
    assert torch.equal(_logits(fresh2, ids), ours)

    export_to_peft(fresh, cfg, None, tmp_path / "again")
    a, b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again")), ids)
    assert torch.allclose(again, loaded, atol=1e-6, rtol=0)


@peft_mark
def test_gpt2_conv1d_roundtrip(make_gpt2, tmp_path):
    """transformers' Conv1D (weight stored (in, out)): PEFT's fan_in_fan_out layers take the same A, E, B."""
    peft = _peft()
    model = make_gpt2(0)
    base = copy.deepcopy(model)
    cfg = AdaLoRAConfig(init_r=3, target_r=2, lora_alpha=6.0, target_modules=["c_attn", "c_fc"], total_steps=10)
    torch.manual_seed(3)
    adapters = inject_adapters(model, cfg)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_E.normal_()
    ids = _inputs()[:, :8]
    ours = _logits(model, ids)
    export_to_peft(model, cfg, None, tmp_path, task_type="CAUSAL_LM")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.allclose(_logits(pm, ids), ours, atol=1e-5, rtol=0)
    fresh = copy.deepcopy(base)
    import_from_peft(fresh, tmp_path)
    assert torch.allclose(_logits(fresh, ids), ours, atol=1e-5, rtol=0)


def test_export_and_import_errors(make_bert, tmp_path):
    model = make_bert(0)
    cfg = _cfg(10)
    adapters = inject_adapters(model, cfg)
    with pytest.raises(ValueError, match="needs the model"):
        export_to_peft(adapters, cfg, None, tmp_path / "a")
    with pytest.warns(UserWarning, match="task_type='SEQ_CLS'"):
        export_to_peft(adapters, _cfg(10, modules_to_save=[]), None, tmp_path / "a")
    export_to_peft(adapters, _cfg(10, modules_to_save=[]), None, tmp_path / "b", task_type=None)
    with pytest.raises(TypeError, match=r"adapter='lora'\) does not match the SVDLinear"):
        export_to_peft(model, _cfg(10, adapter="lora"), None, tmp_path / "c")

    lora_model = make_bert(0)  # prune-LoRA: plain B A components, written as PEFT's LORA
    inject_adapters(lora_model, _cfg(10, adapter="lora"))
    export_to_peft(lora_model, _cfg(10, adapter="lora"), None, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    with pytest.raises(ValueError, match="already holds adapters"):
        import_from_peft(model, tmp_path / "b")
    with pytest.raises(FileNotFoundError):
        import_from_peft(make_bert(0), tmp_path / "missing")
    (tmp_path / "b" / "adalora_config.json").unlink()  # from here on: a folder as PEFT writes it, no checksums
    meta = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**meta, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only LORA and ADALORA adapters load"):
        import_from_peft(make_bert(0), tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**meta, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        import_from_peft(make_bert(0), tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(meta))
    tensors = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    tensors["base_model.model.bert.nothing.lora_A"] = torch.zeros(1, 32)
    save_file(tensors, str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"'bert.nothing' lacks \['lora_B', 'lora_E'\]"):
        import_from_peft(make_bert(0), tmp_path / "b")
    tensors.update({"base_model.model.bert.nothing.lora_E": torch.zeros(1, 1),
                    "base_model.model.bert.nothing.lora_B": torch.zeros(32, 1)})
    save_file(tensors, str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapted modules \['bert.nothing'\] do not exist"):  # another model
        import_from_peft(make_bert(0), tmp_path / "b")
    (tmp_path / "b" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        import_from_peft(make_bert(0), tmp_path / "b")
