"""Adapter-only checkpoints: safetensors + JSON, tensors sliced to the kept ranks.

Layout of a saved folder:
    adapter_config.json       {"format": "adalora-adapter", "version": 1, "method": ..., "config": {...},
                               "rank_pattern": {name: kept r}, "scales": {name: scale}}
    adapter_model.safetensors "<module name>.lora_A" (r, in), ".lora_E" (r, 1), ".lora_B" (out, r),
                              plus the extra trainable parameters (e.g. the classifier) by full name
Loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .allocator import RankAllocator
from .config import AdaLoRAConfig, LoRAConfig
from .inject import inject_adapters
from .layers import AdapterLayer, SVDLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write via ``write(tmp_path)`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _adapters_of(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_tensors(model: nn.Module, allocator: RankAllocator | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors sliced to the kept triplets, plus the other trainable parameters."""
    adapters = _adapters_of(model)
    masks = allocator.keep_masks() if allocator is not None else {}
    out: dict[str, torch.Tensor] = {}
    for name, a in adapters.items():
        keep = masks.get(name)
        idx = None if keep is None else keep.nonzero().view(-1).to(a.lora_A.device)
        parts = [("lora_A", a.lora_A, 0), ("lora_B", a.lora_B, 1)]
        if isinstance(a, SVDLinear):
            parts.append(("lora_E", a.lora_E, 0))
        for pname, p, dim in parts:
            t = p.detach() if idx is None else p.detach().index_select(dim, idx)
            out[f"{name}.{pname}"] = t.contiguous().clone().cpu()
    adapter_prefixes = tuple(f"{n}." for n in adapters)
    for n, p in model.named_parameters():
        if p.requires_grad and "lora_" not in n and not n.startswith(adapter_prefixes):
            out[n] = p.detach().contiguous().clone().cpu()
    return out


def save_adapter(path: str | os.PathLike, model: nn.Module, cfg: LoRAConfig | AdaLoRAConfig,
                 allocator: RankAllocator | None = None) -> Path:
    """Save adapter-only weights + config to folder ``path`` (atomic per file); returns the folder."""
    path = Path(path)
    tensors = adapter_tensors(model, allocator)
    adapters = _adapters_of(model)
    ranks = {n: int(tensors[f"{n}.lora_A"].shape[0]) for n in adapters}
    meta = {
        "format": "adalora-adapter",
        "version": 1,
        "method": "adalora" if isinstance(cfg, AdaLoRAConfig) else "lora",
        "config": dataclasses.asdict(cfg),
        "rank_pattern": ranks,
        "scales": {n: a.scale for n, a in adapters.items()},
        "init_ranks": {n: a.init_r for n, a in adapters.items()},
    }
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return path


def load_config(path: str | os.PathLike) -> tuple[LoRAConfig | AdaLoRAConfig, dict]:
    meta_path = Path(path) / CONFIG_NAME
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: point to a folder written by save_adapter()")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "adalora-adapter":
        raise ValueError(f"{meta_path} is not an adalora adapter config (format={meta.get('format')!r})")
    cls = AdaLoRAConfig if meta["method"] == "adalora" else LoRAConfig
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in meta["config"].items() if k in fields}
    kwargs["rank_pattern"] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = cls(**kwargs)
    return cfg, meta


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, AdapterLayer]:
    """Inject adapters of the saved (kept) ranks into a fresh base ``model`` and load the weights."""
    cfg, meta = load_config(path)
    ranks = {n: int(r) for n, r in meta["rank_pattern"].items()}
    cfg = dataclasses.replace(cfg, rank_pattern=ranks, prune=False) if isinstance(cfg, AdaLoRAConfig) \
        else dataclasses.replace(cfg, rank_pattern=ranks)
    adapters = inject_adapters(model, cfg)
    for n, a in adapters.items():
        a.scale = float(meta["scales"][n])
        a.init_r = int(meta["init_ranks"][n])
    tensors = load_file(str(Path(path) / WEIGHTS_NAME))
    params = dict(model.named_parameters())
    names = {n: ("lora_A", "lora_E", "lora_B") if isinstance(a, SVDLinear) else ("lora_A", "lora_B")
             for n, a in adapters.items()}
    expected = {f"{n}.{p}" for n, ps in names.items() for p in ps}
    missing = expected - set(tensors)
    if missing:
        raise ValueError(f"{path}/{WEIGHTS_NAME} lacks {sorted(missing)[:5]}: the file does not match its config")
    with torch.no_grad():
        for key, t in tensors.items():
            if key in expected:
                mod, _, pname = key.rpartition(".")
                target = getattr(adapters[mod], pname)
            elif key in params:
                target = params[key]
                target.requires_grad_(True)
            else:
                raise ValueError(f"{path}/{WEIGHTS_NAME}: tensor {key!r} has no place in {type(model).__name__}; "
                                 "load into the same base model architecture")
            if target.shape != t.shape:
                raise ValueError(f"{key}: saved shape {tuple(t.shape)} != model's {tuple(target.shape)}")
            target.copy_(t)
    return adapters
