"""Adapter folders in Hugging Face PEFT's own format, plus a sidecar for what PEFT has no field for.

A folder written by ``save_adapter`` / ``save_pretrained``:

    adapter_config.json        PEFT's config: peft_type "ADALORA" (AdaLoRA, SoRA, IncreLoRA) or "LORA" (LoRA,
                               prune-LoRA), the exact adapted module names as target_modules, modules_to_save,
                               rank_pattern, task_type ...
    adapter_model.safetensors  PEFT's tensors "base_model.model.<module>.lora_A" ..., sliced to the kept ranks, and
                               the modules_to_save weights (e.g. the classifier); see adalora.integrations.peft_format
    adalora_config.json        {"format": "adalora-adapter", "version": 2,
                                "method": "adalora" | "lora" | "sora" | "increlora",
                                "config": our config (every field), "task_type": ..., "compacted": bool,
                                "rank_pattern": {module: kept rank}, "init_ranks": {module: init_r},
                                "scales": {module: our scale}, "peft_scale": PEFT AdaLoRA's scale or null,
                                "sha256": {"adapter_model.safetensors": hex, "adapter_config.json": hex}}

``peft.PeftModel.from_pretrained(base, folder)`` loads the first two as they are. ``load_adapter`` reads such
folders (checking both checksums and restoring our exact layers from the sidecar), folders that PEFT's
``save_pretrained`` wrote (LoRA or AdaLoRA; no sidecar, PEFT's config is used), and folders of the earlier adalora
format (version 1: our own JSON in adapter_config.json). Loading never unpickles anything.

SoRA and IncreLoRA are saved in SVD form (ΔW = B diag(g) A · scale) at the components their controller keeps, and
load back as plain ``SVDLinear`` adapters at the saved ranks with each module's saved scale: the same function, for
inference or further fixed-rank training, not a SoRA / IncreLoRA run to continue (that is the training checkpoint,
with the controller's ``state_dict()``). ``load_config`` gives the exact SoRAConfig / IncreLoRAConfig.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .adaptive import AdaptiveMethod
from .config import AdaLoRAConfig, ConfigError, IncreLoRAConfig, LoRAConfig, SoRAConfig
from .inject import _inject
from .integrations.peft_format import MethodConfig, build_peft, parse_peft, unfold
from .layers import AdapterLayer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIDECAR_NAME = "adalora_config.json"
FORMAT, VERSION = "adalora-adapter", 2
METHODS = {"lora": LoRAConfig, "adalora": AdaLoRAConfig, "sora": SoRAConfig, "increlora": IncreLoRAConfig}


class CorruptFileError(ValueError):
    """A saved file does not match the checksum recorded beside it, or cannot be parsed."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write via ``write(tmp_path)`` to a temp file in the same folder, fsync, then rename over ``path``.

    The temp file is created like ``open(path, "w")`` creates a file (mode 0o666 less the umask), so the result has
    the permissions any other file written by this process gets.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
            break
        except FileExistsError:
            continue
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------- save
def save_adapter(path: str | os.PathLike, model: nn.Module, cfg: MethodConfig,
                 allocator: AdaptiveMethod | None = None, *, task_type: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Save the adapters of ``model`` to folder ``path`` in PEFT's format (see the module docstring); returns it.

    ``cfg``: the LoRAConfig, AdaLoRAConfig, SoRAConfig or IncreLoRAConfig the adapters were built from.
    ``allocator``: the method's controller (``RankAllocator``, ``SoRAGates``, ``RankGrower``); its ``keep_masks()``
    select the saved components (``None``: all of them). ``task_type``: PEFT's (``"SEQ_CLS"``,
    ``"CAUSAL_LM"``, ...; ``None`` loads as a bare ``PeftModel``), written to both configs. Every file is written
    atomically; the sidecar, with the checksums, is written last.
    """
    peft_config, tensors, ours = build_peft(model, cfg, allocator, task_type, base_model_name_or_path)
    weights = save_safetensors(tensors, metadata={"format": "pt"})
    config_bytes = json.dumps(peft_config, indent=2).encode()
    sidecar = {
        "format": FORMAT,
        "version": VERSION,
        "method": next(m for m, c in METHODS.items() if isinstance(cfg, c)),
        "config": dataclasses.asdict(cfg),
        "task_type": task_type,
        "compacted": bool(getattr(allocator, "compacted", False)),
        **ours,
        "sha256": {WEIGHTS_NAME: _sha256(weights), CONFIG_NAME: _sha256(config_bytes)},
    }
    path = Path(path)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(weights))
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_bytes(config_bytes))
    atomic_write(path / SIDECAR_NAME, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2)))
    return path


def save_pretrained(model: nn.Module, path: str | os.PathLike, cfg: MethodConfig,
                    allocator: AdaptiveMethod | None = None, *, task_type: str | None = None,
                    base_model_name_or_path: str | None = None) -> Path:
    """``save_adapter`` with the model first, as in PEFT's ``model.save_pretrained(path)``."""
    return save_adapter(path, model, cfg, allocator, task_type=task_type,
                        base_model_name_or_path=base_model_name_or_path)


