"""Parity with Hugging Face PEFT 0.21.2's AdaLoRA, and the places where we deliberately differ.

The parity test trains the same tiny BERT twice in float64, once wrapped by PEFT (``get_peft_model``) and once
by us (``inject_adapters`` + ``RankAllocator``), from the same P, Λ, Q and head, on the same batches with the
same AdamW, and checks every step: equal losses, equal budgets, the same masking steps and the same kept
triplets. The other tests each show one documented difference (docs/peft_differences.md) on PEFT's own code.

PEFT's step convention: its docstring says only "global_step"; its example
(examples/conditional_generation/peft_adalora_seq2seq.py) calls ``update_and_allocate(global_step)`` with
global_step = 0, 1, ..., T-1. Ours: ``step(t)`` after the t-th ``optimizer.step()``, t = 1..T. For the parity run
both get the same integers 1..T, so the comparison is exact; the tfinal = 0 test feeds each its own convention.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adalora import AdaLoRAConfig, ConfigError, RankAllocator, inject_adapters, orthogonal_regularization
from adalora.scores import select_top

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import AdaLoraConfig as PeftAdaLoraConfig  # noqa: E402
from peft import get_peft_model, get_peft_model_state_dict  # noqa: E402

PEFT_VERSION = "0.21.2"
ADAPTER = "default"
TARGETS = ["query", "value", "intermediate.dense"]  # 2 layers x 3 = 6 matrices of two shapes (32x32, 64x32)
VOCAB, N_LABELS = 64, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster and does not fight other processes on a 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_pinned_peft_version():
    """The behaviours below are those of PEFT 0.21.2 (pyproject pins it in the dev extra)."""
    assert peft.__version__ == PEFT_VERSION


# ---------------------------------------------------------------------------------------------- helpers
def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=N_LABELS,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(cfg)  # float32: PEFT must wrap a float32 model, see test_peft_ranknum_*


def _bert_batches(n: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (8, 12), generator=g), torch.randint(0, N_LABELS, (8,), generator=g))
            for _ in range(n)]


def _configs(*, total, tinit, tfinal, delta_t, init_r=6, target_r=2, alpha=8.0, orth=0.1, task_type="SEQ_CLS"):
    ours = AdaLoRAConfig(init_r=init_r, target_r=target_r, lora_alpha=alpha, target_modules=TARGETS,
                         modules_to_save=["classifier"], tinit=tinit, tfinal=tfinal, delta_t=delta_t,
                         orth_reg_weight=orth, total_steps=total)
    theirs = PeftAdaLoraConfig(task_type=task_type, init_r=init_r, target_r=target_r, lora_alpha=alpha,
                               target_modules=list(TARGETS), lora_dropout=0.0, tinit=tinit, tfinal=tfinal,
                               deltaT=delta_t, orth_reg_weight=orth, total_step=total)
    return ours, theirs


def _peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def _bert_pair(ocfg, pcfg, *, e_std=1.0, seed=1):
    """Our model and PEFT's from the same base, both float64, with identical P, Λ (random, non-zero) and Q.

    Our layers get scale = alpha / (r + 1e-5), PEFT's effective scale, so the forwards agree to rounding.
    """
    base = _bert()
    ours, pm = copy.deepcopy(base), copy.deepcopy(base)
    adapters = inject_adapters(ours, ocfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(pm, pcfg)
    ours.double()  # before the RankAllocator, so it lays out float64 buffers from the start
    pm.double()  # after wrapping: a float64 base at wrap time would make PEFT's ranknum trainable
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, a in adapters.items():
            a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g, dtype=torch.float64) * 0.02)
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g, dtype=torch.float64) * 0.02)
            a.lora_E.copy_(torch.randn(a.lora_E.shape, generator=g, dtype=torch.float64) * e_std)
            a.scale = ocfg.lora_alpha / (ocfg.init_r + 1e-5)
            pl = _peft_layer(pm, name)
            for p in ("lora_A", "lora_B", "lora_E"):
                getattr(pl, p)[ADAPTER].copy_(getattr(a, p))
    return ours, adapters, pm


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _peft_keep(pm) -> dict[str, list[bool]]:
    """PEFT's rank_pattern {"<module>.lora_E.default": [bool] * r} under our module names."""
    rp = pm.peft_config[ADAPTER].rank_pattern or {}
    suffix = f".lora_E.{ADAPTER}"
    return {k[: -len(suffix)]: v for k, v in rp.items()}


