#!/usr/bin/env python
"""Copy the small, publishable files of a sweep's run folders into a results folder (no weights, no checkpoints).

    python experiments/collect_results.py SWEEP_DIR DEST_DIR [--figure-of RUN_SUBPATH]

For every run folder under SWEEP_DIR (a folder holding summary.json) it copies, keeping the relative layout:
config.yaml (the resolved config), summary.json, metrics.jsonl, rank_pattern.json, rank_history.jsonl and
planted_ranks.json when present; and SWEEP_DIR/multirun.yaml. It never copies checkpoints/, adapter/ or
model weights, so DEST_DIR can be committed. Runs that did not complete are reported and skipped.
``--figure-of`` also copies that run's figures/rank_history.png to
DEST_DIR/rank_history_<task>_<method>_r<r>_seed<s>.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .rundir import SMALL_FILES, SUMMARY


def collect(sweep_dir: Path, dest: Path) -> tuple[list[Path], list[str]]:
    """(copied run folders, skipped runs with the reason)."""
    copied, skipped = [], []
    for summary in sorted(sweep_dir.rglob(SUMMARY)):
        run = summary.parent
        if any(part in ("checkpoints", "adapter") for part in run.relative_to(sweep_dir).parts):
            continue
        status = json.loads(summary.read_text()).get("status")
        if status != "completed":
            skipped.append(f"{run.relative_to(sweep_dir)}: status {status}")
            continue
        target = dest / run.relative_to(sweep_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in SMALL_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, target / name)
        copied.append(target)
    if (sweep_dir / "multirun.yaml").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sweep_dir / "multirun.yaml", dest / "multirun.yaml")
    return copied, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("dest_dir", type=Path)
    parser.add_argument("--figure-of", default=None, help="a run folder, relative to SWEEP_DIR, whose rank "
                        "history figure is copied beside the tables")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"collect_results.py: error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    copied, skipped = collect(args.sweep_dir, args.dest_dir)
    if args.figure_of:
        run = args.sweep_dir / args.figure_of
        fig = run / "figures" / "rank_history.png"
        if not fig.is_file():
            print(f"collect_results.py: error: {fig} does not exist", file=sys.stderr)
            return 2
        s = json.loads((run / SUMMARY).read_text())
        name = f"rank_history_{s['task']}_{s['method']}_r{s['target_r']}_seed{s['seed']}.png"
        shutil.copy2(fig, args.dest_dir / name)
    print(f"copied {len(copied)} run folders to {args.dest_dir}; skipped {len(skipped)}")
    for line in skipped:
        print(f"  skipped {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
