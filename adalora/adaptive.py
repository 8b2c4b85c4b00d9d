"""What a training loop, a Trainer callback and a checkpoint need from any adaptive-rank method.

``AdaptiveMethod`` is the core every controller has: ``RankAllocator`` (AdaLoRA), ``SoRAGates`` (SoRA) and
``RankGrower`` (IncreLoRA) satisfy it structurally. ``keep_masks()`` is the same on all three: {module: bool (r,)}
over the adapter's rows, True for the components in use (AdaLoRA: the kept triplets; SoRA: the non-zero gates;
IncreLoRA: the active parts); ``save_adapter`` slices the saved tensors with it.

The optional hooks below differ between methods; call them through the helper functions, which give the neutral
answer for a controller that lacks the hook:

    hook                         RankAllocator             SoRAGates                  RankGrower
    regularization() -> loss     (helper: γ · R(P, Q))     l1_weight · mean|g|        γ · R(P, Q), all parts
    own_parameters()             []                        the gates (not in the      []
                                                           main optimizer)
    attach_optimizer(opt)        -                         -                          required before growth
    set_lr(lr)                   -                         gates' lr for the step     restart warm-up groups
    zero_grad()                  -                         clears the gates' grads    -
    structure_version            int(compacted)            bumped by compact()        bumped by every growth
                                                                                      round and compact()

One optimizer step t (from 1), for any of them:

    lr = schedule(t); set every main group's lr; set_lr(method, lr)
    loss = task_loss + (regularization(method) or 0); loss.backward()
    clip(main params + own_parameters(method)); optimizer.step()
    info = method.step(t); optimizer.zero_grad(); zero_grad(method)
    if structure_version(method) changed: rebuild the lists of parameters you hold (clipping, DDP)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .allocator import RankAllocator, StepInfo
from .config import AdaLoRAConfig, ConfigError, IncreLoRAConfig, LoRAConfig, SoRAConfig
from .increlora import RankGrower, inject_increlora
from .inject import inject_adapters
from .layers import AdapterLayer
from .regularizers import orthogonal_regularization
from .sora import SoRAGates, inject_sora


@runtime_checkable
class AdaptiveMethod(Protocol):
    """The core of an adaptive-rank controller (step counter from 1, ranks, budget, checkpoint, compaction)."""

    def step(self, global_step: int | None = None) -> StepInfo:
        """Call after the t-th ``optimizer.step()`` and before ``zero_grad()``."""

    def rank_pattern(self) -> dict[str, int]:
        """{module name: rank in use now}."""

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """{module name: bool mask (r,)}, one entry per row of the adapter's A: True for a component in use."""

    @property
    def budget(self) -> int:
        """The total rank the method stands at (AdaLoRA: b(t); SoRA: non-zero gates; IncreLoRA: active rank)."""

    def state_dict(self) -> dict:
        """Plain values and tensors: loads with ``torch.load(weights_only=True)``."""

    def load_state_dict(self, state: dict) -> None:
        """Restore; reshapes the adapters first where the saved run changed them, so load it before the model's
        weights and build the optimizer after."""

    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Physically drop the components that no longer count, with ``optimizer``'s state for them."""


def regularization(method: AdaptiveMethod) -> torch.Tensor | None:
    """The method's extra loss term, weight included (None: nothing to add)."""
    if hasattr(method, "regularization"):
        return method.regularization()
    cfg = getattr(method, "cfg", None)
    if isinstance(cfg, AdaLoRAConfig) and cfg.adapter == "svd" and cfg.orth_reg_weight > 0:
        return cfg.orth_reg_weight * orthogonal_regularization(method.adapters, form=cfg.orth_reg_form)
    return None


def own_parameters(method: AdaptiveMethod) -> list[nn.Parameter]:
    """Parameters the method optimizes itself: keep them out of the main optimizer (but clip them with it)."""
    return list(method.own_parameters()) if hasattr(method, "own_parameters") else []


def attach_optimizer(method: AdaptiveMethod, optimizer: torch.optim.Optimizer) -> None:
    """Give the method the main optimizer (IncreLoRA adds its new Parameters to it); a no-op for the others."""
    if hasattr(method, "attach_optimizer"):
        method.attach_optimizer(optimizer)


def set_lr(method: AdaptiveMethod, lr: float) -> None:
    """The main learning rate of the coming optimizer step, for methods with their own learning rates."""
    if hasattr(method, "set_lr"):
        method.set_lr(lr)


def zero_grad(method: AdaptiveMethod) -> None:
    """Clear the gradients of the parameters the method owns (the main optimizer does not see them)."""
    if hasattr(method, "zero_grad"):
        method.zero_grad()


def structure_version(method: AdaptiveMethod) -> int:
    """A counter that changes whenever the method replaced, added or removed Parameters."""
    if hasattr(method, "structure_version"):
        return int(method.structure_version)
    return int(bool(getattr(method, "compacted", False)))


def inject_method(model: nn.Module, cfg) -> dict[str, AdapterLayer]:
    """The adapters a config asks for: LoRA / AdaLoRA (``inject_adapters``), SoRA, IncreLoRA."""
    if isinstance(cfg, SoRAConfig):
        return inject_sora(model, cfg)
    if isinstance(cfg, IncreLoRAConfig):
        return inject_increlora(model, cfg)
    if isinstance(cfg, (LoRAConfig, AdaLoRAConfig)):
        return inject_adapters(model, cfg)
    raise ConfigError(f"no adapters for a {type(cfg).__name__}: use LoRAConfig, AdaLoRAConfig, SoRAConfig or "
                      "IncreLoRAConfig")


def make_controller(adapters: Mapping[str, AdapterLayer], cfg, optimizer: torch.optim.Optimizer | None = None,
                    lr: float | None = None) -> AdaptiveMethod | None:
    """The controller for a config (None for fixed-rank LoRA). ``lr``: the main peak learning rate (SoRA's gates
    and IncreLoRA's restart warm-up derive theirs from it). ``optimizer`` is attached where the method needs it;
    build IncreLoRA's controller before the optimizer and attach it after (``attach_optimizer``)."""
    if isinstance(cfg, LoRAConfig):
        return None
    if isinstance(cfg, AdaLoRAConfig):
        return RankAllocator(adapters, cfg)
    if isinstance(cfg, SoRAConfig):
        return SoRAGates(adapters, cfg, lr=lr)
    if isinstance(cfg, IncreLoRAConfig):
        return RankGrower(adapters, cfg, lr=lr, optimizer=optimizer)
    raise ConfigError(f"no adaptive method for a {type(cfg).__name__}: use AdaLoRAConfig, SoRAConfig or "
                      "IncreLoRAConfig")
