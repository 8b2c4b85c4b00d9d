"""Hydra entry point: compose conf/, convert to dataclasses, call adalora_lab.loop.train.

    python experiments/train.py model=minilm task=rte method=adalora method.target_r=2
    python experiments/train.py -m method=lora,adalora method.target_r=2,4 seed=0,1 debug=fast

(`adalora-train` is the same command, installed as a console script.)
"""

from __future__ import annotations

import os
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
from .loop import train
from .schema import (
    LoggerConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    PathsConfig,
    RunConfig,
    TaskConfig,
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
    """A sweep job's user error: Hydra reports it in one line and goes on with the other jobs."""


USER_ERRORS = (ConfigError, DataError, FloatingPointError, FileNotFoundError)


# The Hydra configs of the checkout this package is installed from (editable install); ADALORA_CONF points
# elsewhere, e.g. at a copy of conf/ with a lab's own presets.
CONF_DIR = os.environ.get("ADALORA_CONF", str(Path(__file__).resolve().parents[2] / "conf"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_cfg = to_dataclass(cfg)
        summary = train(run_cfg, run_dir)
    except USER_ERRORS as e:
        if cfg.get("traceback") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"adalora: error: {e}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # summary.json says why; the other jobs go on
            raise RunFailed(str(e)) from None
        sys.exit(1)
    value = summary.get("final", {}).get(summary["main_metric"])
    return float(value) if value is not None else None  # for sweepers that optimise (optuna)


def run() -> None:
    """Console-script entry point (``adalora-train``) and ``python experiments/train.py``."""
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