# ---------------------------------------------------------------------------------------------------- read
def _read_json(path: Path, data: bytes | None = None) -> dict:
    try:
        return json.loads(path.read_bytes() if data is None else data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is corrupt: not valid JSON ({e})") from e


def _verify(path: Path, data: bytes, sidecar: dict) -> None:
    want = (sidecar.get("sha256") or {}).get(path.name)
    if want is not None and _sha256(data) != want:
        raise CorruptFileError(f"{path} is corrupt: its sha256 does not match the one in {SIDECAR_NAME} "
                               f"(damaged or changed after saving); save the adapter again")


def _our_config(method: str, fields: dict, where: Path) -> MethodConfig:
    cls = METHODS.get(method)
    if cls is None:
        raise ValueError(f"{where}: method={method!r} is not one of {sorted(METHODS)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kw = {k: tuple(v) if isinstance(v, list) and isinstance(known[k].default, tuple) else v  # JSON has no tuples
          for k, v in fields.items() if k in known}
    with warnings.catch_warnings():  # e.g. "nothing to prune": it warned when the run was configured
        warnings.simplefilter("ignore")
        return cls(**kw)


def _rebuild_config(saved, ranks: dict[str, int], owners: list[str]):
    """The config that injects exactly the saved layers: their names, their saved ranks, no further pruning."""
    kw = dict(target_modules=list(ranks), rank_pattern=dict(ranks), modules_to_save=owners)
    if isinstance(saved, AdaLoRAConfig):
        kw["prune"] = False
    return dataclasses.replace(saved, **kw)


def _read_v1(path: Path, meta: dict) -> dict:
    """The earlier adalora format: our JSON in adapter_config.json, tensors named "<module>.lora_A" ..."""
    saved = _our_config(meta.get("method"), meta.get("config") or {}, path)
    tensors = load_safetensors((path / WEIGHTS_NAME).read_bytes())
    svd = isinstance(saved, AdaLoRAConfig) and saved.adapter == "svd"
    params = ("lora_A", "lora_E", "lora_B") if svd else ("lora_A", "lora_B")
    ranks = {n: int(r) for n, r in meta["rank_pattern"].items()}
    modules = {}
    for n in ranks:
        missing = [p for p in params if f"{n}.{p}" not in tensors]
        if missing:
            raise ValueError(f"{path / WEIGHTS_NAME} lacks {n}.{missing[0]}: the file does not match its config")
        modules[n] = {**{p: tensors[f"{n}.{p}"] for p in params},
                      "scale": float(meta["scales"][n]), "init_r": int(meta["init_ranks"][n])}
    names = {f"{n}.{p}" for n in ranks for p in params}
    others = {k: t for k, t in tensors.items() if k not in names}
    owners = list(dict.fromkeys(k.rpartition(".")[0] for k in others))
    return {"svd": svd, "modules": modules, "others": others, "saved_cfg": saved,
            "cfg": _rebuild_config(saved, ranks, owners)}


def _read(path: str | os.PathLike) -> dict:
    """Read and check a folder: ``{"svd", "modules", "others", "cfg" (to inject with), "saved_cfg"}``."""
    path = Path(path)
    cfg_path, w_path, side_path = path / CONFIG_NAME, path / WEIGHTS_NAME, path / SIDECAR_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: point to a folder written by save_adapter() "
                                "or by PEFT's save_pretrained()")
    sidecar = _read_json(side_path) if side_path.exists() else None
    config_bytes = cfg_path.read_bytes()
    if sidecar is not None:
        if sidecar.get("format") != FORMAT or sidecar.get("version") != VERSION:
            raise ValueError(f"{side_path}: format {sidecar.get('format')!r} version {sidecar.get('version')!r} is "
                             f"not {FORMAT!r} version {VERSION}; it was written by another program or version")
        _verify(cfg_path, config_bytes, sidecar)
    config = _read_json(cfg_path, config_bytes)
    if sidecar is None and config.get("format") == FORMAT:
        return _read_v1(path, config)
    if not w_path.exists():
        extra = " (found adapter_model.bin: re-save it with safe_serialization=True)" \
            if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{w_path} not found{extra}")
    data = w_path.read_bytes()
    if sidecar is not None:
        _verify(w_path, data, sidecar)
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CorruptFileError(f"{w_path} is corrupt: not a readable safetensors file ({e})") from e
    parsed = parse_peft(config, tensors, path)
    if sidecar is None:
        return {**parsed, "saved_cfg": parsed["cfg"]}

    saved = _our_config(sidecar["method"], sidecar["config"], side_path)
    ranks = {n: int(r) for n, r in sidecar["rank_pattern"].items()}
    modules = parsed["modules"]
    stray = [n for n in modules if n not in ranks] + [n for n, r in ranks.items() if r and n not in modules]
    if stray:
        raise ValueError(f"{path}: modules {stray[:3]} are in one of {WEIGHTS_NAME} and {SIDECAR_NAME} only; "
                         "the files do not belong together")
    for n in ranks:
        m = modules.setdefault(n, {})  # a LoRA module of rank 0 has no tensors in PEFT's file
        m["scale"], m["init_r"] = float(sidecar["scales"][n]), int(sidecar["init_ranks"][n])
        if "lora_E" in m and sidecar.get("peft_scale"):
            m["lora_E"] = unfold(m["lora_E"], m["scale"] / float(sidecar["peft_scale"]))
    owners = parsed["cfg"].modules_to_save
    # SoRA / IncreLoRA load as the SVD layers of PEFT's AdaLoRA config (their function; scales from the sidecar)
    base_cfg = saved if isinstance(saved, (LoRAConfig, AdaLoRAConfig)) else parsed["cfg"]
    return {**parsed, "modules": {n: modules[n] for n in ranks}, "saved_cfg": saved,
            "cfg": _rebuild_config(base_cfg, ranks, owners)}


