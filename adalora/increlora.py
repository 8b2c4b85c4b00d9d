"""IncreLoRA (Zhang et al., 2023): start every module at a small rank and add rank where it matters most.

Adapter: ΔW = P Λ Q · scale in SVD form, with P, Λ, Q split into parts (``IncreLinear``). The importance of a
module is the EMA product of its sensitivity (AdaLoRA's Ī ⊙ Ū, per module instead of per entry):

    s_m = Σ_ij |ΔW_ij · ∂L/∂ΔW_ij| / √(out · in),   Ī ← β1 Ī + (1 − β1) s,   Ū ← β2 Ū + (1 − β2) |s − Ī|,

and every ``delta_t`` steps after ``tinit`` the ``top_h`` modules with the largest Ī · Ū get ``rank_step``
more components, until the total rank is target_r · n_modules (exactly: the last round hands out only what is
left). Advance learning: each module keeps ``rank_step`` reserve components in its forward whose P and Q train
while their singular value stays fixed at 1e-5; growing a module turns its reserve into active components
(λ becomes trainable, from 1e-5) and adds a fresh reserve. The math is in pure functions; ``RankGrower`` holds
the state and re-registers the new Parameters in the optimizer (one param group per round, as the authors).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .allocator import StepInfo, next_step
from .config import ConfigError, IncreLoRAConfig, LoRAConfig
from .inject import inject_adapters
from .layers import AdapterLayer, SVDLinear
from .regularizers import orthogonal_regularization

ADVANCE_E = 1e-5  # the fixed singular value of a reserve component under advance learning (the authors' value)
GROUP_KEY = "increlora_added_at"  # param-group key: the optimizer step after which the group was added


# ---------------------------------------------------------------------------------------------- math
def module_score(delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """s = Σ |ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW), a 0-dim tensor (the authors' backward-hook score)."""
    return (delta.abs() * grad.abs()).sum() / math.sqrt(delta.numel())


@torch.no_grad()
def update_importance(ema_ipt: torch.Tensor, ema_unc: torch.Tensor, score: torch.Tensor,
                      beta1: float, beta2: float) -> None:
    """In place, per module: Ī ← β1 Ī + (1 − β1) s and then Ū ← β2 Ū + (1 − β2) |s − Ī| (with the new Ī)."""
    ema_ipt.mul_(beta1).add_(score, alpha=1.0 - beta1)
    ema_unc.mul_(beta2).add_((score - ema_ipt).abs(), alpha=1.0 - beta2)


def plan_growth(importance: torch.Tensor, total: int, target: int, top_h: int, rank_step: int) -> list[tuple[int, int]]:
    """[(module index, ranks to add)] for one round: the ``top_h`` most important modules (ties to the lower
    index) get ``rank_step`` each, and the round stops as soon as the total reaches ``target``, so the last
    module may get fewer and the total never exceeds the target."""
    left = target - total
    plan = []
    for i in torch.sort(importance, descending=True, stable=True).indices[:top_h].tolist():
        if left <= 0:
            break
        n = min(rank_step, left)
        plan.append((i, n))
        left -= n
    return plan


def rounds_needed(total: int, target: int, n_modules: int, top_h: int, rank_step: int) -> int:
    """Growth rounds from ``total`` to ``target``: each full round adds min(top_h, n_modules) · rank_step."""
    per_round = min(top_h, n_modules) * rank_step
    return max(0, -(-(target - total) // per_round))


def restart_lr_factor(step: int, added_at: int, warmup: int, total_steps: int) -> float:
    """Learning-rate factor at optimizer step ``step`` of a param group added after step ``added_at``.

    The authors' Multi_LambdaLR: k = step − added_at − 1 steps since the group's first use; a linear warm-up
    k / warmup over ``warmup`` steps, then a linear decay that reaches 0 at ``total_steps``.
    """
    k = step - added_at - 1
    if k < warmup:
        return max(0.0, k / max(1, warmup))
    remaining = total_steps - added_at
    return max(0.0, (remaining - k) / max(1, remaining - warmup))


def increlora_scale(lora_alpha: float, n_active: int, mode: str, target_r: int) -> float:
    """"rank": alpha / (r + 1e-5) with r the module's current rank (the authors' scaling / ranknum);
    "fixed": alpha / target_r for every module at every step."""
    return lora_alpha / (n_active + 1e-5) if mode == "rank" else lora_alpha / target_r


# ---------------------------------------------------------------------------------------------- adapter
def _cat(parts: nn.ParameterList, dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim)


class IncreLinear(SVDLinear):
    """IncreLoRA's adapter: ΔW = [P_0 | p_1 | ...] diag([Λ_0; λ_1; ...]) [Q_0; q_1; ...] · scale.

    Part 0 is the initial block (``init_r`` rows: Q_0 = ``lora_A_parts[0]`` (r, in) and P_0 ~ N(0, 0.02), Λ_0 = 0);
    each later part is one component, its own Parameters (1, in), (1, 1), (out, 1), like the entries of the
    authors' ParameterLists, so that it has its own optimizer state and param group. ``part_status[i]``:
    "active" (λ trains), "reserve" (λ fixed: 1e-5 with advance learning, else 0) or "dead" (λ = 0: a reserve
    left when the budget was reached). All parts are in the forward.

    ``lora_A`` / ``lora_E`` / ``lora_B`` are the concatenations over all parts (differentiable), so the shared
    orthogonal regularizer and the adapter checkpoint see the whole adapter. While ``scoring`` is on, the forward
    materialises ΔW so that a gradient hook can score it (the authors' dense path); otherwise it is low-rank.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float = 32.0, lora_dropout: float = 0.0,
                 scale: float | None = None):
        # AdapterLayer's plumbing only: SVDLinear's single tensors are replaced by the parts below
        AdapterLayer.__init__(self, base_layer, r, lora_alpha, lora_dropout)
        self.lora_A_parts = nn.ParameterList([self._new(r, self.in_features)])
        self.lora_E_parts = nn.ParameterList([self._new(r, 1)])
        self.lora_B_parts = nn.ParameterList([self._new(self.out_features, r)])
        self.part_status: list[str] = ["active"]
        self.scale = lora_alpha / (r + 1e-5) if scale is None else scale
        self.scoring = False
        self.score: torch.Tensor | None = None  # this step's module score, summed over micro-batches
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.lora_A_parts[0], mean=0.0, std=0.02)
        nn.init.zeros_(self.lora_E_parts[0])
        nn.init.normal_(self.lora_B_parts[0], mean=0.0, std=0.02)

    @property
    def lora_A(self) -> torch.Tensor:  # (R, in), all parts
        return _cat(self.lora_A_parts, 0)

    @property
    def lora_E(self) -> torch.Tensor:  # (R, 1)
        return _cat(self.lora_E_parts, 0)

    @property
    def lora_B(self) -> torch.Tensor:  # (out, R)
        return _cat(self.lora_B_parts, 1)

    @property
    def r(self) -> int:  # rows of all parts (reserves and dead ones included): the tensors' rank
        return sum(p.shape[0] for p in self.lora_A_parts)

    @property
    def n_active(self) -> int:
        return sum(p.shape[0] for p, s in zip(self.lora_A_parts, self.part_status) if s == "active")

    def _add_adapter(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.scoring and torch.is_grad_enabled():
            delta = self._delta_out_in()  # (out, in): dense, so that ∂L/∂ΔW exists for the module score
            if delta.requires_grad:
                d = delta.detach()
                delta.register_hook(lambda g, d=d: self._add_score(module_score(d, g)))
            return y + F.linear(x, delta)
        return super()._add_adapter(y, x)

    def _add_score(self, s: torch.Tensor) -> None:
        self.score = s if self.score is None else self.score + s

    def pop_score(self) -> torch.Tensor | None:
        s, self.score = self.score, None
        return s

    def add_part(self, a: torch.Tensor, e: float, b: torch.Tensor, trainable_ab: bool) -> int:
        """Append one reserve component (A row (1, in), fixed λ = e, B column (out, 1)); returns its part index."""
        w = self.base_layer.weight
        self.lora_A_parts.append(nn.Parameter(a.to(w.device, w.dtype), requires_grad=trainable_ab))
        self.lora_E_parts.append(nn.Parameter(torch.full((1, 1), e, device=w.device, dtype=w.dtype),
                                              requires_grad=False))
        self.lora_B_parts.append(nn.Parameter(b.to(w.device, w.dtype), requires_grad=trainable_ab))
        self.part_status.append("reserve")
        return len(self.part_status) - 1

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active={self.n_active}, scoring={self.scoring}"


def inject_increlora(model: nn.Module, cfg: IncreLoRAConfig) -> dict[str, IncreLinear]:
    """Wrap the targeted linear layers in ``IncreLinear`` at ``init_r`` and freeze the rest (as ``inject_adapters``)."""
    if not isinstance(cfg, IncreLoRAConfig):
        raise ConfigError(f"inject_increlora needs an IncreLoRAConfig, got {type(cfg).__name__}")
    plain = inject_adapters(model, LoRAConfig(r=cfg.init_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                              target_modules=cfg.target_modules,
                                              modules_to_save=list(cfg.modules_to_save),
                                              rank_pattern=dict(cfg.rank_pattern)))
    out: dict[str, IncreLinear] = {}
    for name, layer in plain.items():  # same targets, freezing and checks; only the adapter class differs
        new = IncreLinear(layer.base_layer, layer.r, cfg.lora_alpha, cfg.lora_dropout,
                          scale=increlora_scale(cfg.lora_alpha, layer.r, cfg.scale, cfg.target_r))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        out[name] = new
    return out


# ---------------------------------------------------------------------------------------------- state
class RankGrower:
    """Drives IncreLoRA's growth over the adapters from ``inject_increlora``.

    Build it before the optimizer (it adds the first reserve components, which the optimizer must hold), then
    ``attach_optimizer(optimizer)``. Per optimizer step t (from 1):
        loss = task_loss + grower.regularization()        # orth_reg_weight · R(P, Q), all parts
        loss.backward(); clip; optimizer.step()
        info = grower.step(t)                             # scores, and every delta_t steps a growth round
        optimizer.zero_grad()
        if the structure changed (grower.structure_version): rebuild lists of parameters held (clipping, DDP)
    With ``cfg.restart_warmup`` set, call ``grower.set_lr(main_lr_t)`` after setting the main lr of step t: each
    group added by a round then gets its own warm-up (``restart_lr_factor`` · ``lr``).

    Under ``torch.distributed`` (more than one process) every growth round plans from rank ``plan_src``'s
    importance: the module scores come from each rank's own ∂L/∂ΔW (before DDP averages the gradients), so they
    differ between ranks, and the round broadcasts rank ``plan_src``'s Ī and Ū first (2 · n_modules floats; growth
    steps fall on the same t on every rank). ``last_round_differed`` says whether this rank's own scores would
    have grown other modules. Set ``plan_src = None`` to let every process decide alone.
    """

    def __init__(self, adapters: Mapping[str, IncreLinear], cfg: IncreLoRAConfig, lr: float | None = None,
                 optimizer: torch.optim.Optimizer | None = None, seed: int | None = None):
        """``lr``: the main peak learning rate (the base of the restart warm-up). ``seed``: of the generator that
        initialises new components (None: drawn from torch's global RNG, so the run's seed fixes it)."""
        if not isinstance(cfg, IncreLoRAConfig):
            raise ConfigError(f"RankGrower needs an IncreLoRAConfig, got {type(cfg).__name__}")
        if not adapters:
            raise ConfigError("RankGrower got no adapters: call inject_increlora(model, cfg) first")
        bad = [n for n, a in adapters.items() if not isinstance(a, IncreLinear)]
        if bad:
            raise ConfigError(f"adapters {bad[:3]} are not IncreLinear: build them with inject_increlora(model, cfg)")
        if cfg.total_steps is None:
            raise ConfigError("IncreLoRAConfig.total_steps is None: the growth plan and the restart warm-up need the "
                              "number of optimizer steps. Fix: set total_steps=len(train_loader) // accum * epochs")
        self.cfg = cfg
        self.adapters = dict(adapters)
        self.names = list(self.adapters)
        self.rank_step = cfg.rank_step
        self.target_budget = cfg.target_r * len(self.adapters)
        self.total = sum(a.n_active for a in self.adapters.values())
        if self.total > self.target_budget:
            raise ConfigError(f"IncreLoRAConfig: the initial total rank {self.total} exceeds the target "
                              f"target_r x n_modules = {self.target_budget}. Fix: lower init_r / rank_pattern")
        n_rounds = rounds_needed(self.total, self.target_budget, len(self.adapters), cfg.top_h, self.rank_step)
        first = (cfg.tinit // cfg.delta_t + 1) * cfg.delta_t  # first 0-based step s with s > tinit, s % delta_t == 0
        last_t = first + (n_rounds - 1) * cfg.delta_t + 1 if n_rounds else 0
        if last_t > cfg.total_steps:
            raise ConfigError(f"IncreLoRAConfig: {n_rounds} growth rounds are needed (top_h={cfg.top_h} modules x "
                              f"{self.rank_step} ranks each), the last after step {last_t}, but total_steps="
                              f"{cfg.total_steps}. Fix: raise top_h or incre_rank_num, or lower tinit / delta_t")
        self.base_lr = lr
        self.gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        dev = next(iter(self.adapters.values())).base_layer.weight.device
        self.ema_ipt: torch.Tensor | None = torch.zeros(len(self.adapters), device=dev)  # Ī per module
        self.ema_unc: torch.Tensor | None = torch.zeros(len(self.adapters), device=dev)  # Ū per module
        self.rounds: list[dict] = []  # {"step": t, "params": [[module, "A" | "E" | "B", part]]}, in group order
        self.last_step = 0
        self.done = self.total >= self.target_budget
        self.compacted = False
        self.optimizer: torch.optim.Optimizer | None = None
        self.structure_version = 0  # bumped whenever Parameters are added or removed
        self.plan_src: int | None = 0  # under torch.distributed, growth rounds plan from this rank's importance
        self.last_round_differed = False  # this rank's own importance would have planned the last round otherwise
        self._warned_repeat = False
        if not self.done:
            for a in self.adapters.values():
                self._add_reserves(a, self.rank_step)
                a.scoring = True
        self._finish_if_done()
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # ------------------------------------------------------------------ parts
    def _add_reserves(self, layer: IncreLinear, n: int) -> list[int]:
        """n new reserve components, Q row then P column ~ N(0, 0.02) each from the grower's own generator."""
        idx = []
        for _ in range(n):
            a = torch.randn(1, layer.in_features, generator=self.gen) * 0.02
            b = torch.randn(layer.out_features, 1, generator=self.gen) * 0.02
            e = ADVANCE_E if self.cfg.advance_learn else 0.0
            idx.append(layer.add_part(a, e, b, trainable_ab=self.cfg.advance_learn))
        return idx

    def _param(self, name: str, kind: str, part: int) -> nn.Parameter:
        a = self.adapters[name]
        return {"A": a.lora_A_parts, "E": a.lora_E_parts, "B": a.lora_B_parts}[kind][part]

    def _round_params(self, rnd: dict) -> list[nn.Parameter]:
        return [self._param(n, k, i) for n, k, i in rnd["params"]]

    def _set_scale(self, layer: IncreLinear) -> None:
        layer.scale = increlora_scale(self.cfg.lora_alpha, layer.n_active, self.cfg.scale, self.cfg.target_r)

    # ------------------------------------------------------------------ optimizer
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Bind the optimizer that growth rounds add their param groups to.

        On a resumed run (``load_state_dict`` first, optimizer built after) this also lays the optimizer's groups
        out as the saved run had them: the parameters of every round leave the groups they were built into and
        form one group per round, in order, so that ``optimizer.load_state_dict(saved)`` then fits.
        """
        tagged = any(GROUP_KEY in g for g in optimizer.param_groups)
        if self.rounds and not tagged:
            managed = {id(p) for r in self.rounds for p in self._round_params(r)}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in managed]
            for rnd in self.rounds:
                optimizer.add_param_group(self._new_group(optimizer, self._round_params(rnd), rnd["step"]))
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [f"{n}.{k}[{i}]" for n, a in self.adapters.items() for k, parts in
                   (("A", a.lora_A_parts), ("E", a.lora_E_parts), ("B", a.lora_B_parts))
                   for i, p in enumerate(parts) if p.requires_grad and id(p) not in held]
        if missing:
            raise ConfigError(f"the optimizer does not hold the trainable adapter parts {missing[:3]}: build it after "
                              "RankGrower(...) (and after load_state_dict when resuming), over every parameter with "
                              "requires_grad")
        self.optimizer = optimizer

    def _new_group(self, optimizer: torch.optim.Optimizer, params: list, step: int) -> dict:
        """A param group like the first one (weight decay, betas, ...), tagged with the step it was added after."""
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        if self.cfg.restart_warmup is not None:  # its first step runs at factor 0, as the authors' Multi_LambdaLR
            group["lr"] = 0.0
        return {**group, "params": params, GROUP_KEY: step}

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every group added by a round for the coming step (restart warm-up).

        Call it after setting the main groups to ``lr``; without ``cfg.restart_warmup`` it does nothing and the
        added groups keep the main schedule.
        """
        if self.cfg.restart_warmup is None or self.optimizer is None:
            return
        if self.base_lr is None:
            raise ConfigError("RankGrower.set_lr: the restart warm-up needs the main peak learning rate. Fix: build "
                              "RankGrower(adapters, cfg, lr=<optimizer lr>), or set restart_warmup=None")
        t = self.last_step + 1
        for g in self.optimizer.param_groups:
            if GROUP_KEY in g:
                g["lr"] = self.base_lr * restart_lr_factor(t, g[GROUP_KEY], self.cfg.restart_warmup,
                                                           self.cfg.total_steps)

    # ------------------------------------------------------------------ the step
    def step(self, global_step: int | None = None) -> StepInfo:
        """Update the module scores and, on growth steps, grow; for optimizer step ``global_step`` (from 1)."""
        t = next_step("RankGrower", global_step, self.last_step)
        if t == self.last_step:
            if not self._warned_repeat:
                warnings.warn(f"RankGrower.step({t}) called twice; the repeat is ignored", stacklevel=2)
                self._warned_repeat = True
            return StepInfo(t, self.total, False, self.phase)
        self.last_step = t
        if self.done:
            return StepInfo(t, self.total, False, "final")
        s = t - 1  # the authors' 0-based global_step
        dev = next(iter(self.adapters.values())).base_layer.weight.device
        if self.ema_ipt.device != dev:  # the model was moved: the scores follow it
            self.ema_ipt, self.ema_unc = self.ema_ipt.to(dev), self.ema_unc.to(dev)
        zero = self.ema_ipt.new_zeros(())  # a module without a backward this step scores 0
        scores = torch.stack([(a.pop_score() if a.score is not None else zero).to(zero)
                              for a in self.adapters.values()])
        update_importance(self.ema_ipt, self.ema_unc, scores, self.cfg.beta1, self.cfg.beta2)
        grew = s > self.cfg.tinit and s % self.cfg.delta_t == 0
        if grew:
            self._grow(t)
        return StepInfo(t, self.total, grew, self.phase)

    @property
    def phase(self) -> str:
        if self.done:
            return "final"
        return "warmup" if self.last_step - 1 <= self.cfg.tinit else "grow"

    @torch.no_grad()
    def _grow(self, t: int) -> None:
        if self.optimizer is None:
            raise RuntimeError("RankGrower: a growth round needs the optimizer. Fix: call "
                               "grower.attach_optimizer(optimizer) after building it")
        cfg = self.cfg
        final = self.target_budget - self.total <= min(cfg.top_h, len(self.adapters)) * self.rank_step
        plan = plan_growth(self.ema_ipt * self.ema_unc, self.total, self.target_budget, cfg.top_h, self.rank_step)
        if self.plan_src is not None and distributed.world_size() > 1:  # every rank grows what rank plan_src plans
            distributed.broadcast_tensors(self.ema_ipt, self.ema_unc, src=self.plan_src)
            local, plan = plan, plan_growth(self.ema_ipt * self.ema_unc, self.total, self.target_budget, cfg.top_h,
                                            self.rank_step)
            self.last_round_differed = plan != local
        new: list[list] = []
        for i, n in plan:
            name = self.names[i]
            layer = self.adapters[name]
            for part in [j for j, st in enumerate(layer.part_status) if st == "reserve"][:n]:
                layer.part_status[part] = "active"  # λ starts training from its reserve value
                layer.lora_E_parts[part].requires_grad_(True)
                new.append([name, "E", part])
                if not cfg.advance_learn:  # without advance learning P and Q start training now too
                    for kind in ("A", "B"):
                        self._param(name, kind, part).requires_grad_(True)
                        new.append([name, kind, part])
            self.total += n
            if not final:  # a fresh reserve; in the last round it would be switched off right away
                for part in self._add_reserves(layer, self.rank_step):
                    if cfg.advance_learn:
                        new += [[name, "A", part], [name, "B", part]]
            self._set_scale(layer)
        rnd = {"step": t, "params": new}
        self.rounds.append(rnd)
        self.optimizer.add_param_group(self._new_group(self.optimizer, self._round_params(rnd), t))
        self.structure_version += 1
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        """At the target: the leftover reserves are switched off (λ = 0) and scoring stops (as the authors)."""
        if self.total < self.target_budget:
            return
        self.done = True
        for a in self.adapters.values():
            for j, st in enumerate(a.part_status):
                if st == "reserve":
                    a.part_status[j] = "dead"
                    with torch.no_grad():
                        a.lora_E_parts[j].zero_()
            a.scoring, a.score = False, None
            self._set_scale(a)
        self.ema_ipt = self.ema_unc = None

    # ------------------------------------------------------------------ the loop's hooks
    def regularization(self) -> torch.Tensor | None:
        """orth_reg_weight · mean over matrices of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F, all parts included (as the
        authors' trainer), or None when the weight is 0."""
        if not self.cfg.orth_reg_weight:
            return None
        return self.cfg.orth_reg_weight * orthogonal_regularization(self.adapters, form="reference")

    # ------------------------------------------------------------------ reporting
    def keep_masks(self) -> dict[str, torch.Tensor]:
        """{module name: bool mask (r,)} over all parts' rows: True for the active components (``RankAllocator``'s
        meaning; reserves and dead parts are not kept)."""
        out = {}
        for n, a in self.adapters.items():
            rows = [torch.full((p.shape[0],), st == "active", dtype=torch.bool, device=p.device)
                    for p, st in zip(a.lora_A_parts, a.part_status)]
            out[n] = torch.cat(rows)
        return out

    def rank_pattern(self) -> dict[str, int]:
        """{module name: active rank}, no host sync."""
        return {n: a.n_active for n, a in self.adapters.items()}

    @property
    def budget(self) -> int:
        """The total active rank now; target_r · n_modules once growth is over."""
        return self.total

    def importance(self) -> torch.Tensor | None:
        """Ī · Ū per module (in ``adapters`` order), None once growth is over."""
        return None if self.ema_ipt is None else self.ema_ipt * self.ema_unc

    # ------------------------------------------------------------------ compaction
    @torch.no_grad()
    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Remove the dead reserve components (λ = 0, so the model's function is unchanged) from the adapters and
        from the optimizer (the attached one, or ``optimizer``). Only once growth is over."""
        if not self.done:
            raise RuntimeError("RankGrower.compact() before the budget is reached: the reserves are still in use")
        optimizer = optimizer if optimizer is not None else self.optimizer
        gone: set[int] = set()
        dead = {n: {j for j, st in enumerate(a.part_status) if st == "dead"} for n, a in self.adapters.items()}
        self.rounds = [{"step": r["step"], "params": [e for e in r["params"] if e[2] not in dead[e[0]]]}
                       for r in self.rounds]  # dead parts are the tail of each module: the others keep their index
        for name, a in self.adapters.items():
            if dead[name]:
                for parts in (a.lora_A_parts, a.lora_E_parts, a.lora_B_parts):
                    gone |= {id(p) for j, p in enumerate(parts) if j in dead[name]}
                _keep_parts(a, [j for j in range(len(a.part_status)) if j not in dead[name]])
        if gone:
            if optimizer is not None:
                for group in optimizer.param_groups:
                    for p in [p for p in group["params"] if id(p) in gone]:
                        optimizer.state.pop(p, None)
                    group["params"] = [p for p in group["params"] if id(p) not in gone]
            self.structure_version += 1
        self.compacted = True
        return self.rank_pattern()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything a resumed run needs (plain values and tensors; loads with torch.load(weights_only=True))."""
        return {
            "step": self.last_step,
            "names": list(self.names),
            "init_ranks": [a.lora_A_parts[0].shape[0] for a in self.adapters.values()],
            "status": [list(a.part_status) for a in self.adapters.values()],
            "total": self.total,
            "done": self.done,
            "compacted": self.compacted,
            "ema_ipt": None if self.ema_ipt is None else self.ema_ipt.clone(),
            "ema_unc": None if self.ema_unc is None else self.ema_unc.clone(),
            "rounds": [{"step": r["step"], "params": [list(e) for e in r["params"]]} for r in self.rounds],
            "generator": self.gen.get_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a saved run: first grow this (fresh) model's adapters to the saved parts, so that the model's
        state dict loads next; then build the optimizer, ``attach_optimizer`` it and load the optimizer's state."""
        if self.optimizer is not None:
            raise ValueError("RankGrower.load_state_dict after attach_optimizer: load the grower's state first, "
                             "then build the optimizer and attach it")
        inits = [a.lora_A_parts[0].shape[0] for a in self.adapters.values()]
        if state["names"] != self.names or [int(r) for r in state["init_ranks"]] != inits:
            raise ValueError("IncreLoRA state was saved for other adapters (module names or initial ranks differ); "
                             "resume with the same model and config")
        advance = self.cfg.advance_learn
        for a, status in zip(self.adapters.values(), state["status"]):
            while len(a.part_status) < len(status):  # values come with the model's state dict
                a.add_part(torch.zeros(1, a.in_features), 0.0, torch.zeros(a.out_features, 1), trainable_ab=advance)
            if len(a.part_status) > len(status):  # the saved run had compacted its dead reserves away
                _keep_parts(a, list(range(len(status))))
            a.part_status = list(status)
            for j, st in enumerate(status):
                a.lora_E_parts[j].requires_grad_(st == "active")
                for parts in (a.lora_A_parts, a.lora_B_parts):
                    parts[j].requires_grad_(st == "active" or advance)
            self._set_scale(a)
        self.last_step = int(state["step"])
        self.total = int(state["total"])
        self.done = bool(state["done"])
        self.compacted = bool(state["compacted"])
        dev = next(iter(self.adapters.values())).base_layer.weight.device
        self.ema_ipt = None if state["ema_ipt"] is None else state["ema_ipt"].to(dev).clone()
        self.ema_unc = None if state["ema_unc"] is None else state["ema_unc"].to(dev).clone()
        self.rounds = [{"step": int(r["step"]), "params": [[str(n), str(k), int(i)] for n, k, i in r["params"]]}
                       for r in state["rounds"]]
        self.gen.set_state(state["generator"])
        for a in self.adapters.values():
            a.scoring, a.score = not self.done, None
        self.structure_version += 1


def _keep_parts(layer: IncreLinear, keep: list[int]) -> None:
    """Keep only the parts ``keep`` of ``layer`` (the same Parameter objects, in new ParameterLists)."""
    for attr in ("lora_A_parts", "lora_E_parts", "lora_B_parts"):
        parts = getattr(layer, attr)
        setattr(layer, attr, nn.ParameterList([parts[j] for j in keep]))
    layer.part_status = [layer.part_status[j] for j in keep]
