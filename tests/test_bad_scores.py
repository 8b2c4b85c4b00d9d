"""The allocator never masks on empty or non-finite scores: gradients None (zero_grad(set_to_none=True) before
``allocator.step``, or no backward), exactly zero, or NaN. ``on_bad_scores="raise"`` stops at the first masking
step with the cause and the fix; ``"skip"`` warns once, keeps the previous mask and keeps NaN out of the EMAs."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from adalora import AdaLoRAConfig, RankAllocator, inject_adapters

TARGETS = ["0", "2", "4", "6"]
FIRST_MASK = 6  # tinit = 4, delta_t = 3: the first masking step
CAUSES = {  # how each bad case is made, and what the error says about it
    "none": "gradients were None",  # zero_grad(set_to_none=True) before allocator.step
    "no_backward": "gradients were None",  # optimizer steps without any backward
    "zero": "exactly 0",  # a loss that does not depend on the adapters
    "nan": "not finite",  # a diverged loss
}


def _cfg(**kw):
    base = dict(init_r=4, target_r=2, lora_alpha=8.0, target_modules=TARGETS, tinit=4, tfinal=8, delta_t=3,
                total_steps=30, orth_reg_weight=0.0)
    return AdaLoRAConfig(**{**base, **kw})


def _build(make_deep_mlp, cfg):
    model = make_deep_mlp(0)
    adapters = inject_adapters(model, cfg)
    alloc = RankAllocator(adapters, cfg)
    with torch.no_grad():  # non-zero singular values, so that masking would visibly zero some
        for a in adapters.values():
            if cfg.adapter == "svd":
                a.lora_E.normal_()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, adapters, alloc, opt


def _step(model, alloc, opt, t, batch, cause):
    """One training step made bad in the way ``cause`` says; returns the allocator's StepInfo."""
    x, y = batch
    loss = F.mse_loss(model(x), y)
    if cause == "zero":
        loss = loss * 0.0
    elif cause == "nan":
        loss = loss * float("nan")
    if cause != "no_backward":
        loss.backward()
    opt.step()
    if cause == "none":
        opt.zero_grad(set_to_none=True)  # the mistake: the allocator sees no gradient
    info = alloc.step(t)
    opt.zero_grad(set_to_none=False)
    return info


@pytest.mark.parametrize("cause", list(CAUSES))
@pytest.mark.parametrize("adapter", ["svd", "lora"])
def test_raise_names_the_cause_at_the_first_masking_step(make_deep_mlp, batches, cause, adapter):
    cfg = _cfg(adapter=adapter)
    assert cfg.on_bad_scores == "raise"  # the default
    model, adapters, alloc, opt = _build(make_deep_mlp, cfg)
    data = batches(FIRST_MASK, n_out=8)
    for t in range(1, FIRST_MASK):  # scoring steps: nothing to complain about yet
        assert not _step(model, alloc, opt, t, data[t - 1], cause).masked
    with pytest.raises(RuntimeError, match=CAUSES[cause]) as exc:
        _step(model, alloc, opt, FIRST_MASK, data[-1], cause)
    msg = str(exc.value)
    assert f"step({FIRST_MASK})" in msg and "Fix:" in msg and "on_bad_scores='skip'" in msg
    if cause in ("none", "no_backward"):
        assert "zero_grad" in msg and "before optimizer.zero_grad()" in msg
    assert bool(alloc.keep.all())  # nothing was masked on those scores
    if adapter == "svd":  # no singular value was zeroed (NaN ones, from the SGD step on a NaN loss, are not 0)
        assert all(int(torch.count_nonzero(a.lora_E)) == a.r for a in adapters.values())
    if adapter == "lora":
        assert all(bool((a.lora_mask == 1).all()) for a in adapters.values())


@pytest.mark.parametrize("cause", list(CAUSES))
def test_skip_warns_once_and_keeps_the_previous_mask(make_deep_mlp, batches, cause):
    cfg = _cfg(on_bad_scores="skip")
    model, adapters, alloc, opt = _build(make_deep_mlp, cfg)
    data = batches(cfg.total_steps, n_out=8)
    infos = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(1, cfg.total_steps + 1):
            infos.append(_step(model, alloc, opt, t, data[t - 1], cause))
    skipped_msgs = [str(w.message) for w in caught if "is skipped" in str(w.message)]
    assert len(skipped_msgs) == 1 and CAUSES[cause] in skipped_msgs[0]  # once, with the cause
    masking = [i for i in infos if i.skipped]
    scheduled = [i for i in infos if i.phase == "final" or (i.phase == "decrease" and i.step % cfg.delta_t == 0)]
    assert [i.step for i in masking] == [i.step for i in scheduled]  # every masking step was skipped ...
    assert not any(i.masked for i in infos)  # ... and none masked
    assert bool(alloc.keep.all()) and alloc.final_keep is None  # the previous (initial) mask stays
    assert alloc.rank_pattern() == dict.fromkeys(TARGETS, 4)
    assert infos[-1].phase == "final" and infos[-1].budget == 8  # the schedule itself goes on
    if cause == "nan":  # the NaN gradients never reached the EMAs
        assert bool(alloc.ema_ipt.isfinite().all()) and bool(alloc.ema_unc.isfinite().all())
        assert any("non-finite gradients" in str(w.message) for w in caught)