# ---------------------------------------------------------------------------------------------------- load
def load_config(path: str | os.PathLike) -> MethodConfig:
    """The config a folder was saved with (every field, from the sidecar: a LoRAConfig, AdaLoRAConfig, SoRAConfig or
    IncreLoRAConfig); for a folder PEFT saved, the config built from PEFT's (module names, saved ranks as
    rank_pattern, ``prune=False``). The files are checked."""
    return _read(path)["saved_cfg"]


def _load(model: nn.Module, path: str | os.PathLike) -> tuple[dict[str, AdapterLayer], LoRAConfig | AdaLoRAConfig]:
    """``load_adapter`` returning ``(adapters, the config it injected with)``."""
    parsed = _read(path)
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ConfigError("this model already holds adapters; load into a fresh base model")
    names = {n for n, _ in model.named_modules()}
    missing = [n for n in parsed["modules"] if n not in names]
    if missing:
        raise ValueError(f"{path}: adapted modules {missing[:3]} do not exist in {type(model).__name__}; "
                         "load into the same base model architecture")
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = sorted(set(parsed["others"]) - set(state))
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:3]} have no place in {type(model).__name__}; "
                         "load into the same base model architecture")
    adapters = _inject(model, parsed["cfg"], check_ranks=False)
    with torch.no_grad():
        for n, a in adapters.items():
            m = parsed["modules"][n]
            a.scale, a.init_r = m["scale"], m["init_r"]
            for pname in ("lora_A", "lora_E", "lora_B"):
                if pname in m:
                    _copy(getattr(a, pname), m[pname], f"{path}: {n}.{pname}")
        for k, t in parsed["others"].items():
            _copy(state[k], t, f"{path}: {k}")
    return adapters, parsed["cfg"]


def _copy(target: torch.Tensor, t: torch.Tensor, what: str) -> None:
    if target.shape != t.shape:
        raise ValueError(f"{what}: saved shape {tuple(t.shape)} != model's {tuple(target.shape)}; "
                         "load into the same base model architecture")
    target.copy_(t)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, AdapterLayer]:
    """Inject adapters of the saved (kept) ranks into a fresh base ``model`` and load the weights.

    Reads folders written by ``save_adapter`` (checksums verified: a damaged file raises ``CorruptFileError``),
    folders PEFT's ``save_pretrained`` wrote (LoRA or AdaLoRA) and the earlier adalora format. Adapters and
    modules_to_save (e.g. the classifier) are loaded trainable; returns ``{module name: adapter}``. A SoRA or
    IncreLoRA folder gives ``SVDLinear`` adapters at the saved ranks and scales (the saved model's function).
    """
    return _load(model, path)[0]


def from_pretrained(model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False) -> nn.Module:
    """``load_adapter`` as PEFT's ``PeftModel.from_pretrained(model, path)``: returns the model, frozen and in
    eval mode unless ``is_trainable=True``."""
    load_adapter(model, path)
    if not is_trainable:
        model.requires_grad_(False)
        model.eval()
    return model
