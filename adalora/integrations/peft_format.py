"""Hugging Face PEFT's on-disk adapter format, as conversions between our adapters and PEFT's dicts.

Checked against PEFT 0.21.2 (``save_pretrained`` / ``PeftModel.from_pretrained``). ``adalora.checkpoint`` does the
file I/O (``save_adapter`` / ``load_adapter``); this module only builds and reads the two objects PEFT stores:

    adapter_config.json        the PEFT config as a dict (``peft_type`` "ADALORA" or "LORA", ``target_modules``,
                               ``modules_to_save``, ``rank_pattern``, ...)
    adapter_model.safetensors  tensors named "base_model.model.<module>.<param>":
        ADALORA  ".lora_A" (k, in), ".lora_E" (k, 1), ".lora_B" (out, k), k = the kept rank
        LORA     ".lora_A.weight" (k, in), ".lora_B.weight" (out, k)
        and "base_model.model.<module>.<param>" for every module PEFT wraps as a modules_to_save module.

Which PEFT type: ``AdaLoRAConfig(adapter="svd")`` (P Λ Q) is ADALORA; ``LoRAConfig`` and the prune-LoRA variant
``AdaLoRAConfig(adapter="lora")`` (B A with a rank gate) are LORA, sliced to the kept (ungated) components. SoRA
(ΔW = B diag(g) A · α / r) and IncreLoRA (ΔW = P Λ Q · scale over all parts) have the same form, so they are
ADALORA too: the gate g or Λ is PEFT's ``lora_E``, sliced to the kept components of the controller's
``keep_masks()`` (SoRA: the non-zero gates; IncreLoRA: the active parts, and while growth is on the reserves too,
whose fixed λ = 1e-5 still acts on the output). PEFT's schedule fields, which only matter for training with PEFT,
take the method's nearest values (SoRA: no warm-up, no orthogonal regularizer).

Scale. A loaded PEFT AdaLoRA layer computes ``x (A*E)ᵀ Bᵀ · lora_alpha / (init_r + 1e-5)``:
``resize_modules_by_rank_pattern`` builds every module at ``init_r``, shrinks it to ``sum(mask)`` and copies the old
``ranknum`` (init_r, not the kept rank) back. Our layer computes ``x (A*E)ᵀ Bᵀ · scale`` with ``scale = lora_alpha /
init_r``. The export multiplies Λ by ``scale / peft_scale(lora_alpha, init_r)`` (1 + 1e-5 / init_r for the default
scale), so the PEFT model gives our outputs. A PEFT LoRA layer scales by ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)
with ``r`` and ``alpha`` looked up per module in ``rank_pattern`` / ``alpha_pattern``: a module whose kept rank or
scale differs from the config's gets an entry there, so its scale is exactly ours; its tensors are ours bit for bit.
A LoRA module of rank 0 is left out (PEFT refuses ``r=0``; it adds nothing).

peft itself is never imported: everything here is dicts and tensors.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..adaptive import AdaptiveMethod
from ..config import AdaLoRAConfig, ConfigError, IncreLoRAConfig, LoRAConfig, SoRAConfig
from ..inject import find_targets
from ..layers import AdapterLayer, SVDLinear, is_conv1d

PREFIX = "base_model.model."
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Modules that PEFT's task-specific PeftModel classes add to modules_to_save on their own (peft_model.py).
# Their weights must be in the file whenever the base model has them, or from_pretrained fails with a KeyError.
TASK_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                        "QUESTION_ANS": ("qa_outputs",)}
METHOD_CONFIGS = (LoRAConfig, AdaLoRAConfig, SoRAConfig, IncreLoRAConfig)
MethodConfig = LoRAConfig | AdaLoRAConfig | SoRAConfig | IncreLoRAConfig
_ADALORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<param>lora_A|lora_B|lora_E)(?:\.(?P<adapter>[\w-]+))?$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<param>lora_A|lora_B)(?:\.(?P<adapter>[\w-]+))?\.weight$")


def peft_scale(lora_alpha: float, ranknum: float, dtype: torch.dtype = torch.float32) -> float:
    """The factor a loaded PEFT AdaLoRA layer applies: ``lora_alpha / (ranknum + 1e-5)``.

    After ``resize_modules_by_rank_pattern`` ``ranknum`` is still ``init_r`` (PEFT copies the old value back), not
    the kept rank. ``ranknum + 1e-5`` is computed in the ``ranknum`` tensor's dtype (float32), so it is rounded the
    same way here.
    """
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha={lora_alpha}: PEFT then scales by the rank itself; only lora_alpha > 0 "
                         "is supported")
    return float(lora_alpha) / float(torch.tensor(float(ranknum), dtype=dtype) + 1e-5)


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's (and our LoRALinear's) LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def pattern_value(patterns: Mapping, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end of the module name
    as a regex at a ``.`` boundary (``get_pattern_key``), else ``default``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def peft_targets(config: Mapping, base_names: list[str]) -> list[str]:
    """The modules PEFT adapts for ``config`` in a base model with modules ``base_names``
    (``check_target_module_exists``: exact name or ``.``-suffix, or a full-match regex; modules_to_save excluded)."""
    targets = config["target_modules"]
    save = list(config.get("modules_to_save") or []) + list(TASK_MODULES_TO_SAVE.get(config.get("task_type"), ()))
    out = []
    for key in base_names:
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in save):
            continue
        if isinstance(targets, str):
            found = re.fullmatch(targets, key) is not None
        else:
            found = key in targets or any(key.endswith(f".{t}") for t in targets)
        if found:
            out.append(key)
    return out


# ---------------------------------------------------------------------------------------------------- export
def _adapters_and_model(model_or_adapters) -> tuple[nn.Module | None, dict[str, AdapterLayer]]:
    if isinstance(model_or_adapters, nn.Module):
        model = model_or_adapters
        return model, {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    if isinstance(model_or_adapters, Mapping):
        return None, dict(model_or_adapters)
    raise TypeError(f"needs the model or the adapters dict, got {type(model_or_adapters).__name__}")


def kept_indices(adapters: Mapping[str, AdapterLayer], allocator: AdaptiveMethod | None) -> dict[str, torch.Tensor]:
    """{module: indices of the rank components that contribute}, the ones a saved adapter holds.

    ``allocator``: the method's controller (``RankAllocator``, ``SoRAGates`` or ``RankGrower``), or None.
    SVD form (AdaLoRA, SoRA, IncreLoRA): the components of ``allocator.keep_masks()`` plus any other whose
    singular value / gate is not 0, since it still acts on the output (AdaLoRA: a masked triplet trained back
    since the last masking step, while from the final phase on the pruned E stay 0; IncreLoRA: a reserve while
    growth is on); without a controller, all. Prune-LoRA: the components its gate keeps. Plain LoRA: all.
    """
    if allocator is not None and not hasattr(allocator, "keep_masks"):
        raise TypeError(f"a {type(allocator).__name__} has no keep_masks(): pass the method's controller "
                        "(RankAllocator, SoRAGates or RankGrower), or None to save every component")
    masks = allocator.keep_masks() if allocator is not None else {}
    if allocator is not None and set(masks) != set(adapters):
        raise ValueError("the controller drives other adapters than the ones saved (module names differ)")
    out = {}
    for name, a in adapters.items():
        if isinstance(a, SVDLinear):
            keep = torch.ones(a.r, dtype=torch.bool, device=a.lora_E.device)
            if name in masks:
                keep = masks[name].to(keep.device) | (a.lora_E.detach().view(-1) != 0)
        elif a.lora_mask is not None:
            keep = a.lora_mask.detach() != 0
        else:
            keep = torch.ones(a.r, dtype=torch.bool, device=a.lora_A.device)
        out[name] = keep.nonzero().view(-1).to(a.lora_A.device)
    return out


def _base_names(model: nn.Module, adapters: Mapping[str, AdapterLayer]) -> list[str]:
    """Module names as PEFT sees the base model: without our wrappers' insides (``<name>.base_layer`` ...)."""
    inside = tuple(f"{a}." for a in adapters)
    return [n for n, _ in model.named_modules() if n and not n.startswith(inside)]


