"""RankAllocator: scores, budget at every masking step, ties, revival, robustness, dtype moves,
resume, compaction."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from adalora import AdaLoRAConfig, RankAllocator, budget_schedule, inject_adapters, orthogonal_regularization
from adalora.layers import SVDLinear

TARGETS = ["0", "2", "4", "6"]  # the deep MLP: "0" and "6" share a shape, so the flat layout is reordered


def deep_cfg(**kw):
    base = dict(init_r=4, target_r=2, lora_alpha=8.0, target_modules=TARGETS, tinit=4, tfinal=8, delta_t=3,
                total_steps=40, orth_reg_weight=0.1)
    return AdaLoRAConfig(**{**base, **kw})


def build(make, cfg, seed=0, lr=1e-2, opt_cls=torch.optim.AdamW):
    model = make(seed)
    adapters = inject_adapters(model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alloc = RankAllocator(adapters, cfg)
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, adapters, alloc, opt


def train_step(model, adapters, alloc, opt, t, batch, cfg, forward=None):
    x, y = batch
    out = model(x) if forward is None else forward(x)
    loss = F.mse_loss(out, y)
    if cfg.orth_reg_weight:
        loss = loss + cfg.orth_reg_weight * orthogonal_regularization(adapters)
    loss.backward()
    opt.step()
    info = alloc.step(t)
    opt.zero_grad()
    return loss.item(), info


def masked_E_are_zero(adapters, alloc):
    masks = alloc.keep_masks()
    return all(torch.count_nonzero(a.lora_E.view(-1)[~masks[n]]) == 0 for n, a in adapters.items())


# ---------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("score, adapter", [("ipt", "svd"), ("sensitivity", "svd"), ("magnitude", "svd"),
                                            ("ipt", "lora"), ("sensitivity", "lora")])
@pytest.mark.parametrize("tfinal", [0, 8])
def test_kept_rank_equals_budget_at_every_masking_step(make_deep_mlp, batches, score, adapter, tfinal):
    cfg = deep_cfg(score=score, adapter=adapter, tfinal=tfinal)
    model, adapters, alloc, opt = build(make_deep_mlp, cfg)
    n_masks, seen_below_init = 0, False
    for t, batch in enumerate(batches(cfg.total_steps, n_out=8), start=1):
        _, info = train_step(model, adapters, alloc, opt, t, batch, cfg)
        expect = budget_schedule(t, init_budget=16, target_budget=8, tinit=cfg.tinit, tfinal=tfinal,
                                 total_steps=cfg.total_steps, delta_t=cfg.delta_t)
        assert (info.budget, info.masked, info.phase) == (expect.budget, expect.mask, expect.phase), t
        pattern = alloc.rank_pattern()
        assert list(pattern) == TARGETS
        if t <= cfg.tinit:
            assert pattern == dict.fromkeys(TARGETS, 4)
        if info.masked:
            n_masks += 1
            assert sum(pattern.values()) == info.budget, t
            seen_below_init |= info.budget < 16
            if adapter == "svd":
                assert masked_E_are_zero(adapters, alloc), t
                # rank_pattern is reported for the right module: it counts that module's non-zero E
                assert {n: int(torch.count_nonzero(a.lora_E)) for n, a in adapters.items()} == pattern, t
            else:
                masks = alloc.keep_masks()
                for n, a in adapters.items():
                    assert torch.equal(a.lora_mask.bool(), masks[n]), t
    assert seen_below_init and n_masks >= 5
    assert info.phase == "final" and sum(alloc.rank_pattern().values()) == 8 == cfg.target_r * len(adapters)
    assert alloc.budget == 8


def test_final_budget_exact_with_all_scores_tied(make_deep_mlp, batches):
    """Every triplet scores the same (non-zero) value; the global top-b still keeps exactly b (kthvalue would keep
    none). Equal EMAs decayed by zero gradients with beta = 0.5 stay dyadic, so the ties are exact in float."""
    cfg = deep_cfg(tfinal=0, orth_reg_weight=0.0, beta1=0.5, beta2=0.5)
    model, adapters, alloc, opt = build(make_deep_mlp, cfg)
    for a in adapters.values():
        a.lora_E.data.fill_(1.0)
    alloc.ema_ipt.fill_(1.0)
    alloc.ema_unc.fill_(1.0)
    for t, (x, _) in enumerate(batches(cfg.total_steps, n_out=8), start=1):
        (model(x).sum() * 0.0).backward()  # gradients exist and are exactly zero
        opt.step()
        info = alloc.step(t)
        opt.zero_grad()
        if info.masked:
            assert sum(alloc.rank_pattern().values()) == info.budget, t
            scores = alloc.triplet_scores()
            assert scores[0] > 0 and torch.equal(scores, scores[:1].expand(16)), t  # really all tied
            k = 16 - info.budget
            if k:  # the reference's rule "mask S <= kthvalue(S, k)" would mask all 16
                assert int((scores <= torch.kthvalue(scores, k).values).sum()) == 16
    assert sum(alloc.rank_pattern().values()) == 8


def test_ties_at_threshold_keep_exactly_budget(make_mlp):
    """Magnitude score with equal |E| across modules: exactly b survive, and the final pattern is b(T)."""
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=12, tinit=0, tfinal=0,
                        delta_t=1, score="magnitude")
    _, adapters, alloc, _ = build(make_mlp, cfg)
    adapters["0"].lora_E.data.copy_(torch.tensor([[2.0], [1.0], [1.0]]))
    adapters["2"].lora_E.data.copy_(torch.tensor([[1.0], [1.0], [0.5]]))
    for t in range(1, 13):
        info = alloc.step(t)
        assert sum(alloc.rank_pattern().values()) == info.budget
    assert alloc.rank_pattern() == {"0": 2, "2": 0}  # the 2.0 and one of the tied 1.0s
    assert torch.equal(adapters["0"].lora_E.view(-1), torch.tensor([2.0, 1.0, 0.0]))  # ties go to the lower index


# ---------------------------------------------------------------------------------------------- scores
def test_scores_match_hand_computation(make_deep_mlp):
    """Two scoring steps with known gradients; the kept set equals the top-b of the formula (facts §2)."""
    cfg = deep_cfg(tinit=1, delta_t=1, total_steps=10, tfinal=2, beta1=0.7, beta2=0.6)
    model, adapters, alloc, _ = build(make_deep_mlp, cfg)
    g = torch.Generator().manual_seed(5)
    for a in adapters.values():
        a.lora_E.data.normal_(generator=g)
    names = ("lora_A", "lora_E", "lora_B")
    ema_i = {(n, k): torch.zeros_like(getattr(a, k)) for n, a in adapters.items() for k in names}
    ema_u = {key: torch.zeros_like(v) for key, v in ema_i.items()}
    for t in (1, 2):
        for n, a in adapters.items():
            for k in names:
                p = getattr(a, k)
                p.grad = torch.randn(p.shape, generator=g)
                ipt = (p.detach() * p.grad).abs()
                ema_i[n, k] = 0.7 * ema_i[n, k] + 0.3 * ipt
                ema_u[n, k] = 0.6 * ema_u[n, k] + 0.4 * (ipt - ema_i[n, k]).abs()
        if t == 2:
            expected = {}
            for n in adapters:
                s = {k: ema_i[n, k] * ema_u[n, k] for k in names}
                expected[n] = s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0)
            got = alloc.triplet_scores()  # before step 2's update: compare after the step below
        info = alloc.step(t)
    assert info.masked and info.budget < 16
    # the scores after step 2 are the formula's
    torch.testing.assert_close(torch.sort(alloc.triplet_scores()).values,
                               torch.sort(torch.cat(list(expected.values()))).values, rtol=1e-5, atol=0)
    assert not torch.allclose(torch.sort(got).values, torch.sort(alloc.triplet_scores()).values)
    flat = torch.cat([expected[n] for n in adapters])
    top = torch.zeros(16, dtype=torch.bool)
    top[torch.topk(flat, info.budget).indices] = True
    want = dict(zip(adapters, top.split(4)))
    got_masks = alloc.keep_masks()
    for n in adapters:
        assert torch.equal(got_masks[n], want[n]), n


def test_sensitivity_only_score_is_ema_of_sensitivity(make_mlp):
    cfg = AdaLoRAConfig(init_r=2, target_r=1, target_modules=["0", "2"], total_steps=10, tinit=3,
                        score="sensitivity", beta1=0.5)
    _, adapters, alloc, _ = build(make_mlp, cfg)
    assert alloc.ema_unc is None
    a = adapters["2"]
    for p in (a.lora_A, a.lora_E, a.lora_B):
        p.data.fill_(2.0)
        p.grad = torch.full_like(p, 3.0)
    alloc.step(1)
    # only module "2" has gradients: S = 0.5 * 6 for E + mean over A row + mean over B column
    expect = torch.tensor([0.0, 0.0, 9.0, 9.0])
    torch.testing.assert_close(torch.sort(alloc.triplet_scores()).values, expect)


# ---------------------------------------------------------------------------------------------- revival
def test_masked_triplet_revives_before_final_phase(make_mlp):
    """Scores move between masking steps (here set through the EMA buffers): a triplet masked at
    one step is kept at a later one, and its module's kept rank goes down then up."""
    cfg = AdaLoRAConfig(init_r=4, target_r=2, target_modules=["0", "2"], total_steps=20, tinit=0, tfinal=5,
                        delta_t=2)
    _, adapters, alloc, _ = build(make_mlp, cfg)
    n_trip = 8
    pos = alloc.layout.order.index("2") * 4  # triplet 0 of module "2" in the flat triplet order
    for a in adapters.values():
        a.lora_E.data.fill_(1.0)

    def set_scores(low: bool):
        alloc.ema_ipt.zero_()
        alloc.ema_unc.zero_()
        alloc.ema_ipt[:n_trip] = 1.0
        alloc.ema_unc[:n_trip] = 1.0
        alloc.ema_ipt[pos] = alloc.ema_unc[pos] = 0.0 if low else 100.0

    set_scores(low=True)
    alloc.step(1)
    info = alloc.step(2)  # no gradients: the EMAs only decay, the order is kept
    assert info.masked and info.budget < 8
    assert not alloc.keep_masks()["2"][0] and adapters["2"].lora_E[0].item() == 0.0
    rank_before = alloc.rank_pattern()["2"]
    assert rank_before < 4
    set_scores(low=False)
    info = alloc.step(4)
    assert info.masked and info.phase == "decrease"
    assert alloc.keep_masks()["2"][0]  # revived
    set_scores(low=True)
    alloc.ema_ipt[pos + 1:pos + 4] = alloc.ema_unc[pos + 1:pos + 4] = 50.0  # module "2" now outranks "0"
    alloc.step(6)
    assert alloc.rank_pattern()["2"] > rank_before  # down, then up


