"""Hydra entry point: compose conf/, convert to dataclasses, call adalora_lab.loop.train.

    python experiments/train.py model=minilm task=rte method=adalora method.target_r=2
    python experiments/train.py -m method=lora,adalora method.target_r=2,4 seed=0,1 debug=fast

(`adalora-train` is the same command, installed as a console script.)
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from adalora.config import ConfigError

from .data import DataError
from .loop import TrainingFailed, train
from .schema import (
    LoggerConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    PathsConfig,
    RunConfig,
    TaskConfig,
    sweep_name_excludes,
)

cs = ConfigStore.instance()
cs.store(name="train_schema", node=RunConfig)
cs.store(group="model", name="model_schema", node=ModelConfig)
cs.store(group="task", name="task_schema", node=TaskConfig)
cs.store(group="method", name="method_schema", node=MethodConfig)
cs.store(group="optim", name="optim_schema", node=OptimConfig)
cs.store(group="logger", name="logger_schema", node=LoggerConfig)
cs.store(group="paths", name="paths_schema", node=PathsConfig)


def to_dataclass(cfg: DictConfig) -> RunConfig:
    """The composed config as plain dataclasses (what the library takes); ``???`` fields are an error."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (the config leaves it as ???). "
                          f"Fix: add e.g. {missing[0]}=... to the command line")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))


class RunFailed(CompactHydraException):
    """A sweep job's error: Hydra reports it in one line and goes on with the other jobs."""


# Errors that the user can act on: the message names the field or the file and the fix.
USER_ERRORS = (ConfigError, DataError, FloatingPointError, FileNotFoundError, TrainingFailed)

# The Hydra configs of the checkout this package is installed from (editable install); ADALORA_CONF points
# elsewhere, e.g. at a copy of conf/ with a lab's own presets.
CONF_DIR = os.environ.get("ADALORA_CONF", str(Path(__file__).resolve().parents[2] / "conf"))

_UID = f"{os.getpid()}{secrets.token_hex(2)}"  # one per process: runs started in the same second get their own folder
OmegaConf.register_new_resolver("adalora_uid", lambda: _UID, replace=True)
OmegaConf.register_new_resolver("adalora_name_excludes", sweep_name_excludes, replace=True)


def _threads_for_launcher(run_cfg: RunConfig) -> None:
    """Parallel jobs share the cores: unless ``threads`` is set, each job takes cores // jobs threads."""
    if run_cfg.threads is not None or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs")
    if isinstance(n_jobs, int) and n_jobs != 1:
        jobs = os.cpu_count() if n_jobs < 0 else n_jobs
        run_cfg.threads = max(1, (os.cpu_count() or 1) // max(1, jobs))


def _say(message: str, multirun: bool) -> None:
    print(f"adalora: error: {message}", file=sys.stderr, flush=True)
    if multirun:  # summary.json says why; the other jobs go on
        raise RunFailed(message) from None
    sys.exit(1)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    full = bool(cfg.get("traceback")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        run_cfg = to_dataclass(cfg)
        _threads_for_launcher(run_cfg)
        summary = train(run_cfg, run_dir)
    except USER_ERRORS as e:
        if full:
            raise
        _say(str(e), multirun)
    except OSError as e:  # a full disk, a folder made read-only mid-run, ...
        if full:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _say(f"{e.strerror or e}{where}. Fix: free space or make the run folder writable, then rerun the same "
             "command: the run resumes from its last checkpoint", multirun)
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line, and the way to the trace
        if full:
            raise
        _say(f"internal error {type(e).__name__}: {e}. Rerun with traceback=true for the full trace, and please "
             "report it", multirun)
    value = summary.get("final", {}).get(summary["main_metric"])
    return float(value) if value is not None else None  # for sweepers that optimise (optuna)


def run() -> None:
    """Console-script entry point (``adalora-train``) and ``python experiments/train.py``."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        main()
    except ValueError as e:  # Hydra's own command-line checks (e.g. -m with --cfg), before any run starts
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"adalora: error: {e}. Fix the command line (python experiments/train.py --help)", file=sys.stderr)
        sys.exit(2)