def _target_modules(names: list[str], config: dict, base_names: list[str] | None):
    """The exact names as a list when PEFT's suffix rule selects exactly them, else an escaped full-match regex."""
    if base_names is None or peft_targets({**config, "target_modules": names}, base_names) == names:
        return names
    rx = "|".join(re.escape(n) for n in names)
    if peft_targets({**config, "target_modules": rx}, base_names) != names:
        raise ValueError(f"PEFT cannot target exactly {names[:3]}...: some lie inside modules_to_save "
                         f"{config.get('modules_to_save')}; leave those out of target_modules")
    return rx


def _patterns(values: dict, default) -> dict:
    """A PEFT ``rank_pattern`` / ``alpha_pattern`` under which ``pattern_value`` gives every module its value.

    Plain names for the modules that differ from ``default``, unless one of those keys also matches the end of
    another module's name (``"0"`` matches ``"1.0"``); then every module gets its own escaped key, longest first, so
    the first key that matches a module is its own.
    """
    plain = {n: v for n, v in values.items() if v != default}
    if all(pattern_value(plain, n, default) == v for n, v in values.items()):
        return plain
    return {re.escape(n): values[n] for n in sorted(values, key=len, reverse=True)}


def _peft_wrapped_modules(model: nn.Module, names: list[str], adapter_names: list[str]) -> list[str]:
    """Module names that PEFT wraps in a ModulesToSaveWrapper for ``names``: its rule is a plain ``endswith``."""
    inside = tuple(f"{a}." for a in adapter_names)
    out = []
    for key, _ in model.named_modules():
        if key and not key.startswith(inside) and key not in adapter_names and any(key.endswith(n) for n in names):
            if not any(key.startswith(f"{o}.") for o in out):  # a module inside a wrapped one is saved with it
                out.append(key)
    return out


