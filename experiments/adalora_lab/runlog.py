"""The run's logs: metrics.jsonl and rank_history.jsonl in the run folder, console lines, and optional wandb."""

from __future__ import annotations

import json
from pathlib import Path

from .rundir import RunDir, json_safe
from .schema import LoggerConfig

__all__ = ["RunLog"]


class RunLog:
    """Appends JSON lines to the run folder; mirrors metrics to wandb when asked.

    ``echo`` prints console lines (``logger=jsonl``); the loop points it at the progress bar's ``write`` so that
    lines never break the bar.
    """

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config_dict: dict, resume: bool = False):
        self.dir = RunDir(run_dir)
        self.cfg = cfg
        self.echo = print
        mode = "a" if resume else "w"
        self._metrics = open(self.dir.metrics, mode)
        self._ranks = open(self.dir.rank_history, mode)
        self.wandb = None
        if cfg.name == "wandb" and cfg.mode != "disabled":
            import wandb  # the library itself never needs wandb; only this sink does

            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(self.dir.path),
                                    config=config_dict, tags=list(cfg.tags), reinit="finish_previous",
                                    settings=wandb.Settings(silent=True))

    def log(self, record: dict) -> None:
        rec = {k: json_safe(v) for k, v in record.items()}
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        if self.cfg.name == "jsonl":
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
            self.echo(shown)
        if self.wandb is not None:
            self.wandb.log({f"{rec.get('split', 'train')}/{k}": v for k, v in rec.items()
                            if k not in ("step", "split") and isinstance(v, (int, float))}, step=rec["step"])

    def log_ranks(self, step: int, budget: int, ranks: dict, final: bool = False) -> None:
        """One rank_history line; ``final`` marks the write-out at the end (a resumed run writes it again)."""
        rec = {"step": step, "budget": budget, "ranks": ranks}
        if final:
            rec["final"] = True
        self._ranks.write(json.dumps(rec) + "\n")
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