def test_masked_singular_value_keeps_training_and_can_come_back(make_mlp, batches):
    """With magnitude scores: a masked E_i is zeroed, the optimizer moves it again, and a large |E_i|
    set between masking steps brings the triplet back."""
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=30, tinit=0, tfinal=10,
                        delta_t=5, score="magnitude", orth_reg_weight=0.0)
    model, adapters, alloc, opt = build(make_mlp, cfg)
    e = adapters["0"].lora_E
    e.data.copy_(torch.tensor([[1e-4], [1.0], [1.0]]))
    adapters["2"].lora_E.data.fill_(1.0)
    data = batches(30, n_in=8, n_out=4)
    for t in range(1, 6):
        train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)
    assert not alloc.keep_masks()["0"][0] and e[0].item() == 0.0
    a_row, b_col = adapters["0"].lora_A[0].detach().clone(), adapters["0"].lora_B[:, 0].detach().clone()
    assert a_row.abs().sum() > 0 and b_col.abs().sum() > 0  # masking zeroes E only, P and Q stay
    train_step(model, adapters, alloc, opt, 6, data[5], cfg)  # not a masking step
    assert e[0].item() != 0.0  # the masked singular value still trains
    e.data[0] = 10.0
    for t in range(7, 11):
        train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)
    assert alloc.keep_masks()["0"][0] and e[0].item() != 0.0


