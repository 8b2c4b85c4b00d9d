"""Export our AdaLoRA adapters to Hugging Face PEFT's on-disk format, and import PEFT AdaLoRA checkpoints.

PEFT's format (checked against PEFT 0.21.2's ``save_pretrained`` / ``PeftModel.from_pretrained``):

    adapter_config.json        {"peft_type": "ADALORA", "init_r": ..., "lora_alpha": ..., "target_modules": [...],
                                "modules_to_save": [...], "rank_pattern": {"<module>.lora_E": [bool] * init_r}, ...}
    adapter_model.safetensors  "base_model.model.<module>.lora_A" (k, in), ".lora_E" (k, 1), ".lora_B" (out, k),
                               with k = the kept rank, and "base_model.model.<module>.<param>" for every module that
                               PEFT wraps as a modules_to_save module (e.g. the classifier).

How PEFT loads it: every target module is built at ``init_r``; ``resize_modules_by_rank_pattern`` then shrinks each
one to ``sum(mask)`` and copies the *old* ``ranknum`` back, so the loaded layer computes
``x (A*E)ᵀ Bᵀ · lora_alpha / (init_r + 1e-5)`` whatever its kept rank (``ranknum`` is init_r, not the kept rank).
Our layer computes ``x (A*E)ᵀ Bᵀ · scale`` with ``scale = lora_alpha / init_r``. The export folds the ratio
``scale / (lora_alpha / (init_r + 1e-5))`` (1 + 1e-5 / init_r) into the exported singular values Λ, so the PEFT
model gives our outputs; the import keeps PEFT's tensors bit for bit and sets our layer's ``scale`` to PEFT's
effective ``lora_alpha / (init_r + 1e-5)`` instead. A round trip (ours -> PEFT -> ours, or PEFT -> ours -> PEFT)
therefore reproduces the outputs to float rounding.

peft itself is never imported here: the files are written and read with safetensors and json only.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..allocator import RankAllocator
from ..checkpoint import atomic_write
from ..config import AdaLoRAConfig
from ..inject import inject_adapters
from ..layers import AdapterLayer, SVDLinear, is_conv1d

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Modules that PEFT's task-specific PeftModel classes add to modules_to_save on their own (peft_model.py).
# Their weights must be in the file whenever the base model has them, or from_pretrained fails with a KeyError.
TASK_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                        "QUESTION_ANS": ("qa_outputs",)}
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<param>lora_A|lora_B|lora_E)(?:\.(?P<adapter>[\w-]+))?$")


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


# ---------------------------------------------------------------------------------------------------- export
def _peft_wrapped_modules(model: nn.Module, names: list[str], adapter_names: list[str]) -> list[str]:
    """Module names that PEFT wraps in a ModulesToSaveWrapper for ``names``: its rule is a plain ``endswith``."""
    inside = tuple(f"{a}." for a in adapter_names)
    out = []
    for key, _ in model.named_modules():
        if key and not key.startswith(inside) and key not in adapter_names and any(key.endswith(n) for n in names):
            if not any(key.startswith(f"{o}.") for o in out):  # a module inside a wrapped one is saved with it
                out.append(key)
    return out


def _modules_to_save(model: nn.Module, cfg: AdaLoRAConfig, adapters: Mapping[str, AdapterLayer]) -> list[str]:
    """Full names of the modules that train besides the adapters: ``cfg.modules_to_save`` and the owners of any
    other trainable parameter (as ``adapter_tensors`` saves them in our own format)."""
    from ..inject import find_targets

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


def export_to_peft(model_or_adapters: nn.Module | Mapping[str, AdapterLayer], cfg: AdaLoRAConfig,
                   allocator: RankAllocator | None, path: str | os.PathLike,
                   base_model_name_or_path: str | None = None, task_type: str | None = "SEQ_CLS") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(base, path)``
    loads with the same outputs as our model.

    ``model_or_adapters``: the model that ``inject_adapters`` modified (needed for modules_to_save such as the
    classifier), or the ``{name: adapter}`` dict it returned. ``allocator``: its keep masks select the exported
    triplets (``None``: every triplet of every adapter is exported); mid-schedule, a masked triplet whose singular
    value has trained back since the last masking step is exported as well, since it still contributes.
    ``task_type`` is PEFT's (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ..., or ``None`` for a bare ``PeftModel``).
    Returns the folder.

    The singular values are scaled by ``our scale / PEFT's scale`` (see the module docstring). A module pruned to
    rank 0 is written with empty (0, in) / (out, 0) tensors, which PEFT loads as a rank-0 layer.
    """
    path = Path(path)
    if isinstance(model_or_adapters, nn.Module):
        model = model_or_adapters
        adapters = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    elif isinstance(model_or_adapters, Mapping):
        model, adapters = None, dict(model_or_adapters)
    else:
        raise TypeError(f"export_to_peft needs the model or the adapters dict, got {type(model_or_adapters).__name__}")
    if not adapters:
        raise ValueError("no adapters found: call inject_adapters(model, cfg) first")
    not_svd = [n for n, a in adapters.items() if not isinstance(a, SVDLinear)]
    if not_svd:
        raise TypeError(f"PEFT's AdaLoRA format holds SVD adapters (P, Λ, Q); {not_svd[:3]} are "
                        f"{type(adapters[not_svd[0]]).__name__}. Export AdaLoRAConfig(adapter='svd') models only.")
    if not isinstance(cfg, AdaLoRAConfig):
        raise TypeError(f"export_to_peft needs the AdaLoRAConfig the adapters were built from, "
                        f"got {type(cfg).__name__}")
    masks = allocator.keep_masks() if allocator is not None else {}
    if allocator is not None and set(masks) != set(adapters):
        raise ValueError("the allocator drives other adapters than the ones exported (module names differ)")
    # Between two masking steps a masked singular value may have trained back (E != 0): it still contributes, so it
    # is exported too and the PEFT model computes what ours computes. From the final phase on, the pruned E stay 0.
    masks = {n: m.to(adapters[n].lora_E.device) | (adapters[n].lora_E.detach().view(-1) != 0) for n, m in masks.items()}

    kept = {n: (masks[n].nonzero().view(-1).to(a.lora_A.device) if n in masks else None) for n, a in adapters.items()}
    ranks = {n: (a.r if idx is None else int(idx.numel())) for (n, a), idx in zip(adapters.items(), kept.values())}
    init_r = max([cfg.init_r, *ranks.values()])  # PEFT builds every module at init_r before resizing

    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, list[bool]] = {}
    scale_peft = peft_scale(cfg.lora_alpha, init_r)
    for name, a in adapters.items():
        idx = kept[name]
        if idx is None:
            idx = torch.arange(a.r, device=a.lora_A.device)
        A = a.lora_A.detach().index_select(0, idx)
        B = a.lora_B.detach().index_select(1, idx)
        E = a.lora_E.detach().index_select(0, idx)
        ratio = a.scale / scale_peft
        if E.numel() and ratio != 1.0:
            E = (E.double() * ratio).to(E.dtype)
        for pname, t in (("lora_A", A), ("lora_B", B), ("lora_E", E)):
            tensors[f"{PREFIX}{name}.{pname}"] = t.contiguous().cpu()
        if a.r == init_r and name in masks:  # keep PEFT's meaning: which of the init_r triplets survived
            rank_pattern[f"{name}.lora_E"] = [bool(b) for b in masks[name].tolist()]
        else:  # compacted (or built at a smaller rank): the kept triplets are the first ranks[name] slots
            rank_pattern[f"{name}.lora_E"] = [True] * ranks[name] + [False] * (init_r - ranks[name])

    to_save: list[str] = []
    if model is not None:
        to_save = _modules_to_save(model, cfg, adapters)
        wrapped = _peft_wrapped_modules(model, to_save + list(TASK_MODULES_TO_SAVE.get(task_type or "", ())),
                                        list(adapters))
        for mod in wrapped:
            for k, v in model.get_submodule(mod).state_dict().items():
                tensors[f"{PREFIX}{mod}.{k}"] = v.detach().contiguous().clone().cpu()
    elif cfg.modules_to_save:
        raise ValueError(f"cfg.modules_to_save={cfg.modules_to_save} needs the model: pass the model to "
                         "export_to_peft instead of the adapters dict, so those weights are exported too")
    elif task_type in TASK_MODULES_TO_SAVE:
        warnings.warn(f"export_to_peft got the adapters only: PEFT's task_type={task_type!r} wraps the modules "
                      f"{TASK_MODULES_TO_SAVE[task_type]} and fails to load if the base model has them and the file "
                      "lacks their weights. Pass the model, or task_type=None.", stacklevel=2)

    total = cfg.total_steps if cfg.total_steps is not None else 1
    total = max(total, cfg.tinit + cfg.tfinal + 1)  # PEFT's config refuses an empty budget-decreasing phase
    if base_model_name_or_path is None and model is not None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config = {
        "peft_type": "ADALORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_r": init_r,
        "target_r": cfg.target_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": list(adapters),  # exact names: PEFT matches them as ours did
        "modules_to_save": to_save or None,
        "rank_pattern": rank_pattern,
        "tinit": cfg.tinit,
        "tfinal": cfg.tfinal,
        "deltaT": cfg.delta_t,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight,
        "total_step": total,
        "bias": "none",
        "fan_in_fan_out": any(is_conv1d(a.base_layer) for a in adapters.values()),
        "init_lora_weights": True,
    }
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return path