def _modules_to_save(model: nn.Module, cfg, adapters: Mapping[str, AdapterLayer]) -> list[str]:
    """Full names of the modules that train besides the adapters: ``cfg.modules_to_save`` and the owners of any
    other trainable parameter."""
    names: list[str] = []
    if cfg.modules_to_save:
        names += find_targets(model, list(cfg.modules_to_save), what="modules_to_save")
    inside = tuple(f"{a}." for a in adapters)
    for pname, p in model.named_parameters():
        if not p.requires_grad or "lora_" in pname or pname.startswith(inside):
            continue
        owner = pname.rpartition(".")[0]
        if not owner:
            raise ValueError(f"trainable parameter {pname!r} sits on the root module; PEFT can only save whole "
                             "submodules (modules_to_save). Move it into a submodule or freeze it.")
        if not any(owner == n or owner.startswith(f"{n}.") for n in names):
            names.append(owner)
    clash = [n for n in names if n in adapters or any(n.startswith(f"{a}.") or a.startswith(f"{n}.") for a in adapters)]
    if clash:
        raise ValueError(f"modules_to_save {clash[:3]} overlap adapted modules; PEFT cannot hold both")
    return list(dict.fromkeys(names))


def _fold(E: torch.Tensor, ratio: float) -> torch.Tensor:
    return E if ratio == 1.0 or not E.numel() else (E.double() * ratio).to(E.dtype)


def unfold(E: torch.Tensor, ratio: float) -> torch.Tensor:
    """Undo the export's ``E * ratio`` (to within one float32 rounding: exact for all but a few values per million)."""
    return E if ratio == 1.0 or not E.numel() else (E.double() / ratio).to(E.dtype)


