"""Integrations with the Hugging Face ecosystem (see docs/integrations.md).

- ``hf``: ``AdaLoRACallback`` (drives an adaptive controller, ``RankAllocator``, ``SoRAGates`` or ``RankGrower``,
  from ``transformers.Trainer``) and ``AdaLoRATrainer`` (adds the method's loss term and builds the optimizer it
  needs).
- ``peft_format``: ``export_to_peft`` / ``import_from_peft``, PEFT's AdaLoRA / LoRA on-disk format.

Names are resolved lazily, so ``import adalora.integrations`` imports neither transformers' Trainer nor peft
(peft is never imported at all: the PEFT files are written and read with safetensors and json).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdaLoRACallback": "hf",
    "AdaLoRATrainer": "hf",
    "export_to_peft": "peft_format",
    "import_from_peft": "peft_format",
    "peft_scale": "peft_format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
