"""The shared interface: every controller satisfies AdaptiveMethod; the helpers give each method's hooks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from adalora import (
    AdaLoRAConfig,
    AdaptiveMethod,
    ConfigError,
    IncreLoRAConfig,
    LoRAConfig,
    RankAllocator,
    RankGrower,
    SoRAConfig,
    SoRAGates,
    adaptive,
    inject_method,
    make_controller,
    orthogonal_regularization,
)

TARGETS = ["0", "2"]
CONFIGS = {
    "adalora": lambda: AdaLoRAConfig(init_r=3, target_r=1, target_modules=TARGETS, total_steps=12, tinit=2, tfinal=3),
    "sora": lambda: SoRAConfig(r=3, target_modules=TARGETS, threshold=1e-2),
    "increlora": lambda: IncreLoRAConfig(init_r=1, target_r=2, target_modules=TARGETS, tinit=1, delta_t=2, top_h=1,
                                         total_steps=12),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_runs_through_the_generic_loop(make_mlp, batches, method):
    """The loop of adalora.adaptive's docstring, written once, drives all three methods."""
    cfg = CONFIGS[method]()
    model = make_mlp(0)
    adapters = inject_method(model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl = make_controller(adapters, cfg, lr=1e-2)
    assert isinstance(ctrl, AdaptiveMethod)
    assert type(ctrl) is {"adalora": RankAllocator, "sora": SoRAGates, "increlora": RankGrower}[method]
    own = {id(p) for p in adaptive.own_parameters(ctrl)}
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    opt = torch.optim.AdamW(main, lr=1e-2)
    adaptive.attach_optimizer(ctrl, opt)
    version = adaptive.structure_version(ctrl)
    for t, (x, y) in enumerate(batches(12), start=1):
        for g in opt.param_groups:
            g["lr"] = 1e-2
        adaptive.set_lr(ctrl, 1e-2)
        loss = F.mse_loss(model(x), y)
        reg = adaptive.regularization(ctrl)
        (loss if reg is None else loss + reg).backward()
        torch.nn.utils.clip_grad_norm_(main + adaptive.own_parameters(ctrl), 1.0)
        opt.step()
        info = ctrl.step(t)
        opt.zero_grad()
        adaptive.zero_grad(ctrl)
        if adaptive.structure_version(ctrl) != version:  # new Parameters: rebuild the held list
            version = adaptive.structure_version(ctrl)
            main = [p for g in opt.param_groups for p in g["params"]]
        if info.masked:
            assert sum(ctrl.rank_pattern().values()) == info.budget, t
        masks = ctrl.keep_masks()  # the same meaning for every method: one entry per row, True = in use
        assert {n: m.numel() for n, m in masks.items()} == {n: a.r for n, a in adapters.items()}
        assert {n: int(m.sum()) for n, m in masks.items()} == ctrl.rank_pattern(), t
    assert list(ctrl.rank_pattern()) == TARGETS
    final = sum(ctrl.rank_pattern().values())
    assert final == 2 if method == "adalora" else final == 4 if method == "increlora" else final <= 6
    state = ctrl.state_dict()
    assert isinstance(state, dict) and info.step == 12
    ctrl.compact(opt)


def test_allocator_hooks_through_the_helpers(make_mlp, batches):
    cfg = CONFIGS["adalora"]()
    model = make_mlp(0)
    adapters = inject_method(model, cfg)
    alloc = RankAllocator(adapters, cfg)
    for a in adapters.values():
        a.lora_E.data.normal_()
    want = cfg.orth_reg_weight * orthogonal_regularization(adapters)
    torch.testing.assert_close(adaptive.regularization(alloc), want)
    assert adaptive.own_parameters(alloc) == [] and adaptive.structure_version(alloc) == 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t, (x, y) in enumerate(batches(9), start=1):  # the allocator scores from real gradients
        F.mse_loss(model(x), y).backward()
        opt.step()
        alloc.step(t)
        opt.zero_grad()
    alloc.compact(opt)
    assert adaptive.structure_version(alloc) == 1
    off = AdaLoRAConfig(init_r=3, target_r=1, target_modules=TARGETS, total_steps=12, orth_reg_weight=0.0)
    assert adaptive.regularization(RankAllocator(inject_method(make_mlp(0), off), off)) is None


def test_factory_for_fixed_lora_and_unknown_configs(make_mlp):
    cfg = LoRAConfig(r=2, target_modules=TARGETS)
    adapters = inject_method(make_mlp(0), cfg)
    assert make_controller(adapters, cfg) is None
    with pytest.raises(ConfigError, match="no adaptive method"):
        make_controller(adapters, object())
    with pytest.raises(ConfigError, match="no adapters"):
        inject_method(make_mlp(0), object())