# ---------------------------------------------------------------------------------------------- robustness
def test_unused_adapter_with_grad_none(make_deep_mlp, batches):
    cfg = deep_cfg(tfinal=0)
    model, adapters, alloc, opt = build(make_deep_mlp, cfg)
    head = model[:3]  # modules "4" and "6" never run: their adapter grads stay None
    for t, batch in enumerate(batches(cfg.total_steps, n_out=16), start=1):
        _, info = train_step(model, adapters, alloc, opt, t, batch, deep_cfg(orth_reg_weight=0.0), forward=head)
        assert adapters["6"].lora_A.grad is None
        if info.masked:
            assert sum(alloc.rank_pattern().values()) == info.budget
    assert sum(alloc.rank_pattern().values()) == 8


def test_target_equal_init_warns_and_never_prunes(make_mlp, batches):
    cfg_kw = dict(init_r=3, target_r=3, target_modules=["0", "2"], total_steps=10, tfinal=2)
    with pytest.warns(UserWarning, match="nothing to prune"):
        cfg = AdaLoRAConfig(**cfg_kw)
    model = make_mlp()
    adapters = inject_adapters(model, cfg)
    with pytest.warns(UserWarning, match="nothing to prune"):
        alloc = RankAllocator(adapters, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t, batch in enumerate(batches(10), start=1):
        _, info = train_step(model, adapters, alloc, opt, t, batch, cfg)
        assert not info.masked and info.phase == "off"
    assert alloc.rank_pattern() == {"0": 3, "2": 3}
    assert all(torch.count_nonzero(a.lora_E) == 3 for a in adapters.values())


def test_svd_lora_prune_false_never_masks(make_mlp, batches):
    cfg = AdaLoRAConfig(init_r=4, target_r=1, target_modules=["0", "2"], total_steps=20, tinit=2, tfinal=4,
                        prune=False)
    model, adapters, alloc, opt = build(make_mlp, cfg)
    for t, batch in enumerate(batches(20), start=1):
        _, info = train_step(model, adapters, alloc, opt, t, batch, cfg)
        assert not info.masked and info.phase == "off"
    assert alloc.rank_pattern() == {"0": 4, "2": 4}
    assert all(torch.count_nonzero(a.lora_E) == 4 for a in adapters.values())
    assert alloc.ema_ipt is None  # no scoring without pruning


def test_repeated_step_warns_and_does_not_update(make_mlp, batches):
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=20, tinit=2, tfinal=4)
    model, adapters, alloc, opt = build(make_mlp, cfg)
    data = batches(3)
    train_step(model, adapters, alloc, opt, 1, data[0], cfg)
    x, y = data[1]
    F.mse_loss(model(x), y).backward()
    opt.step()
    alloc.step(2)
    ema = alloc.ema_ipt.clone(), alloc.ema_unc.clone()
    with pytest.warns(UserWarning, match="called twice"):
        info = alloc.step(2)  # e.g. a callback and the loop both call it
    assert info.step == 2 and not info.masked
    assert torch.equal(alloc.ema_ipt, ema[0]) and torch.equal(alloc.ema_unc, ema[1])
    assert alloc.last_step == 2
    with pytest.raises(ValueError, match="must not go back"):
        alloc.step(1)
    assert alloc.step().step == 3  # step() without a number continues the count


