"""IncreLoRA: the growth plan, growing without changing the model, the exact budget, the optimizer across
growth rounds (advance learning, restart warm-up), compaction and exact resume across a round."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from adalora import ConfigError, IncreLinear, IncreLoRAConfig, RankGrower, inject_increlora, orthogonal_regularization
from adalora.increlora import (
    ADVANCE_E,
    GROUP_KEY,
    module_score,
    plan_growth,
    restart_lr_factor,
    update_importance,
)

TARGETS = ["0", "2", "4", "6"]  # the deep MLP: four modules


def make_cfg(**kw):
    base = dict(init_r=1, target_r=3, lora_alpha=8.0, target_modules=TARGETS, tinit=2, delta_t=3, top_h=2,
                incre_rank_num=3, total_steps=40, orth_reg_weight=0.1, restart_warmup=2)
    return IncreLoRAConfig(**{**base, **kw})


def build(make, cfg, seed=0, lr=1e-2):
    model = make(seed)
    adapters = inject_increlora(model, cfg)
    grower = RankGrower(adapters, cfg, lr=lr, seed=7)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    grower.attach_optimizer(opt)
    return model, adapters, grower, opt


def train_step(model, grower, opt, t, batch, lr=1e-2):
    for g in opt.param_groups:
        g["lr"] = lr
    grower.set_lr(lr)
    x, y = batch
    loss = F.mse_loss(model(x), y)
    reg = grower.regularization()
    (loss if reg is None else loss + reg).backward()
    opt.step()
    info = grower.step(t)
    opt.zero_grad()
    return info


# ---------------------------------------------------------------------------------------------- pure functions
def test_plan_growth_hands_out_exactly_what_is_left():
    imp = torch.tensor([0.1, 0.5, 0.5, 0.9])
    assert plan_growth(imp, total=4, target=20, top_h=2, rank_step=4) == [(3, 4), (1, 4)]  # tie: lower index
    assert plan_growth(imp, total=4, target=10, top_h=3, rank_step=4) == [(3, 4), (1, 2)]  # the rest only
    assert plan_growth(imp, total=10, target=10, top_h=3, rank_step=4) == []
    assert plan_growth(imp, total=0, target=100, top_h=9, rank_step=1) == [(3, 1), (1, 1), (2, 1), (0, 1)]


def test_importance_is_the_ema_product():
    ipt, unc = torch.zeros(2), torch.zeros(2)
    update_importance(ipt, unc, torch.tensor([1.0, 2.0]), 0.85, 0.85)
    torch.testing.assert_close(ipt, torch.tensor([0.15, 0.3]))
    torch.testing.assert_close(unc, 0.15 * torch.tensor([0.85, 1.7]))  # |s - new Ī|
    update_importance(ipt, unc, torch.tensor([0.0, 2.0]), 0.5, 0.5)
    torch.testing.assert_close(ipt, torch.tensor([0.075, 1.15]))
    torch.testing.assert_close(unc, 0.5 * 0.15 * torch.tensor([0.85, 1.7]) + 0.5 * torch.tensor([0.075, 0.85]))


def test_restart_warmup_factor():
    """Added after step 10 with a 4-step warm-up, total 30: factor 0 at its first step (as the authors'
    Multi_LambdaLR), 1 after the warm-up, then linear to 0 at the last step + 1."""
    f = [restart_lr_factor(t, 10, 4, 30) for t in range(11, 31)]
    assert f[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f[-1] == pytest.approx(1 / 16) and all(b < a for a, b in zip(f[4:], f[5:]))
    assert restart_lr_factor(11, 10, 0, 30) == 1.0


def test_module_score_is_the_hook_score(make_mlp):
    """One linear layer, loss = Σ c ⊙ y, so ∂L/∂ΔW = cᵀ x: the hook's score is Σ|ΔW ⊙ cᵀx| / √(out·in)."""
    model = make_mlp(0)
    cfg = IncreLoRAConfig(init_r=2, target_r=3, target_modules=["0"], total_steps=10, tinit=0, delta_t=1)
    adapters = inject_increlora(model, cfg)
    RankGrower(adapters, cfg, seed=0)
    layer = adapters["0"]
    layer.lora_E_parts[0].data.normal_()
    x, c = torch.randn(5, 8), torch.randn(5, 16)
    (model[0](x) * c).sum().backward()
    delta = layer.delta_weight().detach()
    want = (delta * (c.T @ x)).abs().sum() / math.sqrt(16 * 8)
    torch.testing.assert_close(layer.pop_score(), want)
    torch.testing.assert_close(module_score(delta, c.T @ x), want)
    assert layer.score is None


