"""The synthetic planted-rank benchmark: can an adaptive method find where the rank is needed?

A frozen *base* model (a residual MLP with no normalisation) and a *teacher* = base + a low-rank ΔW*
planted in a few of its linear layers, with heterogeneous known ranks (most modules 0, a few 4, some 1).
The student is the base plus adapters, trained to match the teacher's outputs (MSE) on Gaussian inputs.
With a final budget of average rank 1, uniform LoRA lacks capacity exactly where the rank was planted;
an allocator that reads the task moves its budget there. (A tiny BERT does *not* work for this: LayerNorm and
attention compensate the planted change; a plain residual MLP does.)

Usage::

    task = make_planted_task(PlantedRankTask())          # deterministic from task_seed
    model = task.new_base()                               # a fresh copy of the teacher's base
    adapters = inject_adapters(model, AdaLoRAConfig(target_modules=list(TARGET_MODULES), ...))
    for x, y in task.batches(batch_size=128, seed=0):     # x: (B, dim), y = teacher(x): (B, dim)
        loss = F.mse_loss(model(x), y) ...
    task.evaluate(model)            # {"distill_loss": eval MSE, "relative_error": MSE / MSE(base, teacher)}
    rank_recovery(allocator.rank_pattern(), task.planted)   # where the kept budget went

The training loop runs it as every other task (``planted_workload``, ``experiment=planted_rank``); there is
one batch order, ``PlantedTask.epoch_batches``, which ``batches`` strings together.

Everything is plain torch (scipy only inside :func:`rank_recovery`); no hydra, no wandb.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .schema import RunConfig
from .workload import Workload

__all__ = [
    "TARGET_MODULES",
    "ResidualBlock",
    "ResidualMLP",
    "PlantedRankTask",
    "PlantedTask",
    "module_names",
    "default_planted_ranks",
    "parse_planted",
    "plant_delta",
    "make_planted_task",
    "planted_workload",
    "rank_recovery",
]

TARGET_MODULES = ("up", "down")  # suffixes to adapt: every linear layer of the residual blocks


# --------------------------------------------------------------------------------------------- model


class ResidualBlock(nn.Module):
    """h + residual_scale * down(relu(up(h))); no normalisation, so every module's change reaches the output."""

    def __init__(self, dim: int, hidden: int, residual_scale: float = 0.5):
        super().__init__()
        self.up = nn.Linear(dim, hidden)  # weight (hidden, dim)
        self.down = nn.Linear(hidden, dim)  # weight (dim, hidden)
        self.residual_scale = residual_scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        return h + self.residual_scale * self.down(F.relu(self.up(h)))