def test_repeated_step_in_final_phase(make_mlp):
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=10, tinit=0, tfinal=3,
                        score="magnitude")
    _, adapters, alloc, _ = build(make_mlp, cfg)
    for a in adapters.values():
        a.lora_E.data.normal_()
    for t in range(1, 9):
        alloc.step(t)
    with pytest.warns(UserWarning):
        info = alloc.step(8)
    assert info.phase == "final" and info.budget == 2
    assert alloc.step(9).phase == "final" and sum(alloc.rank_pattern().values()) == 2


def test_final_phase_freezes_the_pattern(make_mlp, batches):
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=20, tinit=2, tfinal=8,
                        delta_t=2)
    model, adapters, alloc, opt = build(make_mlp, cfg)
    patterns = []
    for t, batch in enumerate(batches(20), start=1):
        _, info = train_step(model, adapters, alloc, opt, t, batch, cfg)
        if t >= 12:
            assert info.phase == "final" and info.masked
            patterns.append({n: m.clone() for n, m in alloc.keep_masks().items()})
            assert alloc.ema_ipt is None  # scores are frozen, their buffers freed
    assert all(all(torch.equal(p[n], patterns[0][n]) for n in p) for p in patterns)
    assert masked_E_are_zero(adapters, alloc)


# ---------------------------------------------------------------------------------------------- moves
def test_buffers_follow_model_dtype_move(make_mlp, batches):
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=20, tinit=2, tfinal=4,
                        delta_t=1, orth_reg_weight=0.0)
    model, adapters, alloc, opt = build(make_mlp, cfg, lr=0.05, opt_cls=torch.optim.SGD)  # SGD: no dtype-bound state
    data = batches(20)
    for t in range(1, 5):
        train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)
    ema_before = alloc.ema_ipt.clone()
    model.to(torch.float64)
    for t in range(5, 8):
        x, y = data[t - 1]
        _, info = train_step(model, adapters, alloc, opt, t, (x.double(), y.double()), cfg)
        assert info.masked and sum(alloc.rank_pattern().values()) == info.budget
    assert alloc.ema_ipt.dtype == alloc.ema_unc.dtype == torch.float64
    assert not torch.allclose(alloc.ema_ipt.float(), ema_before)  # the scores kept updating
    assert masked_E_are_zero(adapters, alloc)  # the masks reach the model's (new) parameters
    storage = alloc.layout.weights.untyped_storage().data_ptr()
    for a in adapters.values():
        for p in (a.lora_A, a.lora_E, a.lora_B):
            assert p.dtype == torch.float64 and p.untyped_storage().data_ptr() == storage  # adopted again