def test_skip_leaves_nan_steps_out_of_the_emas(make_deep_mlp):
    """Good, NaN, good gradients under "skip" give exactly the EMAs of the two good steps alone."""
    cfg = _cfg(on_bad_scores="skip", tinit=10, total_steps=40)
    _, adapters, skipping, _ = _build(make_deep_mlp, cfg)
    _, adapters_ref, reference, _ = _build(make_deep_mlp, _cfg(tinit=10, total_steps=40))
    g = torch.Generator().manual_seed(7)
    good = [{(n, k): torch.randn(getattr(a, k).shape, generator=g) for n, a in adapters.items()
             for k in ("lora_A", "lora_E", "lora_B")} for _ in range(2)]

    def feed(ads, alloc, t, grads, nan=False):
        for (n, k), v in grads.items():
            p = getattr(ads[n], k)
            p.grad = v.clone()
            if nan:
                p.grad.view(-1)[0] = float("nan")
        alloc.step(t)

    feed(adapters, skipping, 1, good[0])
    feed(adapters, skipping, 2, good[1], nan=True)  # one NaN entry in every parameter's grad: left out
    feed(adapters, skipping, 3, good[1])
    feed(adapters_ref, reference, 1, good[0])
    feed(adapters_ref, reference, 2, good[1])
    assert torch.equal(skipping.ema_ipt, reference.ema_ipt) and torch.equal(skipping.ema_unc, reference.ema_unc)
    # the same NaN poisons the EMAs of a "raise" allocator for good: its next masking step raises
    feed(adapters_ref, reference, 3, good[1], nan=True)
    assert not bool(reference.ema_ipt.isfinite().all())
    for t in range(4, 12):
        feed(adapters_ref, reference, t, good[0])
    with pytest.raises(RuntimeError, match="not finite"):
        feed(adapters_ref, reference, 12, good[0])  # tinit = 10, delta_t = 3: the first masking step
    # while the skipping allocator reports the dropped step once and masks normally
    for t in range(4, 12):
        feed(adapters, skipping, t, good[0])
    with pytest.warns(UserWarning, match="1 scoring step"):
        feed(adapters, skipping, 12, good[0])
    assert skipping.keep.sum() < skipping.keep.numel()


def test_skip_after_a_good_mask_reapplies_it(make_deep_mlp):
    """Magnitude scores: a good mask, then a NaN singular value: the next mask is skipped and the previous one is
    re-applied (also to a pruned singular value that trained back in between)."""
    cfg = _cfg(on_bad_scores="skip", score="magnitude")
    _, adapters, alloc, _ = _build(make_deep_mlp, cfg)
    for t in range(1, FIRST_MASK + 1):
        info = alloc.step(t)
    assert info.masked and not info.skipped
    kept = alloc.keep.clone()
    pattern = alloc.rank_pattern()
    assert sum(pattern.values()) == info.budget < 16
    masks = alloc.keep_masks()
    pruned_module = next(n for n, m in masks.items() if not m.all())
    kept_module = next(n for n, m in masks.items() if m.any())
    with torch.no_grad():
        adapters[pruned_module].lora_E[int((~masks[pruned_module]).nonzero()[0])] = 5.0  # trained back
        adapters[kept_module].lora_E[int(masks[kept_module].nonzero()[0])] = float("nan")
    alloc.step(FIRST_MASK + 1)
    alloc.step(FIRST_MASK + 2)
    with pytest.warns(UserWarning, match="singular value lora_E is NaN"):
        info = alloc.step(FIRST_MASK + 3)
    assert info.skipped and not info.masked
    assert torch.equal(alloc.keep, kept) and alloc.rank_pattern() == pattern
    assert all(torch.count_nonzero(a.lora_E.view(-1)[~masks[n]]) == 0 for n, a in adapters.items())


def test_skipped_freeze_is_retried_with_the_next_gradients(make_deep_mlp, batches):
    """No usable score before the final phase: the freeze at T - tfinal is skipped; the next step (here after a
    resume from the allocator's state_dict) scores its gradients and fixes the final pattern at the target budget."""
    cfg = _cfg(on_bad_scores="skip")
    model, adapters, alloc, opt = _build(make_deep_mlp, cfg)
    data = batches(cfg.total_steps, n_out=8)
    t_final = cfg.total_steps - cfg.tfinal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(1, t_final + 1):
            info = _step(model, alloc, opt, t, data[t - 1], "none")
    assert info.phase == "final" and info.skipped and alloc.final_keep is None
    state = copy.deepcopy(alloc.state_dict())  # a checkpoint here resumes with the freeze still pending
    alloc = RankAllocator(adapters, cfg)
    alloc.load_state_dict(state)
    info = _step(model, alloc, opt, t_final + 1, data[t_final], "ok")
    assert info.masked and not info.skipped and alloc.final_keep is not None
    assert sum(alloc.rank_pattern().values()) == info.budget == 8
    assert alloc.ema_ipt is None  # scoring is over once the pattern is fixed
    for t in range(t_final + 2, cfg.total_steps + 1):
        assert _step(model, alloc, opt, t, data[t - 1], "ok").masked
    assert sum(alloc.rank_pattern().values()) == 8


def test_guarded_update_is_the_plain_update_on_finite_gradients():
    from adalora.scores import update_importance, update_importance_finite

    g = torch.Generator().manual_seed(3)
    w, grad = torch.randn(500, generator=g), torch.randn(500, generator=g)
    plain = [torch.rand(500, generator=g), torch.rand(500, generator=g)]
    guarded = [t.clone() for t in plain]
    update_importance(w, grad, *plain, 0.85, 0.7)
    assert bool(update_importance_finite(w, grad, *guarded, 0.85, 0.7))
    for a, b in zip(plain, guarded):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    before = [t.clone() for t in guarded]
    for bad in (float("nan"), math.inf, -math.inf):
        grad[17] = bad
        assert not bool(update_importance_finite(w, grad, *guarded, 0.85, 0.7))
        assert all(torch.equal(a, b) for a, b in zip(before, guarded))
