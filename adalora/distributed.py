"""Multi-process training (``torchrun`` / DDP) with the adaptive-rank controller consistent across ranks.

Why the allocator needs no all-reduce of its own: under ``DistributedDataParallel`` every rank holds
the same averaged gradients after ``backward()``, so the same optimizer step, the same importance
EMAs, the same triplet scores and the same stable-sorted masks follow on every rank. ``sync_controller``
is the belt and braces: after each masking step it broadcasts rank 0's mask (and the singular values it
was applied to) to the others, so float nondeterminism can never make two ranks keep different triplets.

The rivals (``sync_controller`` takes any controller; ``sync_allocator`` is the same function):

- SoRA (``SoRAGates``): the gates see DDP's averaged gradients too, but which gates are zero is decided by
  the values, at any step, so ``sync_controller`` broadcasts rank 0's gates, their Adam moments and the cap's
  frozen mask after every step (4 floats per gate, e.g. 9 KB for 576 gates).
- IncreLoRA (``RankGrower``): a module's score comes from each rank's own ∂L/∂ΔW, taken before DDP averages
  the gradients, so the ranks score differently by design. A decision cannot be undone after the fact (a round
  adds Parameters), so the grower itself broadcasts rank 0's importance EMAs at each growth round, before it
  plans (``RankGrower.plan_src``); ``sync_controller`` only reports whether this rank's own scores would have
  grown other modules. After a round, wrap the model in DDP again (new Parameters).

Usage (see docs/integrations.md, "Distributed training")::

    distributed.init_from_env()                       # torchrun's env vars; gloo on CPU, nccl on CUDA
    adapters = inject_adapters(model, cfg)
    allocator = RankAllocator(adapters, cfg)          # before or after DDP: both work (tests check both)
    ddp = distributed.wrap_ddp(model)                 # the plain model when not distributed
    for t, batch in enumerate(global_batches, 1):
        local, w = distributed.shard_batch(batch)     # this rank's rows + loss weight (1.0 for equal shares)
        loss = distributed.weight_loss(loss_fn(ddp, local), w) + gamma * orthogonal_regularization(adapters)
        loss.backward(); optimizer.step()
        info = allocator.step(t)
        distributed.sync_controller(allocator, info)  # no-op unless distributed and a masking step
        optimizer.zero_grad(set_to_none=False)
        if info.phase == "final" and not allocator.compacted:
            allocator.compact(optimizer)              # new Parameter objects: DDP must be rebuilt
            ddp = distributed.wrap_ddp(distributed.unwrap(ddp))
    if distributed.is_main(): save_adapter(...)      # only rank 0 writes files

Every function here is a no-op (or the single-process answer) when no process group is initialised,
so the same script runs with ``python`` and with ``torchrun``.

What was checked (tests/test_distributed.py, 2 gloo processes on CPU): the allocator created before or after
DDP, prune-LoRA, gradient accumulation under ``no_sync``, ``compact()`` + re-wrap: the ranks hold identical
masks and bit-identical weights, equal to one process on the whole global batch within 3e-7. DDP's default
``gradient_as_bucket_view=False`` writes the averaged gradients into the allocator's flat grad buffer in place;
``True`` is also correct but re-points ``p.grad`` every step, costing the allocator one copy per step. SoRA and
IncreLoRA (the generic loop of ``adalora.adaptive``, DDP rebuilt after each growth round): identical patterns at every
step and bit-identical weights, also when one rank's gate gradients or module scores are perturbed; SoRA equal to
one process within 1e-5. Seed every rank alike (the model's init must match; DDP also broadcasts rank 0's weights
at wrap time).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "cleanup",
    "env_world_size",
    "grad_sync",
    "init_from_env",
    "is_dist",
    "is_main",
    "local_device",
    "local_rank",
    "masks_agree",
    "mean_across_ranks",
    "rank",
    "shard_batch",
    "sync_allocator",
    "sync_controller",
    "unwrap",
    "weight_loss",
    "world_size",
    "wrap_ddp",
]


# ---------------------------------------------------------------------------------------------- who am I
def is_dist() -> bool:
    """True when a default process group is initialised (even of size 1)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Rank 0 (or not distributed): the one process that writes files, logs and checkpoints."""
    return rank() == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset): known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK): the GPU it should use."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def local_device(prefer_cuda: bool = True) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is there (and wanted), else the CPU."""
    if prefer_cuda and torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group that torchrun's environment describes; return whether running distributed.

    Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK for the GPU). With WORLD_SIZE unset
    or 1 it does nothing and returns False, so single-process runs need no special case. ``backend``:
    default nccl when CUDA is available, gloo otherwise (CPU). Idempotent: an initialised group is kept.
    """
    if is_dist():
        return dist.get_world_size() > 1
    world = env_world_size()
    if world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun "
                           "(torchrun --nproc_per_node=N experiments/train.py ...), which sets them")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group(backend=backend, init_method="env://", rank=int(os.environ["RANK"]), world_size=world,
                            **kw)
    return True


def cleanup() -> None:
    """Leave the process group (if any)."""
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects: a run folder, a resume path, a config)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_tensors(*tensors: torch.Tensor, src: int = 0) -> bool:
    """Copy rank ``src``'s values into ``tensors`` on every rank, in place (one broadcast of their concatenation in
    float32 or wider); return whether this rank's values differed. A no-op (False) when not distributed."""
    if not is_dist() or dist.get_world_size() == 1 or not tensors:
        return False
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)
    buf = torch.cat([t.detach().reshape(-1).to(_comm_device(), dtype) for t in tensors])
    mine = buf.clone()
    dist.broadcast(buf, src=src)
    for t, chunk in zip(tensors, buf.split([t.numel() for t in tensors])):
        t.copy_(chunk.view(t.shape).to(t.device, t.dtype))
    return not torch.equal(buf, mine)


