"""What a run leaves behind: metrics.jsonl, rank_history.jsonl, summary.json, and optional wandb."""

from __future__ import annotations

import json
import math
from pathlib import Path

from adalora.checkpoint import atomic_write

from .schema import LoggerConfig


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str)))


class RunLog:
    """Appends JSON lines to the run folder; mirrors metrics to wandb when asked."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config_dict: dict, resume: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        mode = "a" if resume else "w"
        self._metrics = open(self.dir / "metrics.jsonl", mode)
        self._ranks = open(self.dir / "rank_history.jsonl", mode)
        self.wandb = None
        if cfg.name == "wandb" and cfg.mode != "disabled":
            import wandb  # the library itself never needs wandb; only this sink does

            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(self.dir),
                                    config=config_dict, tags=list(cfg.tags), reinit="finish_previous",
                                    settings=wandb.Settings(silent=True))

    def log(self, record: dict) -> None:
        rec = {k: _clean(v) for k, v in record.items()}
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        if self.cfg.name == "jsonl":
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
            print(shown, flush=True)
        if self.wandb is not None:
            self.wandb.log({f"{rec.get('split', 'train')}/{k}": v for k, v in rec.items()
                            if k not in ("step", "split") and isinstance(v, (int, float))}, step=rec["step"])

    def log_ranks(self, step: int, budget: int, ranks: dict) -> None:
        self._ranks.write(json.dumps({"step": step, "budget": budget, "ranks": ranks}) + "\n")
        self._ranks.flush()

    def log_image(self, key: str, path: Path) -> None:
        if self.wandb is not None and Path(path).exists():
            import wandb

            self.wandb.log({key: wandb.Image(str(path))})

    def close(self, summary: dict | None = None) -> None:
        self._metrics.close()
        self._ranks.close()
        if self.wandb is not None:
            if summary:
                for k, v in summary.get("final", {}).items():
                    self.wandb.summary[f"final/{k}"] = v
            self.wandb.finish()