class ResidualMLP(nn.Module):
    """n_blocks residual blocks on a dim-wide stream; modules are named ``blocks.<i>.up`` / ``blocks.<i>.down``.

    Weights follow nn.Linear's default init (drawn from the global RNG: seed it, or use
    :func:`make_planted_task`, which draws from its own generator).
    """

    def __init__(self, dim: int = 64, hidden: int = 128, n_blocks: int = 6, residual_scale: float = 0.5):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.blocks = nn.ModuleList([ResidualBlock(dim, hidden, residual_scale) for _ in range(n_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        for block in self.blocks:
            x = block(x)
        return x


def module_names(n_blocks: int) -> list[str]:
    """The adaptable linear layers, in ``named_modules()`` order: blocks.0.up, blocks.0.down, blocks.1.up, ..."""
    return [f"blocks.{i}.{t}" for i in range(n_blocks) for t in TARGET_MODULES]


# --------------------------------------------------------------------------------------------- planted ranks


def default_planted_ranks(names: Sequence[str], big: int = 4, small: int = 1) -> dict[str, int]:
    """A heterogeneous pattern over ``names``: two modules of rank ``big``, two of rank ``small``, the rest 0.

    Deterministic and spread over depth and module type (for 12 modules, i.e. 6 blocks:
    blocks.1.up = 4, blocks.4.down = 4, blocks.2.down = 1, blocks.5.up = 1; positions 2/12, 9/12, 5/12, 10/12
    of the list). The planted ranks sum to
    2 * (big + small) = 10 <= 12 modules x average rank 1, so a budget of average rank 1 can hold them all;
    uniform LoRA r=1 misses big - 1 directions in each rank-``big`` module. Fewer than 4 names: first gets ``big``.
    """
    names = list(names)
    n = len(names)
    out = dict.fromkeys(names, 0)
    if n == 0:
        return out
    if n < 4:
        out[names[0]] = big
        return out
    picks = [(round(n * 2 / 12), big), (round(n * 9 / 12), big), (round(n * 5 / 12), small),
             (round(n * 10 / 12), small)]
    used: set[int] = set()
    for pos, rank in picks:
        pos = min(pos, n - 1)
        while pos in used:  # tiny lists: move to the next free module
            pos = (pos + 1) % n
        used.add(pos)
        out[names[pos]] = rank
    return out


def parse_planted(spec, names: Sequence[str]) -> dict[str, int]:
    """Normalise a planted-rank spec to ``{name: rank}`` over all ``names`` (unlisted modules get 0).

    spec: None / {} / "" / "default" -> :func:`default_planted_ranks`; a mapping ``{name: rank}``; or a string
    ``"blocks.1.up:4,blocks.4.down:1"``. Unknown names and negative or non-integer ranks raise ValueError.
    """
    names = list(names)
    if spec is None or (isinstance(spec, (str, Mapping)) and len(spec) == 0) or spec == "default":
        return default_planted_ranks(names)
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            if not part.strip():
                continue
            name, sep, r = part.strip().rpartition(":")
            if not sep:
                raise ValueError(f"planted spec part {part!r}: expected 'module.name:rank'")
            items[name.strip()] = r.strip()
        spec = items
    if not isinstance(spec, Mapping):
        raise ValueError(f"planted spec must be a dict {{name: rank}}, a 'name:rank,...' string or None; got {spec!r}")
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise ValueError(f"planted ranks name unknown modules {unknown[:5]}; modules are {names[:4]}...")
    out = dict.fromkeys(names, 0)
    for name, r in spec.items():
        try:
            ri = int(r)
        except (TypeError, ValueError):
            raise ValueError(f"planted rank of {name!r} is {r!r}, not an integer") from None
        if ri != float(r) or ri < 0:
            raise ValueError(f"planted rank of {name!r} is {r!r}; ranks must be integers >= 0")
        out[name] = ri
    return out


def plant_delta(weight: torch.Tensor, rank: int, sv: float, generator: torch.Generator) -> torch.Tensor:
    """A random rank-``rank`` ΔW, shape of ``weight`` (out, in), whose ``rank`` singular values all equal ``sv``.

    ΔW = sv * U Vᵀ with U (out, rank), V (in, rank) random orthonormal (QR of Gaussians, float64), so no
    planted direction is easier to find than another and a rank-r' < rank fit leaves (rank - r')/rank of ‖ΔW‖²_F.
    """
    out_f, in_f = weight.shape
    if rank > min(out_f, in_f):
        raise ValueError(f"planted rank {rank} exceeds min(out, in) = {min(out_f, in_f)}")
    if rank == 0:
        return torch.zeros_like(weight)
    u, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=generator, dtype=torch.float64))  # (out, rank)
    v, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=generator, dtype=torch.float64))  # (in, rank)
    return (sv * u @ v.T).to(weight.dtype)


# --------------------------------------------------------------------------------------------- the task


@dataclass
class PlantedRankTask:
    """Config of the planted task (fields match ``adalora_lab.schema.PlantedConfig``).

    planted: {module name: rank} (unlisted: 0), a "name:rank,..." string, or empty for
    :func:`default_planted_ranks`. delta_scale: every planted singular value is
    delta_scale * ‖W‖_F / sqrt(max planted rank), so ‖ΔW*‖_F = delta_scale * ‖W‖_F in the modules of the largest
    planted rank and delta_scale * ‖W‖_F * sqrt(rank / max rank) elsewhere: every planted direction matters about
    equally, and the error uniform LoRA r=1 leaves sits in the high-rank modules.
    task_seed fixes base weights, ΔW* and the train/eval inputs; a run's training seed changes only
    adapter init and batch order, so every method and seed sees the same teacher.
    """

    dim: int = 64
    hidden: int = 128
    n_blocks: int = 6
    planted: dict = field(default_factory=dict)
    delta_scale: float = 1.0
    n_train: int = 4096
    n_eval: int = 1024
    task_seed: int = 1234

    def __post_init__(self):
        for name in ("dim", "hidden", "n_blocks", "n_train", "n_eval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PlantedRankTask.{name}={v!r}: must be an integer >= 1")
        if not self.delta_scale > 0:
            raise ValueError(f"PlantedRankTask.delta_scale={self.delta_scale!r}: must be > 0")


