"""train(cfg) -> metrics: the one readable training loop.

Per optimizer step, in this order (the reference call order):
    lr -> forward -> loss + γ·R -> backward (x grad_accum) -> clip -> optimizer.step
    -> allocator.step(t) -> zero_grad -> eval / log / checkpoint
t counts optimizer steps from 1, also under gradient accumulation.

Under torchrun (WORLD_SIZE > 1) the model runs in DDP: batch_size stays the *global* batch, each rank
takes its share of every batch (so the schedule and the result match a single process), the allocator's
masks are broadcast from rank 0 after each masking step, and only rank 0 writes the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from adalora import distributed
from adalora.allocator import RankAllocator
from adalora.checkpoint import atomic_write, save_adapter
from adalora.config import AdaLoRAConfig, ConfigError
from adalora.inject import count_trainable, inject_adapters, trainable_state_dict
from adalora.layers import AdapterLayer
from adalora.regularizers import orthogonal_regularization

from .resume import (
    fault_point,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_jsonl,
)
from .runlog import RunLog, write_json
from .schema import RunConfig, build_method_config, validate_run_config
from .workload import build_workload


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


# ---------------------------------------------------------------------------------------------- train
def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ, ignoring those that do not change the computation."""
    ignore = {"progress", "logger", "resume", "keep_checkpoints", "checkpoint_every", "threads", "traceback", "extra"}
    out = []
    for k in sorted(set(saved) | set(current)):
        if not prefix and k in ignore:
            continue
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _find_resume(cfg: RunConfig, run_dir: Path) -> tuple[Path, dict] | None:
    """``resume=PATH`` (a checkpoint file or a run folder), else this run folder's newest checkpoint."""
    if cfg.resume:
        path = Path(cfg.resume)
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise ConfigError(f"resume={cfg.resume}: no readable checkpoint under {path / 'checkpoints'}")
            return found
        if not path.is_file():
            raise ConfigError(f"resume={cfg.resume}: no such checkpoint file or run folder")
        return path, load_checkpoint(path)
    return latest_checkpoint(run_dir)