def build_peft(model_or_adapters: nn.Module | Mapping[str, AdapterLayer], cfg: MethodConfig,
               allocator: AdaptiveMethod | None = None, task_type: str | None = None,
               base_model_name_or_path: str | None = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """PEFT's ``(adapter_config dict, tensors)`` for our adapters, plus what PEFT has no field for.

    ``model_or_adapters``: the model that ``inject_method`` modified (needed for modules_to_save such as the
    classifier), or the ``{name: adapter}`` dict it returned. ``cfg``: the LoRAConfig, AdaLoRAConfig, SoRAConfig or
    IncreLoRAConfig they were built from. ``allocator``: the method's controller; its ``keep_masks()`` select the
    saved components (see ``kept_indices``).
    The third item is ``{"rank_pattern": {module: kept rank}, "init_ranks": ..., "scales": {module: our scale},
    "peft_scale": PEFT AdaLoRA's scale or None}``; ``load_adapter`` uses it to restore our layers exactly.
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise ConfigError(f"task_type={task_type!r} is not one of PEFT's task types {TASK_TYPES}. "
                          "Fix: pass one of them, e.g. 'SEQ_CLS', or None for a bare PeftModel.")
    if not isinstance(cfg, METHOD_CONFIGS):
        raise TypeError(f"needs the LoRAConfig, AdaLoRAConfig, SoRAConfig or IncreLoRAConfig the adapters were built "
                        f"from, got {type(cfg).__name__}")
    model, adapters = _adapters_and_model(model_or_adapters)
    if not adapters:
        raise ValueError("no adapters found: call inject_method(model, cfg) first")
    svd = isinstance(cfg, (SoRAConfig, IncreLoRAConfig)) or (isinstance(cfg, AdaLoRAConfig) and cfg.adapter == "svd")
    wrong = [n for n, a in adapters.items() if isinstance(a, SVDLinear) != svd]
    if wrong:
        what = type(cfg).__name__ + (f"(adapter={cfg.adapter!r})" if isinstance(cfg, AdaLoRAConfig) else "")
        raise TypeError(f"{what} does not match the {type(adapters[wrong[0]]).__name__} adapters at {wrong[:3]}: "
                        "pass the config they were injected with")
    kept = kept_indices(adapters, allocator)
    ranks = {n: int(idx.numel()) for n, idx in kept.items()}
    base_names = _base_names(model, adapters) if model is not None else None
    tensors: dict[str, torch.Tensor] = {}
    config: dict = {"peft_type": "ADALORA" if svd else "LORA", "task_type": task_type}

    if svd:
        init_r = max([cfg.init_r, *ranks.values()])  # PEFT builds every module at init_r before resizing
        scale_peft = peft_scale(cfg.lora_alpha, init_r)
        rank_pattern: dict[str, list[bool]] = {}
        for name, a in adapters.items():
            idx = kept[name]
            tensors[f"{PREFIX}{name}.lora_A"] = a.lora_A.detach().index_select(0, idx)
            tensors[f"{PREFIX}{name}.lora_E"] = _fold(a.lora_E.detach().index_select(0, idx), a.scale / scale_peft)
            tensors[f"{PREFIX}{name}.lora_B"] = a.lora_B.detach().index_select(1, idx)
            if a.r == init_r and allocator is not None:  # keep PEFT's meaning: which of the init_r triplets survived
                keep = torch.zeros(init_r, dtype=torch.bool)
                keep[idx.cpu()] = True
                rank_pattern[f"{name}.lora_E"] = keep.tolist()
            else:  # compacted (or built at a smaller rank): the kept triplets are the first ranks[name] slots
                rank_pattern[f"{name}.lora_E"] = [True] * ranks[name] + [False] * (init_r - ranks[name])
        targets = list(adapters)
        config.update(init_r=init_r, rank_pattern=rank_pattern, **_peft_schedule(cfg, init_r))
    else:
        r, rslora = cfg.init_r, bool(getattr(cfg, "use_rslora", False))
        targets = [n for n in adapters if ranks[n]]
        alphas = {}
        for name in targets:
            a, idx, k = adapters[name], kept[name], ranks[name]
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a._down().detach().index_select(0, idx)  # the gate folded in
            tensors[f"{PREFIX}{name}.lora_B.weight"] = a.lora_B.detach().index_select(1, idx)
            same = a.scale == lora_scaling(cfg.lora_alpha, k, rslora)
            alphas[name] = cfg.lora_alpha if same else a.scale * (math.sqrt(k) if rslora else k)
        config.update(r=r, rank_pattern=_patterns({n: ranks[n] for n in targets}, r),
                      alpha_pattern=_patterns(alphas, cfg.lora_alpha), use_rslora=rslora, use_dora=False,
                      lora_bias=False)

    to_save: list[str] = []
    if model is not None:
        to_save = _modules_to_save(model, cfg, adapters)
        wrapped = _peft_wrapped_modules(model, to_save + list(TASK_MODULES_TO_SAVE.get(task_type or "", ())),
                                        list(adapters))
        for mod in wrapped:
            for k, v in model.get_submodule(mod).state_dict().items():
                tensors[f"{PREFIX}{mod}.{k}"] = v.detach()
    elif cfg.modules_to_save:
        raise ValueError(f"cfg.modules_to_save={cfg.modules_to_save} needs the model: pass the model instead of "
                         "the adapters dict, so those weights are saved too")
    elif task_type in TASK_MODULES_TO_SAVE:
        warnings.warn(f"saving the adapters only: PEFT's task_type={task_type!r} wraps the modules "
                      f"{TASK_MODULES_TO_SAVE[task_type]} and fails to load if the base model has them and the file "
                      "lacks their weights. Pass the model, or task_type=None.", stacklevel=3)

    if base_model_name_or_path is None and model is not None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config.update(
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        bias="none",
        fan_in_fan_out=any(is_conv1d(a.base_layer) for a in adapters.values()),
        init_lora_weights=True,
    )
    config["target_modules"] = _target_modules(targets, config, base_names)
    tensors = {k: v.contiguous().clone().cpu() for k, v in tensors.items()}
    ours = {"rank_pattern": ranks, "init_ranks": {n: a.init_r for n, a in adapters.items()},
            "scales": {n: a.scale for n, a in adapters.items()}, "peft_scale": scale_peft if svd else None}
    return config, tensors, ours


def _peft_schedule(cfg, init_r: int) -> dict:
    """PEFT AdaLoRA's training fields (``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1/2``,
    ``orth_reg_weight``, ``total_step``) for our config: AdaLoRA's own, the nearest values for SoRA / IncreLoRA."""
    if isinstance(cfg, SoRAConfig):  # no warm-up, no orthogonal regularizer; PEFT's default EMAs
        out = dict(target_r=cfg.target_r or init_r, tinit=0, tfinal=cfg.tfinal, deltaT=1, beta1=0.85, beta2=0.85,
                   orth_reg_weight=0.0)
    elif isinstance(cfg, IncreLoRAConfig):
        out = dict(target_r=cfg.target_r, tinit=cfg.tinit, tfinal=0, deltaT=cfg.delta_t, beta1=cfg.beta1,
                   beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight)
    else:
        out = dict(target_r=cfg.target_r, tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.delta_t, beta1=cfg.beta1,
                   beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight)
    total = cfg.total_steps if cfg.total_steps is not None else 1
    out["total_step"] = max(total, out["tinit"] + out["tfinal"] + 1)  # PEFT refuses an empty budget-decreasing phase
    return out