def _peft_nonzero_E(pm) -> int:
    return sum(int(torch.count_nonzero(p)) for n, p in pm.named_parameters() if f"lora_E.{ADAPTER}" in n)


def _peft_masks_at(t, *, tinit, tfinal, total, delta_t) -> bool:
    """When PEFT 0.21.2's update_and_allocate(t) masks: the cubic phase on the ΔT grid, then every step."""
    return t >= total - tfinal or (tinit < t and t % delta_t == 0)


# ---------------------------------------------------------------------------------------------- parity
def test_training_matches_peft_step_by_step():
    """240 optimizer steps: same loss (rtol 1e-9), budget and kept triplets as PEFT at all 101 masking steps.

    Learning rate 1e-3 and P, Q ~ N(0, 0.02) keep P and Q away from orthonormality: the reference regularizer
    ‖QQᵀ − I‖_F (not squared) has gradient X/‖X‖, whose direction is ill-conditioned as X → 0, and near there
    Adam amplifies rounding-level differences between two correct implementations (measured: with P, Q ~
    N(0, 0.1) and lr 5e-3 the losses drift apart to 2e-4 relative by step 220 with identical decisions; the same
    run with orth_reg_weight = 0 stays within 3e-15). Here the largest relative loss difference is about 5e-13.
    """
    total, tinit, tfinal, delta_t = 240, 20, 40, 3
    ocfg, pcfg = _configs(total=total, tinit=tinit, tfinal=tfinal, delta_t=delta_t)
    ours, adapters, pm = _bert_pair(ocfg, pcfg)
    alloc = RankAllocator(adapters, ocfg)
    n_mod = len(adapters)
    assert n_mod == 6 and pm.base_model.rankallocator.init_bgt == alloc.init_budget == 36

    # same trainable tensors: adapters + classifier (PEFT: a ModulesToSaveWrapper copy); ranknum frozen
    assert sum(p.numel() for p in _trainable(ours)) == sum(p.numel() for p in _trainable(pm))
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "ranknum" in n)
    opt_o = torch.optim.AdamW(_trainable(ours), lr=1e-3)
    opt_p = torch.optim.AdamW(_trainable(pm), lr=1e-3)

    data = _bert_batches(4)
    with torch.no_grad():  # the start is informative: Λ != 0, so the adapters already change the output
        ids = data[0][0]
        with pm.disable_adapter():
            base_logits = pm(input_ids=ids).logits
        lo, lp = ours(input_ids=ids).logits, pm(input_ids=ids).logits
        torch.testing.assert_close(lo, lp, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(lo, base_logits, rtol=1e-3, atol=1e-5)

    n_masked, n_fresh, max_rel, patterns = 0, 0, 0.0, set()
    for t in range(1, total + 1):
        ids, y = data[t % len(data)]
        # PEFT's penalty keeps the pruned triplets in the final phase; ours drops them by default (so that
        # compaction is exact, see test_final_phase_penalty_differs_only_by_pruned_triplets): ask for PEFT's.
        reg = orthogonal_regularization(adapters, include_pruned=True)
        loss_o = ours(input_ids=ids, labels=y).loss + ocfg.orth_reg_weight * reg
        loss_p = pm(input_ids=ids, labels=y).loss  # AdaLoraModel.forward adds the same regularizer
        rel = abs(loss_o.item() - loss_p.item()) / abs(loss_p.item())
        max_rel = max(max_rel, rel)
        assert rel <= 1e-9, (t, loss_o.item(), loss_p.item())
        loss_o.backward()
        loss_p.backward()
        opt_o.step()
        opt_p.step()
        info = alloc.step(t)
        pm.base_model.update_and_allocate(t)
        opt_o.zero_grad()
        opt_p.zero_grad()

        budget_p, _ = pm.base_model.rankallocator.budget_schedule(t)
        assert info.budget == budget_p, t
        assert info.masked == _peft_masks_at(t, tinit=tinit, tfinal=tfinal, total=total, delta_t=delta_t), t
        if not info.masked:
            continue
        n_masked += 1
        n_fresh += t <= total - tfinal  # a new decision (afterwards the frozen pattern is re-applied)
        theirs = _peft_keep(pm)
        mine = alloc.keep_masks()
        assert theirs.keys() == mine.keys()
        for name, keep in mine.items():
            assert keep.tolist() == theirs[name], (t, name)
            assert torch.count_nonzero(adapters[name].lora_E.view(-1)[~keep]) == 0
        assert sum(map(sum, theirs.values())) == info.budget == int(sum(k.sum() for k in mine.values())), t
        patterns.add(tuple(tuple(k.tolist()) for k in mine.values()))

    assert n_masked == 101 and n_fresh == 61  # ΔT grid 21..198 (60) + final phase 200..240 (41)
    assert max_rel <= 1e-9
    # the final budget is exactly target_r * n in both (tfinal > 0, no ties), and it is not a uniform split
    final = {n: sum(v) for n, v in _peft_keep(pm).items()}
    assert final == alloc.rank_pattern()
    assert sum(final.values()) == ocfg.target_r * n_mod
    assert len(set(final.values())) > 1 and len(patterns) > 10
    # and the trained weights agree
    for name, a in adapters.items():
        pl = _peft_layer(pm, name)
        for p in ("lora_A", "lora_B", "lora_E"):
            torch.testing.assert_close(getattr(a, p), getattr(pl, p)[ADAPTER], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.classifier.weight, pm.base_model.model.classifier.modules_to_save[ADAPTER].weight,
                               rtol=1e-9, atol=1e-9)

    # Ours can then drop the pruned triplets (PEFT keeps init_r and masks); the function does not change.
    with torch.no_grad():
        before = pm(input_ids=data[0][0]).logits
    alloc.compact(opt_o)
    assert {n: a.r for n, a in adapters.items()} == final
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=data[0][0]).logits, before, rtol=1e-9, atol=1e-9)
    assert all(_peft_layer(pm, n).lora_A[ADAPTER].shape[0] == ocfg.init_r for n in adapters)


