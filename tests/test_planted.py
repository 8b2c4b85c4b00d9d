"""The planted-rank benchmark: teacher construction, determinism, metrics and a short training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from adalora import AdaLoRAConfig
from adalora_lab.planted import (
    TARGET_MODULES,
    PlantedRankTask,
    ResidualMLP,
    default_planted_ranks,
    make_planted_task,
    module_names,
    parse_planted,
    rank_recovery,
)

SMALL = dict(dim=16, hidden=32, n_blocks=3, n_train=512, n_eval=256)


@pytest.fixture(scope="module")
def task():
    return make_planted_task(PlantedRankTask(**SMALL, task_seed=7))


def test_module_names_match_the_model():
    m = ResidualMLP(dim=8, hidden=16, n_blocks=4)
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert linears == module_names(4)
    assert linears[:3] == ["blocks.0.up", "blocks.0.down", "blocks.1.up"]
    assert m(torch.randn(5, 8)).shape == (5, 8)


def test_default_pattern_is_heterogeneous():
    p = default_planted_ranks(module_names(6))
    assert p == {**dict.fromkeys(module_names(6), 0), "blocks.1.up": 4, "blocks.4.down": 4, "blocks.2.down": 1,
                 "blocks.5.up": 1}
    assert sum(p.values()) <= len(p)  # average rank 1 can hold every planted direction
    for n in (1, 2, 3, 4, 5, 8, 24):
        q = default_planted_ranks([f"m{i}" for i in range(n)])
        assert len(q) == n and max(q.values()) == 4
        if n >= 4:
            assert sorted(q.values(), reverse=True)[:4] == [4, 4, 1, 1]


def test_parse_planted_spec():
    names = module_names(2)
    assert parse_planted("blocks.0.up:3, blocks.1.down:1", names) == {
        "blocks.0.up": 3, "blocks.0.down": 0, "blocks.1.up": 0, "blocks.1.down": 1}
    assert parse_planted({}, names) == default_planted_ranks(names)
    with pytest.raises(ValueError, match="unknown"):
        parse_planted({"blocks.9.up": 1}, names)
    with pytest.raises(ValueError, match="integers"):
        parse_planted({"blocks.0.up": -1}, names)


def test_teacher_differs_exactly_in_planted_modules_with_planted_ranks(task):
    base = task.new_base()
    planted = task.planted
    assert set(planted) == set(module_names(SMALL["n_blocks"]))
    assert len({r for r in planted.values()}) >= 2 and sum(r > 0 for r in planted.values()) >= 2
    max_rank = max(planted.values())
    for name, r in planted.items():
        w0 = base.get_submodule(name).weight
        w1 = task.teacher.get_submodule(name).weight
        diff = (w1 - w0).double()
        assert int(torch.linalg.matrix_rank(diff, atol=1e-4 * w0.norm().item())) == r, name
        if r:  # equal singular values; delta_scale * ||W|| at the largest planted rank
            sv = torch.linalg.svdvals(diff)[:r]
            expect = w0.norm().item() / math.sqrt(max_rank)
            assert torch.allclose(sv, torch.full_like(sv, expect), rtol=1e-3)
        torch.testing.assert_close(base.get_submodule(name).bias, task.teacher.get_submodule(name).bias)
    assert set(task.deltas) == {n for n, r in planted.items() if r}
    torch.testing.assert_close(task.teacher(task.train_x), task.train_y)
    assert task.train_x.shape == (SMALL["n_train"], SMALL["dim"])
    assert task.eval_y.shape == (SMALL["n_eval"], SMALL["dim"])


def test_determinism_from_task_seed():
    a = make_planted_task(PlantedRankTask(**SMALL, task_seed=3))
    b = make_planted_task(PlantedRankTask(**SMALL, task_seed=3))
    c = make_planted_task(PlantedRankTask(**SMALL, task_seed=4))
    for k, v in a.base_state.items():
        assert torch.equal(v, b.base_state[k])
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.eval_y, b.eval_y)
    assert a.planted == b.planted == c.planted
    assert not torch.equal(a.base_state["blocks.0.up.weight"], c.base_state["blocks.0.up.weight"])
    assert not torch.equal(a.train_x, c.train_x)
    # the global RNG is untouched
    torch.manual_seed(0)
    r0 = torch.rand(3)
    torch.manual_seed(0)
    make_planted_task(PlantedRankTask(**SMALL, task_seed=3))
    assert torch.equal(torch.rand(3), r0)


def test_planted_pattern_changes_only_the_deltas():
    a = make_planted_task(PlantedRankTask(**SMALL, task_seed=5, planted={"blocks.0.up": 2, "blocks.2.down": 1}))
    b = make_planted_task(PlantedRankTask(**SMALL, task_seed=5, planted="blocks.2.down:1"))
    assert b.planted["blocks.0.up"] == 0 and set(b.deltas) == {"blocks.2.down"}
    for k, v in a.base_state.items():
        assert torch.equal(v, b.base_state[k])
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.eval_x, b.eval_x)
    # the same module's ΔW* direction does not depend on what else is planted (its scale follows max rank)
    da, db = a.deltas["blocks.2.down"], b.deltas["blocks.2.down"]
    torch.testing.assert_close(da / da.norm(), db / db.norm())


def test_new_base_is_fresh_and_evaluates_to_one(task):
    m1, m2 = task.new_base(), task.new_base()
    assert m1.blocks[0].up.weight.data_ptr() != m2.blocks[0].up.weight.data_ptr()
    with torch.no_grad():
        m1.blocks[0].up.weight.add_(1.0)
    assert torch.equal(task.new_base().blocks[0].up.weight, m2.blocks[0].up.weight)
    ev = task.evaluate(m2)
    assert ev["relative_error"] == pytest.approx(1.0)
    assert ev["distill_loss"] == pytest.approx(task.base_eval_mse) and ev["distill_loss"] > 0
    assert task.evaluate(task.teacher)["relative_error"] == pytest.approx(0.0, abs=1e-9)


def test_batches_are_seeded(task):
    a, b, c = task.batches(64, seed=1), task.batches(64, seed=1), task.batches(64, seed=2)
    xa, ya = next(a)
    xb, _ = next(b)
    xc, _ = next(c)
    assert xa.shape == (64, SMALL["dim"]) and torch.equal(xa, xb) and not torch.equal(xa, xc)
    torch.testing.assert_close(task.teacher(xa), ya)
    n = sum(1 for _ in zip(range(3 * SMALL["n_train"] // 64), a))  # endless over epochs
    assert n == 3 * SMALL["n_train"] // 64


def test_rank_recovery_hand_made_patterns():
    planted = {"a": 4, "b": 0, "c": 1, "d": 0}
    perfect = rank_recovery({"a": 3, "b": 0, "c": 1, "d": 0}, planted)
    assert perfect["rank_recovery"] == 1.0 and perfect["rank_spearman"] == pytest.approx(1.0)
    uniform = rank_recovery(dict.fromkeys("abcd", 1), planted)
    assert uniform["rank_recovery"] == 0.5 == uniform["rank_recovery_uniform"]
    assert uniform["rank_spearman"] == 0.0  # constant kept ranks
    assert uniform["rank_coverage"] == pytest.approx(2 / 5)
    wrong = rank_recovery({"a": 0, "b": 2, "c": 0, "d": 2}, planted)
    assert wrong["rank_recovery"] == 0.0 and wrong["rank_spearman"] < 0 and wrong["rank_coverage"] == 0.0
    assert rank_recovery(dict.fromkeys("abcd", 0), planted)["rank_recovery"] == 0.0
    # a module missing from the pattern counts as kept rank 0
    assert rank_recovery({"a": 2}, planted)["rank_recovery"] == 1.0


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    yield
    torch.set_num_threads(n)


def _planted_run(tmp_path, method: str, steps: int, lr: float, extra=()):
    from adalora_lab.loop import train
    from helpers import compose_run

    cfg = compose_run(["experiment=planted_rank", f"method={method}", f"max_steps={steps}", f"optim.lr={lr}",
                       "batch_size=64", f"eval_every={steps // 2}", "logger=none", "progress=false",
                       *(f"task.planted.{k}={v}" for k, v in SMALL.items() if k != "planted"), *extra])
    return train(cfg, tmp_path / method)


def test_short_adalora_training_keeps_the_budget_and_learns(tmp_path, one_thread):
    """Through the training loop, the one planted pipeline: the exact budget, and it learns."""
    out = _planted_run(tmp_path, "adalora", steps=300, lr=3e-2, extra=["method.init_r=4"])
    pattern = json.loads((tmp_path / "adalora" / "rank_pattern.json").read_text())
    assert sum(pattern.values()) == out["final_budget"] == len(pattern)  # target_r 1 per module
    evals = [r for r in map(json.loads, (tmp_path / "adalora" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"]
    assert out["final"]["relative_error"] < 0.5  # the untrained student is at 1.0
    assert evals[-1]["relative_error"] <= evals[0]["relative_error"] * 1.05
    assert 0.0 <= out["final"]["rank_recovery"] <= 1.0


def test_short_lora_training_learns(tmp_path, one_thread):
    out = _planted_run(tmp_path, "lora", steps=200, lr=1e-2)
    assert out["final"]["relative_error"] < 0.8
    assert out["final"]["rank_recovery"] == pytest.approx(out["final"]["rank_recovery_uniform"])


def test_loop_batches_are_the_task_batches(task):
    """One batch order: the workload's epoch e is PlantedTask.epoch_batches(seed, e), which batches() chains."""
    endless = task.batches(64, seed=3)
    per_epoch = SMALL["n_train"] // 64
    for epoch in range(2):
        for x, y in task.epoch_batches(64, 3, epoch):
            xe, ye = next(endless)
            assert torch.equal(x, xe) and torch.equal(y, ye)
    resumed = list(task.epoch_batches(64, 3, 1, start=2))
    assert len(resumed) == per_epoch - 2
    assert torch.equal(resumed[0][0], list(task.epoch_batches(64, 3, 1))[2][0])


def test_loss_decreases_plain_loop(task, one_thread):
    """The library API as a hand-written training loop would use it."""
    from adalora import RankAllocator, inject_adapters, orthogonal_regularization

    torch.manual_seed(0)
    model = task.new_base()
    cfg = AdaLoRAConfig(init_r=2, target_r=1, target_modules=list(TARGET_MODULES), tinit=10, tfinal=40,
                        delta_t=5, total_steps=120)
    adapters = inject_adapters(model, cfg)
    alloc = RankAllocator(adapters, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for t, (x, y) in zip(range(1, 121), task.batches(64, seed=0)):
        loss = F.mse_loss(model(x), y)
        (loss + cfg.orth_reg_weight * orthogonal_regularization(adapters)).backward()
        opt.step()
        alloc.step(t)
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert sum(alloc.rank_pattern().values()) == len(adapters)


def test_config_validation():
    with pytest.raises(ValueError, match="dim"):
        PlantedRankTask(dim=0)
    with pytest.raises(ValueError, match="delta_scale"):
        PlantedRankTask(delta_scale=0.0)
