"""Training checkpoints for exact resume: written atomically, checksummed, loaded with ``weights_only=True``.

A checkpoint holds the run state (``RunState``: step, data position, metrics so far), the trainable tensors,
the optimizer, the allocator, the RNG states, the run config and what the run read, so a run killed at any
point and restarted continues as if nothing happened.

File layout: a header line ``adalora-train-checkpoint sha256=<64 hex>`` then the ``torch.save`` bytes; a file
whose bytes do not match its checksum (a torn write, a flipped bit) is never loaded.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import signal
import warnings
from pathlib import Path

import numpy as np
import torch

from adalora.checkpoint import atomic_write
from adalora.config import ConfigError

from .rundir import CHECKPOINTS

FORMAT = "adalora-train-checkpoint"
_HEADER = FORMAT.encode() + b" sha256="


# tests only: "<action>@<point>:<step>", points step / checkpoint / finish; actions kill (SIGKILL), raise
# (KeyboardInterrupt) and enospc (the OSError of a full disk)
FAULT_ENV = "ADALORA_FAULT_INJECT"


def fault_point(point: str, step: int, path: str | None = None) -> None:
    """Die here if the environment asks for it; lets tests kill a run at an exact place."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, _, where = spec.partition("@")
    if where == f"{point}:{step}":
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
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
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}.pt"


def save_checkpoint(run_dir: Path, payload: dict, keep: int) -> Path:
    """Write ``payload`` (with its ``state["step"]``) atomically with its checksum; keep the newest ``keep``."""
    step = payload["state"]["step"]
    path = checkpoint_path(run_dir, step)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    body = buf.getvalue()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(_HEADER + hashlib.sha256(body).hexdigest().encode() + b"\n")
            f.write(body)
        fault_point("checkpoint", step, tmp)  # tests: die with the temp file written, not yet renamed

    atomic_write(path, write)
    olds = sorted(path.parent.glob("step_*.pt"))
    for old in olds[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """The payload of a checkpoint file; ConfigError if it is not one, is torn, or fails its checksum."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    head, _, body = data.partition(b"\n")
    if not head.startswith(_HEADER):
        raise ConfigError(f"{path} is not an adalora training checkpoint (a checkpoint is "
                          f"<run>/{CHECKPOINTS}/step_<N>.pt; resume= takes one or a run folder)")
    if hashlib.sha256(body).hexdigest().encode() != head[len(_HEADER):]:
        raise ConfigError(f"{path} fails its checksum (a torn write or a corrupted file)")
    try:
        state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)  # no arbitrary unpickling
    except Exception as e:  # noqa: BLE001 - any undecodable body is the same user-facing problem
        raise ConfigError(f"{path} cannot be decoded ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("state"), dict):
        raise ConfigError(f"{path} is not an adalora training checkpoint of this version")
    return state


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest good checkpoint of a run folder (a torn, corrupt or foreign file is skipped with a warning)."""
    for path in sorted((Path(run_dir) / CHECKPOINTS).glob("step_*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path)
        except ConfigError as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
    return None


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the lines logged after ``max_step``, and those of the final write-out (they are re-done by the
    resumed run)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            if rec["step"] <= max_step and not rec.get("final"):
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by the kill
            continue
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(x + "\n" for x in keep)))
