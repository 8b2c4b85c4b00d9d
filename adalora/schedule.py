"""The cubic budget schedule as a pure function: the total number of kept singular values falls from the sum of
the initial ranks to target_r x n_modules along a cubic, between the warm-up and the final phase."""

from __future__ import annotations

from typing import NamedTuple


class Budget(NamedTuple):
    budget: int  # total number of kept singular values over all modules
    mask: bool  # whether this step re-masks to ``budget``
    phase: str  # "warmup" | "decrease" | "final"


def budget_schedule(step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_steps: int, delta_t: int) -> Budget:
    """Budget b(t) at optimizer step ``t`` (counted from 1).

    - t <= tinit: b(0), no masking;
    - tinit < t < T - tfinal: int(b(T) + (b(0) - b(T)) (1 - (t - tinit)/(T - tfinal - tinit))^3),
      masking when t % delta_t == 0;
    - t >= T - tfinal: b(T), mask every step (the pattern is fixed from t = T - tfinal on).

    The reference masks at T - tfinal only when it falls on the delta_t grid and PEFT forces it;
    we force it too, so that the final budget is reached even with tfinal = 0.
    """
    if step <= tinit:
        return Budget(init_budget, False, "warmup")
    t_end = total_steps - tfinal
    if step >= t_end:
        return Budget(target_budget, True, "final")
    frac = 1.0 - (step - tinit) / (t_end - tinit)
    b = int(target_budget + (init_budget - target_budget) * frac**3)
    return Budget(b, step % delta_t == 0, "decrease")