def test_parameters_replaced_by_assign_are_adopted(make_mlp):
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=10, tinit=0, tfinal=2,
                        score="magnitude")
    model, adapters, alloc, _ = build(make_mlp, cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith("lora_E"):
            sd[k] = torch.arange(1.0, 4.0).view(3, 1) * (1 if k.startswith("0") else 10)
    model.load_state_dict(sd, assign=True)  # new Parameter objects
    alloc.step(1)
    alloc.step(2)
    # the scores are the new |E|; the masking reached the new parameters
    assert alloc.rank_pattern()["2"] == 3
    assert torch.count_nonzero(adapters["0"].lora_E) == alloc.rank_pattern()["0"] < 3


# ---------------------------------------------------------------------------------------------- resume
def test_resume_from_state_dicts_is_exact(make_deep_mlp, batches):
    cfg = deep_cfg(total_steps=40, tinit=4, tfinal=10, delta_t=2)
    data = batches(40, n_out=8)

    model, adapters, alloc, opt = build(make_deep_mlp, cfg)
    straight = []
    for t in range(1, 41):
        train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)
        straight.append(alloc.rank_pattern())
    final_a = {k: v.clone() for k, v in model.state_dict().items()}

    model, adapters, alloc, opt = build(make_deep_mlp, cfg)
    resumed = []
    for t in range(1, 21):
        train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)
        resumed.append(alloc.rank_pattern())
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "alloc": alloc.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, adapters, alloc, opt = build(make_deep_mlp, cfg, seed=0)
    torch.manual_seed(123)  # a different RNG state than run A at this point
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    alloc.load_state_dict(ckpt["alloc"])
    assert alloc.last_step == 20
    for t in range(21, 41):
        train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)
        resumed.append(alloc.rank_pattern())
    assert resumed == straight
    assert len({tuple(p.values()) for p in straight}) > 2  # the pattern did change along the way
    final_b = model.state_dict()
    for k, v in final_a.items():
        assert torch.equal(v, final_b[k]), k