# ---------------------------------------------------------------------------------------------------- import
def parse_peft(config: Mapping, tensors: Mapping[str, torch.Tensor], where: str | os.PathLike) -> dict:
    """Read PEFT's config and tensors (a LORA or ADALORA adapter) into per-module pieces.

    Returns ``{"svd": bool, "modules": {module: {"lora_A", "lora_B" [, "lora_E"], "scale", "init_r"}},
    "others": {full parameter name: tensor}, "cfg": the LoRAConfig / AdaLoRAConfig that rebuilds these layers}``:
    each module's tensors at its saved rank and the scale PEFT applies to it. The config holds PEFT's
    hyperparameters, the adapted module names, their ranks as ``rank_pattern`` and (AdaLoRA) ``prune=False``,
    since the ranks are already allocated. ``where`` names the folder in error messages.
    """
    where = Path(where)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("ADALORA", "LORA"):
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}; only LORA and ADALORA adapters load")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r} trains the base biases; only bias='none' is supported")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"{where}: {flag}=True is not a plain LoRA adapter; only use_dora=False, "
                             "lora_bias=False adapters load")
    svd = peft_type == "ADALORA"
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    ranknums: dict[str, float] = {}
    others: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{where}: tensor {key!r} lacks PEFT's {PREFIX!r} prefix")
        key = key[len(PREFIX):]
        if svd and (key.endswith(".ranknum") or ".ranknum." in key):  # written by old PEFT versions
            ranknums[key.split(".ranknum")[0]] = float(t.reshape(-1)[0])
            continue
        m = (_ADALORA_KEY if svd else _LORA_KEY).match(key)
        if m:
            pieces.setdefault(m["module"], {})[m["param"]] = t
        elif "lora_" in key:
            raise ValueError(f"{where}: {key!r} is not a {peft_type} linear adapter tensor "
                             "(embedding, conv and bias adapters are not supported)")
        else:
            others[key] = t
    if not pieces:
        raise ValueError(f"{where}: the weights hold no {peft_type} adapter tensors")

    alpha = float(config.get("lora_alpha", 8))
    modules: dict[str, dict] = {}
    if svd:
        init_r = int(config.get("init_r", 12))
        patterns = {k.removesuffix(".default"): v for k, v in (config.get("rank_pattern") or {}).items()}
        for n, parts in pieces.items():
            if set(parts) != {"lora_A", "lora_B", "lora_E"}:
                raise ValueError(f"{where}: module {n!r} lacks {sorted({'lora_A', 'lora_B', 'lora_E'} - set(parts))}")
            mask, k = patterns.get(f"{n}.lora_E"), parts["lora_A"].shape[0]
            if mask is not None and k == len(mask) != sum(mask):  # full-size tensors with a pattern: slice like PEFT
                idx = torch.tensor([i for i, b in enumerate(mask) if b], dtype=torch.long)
                parts = {"lora_A": parts["lora_A"][idx], "lora_E": parts["lora_E"][idx],
                         "lora_B": parts["lora_B"][:, idx]}
            elif mask is not None and k != sum(mask):
                raise ValueError(f"{where}: {n}.lora_A has {k} rows but rank_pattern keeps {sum(mask)}")
            modules[n] = {**parts, "scale": peft_scale(alpha, ranknums.get(n, init_r)), "init_r": init_r}
    else:
        r, rslora = int(config.get("r", 8)), bool(config.get("use_rslora", False))
        for n, parts in pieces.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise ValueError(f"{where}: module {n!r} lacks {sorted({'lora_A', 'lora_B'} - set(parts))}")
            r_n = int(pattern_value(config.get("rank_pattern") or {}, n, r))
            if parts["lora_A"].shape[0] != r_n:
                raise ValueError(f"{where}: {n}.lora_A has {parts['lora_A'].shape[0]} rows but the config gives "
                                 f"rank {r_n}: the weights do not match adapter_config.json")
            a_n = float(pattern_value(config.get("alpha_pattern") or {}, n, alpha))
            modules[n] = {**parts, "scale": lora_scaling(a_n, r_n, rslora), "init_r": r_n}
    for n, parts in modules.items():
        k = parts["lora_A"].shape[0]
        if parts["lora_B"].shape[1] != k or ("lora_E" in parts and parts["lora_E"].shape != (k, 1)):
            raise ValueError(f"{where}: {n}: inconsistent shapes " + ", ".join(
                f"{p} {tuple(parts[p].shape)}" for p in ("lora_A", "lora_E", "lora_B") if p in parts))

    ranks = {n: int(p["lora_A"].shape[0]) for n, p in modules.items()}
    owners = list(dict.fromkeys(k.rpartition(".")[0] for k in others))
    common = dict(lora_alpha=alpha, lora_dropout=float(config.get("lora_dropout", 0.0)),
                  target_modules=list(modules), modules_to_save=[o for o in owners if o], rank_pattern=ranks)
    if svd:
        total = config.get("total_step")
        cfg = AdaLoRAConfig(
            init_r=max([init_r, *ranks.values()]), target_r=max(1, min(int(config.get("target_r", 8)), init_r)),
            tinit=int(config.get("tinit", 0)), tfinal=int(config.get("tfinal", 0)),
            delta_t=int(config.get("deltaT", 1)), beta1=float(config.get("beta1", 0.85)),
            beta2=float(config.get("beta2", 0.85)), orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
            total_steps=int(total) if total else None, prune=False, **common)
    else:
        cfg = LoRAConfig(r=r, use_rslora=rslora, **common)
    return {"svd": svd, "modules": modules, "others": others, "cfg": cfg}