# ---------------------------------------------------------------------------------------------- growing
@pytest.mark.parametrize("advance", [False, True])
def test_growth_leaves_the_model_function_unchanged(make_deep_mlp, batches, advance):
    """scale='fixed': the promoted reserves were in the forward already, so growing changes the output only by
    the new reserve components, λ = 1e-5 each under advance learning and 0 without it."""
    cfg = make_cfg(tinit=0, delta_t=1, scale="fixed", advance_learn=advance)
    model, adapters, grower, opt = build(make_deep_mlp, cfg)
    data = batches(3, n_out=8)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_E_parts[0].normal_()
    train_step(model, grower, opt, 1, data[0])  # s = 0: no growth
    x = data[2][0]
    F.mse_loss(model(data[1][0]), data[1][1]).backward()
    opt.step()
    with torch.no_grad():
        before = model(x)
    n_parts = {n: len(a.part_status) for n, a in adapters.items()}
    info = grower.step(2)  # s = 1 > tinit = 0, 1 % 1 == 0: a growth round
    opt.zero_grad()
    assert info.masked and info.phase in ("grow", "final")
    assert sorted(grower.rank_pattern().values()) == [1, 1, 4, 4]  # top_h = 2 modules got rank_step = 3
    with torch.no_grad():
        after = model(x)
        saved = {}  # the new reserves' λ; the same model with them at 0 isolates what the promotion itself does
        for n, a in adapters.items():
            for j in range(n_parts[n], len(a.part_status)):
                saved[(n, j)] = a.lora_E_parts[j].clone()
                a.lora_E_parts[j].zero_()
        without_new = model(x)
        for (n, j), v in saved.items():
            adapters[n].lora_E_parts[j].copy_(v)
    torch.testing.assert_close(without_new, before, rtol=1e-6, atol=1e-7)  # promotion itself changes nothing
    if advance:
        assert saved and all(torch.equal(v, torch.full((1, 1), ADVANCE_E)) for v in saved.values())
        assert 0 < (after - before).abs().max() < 1e-4
    else:
        assert all(v.item() == 0.0 for v in saved.values()) and saved
        torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-7)


def test_rank_scale_follows_the_current_rank(make_deep_mlp, batches):
    """scale='rank' (the authors): alpha / (r + 1e-5) with r the module's active rank, so growing rescales the
    module's earlier components by r_old / r_new."""
    cfg = make_cfg(tinit=0, delta_t=1)
    model, adapters, grower, opt = build(make_deep_mlp, cfg)
    assert all(a.scale == pytest.approx(8.0 / (1 + 1e-5)) for a in adapters.values())
    data = batches(3, n_out=8)
    for t in (1, 2):
        train_step(model, grower, opt, t, data[t - 1])
    for n, a in adapters.items():
        assert a.scale == 8.0 / (grower.rank_pattern()[n] + 1e-5)
    assert sorted(grower.rank_pattern().values()) == [1, 1, 4, 4]


def test_budget_never_exceeded_and_exact_at_the_end(make_deep_mlp, batches):
    """4 modules, 1 -> 3: 8 ranks to add in rounds of 2 modules x 3; the second round hands out the last 2
    (to one module: the authors would give 3 each to 2 modules and overshoot to 16)."""
    cfg = make_cfg()
    model, adapters, grower, opt = build(make_deep_mlp, cfg)
    data = batches(cfg.total_steps, n_out=8)
    totals, grows = [], []
    for t, batch in enumerate(data, start=1):
        info = train_step(model, grower, opt, t, batch)
        pattern = grower.rank_pattern()
        assert sum(pattern.values()) == info.budget == grower.budget <= 12
        totals.append(info.budget)
        if info.masked:
            grows.append((t, info.budget))
    assert grows == [(4, 10), (7, 12)]  # s = t - 1 > tinit = 2 and s % 3 == 0
    assert all(b >= a for a, b in zip(totals, totals[1:])) and totals[-1] == 12
    assert info.phase == "final"
    for a in adapters.values():
        assert all(st in ("active", "dead") for st in a.part_status)
        dead = [j for j, st in enumerate(a.part_status) if st == "dead"]
        assert all(a.lora_E_parts[j].item() == 0.0 and not a.lora_E_parts[j].requires_grad for j in dead)
        assert not a.scoring


