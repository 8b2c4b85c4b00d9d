"""Helpers shared by test modules (import them as ``from helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from adalora_lab import cli  # registers the schemas in Hydra's ConfigStore
from adalora_lab.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    """The option names of a config group (its YAML files)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_run(overrides: list[str]) -> RunConfig:
    """The run config ``experiments/train.py <overrides>`` would train, as dataclasses."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=False)
    return cli.to_dataclass(cfg)
