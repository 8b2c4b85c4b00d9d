"""train(cfg) -> summary: the one training loop, read top to bottom.

    prepare   validate, lock the run folder, find a checkpoint, build the workload, adapters and optimizer
    restore   allocator (it may compact), weights, optimizer, RNG, RunState from the checkpoint
    step      lr -> forward -> loss + γ·R -> backward (x grad_accum) -> clip -> optimizer.step
              -> allocator.step(t) -> zero_grad -> eval / log / checkpoint       (the reference call order)
    finish    the final ranks, the adapter, figures and summary.json; a failed run says why

t counts optimizer steps from 1, also under gradient accumulation.

Under torchrun (WORLD_SIZE > 1) the model runs in DDP: batch_size stays the *global* batch, each rank takes
its share of every batch (so the schedule and the result match a single process), the allocator's masks are
broadcast from rank 0 after each masking step, and only rank 0 writes the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adalora import adaptive, distributed
from adalora.adaptive import AdaptiveMethod, inject_method, make_controller
from adalora.checkpoint import atomic_write, save_adapter
from adalora.config import ConfigError
from adalora.diagnostics import growth_bound, spectral_report, summarize_by_type
from adalora.inject import count_trainable, trainable_state_dict
from adalora.layers import AdapterLayer

from .environment import environment, environment_diff
from .fingerprint import inputs_diff
from .resume import (
    fault_point,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_jsonl,
)
from .rundir import RunDir, Summary, write_json
from .runlog import RunLog
from .schema import RunConfig, build_method_config, config_diff, validate_run_config
from .state import RunState
from .workload import Workload, build_workload

__all__ = ["train", "TrainingFailed", "lr_at", "adapter_param_count"]


class TrainingFailed(RuntimeError):
    """The run trained to its end but its result is not usable (diverged, non-finite, too many skipped steps);
    summary.json has status failed and says why."""


# ---------------------------------------------------------------------------------------------- pieces
def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def lr_at(step: int, total: int, base_lr: float, warmup: int, kind: str) -> float:
    """Learning rate for optimizer step ``step`` (from 1): linear warmup, then linear / cosine / constant."""
    if warmup > 0 and step <= warmup:
        return base_lr * step / warmup
    if kind == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if kind == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    raise ConfigError(f"optim.schedule={kind!r}: use linear, cosine or constant")


def adapter_param_count(adapters: dict[str, AdapterLayer], ranks: dict[str, int]) -> int:
    """Parameters of the adapters at the given kept ranks: r (in + out) for LoRA, r (in + out + 1) for SVD."""
    total = 0
    for n, a in adapters.items():
        per_rank = a.in_features + a.out_features + (1 if hasattr(a, "lora_E") else 0)
        total += ranks[n] * per_rank
    return total


def default_run_dir(cfg: RunConfig) -> Path:
    """Where ``train(cfg)`` writes without a run folder (the CLI always passes Hydra's)."""
    return Path("outputs") / cfg.task.name / f"{cfg.method.name}_r{cfg.method.target_r}" / f"seed{cfg.seed}"


class _NoLog:
    """The run log of ranks other than 0: they write nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@dataclass
class Run:
    """What ``prepare`` builds for a run: everything the step needs besides the ``RunState``."""

    cfg: RunConfig
    dir: RunDir
    main: bool  # rank 0: the only rank that writes files
    work: Workload
    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    adapters: dict
    mcfg: object  # the library config (LoRAConfig / AdaLoRAConfig), None for full fine-tuning
    allocator: AdaptiveMethod | None  # AdaLoRA's RankAllocator, SoRA's gates, IncreLoRA's grower; None for LoRA
    optimizer: torch.optim.Optimizer
    trainable: list  # what the clip sees: the main optimizer's parameters and the method's own (SoRA's gates)
    total_steps: int
    steps_per_epoch: int
    warmup: int
    init_ranks: dict
    trainable_params: int  # at the start of training (compaction and growth change it later)
    structure: int  # the method's structure_version: when it changes, the parameter lists are rebuilt
    cfg_dict: dict
    t_start: float


# ---------------------------------------------------------------------------------------------- train
def train(cfg: RunConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """Run one training job described by ``cfg``; write the run folder; return the summary dict.

    If the run folder already holds checkpoints (a killed run), training resumes from the newest good one; if it
    holds a completed run of the same config and inputs, that run is returned as it is.
    Launched by torchrun (WORLD_SIZE > 1) it joins the process group and trains with DDP.
    """
    owns_group = not distributed.is_dist() and distributed.init_from_env("gloo" if cfg.device == "cpu" else None)
    run_dir = RunDir(distributed.broadcast_object(str(run_dir or default_run_dir(cfg))))  # ranks may differ
    locked = False
    try:
        if distributed.is_main():
            run_dir.create()
            run_dir.acquire()  # a second run into this folder stops here
            locked = True
        validate_run_config(cfg)  # in the folder, so that a sweep's summary lists the job and says why
        return _train(cfg, run_dir)
    except BaseException as e:
        if locked:
            _record_setup_failure(cfg, run_dir, e)
        raise
    finally:
        run_dir.release()
        if owns_group:
            distributed.cleanup()


def _train(cfg: RunConfig, run_dir: RunDir) -> dict:
    run, state, resumed = prepare(cfg, run_dir)
    if isinstance(run, dict):  # a finished run of the same config and inputs: reused as it is
        return run
    log = RunLog(run.dir.path, cfg.logger, run.cfg_dict, resume=resumed) if run.main else _NoLog()
    summary = Summary(status="running", task=cfg.task.name, method=cfg.method.name, target_r=cfg.method.target_r,
                      seed=cfg.seed, main_metric=run.work.main_metric, higher_is_better=run.work.higher_is_better,
                      trainable_params=run.trainable_params, total_steps=run.total_steps,
                      run_dir=str(run.dir.path), init_budget=sum(run.init_ranks.values()), inputs=run.work.inputs,
                      environments=state.environments)
    if run.main:
        run.dir.write_summary(summary)
        if run.work.planted is not None:
            write_json(run.dir.planted, run.work.planted)
    if run.adapters and not resumed:
        log.log_ranks(0, sum(run.init_ranks.values()), run.init_ranks)
        state.last_ranks = dict(run.init_ranks)
    bar = _progress_bar(run, state)
    log.echo = bar.write if bar is not None else print  # console lines above the bar, never through it
    try:
        run.model.train()
        batches = run.work.epoch_batches(state.epoch, state.consumed)
        while state.step < run.total_steps:
            batches = train_step(run, state, batches, log)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{state.loss_ema:.4f}" if state.loss_ema is not None else "-"}
                if state.last_eval:
                    post[run.work.main_metric] = f"{state.last_eval[run.work.main_metric]:.4f}"
                bar.set_postfix(post, refresh=False)
    except BaseException as e:
        summary.status, summary.error, summary.failed_step = "failed", f"{type(e).__name__}: {e}", state.step + 1
        summary.wall_time_s = state.elapsed + time.time() - run.t_start
        if run.main:
            run.dir.write_summary(summary)
        log.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    return finish(run, state, summary, log)


# ---------------------------------------------------------------------------------------------- prepare
def _find_resume(cfg: RunConfig, run_dir: RunDir) -> tuple[Path, dict] | None:
    """``resume=PATH`` (a checkpoint file or a run folder), else this run folder's newest good checkpoint."""
    if cfg.resume:
        path = Path(cfg.resume)
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise ConfigError(f"resume={cfg.resume}: no readable checkpoint under {path / 'checkpoints'}")
            return found
        if not path.is_file():
            raise ConfigError(f"resume={cfg.resume}: no such checkpoint file or run folder")
        try:
            return path, load_checkpoint(path)
        except ConfigError as e:
            raise ConfigError(f"resume={cfg.resume}: {e}") from None
    return latest_checkpoint(run_dir.path)


def _finished_summary(run_dir: RunDir, step: int) -> dict | None:
    """The run folder's summary if it records a completed run that ended at this checkpoint's step."""
    summary = run_dir.read_summary()
    if summary is not None and summary.get("status") == "completed" and summary.get("total_steps") == step:
        return summary
    return None


def prepare(cfg: RunConfig, run_dir: RunDir) -> tuple[Run | dict, RunState, bool]:
    """Everything before the first step; every config, data and model error surfaces here."""
    main = distributed.is_main()
    t_start = time.time()
    cfg_dict = dataclasses.asdict(cfg)
    # the checkpoint's config is compared first: a wrong config fails before the data loads
    resume = distributed.broadcast_object(_find_resume(cfg, run_dir) if main else None)
    if resume is not None:
        diff = config_diff(resume[1]["config"], cfg_dict)
        if diff:
            raise ConfigError(f"{resume[0]} was written by a run with another config ({'; '.join(diff[:5])}). "
                              "Resume with the same config, or start in a new run folder (hydra.run.dir=...)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and distributed.is_dist():
        device = distributed.local_device()  # one GPU per process: cuda:LOCAL_RANK

    work = build_workload(cfg, device)  # data, model; what they are by content in work.inputs
    accum = cfg.grad_accum
    steps_per_epoch = max(1, work.batches_per_epoch // accum)
    total_steps = cfg.max_steps if cfg.max_steps else max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    if resume is not None:
        changed = inputs_diff(resume[1].get("inputs", {}), work.inputs)
        if changed:
            raise ConfigError(f"{resume[0]} was trained on other inputs than this run reads (changed: "
                              f"{', '.join(changed[:5])}). Restore the original data / model, or start in a new "
                              "run folder (hydra.run.dir=...)")
        step = resume[1]["state"]["step"]
        if not 0 <= step <= total_steps:
            raise ConfigError(f"{resume[0]} is at step {step}, outside this run's 0..{total_steps} steps. Fix: "
                              "resume from a checkpoint of this run")
        done = _finished_summary(run_dir, step)
        if done is not None:  # rerunning a sweep only runs what is missing
            return done, RunState(), True
    if main:
        import yaml

        record = {**cfg_dict, "inputs": work.inputs}
        atomic_write(run_dir.config, lambda tmp: Path(tmp).write_text(yaml.safe_dump(record, sort_keys=False)))

    model = work.model
    o = cfg.optim
    mcfg = build_method_config(cfg.method, cfg.model, total_steps)
    adapters = inject_method(model, mcfg) if mcfg is not None else {}
    if adapters:  # the settings that depend on the number of adapted matrices (IncreLoRA's grow_until)
        mcfg = build_method_config(cfg.method, cfg.model, total_steps, n_modules=len(adapters))
    if mcfg is None:
        for p in model.parameters():
            p.requires_grad_(True)
    allocator = make_controller(adapters, mcfg, lr=o.lr) if mcfg is not None else None
    init_ranks = {n: a.r for n, a in adapters.items()}
    if allocator is not None:
        init_ranks = allocator.rank_pattern()  # IncreLoRA's reserves and SoRA's zero gates do not count
    n_trainable = count_trainable(model)  # before a resume compacts or grows the adapters
    state = RunState()
    if resume is not None:  # the method first (it reshapes the adapters as the saved run had them), then weights
        ckpt = resume[1]
        if allocator is not None:
            allocator.load_state_dict(ckpt["allocator"])
        missing = set(ckpt["model"]) - set(model.state_dict())
        if missing:
            raise ConfigError(f"{resume[0]} holds tensors this model lacks ({sorted(missing)[:3]})")
        model.load_state_dict(ckpt["model"], strict=False)
    own = {id(p) for p in adaptive.own_parameters(allocator)} if allocator is not None else set()
    main_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    scale = cfg.method.lambda_lr_scale
    groups = [{"params": [p for _, p in main_params]}] if scale == 1 else [  # Λ in a group of its own (opt-in)
        {"params": [p for n, p in main_params if not n.endswith("lora_E")]},
        {"params": [p for n, p in main_params if n.endswith("lora_E")], "lr_scale": scale}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if allocator is not None:
        adaptive.attach_optimizer(allocator, optimizer)  # IncreLoRA lays out its growth groups as saved
    if resume is not None:  # restore: the optimizer over the final tensors, the RNG, the counters
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        state = RunState.from_dict(ckpt["state"])
        if main:
            truncate_jsonl(run_dir.metrics, state.step)
            truncate_jsonl(run_dir.rank_history, state.step)
            print(f"[adalora] resuming {run_dir.path} from step {state.step}/{total_steps} ({resume[0].name})",
                  flush=True)
    _record_environment(state, environment(device), run_dir, main)
    net = distributed.wrap_ddp(model)  # after the allocator and the resume: DDP broadcasts rank 0's weights
    run = Run(cfg=cfg, dir=run_dir, main=main, work=work, model=model, net=net, adapters=adapters, mcfg=mcfg,
              allocator=allocator, optimizer=optimizer, trainable=_clipped(model), total_steps=total_steps,
              steps_per_epoch=steps_per_epoch, warmup=int(round(o.warmup_ratio * total_steps)),
              init_ranks=init_ranks, trainable_params=n_trainable, cfg_dict=cfg_dict, t_start=t_start,
              structure=adaptive.structure_version(allocator) if allocator is not None else 0)
    return run, state, resume is not None


def _record_environment(state: RunState, env: dict, run_dir: RunDir, main: bool) -> None:
    """Start the run's environment record, or extend it when a resume computes in another environment (other
    library versions or another CPU: bit-identical results hold only within one)."""
    last = state.environments[-1] if state.environments else None
    changed = environment_diff(last, env) if last is not None else []
    if last is None or changed:
        if changed and main:
            print(f"[adalora] warning: {run_dir.path} resumes at step {state.step} in another environment than the "
                  f"one it trained in ({'; '.join(changed[:4])}); from here on it is not bit-identical to an "
                  "uninterrupted run. summary.json lists both (environments)", flush=True)
        state.environments.append({"from_step": state.step, **env})


def _clipped(model: nn.Module) -> list:
    """The parameters the gradient clip covers: every trainable one (the method's own included, as SoRA's
    authors clip the gates with the rest)."""
    return [p for p in model.parameters() if p.requires_grad]


def _progress_bar(run: Run, state: RunState):
    if not (run.cfg.progress and run.main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=state.step, desc=f"{run.cfg.task.name}/{run.cfg.method.name}",
                dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- step
def train_step(run: Run, state: RunState, batches, log) -> object:
    """One optimizer step in the reference order; returns the batch iterator (a new one at an epoch boundary)."""
    cfg, o, accum = run.cfg, run.cfg.optim, run.cfg.grad_accum
    t = state.step + 1
    lr = lr_at(t, run.total_steps, o.lr, run.warmup, o.schedule)  # 1. lr
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: only the opt-in Λ group has one
    alloc = run.allocator
    if alloc is not None:
        adaptive.set_lr(alloc, lr)  # SoRA's gates follow it; IncreLoRA's new groups warm up from it
    task_loss_sum = 0.0
    for micro in range(accum):
        batch = next(batches, None)
        if batch is None:  # epoch boundary
            state.epoch, state.consumed = state.epoch + 1, 0
            batches = run.work.epoch_batches(state.epoch, 0)
            batch = next(batches)
        state.consumed += 1
        batch, weight = distributed.shard_batch(batch)  # this rank's rows of the global batch
        with distributed.grad_sync(run.net, enabled=micro == accum - 1):  # DDP all-reduces once per step
            task_loss = distributed.weight_loss(run.work.loss_fn(run.net, batch), weight)  # 2. forward
            loss = task_loss
            reg = adaptive.regularization(alloc) if alloc is not None else None
            if reg is not None:  # 3. loss + γ·R (AdaLoRA, IncreLoRA: orthogonality; SoRA: L1 of the gates)
                loss = loss + reg
            (loss / accum).backward()  # 4. backward
        task_loss_sum += task_loss.item()
    task_loss_sum = distributed.mean_across_ranks(task_loss_sum)  # the global loss: the same skip decision
    if not math.isfinite(task_loss_sum):
        if not cfg.skip_nonfinite:
            raise FloatingPointError(f"non-finite training loss at step {t} (lr={lr:.3g}). Lower optim.lr, set "
                                     "optim.max_grad_norm, or skip_nonfinite=true to skip such steps")
        state.skipped += 1
        run.optimizer.zero_grad(set_to_none=False)
        if alloc is not None:
            adaptive.zero_grad(alloc)
        state.step = t  # the step is spent, with no update (counted in summary.skipped_steps)
        log.log({"step": t, "split": "train", "skipped": state.skipped, "lr": lr})
        return batches
    if o.max_grad_norm:  # 5. clip
        torch.nn.utils.clip_grad_norm_(run.trainable, o.max_grad_norm)
    run.optimizer.step()  # 6. optimizer step
    state.lr_sum += lr
    info = alloc.step(t) if alloc is not None else None  # 7. allocator (optimizer-step counter)
    if alloc is not None:
        distributed.sync_allocator(alloc, info)  # rank 0's masks on every rank (no-op alone)
    run.optimizer.zero_grad(set_to_none=False)  # 8. zero_grad (keeps the allocator's flat grad views)
    if alloc is not None:
        adaptive.zero_grad(alloc)  # the parameters the method optimizes itself
    state.step = t
    if alloc is not None and info.masked and (info.phase != "final" or not state.final_logged):
        pattern = alloc.rank_pattern()
        if pattern != state.last_ranks or info.phase == "final":  # a line per change of the pattern
            log.log_ranks(t, info.budget, pattern)
            state.last_ranks = pattern
        state.final_logged = info.phase == "final"  # the pattern the final phase keeps is logged once
    if alloc is not None and info.phase == "final" and cfg.method.compact and not state.compacted:
        alloc.compact(run.optimizer)  # from here on FLOPs and optimizer state are the final budget's
        state.compacted = True
    if alloc is not None and adaptive.structure_version(alloc) != run.structure:
        run.structure = adaptive.structure_version(alloc)  # new Parameter objects (compaction, growth):
        run.trainable = _clipped(run.model)  # the clip and DDP are rebuilt around them
        run.net = distributed.wrap_ddp(run.model)
    # 9. eval / log / checkpoint
    train_loss = task_loss_sum / accum
    state.first_loss = train_loss if state.first_loss is None else state.first_loss
    state.last_loss = train_loss
    state.loss_ema = train_loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * train_loss
    budget = info.budget if info is not None else sum(run.init_ranks.values())
    if t % cfg.log_every == 0 or t == run.total_steps:
        log.log({"step": t, "split": "train", "epoch": state.epoch, "loss": train_loss, "lr": lr, "budget": budget})
    eval_every = cfg.eval_every or run.steps_per_epoch
    if run.main and (t % eval_every == 0 or t == run.total_steps):  # the other ranks wait in the next all-reduce
        evaluate(run, state, log, budget)
    if run.main and ((cfg.checkpoint_every and t % cfg.checkpoint_every == 0) or t == run.total_steps):
        checkpoint(run, state)
    fault_point("step", t)
    return batches


def spectrum(run: Run, state: RunState) -> dict:
    """The growth diagnostic, per module type: σ_max(ΔW) (every adapter), scale·max|λ| (P Λ Q adapters) and the
    bound scale·Σlr that Adam's |Δλ| <= lr per step puts on it (λ starts at 0). The lr is Λ's own: the opt-in
    ``method.lambda_lr_scale`` multiplies it."""
    if not run.adapters:
        return {}
    out = {}
    for mtype, row in summarize_by_type(spectral_report(run.adapters)).items():
        out.update({f"{key}/{mtype}": v for key, v in row.items()})
    scales = {float(a.scale) for a in run.adapters.values() if hasattr(a, "lora_E")}
    if len(scales) == 1:
        out["growth_bound"] = growth_bound(scales.pop(), state.lr_sum * run.cfg.method.lambda_lr_scale)
    return out


def evaluate(run: Run, state: RunState, log, budget: int) -> None:
    state.last_eval = run.work.evaluate(run.model)
    log.log({"step": state.step, "split": "eval", "budget": budget, **state.last_eval, **spectrum(run, state)})
    key, m = run.work.main_metric, state.last_eval[run.work.main_metric]
    best = state.best.get(key)
    if best is None or (m > best if run.work.higher_is_better else m < best):
        state.best = {**state.last_eval, "step": state.step}


def checkpoint(run: Run, state: RunState) -> None:
    if not all(torch.isfinite(p).all() for p in run.trainable):  # never save a NaN over a good checkpoint
        raise FloatingPointError(f"non-finite weights at step {state.step}; no checkpoint written")
    state.elapsed += time.time() - run.t_start  # wall time adds up over the pieces of a killed run
    run.t_start = time.time()
    save_checkpoint(run.dir.path, {
        "state": state.to_dict(), "config": run.cfg_dict, "inputs": run.work.inputs,
        "model": {k: v.detach().cpu().clone() for k, v in trainable_state_dict(run.model).items()},
        "optimizer": run.optimizer.state_dict(), "allocator": run.allocator.state_dict() if run.allocator else None,
        "rng": rng_state(),
    }, run.cfg.keep_checkpoints)


# ---------------------------------------------------------------------------------------------- finish
def _failure(run: Run, state: RunState) -> str | None:
    """Why a run that trained to its end still failed, or None."""
    cfg = run.cfg
    if state.skipped > cfg.max_skipped_ratio * run.total_steps:
        return (f"{state.skipped} of {run.total_steps} steps were skipped for a non-finite loss (more than "
                f"max_skipped_ratio={cfg.max_skipped_ratio}). Lower optim.lr or set optim.max_grad_norm")
    value = state.last_eval.get(run.work.main_metric)
    if value is None or not math.isfinite(value):
        return f"the final {run.work.main_metric} is {value} (not a finite number)"
    if state.first_loss is not None and state.loss_ema is not None and \
            not state.loss_ema <= cfg.divergence_ratio * state.first_loss:
        return (f"training diverged: the final train loss {state.loss_ema:.4g} is above divergence_ratio="
                f"{cfg.divergence_ratio} x the first ({state.first_loss:.4g}). Lower optim.lr")
    return None


def finish(run: Run, state: RunState, summary: Summary, log) -> dict:
    """The final files, in an order that a kill at any point and a rerun reproduce: summary.json comes last."""
    alloc, adapters = run.allocator, run.adapters
    ranks = alloc.rank_pattern() if alloc is not None else run.init_ranks
    final = dict(state.last_eval)
    if run.work.planted is not None and adapters:
        from .planted import rank_recovery

        final.update(rank_recovery(ranks, run.work.planted))
    reason = _failure(run, state)
    summary.status = "failed" if reason else "completed"
    summary.final, summary.best = final, state.best or final
    summary.final_budget, summary.adapter_params = sum(ranks.values()), adapter_param_count(adapters, ranks)
    summary.skipped_steps, summary.error = state.skipped, reason
    summary.wall_time_s = state.elapsed + time.time() - run.t_start
    if run.main:
        if adapters:
            log.log_ranks(run.total_steps, sum(ranks.values()), ranks, final=True)
        write_json(run.dir.rank_pattern, ranks)
        if run.mcfg is not None:
            save_adapter(run.dir.adapter, run.model, run.mcfg, alloc, task_type=run.work.task_type,
                         base_model_name_or_path=run.work.base_model)
        else:
            atomic_write(run.dir.model, lambda tmp: torch.save(
                {k: v.detach().cpu() for k, v in run.model.state_dict().items()}, tmp))
        if run.work.finish is not None:  # the task's own artefacts (instruct: samples.jsonl)
            run.work.finish(run.model, run.dir.path)
        if run.cfg.figures:
            _figures(run, summary, log)
        fault_point("finish", run.total_steps)
        run.dir.write_summary(summary)
        log.close(summary.to_dict())
    if reason:
        raise TrainingFailed(reason)
    return summary.to_dict()


def _figures(run: Run, summary: Summary, log: RunLog) -> None:
    """The per-run figures (plots.run_figures reads the run folder; the summary is not written yet)."""
    from .plots import run_figures

    for path in run_figures(run.dir.path, summary.to_dict()):
        log.log_image(Path(path).stem, path)


def _record_setup_failure(cfg: RunConfig, run_dir: RunDir, error: BaseException) -> None:
    """A run that fails before its loop starts still says why in summary.json (for sweeps and summaries);
    a folder that already holds a summary (a finished or resumed run) is left untouched."""
    if not distributed.is_main() or run_dir.summary.exists():
        return
    if not run_dir.config.exists():
        import yaml

        atomic_write(run_dir.config, lambda tmp: Path(tmp).write_text(
            yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)))
    run_dir.write_summary(Summary(status="failed", task=cfg.task.name, method=cfg.method.name,
                                  target_r=cfg.method.target_r, seed=cfg.seed,
                                  error=f"{type(error).__name__}: {error}", failed_step=0))