def test_default_penalty_matches_peft_until_the_pattern_freezes_then_stays_close():
    """The shipped default, ``orthogonal_regularization(adapters)`` (kept triplets only once frozen), against PEFT.

    Same run as test_training_matches_peft_step_by_step, without ``include_pruned=True``. The switch is in
    ``RankAllocator.step(T - tfinal)``, which freezes the pattern: up to the loss of step T - tfinal both agree
    to rounding; the loss of step T - tfinal + 1, from identical weights, differs by exactly γ (R_kept − R_full).
    Every masking decision still agrees (the frozen pattern was chosen from identical scores). The 40 final-phase
    steps then move the kept P and Q differently: the final logits differ by about 1% of what the final phase
    changed them by (measured 1.0-1.4%; on all-MiniLM-L6-v2 GLUE runs ~1.4e-3), bounded here at 5%.
    """
    total, tinit, tfinal, delta_t = 240, 20, 40, 3
    t_freeze = total - tfinal
    ocfg, pcfg = _configs(total=total, tinit=tinit, tfinal=tfinal, delta_t=delta_t)
    ours, adapters, pm = _bert_pair(ocfg, pcfg)
    alloc = RankAllocator(adapters, ocfg)
    opt_o = torch.optim.AdamW(_trainable(ours), lr=1e-3)
    opt_p = torch.optim.AdamW(_trainable(pm), lr=1e-3)
    data = _bert_batches(4)
    gamma = ocfg.orth_reg_weight
    n_masked, at_freeze = 0, None
    for t in range(1, total + 1):
        ids, y = data[t % len(data)]
        reg = orthogonal_regularization(adapters)  # the default: include_pruned=False
        loss_o = ours(input_ids=ids, labels=y).loss + gamma * reg
        loss_p = pm(input_ids=ids, labels=y).loss
        if t <= t_freeze:  # nothing frozen yet: the default penalty is PEFT's
            assert abs(loss_o.item() - loss_p.item()) <= 1e-9 * abs(loss_p.item()), t
            assert all(a.rank_keep is None for a in adapters.values()), t
        if t == t_freeze + 1:  # same weights as PEFT's, only the penalty differs: by the pruned triplets' share
            with torch.no_grad():
                gap = gamma * (reg - orthogonal_regularization(adapters, include_pruned=True)).item()
            assert abs(gap) > 1e-6
            assert abs((loss_o.item() - loss_p.item()) - gap) <= 1e-12, (loss_o.item() - loss_p.item(), gap)
        loss_o.backward()
        loss_p.backward()
        opt_o.step()
        opt_p.step()
        info = alloc.step(t)
        pm.base_model.update_and_allocate(t)
        opt_o.zero_grad()
        opt_p.zero_grad()
        assert (alloc.final_keep is not None) == (t >= t_freeze), t  # the switch: the step that freezes
        if t == t_freeze:
            with torch.no_grad():
                at_freeze = [pm(input_ids=i).logits for i, _ in data]
        assert info.masked == _peft_masks_at(t, tinit=tinit, tfinal=tfinal, total=total, delta_t=delta_t), t
        if info.masked:
            n_masked += 1
            theirs = _peft_keep(pm)
            assert {n: k.tolist() for n, k in alloc.keep_masks().items()} == theirs, t
    assert n_masked == 101
    with torch.no_grad():
        for (ids, _), before in zip(data, at_freeze):
            lo, lp = ours(input_ids=ids).logits, pm(input_ids=ids).logits
            moved, diff = (lp - before).abs().max().item(), (lo - lp).abs().max().item()
            assert 1e-4 * moved < diff <= 0.05 * moved, (diff, moved)


