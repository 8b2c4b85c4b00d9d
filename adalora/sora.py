"""SoRA (Ding et al., EMNLP 2023): LoRA with a sparse gate, trained by a proximal (soft-threshold) Adam step.

ΔW = B diag(g) A · alpha / r, with A = ``lora_A`` (r, in), g = ``lora_E`` (r, 1), B = ``lora_B`` (out, r): the
SVDLinear layout, so the gate sits between the down and the up projection. A gate that reaches 0 switches its
rank component off; ``compact`` then removes the component's row of A and column of B.

The gates are not in the main optimizer. ``SoRAGates`` trains them the way the authors' SparseAdamW does, after
each optimizer step: one Adam step on their gradient (task loss + l1_weight · mean|g|), then the threshold

    g ← sign(g) · max(|g| − τ, 0),    τ = ξ (the authors' code) or lr_t · ξ (the paper),

which zeroes exactly the gates with |g| ≤ τ and moves every other gate τ towards 0. The math is in pure
functions below; ``SoRAGates`` holds the gates' Adam state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .allocator import StepInfo, next_step
from .config import ConfigError, LoRAConfig, SoRAConfig
from .inject import inject_adapters
from .layers import SVDLinear
from .scores import select_top


# ---------------------------------------------------------------------------------------------- math
def soft_threshold(g: torch.Tensor, tau: float) -> torch.Tensor:
    """The proximal operator of τ‖g‖₁: 0 where |g| <= τ, g − τ·sign(g) elsewhere (a new tensor)."""
    return torch.sign(g) * torch.clamp(g.abs() - tau, min=0.0)


def reference_threshold(g: torch.Tensor, tau: float) -> torch.Tensor:
    """The authors' three masked updates, applied one after the other (a new tensor).

    ``g[g > τ] -= τ; g[g < −τ] += τ; g[|g| < τ] = 0``: the last mask sees the already shrunk values, so every
    gate with |g| < 2τ ends at 0 (except |g| == τ and |g| == 2τ exactly) while the others shrink by τ.
    """
    g = g.clone()
    g[g > tau] -= tau
    g[g < -tau] += tau
    g[g.abs() < tau] = 0.0
    return g


def budget_floor(before: torch.Tensor, after: torch.Tensor, eligible: torch.Tensor, budget: int) -> torch.Tensor:
    """The threshold never takes the non-zero gates below ``budget``: when ``after`` (the gates once thresholded)
    has fewer than ``budget`` non-zero entries, the ``budget`` largest ``|before|`` among ``eligible`` (the gates
    before the threshold) keep their ``before`` value where the threshold zeroed them. Otherwise ``after``
    unchanged. Tensor ops only (no host sync). before, after, eligible: (n,)."""
    short = torch.count_nonzero(after) < budget  # () bool
    protect = select_top(before.abs().masked_fill(~eligible, -1.0), budget)  # (n,) bool, ineligible never chosen
    return torch.where(short & protect & eligible & (after == 0), before, after)


def gate_adam_step(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   steps: torch.Tensor, lr: float, betas: tuple, eps: float) -> None:
    """In place, per element: the Adam step of transformers.AdamW (correct_bias, no weight decay).

    m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²;  p ← p − lr · √(1 − β2^k) / (1 − β1^k) · m / (√v + eps),
    with k = ``steps`` (int64, one count per gate, incremented here).
    """
    b1, b2 = betas
    steps.add_(1)
    exp_avg.mul_(b1).add_(grad, alpha=1.0 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
    k = steps.to(torch.float64)
    step_size = (lr * torch.sqrt(1.0 - b2 ** k) / (1.0 - b1 ** k)).to(p.dtype)  # (n,), bias-corrected
    p.sub_(step_size * exp_avg / exp_avg_sq.sqrt().add_(eps))


def lambda_values(kind: str, start: float, stop: float, num: int) -> list[float]:
    """The thresholds ξ_0 = start, ..., ξ_{num−1} = stop of the authors' sparsifying scheduler.

    linear: evenly spaced; log_linear: log of evenly spaced exp(ξ); exp_linear: exp of evenly spaced log(ξ).
    """
    if kind == "linear":
        vals = np.linspace(start, stop, num)
    elif kind == "log_linear":
        vals = np.log(np.linspace(np.exp(start), np.exp(stop), num))
    elif kind == "exp_linear":
        vals = np.exp(np.linspace(np.log(start), np.log(stop), num))
    else:
        raise ValueError(f"lambda_values(kind={kind!r}): use 'linear', 'log_linear' or 'exp_linear'")
    return [float(v) for v in vals]


def lambda_stage(step: int, first_stage: int, stage_steps: int, num: int) -> int:
    """Index of the threshold used at optimizer step ``step`` (from 1).

    Stage 0 is the main run (steps 1..first_stage); each later stage lasts ``stage_steps`` steps, and the last
    threshold is kept once the list ends (as the authors' ``step_lambda``).
    """
    if step <= first_stage:
        return 0
    return min(num - 1, 1 + (step - first_stage - 1) // stage_steps)


# ---------------------------------------------------------------------------------------------- adapter
class SoRALinear(SVDLinear):
    """SoRA's adapter with the authors' init: A kaiming-uniform (as loralib), B zeros, g ~ N(0, 1).

    ΔW = B diag(g) A · alpha / r; the scale stays alpha / r_max after compaction (a Python float).
    """

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.numel():  # rank 0: nothing to initialise
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.normal_(self.lora_E)  # torch.randn(1, r) in the authors' LowRankLinear
        nn.init.zeros_(self.lora_B)


def inject_sora(model: nn.Module, cfg: SoRAConfig) -> dict[str, SoRALinear]:
    """Wrap the targeted linear layers of ``model`` in ``SoRALinear`` and freeze the rest (as ``inject_adapters``)."""
    if not isinstance(cfg, SoRAConfig):
        raise ConfigError(f"inject_sora needs a SoRAConfig, got {type(cfg).__name__}")
    plain = inject_adapters(model, LoRAConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                              target_modules=cfg.target_modules,
                                              modules_to_save=list(cfg.modules_to_save),
                                              rank_pattern=dict(cfg.rank_pattern)))
    out: dict[str, SoRALinear] = {}
    for name, layer in plain.items():  # same targets, freezing and checks; only the adapter class differs
        new = SoRALinear(layer.base_layer, layer.r, cfg.lora_alpha, cfg.lora_dropout)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        out[name] = new
    return out


# ---------------------------------------------------------------------------------------------- state
class SoRAGates:
    """Owns the gates g (every adapter's ``lora_E``): their Adam state, the threshold, the optional budget cap.

    Call order per optimizer step t (from 1):
        loss = task_loss + gates.regularization()       # l1_weight · mean|g|
        loss.backward(); clip(main params + gates.own_parameters())
        gates.set_lr(main_lr_t)                           # any time before gates.step(t)
        optimizer.step()                                  # the main optimizer: everything but the gates
        gates.step(t)                                     # Adam + threshold on the gates, clears their grads
        optimizer.zero_grad()

    ``lr`` is the main optimizer's peak learning rate: the gates use ``cfg.sparse_lr`` (or ``lr`` when it is
    None) scaled by the same schedule, i.e. ``set_lr(main_lr_t)`` sets ``main_lr_t * sparse_lr / lr``.
    """

    def __init__(self, adapters: Mapping[str, SVDLinear], cfg: SoRAConfig, lr: float | None = None):
        if not isinstance(cfg, SoRAConfig):
            raise ConfigError(f"SoRAGates needs a SoRAConfig, got {type(cfg).__name__}")
        if not adapters:
            raise ConfigError("SoRAGates got no adapters: call inject_sora(model, cfg) first")
        bad = [n for n, a in adapters.items() if not isinstance(a, SVDLinear)]
        if bad:
            raise ConfigError(f"adapters {bad[:3]} have no gate (lora_E): build them with inject_sora(model, cfg)")
        if cfg.sparse_lr is None and lr is None:
            raise ConfigError("SoRAGates: SoRAConfig.sparse_lr is None, so the gates train at the main learning rate. "
                              "Fix: pass lr=<the main optimizer's lr>, or set sparse_lr")
        if lr is not None and not lr > 0:
            raise ConfigError(f"SoRAGates(lr={lr!r}): the main learning rate must be > 0")
        self.cfg = cfg
        self.adapters = dict(adapters)
        self.base_lr = lr  # the main optimizer's peak learning rate (None: not given, sparse_lr is set)
        self.gate_lr = float(cfg.sparse_lr if cfg.sparse_lr is not None else lr)  # the gates' lr for the next step
        self.lr_ratio = 1.0 if cfg.sparse_lr is None or lr is None else cfg.sparse_lr / lr
        n = sum(self.ranks)
        e = next(iter(self.adapters.values())).lora_E
        self.exp_avg = torch.zeros(n, device=e.device, dtype=e.dtype)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.steps = torch.zeros(n, device=e.device, dtype=torch.int64)  # Adam's k, one per gate
        self.frozen = torch.zeros(n, device=e.device, dtype=torch.bool)  # zeroed for good by the budget cap
        self.capped = False
        self.target_budget = None if cfg.target_r is None else cfg.target_r * len(self.adapters)
        self.last_step = 0
        self.compacted = False  # compact() has run: removed components cannot come back
        self.structure_version = 0  # bumped whenever compact() replaces parameters
        self._warned_repeat = False
        self._nonzero = self.gates() != 0

    # ------------------------------------------------------------------ views
    @property
    def ranks(self) -> list[int]:
        return [a.r for a in self.adapters.values()]

    def gates(self) -> torch.Tensor:
        """All gates as one flat tensor (a copy), in ``adapters`` order."""
        return torch.cat([a.lora_E.detach().reshape(-1) for a in self.adapters.values()])

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """{module name: bool mask (r,)} of the components in use: the non-zero gates (``RankAllocator``'s meaning)."""
        return {n: a.lora_E.detach().view(-1) != 0 for n, a in self.adapters.items()}

    def own_parameters(self) -> list[nn.Parameter]:
        """The gates: this class optimizes them, so leave them out of the main optimizer (clip them with it)."""
        return [a.lora_E for a in self.adapters.values()]

    def threshold_at(self, step: int) -> float:
        """ξ at optimizer step ``step``: ``cfg.threshold``, or the sparsifying scheduler's value for its stage."""
        c = self.cfg
        if c.lambda_schedule is None:
            return float(c.threshold)
        vals = lambda_values(c.lambda_schedule, c.threshold, c.max_lambda, c.lambda_num)
        return vals[lambda_stage(step, c.total_steps, c.lambda_stage_steps, c.lambda_num)]

    # ------------------------------------------------------------------ the loop's hooks
    def set_lr(self, lr: float) -> None:
        """The main optimizer's learning rate for the coming step; the gates follow it (times sparse_lr / lr)."""
        if self.base_lr is None:  # sparse_lr alone: the schedule's factor lr / peak is unknown
            raise ConfigError("SoRAGates.set_lr: scaling sparse_lr by the main schedule needs the main peak learning "
                              "rate. Fix: build SoRAGates(adapters, cfg, lr=<optimizer lr>), or do not call set_lr "
                              "(the gates then train at sparse_lr throughout)")
        self.gate_lr = float(lr) * self.lr_ratio

    def regularization(self) -> torch.Tensor | None:
        """l1_weight · mean over all gates of |g| (the authors' ``sparse_lambda * Σ|g| / n``), or None when 0."""
        g = torch.cat([a.lora_E.reshape(-1) for a in self.adapters.values()])
        if not self.cfg.l1_weight or g.numel() == 0:  # no weight, or every gate compacted away
            return None
        return self.cfg.l1_weight * g.abs().mean()

    def zero_grad(self) -> None:
        for p in self.own_parameters():
            p.grad = None

    # ------------------------------------------------------------------ the step
    def step(self, global_step: int | None = None) -> StepInfo:
        """Adam step + threshold on every gate that has a gradient, for optimizer step ``global_step`` (from 1)."""
        t = next_step("SoRAGates", global_step, self.last_step)
        if t == self.last_step:
            if not self._warned_repeat:
                warnings.warn(f"SoRAGates.step({t}) called twice; the repeat is ignored", stacklevel=2)
                self._warned_repeat = True
            return StepInfo(t, self.budget, False, self.phase)
        self.last_step = t
        layers = list(self.adapters.values())
        with torch.no_grad():
            p = self.gates()
            self._follow(p)
            # a gate without gradient (module unused in this forward) is left alone, as torch and the authors do
            live = torch.cat([torch.full((a.r,), a.lora_E.grad is not None, device=p.device) for a in layers])
            grad = torch.cat([a.lora_E.grad.reshape(-1) if a.lora_E.grad is not None
                              else torch.zeros(a.r, device=p.device, dtype=p.dtype) for a in layers])
            live &= ~self.frozen
            new_p, m, v, k = p.clone(), self.exp_avg.clone(), self.exp_avg_sq.clone(), self.steps.clone()
            gate_adam_step(new_p, grad, m, v, k, self.gate_lr, tuple(self.cfg.gate_betas), self.cfg.gate_eps)
            tau = self.threshold_at(t) * (self.gate_lr if self.cfg.threshold_scale == "lr" else 1.0)
            stepped = new_p
            new_p = soft_threshold(new_p, tau) if self.cfg.prox == "soft" else reference_threshold(new_p, tau)
            new_p = torch.where(live, new_p, p)
            if self.target_budget is not None:  # budget-matched: never fewer than b non-zero gates
                new_p = budget_floor(torch.where(live, stepped, p), new_p, ~self.frozen, self.target_budget)
            p = new_p
            self.exp_avg = torch.where(live, m, self.exp_avg)
            self.exp_avg_sq = torch.where(live, v, self.exp_avg_sq)
            self.steps = torch.where(live, k, self.steps)
            if self.target_budget is not None and not self.capped and t >= self.cfg.total_steps - self.cfg.tfinal:
                self.frozen = ~select_top(p.abs(), self.target_budget)  # keep the b largest |g|, the rest for good
                self.capped = True
            if self.capped:
                p.masked_fill_(self.frozen, 0.0)
                self.exp_avg.masked_fill_(self.frozen, 0.0)
                self.exp_avg_sq.masked_fill_(self.frozen, 0.0)
            for a, chunk in zip(layers, p.split(self.ranks)):
                a.lora_E.copy_(chunk.view(-1, 1))
            self.zero_grad()
            nonzero = p != 0
            changed, kept = torch.stack([(nonzero != self._nonzero).any().long(), nonzero.sum()]).tolist()  # 1 sync
            self._nonzero = nonzero
        return StepInfo(t, self.target_budget if self.capped else kept, bool(changed), self.phase)

    def _follow(self, p: torch.Tensor) -> None:
        """Move the Adam state with the gates after ``model.to(device / dtype)``."""
        if self.exp_avg.device != p.device or self.exp_avg.dtype != p.dtype:
            self.exp_avg = self.exp_avg.to(p.device, p.dtype)
            self.exp_avg_sq = self.exp_avg_sq.to(p.device, p.dtype)
            self.steps, self.frozen = self.steps.to(p.device), self.frozen.to(p.device)
            self._nonzero = self._nonzero.to(p.device)

    @property
    def phase(self) -> str:
        return "final" if self.capped else "sparsify"

    # ------------------------------------------------------------------ reporting
    def rank_pattern(self) -> dict[str, int]:
        """{module name: number of non-zero gates} (one host sync)."""
        counts = [int(c) for c in torch.stack([torch.count_nonzero(a.lora_E) for a in self.adapters.values()])]
        return dict(zip(self.adapters, counts))

    @property
    def budget(self) -> int:
        """Non-zero gates over all modules; in the budget-matched mode after the cap, the cap target_r · n."""
        if self.capped:
            return self.target_budget
        return int(torch.count_nonzero(self.gates()))

    def n_kept_parameters(self) -> int:
        """Adapter parameters left once the zero-gate components are dropped: Σ kept_r · (in + out + 1)."""
        pattern = self.rank_pattern()
        return sum(pattern[n] * (a.in_features + a.out_features + 1) for n, a in self.adapters.items())

    # ------------------------------------------------------------------ distributed
    def mask_state(self) -> dict:
        """What makes the ranks agree (``distributed.sync_controller`` broadcasts it): the gates, flat in
        ``adapters`` order, their Adam moments and the budget cap's frozen mask."""
        p = self.gates()
        self._follow(p)
        return {"gates": p, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "frozen": self.frozen}

    @torch.no_grad()
    def set_mask_state(self, state: Mapping) -> bool:
        """Take another rank's ``mask_state()``; return whether it changed which gates are non-zero here."""
        self._follow(self.gates())
        p = state["gates"].to(self.exp_avg.device, self.exp_avg.dtype)
        if p.numel() != self.exp_avg.numel():
            raise ValueError(f"SoRA mask state has {p.numel()} gates but these adapters have {self.exp_avg.numel()}: "
                             "every rank must compact alike")
        frozen = state["frozen"].to(self.frozen)
        differed = bool(((p != 0) != (self.gates() != 0)).any() or (frozen != self.frozen).any())
        for a, chunk in zip(self.adapters.values(), p.split(self.ranks)):
            a.lora_E.copy_(chunk.view(-1, 1))
        self.exp_avg = state["exp_avg"].to(self.exp_avg).clone()
        self.exp_avg_sq = state["exp_avg_sq"].to(self.exp_avg).clone()
        self.frozen = frozen.clone()
        self._nonzero = p != 0
        return differed

    # ------------------------------------------------------------------ compaction
    @torch.no_grad()
    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Remove every zero-gate component: A's row, g, B's column, with the optimizers' state for them.

        A removed component cannot come back (before, a zero gate may revive). Each sliced tensor becomes a new
        Parameter; ``optimizer`` (the main one, holding A and B) is re-pointed and its state sliced alike.
        Rebuild any list of parameters you hold (clipping, DDP) after this call.
        """
        keep_flat = self.gates() != 0
        swap: dict[nn.Parameter, tuple] = {}
        for a, keep in zip(self.adapters.values(), keep_flat.split(self.ranks)):
            if bool(keep.all()):
                continue
            idx = keep.nonzero().view(-1).to(a.lora_A.device)
            for pname, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                old = getattr(a, pname)
                new = nn.Parameter(old.detach().index_select(dim, idx).contiguous(), requires_grad=old.requires_grad)
                if old.grad is not None:
                    new.grad = old.grad.index_select(dim, idx).contiguous()
                setattr(a, pname, new)
                swap[old] = (new, dim, idx)
        if swap:
            self.exp_avg, self.exp_avg_sq = self.exp_avg[keep_flat], self.exp_avg_sq[keep_flat]
            self.steps, self.frozen, self._nonzero = self.steps[keep_flat], self.frozen[keep_flat], keep_flat[keep_flat]
            if optimizer is not None:
                _swap_in_optimizer(optimizer, swap)
            self.structure_version += 1
        self.compacted = True
        return self.rank_pattern()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything a resumed run needs (plain values and tensors; loads with torch.load(weights_only=True))."""
        return {
            "step": self.last_step,
            "names": list(self.adapters),
            "ranks": self.ranks,
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "steps": self.steps.clone(),
            "frozen": self.frozen.clone(),
            "capped": self.capped,
            "compacted": self.compacted,
            "gate_lr": self.gate_lr,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved run. If it had compacted, the adapters here are cut to the saved ranks first, so load
        this before the model's weights and build the main optimizer after."""
        if state["names"] != list(self.adapters):
            raise ValueError("SoRA state was saved for other adapters (module names differ); resume with the same "
                             "model and config")
        ranks = [int(r) for r in state["ranks"]]
        if any(r > a.r for r, a in zip(ranks, self.adapters.values())):
            raise ValueError(f"SoRA state has ranks {ranks} but these adapters have {self.ranks}: build a fresh "
                             "model to load it")
        resized = any(r != a.r for r, a in zip(ranks, self.adapters.values()))
        with torch.no_grad():
            for r, a in zip(ranks, self.adapters.values()):
                if r != a.r:  # the saved run had compacted this module; the values come with the model's weights
                    a.lora_A = nn.Parameter(a.lora_A.detach()[:r].clone())
                    a.lora_E = nn.Parameter(a.lora_E.detach()[:r].clone())
                    a.lora_B = nn.Parameter(a.lora_B.detach()[:, :r].clone())
                    self.structure_version += 1
        dev = self.exp_avg.device
        self.last_step = int(state["step"])
        self.exp_avg = state["exp_avg"].to(dev, self.exp_avg.dtype).clone()
        self.exp_avg_sq = state["exp_avg_sq"].to(dev, self.exp_avg.dtype).clone()
        self.steps = state["steps"].to(dev, torch.int64).clone()
        self.frozen = state["frozen"].to(dev, torch.bool).clone()
        self.capped = bool(state["capped"])
        self.compacted = bool(state.get("compacted", resized))  # states saved before the key: resized = compacted
        self.gate_lr = float(state["gate_lr"])
        self._nonzero = self.gates() != 0


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, swap: dict) -> None:
    """Point ``optimizer`` at the sliced Parameters of ``swap`` {old: (new, dim, idx)} and slice their state."""
    for group in optimizer.param_groups:
        group["params"] = [swap[p][0] if p in swap else p for p in group["params"]]
    for old, (new, dim, idx) in swap.items():
        st = optimizer.state.pop(old, None)
        if st is not None:
            optimizer.state[new] = {k: v.index_select(dim, idx.to(v.device)).contiguous()
                                    if torch.is_tensor(v) and v.shape == old.shape else v for k, v in st.items()}