def mean_across_ranks(value: float | torch.Tensor) -> float:
    """The mean of a scalar over ranks (one all-reduce): e.g. the training loss to log, or to decide a
    skip-on-NaN identically everywhere."""
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- the model
def wrap_ddp(model: nn.Module, **kwargs) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

    Creating the ``RankAllocator`` before or after wrapping both work: the allocator swaps ``p.data``
    (same Parameter objects, same device and dtype, so DDP's hooks stay valid) and re-points ``p.grad``
    to views of its flat grad buffer; with the default ``gradient_as_bucket_view=False`` DDP copies the
    averaged bucket into ``p.grad`` in place, i.e. straight into the allocator's buffer. ``compact()``
    makes new Parameter objects: wrap ``unwrap(ddp)`` again after it (modules compacted to rank 0 are
    then left out of DDP: they have no gradient to reduce).
    """
    if not is_dist() or dist.get_world_size() == 1:
        return model
    ddp = nn.parallel.DistributedDataParallel
    # a module compacted to rank 0 skips its adapter in forward: its empty tensors never get a gradient,
    # which DDP (find_unused_parameters=False) would wait for forever; they have nothing to reduce anyway
    empty = {n for n, p in model.named_parameters() if p.requires_grad and p.numel() == 0}
    if empty:
        ddp._set_params_and_buffers_to_ignore_for_model(
            model, sorted(empty | set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))))
    dev = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))
    if dev.type == "cuda":
        kwargs.setdefault("device_ids", [dev.index])
        kwargs.setdefault("output_device", dev.index)
    return ddp(model, **kwargs)


def grad_sync(net: nn.Module, enabled: bool = True):
    """Context for one micro-batch's forward and backward under gradient accumulation: DDP all-reduces
    only when ``enabled`` (the last micro-batch of the optimizer step). A no-op context for a plain module."""
    if not enabled and isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (what to evaluate, save and hand to ``inject``/``compact``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------- data
def _rows(batch) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _rows(next(iter(batch.values())))
    return _rows(batch[0])


def _slice(batch, lo: int, hi: int):
    if torch.is_tensor(batch):
        return batch[lo:hi]
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, lo, hi) for k, v in batch.items()})
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return type(batch)(_slice(v, lo, hi) for v in batch)
    return batch


def shard_batch(batch, rank_: int | None = None, world: int | None = None):
    """This rank's contiguous share of a global batch, and the weight for its mean loss.

    ``batch``: a tensor, a tuple/list or a dict of tensors with the examples on dim 0. Returns
    ``(local_batch, weight)`` with ``weight = local_rows * world / global_rows``: DDP averages the ranks'
    gradients, so ``weight * mean_local_loss`` gives exactly the gradient of the global batch's mean loss,
    also when the rows do not split evenly (weight 1.0 when they do). Valid for losses that are a mean
    over rows (classification, regression); a per-token mean needs its own weighting.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w == 1:
        return batch, 1.0
    n = _rows(batch)
    lo, hi = n * r // w, n * (r + 1) // w
    return _slice(batch, lo, hi), (hi - lo) * w / n


def weight_loss(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """``loss * weight``; a rank with an empty share (weight 0, mean loss NaN) contributes an exact 0."""
    if weight == 1.0:
        return loss
    if weight == 0.0:
        return torch.nan_to_num(loss, nan=0.0) * 0.0
    return loss * weight


# ---------------------------------------------------------------------------------------------- controllers
_synced_final: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # allocator -> final_keep it synced


def sync_controller(controller, info=None, src: int = 0) -> bool:
    """Make every rank hold rank ``src``'s decision; return whether this rank's own had differed.

    Call on every rank right after ``controller.step(t)`` with the ``StepInfo`` it returned (``info=None``: sync
    now, whatever the step). A no-op (False) when not distributed.

    - ``RankAllocator``: broadcasts rank ``src``'s keep mask and the singular values it was applied to, on masking
      steps of the decreasing phase and on the first step of the final phase (the frozen pattern and its scores);
      the final phase's later steps re-apply the frozen pattern and need nothing. One small broadcast (2-3
      floats per triplet). Nothing when pruning is off or after ``compact()``.
    - ``SoRAGates``: broadcasts rank ``src``'s gates, their Adam moments and the frozen mask, at every step (which
      gates are zero can change at any step; 4 floats per gate).
    - ``RankGrower``: nothing to send (each growth round broadcasts rank ``RankGrower.plan_src``'s importance
      before it plans); returns ``last_round_differed`` on growth steps.
    """
    from .allocator import RankAllocator
    from .increlora import RankGrower
    from .sora import SoRAGates

    if isinstance(controller, RankGrower):
        return bool(is_dist() and (info is None or info.masked) and controller.last_round_differed)
    if not is_dist() or dist.get_world_size() == 1:
        return False
    if isinstance(controller, SoRAGates):
        return _sync_sora(controller, src)
    if isinstance(controller, RankAllocator):
        return _sync_rank_allocator(controller, info, src)
    raise TypeError(f"sync_controller: no rule for a {type(controller).__name__}; pass a RankAllocator, SoRAGates "
                    "or RankGrower")


sync_allocator = sync_controller  # the earlier name (adalora_lab's loop calls it), for any controller


@torch.no_grad()
def _sync_sora(gates, src: int) -> bool:
    state = gates.mask_state()
    n = state["gates"].numel()
    dtype = torch.promote_types(state["gates"].dtype, torch.float32)
    buf = torch.cat([state["gates"].to(dtype), state["exp_avg"].to(dtype), state["exp_avg_sq"].to(dtype),
                     state["frozen"].to(dtype)]).to(_comm_device())
    dist.broadcast(buf, src=src)
    g, m, v, frozen = buf.split(n)
    return gates.set_mask_state({"gates": g, "exp_avg": m, "exp_avg_sq": v, "frozen": frozen > 0.5})


@torch.no_grad()
def _sync_rank_allocator(allocator, info, src: int) -> bool:
    if not allocator.prune or allocator.compacted:
        return False
    first_final = allocator.final_keep is not None and _synced_final.get(allocator) is not allocator.final_keep
    if info is not None and (not info.masked or (info.phase == "final" and not first_final)):
        return False
    state = allocator.mask_state()
    keep, values = state["keep"], state["singular_values"]  # values: the n Λ (SVD adapters), None for prune-LoRA
    n = keep.numel()
    dtype = torch.promote_types(allocator.layout.dtype, torch.float32)
    parts = [keep.to(dtype)] + ([] if values is None else [values.to(dtype)])
    send_scores = first_final and state["final_scores"] is not None
    if send_scores:
        parts.append(state["final_scores"].to(dtype))
    buf = torch.cat(parts)
    dist.broadcast(buf, src=src)
    got = {"keep": buf[:n] > 0.5}
    if values is not None:
        got["singular_values"] = buf[n:2 * n]  # rank src's Λ: the mask applied to it and the values it kept
    if send_scores:
        got["final_scores"] = buf[-n:]
    differed = allocator.set_mask_state(got)  # re-applies the mask (and, once frozen, its grad masks)
    if allocator.final_keep is not None:
        _synced_final[allocator] = allocator.final_keep
    return differed


def masks_agree(controller) -> bool:
    """Whether every rank keeps the same components (``controller.keep_masks()``; a few small all-reduces).
    True when not distributed."""
    if not is_dist() or dist.get_world_size() == 1:
        return True
    k = torch.cat([m.reshape(-1).to(torch.float32) for m in controller.keep_masks().values()]).to(_comm_device())
    size = torch.tensor([float(k.numel())] * 2, device=k.device) * torch.tensor([1.0, -1.0], device=k.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)  # [max n, -min n]: the layouts must match before comparing
    if size[0] != -size[1]:
        return False
    hi, lo = k.clone(), k.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))
