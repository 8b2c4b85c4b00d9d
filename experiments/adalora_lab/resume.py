"""Training checkpoints for exact resume: written atomically, loaded with ``weights_only=True``.

A checkpoint holds the trainable tensors, the optimizer, the allocator, the RNG states and the data
position, so a run killed at any point and restarted continues as if nothing happened.
"""

from __future__ import annotations

import json
import os
import random
import signal
import warnings
from pathlib import Path

import numpy as np
import torch

from adalora.checkpoint import atomic_write

FORMAT = "adalora-train-checkpoint"
CKPT_DIR = "checkpoints"


FAULT_ENV = "ADALORA_FAULT_INJECT"  # tests only: "kill@step:N" or "kill@checkpoint:N" ("raise@..." raises)


def fault_point(point: str, step: int) -> None:
    """Die here if the environment asks for it; lets tests kill a run at an exact place."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, _, where = spec.partition("@")
    if where == f"{point}:{step}":
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise KeyboardInterrupt(f"fault injected at {where}")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}.pt"


def save_checkpoint(run_dir: Path, state: dict, keep: int) -> Path:
    """Write ``state`` for its step atomically (temp file, fsync, rename) and keep the newest ``keep``."""
    path = checkpoint_path(run_dir, state["step"])

    def write(tmp: str) -> None:
        torch.save({"format": FORMAT, **state}, tmp)
        fault_point("checkpoint", state["step"])  # tests: die with the temp file written, not yet renamed

    atomic_write(path, write)
    olds = sorted(path.parent.glob("step_*.pt"))
    for old in olds[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an adalora training checkpoint")
    return state


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint of a run folder (a torn or corrupt file is skipped with a warning)."""
    for path in sorted((Path(run_dir) / CKPT_DIR).glob("step_*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
    return None


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the lines logged after ``max_step`` (they are re-done by the resumed run)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= max_step:
                keep.append(line)
        except (ValueError, KeyError):  # a line torn by the kill
            continue
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(x + "\n" for x in keep)))