# ---------------------------------------------------------------------------------------------- tfinal = 0
def test_tfinal_zero_final_budget():
    """tfinal = 0: PEFT, driven as its example does (steps 0..T-1), never runs its final branch (it needs
    step == T), so the last mask is at the last ΔT multiple and the Λ it zeroed train back: the model ends
    with every singular value alive, while the rank_pattern it saves claims target_r * n (and save_pretrained
    slices the checkpoint to it, dropping trained singular values). Ours, driven by its documented convention
    (``step()`` after each optimizer step, counting 1..T), applies the final mask at T and ends at
    exactly target_r * n. PEFT fed 1..T also ends at the target: the difference is the step convention, and
    ours refuses step 0 so the 0-based habit cannot silently miss the budget."""
    total, tinit, delta_t = 60, 10, 10  # ΔT = 10 as in PEFT's example
    ocfg, pcfg = _configs(total=total, tinit=tinit, tfinal=0, delta_t=delta_t)
    target = ocfg.target_r * 6  # 6 adapted matrices, 36 singular values at init
    data = _bert_batches(4)

    def run(step_numbers, use_peft):
        ours, adapters, pm = _bert_pair(ocfg, copy.deepcopy(pcfg))
        model = pm if use_peft else ours
        alloc = None if use_peft else RankAllocator(adapters, ocfg)
        opt = torch.optim.AdamW(_trainable(model), lr=1e-3)
        last_mask = None
        for i, t in enumerate(step_numbers):
            ids, y = data[i % len(data)]
            loss = model(input_ids=ids, labels=y).loss
            if not use_peft:
                loss = loss + ocfg.orth_reg_weight * orthogonal_regularization(adapters)
            loss.backward()
            opt.step()
            if use_peft:
                before = pm.peft_config[ADAPTER].rank_pattern
                pm.base_model.update_and_allocate(t)
                if pm.peft_config[ADAPTER].rank_pattern is not before:
                    last_mask = t
            else:
                info = alloc.step() if t is None else alloc.step(t)
                last_mask = info.step if info.masked else last_mask
            opt.zero_grad()
        if use_peft:
            claimed = sum(map(sum, _peft_keep(pm).values()))
            saved = sum(v.shape[0] for k, v in get_peft_model_state_dict(pm).items() if ".lora_E" in k)
            assert saved == claimed  # save_pretrained slices the adapter to its rank_pattern
            return _peft_nonzero_E(pm), claimed, last_mask
        nonzero = sum(int(torch.count_nonzero(a.lora_E)) for a in adapters.values())
        return nonzero, sum(alloc.rank_pattern().values()), last_mask

    peft_nonzero, peft_claimed, peft_last = run(range(total), use_peft=True)  # PEFT's example: 0..T-1
    assert peft_last == 50  # the final branch (step == T) never ran
    assert peft_claimed == target  # budget(50) rounds down to the target ...
    assert peft_nonzero == 36 > target  # ... but steps 51..59 revived every zeroed Λ

    ours_nonzero, ours_kept, ours_last = run([None] * total, use_peft=False)  # ours: step() counts 1..T
    assert ours_last == total
    assert ours_nonzero == ours_kept == target
    with pytest.raises(ValueError, match="count optimizer steps from 1"):  # PEFT's 0-based habit is caught
        run(range(total), use_peft=False)  # at step 0, instead of silently missing the final budget

    peft_nonzero_1, peft_claimed_1, peft_last_1 = run(range(1, total + 1), use_peft=True)
    assert peft_last_1 == total and peft_nonzero_1 == peft_claimed_1 == target