def _finished_summary(run_dir: Path, step: int) -> dict | None:
    """The run folder's summary if it records a completed run that ended at this checkpoint's step."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(summary, dict) and summary.get("status") == "completed" and summary.get("total_steps") == step:
        return summary
    return None


def _record_setup_failure(cfg: RunConfig, run_dir, error: BaseException) -> None:
    """A run that fails before its loop starts still says why in summary.json (for sweeps and summaries);
    a folder that already holds a summary (a finished or resumed run) is left untouched."""
    if run_dir is None or not distributed.is_main():
        return
    path = Path(run_dir) / "summary.json"
    if path.exists() or not Path(run_dir).is_dir():
        return
    if not (Path(run_dir) / "config.yaml").exists():
        import yaml

        atomic_write(Path(run_dir) / "config.yaml", lambda tmp: Path(tmp).write_text(
            yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)))
    write_json(path, {"status": "failed", "task": cfg.task.name, "method": cfg.method.name,
                      "target_r": cfg.method.target_r, "seed": cfg.seed, "error": f"{type(error).__name__}: {error}",
                      "failed_step": 0})


class _NoLog:
    """The run log of ranks other than 0: they write nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def train(cfg: RunConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """Run one training job described by ``cfg``; write the run folder; return the summary dict.

    If the run folder already holds checkpoints (a killed run), training resumes from the newest one.
    Launched by torchrun (WORLD_SIZE > 1) it joins the process group and trains with DDP.
    """
    owns_group = not distributed.is_dist() and distributed.init_from_env("gloo" if cfg.device == "cpu" else None)
    try:
        return _train(cfg, run_dir)
    except BaseException as e:
        _record_setup_failure(cfg, run_dir, e)
        raise
    finally:
        if owns_group:
            distributed.cleanup()


def _train(cfg: RunConfig, run_dir: str | os.PathLike | None) -> dict:
    validate_run_config(cfg)
    main = distributed.is_main()  # only rank 0 writes files, logs, checkpoints
    run_dir = Path(run_dir or Path("outputs") / f"{cfg.task.name}_{cfg.method.name}_seed{cfg.seed}")
    run_dir = Path(distributed.broadcast_object(str(run_dir)))  # a timestamped (hydra) folder may differ per rank
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    import yaml

    cfg_dict = dataclasses.asdict(cfg)
    resume = distributed.broadcast_object(_find_resume(cfg, run_dir) if main else None)  # rank 0 reads it
    if resume is not None:
        diff = _config_diff(resume[1]["config"], cfg_dict)
        if diff:
            raise ConfigError(f"{resume[0]} was written by a run with another config ({'; '.join(diff[:5])}). "
                              "Resume with the same config, or start in a new run folder (hydra.run.dir=...)")
        done = _finished_summary(run_dir, resume[1]["step"])
        if done is not None:  # a finished run is reused as it is: rerunning a sweep only runs what is missing
            return done
        t_start -= resume[1].get("elapsed", 0.0)  # wall time adds up over the pieces of a killed run
    if main:
        atomic_write(run_dir / "config.yaml",
                     lambda tmp: Path(tmp).write_text(yaml.safe_dump(cfg_dict, sort_keys=False)))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and distributed.is_dist():
        device = distributed.local_device()  # one GPU per process: cuda:LOCAL_RANK

    # ---- data, model, adapters (every config error surfaces here, before any step)
    work = build_workload(cfg, device)
    model = work.model
    accum = cfg.grad_accum  # validated >= 1
    steps_per_epoch = max(1, work.batches_per_epoch // accum)
    total_steps = cfg.max_steps if cfg.max_steps else max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    mcfg = build_method_config(cfg.method, cfg.model, total_steps)
    adapters = inject_adapters(model, mcfg) if mcfg is not None else {}
    if mcfg is None:
        for p in model.parameters():
            p.requires_grad_(True)
    allocator = RankAllocator(adapters, mcfg) if isinstance(mcfg, AdaLoRAConfig) else None
    gamma = mcfg.orth_reg_weight if isinstance(mcfg, AdaLoRAConfig) and mcfg.adapter == "svd" else 0.0
    init_ranks = {n: a.r for n, a in adapters.items()}
    n_trainable = count_trainable(model)
    o = cfg.optim
    warmup = int(round(o.warmup_ratio * total_steps))

    # ---- resume: allocator first (it may compact), then weights, then the optimizer over the final tensors
    step, epoch, consumed, loss_ema, best, last_eval, skipped = 0, 0, 0, None, {}, {}, 0
    if resume is not None:
        ckpt = resume[1]
        if allocator is not None:
            allocator.load_state_dict(ckpt["allocator"])
        missing = set(ckpt["model"]) - set(model.state_dict())
        if missing:
            raise ConfigError(f"{resume[0]} holds tensors this model lacks ({sorted(missing)[:3]})")
        model.load_state_dict(ckpt["model"], strict=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if resume is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        step, epoch, consumed = ckpt["step"], ckpt["epoch"], ckpt["consumed"]
        loss_ema, best, last_eval, skipped = ckpt["loss_ema"], ckpt["best"], ckpt["last_eval"], ckpt["skipped"]
        if main:
            for name in ("metrics.jsonl", "rank_history.jsonl"):
                truncate_jsonl(run_dir / name, step)
            print(f"[adalora] resuming {run_dir} from step {step}/{total_steps} ({resume[0].name})", flush=True)
    # DDP after the allocator and the resume (the order does not matter to DDP; it broadcasts rank 0's weights)
    net = distributed.wrap_ddp(model)

    log = RunLog(run_dir, cfg.logger, cfg_dict, resume=resume is not None) if main else _NoLog()
    summary = {"status": "running", "task": cfg.task.name, "method": cfg.method.name, "target_r": cfg.method.target_r,
               "seed": cfg.seed, "main_metric": work.main_metric, "higher_is_better": work.higher_is_better,
               "trainable_params": n_trainable, "total_steps": total_steps, "run_dir": str(run_dir)}
    if main:
        write_json(run_dir / "summary.json", summary)
    if work.planted is not None and main:
        write_json(run_dir / "planted_ranks.json", work.planted)
    if adapters and resume is None:
        log.log_ranks(0, sum(init_ranks.values()), init_ranks)

    def checkpoint(t: int) -> None:
        if not all(torch.isfinite(p).all() for p in trainable):  # never save a NaN over a good checkpoint
            raise FloatingPointError(f"non-finite weights at step {t}; no checkpoint written")
        save_checkpoint(run_dir, {
            "step": t, "epoch": epoch, "consumed": consumed, "config": cfg_dict,
            "model": {k: v.detach().cpu().clone() for k, v in trainable_state_dict(model).items()},
            "optimizer": optimizer.state_dict(), "allocator": allocator.state_dict() if allocator else None,
            "rng": rng_state(), "elapsed": time.time() - t_start,
            "loss_ema": loss_ema, "best": best, "last_eval": last_eval, "skipped": skipped,
        }, cfg.keep_checkpoints)

    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"{cfg.task.name}/{cfg.method.name}", dynamic_ncols=True)
    eval_every = cfg.eval_every or steps_per_epoch
    try:
        model.train()
        batches = work.epoch_batches(epoch, consumed)
        while step < total_steps:
            t = step + 1
            lr = lr_at(t, total_steps, o.lr, warmup, o.schedule)  # 1. lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            task_loss_sum = 0.0
            for micro in range(accum):
                batch = next(batches, None)
                if batch is None:  # epoch boundary
                    epoch, consumed = epoch + 1, 0
                    batches = work.epoch_batches(epoch, 0)
                    batch = next(batches)
                consumed += 1
                batch, weight = distributed.shard_batch(batch)  # this rank's rows of the global batch
                with distributed.grad_sync(net, enabled=micro == accum - 1):  # DDP all-reduces once per step
                    task_loss = distributed.weight_loss(work.loss_fn(net, batch), weight)  # 2. forward
                    loss = task_loss
                    if gamma > 0:  # 3. loss + γ·R
                        loss = loss + gamma * orthogonal_regularization(adapters, mcfg.orth_reg_form)
                    (loss / accum).backward()  # 4. backward
                task_loss_sum += task_loss.item()
            task_loss_sum = distributed.mean_across_ranks(task_loss_sum)  # the global loss; same skip decision
            if not math.isfinite(task_loss_sum):
                if not cfg.skip_nonfinite:
                    raise FloatingPointError(f"non-finite training loss at step {t} (lr={lr:.3g}). Lower optim.lr, "
                                             "set optim.max_grad_norm, or skip_nonfinite=true to skip such steps")
                skipped += 1
                optimizer.zero_grad(set_to_none=False)
                step = t  # the step is spent, with no update (counted in summary.skipped_steps)
                log.log({"step": t, "split": "train", "skipped": skipped, "lr": lr})
                continue
            if o.max_grad_norm:  # 5. clip
                torch.nn.utils.clip_grad_norm_(trainable, o.max_grad_norm)
            optimizer.step()  # 6. optimizer step
            info = allocator.step(t) if allocator is not None else None  # 7. allocator (optimizer-step counter)
            if allocator is not None:
                distributed.sync_allocator(allocator, info)  # rank 0's masks on every rank (no-op alone)
            optimizer.zero_grad(set_to_none=False)  # 8. zero_grad (keeps the allocator's flat grad views)
            step = t
            if allocator is not None and info.masked and (info.phase != "final" or t == mcfg.total_steps - mcfg.tfinal):
                log.log_ranks(t, info.budget, allocator.rank_pattern())
            if allocator is not None and info.phase == "final" and cfg.method.compact and not allocator.compacted:
                allocator.compact(optimizer)  # from here on FLOPs and optimizer state are the final budget's
                trainable = [p for p in model.parameters() if p.requires_grad]
                net = distributed.wrap_ddp(model)  # new Parameter objects: DDP is rebuilt around them
            # 9. eval / log / checkpoint
            train_loss = task_loss_sum / accum
            loss_ema = train_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * train_loss
            budget = info.budget if info is not None else sum(init_ranks.values())
            if t % cfg.log_every == 0 or t == total_steps:
                log.log({"step": t, "split": "train", "epoch": epoch, "loss": train_loss, "lr": lr, "budget": budget})
            if main and (t % eval_every == 0 or t == total_steps):  # the other ranks wait in the next all-reduce
                last_eval = work.evaluate(model)
                log.log({"step": t, "split": "eval", "budget": budget, **last_eval})
                m = last_eval[work.main_metric]
                if not best or (m > best[work.main_metric]) == work.higher_is_better and m != best[work.main_metric]:
                    best = {**last_eval, "step": t}
            if main and ((cfg.checkpoint_every and t % cfg.checkpoint_every == 0) or t == total_steps):
                checkpoint(t)
            fault_point("step", t)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{loss_ema:.4f}", "budget": budget}
                if last_eval:
                    post[work.main_metric] = f"{last_eval[work.main_metric]:.4f}"
                bar.set_postfix(post, refresh=False)
    except BaseException as e:
        summary.update(status="failed", error=f"{type(e).__name__}: {e}", wall_time_s=time.time() - t_start,
                       failed_step=step + 1)
        if main:
            write_json(run_dir / "summary.json", summary)
        log.close()
        raise
    finally:
        if bar is not None:
            bar.close()

    # ---- final artefacts
    ranks = allocator.rank_pattern() if allocator is not None else init_ranks
    if adapters:
        log.log_ranks(total_steps, sum(ranks.values()), ranks)
    final = dict(last_eval)
    if work.planted is not None and adapters:
        from .planted import rank_recovery

        final.update(rank_recovery(ranks, work.planted))
    if not main:  # rank 0 writes the run folder
        summary.update(status="completed", final=final, final_budget=sum(ranks.values()), error=None)
        return summary
    write_json(run_dir / "rank_pattern.json", ranks)
    if mcfg is not None:
        save_adapter(run_dir / "adapter", model, mcfg, allocator)
    else:
        atomic_write(run_dir / "model.pt", lambda tmp: torch.save(
            {k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp))
    summary.update(status="completed", final=final, best=best or final, final_budget=sum(ranks.values()),
                   adapter_params=adapter_param_count(adapters, ranks), init_budget=sum(init_ranks.values()),
                   skipped_steps=skipped, wall_time_s=time.time() - t_start, error=None)
    _figures(run_dir, ranks, work.planted, log)
    write_json(run_dir / "summary.json", summary)
    log.close(summary)
    return summary


def _figures(run_dir: Path, ranks: dict, planted: dict | None, log: RunLog) -> None:
    if not ranks:
        return
    from .plots import rank_heatmap, rank_history_plot

    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    heat = rank_heatmap(ranks, fig_dir / "rank_heatmap.png", title="kept rank per module", planted=planted)
    history = [json.loads(line) for line in (run_dir / "rank_history.jsonl").read_text().splitlines() if line]
    if history:
        rank_history_plot(history, fig_dir / "rank_history.png")
    log.log_image("rank_heatmap", heat)