def test_optimizer_carries_on_after_growth(make_deep_mlp, batches):
    """Each round's new Parameters form one param group (warm-up restarting from 0); they receive updates with
    their own Adam state; the reserves' λ stays at 1e-5 while their P and Q learn in advance."""
    cfg = make_cfg()
    model, adapters, grower, opt = build(make_deep_mlp, cfg)
    data = batches(cfg.total_steps, n_out=8)
    reserve = {n: a.lora_A_parts[1].detach().clone() for n, a in adapters.items()}
    for t in range(1, 5):
        train_step(model, grower, opt, t, data[t - 1])
    assert len(opt.param_groups) == 2 and opt.param_groups[1][GROUP_KEY] == 4
    new = opt.param_groups[1]["params"]
    assert new and all(id(p) not in {id(q) for q in opt.param_groups[0]["params"]} for p in new)
    assert all(not adapters[n].lora_A_parts[1].equal(reserve[n]) for n in adapters)  # advance learning
    for a in adapters.values():
        for j, st in enumerate(a.part_status):
            if st == "reserve":
                assert torch.equal(a.lora_E_parts[j].detach(), torch.full((1, 1), ADVANCE_E))
    snapshot = [p.detach().clone() for p in new]
    lrs = []
    for t in range(5, 8):
        train_step(model, grower, opt, t, data[t - 1])
        lrs.append(opt.param_groups[1]["lr"])
    assert lrs == [0.0, 1e-2 * 0.5, 1e-2 * 1.0]  # restart warm-up over 2 steps
    assert all(not p.equal(s) for p, s in zip(new, snapshot))
    assert all(opt.state[p]["step"] == 3 for p in new)  # own Adam state, from its first gradient (at lr 0)
    assert len(opt.param_groups) == 3


def test_compact_removes_dead_reserves(make_deep_mlp, batches):
    cfg = make_cfg()
    model, adapters, grower, opt = build(make_deep_mlp, cfg)
    data = batches(cfg.total_steps, n_out=8)
    for t in range(1, 5):
        train_step(model, grower, opt, t, data[t - 1])
    with pytest.raises(RuntimeError, match="budget"):
        grower.compact()
    for t in range(5, 12):
        train_step(model, grower, opt, t, data[t - 1])
    x = data[0][0]
    with torch.no_grad():
        before = model(x)
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    version = grower.structure_version
    masks = grower.keep_masks()  # over all parts' rows: the active ones, not the dead reserves
    assert {n: m.numel() for n, m in masks.items()} == {n: a.r for n, a in adapters.items()}
    assert {n: int(m.sum()) for n, m in masks.items()} == grower.rank_pattern()
    assert any(not m.all() for m in masks.values())
    pattern = grower.compact()
    assert all(m.all() and m.numel() == pattern[n] for n, m in grower.keep_masks().items())
    assert grower.structure_version == version + 1
    assert all(a.r == pattern[n] == a.n_active for n, a in adapters.items())
    assert sum(len(g["params"]) for g in opt.param_groups) < n_opt
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    for t in range(12, 15):
        train_step(model, grower, opt, t, data[t - 1])


# ---------------------------------------------------------------------------------------------- resume
def _checkpoint(model, opt, grower):
    o, g = io.BytesIO(), io.BytesIO()
    torch.save(opt.state_dict(), o)
    torch.save(grower.state_dict(), g)
    return save({k: v.contiguous() for k, v in model.state_dict().items()}), o.getvalue(), g.getvalue()


