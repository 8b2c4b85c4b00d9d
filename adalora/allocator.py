"""RankAllocator: importance EMAs, triplet scores, the cubic budget and global top-b masking.

State lives in one small class. The math is in ``scores.py`` / ``schedule.py`` as pure functions.

Speed (why the layout looks like this): the adapter parameters and their gradients are views
into one flat contiguous buffer each, and the two EMAs are flat buffers of the same size, so
one scoring step is ~5 elementwise kernels over all adapters instead of ~10 per tensor.
Modules of the same shape are stored next to each other so the triplet scores of a masking
step are a handful of batched reductions. The only host sync is in ``rank_pattern()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .config import AdaLoRAConfig, ConfigError
from .layers import AdapterLayer, LoRALinear, SVDLinear
from .schedule import budget_schedule
from .scores import FUSE_MIN_NUMEL, element_scores, fused_importance_update, select_top, update_importance


@dataclass(frozen=True)
class StepInfo:
    step: int
    budget: int
    masked: bool  # this step re-masked to ``budget``
    phase: str  # "warmup" | "decrease" | "final" | "off"


class _Group:
    """Modules sharing (r, in, out): their A's and B's sit back to back in the flat buffer."""

    def __init__(self, names, r, n_in, n_out, a_off, b_off):
        self.names, self.r, self.n_in, self.n_out = names, r, n_in, n_out
        self.a_off, self.b_off = a_off, b_off  # where the A block and the B block start

    def a_block(self, flat):  # (n, r, in)
        n = len(self.names)
        return flat[self.a_off:self.a_off + n * self.r * self.n_in].view(n, self.r, self.n_in)

    def b_block(self, flat):  # (n, out, r)
        n = len(self.names)
        return flat[self.b_off:self.b_off + n * self.n_out * self.r].view(n, self.n_out, self.r)


class RankAllocator:
    """Drives AdaLoRA's budget over a dict of adapters (from ``inject_adapters``).

    Call ``step(t)`` after the t-th ``optimizer.step()`` and before ``zero_grad()``; t counts
    optimizer steps from 1 (under gradient accumulation: optimizer steps, not micro-batches).
    """

    def __init__(self, adapters: Mapping[str, AdapterLayer], cfg: AdaLoRAConfig, fused: bool | None = None):
        """``fused``: compile the importance update into one pass (None: only for >= 1M adapter parameters,
        where it pays for its few seconds of compilation; False: always eager)."""
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
        self._warned_repeat = False
        self._build_layout()
        self.keep = torch.ones(self.init_budget, dtype=torch.bool, device=self._w.device)
        if fused is False:
            self._update = update_importance
        else:  # None: fuse only large buffers; True: always, if torch.compile works here
            self._update = fused_importance_update(self._w, min_numel=0 if fused else FUSE_MIN_NUMEL)
        if fused and self._update is update_importance:
            warnings.warn("RankAllocator(fused=True): torch.compile is not usable here; using the eager update",
                          stacklevel=2)
        scoring = self.prune and cfg.score != "magnitude"
        self.ema_ipt = torch.zeros_like(self._w) if scoring else None  # Ī
        self.ema_unc = torch.zeros_like(self._w) if scoring and cfg.score == "ipt" else None  # Ū

    # ------------------------------------------------------------------ layout
    def _build_layout(self) -> None:
        """Order modules by shape, make params and grads views of flat buffers."""
        adapters = self.adapters
        ref = next(iter(adapters.values())).lora_A
        for n, a in adapters.items():
            if a.lora_A.device != ref.device or a.lora_A.dtype != ref.dtype:
                raise ConfigError(f"adapter {n!r} is on {a.lora_A.device}/{a.lora_A.dtype} but others on "
                                  f"{ref.device}/{ref.dtype}; RankAllocator needs all adapters on one device and dtype")
        keyed: dict[tuple, list[str]] = {}
        for n, a in adapters.items():
            keyed.setdefault((a.r, a.in_features, a.out_features), []).append(n)
        self.order: list[str] = [n for names in keyed.values() for n in names]
        self.ranks = [adapters[n].r for n in self.order]
        n_trip = sum(self.ranks)
        off = n_trip if self.svd else 0  # SVD: all singular values first, so masking is one op
        self.groups: list[_Group] = []
        for (r, n_in, n_out), names in keyed.items():
            a_off = off
            b_off = a_off + len(names) * r * n_in
            off = b_off + len(names) * n_out * r
            self.groups.append(_Group(names, r, n_in, n_out, a_off, b_off))
        # triplet order == self.order (groups are contiguous runs of it)
        # (module, attribute, offset): the parameters are looked up on the modules, so a replaced
        # Parameter object (load_state_dict(assign=True)) is noticed by _check_views
        self._span_src: list[tuple[AdapterLayer, str, int]] = []
        if self.svd:
            e_off = 0
            for n in self.order:
                self._span_src.append((adapters[n], "lora_E", e_off))
                e_off += adapters[n].r
        for g in self.groups:
            for i, n in enumerate(g.names):
                a = adapters[n]
                self._span_src.append((a, "lora_A", g.a_off + i * g.r * g.n_in))
                self._span_src.append((a, "lora_B", g.b_off + i * g.n_out * g.r))
        self._w = torch.empty(off, device=ref.device, dtype=ref.dtype)
        self._g = torch.zeros_like(self._w)
        # one record per span (module, attribute, parameter, its data pointer, its grad view), so the
        # per-step checks in _views_intact / _gather_grads are a single cheap loop
        self._fast = []
        with torch.no_grad():
            for m, k, o in self._span_src:
                p = getattr(m, k)
                self._w[o:o + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self._w[o:o + p.numel()].view(p.shape)
                self._fast.append((m, k, p, p.data_ptr(), self._g[o:o + p.numel()].view(p.shape)))
        if not self.svd:  # prune-LoRA: the gates are views of one flat mask too
            self._gate = torch.ones(n_trip, device=ref.device, dtype=ref.dtype)
            t = 0
            for n in self.order:
                a = adapters[n]
                self._gate[t:t + a.r].copy_(a.lora_mask)
                a.lora_mask = self._gate[t:t + a.r]
                t += a.r
        self._gates = [] if self.svd else [(self.adapters[n], self.adapters[n].lora_mask.data_ptr())
                                          for n in self.order]

    def _views_intact(self) -> bool:
        for m, k, p, ptr, _ in self._fast:
            if getattr(m, k) is not p or p.data_ptr() != ptr:
                return False
        return all(a.lora_mask.data_ptr() == ptr for a, ptr in self._gates)

    def _check_views(self) -> None:
        """Re-adopt the parameters if something (``model.to()``, ``load_state_dict(assign=True)``) replaced them."""
        if self._views_intact():
            return
        self._build_layout()
        dev, dtype = self._w.device, self._w.dtype
        for name in ("keep", "final_keep", "final_scores"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(dev))
        for name in ("ema_ipt", "ema_unc"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(dev, dtype))

    def _gather_grads(self) -> torch.Tensor:
        """Gradients as one flat tensor; the per-parameter grads become views of it, so with
        ``zero_grad(set_to_none=False)`` later backwards accumulate straight into it."""
        for _, _, p, _, view in self._fast:
            g = p.grad
            if g is view:  # the usual case with zero_grad(set_to_none=False): nothing to do
                continue
            if g is None:  # e.g. a module unused in this forward: zero sensitivity, grad left None
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
                p.grad = view
            else:
                p.grad = view
        return self._g

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
            if not self._warned_repeat:
                warnings.warn(f"RankAllocator.step({t}) called twice; the repeat is ignored", stacklevel=2)
                self._warned_repeat = True
            return self._info(t, False)
        self.last_step = t
        if not self.prune or self.compacted:
            return self._info(t, False)
        self._check_views()
        cfg = self.cfg
        sched = self._schedule(t)
        if sched.phase != "final" and self.ema_ipt is not None:
            with torch.no_grad():
                self._update(self._w, self._gather_grads(), self.ema_ipt, self.ema_unc, cfg.beta1, cfg.beta2)
        if sched.phase == "final":
            if self.final_keep is None:  # the pattern is fixed here, from the last scores
                self.final_scores = self.triplet_scores()
                self.final_keep = select_top(self.final_scores, self.target_budget)
                self.keep = self.final_keep
                self.ema_ipt = self.ema_unc = None  # scoring is over: free 2x adapter memory
                self._freeze_pattern()
            self._apply(self.final_keep)
            return StepInfo(t, self.target_budget, True, "final")
        if sched.mask:
            self.keep = select_top(self.triplet_scores(), sched.budget)
            self._apply(self.keep)
        return StepInfo(t, sched.budget, sched.mask, sched.phase)

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
        """S_i for every triplet, in ``self.order`` (facts §2): s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)."""
        if self.compacted:
            raise RuntimeError("triplet_scores() after compact(): the pruned triplets are gone")
        n_trip = sum(self.ranks)
        if self.cfg.score == "magnitude":
            return self._w[:n_trip].abs()
        if self.ema_ipt is None:  # final phase: scoring is over, return the scores the pattern was frozen from
            if self.final_scores is None:
                raise RuntimeError("no importance scores: pruning is off (prune=False or target_r >= init_r)")
            return self.final_scores.clone()
        ipt, unc = self.ema_ipt, self.ema_unc
        if unc is None:  # sensitivity only: s = Ī
            parts = [(g.a_block(ipt).mean(-1) + g.b_block(ipt).mean(1)).reshape(-1) for g in self.groups]
        else:  # s = Ī ⊙ Ū, reduced per row / column without materialising the full product
            parts = [(torch.linalg.vecdot(g.a_block(ipt), g.a_block(unc)) / g.n_in  # (n_g, r): mean_j s(A_ij)
                      + torch.linalg.vecdot(g.b_block(ipt), g.b_block(unc), dim=1) / g.n_out).reshape(-1)
                     for g in self.groups]
        score = torch.cat(parts) if parts else ipt.new_zeros(0)  # (n_trip,) in self.order
        return score + element_scores(ipt[:n_trip], None if unc is None else unc[:n_trip]) if self.svd else score

    @torch.no_grad()
    def _apply(self, keep: torch.Tensor) -> None:
        if self.svd:
            self._w[:keep.numel()].masked_fill_(~keep, 0.0)  # E_i = 0; A, B untouched, a triplet may revive
        else:
            self._gate.copy_(keep)

    # ------------------------------------------------------------------ reporting
    def rank_pattern(self) -> dict[str, int]:
        """{module name: kept rank}, in ``named_modules()`` order (one host sync)."""
        if self.compacted or not self.prune:
            return {n: a.r for n, a in self.adapters.items()}
        counts = dict(zip(self.order, [int(c) for c in torch.stack(
            [k.sum() for k in self.keep.split(self.ranks)]).tolist()])) if self.order else {}
        return {n: counts[n] for n in self.adapters}

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """{module name: bool mask (r,)} of kept triplets."""
        if self.compacted:
            return {n: torch.ones(a.r, dtype=torch.bool) for n, a in self.adapters.items()}
        masks = dict(zip(self.order, self.keep.split(self.ranks)))
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
        self.ema_ipt = self.ema_unc = None
        self._w = self._g = None
        return self.rank_pattern()

    def _freeze_pattern(self) -> None:
        """From the final phase on the pattern is fixed: pruned triplets get no gradient (E's grad is
        masked) and the orthogonality penalty covers the kept triplets only, so training with the
        pruned triplets masked in place and training after ``compact()`` are the same computation."""
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
            "names": list(self.order),
            "ranks": list(self.ranks),
            "compacted": self.compacted,
            "ema_ipt": None if self.ema_ipt is None else self.ema_ipt.clone(),
            "ema_unc": None if self.ema_unc is None else self.ema_unc.clone(),
            "keep": self.keep.clone(),
            "final_keep": None if self.final_keep is None else self.final_keep.clone(),
            "final_scores": None if self.final_scores is None else self.final_scores.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved schedule. If the saved run had compacted, this fresh allocator compacts its
        adapters the same way here, so load it before the model's weights and build the optimizer after."""
        if state["names"] != self.order or state["ranks"] != self.ranks:
            if not (state.get("compacted") and self.compacted):
                raise ValueError("allocator state was saved for other adapters (module names or ranks differ); "
                                 "resume with the same model and method config")
        saved_compacted = bool(state.get("compacted", False))
        if self.compacted and not saved_compacted:
            raise ValueError("this allocator has compacted its adapters; it cannot load the state of a run that "
                             "had not. Build a fresh model and allocator to load it")
        self.last_step = int(state["step"])
        dev = self.keep.device
        self.keep = state["keep"].to(dev, torch.bool)
        self.final_keep = None if state["final_keep"] is None else state["final_keep"].to(dev, torch.bool)
        fs = state.get("final_scores")
        self.final_scores = None if fs is None else fs.to(dev)
        for name in ("ema_ipt", "ema_unc"):
            src = state[name]
            if src is None:
                setattr(self, name, None)
            elif getattr(self, name) is None:
                setattr(self, name, src.to(self._w.device, self._w.dtype).clone())
            else:
                getattr(self, name).copy_(src)
        if self.final_keep is not None:
            self._freeze_pattern()
        if saved_compacted and not self.compacted:  # slice to the saved pattern, so the saved weights fit
            self.compact()
        if not self.compacted and self.prune:  # the parameters' E already hold the mask; the LoRA gates do not
            if not self.svd:
                self._gate.copy_(self.keep)
