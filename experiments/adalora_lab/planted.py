"""The synthetic planted-rank benchmark: can an adaptive method find where the rank is needed?

A frozen *base* model (a residual MLP with no normalisation) and a *teacher* = base + a low-rank ΔW*
planted in a few of its linear layers, with heterogeneous known ranks (most modules 0, a few 4, some 1).
The student is the base plus adapters, trained to match the teacher's outputs (MSE) on Gaussian inputs.
With a final budget of average rank 1, uniform LoRA lacks capacity exactly where the rank was planted;
an allocator that reads the task moves its budget there (facts §6: a tiny BERT does *not* work for this,
LayerNorm and attention compensate the planted change; a plain residual MLP does).

Usage::

    task = make_planted_task(PlantedRankTask())          # deterministic from task_seed
    model = task.new_base()                               # a fresh copy of the teacher's base
    adapters = inject_adapters(model, AdaLoRAConfig(target_modules=list(TARGET_MODULES), ...))
    for x, y in task.batches(batch_size=128, seed=0):     # x: (B, dim), y = teacher(x): (B, dim)
        loss = F.mse_loss(model(x), y) ...
    task.evaluate(model)            # {"distill_loss": eval MSE, "relative_error": MSE / MSE(base, teacher)}
    rank_recovery(allocator.rank_pattern(), task.planted)   # where the kept budget went

or the whole reference loop: ``train_planted(task, method_cfg, steps=1500, lr=...)``.

Everything is plain torch (scipy only inside :func:`rank_recovery`); no hydra, no wandb.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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
    "rank_recovery",
    "DEFAULT_STEPS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "benchmark_configs",
    "train_planted",
    "compare",
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

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (x, y) batches from the fixed train set, reshuffled every epoch by a generator seeded with ``seed``.

        x: (batch_size, dim); y = teacher(x): (batch_size, dim). A last incomplete batch of an epoch is dropped.
        """
        n = self.train_x.shape[0]
        bs = min(batch_size, n)
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - bs + 1, bs):
                idx = perm[i:i + bs]
                yield self.train_x[idx], self.train_y[idx]

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
# LoRA r=1 is flat in lr over 3e-3..3e-2 (capacity-bound); AdaLoRA prefers 1.5e-2..3e-2 (E starts at 0 and P, Q
# at N(0, 0.02), so it has further to go). One lr for both keeps a method=lora,adalora sweep simple.
DEFAULT_STEPS = 1500
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 2e-2


def benchmark_configs(target_r: int = 1, init_r: int = 6, steps: int = DEFAULT_STEPS) -> dict:
    """The benchmark's two methods at an equal final budget (average rank ``target_r`` over every up/down):
    {"lora": LoRAConfig(r=target_r), "adalora": AdaLoRAConfig(init_r, target_r, tinit 10%, tfinal 40%,
    delta_t 10, beta 0.85, orth_reg_weight 0.1, total_steps=steps)}.

    init_r must be >= the largest planted rank (4 by default); 6 = 1.5x it leaves slack for triplets that
    are slow to find their planted direction (with init_r 4 AdaLoRA still wins, less reliably).
    Measured on the default task: orth_reg_weight=0, score="magnitude" and prune-LoRA place the budget at least
    as well; the regularizer's gradient adds to the sensitivity |w * g| of triplets no planted direction needs.
    """
    from adalora.config import AdaLoRAConfig, LoRAConfig

    targets = list(TARGET_MODULES)
    return {
        "lora": LoRAConfig(r=target_r, target_modules=targets),
        "adalora": AdaLoRAConfig(init_r=init_r, target_r=target_r, target_modules=targets, tinit=int(0.1 * steps),
                                 tfinal=int(0.4 * steps), delta_t=10, beta1=0.85, beta2=0.85, orth_reg_weight=0.1,
                                 total_steps=steps),
    }