def _restore(make, cfg, blobs, lr=1e-2):
    model = make(0)
    adapters = inject_increlora(model, cfg)
    grower = RankGrower(adapters, cfg, lr=lr, seed=99)  # another seed: the saved generator state must win
    grower.load_state_dict(torch.load(io.BytesIO(blobs[2]), weights_only=True))  # grow to the saved parts first
    model.load_state_dict(load(blobs[0]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    grower.attach_optimizer(opt)  # lays the groups out as the saved run had them
    opt.load_state_dict(torch.load(io.BytesIO(blobs[1]), weights_only=True))
    return model, adapters, grower, opt


@pytest.mark.parametrize("split, compact_at", [(3, None), (5, None), (8, None), (13, 12)])
def test_resume_is_bitwise_across_growth(make_deep_mlp, batches, split, compact_at):
    cfg = make_cfg(total_steps=20)
    data = batches(20, n_out=8)

    def run(model, grower, opt, steps):
        for t in steps:
            train_step(model, grower, opt, t, data[t - 1])
            if t == compact_at:
                grower.compact()

    model, _, grower, opt = build(make_deep_mlp, cfg)
    run(model, grower, opt, range(1, 21))
    straight, straight_groups = model.state_dict(), [len(g["params"]) for g in opt.param_groups]

    model, _, grower, opt = build(make_deep_mlp, cfg)
    run(model, grower, opt, range(1, split + 1))
    blobs = _checkpoint(model, opt, grower)
    torch.manual_seed(123)
    model, adapters, grower, opt = _restore(make_deep_mlp, cfg, blobs)
    assert grower.last_step == split
    run(model, grower, opt, range(split + 1, 21))
    resumed = model.state_dict()
    assert [len(g["params"]) for g in opt.param_groups] == straight_groups
    assert straight.keys() == resumed.keys()
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k
    assert sum(grower.rank_pattern().values()) == 12


def test_load_state_dict_after_attach_is_refused(make_deep_mlp):
    cfg = make_cfg()
    _, _, grower, _ = build(make_deep_mlp, cfg)
    with pytest.raises(ValueError, match="state first"):
        grower.load_state_dict(grower.state_dict())


# ---------------------------------------------------------------------------------------------- config, wiring
def test_unreachable_budget_is_a_config_error(make_deep_mlp):
    cfg = make_cfg(total_steps=6)  # the second round would come after step 7
    adapters = inject_increlora(make_deep_mlp(0), cfg)
    with pytest.raises(ConfigError, match="top_h"):
        RankGrower(adapters, cfg)


@pytest.mark.parametrize("kw, field", [(dict(init_r=4, target_r=2), "target_r"), (dict(top_h=0), "top_h"),
                                       (dict(beta1=1.0), "beta1"), (dict(scale="alpha"), "scale"),
                                       (dict(restart_warmup=-1), "restart_warmup")])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        make_cfg(**kw)


def test_growth_needs_the_optimizer(make_deep_mlp, batches):
    cfg = make_cfg(tinit=0, delta_t=1)
    model = make_deep_mlp(0)
    adapters = inject_increlora(model, cfg)
    grower = RankGrower(adapters, cfg)
    x, y = batches(1, n_out=8)[0]
    F.mse_loss(model(x), y).backward()
    grower.step(1)
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        grower.step(2)
    late = RankGrower(inject_increlora(make_deep_mlp(0), cfg), cfg)
    with pytest.raises(ConfigError, match="build it after"):  # an optimizer built before the reserves existed
        late.attach_optimizer(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))


def test_regularizer_covers_all_parts(make_deep_mlp):
    cfg = make_cfg()
    _, adapters, grower, _ = build(make_deep_mlp, cfg)
    a = adapters["0"]
    assert isinstance(a, IncreLinear) and a.r == 1 + cfg.rank_step and a.lora_A.shape == (a.r, 8)
    want = []
    for layer in adapters.values():
        q, p = layer.lora_A.detach(), layer.lora_B.detach()
        want += [torch.linalg.matrix_norm(q @ q.T - torch.eye(q.shape[0])),
                 torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1]))]
    torch.testing.assert_close(grower.regularization(), 0.1 * torch.stack(want).mean())
    torch.testing.assert_close(grower.regularization(), 0.1 * orthogonal_regularization(adapters))


def test_on_tiny_gpt2(make_gpt2, gpt2_batch):
    model = make_gpt2(0)
    cfg = IncreLoRAConfig(init_r=1, target_r=2, target_modules=["c_attn"], tinit=0, delta_t=1, top_h=1,
                          total_steps=6)
    adapters = inject_increlora(model, cfg)
    grower = RankGrower(adapters, cfg, lr=1e-3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    grower.attach_optimizer(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(1, 7):
            grower.set_lr(1e-3)
            (model(**gpt2_batch).loss + grower.regularization()).backward()
            opt.step()
            grower.step(t)
            opt.zero_grad()
    assert grower.rank_pattern() == {n: 2 for n in adapters} and grower.phase == "final"
