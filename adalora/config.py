"""Method configs: plain dataclasses, validated at construction.

Every check names the field and says how to fix it, so a bad sweep value fails in
the first second instead of an hour into a run.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal, Union

TargetModules = Union[list, tuple, str]

SCORES = ("ipt", "sensitivity", "magnitude")
ORTH_FORMS = ("reference", "paper")
ADAPTERS = ("svd", "lora")
ON_BAD_SCORES = ("raise", "skip")


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names field and fix."""


def _fail(cls: str, fld: str, value, why: str, fix: str):
    raise ConfigError(f"{cls}.{fld}={value!r}: {why}. Fix: {fix}.")


def _check_targets(cls: str, targets, modules_to_save) -> None:
    if isinstance(targets, str):
        if not targets:
            _fail(cls, "target_modules", targets, "empty regex",
                  "give module suffixes such as ['query', 'value'] or a regex")
    elif isinstance(targets, (list, tuple)):
        if len(targets) == 0:
            _fail(cls, "target_modules", targets, "no module to adapt",
                  "list module suffixes such as ['query', 'value']")
        bad = [t for t in targets if not isinstance(t, str) or not t]
        if bad:
            _fail(cls, "target_modules", targets, f"entries {bad!r} are not non-empty strings",
                  "list module names as strings")
    else:
        _fail(cls, "target_modules", targets, "must be a list of module-name suffixes or a regex string",
              "use e.g. ['query', 'value']")
    if not isinstance(modules_to_save, (list, tuple)) or any(not isinstance(m, str) or not m for m in modules_to_save):
        _fail(cls, "modules_to_save", modules_to_save, "must be a list of module-name suffixes",
              "use e.g. ['classifier']")


def _check_finite(cls: str, c) -> None:
    """NaN and inf pass most range checks (``nan < 0`` is False), so they are refused first, for every field."""
    for f in fields(c):
        v = getattr(c, f.name)
        if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and not math.isfinite(v):
            default = "" if f.default is MISSING else f" (the default is {f.default!r})"
            _fail(cls, f.name, v, "must be a finite number, not NaN or inf", f"give a finite {f.name}{default}")


def _check_common(cls: str, c) -> None:
    if not (c.lora_alpha > 0):
        _fail(cls, "lora_alpha", c.lora_alpha, "must be > 0 (the adapter's scale is alpha / r)",
              "use e.g. lora_alpha=16")
    if not (0.0 <= c.lora_dropout < 1.0):
        _fail(cls, "lora_dropout", c.lora_dropout, "must be in [0, 1)", "use e.g. lora_dropout=0.0 or 0.1")
    _check_targets(cls, c.target_modules, c.modules_to_save)
    for name, r in dict(c.rank_pattern).items():
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            _fail(cls, "rank_pattern", {name: r}, "ranks must be integers >= 0", "give {module name: rank}")


