"""The run's state: what a checkpoint must carry, beyond tensors, to continue a run exactly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["RunState"]


@dataclass
class RunState:
    """Counters and metrics of a run in progress. A checkpoint holds it (as ``payload["state"]``) beside the
    trainable tensors, the optimizer, the allocator and the RNG states."""

    step: int = 0  # optimizer steps done (the allocator's counter; from 1 at the first step)
    epoch: int = 0
    consumed: int = 0  # batches of the current epoch already used (micro-batches under grad_accum)
    loss_ema: float | None = None  # smoothed train loss (progress bar)
    first_loss: float | None = None  # train loss of step 1: the reference for the divergence check
    last_loss: float | None = None  # train loss of the latest step
    best: dict = field(default_factory=dict)  # the best evaluation so far, with its "step"
    last_eval: dict = field(default_factory=dict)
    skipped: int = 0  # steps skipped for a non-finite loss (skip_nonfinite=true)
    last_ranks: dict = field(default_factory=dict)  # the pattern of the last rank_history line
    final_logged: bool = False  # the final phase's pattern is in rank_history.jsonl
    compacted: bool = False  # the method's compact() ran (the adapters are at their final ranks)
    lr_sum: float = 0.0  # sum of the learning rates applied so far: the bound on AdaLoRA's |λ| growth
    elapsed: float = 0.0  # wall seconds spent by the earlier pieces of a resumed run
    # where the run computed (environment.environment, with the step it began at); a resume in another one adds
    # an entry, since the steps from there on are not bit-identical to an uninterrupted run's
    environments: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