def test_load_state_dict_rejects_other_adapters(make_mlp, make_deep_mlp):
    _, _, a1, _ = build(make_mlp, AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=10))
    _, _, a2, _ = build(make_deep_mlp, deep_cfg())
    with pytest.raises(ValueError, match="other adapters"):
        a2.load_state_dict(a1.state_dict())


def test_resume_in_final_phase(make_mlp, batches):
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=20, tinit=2, tfinal=6)
    model, adapters, alloc, opt = build(make_mlp, cfg)
    for t, batch in enumerate(batches(16), start=1):
        train_step(model, adapters, alloc, opt, t, batch, cfg)
    state = copy.deepcopy(alloc.state_dict())
    assert state["ema_ipt"] is None and state["final_keep"] is not None
    model2, adapters2, alloc2, _ = build(make_mlp, cfg)
    model2.load_state_dict(model.state_dict())
    alloc2.load_state_dict(state)
    assert alloc2.ema_ipt is None and alloc2.rank_pattern() == alloc.rank_pattern()
    info = alloc2.step(17)
    assert info.phase == "final" and info.budget == 2 and sum(alloc2.rank_pattern().values()) == 2


# ---------------------------------------------------------------------------------------------- compaction
def _run_to_final(make, cfg, data, until):
    model, adapters, alloc, opt = build(make, cfg)
    for t in range(1, until + 1):
        train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)
    return model, adapters, alloc, opt


def test_compact_preserves_outputs_optimizer_state_and_training(make_deep_mlp, batches):
    # orth_reg_weight=0: the regularizer differs by design between full and sliced A/B (pruned rows
    # still enter A Aᵀ - I before compaction), the task loss alone must follow the same path
    cfg = deep_cfg(total_steps=40, tinit=4, tfinal=15, delta_t=2, orth_reg_weight=0.0)
    data = batches(40, n_out=8)
    m1, ad1, al1, opt1 = _run_to_final(make_deep_mlp, cfg, data, 26)
    m2, ad2, al2, opt2 = _run_to_final(make_deep_mlp, cfg, data, 26)
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))
        before = m1(x)
    pattern = al1.rank_pattern()
    assert sum(pattern.values()) == 8
    masks = {n: m.clone() for n, m in al1.keep_masks().items()}
    n_params = sum(p.numel() for p in m1.parameters() if p.requires_grad)

    assert al1.compact(opt1) == pattern
    assert al1.rank_pattern() == pattern
    for n, a in ad1.items():
        assert a.r == pattern[n] and a.lora_A.shape == (pattern[n], a.in_features)
        assert a.lora_E.shape == (pattern[n], 1) and a.lora_B.shape == (a.out_features, pattern[n])
        for k, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            st1, st2 = opt1.state[getattr(a, k)], opt2.state[getattr(ad2[n], k)]
            for s in ("exp_avg", "exp_avg_sq"):
                assert st1[s].shape == getattr(a, k).shape
                assert torch.equal(st1[s], st2[s].index_select(dim, masks[n].nonzero().view(-1))), (n, k, s)
    assert sum(p.numel() for p in m1.parameters() if p.requires_grad) < n_params
    with torch.no_grad():
        torch.testing.assert_close(m1(x), before, atol=1e-6, rtol=1e-6)
    l1 = [train_step(m1, ad1, al1, opt1, t, data[t - 1], cfg)[0] for t in range(27, 37)]
    l2 = [train_step(m2, ad2, al2, opt2, t, data[t - 1], cfg)[0] for t in range(27, 37)]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(m1(x), m2(x), atol=1e-5, rtol=1e-5)
    assert al1.compact(opt1) == pattern  # idempotent


def test_compact_before_final_phase_raises(make_mlp):
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=20, tinit=2, tfinal=4)
    _, _, alloc, opt = build(make_mlp, cfg)
    alloc.step(1)
    with pytest.raises(RuntimeError, match="final phase"):
        alloc.compact(opt)