@dataclass
class LoRAConfig:
    """Fixed-rank LoRA: W = W0 + B A * scale, B zero at init, scale = alpha / r (or alpha / sqrt(r))."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: TargetModules = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list = field(default_factory=list)
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)  # {module name: r}, overrides r per module

    def __post_init__(self):
        _check_finite("LoRAConfig", self)
        if not isinstance(self.r, int) or self.r < 1:
            _fail("LoRAConfig", "r", self.r, "the LoRA rank must be an integer >= 1", "use e.g. r=8")
        _check_common("LoRAConfig", self)

    @property
    def init_r(self) -> int:
        return self.r


@dataclass
class AdaLoRAConfig:
    """AdaLoRA: W = W0 + P diag(E) Q * alpha / init_r, with a cubic budget schedule over all triplets.

    Steps are optimizer steps counted from 1: call ``RankAllocator.step(t)`` after the t-th
    ``optimizer.step()``. The schedule (facts §3): no masking for t <= tinit, a cubic decrease of
    the total budget from init_r * n to target_r * n until total_steps - tfinal, then the final
    phase at exactly target_r * n with frozen scores.
    """

    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: TargetModules = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list = field(default_factory=list)
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    total_steps: int | None = None
    score: Literal["ipt", "sensitivity", "magnitude"] = "ipt"
    prune: bool = True  # False: SVD-LoRA, the same adapter with no pruning
    adapter: Literal["svd", "lora"] = "svd"  # "lora": prune-LoRA, scoring plain B A rank components
    orth_reg_form: Literal["reference", "paper"] = "reference"
    rank_pattern: dict = field(default_factory=dict)  # {module name: r}, overrides init_r per module
    # a masking step whose triplet scores are all 0 or not finite (grads None, zero or NaN): "raise" stops with
    # the cause and the fix; "skip" warns once, keeps the previous mask and leaves non-finite grads out of the EMAs
    on_bad_scores: Literal["raise", "skip"] = "raise"

    def __post_init__(self):
        cls = "AdaLoRAConfig"
        _check_finite(cls, self)
        if not isinstance(self.init_r, int) or self.init_r < 1:
            _fail(cls, "init_r", self.init_r, "the initial rank must be an integer >= 1",
                  "use e.g. init_r=12 (1.5x target_r)")
        if not isinstance(self.target_r, int) or self.target_r < 1:
            _fail(cls, "target_r", self.target_r, "the final average rank must be an integer >= 1",
                  "use e.g. target_r=8")
        if self.target_r > self.init_r:
            _fail(cls, "target_r", self.target_r, f"the final rank cannot exceed init_r={self.init_r}",
                  f"raise init_r to at least {self.target_r} (1.5x target_r is the paper's choice) or lower target_r")
        if not isinstance(self.delta_t, int) or self.delta_t < 1:
            _fail(cls, "delta_t", self.delta_t, "the masking interval must be an integer >= 1",
                  "use delta_t=1 to mask every step")
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not (0.0 <= b < 1.0):
                _fail(cls, name, b, "an EMA coefficient must be in [0, 1)",
                      f"use e.g. {name}=0.85 as in every reference script")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                _fail(cls, name, v, "must be an integer number of optimizer steps >= 0", f"set {name} to a step count")
        if self.orth_reg_weight < 0:
            _fail(cls, "orth_reg_weight", self.orth_reg_weight, "must be >= 0",
                  "use 0.1-0.3 as in the paper, or 0 to switch it off")
        if self.score not in SCORES:
            _fail(cls, "score", self.score, f"unknown score, expected one of {SCORES}", "use score='ipt' (AdaLoRA)")
        if self.adapter not in ADAPTERS:
            _fail(cls, "adapter", self.adapter, f"expected one of {ADAPTERS}", "use adapter='svd'")
        if self.adapter == "lora" and self.score == "magnitude":
            _fail(cls, "score", self.score, "plain LoRA components have no singular value to rank by",
                  "use score='ipt' with adapter='lora'")
        if self.orth_reg_form not in ORTH_FORMS:
            _fail(cls, "orth_reg_form", self.orth_reg_form, f"expected one of {ORTH_FORMS}", "use 'reference'")
        if self.on_bad_scores not in ON_BAD_SCORES:
            _fail(cls, "on_bad_scores", self.on_bad_scores, f"expected one of {ON_BAD_SCORES}",
                  "use 'raise' (stop at the first masking step without usable scores) or 'skip'")
        if self.total_steps is not None:
            if not isinstance(self.total_steps, int) or self.total_steps < 1:
                _fail(cls, "total_steps", self.total_steps, "must be the number of optimizer steps, >= 1",
                      "pass len(train_loader) // grad_accum * epochs")
            if self.prune and self.tinit + self.tfinal >= self.total_steps:
                _fail(cls, "tinit", self.tinit,
                      f"tinit + tfinal = {self.tinit + self.tfinal} must be < total_steps = {self.total_steps}, "
                      "or the budget-decreasing phase is empty",
                      "lower tinit/tfinal (the authors let the decreasing phase cover about half of training) "
                      "or raise total_steps")
        _check_common(cls, self)
        if self.prune and self.target_r == self.init_r and not self.rank_pattern:
            warnings.warn(f"{cls}: target_r == init_r == {self.init_r}, so there is nothing to prune; "
                          "the allocator will only score. Set init_r > target_r to prune.", stacklevel=3)

    @property
    def r(self) -> int:
        return self.init_r
