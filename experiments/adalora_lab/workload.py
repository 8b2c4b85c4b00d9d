"""What the training loop needs from a task, and the one place that picks the task's builder.

A workload is a model, its batches in a resumable order, a loss and an evaluation. The builders live beside
their data: ``glue.glue_workload`` (sequence classification), ``planted.planted_workload`` (the planted-rank
benchmark) and ``causal_lm.causal_lm_workload`` (instruction tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .schema import RunConfig

__all__ = ["Workload", "build_workload", "to_device"]


@dataclass
class Workload:
    """What the loop needs from a task: a model, batches, a loss and an evaluation."""

    model: nn.Module
    batches_per_epoch: int
    epoch_batches: Callable[[int, int], Iterator]  # (epoch, batches to skip) -> that epoch's batches
    loss_fn: Callable[[nn.Module, object], torch.Tensor]
    evaluate: Callable[[nn.Module], dict]
    main_metric: str
    higher_is_better: bool
    planted: dict | None = None  # {module name: planted rank} for the planted task
    # what the run read, by content (data files' sha256, model and tokenizer identity): a resumed or reused
    # run must have read the same, whatever the config says
    inputs: dict = field(default_factory=dict)
    task_type: str | None = None  # PEFT task type of the exported adapter: SEQ_CLS, CAUSAL_LM or None
    # called once after the last evaluation, on rank 0, with the trained model and the run folder: the task's
    # own artefacts (instruct: samples.jsonl of prompt / reference / greedy output)
    finish: Callable[[nn.Module, Path], object] | None = None
    base_model: str | None = None  # Hub name or folder of the base, for an export's base_model_name_or_path


def to_device(batch, device: torch.device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return tuple(t.to(device, non_blocking=True) for t in batch)


def build_workload(cfg: RunConfig, device: torch.device) -> Workload:
    """The task's workload: every data and model error surfaces here, before any step."""
    if cfg.task.name == "planted_rank":
        from .planted import planted_workload

        return planted_workload(cfg, device)
    if cfg.task.name == "instruct":
        from .causal_lm import causal_lm_workload

        return causal_lm_workload(cfg, device)
    from .glue import glue_workload

    return glue_workload(cfg, device)