def test_module_compacted_to_rank_zero_is_skipped(make_mlp):
    cfg = AdaLoRAConfig(init_r=2, target_r=1, target_modules=["0", "2"], total_steps=6, tinit=0, tfinal=1,
                        score="magnitude")
    model, adapters, alloc, opt = build(make_mlp, cfg)
    adapters["0"].lora_E.data.copy_(torch.tensor([[1.0], [2.0]]))
    adapters["2"].lora_E.data.copy_(torch.tensor([[0.1], [0.2]]))
    for t in range(1, 6):
        alloc.step(t)
    assert alloc.rank_pattern() == {"0": 2, "2": 0}
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = model(x)
    alloc.compact(opt)
    assert adapters["2"].r == 0 and adapters["2"].lora_A.shape == (0, 16)

    def boom(*_args):
        raise AssertionError("a rank-0 module must not run the adapter matmuls")

    adapters["2"]._add_adapter = boom
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
    assert orthogonal_regularization(adapters).isfinite()
    assert isinstance(adapters["2"], SVDLinear)
    info = alloc.step(6)
    assert info.phase == "final" and not info.masked  # nothing left to mask after compaction


def test_scores_stop_updating_at_final_phase_start(make_mlp):
    """As in the reference, step T - tfinal already uses frozen scores: its gradient is not scored."""
    cfg = AdaLoRAConfig(init_r=3, target_r=1, target_modules=["0", "2"], total_steps=10, tinit=1, tfinal=4)
    _, adapters, alloc, _ = build(make_mlp, cfg)

    def random_grads():
        for a in adapters.values():
            for p in (a.lora_A, a.lora_E, a.lora_B):
                p.data.normal_()
                p.grad = torch.randn_like(p)

    for t in range(1, 6):
        random_grads()
        alloc.step(t)
    before = alloc.triplet_scores()
    random_grads()
    info = alloc.step(6)
    assert info.phase == "final"
    assert torch.equal(alloc.triplet_scores(), before)
    assert torch.equal(alloc.keep, torch.zeros(6, dtype=torch.bool).index_fill_(0, torch.topk(before, 2).indices, True))


