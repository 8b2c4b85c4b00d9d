"""The cubic budget schedule: endpoints, formula, monotonicity, masking grid."""

from __future__ import annotations

import pytest

from adalora import budget_schedule

B0, BT = 48, 32


def sched(t, *, tinit=10, tfinal=20, total=200, delta_t=5, b0=B0, bt=BT):
    return budget_schedule(t, init_budget=b0, target_budget=bt, tinit=tinit, tfinal=tfinal, total_steps=total,
                           delta_t=delta_t)


def formula(t, tinit, tfinal, total, b0=B0, bt=BT):
    return int(bt + (b0 - bt) * (1 - (t - tinit) / (total - tfinal - tinit)) ** 3)


@pytest.mark.parametrize("tinit, tfinal, total, delta_t", [(10, 20, 200, 5), (0, 0, 50, 1), (7, 0, 40, 3),
                                                           (0, 13, 30, 4)])
def test_budget_schedule_shape(tinit, tfinal, total, delta_t):
    kw = dict(tinit=tinit, tfinal=tfinal, total=total, delta_t=delta_t)
    prev = None
    for t in range(0, total + 5):
        b = sched(t, **kw)
        if t <= tinit:
            assert b.budget == B0 and not b.mask and b.phase == "warmup", t
        elif t < total - tfinal:
            assert b.budget == formula(t, tinit, tfinal, total), t
            assert B0 >= b.budget >= BT
            assert b.mask == (t % delta_t == 0) and b.phase == "decrease", t
        else:  # from T - tfinal on (T itself when tfinal = 0): exactly b(T), masking every step
            assert b.budget == BT and b.mask and b.phase == "final", t
        if prev is not None:
            assert b.budget <= prev, t  # monotone non-increasing
        prev = b.budget
    assert sched(total - tfinal, **kw).budget == BT == formula(total - tfinal, tinit, tfinal, total)


def test_cubic_shape_midpoints():
    # halfway through the decrease (tinit=10, T-tf=180): (1 - 1/2)^3 = 1/8 of the gap is left
    assert sched(95).budget == int(BT + (B0 - BT) / 8) == 34
    # a quarter in: (3/4)^3 of the gap, the cubic falls fast at first
    assert sched(52).budget == int(BT + (B0 - BT) * (1 - 42 / 170) ** 3)
    first = sched(11).budget
    assert first == int(BT + 16 * (1 - 1 / 170) ** 3) == 47  # the first decrease step already drops one
    drops = [sched(t).budget - sched(t + 1).budget for t in range(11, 179)]
    assert sum(drops[:42]) > sum(drops[-42:])  # convex: early drops exceed late ones


def test_mask_every_delta_t_only_in_decrease():
    masks = [t for t in range(1, 181) if sched(t).mask]
    assert masks == list(range(15, 180, 5)) + [180]
    assert all(sched(t).mask for t in range(180, 201))


def test_equal_budgets_never_change():
    for t in range(0, 60):
        assert sched(t, b0=16, bt=16, total=50, tinit=5, tfinal=5).budget == 16