def train_planted(task: PlantedTask, method_cfg, *, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                  batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, weight_decay: float = 0.0,
                  warmup_ratio: float = 0.0, lr_schedule: str = "linear", max_grad_norm: float | None = None,
                  eval_every: int = 0) -> dict:
    """The minimal training loop of the benchmark: inject, AdamW, MSE to the teacher, the allocator, evaluate.

    method_cfg: a LoRAConfig or AdaLoRAConfig (AdaLoRA's total_steps is set to ``steps`` when None; its
    target_modules must select the blocks' linears, e.g. ``list(TARGET_MODULES)``). ``seed`` sets adapter
    init (global RNG) and batch order. lr: linear warm-up over ``warmup_ratio`` of the steps, then
    ``lr_schedule`` "linear" (decay to 0) or "constant". Step order as the reference: backward, clip,
    optimizer.step, scheduler.step, allocator.step(t), zero_grad.

    Returns evaluate()'s metrics plus rank_recovery()'s, "rank_pattern", "final_train_loss" (mean of the
    last 5% of steps), "history" ([(step, eval relative_error)] when eval_every > 0), "time_s".
    """
    from adalora.allocator import RankAllocator
    from adalora.config import AdaLoRAConfig
    from adalora.inject import inject_adapters
    from adalora.regularizers import orthogonal_regularization

    if lr_schedule not in ("linear", "constant"):
        raise ValueError(f"lr_schedule={lr_schedule!r}: use 'linear' or 'constant'")
    t0 = time.perf_counter()
    ada = isinstance(method_cfg, AdaLoRAConfig)
    if ada and method_cfg.total_steps is None:
        method_cfg = dataclasses.replace(method_cfg, total_steps=steps)
    torch.manual_seed(seed)
    model = task.new_base()
    adapters = inject_adapters(model, method_cfg)
    allocator = RankAllocator(adapters, method_cfg) if ada else None
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the fused kernel is ~5x faster on these many tiny tensors (CPU and CUDA, torch >= 2.4)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = int(round(warmup_ratio * steps))

    def lr_at(t: int) -> float:  # multiplier for step t (from 0)
        if t < warm:
            return (t + 1) / warm
        if lr_schedule == "constant":
            return 1.0
        return max(0.0, (steps - t) / max(1, steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    orth_w = method_cfg.orth_reg_weight if ada else 0.0
    tail, history = [], []
    model.train()
    batches = task.batches(batch_size, seed=seed)
    for t in range(1, steps + 1):
        x, y = next(batches)
        loss = F.mse_loss(model(x), y)
        total = loss + orth_w * orthogonal_regularization(adapters, form=method_cfg.orth_reg_form) if orth_w else loss
        total.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        if allocator is not None:
            allocator.step(t)
        opt.zero_grad(set_to_none=False)
        if t > steps - max(1, steps // 20):
            tail.append(loss.item())
        if eval_every and t % eval_every == 0:
            history.append((t, task.evaluate(model)["relative_error"]))
    pattern = allocator.rank_pattern() if allocator is not None else {n: a.r for n, a in adapters.items()}
    pattern = {n: pattern[n] for n in [*task.planted, *pattern] if n in pattern}  # model order: blocks.0.up, ...
    out = {**task.evaluate(model), **rank_recovery(pattern, task.planted)}
    out.update(rank_pattern=pattern, final_train_loss=sum(tail) / len(tail), history=history,
               time_s=time.perf_counter() - t0)
    return out


def compare(seeds: Sequence[int] = (0, 1, 2), task_cfg: PlantedRankTask | None = None, steps: int = DEFAULT_STEPS,
            lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH_SIZE, target_r: int = 1, init_r: int = 6,
            log=print) -> list[dict]:
    """LoRA vs AdaLoRA at an equal final budget over ``seeds`` on one teacher; one row per (method, seed)."""
    task = make_planted_task(task_cfg)
    rows = []
    for method, cfg in benchmark_configs(target_r, init_r, steps).items():
        for seed in seeds:
            r = train_planted(task, cfg, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
            row = {"method": method, "seed": seed, **{k: v for k, v in r.items() if k != "history"}}
            rows.append(row)
            if log:
                pat = " ".join(str(r["rank_pattern"][n]) for n in task.planted)
                log(f"{method:8s} seed={seed} relative_error={r['relative_error']:.3g} "
                    f"rank_recovery={r['rank_recovery']:.3f} (uniform {r['rank_recovery_uniform']:.3f}) "
                    f"spearman={r['rank_spearman']:.3f} ranks=[{pat}] {r['time_s']:.1f}s")
    if log:
        log("planted  ranks=[" + " ".join(str(v) for v in task.planted.values()) + "] over " + ", ".join(task.planted))
    return rows


if __name__ == "__main__":  # python -m adalora_lab.planted [seeds...]: the 2-method x 3-seed comparison
    import sys

    torch.set_num_threads(1)  # these matrices are too small for threads to pay
    compare(seeds=[int(a) for a in sys.argv[1:]] or (0, 1, 2))