# ---------------------------------------------------------------------------------------------- ties
class _Twin(nn.Module):
    """Two identical linears on the same input, summed: identical adapters get identical gradients, so every
    triplet score of ``a`` ties exactly with its twin in ``b``. ``use_b=False`` leaves ``b`` unused."""

    def __init__(self, d: int = 8, use_b: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 1)
        self.b.load_state_dict(self.a.state_dict())
        self.use_b = use_b

    def forward(self, x):
        h = self.a(x) + self.b(x) if self.use_b else self.a(x)
        return self.head(torch.tanh(h))


def _twin_data(n: int):
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def _twin_init(named_layers, get):
    """Λ ~ N(0, 1), P, Q ~ N(0, 0.02), the same in both twins."""
    g = torch.Generator().manual_seed(5)
    ref = {p: None for p in ("lora_A", "lora_B", "lora_E")}
    with torch.no_grad():
        for _, layer in named_layers:
            for p in ref:
                t = get(layer, p)
                if ref[p] is None:
                    ref[p] = torch.randn(t.shape, generator=g) * (1.0 if p == "lora_E" else 0.02)
                t.copy_(ref[p])


def _peft_twin(total=30, tinit=5, tfinal=5, delta_t=1, init_r=4, target_r=1, use_b=True):
    cfg = PeftAdaLoraConfig(init_r=init_r, target_r=target_r, target_modules=["a", "b"], lora_alpha=8,
                            tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total, orth_reg_weight=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_Twin(use_b=use_b), cfg)
    _twin_init([(n, _peft_layer(pm, n)) for n in ("a", "b")], lambda m, p: getattr(m, p)[ADAPTER])
    return pm


def _our_twin(total=30, tinit=5, tfinal=5, delta_t=1, init_r=4, target_r=1, use_b=True):
    cfg = AdaLoRAConfig(init_r=init_r, target_r=target_r, target_modules=["a", "b"], lora_alpha=8.0, tinit=tinit,
                        tfinal=tfinal, delta_t=delta_t, total_steps=total, orth_reg_weight=0.0)
    model = _Twin(use_b=use_b)
    adapters = inject_adapters(model, cfg)
    _twin_init(adapters.items(), getattr)
    return model, adapters, RankAllocator(adapters, cfg)


