"""The GLUE workload: a text classifier (or regressor, STS-B) on a GLUE-format folder or the Hub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adalora.config import ConfigError

from .schema import RunConfig
from .workload import Workload, to_device

__all__ = ["glue_workload"]


def glue_workload(cfg: RunConfig, device: torch.device) -> Workload:
    from .data import GLUE_TASKS, examples_hash, load_task, make_loader, task_file, tokenize, tokenizer_fingerprint
    from .fingerprint import file_sha256
    from .metrics import MAIN_METRIC, compute_metrics
    from .models import build_classifier, load_tokenizer, model_path, model_source

    task = cfg.task.name
    if task not in GLUE_TASKS:
        raise ConfigError(f"task.name={task!r}: expected one of {sorted(GLUE_TASKS)} or planted_rank")
    data_dir = cfg.task.data_dir
    if data_dir is None and not cfg.task.hub:
        raise ConfigError(f"task.data_dir is not set for task {task}: point it at a GLUE-format folder "
                          "(task.data_dir=... or paths.glue_dir=..., or ADALORA_GLUE_DIR), or read the Hub "
                          "with task.hub=true")
    train_ex = load_task(task, data_dir, "train", cfg.task.max_train_examples, hub=cfg.task.hub)
    dev_ex = load_task(task, data_dir, "dev", cfg.task.max_eval_examples, hub=cfg.task.hub)
    spec = GLUE_TASKS[task]
    if spec.num_labels > 1:
        bad = sorted({e.label for e in train_ex + dev_ex} - set(range(spec.num_labels)))
        if bad:
            raise ConfigError(f"task {task}: labels {bad[:5]} do not fit num_labels={spec.num_labels}")
    tokenizer = load_tokenizer(cfg.model)
    inputs = {"train_examples": examples_hash(train_ex), "dev_examples": examples_hash(dev_ex),
              "tokenizer": tokenizer_fingerprint(tokenizer), "model": model_source(cfg.model)}
    if not cfg.task.hub:
        for split in ("train", "dev"):
            path = task_file(task, data_dir, split)
            inputs[f"{split}_file_path"], inputs[f"{split}_file"] = str(path), file_sha256(path)
    cache = Path(cfg.paths.cache_dir) / "tokenized"
    train_ds = tokenize(train_ex, tokenizer, cfg.task.max_length, cache)
    dev_ds = tokenize(dev_ex, tokenizer, cfg.task.max_length, cache)
    model = build_classifier(cfg.model, spec.num_labels, tokenizer).to(device)
    pad = tokenizer.pad_token_id
    train_loader = make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, pad_id=pad)
    dev_loader = make_loader(dev_ds, cfg.eval_batch_size, shuffle=False, seed=0, pad_id=pad, bucket=False)

    def epoch_batches(epoch: int, start: int = 0) -> Iterator:
        train_loader.batch_sampler.set_epoch(epoch, start_batch=start)  # order = f(seed, epoch): resumable
        return iter(train_loader)

    def forward(m: nn.Module, batch):
        # bf16 autocast covers the matmuls only: parameters, gradients, Adam and the allocator's scores stay fp32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return m(**to_device(batch, device))

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return forward(m, batch).loss.float()

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was = m.training
        m.eval()
        preds, labels, loss_sum = [], [], 0.0
        for batch in dev_loader:
            out = forward(m, batch)  # logits: (B, C), or (B, 1) for regression
            loss_sum += out.loss.item() * batch["labels"].shape[0]
            preds.append(out.logits.float().cpu().numpy())
            labels.append(batch["labels"].numpy())
        m.train(was)
        y = np.concatenate(labels)
        res = compute_metrics(task, np.concatenate(preds), y)
        res["eval_loss"] = loss_sum / len(y)
        return res

    return Workload(model, len(train_loader), epoch_batches, loss_fn, evaluate, MAIN_METRIC[task], True,
                    inputs=inputs, task_type="SEQ_CLS", base_model=model_path(cfg.model))