def test_resume_after_compaction(make_deep_mlp, batches):
    """A compacted run resumes: the fresh allocator compacts on load, then weights and optimizer load."""
    cfg = deep_cfg(total_steps=30, tinit=2, tfinal=12, delta_t=2)
    data = batches(30, n_out=8)
    model, adapters, alloc, opt = _run_to_final(make_deep_mlp, cfg, data, 20)
    pattern = alloc.compact(opt)
    for t in range(21, 24):
        train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "alloc": alloc.state_dict()})
    for t in range(24, 28):
        train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)

    model2, adapters2, alloc2, _ = build(make_deep_mlp, cfg)
    alloc2.load_state_dict(ckpt["alloc"])
    assert alloc2.compacted and alloc2.rank_pattern() == pattern
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    for t in range(24, 28):
        train_step(model2, adapters2, alloc2, opt2, t, data[t - 1], cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    with pytest.raises(ValueError, match="compacted"):
        alloc2.load_state_dict(build(make_deep_mlp, cfg)[2].state_dict())


def test_fused_importance_update_matches_eager():
    """The compiled one-pass update (used for >= 1M adapter parameters) computes the same EMAs as the eager one."""
    from adalora.scores import fused_importance_update, update_importance

    w = torch.randn(4096)
    fn = fused_importance_update(w, min_numel=0)
    if fn is update_importance:
        pytest.skip("torch.compile is not usable on this machine (the allocator then stays eager)")
    g = torch.randn(4096)
    fused = [torch.zeros(4096), torch.zeros(4096)]
    eager = [torch.zeros(4096), torch.zeros(4096)]
    for _ in range(3):
        fn(w, g, *fused, 0.85, 0.7)
        update_importance(w, g, *eager, 0.85, 0.7)
        g = g.roll(1)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- public surface
@pytest.mark.parametrize("adapter", ["svd", "lora"])
def test_flat_layout_spans_cover_the_buffers(make_deep_mlp, adapter):
    cfg = deep_cfg(adapter=adapter)
    model, adapters, alloc, _ = build(make_deep_mlp, cfg)
    lay = alloc.layout
    assert sorted(lay.order) == sorted(TARGETS) and lay.order != TARGETS  # shape-grouped: "0" and "6" together
    assert lay.n_triplets == sum(lay.ranks) == 16
    covered = torch.zeros(lay.numel, dtype=torch.int64)
    for s in lay.spans:
        p = getattr(s.module, s.name)
        assert s.module is adapters[s.adapter] and s.shape == p.shape
        assert lay.view(lay.weights, s).data_ptr() == p.data_ptr()  # the parameter *is* that part of the buffer
        covered[s.offset:s.offset + s.numel] += 1
    assert bool((covered == 1).all())  # every entry belongs to exactly one parameter
    if adapter == "svd":
        assert torch.equal(lay.triplets(lay.weights), torch.cat([adapters[n].lora_E.view(-1) for n in lay.order]))
        assert lay.gate is None
    else:
        assert all(adapters[n].lora_mask.data_ptr() == lay.gate[i * 4].data_ptr() for i, n in enumerate(lay.order))
    x = torch.randn(4, 8)
    model[:3](x).sum().backward()  # modules "4" and "6" unused: their grads stay None
    grads = lay.gather_grads()
    assert lay.missing_grads == sum(1 for s in lay.spans if s.adapter in ("4", "6"))
    for s in lay.spans:
        p = getattr(s.module, s.name)
        if s.adapter in ("0", "2"):
            assert p.grad.data_ptr() == lay.view(grads, s).data_ptr()
        else:
            assert p.grad is None and not lay.view(grads, s).any()


@pytest.mark.parametrize("adapter", ["svd", "lora"])
def test_set_mask_state_adopts_another_allocators_mask(make_deep_mlp, batches, adapter):
    """Two allocators that disagree (the second one's scores perturbed): the second adopts the first's mask
    state, before and after the pattern freezes, and both then train the same pruned model."""
    cfg = deep_cfg(adapter=adapter, total_steps=30, tinit=2, tfinal=10, delta_t=2)
    data = batches(30, n_out=8)
    runs = [build(make_deep_mlp, cfg) for _ in range(2)]
    noise = torch.Generator().manual_seed(9)
    for t in range(1, 21):
        for i, (model, adapters, alloc, opt) in enumerate(runs):
            if i == 1 and alloc.ema_ipt is not None:
                alloc.ema_ipt.mul_(torch.rand(alloc.ema_ipt.shape, generator=noise) * 4)
            train_step(model, adapters, alloc, opt, t, data[t - 1], cfg)
        a, b = runs[0][2], runs[1][2]
        if t in (6, 20):  # a decreasing-phase mask, then the first final-phase step (the pattern freezes)
            state = a.mask_state()
            assert state["frozen"] == (t == 20) and state["keep"] is not a.keep  # a copy
            assert b.set_mask_state(state)  # the perturbed scores had chosen another mask
            assert torch.equal(b.keep, a.keep) and b.rank_pattern() == a.rank_pattern()
            assert not b.set_mask_state(a.mask_state())  # nothing changes the second time
            if adapter == "svd":
                assert torch.equal(b.layout.triplets(b.layout.weights), a.layout.triplets(a.layout.weights))
            else:
                assert torch.equal(b.layout.gate, a.layout.gate)
    a, b = runs[0][2], runs[1][2]
    assert b.final_keep is b.keep and torch.equal(b.final_keep, a.final_keep)
    for n, keep in a.keep_masks().items():  # the frozen pattern's penalty set follows the adopted mask
        assert torch.equal(runs[1][1][n].rank_keep, keep.nonzero().view(-1))
    with pytest.raises(ValueError, match="frozen"):
        b.set_mask_state({**a.mask_state(), "frozen": False})
    if adapter == "svd":  # the lora_E grad masks follow it too: pruned singular values get no gradient
        model, adapters, alloc, opt = runs[1]
        x, y = data[20]
        F.mse_loss(model(x), y).backward()
        for n, keep in alloc.keep_masks().items():
            assert not adapters[n].lora_E.grad.view(-1)[~keep].any()