def _train(model, steps, after_step, lr=1e-2):
    opt = torch.optim.AdamW(_trainable(model), lr=lr)
    out = []
    for t, (x, y) in zip(steps, _twin_data(len(steps))):
        F.mse_loss(model(x), y).backward()
        opt.step()
        out.append(after_step(t))
        opt.zero_grad()
    return out


def test_tied_scores_peft_prunes_more_than_budget_ours_exact():
    """Exact ties (twin modules): PEFT masks S <= kthvalue(S, k), so when k = b(0) - b is odd it also removes the
    twin of the k-th triplet and keeps b - 1; ours keeps exactly b at every masking step."""
    total, tinit, tfinal = 30, 5, 5
    pm = _peft_twin(total, tinit, tfinal)
    ra = pm.base_model.rankallocator

    def peft_after(t):
        pm.base_model.update_and_allocate(t)
        budget, mask = ra.budget_schedule(t)
        if not (mask or t >= total - tfinal):
            return None
        keep = _peft_keep(pm)
        assert keep["a"] == keep["b"]  # the twins stay identical: both or neither of a tied pair is pruned
        return budget, sum(map(sum, keep.values()))

    peft_kept = [r for r in _train(pm, range(1, total + 1), peft_after) if r is not None]
    short = [(b, k) for b, k in peft_kept if k != b]
    assert short, "no odd k reached: the tie was not exercised"
    assert all(k == b - 1 and (8 - b) % 2 == 1 for b, k in short)
    assert all((8 - b) % 2 == 0 for b, k in peft_kept if k == b)

    model, adapters, alloc = _our_twin(total, tinit, tfinal)

    def ours_after(t):
        info = alloc.step(t)
        return (info.budget, sum(alloc.rank_pattern().values())) if info.masked else None

    ours_kept = [r for r in _train(model, range(1, total + 1), ours_after) if r is not None]
    assert [b for b, _ in ours_kept] == [b for b, _ in peft_kept]  # same schedule
    assert all(k == b for b, k in ours_kept)


def test_select_top_vs_kthvalue_threshold():
    """The rule itself: PEFT's ``S <= kthvalue(S, n - b)`` on a tied vector vs our ``select_top``."""
    s = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 2.0])
    for b in range(1, 6):
        peft_keep = ~(s <= torch.kthvalue(s, s.numel() - b).values)
        keep = select_top(s, b)
        assert int(keep.sum()) == b
        assert s[keep].min() >= s[~keep].max()  # a top-b set
        if b in (3, 4):  # the threshold falls inside the run of 2.0s
            assert int(peft_keep.sum()) == 2 < b
    assert select_top(s, 3).tolist() == [True, False, True, False, True, False]  # ties: lower index first


# ---------------------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("target_r", [4, 5])
def test_target_r_not_below_init_r(target_r):
    """PEFT accepts target_r >= init_r and crashes in kthvalue(k <= 0) at the first masking step, after tinit
    steps of training. Ours: target_r > init_r is a ConfigError at construction; target_r == init_r warns and
    scores without pruning."""
    pm = _peft_twin(total=10, tinit=2, tfinal=2, init_r=4, target_r=target_r)
    with pytest.raises(RuntimeError, match="kthvalue|out of range|selected number k"):
        _train(pm, range(1, 11), pm.base_model.update_and_allocate)

    kw = dict(init_r=4, target_r=target_r, target_modules=["a", "b"], total_steps=10, tinit=2, tfinal=2)
    if target_r > 4:
        with pytest.raises(ConfigError, match="target_r"):
            AdaLoRAConfig(**kw)
        return
    with pytest.warns(UserWarning, match="nothing to prune"):
        cfg = AdaLoRAConfig(**kw)
    model = _Twin()
    adapters = inject_adapters(model, cfg)
    with pytest.warns(UserWarning, match="nothing to prune"):
        alloc = RankAllocator(adapters, cfg)
    infos = _train(model, range(1, 11), alloc.step)
    assert not any(i.masked for i in infos) and alloc.rank_pattern() == {"a": 4, "b": 4}