# ---------------------------------------------------------------------------------------------------- files
def export_to_peft(model_or_adapters: nn.Module | Mapping[str, AdapterLayer], cfg: MethodConfig,
                   allocator: AdaptiveMethod | None, path: str | os.PathLike,
                   base_model_name_or_path: str | None = None, task_type: str | None = "SEQ_CLS") -> Path:
    """``save_adapter(path, model_or_adapters, cfg, allocator, task_type=..., base_model_name_or_path=...)`` under
    its earlier name and argument order (task_type defaults to ``"SEQ_CLS"`` here). Returns the folder."""
    from ..checkpoint import save_adapter  # adalora.checkpoint imports this module

    return save_adapter(path, model_or_adapters, cfg, allocator, task_type=task_type,
                        base_model_name_or_path=base_model_name_or_path)


def import_from_peft(model: nn.Module, path: str | os.PathLike) -> tuple[dict[str, AdapterLayer],
                                                                          LoRAConfig | AdaLoRAConfig]:
    """``load_adapter(model, path)`` that also returns the config it injected with: ``(adapters, cfg)``, with the
    adapted module names, their saved ranks as ``rank_pattern`` and, for AdaLoRA, ``prune=False`` (use
    ``dataclasses.replace(cfg, prune=True, total_steps=...)`` to prune further)."""
    from ..checkpoint import _load  # adalora.checkpoint imports this module

    return _load(model, path)
