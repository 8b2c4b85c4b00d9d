"""What a run read, by content: data files, examples, model weights, tokenizer.

A finished or checkpointed run is reused or resumed only if it read the same inputs; the config alone cannot
tell (a TSV edited in place, another model behind the same folder name).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "model_identity", "inputs_diff"]

_WHOLE_FILE_LIMIT = 1 << 30  # larger weight files: their size and the sha256 of the first and last 16 MiB


def file_sha256(path: str | os.PathLike) -> str:
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_LIMIT:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(f.read(16 << 20))
        f.seek(size - (16 << 20))
        h.update(f.read())
    return f"{h.hexdigest()}-size{size}"


def model_identity(name_or_path: str) -> dict:
    """A local model folder: the sha256 of its config and weight files; a Hub name: the name (and, when the
    model was loaded from the local cache, its revision folder)."""
    root = Path(name_or_path).expanduser()
    if not root.is_dir():
        return {"name": str(name_or_path)}
    files = sorted(p for p in root.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf")))
    return {"files": {p.name: file_sha256(p) for p in files}}


def inputs_diff(saved: dict, current: dict) -> list[str]:
    """What changed between two ``Workload.inputs`` records (paths are not compared: folders move)."""
    out = []
    for k in sorted(set(saved) | set(current)):
        if k.endswith("_path"):
            continue
        a, b = saved.get(k), current.get(k)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                out += [f"{k}.{x}" for x in inputs_diff(a, b)]
            else:
                out.append(k)
    return out