def test_unused_adapter_grad_none():
    """An adapted module that does not run in the forward has grad None: PEFT's update_ipt computes
    ``p * p.grad`` and raises TypeError; ours scores it zero and keeps the budget."""
    pm = _peft_twin(use_b=False)
    with pytest.raises(TypeError):
        _train(pm, range(1, 31), pm.base_model.update_and_allocate)

    model, adapters, alloc = _our_twin(use_b=False)

    def after(t):
        info = alloc.step(t)
        return not info.masked or sum(alloc.rank_pattern().values()) == info.budget

    assert all(_train(model, range(1, 31), after))
    assert adapters["b"].lora_A.grad is None
    assert alloc.rank_pattern() == {"a": 2, "b": 0}  # the unused module scores zero and is pruned first


def test_repeated_call_at_start_of_final_phase():
    """Calling the allocator twice for step T - tfinal (a callback plus the loop, say): PEFT has reset its
    scores after the first call and the second raises KeyError; ours warns and ignores the repeat."""
    total, tfinal = 20, 5
    pm = _peft_twin(total=total, tinit=2, tfinal=tfinal)
    _train(pm, range(1, total - tfinal + 1), pm.base_model.update_and_allocate)
    with pytest.raises(KeyError):
        pm.base_model.update_and_allocate(total - tfinal)

    model, adapters, alloc = _our_twin(total=total, tinit=2, tfinal=tfinal)
    _train(model, range(1, total - tfinal + 1), alloc.step)
    keep = {n: m.clone() for n, m in alloc.keep_masks().items()}
    with pytest.warns(UserWarning, match="called twice"):
        info = alloc.step(total - tfinal)
    assert info.phase == "final" and not info.masked
    assert all(torch.equal(keep[n], m) for n, m in alloc.keep_masks().items())


def test_allocator_state_follows_dtype_and_checkpoints():
    """PEFT's importance EMAs are plain dicts of tensors: ``model.to()`` does not move them (on a GPU the next
    update mixes devices) and no checkpoint holds them. Ours follow the parameters and have a state_dict."""
    pm = _peft_twin()
    _train(pm, range(1, 4), pm.base_model.update_and_allocate)
    ra = pm.base_model.rankallocator
    pm.double()
    assert {t.dtype for t in ra.exp_avg_ipt.values()} == {torch.float32}  # left behind by .to()
    assert not hasattr(ra, "state_dict")

    model, adapters, alloc = _our_twin()
    _train(model, range(1, 4), alloc.step)
    model.double()
    x, y = _twin_data(1)[0]
    F.mse_loss(model(x.double()), y.double()).backward()
    alloc.step(4)
    state = alloc.state_dict()
    assert state["ema_ipt"].dtype == state["ema_unc"].dtype == torch.float64
    assert state["step"] == 4


# ---------------------------------------------------------------------------------------------- scale, reg
def test_scale_alpha_over_r():
    """Ours: scale = alpha / init_r (the authors' code). PEFT: scaling / (ranknum + 1e-5), smaller by the factor
    r / (r + 1e-5), i.e. 2.5e-6 relative at r = 4. Setting our ``scale`` to PEFT's value gives the same ΔW."""
    pm = _peft_twin().double()
    model, adapters, _ = _our_twin()
    model.double()
    ours_layer, peft_layer = adapters["a"], _peft_layer(pm, "a")
    assert ours_layer.scale == 8.0 / 4
    d_ours, d_peft = ours_layer.delta_weight().detach(), peft_layer.get_delta_weight(ADAPTER).detach()
    torch.testing.assert_close(d_peft * (4 + 1e-5) / 4, d_ours, rtol=1e-12, atol=0)
    assert not torch.allclose(d_peft, d_ours, rtol=1e-6, atol=0)
    ours_layer.scale = 8.0 / (4 + 1e-5)
    torch.testing.assert_close(ours_layer.delta_weight().detach(), d_peft, rtol=1e-12, atol=0)


