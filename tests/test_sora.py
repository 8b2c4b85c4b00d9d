"""SoRA: the threshold step, the gates' Adam, ranks shrinking, the budget-matched mode, compaction, exact resume."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from adalora import ConfigError, SoRAConfig, SoRAGates, SoRALinear, inject_sora
from adalora.sora import budget_floor, gate_adam_step, lambda_stage, lambda_values, reference_threshold, soft_threshold

TARGETS = ["0", "2"]


def build(make_mlp, lr=1e-2, seed=0, **kw):
    cfg = SoRAConfig(**{**dict(r=4, target_modules=TARGETS, threshold=2e-3, l1_weight=0.5), **kw})
    model = make_mlp(seed)
    adapters = inject_sora(model, cfg)
    gates = SoRAGates(adapters, cfg, lr=lr)
    own = {id(p) for p in gates.own_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in own], lr=lr)
    return model, adapters, gates, opt


def train_step(model, gates, opt, t, batch):
    x, y = batch
    loss = F.mse_loss(model(x), y)
    reg = gates.regularization()
    (loss if reg is None else loss + reg).backward()
    opt.step()
    info = gates.step(t)
    opt.zero_grad()
    return info


# ---------------------------------------------------------------------------------------------- the threshold
def test_soft_threshold_zeroes_exactly_the_small_gates_and_shrinks_the_rest():
    tau = 0.25
    g = torch.cat([torch.tensor([tau, -tau, 0.0, tau * 1.0000001, -tau * 0.9999999, 2 * tau]),
                   torch.randn(200, generator=torch.Generator().manual_seed(0)) * 0.4])
    out = soft_threshold(g, tau)
    small = g.abs() <= tau
    assert small.any() and (~small).any()
    assert torch.count_nonzero(out[small]) == 0
    assert torch.equal(out[~small], g[~small] - tau * torch.sign(g[~small]))  # moved exactly tau towards 0
    assert torch.equal(torch.sign(out[~small]), torch.sign(g[~small]))


def test_reference_threshold_is_the_authors_sequence():
    """Their three masked updates see each other's results: a gate at 1.5 tau is shrunk to 0.5 tau by the first
    and then zeroed by the third (soft thresholding keeps 0.5 tau); above 2 tau both agree."""
    tau = 0.1
    g = torch.tensor([1.5 * tau, -1.5 * tau, 0.5 * tau, 3 * tau, -3 * tau])
    ref, soft = reference_threshold(g, tau), soft_threshold(g, tau)
    assert torch.equal(ref[:3], torch.zeros(3))
    torch.testing.assert_close(soft[:2], torch.tensor([0.5 * tau, -0.5 * tau]))
    torch.testing.assert_close(ref[3:], soft[3:])
    assert torch.count_nonzero(ref) < torch.count_nonzero(soft)


@pytest.mark.parametrize("scale", ["none", "lr"])
def test_step_applies_the_threshold_to_every_gate(make_mlp, scale):
    """With zero gradients the Adam step is 0, so one step is the threshold alone: |g| <= tau become exactly 0,
    the others move exactly tau (tau = xi, or lr * xi for the paper's form)."""
    lr = 0.5
    model, adapters, gates, _ = build(make_mlp, lr=lr, threshold=0.3, threshold_scale=scale, l1_weight=0.0)
    tau = 0.3 * (lr if scale == "lr" else 1.0)
    vals = torch.tensor([[tau], [-tau], [tau * 0.5], [tau * 3.0]])
    for a in adapters.values():
        a.lora_E.data.copy_(vals)
        a.lora_E.grad = torch.zeros_like(a.lora_E)
    info = gates.step(1)
    want = soft_threshold(vals, tau)
    for a in adapters.values():
        assert torch.equal(a.lora_E.detach(), want)
        assert a.lora_E.grad is None  # the gates' gradients are cleared by their own step
    assert gates.rank_pattern() == {"0": 1, "2": 1} and info.budget == 2 and info.masked


def test_gate_adam_matches_the_formula():
    """Two per-gate step counts (a gate that skipped a step keeps its own bias correction)."""
    p = torch.tensor([0.5, -0.2], dtype=torch.float64)
    m, v = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    k = torch.tensor([0, 3])
    want = p.tolist()
    mm, vv, kk = [0.0, 0.0], [0.0, 0.0], [0, 3]
    for grad in ([0.1, -0.3], [0.2, 0.05]):
        gate_adam_step(p, torch.tensor(grad, dtype=torch.float64), m, v, k, 1e-2, (0.9, 0.999), 1e-6)
        for i in range(2):
            kk[i] += 1
            mm[i] = 0.9 * mm[i] + 0.1 * grad[i]
            vv[i] = 0.999 * vv[i] + 0.001 * grad[i] ** 2
            step = 1e-2 * math.sqrt(1 - 0.999 ** kk[i]) / (1 - 0.9 ** kk[i])
            want[i] -= step * mm[i] / (math.sqrt(vv[i]) + 1e-6)
    torch.testing.assert_close(p, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert k.tolist() == [2, 5]


# ---------------------------------------------------------------------------------------------- adapter, ranks
def test_adapter_is_the_authors_init_and_starts_at_the_base_function(make_mlp):
    model = make_mlp(0)
    base = make_mlp(0)
    adapters = inject_sora(model, SoRAConfig(r=4, lora_alpha=16, target_modules=TARGETS))
    a = adapters["0"]
    assert isinstance(a, SoRALinear) and a.scale == 16 / 4
    assert torch.count_nonzero(a.lora_B) == 0 and torch.count_nonzero(a.lora_E) == 4  # B zero, g ~ N(0, 1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{k}" for m in TARGETS for k in "AEB"}


def test_ranks_shrink_as_gates_hit_zero(make_mlp, batches):
    """A threshold well above any Adam step (<= ~3 lr): a zeroed gate cannot come back, so the kept ranks only
    go down; the reported pattern is the count of non-zero gates of each module."""
    model, adapters, gates, opt = build(make_mlp, lr=1e-3, threshold=2e-2, l1_weight=0.0)
    data = batches(80)
    totals, changes = [8], 0
    for t, batch in enumerate(data, start=1):
        info = train_step(model, gates, opt, t, batch)
        pattern = gates.rank_pattern()
        assert pattern == {n: int(torch.count_nonzero(a.lora_E)) for n, a in adapters.items()}
        assert info.budget == sum(pattern.values()) == gates.budget
        changes += info.masked
        assert info.masked == (sum(pattern.values()) != totals[-1])
        totals.append(sum(pattern.values()))
    assert all(b <= a for a, b in zip(totals, totals[1:]))
    assert totals[-1] < 8 and changes >= 1
    assert gates.n_kept_parameters() == sum(r * (a.in_features + a.out_features + 1)
                                            for r, a in zip(gates.rank_pattern().values(), adapters.values()))


def test_unused_module_gate_is_left_alone(make_mlp, batches):
    model, adapters, gates, opt = build(make_mlp)
    before = adapters["2"].lora_E.detach().clone()
    x, y = batches(1, n_out=16)[0]
    F.mse_loss(model[:1](x), y).backward()  # module "2" gets no gradient
    opt.step()
    gates.step(1)
    assert torch.equal(adapters["2"].lora_E.detach(), before)
    assert gates.steps.tolist() == [1] * 4 + [0] * 4


# ---------------------------------------------------------------------------------------------- budget mode
def test_budget_matched_mode_caps_the_nonzero_gates(make_mlp, batches):
    model, adapters, gates, opt = build(make_mlp, threshold=1e-4, target_r=1, total_steps=30, tfinal=10)
    assert gates.target_budget == 2
    for t, batch in enumerate(batches(30), start=1):
        info = train_step(model, gates, opt, t, batch)
        kept = sum(gates.rank_pattern().values())
        if t < 20:
            assert info.phase == "sparsify" and kept > 2  # the tiny threshold alone keeps most gates
        else:
            assert info.phase == "final" and info.budget == 2 and kept == 2
            assert torch.count_nonzero(gates.gates()[gates.frozen]) == 0  # frozen gates stay 0 despite gradients
    x = batches(1)[0][0]
    with torch.no_grad():
        before = model(x)
    pattern = gates.compact(opt)
    assert sum(pattern.values()) == 2 and all(a.r == pattern[n] for n, a in adapters.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)


def test_budget_floor_restores_the_largest_zeroed_gates_only_when_short():
    before = torch.tensor([0.5, -0.05, 0.02, -0.3, 0.01, 0.04])
    after = soft_threshold(before, 0.1)  # 0.4, 0, 0, -0.2, 0, 0: two non-zero
    everyone = torch.ones(6, dtype=torch.bool)
    assert torch.equal(budget_floor(before, after, everyone, 2), after)  # not short: unchanged
    out = budget_floor(before, after, everyone, 4)  # short by 2: the two largest zeroed |before| come back
    assert out.tolist() == pytest.approx([0.4, -0.05, 0.0, -0.2, 0.0, 0.04])
    not_1 = everyone.clone()
    not_1[1] = False  # an ineligible (frozen) gate is never restored, however large
    assert budget_floor(before, after, not_1, 4).tolist() == pytest.approx([0.4, 0.0, 0.02, -0.2, 0.0, 0.04])


def test_budget_matched_mode_never_falls_below_the_budget_and_ends_on_it(make_mlp, batches):
    """A threshold that alone zeroes every gate within a few steps: the floor keeps b = target_r · n non-zero."""
    model, adapters, gates, opt = build(make_mlp, threshold=0.3, target_r=1, total_steps=30, tfinal=10)
    plain = build(make_mlp, threshold=0.3, total_steps=30)
    data = batches(30)
    for t, batch in enumerate(data, start=1):
        train_step(model, gates, opt, t, batch)
        train_step(plain[0], plain[2], plain[3], t, batch)
        assert sum(gates.rank_pattern().values()) >= 2
    assert sum(plain[2].rank_pattern().values()) < 2  # without the floor the same threshold goes below b
    assert sum(gates.rank_pattern().values()) == 2 and gates.budget == 2


# ---------------------------------------------------------------------------------------------- compaction
def test_compact_keeps_outputs_and_slices_optimizer_state(make_mlp, batches):
    model, adapters, gates, opt = build(make_mlp, lr=1e-3, threshold=2e-2, l1_weight=0.0)
    data = batches(60)
    for t in range(1, 41):
        train_step(model, gates, opt, t, data[t - 1])
    pattern = gates.rank_pattern()
    assert 0 < sum(pattern.values()) < 8
    x = data[0][0]
    with torch.no_grad():
        before = model(x)
    keep = {n: (a.lora_E.detach().view(-1) != 0).nonzero().view(-1) for n, a in adapters.items()}
    old_state = {n: opt.state[a.lora_A]["exp_avg"].clone() for n, a in adapters.items()}
    old_adam = gates.exp_avg[gates.gates() != 0].clone()
    version = gates.structure_version
    assert not gates.compacted and {n: int(m.sum()) for n, m in gates.keep_masks().items()} == pattern
    assert gates.compact(opt) == pattern
    assert gates.structure_version == version + 1 and gates.compacted
    assert all(bool(m.all()) for m in gates.keep_masks().values())  # what is left is all in use
    for n, a in adapters.items():
        assert a.r == pattern[n] and a.lora_B.shape == (a.out_features, pattern[n])
        assert torch.equal(opt.state[a.lora_A]["exp_avg"], old_state[n][keep[n]])
    assert torch.equal(gates.exp_avg, old_adam)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    for t in range(41, 61):
        train_step(model, gates, opt, t, data[t - 1])
    assert sum(gates.rank_pattern().values()) <= sum(pattern.values())


# ---------------------------------------------------------------------------------------------- resume
def _checkpoint(model, opt, gates):
    opt_buf, gate_buf = io.BytesIO(), io.BytesIO()
    torch.save(opt.state_dict(), opt_buf)
    torch.save(gates.state_dict(), gate_buf)
    return save({k: v.contiguous() for k, v in model.state_dict().items()}), opt_buf.getvalue(), gate_buf.getvalue()


def _restore(make_mlp, blobs, lr, **kw):
    model, adapters, gates, _ = build(make_mlp, lr=lr, seed=0, **kw)
    gates.load_state_dict(torch.load(io.BytesIO(blobs[2]), weights_only=True))  # may cut the adapters first
    model.load_state_dict(load(blobs[0]))
    own = {id(p) for p in gates.own_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in own], lr=lr)
    opt.load_state_dict(torch.load(io.BytesIO(blobs[1]), weights_only=True))
    return model, adapters, gates, opt


@pytest.mark.parametrize("compact_at", [None, 15])
def test_resume_is_bitwise(make_mlp, batches, compact_at):
    kw = dict(lr=1e-3, threshold=3e-2, l1_weight=0.2)
    data = batches(40)
    model, _, gates, opt = build(make_mlp, **kw)
    for t in range(1, 41):
        train_step(model, gates, opt, t, data[t - 1])
        if t == compact_at:
            gates.compact(opt)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, _, gates, opt = build(make_mlp, **kw)
    for t in range(1, 21):
        train_step(model, gates, opt, t, data[t - 1])
        if t == compact_at:
            gates.compact(opt)
    blobs = _checkpoint(model, opt, gates)
    torch.manual_seed(123)
    model, adapters, gates, opt = _restore(make_mlp, blobs, **kw)
    assert gates.last_step == 20
    for t in range(21, 41):
        train_step(model, gates, opt, t, data[t - 1])
    resumed = model.state_dict()
    assert straight.keys() == resumed.keys()
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k
    if compact_at:
        assert sum(a.r for a in adapters.values()) < 8


# ---------------------------------------------------------------------------------------------- schedule, config
def test_lambda_schedule_values_and_stages(make_mlp):
    assert lambda_values("linear", 0.0, 7e-4, 8) == pytest.approx([i * 1e-4 for i in range(8)])
    ex = lambda_values("exp_linear", 1e-4, 1e-2, 3)
    assert ex == pytest.approx([1e-4, 1e-3, 1e-2])
    lg = lambda_values("log_linear", 0.0, 1.0, 3)
    assert lg[0] == pytest.approx(0.0) and lg[-1] == pytest.approx(1.0)
    assert [lambda_stage(t, 10, 5, 3) for t in (1, 10, 11, 15, 16, 20, 21, 99)] == [0, 0, 1, 1, 2, 2, 2, 2]
    _, _, gates, _ = build(make_mlp, threshold=1e-4, lambda_schedule="linear", max_lambda=3e-4, lambda_num=3,
                           lambda_stage_steps=5, total_steps=10)
    assert [gates.threshold_at(t) for t in (10, 11, 16)] == pytest.approx([1e-4, 2e-4, 3e-4])


@pytest.mark.parametrize("kw, field", [
    (dict(r=0), "r"),
    (dict(r=4, target_r=5, total_steps=10), "target_r"),
    (dict(target_r=2), "total_steps"),
    (dict(lambda_schedule="linear", lambda_stage_steps=5, total_steps=10), "max_lambda"),
    (dict(threshold=-1.0), "threshold"),
    (dict(prox="hard"), "prox"),
    (dict(target_r=2, total_steps=10, tfinal=10), "tfinal"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        SoRAConfig(**kw)


def test_gates_need_a_learning_rate(make_mlp):
    cfg = SoRAConfig(r=2, target_modules=TARGETS)
    adapters = inject_sora(make_mlp(0), cfg)
    with pytest.raises(ConfigError, match="lr="):
        SoRAGates(adapters, cfg)
    gates = SoRAGates(adapters, SoRAConfig(r=2, target_modules=TARGETS, sparse_lr=2e-3), lr=1e-3)
    gates.set_lr(5e-4)  # the main schedule at half its peak: the gates follow at sparse_lr * 0.5
    assert gates.gate_lr == pytest.approx(1e-3)
    alone = SoRAGates(adapters, SoRAConfig(r=2, target_modules=TARGETS, sparse_lr=2e-3))
    assert alone.gate_lr == 2e-3  # sparse_lr throughout; following a schedule needs the main peak lr
    with pytest.raises(ConfigError, match=r"SoRAGates\(adapters, cfg, lr=<optimizer lr>\)"):
        alone.set_lr(5e-4)


def test_mask_state_carries_gates_moments_and_frozen_mask(make_mlp, batches):
    """What distributed.sync_controller broadcasts: another controller that takes it holds the same gates, Adam
    moments and frozen mask, and says whether the set of non-zero gates changed."""
    data = batches(12)
    kw = dict(threshold=2e-2, l1_weight=0.5, target_r=2, total_steps=12, tfinal=4)
    model, adapters, gates, opt = build(make_mlp, **kw)
    for t in range(1, 11):
        train_step(model, gates, opt, t, data[t - 1])
    assert gates.capped and gates.frozen.any()
    other_model, other_adapters, other, _ = build(make_mlp, seed=1, **kw)
    state = {k: v.clone() for k, v in gates.mask_state().items()}
    assert other.set_mask_state(state) is True  # a fresh run's gates are all non-zero
    assert torch.equal(other.gates(), gates.gates()) and torch.equal(other.frozen, gates.frozen)
    assert torch.equal(other.exp_avg, gates.exp_avg) and torch.equal(other.exp_avg_sq, gates.exp_avg_sq)
    assert other.set_mask_state(state) is False and other.rank_pattern() == gates.rank_pattern()
    with pytest.raises(ValueError, match="compact alike"):
        other.set_mask_state({**state, "gates": state["gates"][:-1]})


def test_on_tiny_bert(make_bert, bert_batch):
    model = make_bert(0)
    cfg = SoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    adapters = inject_sora(model, cfg)
    gates = SoRAGates(adapters, cfg, lr=1e-3)
    own = {id(p) for p in gates.own_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in own], lr=1e-3)
    for t in range(1, 4):
        (model(**bert_batch).loss + gates.regularization()).backward()
        opt.step()
        gates.step(t)
        opt.zero_grad()
    assert list(gates.rank_pattern()) == list(adapters) and len(adapters) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gates.step(4).step == 4
