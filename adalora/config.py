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
    ``optimizer.step()``. The schedule: no masking for t <= tinit, a cubic decrease of
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


SORA_PROX = ("soft", "reference")
SORA_THRESHOLD_SCALE = ("none", "lr")
SORA_LAMBDA_SCHEDULES = ("linear", "log_linear", "exp_linear")


@dataclass
class SoRAConfig:
    """SoRA (Ding et al., EMNLP 2023): W = W0 + B diag(g) A * alpha / r with a sparse gate g (r,) per module.

    Defaults are the authors' GLUE script (TsinghuaC3I/SoRA scripts/run_glue_sora_no_schedule.sh with
    config/lora_config.json): r_max = 8, alpha 16, loss + l1_weight * mean|g| (their ``--sparse_lambda 10``) and,
    after every Adam step of the gates, a soft threshold at ``threshold`` (their ``--sparse_lambda_2 3e-4``, the
    paper's xi). The gates have their own Adam (betas 0.9/0.999, eps 1e-6, no weight decay) at ``sparse_lr``
    (None: the main learning rate, the authors' default), following the main schedule.

    Budget-matched mode (opt-in, not in the authors' code): with ``target_r`` set, b = ``target_r * n_modules``.
    The threshold never takes the non-zero gates below b (when it would, the b largest |g| before it keep their
    value), and after optimizer step ``total_steps - tfinal`` only the b largest |g| stay non-zero; the others are
    zeroed and frozen at 0 for the rest of the run. So the run ends with exactly b non-zero gates, like LoRA at
    rank ``target_r`` and AdaLoRA at the same target.
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: TargetModules = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list = field(default_factory=list)
    rank_pattern: dict = field(default_factory=dict)  # {module name: r}, overrides r per module
    l1_weight: float = 10.0  # the authors' --sparse_lambda: loss += l1_weight * mean over all gates of |g|
    threshold: float = 3e-4  # the authors' --sparse_lambda_2 (xi): soft-threshold of every gate step
    threshold_scale: Literal["none", "lr"] = "none"  # "none": tau = xi (the code); "lr": tau = lr * xi (paper)
    prox: Literal["soft", "reference"] = "soft"  # "reference": the code's three masked updates (dead zone 2 xi)
    sparse_lr: float | None = None  # peak learning rate of the gates; None: the main learning rate
    gate_betas: tuple = (0.9, 0.999)
    gate_eps: float = 1e-6  # transformers.AdamW's default, which the authors' SparseAdamW inherits
    lambda_schedule: Literal["linear", "log_linear", "exp_linear"] | None = None  # sparsifying scheduler
    max_lambda: float | None = None  # last xi of the schedule
    lambda_num: int = 10  # number of xi values, the first being ``threshold``
    lambda_stage_steps: int | None = None  # optimizer steps of each stage after the first (authors: 15 epochs)
    target_r: int | None = None  # opt-in budget-matched mode: keep at most target_r * n_modules gates
    tfinal: int = 0  # budget-matched mode: the cap is applied after step total_steps - tfinal
    total_steps: int | None = None

    def __post_init__(self):
        cls = "SoRAConfig"
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            _fail(cls, "r", self.r, "the initial (maximal) rank must be an integer >= 1", "use e.g. r=8")
        for name in ("l1_weight", "threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0:
                _fail(cls, name, v, "must be a number >= 0", f"use {name}=0 to switch it off")
        if self.threshold_scale not in SORA_THRESHOLD_SCALE:
            _fail(cls, "threshold_scale", self.threshold_scale, f"expected one of {SORA_THRESHOLD_SCALE}",
                  "use 'none' (the authors' code: the threshold is xi itself)")
        if self.prox not in SORA_PROX:
            _fail(cls, "prox", self.prox, f"expected one of {SORA_PROX}", "use 'soft'")
        if self.sparse_lr is not None and not (self.sparse_lr > 0):
            _fail(cls, "sparse_lr", self.sparse_lr, "must be > 0", "use None to train the gates at the main lr")
        if len(tuple(self.gate_betas)) != 2 or not all(0.0 <= b < 1.0 for b in self.gate_betas):
            _fail(cls, "gate_betas", self.gate_betas, "needs two Adam betas in [0, 1)", "use (0.9, 0.999)")
        if not (self.gate_eps > 0):
            _fail(cls, "gate_eps", self.gate_eps, "must be > 0", "use 1e-6")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            _fail(cls, "total_steps", self.total_steps, "must be the number of optimizer steps, >= 1",
                  "pass len(train_loader) // grad_accum * epochs")
        if self.lambda_schedule is not None:
            if self.lambda_schedule not in SORA_LAMBDA_SCHEDULES:
                _fail(cls, "lambda_schedule", self.lambda_schedule, f"expected None or one of {SORA_LAMBDA_SCHEDULES}",
                      "use 'linear' as in run_glue_sora_schedule_dense.sh")
            if self.max_lambda is None or not (self.max_lambda >= 0):
                _fail(cls, "max_lambda", self.max_lambda, "the schedule needs its last threshold, >= 0",
                      "use e.g. max_lambda=7e-4 as in run_glue_sora_schedule_dense.sh")
            if not isinstance(self.lambda_num, int) or self.lambda_num < 2:
                _fail(cls, "lambda_num", self.lambda_num, "a schedule needs at least 2 thresholds", "use e.g. 7")
            if not isinstance(self.lambda_stage_steps, int) or self.lambda_stage_steps < 1:
                _fail(cls, "lambda_stage_steps", self.lambda_stage_steps,
                      "the schedule needs the length of each later stage in optimizer steps",
                      "use 15 epochs' worth of steps as the authors")
            if self.total_steps is None:
                _fail(cls, "total_steps", None, "the schedule's first stage is the main run of total_steps",
                      "set total_steps")
            if self.lambda_schedule == "exp_linear" and not (self.threshold > 0 and self.max_lambda > 0):
                _fail(cls, "threshold", self.threshold, "exp_linear interpolates log(xi), so both ends must be > 0",
                      "use threshold > 0 and max_lambda > 0, or lambda_schedule='linear'")
        if self.target_r is not None:
            if not isinstance(self.target_r, int) or isinstance(self.target_r, bool) or self.target_r < 1:
                _fail(cls, "target_r", self.target_r, "the budget-matched average rank must be an integer >= 1",
                      "use e.g. target_r=2, or None for SoRA's own sparsity")
            if self.target_r > self.r:
                _fail(cls, "target_r", self.target_r, f"cannot exceed the initial rank r={self.r}",
                      f"raise r to at least {self.target_r} or lower target_r")
            if self.total_steps is None:
                _fail(cls, "total_steps", None, "the budget-matched mode applies its cap at total_steps - tfinal",
                      "set total_steps")
        if not isinstance(self.tfinal, int) or self.tfinal < 0:
            _fail(cls, "tfinal", self.tfinal, "must be an integer number of optimizer steps >= 0", "use tfinal=0")
        if self.target_r is not None and self.tfinal >= self.total_steps:
            _fail(cls, "tfinal", self.tfinal, f"must be < total_steps = {self.total_steps}",
                  "lower tfinal so that the cap falls inside the run")
        _check_common(cls, self)

    @property
    def init_r(self) -> int:
        return self.r


INCRE_SCALES = ("rank", "fixed")


@dataclass
class IncreLoRAConfig:
    """IncreLoRA (Zhang et al., 2023): every module starts at ``init_r`` and grows to an average of ``target_r``.

    Defaults are the authors' GLUE scripts (FeiyuZhang98/IncreLoRA NLU/scripts/rank=8, DeBERTaV3-base): init_r 1,
    target_r 8, alpha 32, init_warmup 100 (``tinit``), incre_interval 100 (``delta_t``), top_h 10 (MRPC; the
    scripts use 3 to 10 by task), beta1 = beta2 = 0.85, orthogonal regularizer 0.1, advance learning and the
    restart warm-up (``multi_lr``) on. ``incre_rank_num`` None takes the authors' table target_r // 2.

    Steps are optimizer steps counted from 1: call ``RankGrower.step(t)`` after the t-th ``optimizer.step()``;
    t - 1 is the authors' 0-based ``global_step``, so growth happens after step t when t - 1 > tinit and
    (t - 1) % delta_t == 0.
    """

    init_r: int = 1
    target_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: TargetModules = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list = field(default_factory=list)
    rank_pattern: dict = field(default_factory=dict)  # {module name: r}, overrides init_r per module
    tinit: int = 100  # the authors' init_warmup
    delta_t: int = 100  # the authors' incre_interval
    top_h: int = 10  # modules grown per round
    incre_rank_num: int | None = None  # ranks added to a grown module; None: target_r // 2 (at least 1)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    advance_learn: bool = True  # reserve components train (E fixed at 1e-5) before they are added
    scale: Literal["rank", "fixed"] = "rank"  # "rank": alpha / current rank (authors); "fixed": alpha / target_r
    restart_warmup: int | None = 100  # lr warm-up of each newly added group (authors: the run's warmup steps)
    total_steps: int | None = None

    def __post_init__(self):
        cls = "IncreLoRAConfig"
        for name in ("init_r", "target_r"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(cls, name, v, "must be an integer >= 1", f"use e.g. {name}={'1' if name == 'init_r' else '8'}")
        if self.target_r < self.init_r:
            _fail(cls, "target_r", self.target_r, f"IncreLoRA only grows: the final rank cannot be below init_r="
                  f"{self.init_r}", "lower init_r (the authors start at 1) or raise target_r")
        if not isinstance(self.tinit, int) or self.tinit < 0:
            _fail(cls, "tinit", self.tinit, "must be an integer number of optimizer steps >= 0",
                  "use e.g. tinit=100 as the authors (their init_warmup)")
        for name in ("delta_t", "top_h"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(cls, name, v, "must be an integer >= 1", f"use e.g. {name}=10")
        if self.incre_rank_num is not None and (not isinstance(self.incre_rank_num, int) or self.incre_rank_num < 1):
            _fail(cls, "incre_rank_num", self.incre_rank_num, "must be an integer >= 1",
                  "use None for the authors' target_r // 2")
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not (0.0 < b < 1.0):
                _fail(cls, name, b, "an EMA coefficient must be in (0, 1)", f"use {name}=0.85 as the authors")
        if not (self.orth_reg_weight >= 0):
            _fail(cls, "orth_reg_weight", self.orth_reg_weight, "must be >= 0", "use 0.1 or 0.3 as the authors")
        if self.scale not in INCRE_SCALES:
            _fail(cls, "scale", self.scale, f"expected one of {INCRE_SCALES}", "use 'rank' (the authors' code)")
        if self.restart_warmup is not None and (not isinstance(self.restart_warmup, int) or self.restart_warmup < 0):
            _fail(cls, "restart_warmup", self.restart_warmup, "must be an integer number of steps >= 0 or None",
                  "use the run's warm-up steps, or None to train new components on the main schedule")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            _fail(cls, "total_steps", self.total_steps, "must be the number of optimizer steps, >= 1",
                  "pass len(train_loader) // grad_accum * epochs")
        _check_common(cls, self)
        if self.target_r == self.init_r and not self.rank_pattern:
            warnings.warn(f"{cls}: target_r == init_r == {self.init_r}, so there is nothing to grow.", stacklevel=3)

    @property
    def r(self) -> int:
        return self.init_r

    @property
    def rank_step(self) -> int:
        """Ranks added to a module each time it is chosen (the authors' incre_rank_num)."""
        return self.incre_rank_num if self.incre_rank_num is not None else max(1, self.target_r // 2)