def test_peft_without_task_type_skips_orthogonal_regularizer():
    """PEFT adds the regularizer in AdaLoraModel.forward, which PeftModel.forward bypasses when no task_type
    is given: the loss silently lacks it. Ours has no such path: the loop adds
    ``orth_reg_weight * orthogonal_regularization(adapters)`` itself."""
    ocfg, pcfg = _configs(total=50, tinit=5, tfinal=5, delta_t=1, task_type=None)
    _, adapters, pm = _bert_pair(ocfg, pcfg)
    ids, y = _bert_batches(1)[0]
    with torch.no_grad():
        plain = pm.base_model.model(input_ids=ids, labels=y).loss
        via_peft_model = pm(input_ids=ids, labels=y).loss
        via_tuner = pm.base_model(input_ids=ids, labels=y).loss
        reg = orthogonal_regularization(adapters)
    assert torch.equal(via_peft_model, plain)  # no regularizer
    torch.testing.assert_close(via_tuner, plain + ocfg.orth_reg_weight * reg, rtol=1e-12, atol=1e-12)
    assert reg > 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_peft_ranknum_trainable_when_base_is_not_float32(dtype):
    """A PEFT 0.21.2 defect found while writing the parity test: wrapping a base model that is not float32
    re-creates ``ranknum`` through ParameterDict assignment, which makes it a trainable Parameter, so the
    optimizer moves the adapter scale alpha / ranknum during training. Ours keeps scale a Python float."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_Twin().to(dtype), PeftAdaLoraConfig(init_r=4, target_r=1, target_modules=["a", "b"],
                                                                  total_step=10, tinit=2, tfinal=2))
    ranknum = _peft_layer(pm, "a").ranknum[ADAPTER]
    assert ranknum.requires_grad
    for name in ("a", "b"):
        _peft_layer(pm, name).lora_E[ADAPTER].data.normal_()
    opt = torch.optim.AdamW(_trainable(pm), lr=1e-2)
    x, y = _twin_data(1)[0]
    F.mse_loss(pm(x.to(dtype)).float(), y).backward()
    opt.step()
    assert float(ranknum.detach()) != 4.0  # the scale drifted

    model = _Twin().to(dtype)
    adapters = inject_adapters(model, AdaLoRAConfig(init_r=4, target_r=1, target_modules=["a", "b"], total_steps=10))
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert isinstance(adapters["a"].scale, float)


def test_final_phase_penalty_differs_only_by_pruned_triplets():
    """Deliberate difference: once the pattern is frozen our default penalty covers the kept triplets only.

    Before the final phase both forms agree; afterwards the default equals the penalty of the compacted
    (sliced) adapters, which is what makes compaction on/off the same computation.
    """
    total, tinit, tfinal, delta_t = 60, 5, 20, 2
    ocfg, _ = _configs(total=total, tinit=tinit, tfinal=tfinal, delta_t=delta_t)
    ours, adapters, _ = _bert_pair(ocfg, _configs(total=total, tinit=tinit, tfinal=tfinal, delta_t=delta_t)[1])
    alloc = RankAllocator(adapters, ocfg)
    opt = torch.optim.AdamW(_trainable(ours), lr=1e-3)
    data = _bert_batches(2)
    for t in range(1, total - tfinal + 1):
        ids, y = data[t % len(data)]
        if t < total - tfinal:
            assert orthogonal_regularization(adapters).item() == orthogonal_regularization(
                adapters, include_pruned=True).item()
        (ours(input_ids=ids, labels=y).loss + 0.1 * orthogonal_regularization(adapters)).backward()
        opt.step()
        alloc.step(t)
        opt.zero_grad()
    kept_only = orthogonal_regularization(adapters).item()
    assert kept_only != orthogonal_regularization(adapters, include_pruned=True).item()
    alloc.compact(opt)
    assert abs(orthogonal_regularization(adapters).item() - kept_only) <= 1e-12 * max(1.0, abs(kept_only))
