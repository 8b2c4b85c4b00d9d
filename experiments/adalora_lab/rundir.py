"""The run folder: its file names, its lock, and the ``summary.json`` schema. The one owner of that layout.

Every writer (the loop, the run log, checkpoints) and every reader (summaries, publishing, the notebook, the
tests) takes the names from here.

    <run>/config.yaml          the resolved run config, plus ``inputs``: what the run read, by content
    <run>/summary.json         ``Summary``: status, metrics, budgets, parameters, wall time, error
    <run>/metrics.jsonl        one JSON line per train log / eval (``split``: train | eval)
    <run>/rank_history.jsonl   {"step", "budget", "ranks": {module: rank}} at every change of the pattern
    <run>/rank_pattern.json    {module: final kept rank}
    <run>/planted_ranks.json   {module: planted rank} (planted task only)
    <run>/samples.jsonl        generated outputs beside the references (causal LM only)
    <run>/adapter/             the adapter, in PEFT's folder format
    <run>/model.pt             full fine-tuning only: the trained state dict
    <run>/figures/             per-run figures
    <run>/checkpoints/         resumable training checkpoints (the newest ``keep_checkpoints``)
    <run>/.lock                held (flock) while a run writes to the folder
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adalora.checkpoint import atomic_write
from adalora.config import ConfigError

__all__ = ["RunDir", "Summary", "STATUSES", "SMALL_FILES", "RUN_MARKERS", "json_safe", "read_json", "write_json"]

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
RANK_HISTORY = "rank_history.jsonl"
RANK_PATTERN = "rank_pattern.json"
PLANTED = "planted_ranks.json"
SAMPLES = "samples.jsonl"
COMMAND = "command.txt"  # published runs: the train.py command that reruns this run (from .hydra/overrides.yaml)
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"  # written by Hydra: the overrides of this run
ADAPTER = "adapter"
MODEL = "model.pt"
FIGURES = "figures"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"

# What a published result keeps of a run: small text files, never weights or checkpoints.
SMALL_FILES = (CONFIG, SUMMARY, METRICS, RANK_PATTERN, RANK_HISTORY, PLANTED, SAMPLES, COMMAND)
# A folder holding any of these is a run folder (folder names are never relied on).
RUN_MARKERS = (SUMMARY, CONFIG, METRICS)
# Folders inside a run folder that are never run folders themselves.
INNER_DIRS = (FIGURES, ADAPTER, CHECKPOINTS)

STATUSES = ("running", "completed", "failed")


def json_safe(v):
    """JSON has no NaN / inf: they are written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def write_json(path: Path, obj) -> None:
    """Atomically (temp file, fsync, rename); NaN and inf become null."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(json_safe(obj), indent=2, default=str)))


def read_json(path: Path):
    """The parsed JSON file, or None if it is missing or unreadable (a torn or foreign file)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Summary:
    """``summary.json``: what a run reports. ``status`` is running, completed or failed (then ``error`` says why)."""

    status: str
    task: str
    method: str
    target_r: int | None
    seed: int
    main_metric: str | None = None
    higher_is_better: bool = True
    trainable_params: int | None = None
    total_steps: int | None = None
    run_dir: str | None = None
    final: dict = field(default_factory=dict)  # the last evaluation (+ rank_recovery on the planted task)
    best: dict = field(default_factory=dict)  # the best evaluation by the main metric, with its "step"
    init_budget: int | None = None  # kept rank-one components at the start, over all modules
    final_budget: int | None = None  # ... and at the end
    adapter_params: int | None = None  # adapter parameters at the final ranks
    skipped_steps: int = 0  # steps skipped for a non-finite loss (skip_nonfinite=true)
    wall_time_s: float | None = None  # summed over the pieces of a resumed run
    error: str | None = None
    failed_step: int | None = None
    inputs: dict = field(default_factory=dict)  # what the run read, by content (see Workload.inputs)
    environments: list = field(default_factory=list)  # what it computed on, from which step (RunState.environments)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RunDir:
    """One run folder: paths by name, the lock, and the summary."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    config = property(lambda self: self.path / CONFIG)
    summary = property(lambda self: self.path / SUMMARY)
    metrics = property(lambda self: self.path / METRICS)
    rank_history = property(lambda self: self.path / RANK_HISTORY)
    rank_pattern = property(lambda self: self.path / RANK_PATTERN)
    planted = property(lambda self: self.path / PLANTED)
    samples = property(lambda self: self.path / SAMPLES)
    adapter = property(lambda self: self.path / ADAPTER)
    model = property(lambda self: self.path / MODEL)
    figures = property(lambda self: self.path / FIGURES)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)

    @staticmethod
    def is_run_dir(path: Path) -> bool:
        return any((Path(path) / m).is_file() for m in RUN_MARKERS)

    # ------------------------------------------------------------------ creation and the lock
    def create(self) -> None:
        """Make the folder (checkpoints/ comes with the first checkpoint); say clearly when a run cannot write."""
        for d in (self.path, self.checkpoints, self.adapter, self.figures):
            if d.exists() and not d.is_dir():
                raise ConfigError(f"{d} is a file, not a folder: the run needs it as a folder. Fix: move the file "
                                  "away, or choose another run folder (hydra.run.dir=...)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run folder {self.path} ({e.strerror}). Fix: choose a writable "
                              "place (hydra.run.dir=... or hydra.sweep.dir=...)") from None
        if not all(os.access(d, os.W_OK | os.X_OK) for d in (self.path, self.checkpoints) if d.is_dir()):
            raise ConfigError(f"the run folder {self.path} is not writable. Fix: make it writable, or choose another "
                              "(hydra.run.dir=...)")

    def acquire(self) -> None:
        """Hold an exclusive lock on the folder until ``release``: a second run into it stops at once."""
        path = self.path / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot open {path} ({e.strerror}). Fix: make the run folder writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"the run folder {self.path} is in use by another run ({holder}). Fix: wait for "
                                  "it to end, or give this run its own folder (hydra.run.dir=...)") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        self._lock_fd = fd
        self._remove_orphans()

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_orphans(self) -> None:
        """Temp files of writes that a kill interrupted: nobody else writes here while we hold the lock."""
        for d in (self.path, self.checkpoints, self.adapter):
            if d.is_dir():
                for tmp in d.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ summary
    def read_summary(self) -> dict | None:
        s = read_json(self.summary)
        return s if isinstance(s, dict) else None

    def write_summary(self, summary: Summary | dict[str, Any]) -> None:
        write_json(self.summary, summary.to_dict() if isinstance(summary, Summary) else summary)