@dataclass
class PlantedTask:
    """A built planted task: the base weights, the teacher, the planted ranks and the data.

    base_state: the base model's state_dict (frozen tensors); teacher: base + ΔW*, eval mode, no grad.
    planted: {module name: planted rank} over every ``blocks.<i>.up|down`` (0 where nothing is planted).
    deltas: {module name: ΔW* (out, in)} for the planted modules.
    train_x, train_y: (n_train, dim) inputs and teacher outputs; eval_x, eval_y: (n_eval, dim).
    base_eval_mse: eval MSE(base, teacher), the denominator of ``relative_error``.
    """

    cfg: PlantedRankTask
    base_state: dict
    teacher: ResidualMLP
    planted: dict
    deltas: dict
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    base_eval_mse: float

    def new_base(self) -> ResidualMLP:
        """A fresh student base, identical to the teacher's base (own tensors; inject adapters into it)."""
        c = self.cfg
        with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the global RNG as it was
            model = ResidualMLP(c.dim, c.hidden, c.n_blocks)
        model.load_state_dict(self.base_state)
        return model

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, start: int = 0,
                      device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch ``epoch``'s (x, y) batches from batch ``start`` on: the order is a pure function of (seed, epoch),
        so a resumed run continues where it stopped. x: (B, dim); y = teacher(x): (B, dim), B = min(batch_size,
        n_train); a last incomplete batch is dropped."""
        n = self.train_x.shape[0]
        bs = min(batch_size, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        x, y = (self.train_x, self.train_y) if device is None else (self.train_x.to(device), self.train_y.to(device))
        perm = perm if device is None else perm.to(device)
        for i in range(start * bs, n - bs + 1, bs):
            idx = perm[i:i + bs]
            yield x[idx], y[idx]

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (x, y) batches: ``epoch_batches`` of epoch 0, 1, 2, ... (the training loop's order)."""
        epoch = 0
        while True:
            yield from self.epoch_batches(batch_size, seed, epoch)
            epoch += 1

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 4096) -> dict[str, float]:
        """{"distill_loss": eval MSE(model, teacher), "relative_error": that / MSE(base, teacher)}.

        relative_error is the share of the untrained error left: 1.0 = the base, 0.0 = the teacher.
        The model is put in eval mode for the call and its previous mode restored.
        """
        was = model.training
        model.eval()
        try:
            sq = sum(F.mse_loss(model(x), y, reduction="sum").item()
                     for x, y in zip(self.eval_x.split(batch_size), self.eval_y.split(batch_size)))
        finally:
            model.train(was)
        mse = sq / self.eval_y.numel()
        return {"distill_loss": mse, "relative_error": mse / self.base_eval_mse}


def _generator(task_seed: int, stream: int) -> torch.Generator:
    """An independent CPU generator per (task_seed, stream): 0 base weights, 1 inputs, 2 + i ΔW* of module i."""
    return torch.Generator().manual_seed((task_seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9) % 2**63)


def make_planted_task(cfg: PlantedRankTask | None = None) -> PlantedTask:
    """Build base, teacher, planted ranks and data, all deterministic from ``cfg.task_seed`` (CPU, float32).

    The global RNG is not touched. Base weights, each module's ΔW* and the inputs come from separate
    generators derived from task_seed, so changing the planted pattern keeps the base and the data.
    """
    cfg = cfg or PlantedRankTask()
    names = module_names(cfg.n_blocks)
    planted = parse_planted(cfg.planted, names)

    with torch.random.fork_rng(devices=[]):
        base = ResidualMLP(cfg.dim, cfg.hidden, cfg.n_blocks)
    g = _generator(cfg.task_seed, 0)
    with torch.no_grad():
        for name in names:  # nn.Linear's default init, from our generator: U(-1/sqrt(in), 1/sqrt(in))
            lin = base.get_submodule(name)
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.uniform_(-bound, bound, generator=g)
            lin.bias.uniform_(-bound, bound, generator=g)
    for p in base.parameters():
        p.requires_grad_(False)
    base.eval()

    teacher = copy.deepcopy(base)
    deltas = {}
    max_rank = max(planted.values(), default=0)
    with torch.no_grad():
        for i, name in enumerate(names):
            w = teacher.get_submodule(name).weight
            if planted[name]:
                sv = cfg.delta_scale * w.double().norm().item() / math.sqrt(max_rank)
                d = plant_delta(w, planted[name], sv, _generator(cfg.task_seed, 2 + i))
                w.add_(d)
                deltas[name] = d

    g = _generator(cfg.task_seed, 1)
    train_x = torch.randn(cfg.n_train, cfg.dim, generator=g)
    eval_x = torch.randn(cfg.n_eval, cfg.dim, generator=g)
    with torch.no_grad():
        train_y, eval_y = teacher(train_x), teacher(eval_x)
        base_eval_mse = F.mse_loss(base(eval_x), eval_y).item()
    return PlantedTask(cfg=cfg, base_state={k: v.clone() for k, v in base.state_dict().items()}, teacher=teacher,
                       planted=planted, deltas=deltas, train_x=train_x, train_y=train_y, eval_x=eval_x,
                       eval_y=eval_y, base_eval_mse=base_eval_mse)


