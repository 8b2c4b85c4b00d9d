"""Put adapters into any model by target module names; freeze everything else."""

from __future__ import annotations

import difflib
import re

from torch import nn

from .config import AdaLoRAConfig, ConfigError, LoRAConfig
from .layers import AdapterLayer, LoRALinear, SVDLinear, supported


def _matches(name: str, pattern: str) -> bool:
    """A suffix matches at a module-path boundary: 'query' matches 'encoder.layer.0.attention.self.query'."""
    return name == pattern or name.endswith("." + pattern)


def _close_names(wanted: str, names: list[str]) -> list[str]:
    leaves = sorted({n.split(".")[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names if "." in n})
    return difflib.get_close_matches(wanted, leaves, n=5, cutoff=0.5) or leaves[:10]


def find_targets(model: nn.Module, targets, what: str = "target_modules") -> list[str]:
    """Names (from ``named_modules()``) selected by suffixes or a full-match regex.

    Every suffix must match something: a typo in one of several names is an error, not a
    silently smaller adapter.
    """
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        rx = re.compile(targets)
        found = [n for n in names if rx.fullmatch(n)]
        if not found:
            raise ConfigError(f"{what}={targets!r} (regex) matches no module. Module names look like: "
                              f"{names[:6]}. Fix the regex (it must match the whole name).")
        return found
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    found = [n for n in names if any(_matches(n, t) for t in targets)]  # named_modules() order
    if missing:
        hints = "; ".join(f"{m!r}: did you mean {_close_names(m, names)}?" for m in missing)
        raise ConfigError(f"{what}: {missing} match no module of {type(model).__name__}. {hints}")
    return found


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def inject_adapters(model: nn.Module, cfg: LoRAConfig | AdaLoRAConfig) -> dict[str, AdapterLayer]:
    """Wrap every targeted linear layer of ``model`` in place and freeze the rest.

    Returns ``{module name: adapter}`` in ``named_modules()`` order. Modules named in
    ``cfg.modules_to_save`` (e.g. a classifier head) stay trainable.
    """
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ConfigError("this model already holds adapters; inject into a fresh base model")
    names = find_targets(model, cfg.target_modules)
    not_linear = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names
                  if not supported(model.get_submodule(n))]
    if isinstance(cfg.target_modules, str):  # a regex may sweep in containers; keep the linear layers
        names = [n for n in names if supported(model.get_submodule(n))]
        if not names:
            raise ConfigError(f"target_modules={cfg.target_modules!r} matches only non-linear modules: "
                              f"{not_linear[:5]}")
    elif not_linear:
        raise ConfigError(f"target_modules selects modules that are not nn.Linear or Conv1D: {not_linear[:5]}. "
                          "Name the linear layers inside them instead.")
    unknown = set(cfg.rank_pattern) - set(names)
    if unknown:
        raise ConfigError(f"rank_pattern names modules that are not targets: {sorted(unknown)[:5]}")

    for p in model.parameters():
        p.requires_grad_(False)

    adapters: dict[str, AdapterLayer] = {}
    for name in names:
        base = model.get_submodule(name)
        r = cfg.rank_pattern.get(name, cfg.init_r)
        if isinstance(cfg, AdaLoRAConfig) and cfg.adapter == "svd":
            layer = SVDLinear(base, r, cfg.lora_alpha, cfg.lora_dropout)
        elif isinstance(cfg, AdaLoRAConfig):  # prune-LoRA: plain B A with a rank gate
            layer = LoRALinear(base, r, cfg.lora_alpha, cfg.lora_dropout, rank_mask=True)
        else:
            layer = LoRALinear(base, r, cfg.lora_alpha, cfg.lora_dropout, use_rslora=cfg.use_rslora)
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
        adapters[name] = layer

    if cfg.modules_to_save:
        for name in find_targets(model, list(cfg.modules_to_save), what="modules_to_save"):
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    return adapters


def trainable_state_dict(model: nn.Module) -> dict:
    """Adapter tensors (``lora_*``) plus every other trainable parameter (e.g. the head)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or k in trainable}


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