# ---------------------------------------------------------------------------------------------------- import
def _read_peft(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: point to a folder written by PEFT's save_pretrained()")
    config = json.loads(cfg_path.read_text())
    if str(config.get("peft_type", "")).upper() != "ADALORA":
        raise ValueError(f"{cfg_path}: peft_type={config.get('peft_type')!r}; import_from_peft reads AdaLoRA "
                         "checkpoints only")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: bias={config['bias']!r} trains the base biases; only bias='none' is supported")
    w_path = path / WEIGHTS_NAME
    if not w_path.exists():
        extra = " (found adapter_model.bin: re-save it with safe_serialization=True)" \
            if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{w_path} not found{extra}")
    return config, load_file(str(w_path))


def import_from_peft(model: nn.Module, path: str | os.PathLike) -> tuple[dict[str, SVDLinear], AdaLoRAConfig]:
    """Load a PEFT AdaLoRA checkpoint (``save_pretrained`` folder) into a fresh base ``model``.

    Injects our ``SVDLinear`` at each saved module with the saved (kept) rank, copies P, Λ, Q unchanged and sets
    each layer's ``scale`` to the one PEFT applies, ``lora_alpha / (init_r + 1e-5)``; the modules_to_save weights
    (e.g. the classifier) are copied and left trainable. Returns ``(adapters, cfg)``: the config holds PEFT's
    hyperparameters, the injected module names and their ranks (``rank_pattern``), and ``prune=False`` since the
    ranks are already allocated (``dataclasses.replace(cfg, prune=True, total_steps=...)`` to prune further).
    """
    path = Path(path)
    config, tensors = _read_peft(path)
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("this model already holds adapters; import into a fresh base model")

    lora: dict[str, dict[str, torch.Tensor]] = {}
    ranknums: dict[str, float] = {}
    others: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{path / WEIGHTS_NAME}: key {key!r} lacks PEFT's {PREFIX!r} prefix")
        key = key[len(PREFIX):]
        if key.endswith(".ranknum") or ".ranknum." in key:  # written by old PEFT versions
            ranknums[key.split(".ranknum")[0]] = float(t.reshape(-1)[0])
            continue
        m = _ADAPTER_KEY.match(key)
        if m:
            lora.setdefault(m["module"], {})[m["param"]] = t
        elif "lora_" in key:
            raise ValueError(f"{path / WEIGHTS_NAME}: {key!r} is not an AdaLoRA linear adapter tensor "
                             "(embedding / conv adapters are not supported)")
        else:
            others[key] = t
    if not lora:
        raise ValueError(f"{path / WEIGHTS_NAME} holds no AdaLoRA tensors")

    init_r = int(config.get("init_r", 12))
    alpha = float(config.get("lora_alpha", 8))
    patterns = {k.removesuffix(".default"): v for k, v in (config.get("rank_pattern") or {}).items()}
    module_order = [n for n, _ in model.named_modules()]
    missing = sorted(set(lora) - set(module_order))
    if missing:
        raise ValueError(f"{path}: adapted modules {missing[:3]} do not exist in {type(model).__name__}; "
                         "import into the same base model architecture")
    names = [n for n in module_order if n in lora]
    ranks: dict[str, int] = {}
    for n in names:
        parts = lora[n]
        if set(parts) != {"lora_A", "lora_B", "lora_E"}:
            raise ValueError(f"{path}: module {n!r} lacks {sorted({'lora_A', 'lora_B', 'lora_E'} - set(parts))}")
        mask = patterns.get(f"{n}.lora_E")
        k = parts["lora_A"].shape[0]
        if mask is not None and k == len(mask) != sum(mask):  # full-size tensors with a pattern: slice like PEFT
            idx = torch.tensor([i for i, b in enumerate(mask) if b], dtype=torch.long)
            parts["lora_A"], parts["lora_E"] = parts["lora_A"][idx], parts["lora_E"][idx]
            parts["lora_B"] = parts["lora_B"][:, idx]
            k = int(idx.numel())
        elif mask is not None and k != sum(mask):
            raise ValueError(f"{path}: {n}.lora_A has {k} rows but rank_pattern keeps {sum(mask)}")
        if parts["lora_E"].shape != (k, 1) or parts["lora_B"].shape[1] != k:
            raise ValueError(f"{path}: {n}: inconsistent shapes A {tuple(parts['lora_A'].shape)}, "
                             f"E {tuple(parts['lora_E'].shape)}, B {tuple(parts['lora_B'].shape)}")
        ranks[n] = k

    # modules_to_save: the owners of the non-adapter tensors, by exact name
    state_keys = set(model.state_dict())
    unknown = sorted(set(others) - state_keys)
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:3]} have no place in {type(model).__name__}")
    owners = list(dict.fromkeys(k.rpartition(".")[0] for k in others))

    total = config.get("total_step")
    target_r = max(1, min(int(config.get("target_r", 8)), init_r))
    cfg = AdaLoRAConfig(
        init_r=max([init_r, *ranks.values()]), target_r=target_r, lora_alpha=alpha,
        lora_dropout=float(config.get("lora_dropout", 0.0)), target_modules=names, modules_to_save=owners,
        tinit=int(config.get("tinit", 0)), tfinal=int(config.get("tfinal", 0)), delta_t=int(config.get("deltaT", 1)),
        beta1=float(config.get("beta1", 0.85)), beta2=float(config.get("beta2", 0.85)),
        orth_reg_weight=float(config.get("orth_reg_weight", 0.5)), total_steps=int(total) if total else None,
        prune=False, rank_pattern=ranks,
    )
    adapters = inject_adapters(model, cfg)
    with torch.no_grad():
        for n, a in adapters.items():
            a.init_r = init_r
            a.scale = peft_scale(alpha, ranknums.get(n, init_r))
            for pname in ("lora_A", "lora_B", "lora_E"):
                getattr(a, pname).copy_(lora[n][pname])
        if others:
            params = dict(model.named_parameters())
            buffers = dict(model.named_buffers())
            for k, t in others.items():
                target = params.get(k, buffers.get(k))
                if target is None or target.shape != t.shape:
                    raise ValueError(f"{path}: {k}: saved shape {tuple(t.shape)} does not fit the model")
                target.copy_(t)
    return adapters, cfg
