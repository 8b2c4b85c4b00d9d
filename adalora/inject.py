"""Put adapters into any model by target module names; freeze everything else; merge them back out."""

from __future__ import annotations

import difflib
import re

from torch import nn

from .config import AdaLoRAConfig, ConfigError, LoRAConfig
from .layers import AdapterLayer, LoRALinear, SVDLinear, is_conv1d, supported

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES, in its order


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


def is_all_linear(targets) -> bool:
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def all_linear_targets(model: nn.Module, modules_to_save=()) -> list[str]:
    """``target_modules="all-linear"``: every nn.Linear / transformers Conv1D except the output head, as PEFT.

    The head is the model's ``get_output_embeddings()`` (a language model's ``lm_head``) or, when it has none, its
    ``score`` / ``classifier`` attribute (a classification head), with everything inside it; modules named in
    ``modules_to_save`` (trained whole) are left out too.
    """
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if isinstance(out, nn.Module):
        heads.append(out)
    else:
        heads += [getattr(model, h) for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)][:1]
    skip = [n for n, m in model.named_modules() if any(m is h for h in heads)]
    if modules_to_save:
        skip += find_targets(model, list(modules_to_save), what="modules_to_save")
    inside = tuple(f"{n}." for n in skip)
    names = [n for n, m in model.named_modules()
             if n and supported(m) and n not in skip and not n.startswith(inside)]
    if not names:
        raise ConfigError(f"target_modules='all-linear' finds no nn.Linear or Conv1D in {type(model).__name__} "
                          "outside its output head and modules_to_save. Fix: name the modules to adapt.")
    return names


def _shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (whose weight is stored (in, out))."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])


def _check_ranks(model: nn.Module, cfg: LoRAConfig | AdaLoRAConfig, names: list[str]) -> None:
    """A rank above min(in, out) adds parameters (and AdaLoRA budget) that ΔW, of rank <= min(in, out), cannot use."""
    cls, fld = type(cfg).__name__, "r" if isinstance(cfg, LoRAConfig) else "init_r"
    for name in names:
        r = cfg.rank_pattern.get(name, cfg.init_r)
        n_in, n_out = _shape(model.get_submodule(name))
        limit = min(n_in, n_out)
        if r > limit:
            what = f"rank_pattern[{name!r}]={r}" if name in cfg.rank_pattern else f"{cls}.{fld}={r}"
            raise ConfigError(f"{what} exceeds min(in, out) = {limit} of module {name!r} "
                              f"({type(model.get_submodule(name)).__name__} {n_in} -> {n_out}): its ΔW has rank "
                              f"<= {limit}, so the extra ranks only add parameters. Fix: lower {fld} to <= {limit}, "
                              f"give the module its own rank with rank_pattern={{{name!r}: {limit}}}, or leave it out "
                              "of target_modules.")


def inject_adapters(model: nn.Module, cfg: LoRAConfig | AdaLoRAConfig) -> dict[str, AdapterLayer]:
    """Wrap every targeted linear layer of ``model`` in place and freeze the rest.

    Returns ``{module name: adapter}`` in ``named_modules()`` order. Modules named in
    ``cfg.modules_to_save`` (e.g. a classifier head) stay trainable. ``cfg.target_modules="all-linear"``
    selects every linear layer but the output head (``all_linear_targets``). A module's rank may not exceed
    min(in_features, out_features): ConfigError.
    """
    return _inject(model, cfg, check_ranks=True)


def _inject(model: nn.Module, cfg: LoRAConfig | AdaLoRAConfig, check_ranks: bool) -> dict[str, AdapterLayer]:
    """``inject_adapters``; loading a saved adapter skips the rank check (PEFT accepts such ranks)."""
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ConfigError("this model already holds adapters; inject into a fresh base model")
    if is_all_linear(cfg.target_modules):
        names = all_linear_targets(model, cfg.modules_to_save)
    else:
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
    if check_ranks:
        _check_ranks(model, cfg, names)

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


def merge_and_unload(model: nn.Module) -> nn.Module:
    """PEFT's ``merge_and_unload()``: fold every adapter's ΔW into its base layer and put the base layer back in
    place of the wrapper. Returns ``model`` (changed in place), which then holds no adapter; an allocator that
    drove them is stale."""
    for name, a in [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]:
        a.merge()
        parent, child = _parent(model, name)
        setattr(parent, child, a.base_layer)
    return model


def trainable_state_dict(model: nn.Module) -> dict:
    """Adapter tensors (``lora_*``) plus every other trainable parameter (e.g. the head)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or k in trainable}


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_summary(model: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters()`` line: trainable and all parameters (shared ones counted once)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable_summary(model)``, as PEFT's ``model.print_trainable_parameters()`` does."""
    print(trainable_summary(model))
