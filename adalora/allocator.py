"""RankAllocator: importance EMAs, triplet scores, the cubic budget and global top-b masking.

State lives in one small class. The math is in ``scores.py`` / ``schedule.py`` as pure functions,
the flat parameter layout in ``flat.py``.

Speed: the adapter parameters and their gradients are views into one flat buffer each
(``FlatLayout``), and the two EMAs are flat buffers of the same size, so one scoring step is ~5
elementwise kernels over all adapters. Scoring steps never sync with the host; a masking step syncs
once (one number: whether its scores are usable), and ``rank_pattern()`` once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .config import AdaLoRAConfig, ConfigError
from .flat import FlatLayout
from .layers import AdapterLayer, LoRALinear, SVDLinear
from .schedule import budget_schedule
from .scores import (
    FUSE_MIN_NUMEL,
    element_scores,
    fused_importance_update,
    select_top,
    update_importance,
    update_importance_finite,
)

__all__ = ["RankAllocator", "StepInfo", "next_step"]


@dataclass(frozen=True)
class StepInfo:
    step: int
    budget: int
    masked: bool  # this step re-masked to ``budget``
    phase: str  # "warmup" | "decrease" | "final" | "off"
    skipped: bool = False  # a masking step whose scores were unusable (on_bad_scores="skip"): the previous mask stays


def next_step(owner: str, global_step: int | None, last_step: int) -> int:
    """The optimizer step a controller's ``step(global_step)`` is for (from 1; None: the one after
    ``last_step``); a step below 1 or before ``last_step`` is an error naming ``owner``."""
    t = last_step + 1 if global_step is None else int(global_step)
    if t < 1:
        raise ValueError(f"{owner}.step({t}): steps count optimizer steps from 1 (call it after the t-th "
                         "optimizer.step())")
    if t < last_step:
        raise ValueError(f"{owner}.step({t}) after step {last_step}: steps must not go back. When resuming, load "
                         "the state_dict() and continue from its step.")
    return t


class RankAllocator:
    """Drives AdaLoRA's budget over a dict of adapters (from ``inject_adapters``).

    Call ``step(t)`` after the t-th ``optimizer.step()`` and before ``zero_grad()``; t counts
    optimizer steps from 1 (under gradient accumulation: optimizer steps, not micro-batches).

    Public state: ``layout`` (the ``FlatLayout`` the adapter parameters live in; its ``order`` is the
    triplet order of every (n_triplets,) tensor below), ``keep`` ((n_triplets,) bool, the current mask),
    ``final_keep`` / ``final_scores`` (the frozen pattern of the final phase and the scores it was chosen
    from; None before), ``ema_ipt`` / ``ema_unc`` (flat, in the layout; None when not scoring),
    ``last_step``, ``compacted``. ``mask_state()`` / ``set_mask_state()`` copy the mask between allocators
    (ranks of a distributed run).

    A masking step whose triplet scores are all 0 or not finite (gradients None at every step, zero, or NaN)
    is never masked on: ``cfg.on_bad_scores="raise"`` raises a RuntimeError naming the cause and the fix;
    ``"skip"`` warns once, keeps (and re-applies) the previous mask, returns ``StepInfo(skipped=True)``, and
    leaves scoring steps with non-finite gradients out of the EMAs. In the final phase a skipped freeze is
    retried at the next step, after scoring that step's gradients.
    """

    def __init__(self, adapters: Mapping[str, AdapterLayer], cfg: AdaLoRAConfig, fused: bool | None = None):
        """``fused``: compile the importance update into one pass (None: only for >= 1M adapter parameters,
        where it pays for its few seconds of compilation; False: always eager). With ``on_bad_scores="skip"``
        the update is the eager guarded one."""
        if not isinstance(cfg, AdaLoRAConfig):
            raise ConfigError(f"RankAllocator needs an AdaLoRAConfig, got {type(cfg).__name__}")
        if not adapters:
            raise ConfigError("RankAllocator got no adapters: call inject_adapters(model, cfg) first")
        want = SVDLinear if cfg.adapter == "svd" else LoRALinear
        for name, a in adapters.items():
            if not isinstance(a, want) or (want is LoRALinear and a.lora_mask is None):
                raise ConfigError(f"adapter {name!r} is a {type(a).__name__}; AdaLoRAConfig(adapter={cfg.adapter!r}) "
                                  "needs the adapters that inject_adapters builds from this same config")
        self.cfg = cfg
        self.adapters = dict(adapters)
        self.svd = cfg.adapter == "svd"
        self.init_ranks = {n: a.r for n, a in self.adapters.items()}
        self.init_budget = sum(self.init_ranks.values())
        self.target_budget = cfg.target_r * len(self.adapters)
        self.prune = cfg.prune
        if self.prune and cfg.total_steps is None:
            raise ConfigError("AdaLoRAConfig.total_steps is None: the budget schedule needs the number of optimizer "
                              "steps. Fix: set total_steps=len(train_loader) // grad_accum * epochs")
        if self.prune and self.target_budget >= self.init_budget:
            warnings.warn(f"RankAllocator: final budget {self.target_budget} (target_r={cfg.target_r} x "
                          f"{len(self.adapters)} modules) >= initial {self.init_budget}: nothing to prune, masking is "
                          "off. Raise init_r above target_r to prune.", stacklevel=2)
            self.prune = False
        self.last_step = 0
        self.compacted = False
        self.final_keep: torch.Tensor | None = None  # frozen pattern of the final phase
        self._hooks: list = []  # grad masks on lora_E during the final phase
        self.final_scores: torch.Tensor | None = None  # the triplet scores it was chosen from (EMAs are freed)
        self._warned: set[str] = set()
        self._retry_freeze = False  # on_bad_scores="skip" skipped the freeze: score and try again next step
        self.layout = FlatLayout(self.adapters, self.svd)
        dev = self.layout.device
        self.keep = torch.ones(self.init_budget, dtype=torch.bool, device=dev)
        skip = cfg.on_bad_scores == "skip"
        if skip:  # NaN gradients must not reach the EMAs: the guarded update (eager)
            self._update = update_importance_finite
        elif fused is False:
            self._update = update_importance
        else:  # None: fuse only large buffers; True: always, if torch.compile works here
            self._update = fused_importance_update(self.layout.weights, min_numel=0 if fused else FUSE_MIN_NUMEL)
        if fused and self._update in (update_importance, update_importance_finite):
            why = "on_bad_scores='skip' needs the guarded update" if skip else "torch.compile is not usable here"
            warnings.warn(f"RankAllocator(fused=True): {why}; using the eager update", stacklevel=2)
        scoring = self.prune and cfg.score != "magnitude"
        self.ema_ipt = torch.zeros_like(self.layout.weights) if scoring else None  # Ī
        self.ema_unc = torch.zeros_like(self.layout.weights) if scoring and cfg.score == "ipt" else None  # Ū
        # skip mode: scoring steps whose gradients were not finite since the last masking step (0-dim, on the
        # device, so that counting them needs no host sync)
        self._bad_updates = torch.zeros((), dtype=torch.int64, device=dev) if scoring and skip else None

    # ------------------------------------------------------------------ layout
    def _check_views(self) -> None:
        """Re-adopt the parameters if something (``model.to()``, ``load_state_dict(assign=True)``) replaced them."""
        if self.layout.intact():
            return
        self.layout = FlatLayout(self.adapters, self.svd)
        dev, dtype = self.layout.device, self.layout.dtype
        for name in ("keep", "final_scores", "_bad_updates"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(dev))
        for name in ("ema_ipt", "ema_unc"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(dev, dtype))
        if self.final_keep is not None:  # keep *is* final_keep; the grad masks go on the new parameters
            self.final_keep = self.keep
            self._freeze_pattern()

    # ------------------------------------------------------------------ the step
    def step(self, global_step: int | None = None) -> StepInfo:
        """Update scores and (on masking steps) the mask, for optimizer step ``global_step`` (from 1)."""
        t = self.last_step + 1 if global_step is None else int(global_step)
        if t < 1 and self.prune:
            raise ValueError(f"RankAllocator.step({t}): steps count optimizer steps from 1 (call it after the "
                             "t-th optimizer.step()). A 0-based counter would miss the final budget with tfinal=0.")
        if t < self.last_step:
            raise ValueError(f"RankAllocator.step({t}) after step {self.last_step}: steps must not go back. "
                             "When resuming, load the allocator's state_dict() and continue from its step.")
        if t == self.last_step and t > 0:
            self._warn_once("repeat", f"RankAllocator.step({t}) called twice; the repeat is ignored")
            return self._info(t, False)
        self.last_step = t
        if not self.prune or self.compacted:
            return self._info(t, False)
        self._check_views()
        sched = self._schedule(t)
        final = sched.phase == "final"
        # as in the reference, no gradient is scored from t = T - tfinal on (unless a skipped freeze waits)
        if self.ema_ipt is not None and (not final or self._retry_freeze):
            self._score()
        if final:
            if self.final_keep is None:  # the pattern is fixed here, from the last scores
                scores = self.triplet_scores()
                if not self._usable(scores, t, "the final pattern"):
                    self._retry_freeze = True
                    self._apply(self.keep)
                    return StepInfo(t, self.target_budget, False, "final", skipped=True)
                self._retry_freeze = False
                self.final_scores = scores
                self.final_keep = select_top(scores, self.target_budget)
                self.keep = self.final_keep
                self.ema_ipt = self.ema_unc = None  # scoring is over: free 2x adapter memory
                self._bad_updates = None
                self._freeze_pattern()
            self._apply(self.final_keep)
            return StepInfo(t, self.target_budget, True, "final")
        if sched.mask:
            scores = self.triplet_scores()
            if not self._usable(scores, t, "this mask"):
                self._apply(self.keep)  # the previous mask stays, also on singular values trained back since
                return StepInfo(t, sched.budget, False, sched.phase, skipped=True)
            self.keep = select_top(scores, sched.budget)
            self._apply(self.keep)
        return StepInfo(t, sched.budget, sched.mask, sched.phase)

    @torch.no_grad()
    def _score(self) -> None:
        """One importance update from the current gradients (no host sync)."""
        cfg = self.cfg
        ok = self._update(self.layout.weights, self.layout.gather_grads(), self.ema_ipt, self.ema_unc,
                          cfg.beta1, cfg.beta2)
        if self._bad_updates is not None:  # skip mode: the guarded update returned whether it updated
            self._bad_updates += (~ok).to(self._bad_updates.dtype)

    def _usable(self, scores: torch.Tensor, t: int, what: str) -> bool:
        """Whether the triplet scores can choose a mask: finite and not all 0 (one host sync). If not, raise
        (on_bad_scores="raise") or warn once and return False ("skip")."""
        total = scores.sum(dtype=torch.promote_types(scores.dtype, torch.float32))  # S >= 0: finite and > 0 iff usable
        dropped = 0
        if self._bad_updates is None:
            value = float(total)
        else:  # the same sync also fetches how many scoring steps had non-finite gradients
            value, dropped = torch.stack([total, self._bad_updates.to(total.dtype)]).tolist()
            if dropped:
                self._bad_updates.zero_()
                self._warn_once("dropped", f"RankAllocator.step({t}): {int(dropped)} scoring step(s) since the last "
                                "mask had non-finite gradients (NaN/inf); they were left out of the importance scores "
                                "(on_bad_scores='skip'). Warned once.", stacklevel=4)
        if math.isfinite(value) and value > 0:
            return True
        cause, fix = self._bad_scores_cause(value, t, int(dropped))
        if self.cfg.on_bad_scores == "raise":
            raise RuntimeError(f"RankAllocator.step({t}): {cause}, so no mask can be chosen from them. Fix: {fix}; "
                               "or set AdaLoRAConfig(on_bad_scores='skip') to keep the previous mask on such steps.")
        self._warn_once("skipped", f"RankAllocator.step({t}): {cause}; {what} is skipped and the previous mask stays "
                        "(on_bad_scores='skip'). Warned once.", stacklevel=4)
        return False

    def _bad_scores_cause(self, total: float, t: int, dropped: int) -> tuple[str, str]:
        """(what went wrong, how to fix it) for scores whose sum ``total`` is 0 or not finite; ``dropped``: scoring
        steps since the last mask whose non-finite gradients "skip" left out."""
        order = f"call allocator.step({t}) after optimizer.step() and before optimizer.zero_grad()"
        if self.cfg.score == "magnitude":
            if not math.isfinite(total):
                return ("a singular value lora_E is NaN or inf (the training diverged)",
                        "lower the learning rate or find the NaN with torch.autograd.set_detect_anomaly(True)")
            return ("every singular value lora_E is 0 (they start at 0 and no optimizer step has moved them)",
                    f"{order}, with a learning rate > 0 for the lora_E parameters")
        nan_fix = ("find the NaN with torch.autograd.set_detect_anomaly(True), lower the learning rate or scale the "
                   "loss (torch.amp.GradScaler)")
        if not math.isfinite(total):
            return ("the importance scores are not finite: an adapter gradient or weight was NaN or inf (a diverged "
                    "loss, fp16 overflow)", nan_fix)
        if dropped:
            return (f"every importance score is 0: the adapter gradients were not finite (NaN/inf) at {dropped} "
                    "scoring step(s) since the last mask, left out of the scores, and 0 or None at the others", nan_fix)
        if self.layout.missing_grads == len(self.layout.spans):
            return ("every importance score is 0: all adapter gradients were None at the last scoring step, "
                    "i.e. optimizer.zero_grad() (set_to_none=True by default) ran before allocator.step(), or no "
                    "backward ran", order)
        return ("every importance score is 0: the adapter gradients were exactly 0 (or None) at every scoring "
                "step so far (zero_grad() before allocator.step(), or a loss that does not reach the adapters)",
                f"{order}, and check that the loss depends on the adapters")

    def _warn_once(self, key: str, message: str, stacklevel: int = 3) -> None:
        """Warn about ``key`` once per allocator (``stacklevel`` as in warnings.warn, counted from here: 3 is the
        caller of ``step`` when ``step`` calls this)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=stacklevel)

    def _info(self, t: int, masked: bool) -> StepInfo:
        if not self.prune:
            return StepInfo(t, self.init_budget, False, "off")
        if self.compacted or self.final_keep is not None:
            return StepInfo(t, self.target_budget, masked, "final")
        s = self._schedule(t)
        return StepInfo(t, s.budget, masked, s.phase)

    def _schedule(self, t: int):
        c = self.cfg
        return budget_schedule(t, init_budget=self.init_budget, target_budget=self.target_budget, tinit=c.tinit,
                               tfinal=c.tfinal, total_steps=c.total_steps, delta_t=c.delta_t)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S_i for every triplet, in ``layout.order``: s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)."""
        if self.compacted:
            raise RuntimeError("triplet_scores() after compact(): the pruned triplets are gone")
        lay = self.layout
        if self.cfg.score == "magnitude":
            return lay.triplets(lay.weights).abs()
        if self.ema_ipt is None:  # final phase: scoring is over, return the scores the pattern was frozen from
            if self.final_scores is None:
                raise RuntimeError("no importance scores: pruning is off (prune=False or target_r >= init_r)")
            return self.final_scores.clone()
        ipt, unc = self.ema_ipt, self.ema_unc
        if unc is None:  # sensitivity only: s = Ī
            parts = [(g.a_block(ipt).mean(-1) + g.b_block(ipt).mean(1)).reshape(-1) for g in lay.groups]
        else:  # s = Ī ⊙ Ū, reduced per row / column without materialising the full product
            parts = [(torch.linalg.vecdot(g.a_block(ipt), g.a_block(unc)) / g.n_in  # (n_g, r): mean_j s(A_ij)
                      + torch.linalg.vecdot(g.b_block(ipt), g.b_block(unc), dim=1) / g.n_out).reshape(-1)
                     for g in lay.groups]
        score = torch.cat(parts) if parts else ipt.new_zeros(0)  # (n_triplets,) in layout.order
        if not self.svd:
            return score
        return score + element_scores(lay.triplets(ipt), None if unc is None else lay.triplets(unc))

    @torch.no_grad()
    def _apply(self, keep: torch.Tensor) -> None:
        if self.svd:
            self.layout.triplets(self.layout.weights).masked_fill_(~keep, 0.0)  # E_i = 0; A, B stay, it may revive
        else:
            self.layout.gate.copy_(keep)

    # ------------------------------------------------------------------ the mask, for other allocators
    def mask_state(self) -> dict:
        """A copy of what two allocators of one run (ranks of a distributed run) must agree on:
        ``{"keep": (n_triplets,) bool, "frozen": bool (the final pattern is fixed), "singular_values":
        (n_triplets,) Λ the mask was applied to (None for prune-LoRA), "final_scores": the scores the frozen
        pattern came from (None before the final phase)}``, every tensor in ``layout.order``."""
        if self.compacted:
            raise RuntimeError("mask_state() after compact(): the pruned triplets are gone")
        lay = self.layout
        return {
            "keep": self.keep.clone(),
            "frozen": self.final_keep is not None,
            "singular_values": lay.triplets(lay.weights).detach().clone() if self.svd else None,
            "final_scores": None if self.final_scores is None else self.final_scores.clone(),
        }

    @torch.no_grad()
    def set_mask_state(self, state: Mapping) -> bool:
        """Adopt another allocator's ``mask_state()`` (entries may be left out or None: they are then kept):
        the keep mask is copied and applied to the adapters (and, once frozen, to the final phase's gradient
        masks and penalty); the singular values and final scores are copied when given. Returns whether the
        keep mask changed."""
        if self.compacted:
            raise RuntimeError("set_mask_state() after compact(): the pruned triplets are gone")
        frozen = state.get("frozen")
        if frozen is not None and bool(frozen) != (self.final_keep is not None):
            raise ValueError(f"set_mask_state: the state's final pattern is {'' if frozen else 'not '}frozen but this "
                             f"allocator's is {'not ' if frozen else ''}(it is at step {self.last_step}): step both "
                             "allocators to the same step first")
        keep = state["keep"].to(self.keep.device, torch.bool)
        if keep.shape != self.keep.shape:
            raise ValueError(f"set_mask_state: keep has {keep.numel()} triplets, this allocator {self.keep.numel()}: "
                             "the state comes from other adapters")
        changed = not torch.equal(keep, self.keep)
        self.keep.copy_(keep)  # in place: in the final phase keep *is* final_keep
        values = state.get("singular_values")
        if values is not None and self.svd:
            self.layout.triplets(self.layout.weights).copy_(values)
        scores = state.get("final_scores")
        if scores is not None and self.final_scores is not None:
            self.final_scores.copy_(scores)
        self._apply(self.keep)
        if changed and self.final_keep is not None:  # rebuild rank_keep and the lora_E grad masks
            self._freeze_pattern()
        return changed

    # ------------------------------------------------------------------ reporting
    def rank_pattern(self) -> dict[str, int]:
        """{module name: kept rank}, in ``named_modules()`` order (one host sync)."""
        if self.compacted or not self.prune:
            return {n: a.r for n, a in self.adapters.items()}
        lay = self.layout
        counts = dict(zip(lay.order, [int(c) for c in torch.stack(
            [k.sum() for k in self.keep.split(lay.ranks)]).tolist()])) if lay.order else {}
        return {n: counts[n] for n in self.adapters}

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """{module name: bool mask (r,)} of kept triplets."""
        if self.compacted:
            return {n: torch.ones(a.r, dtype=torch.bool) for n, a in self.adapters.items()}
        masks = dict(zip(self.layout.order, self.keep.split(self.layout.ranks)))
        return {n: masks[n] for n in self.adapters}

    @property
    def budget(self) -> int:
        return self._info(max(self.last_step, 0), False).budget

    # ------------------------------------------------------------------ compaction
    @torch.no_grad()
    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Slice P, Λ, Q of every module to its kept rank, with the optimizer's state for them.

        Only once the pattern is frozen (final phase). Each sliced tensor becomes a new Parameter
        (autograd pins a leaf's shape, so resizing ``.data`` in place would break backward); the
        optimizer's param groups point to the new ones and their state tensors are sliced alike.
        Rebuild any list of parameters you hold (e.g. for gradient clipping) after this call.
        """
        if self.compacted:
            return self.rank_pattern()
        if self.prune and self.final_keep is None:
            raise RuntimeError("compact() before the final phase: the pattern can still change. "
                               f"Call it at step >= total_steps - tfinal = {self.cfg.total_steps - self.cfg.tfinal}.")
        masks = self.keep_masks()
        swap: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        for name, a in self.adapters.items():
            idx = masks[name].nonzero().view(-1).to(a.lora_A.device)
            for pname, dim in self._rank_params():
                p = getattr(a, pname)
                new = torch.nn.Parameter(p.detach().index_select(dim, idx).contiguous(), requires_grad=p.requires_grad)
                if p.grad is not None:
                    new.grad = p.grad.index_select(dim, idx).contiguous()
                setattr(a, pname, new)
                swap[p] = (new, dim, idx)
            if not self.svd:
                a.lora_mask = None
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [swap[p][0] if p in swap else p for p in group["params"]]
            for old, (new, dim, idx) in swap.items():
                st = optimizer.state.pop(old, None)
                if st is not None:
                    optimizer.state[new] = {k: v.index_select(dim, idx.to(v.device)).contiguous()
                                            if torch.is_tensor(v) and v.shape == old.shape else v
                                            for k, v in st.items()}
        self._release_hooks()
        self.compacted = True
        self.ema_ipt = self.ema_unc = self._bad_updates = None
        self.layout.release()
        return self.rank_pattern()

    def _freeze_pattern(self) -> None:
        """From the final phase on the pattern is fixed: pruned triplets get no gradient (E's grad is
        masked) and the orthogonality penalty covers the kept triplets only (``rank_keep``), so training
        with the pruned triplets masked in place and training after ``compact()`` are the same computation.
        This runs inside ``step(T - tfinal)``: the loss of step T - tfinal still penalises the pruned
        triplets, the loss of every later step does not."""
        self._release_hooks()
        for name, keep in self.keep_masks().items():
            a = self.adapters[name]
            a.rank_keep = keep.nonzero().view(-1).to(a.lora_A.device)
            if self.svd:
                gate = keep.view(-1, 1).to(a.lora_E.device, a.lora_E.dtype)
                self._hooks.append(a.lora_E.register_hook(lambda g, m=gate: g * m))

    def _release_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for a in self.adapters.values():
            a.rank_keep = None

    def _rank_params(self) -> list[tuple[str, int]]:
        """(parameter name, its rank dimension) of an adapter."""
        out = [("lora_A", 0), ("lora_B", 1)]
        return out + [("lora_E", 0)] if self.svd else out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue the same schedule (tensors + plain values)."""
        return {
            "step": self.last_step,
            "names": list(self.layout.order),
            "ranks": list(self.layout.ranks),
            "compacted": self.compacted,
            "ema_ipt": None if self.ema_ipt is None else self.ema_ipt.clone(),
            "ema_unc": None if self.ema_unc is None else self.ema_unc.clone(),
            "keep": self.keep.clone(),
            "final_keep": None if self.final_keep is None else self.final_keep.clone(),
            "final_scores": None if self.final_scores is None else self.final_scores.clone(),
            "freeze_pending": self._retry_freeze,  # on_bad_scores="skip" skipped the freeze: scoring goes on
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved schedule. If the saved run had compacted, this fresh allocator compacts its
        adapters the same way here, so load it before the model's weights and build the optimizer after."""
        if state["names"] != self.layout.order or state["ranks"] != self.layout.ranks:
            if not (state.get("compacted") and self.compacted):
                raise ValueError("allocator state was saved for other adapters (module names or ranks differ); "
                                 "resume with the same model and method config")
        saved_compacted = bool(state.get("compacted", False))
        if self.compacted and not saved_compacted:
            raise ValueError("this allocator has compacted its adapters; it cannot load the state of a run that "
                             "had not. Build a fresh model and allocator to load it")
        self.last_step = int(state["step"])
        self._retry_freeze = bool(state.get("freeze_pending", False))
        dev = self.keep.device
        self.keep = state["keep"].to(dev, torch.bool)
        self.final_keep = None if state["final_keep"] is None else state["final_keep"].to(dev, torch.bool)
        if self.final_keep is not None:  # keep *is* final_keep in the final phase, as in a straight run
            self.keep = self.final_keep
        fs = state.get("final_scores")
        self.final_scores = None if fs is None else fs.to(dev)
        for name in ("ema_ipt", "ema_unc"):
            src = state[name]
            if src is None:
                setattr(self, name, None)
            elif getattr(self, name) is None:
                setattr(self, name, src.to(self.layout.device, self.layout.dtype).clone())
            else:
                getattr(self, name).copy_(src)
        if self.ema_ipt is None:
            self._bad_updates = None
        if self.final_keep is not None:
            self._freeze_pattern()
        if saved_compacted and not self.compacted:  # slice to the saved pattern, so the saved weights fit
            self.compact()
        if not self.compacted and self.prune:  # the parameters' E already hold the mask; the LoRA gates do not
            if not self.svd:
                self.layout.gate.copy_(self.keep)