# --------------------------------------------------------------------------------------------- metrics


def rank_recovery(rank_pattern: Mapping[str, int], planted: Mapping[str, int]) -> dict[str, float]:
    """How well a kept-rank pattern matches the planted ranks, over the union of both modules' names.

    - rank_recovery: share of the kept budget on modules with planted rank > 0 (perfect 1.0; uniform ranks give
      rank_recovery_uniform; 0.0 when nothing is kept).
    - rank_recovery_uniform: that share for a uniform pattern = share of modules that are planted.
    - rank_coverage: sum over modules of min(kept, planted) / sum of planted ranks (1.0: every planted
      direction has a slot; 1.0 when nothing is planted).
    - rank_spearman: Spearman correlation of kept vs planted ranks over modules (0.0 when either is constant).
    Modules missing from one of the dicts count as rank 0 there.
    """
    names = list(dict.fromkeys([*rank_pattern, *planted]))
    kept = [int(rank_pattern.get(n, 0)) for n in names]
    true = [int(planted.get(n, 0)) for n in names]
    total = sum(kept)
    on_planted = sum(k for k, p in zip(kept, true) if p > 0)
    n_planted = sum(p > 0 for p in true)
    if len(set(kept)) > 1 and len(set(true)) > 1:
        from scipy.stats import spearmanr

        rho = float(spearmanr(kept, true).statistic)
        rho = 0.0 if math.isnan(rho) else rho
    else:
        rho = 0.0
    return {
        "rank_recovery": on_planted / total if total else 0.0,
        "rank_recovery_uniform": n_planted / len(names) if names else 0.0,
        "rank_coverage": sum(min(k, p) for k, p in zip(kept, true)) / sum(true) if sum(true) else 1.0,
        "rank_spearman": rho,
    }


# --------------------------------------------------------------------------------------------- reference loop


# The tuned defaults (2-core CPU, torch 2.13, 1 thread; see compare()): ~4 s per LoRA run, ~6.5 s per AdaLoRA run.


def planted_workload(cfg: RunConfig, device: torch.device) -> Workload:
    p = cfg.task.planted
    task = make_planted_task(PlantedRankTask(dim=p.dim, hidden=p.hidden, n_blocks=p.n_blocks, planted=dict(p.planted),
                                             delta_scale=p.delta_scale, n_train=p.n_train, n_eval=p.n_eval,
                                             task_seed=p.task_seed))
    model = task.new_base().to(device)
    eval_x, eval_y = task.eval_x.to(device), task.eval_y.to(device)
    bs = min(cfg.batch_size, task.train_x.shape[0])

    def epoch_batches(epoch: int, start: int = 0) -> Iterator:
        return task.epoch_batches(bs, cfg.seed, epoch, start, device=device)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch  # (B, dim), (B, dim)
        return F.mse_loss(m(x), y)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was = m.training
        m.eval()
        mse = F.mse_loss(m(eval_x), eval_y).item()
        m.train(was)
        return {"distill_loss": mse, "relative_error": mse / task.base_eval_mse}

    inputs = {"task": "planted_rank", "task_seed": p.task_seed}  # the data is a pure function of the config
    return Workload(model, task.train_x.shape[0] // bs, epoch_batches, loss_fn, evaluate, "relative_error", False,
                    planted=task.planted, inputs=inputs)
