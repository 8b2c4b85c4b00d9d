"""Publish a sweep's small files under short canonical paths, with an index (no weights, no checkpoints).

    python experiments/collect_results.py SWEEP_DIR DEST_DIR [--figure-of RUN_SUBPATH]

Every finished run folder under SWEEP_DIR (completed, or failed with its reason: a diverged run is a result
of the sweep too, and the summary lists it) is copied to ``DEST_DIR/runs/<task>/<method>_r<r>[_<key>-<value>...]/
seed<s>/`` with its small files (config.yaml, summary.json, metrics.jsonl, rank_pattern.json,
rank_history.jsonl, planted_ranks.json, samples.jsonl) and ``command.txt``: the ``train.py`` command that reruns
it, from the overrides Hydra recorded (a sweep's launcher and folder dropped, everything else kept, ``threads``
included, since the thread count changes the float sums). The ``<key>-<value>`` parts name the result-affecting
fields that vary between runs of one task, method and budget besides the seed (``optim.lr-0.003``), so the path
says what the run was and holds no ``=`` or ``,``. Two runs with the same result-affecting config are one run
(a completed one before a failed one, else the first; the other is reported). ``DEST_DIR/index.csv`` lists
every published run: its path, status, task, method, budget, seed, final and best main metric and the command.
Runs still running or cut off (no final status) are reported and skipped. Rerunning adds new runs and refreshes
the index; when a new run makes another field vary (a longer ``epochs``), the cells' names grow by it, and each run
already published under its old name moves to the new one (the same config: reported as renamed), so that no run
is published twice. ``--figure-of`` also copies that run's figures/rank_history.png beside the index.

``--restore`` goes the other way: every published run of DEST_DIR goes back into SWEEP_DIR, at the folder Hydra's
sweep gives its command (``<task>/<method>_r<r>/<override_dirname>/seed<s>``, from its command.txt), so that the
tuning protocol (experiments/glue_converged.py) on a fresh clone counts the published runs as done and runs only
what is missing. A folder already there is never overwritten; it is reported. Restored runs carry no checkpoint,
so a plain ``train.py`` into the same folder would train again; the protocol never starts a finished point.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from .rundir import COMMAND, CONFIG, HYDRA_OVERRIDES, INNER_DIRS, SMALL_FILES, SUMMARY, read_json
from .schema import result_config, sweep_name_excludes

__all__ = ["canonical_name", "collect", "main", "rerun_command", "restore", "sweep_subdir"]

_PATH_FIELDS = ("task.name", "method.name", "method.target_r", "seed")
INDEX = "index.csv"
RENAMED = "renamed "  # a note of collect(), not a skipped run: a published run moved to its new cell name


def _result_config(run: Path) -> dict:
    """The run's result-affecting fields, flattened (``optim.lr`` -> value); see :func:`result_config`."""
    return result_config(yaml.safe_load((run / CONFIG).read_text()) or {})


def _digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _published(dest: Path) -> dict[str, Path]:
    """{config digest: folder} of the runs already published under ``dest/runs``."""
    out = {}
    for run in _runs(dest / "runs") if (dest / "runs").is_dir() else []:
        try:
            out[_digest(_result_config(run))] = run
        except (OSError, yaml.YAMLError):
            continue
    return out


def _short(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def canonical_name(cfg: dict, varied: list[str], unset: bool = False) -> str:
    """``<task>/<method>_r<r>[_<key>-<value>...]/seed<s>`` for a flattened result config. A varied key that is
    null in this run (the library default, or a field of another method) stays out of the name, unless
    ``unset``."""
    cell = f"{cfg['method.name']}_r{cfg['method.target_r']}"
    for key in varied:
        if cfg.get(key) is not None or unset:
            cell += f"_{key}-{_short(cfg.get(key))}"
    return f"{cfg['task.name']}/{cell}/seed{cfg['seed']}"


_SWEEP_ONLY = ("hydra/launcher=", "hydra.launcher.", "hydra.sweep.", "hydra.sweeper.")


def rerun_command(run: Path) -> str | None:
    """``python experiments/train.py <overrides>`` from the run's ``.hydra/overrides.yaml``; for an already
    published run (no ``.hydra``), the ``command.txt`` it carries; else None. The sweep's launcher and folder
    settings are dropped: the rerun is one run, in a folder of its own."""
    try:
        overrides = yaml.safe_load((run / HYDRA_OVERRIDES).read_text())
    except (OSError, yaml.YAMLError):
        published = run / COMMAND
        return (published.read_text().strip() or None) if published.is_file() else None
    if not isinstance(overrides, list):
        return None
    kept = [str(o) for o in overrides if not str(o).startswith(_SWEEP_ONLY)]
    return " ".join(["python", "experiments/train.py", *(shlex.quote(o) for o in kept)])


def _runs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.rglob(SUMMARY)
                  if not set(p.parent.relative_to(sweep_dir).parts) & set(INNER_DIRS))


def collect(sweep_dir: Path, dest: Path) -> tuple[list[Path], list[str]]:
    """(published run folders, skipped runs with the reason)."""
    skipped, good = [], []
    for run in _runs(sweep_dir):
        status = (read_json(run / SUMMARY) or {}).get("status")
        if status not in ("completed", "failed") or not (run / CONFIG).is_file():
            skipped.append(f"{run.relative_to(sweep_dir)}: status {status}")
            continue
        good.append((status != "completed", run, _result_config(run)))
    good = [(run, cfg) for _, run, cfg in sorted(good, key=lambda g: g[0])]  # of two same configs, the completed
    keys = sorted({k for _, c in good for k in c} - set(_PATH_FIELDS))
    groups: dict[tuple, list[dict]] = {}  # a field that varies within one (task, method, budget) names the cell
    for _, c in good:
        groups.setdefault((c.get("task.name"), c.get("method.name"), c.get("method.target_r")), []).append(c)
    varied = [k for k in keys if any(len({json.dumps(c.get(k), sort_keys=True, default=str) for c in g}) > 1
                                     for g in groups.values())]
    seen: dict[str, Path] = {}
    taken: dict[str, str] = {}  # published name -> config digest
    before = _published(dest)
    copied = []
    for run, cfg in good:
        digest = _digest(cfg)
        if digest in seen:
            skipped.append(f"{run.relative_to(sweep_dir)}: the same config as {seen[digest].relative_to(sweep_dir)}")
            continue
        seen[digest] = run
        name = canonical_name(cfg, varied)
        if taken.setdefault(name, digest) != digest:  # null and an explicit default: spell every key out
            name = canonical_name(cfg, varied, unset=True)
            taken[name] = digest
        target = dest / "runs" / name
        target.mkdir(parents=True, exist_ok=True)
        for name in SMALL_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, target / name)
        command = rerun_command(run)
        if command is not None:
            (target / COMMAND).write_text(command + "\n")
        copied.append(target)
        old = before.get(digest)
        if old is not None and old.resolve() != target.resolve():  # a key that now varies renamed the cell
            shutil.rmtree(old)
            skipped.append(f"{RENAMED}{old.relative_to(dest)} -> {target.relative_to(dest)} (the same run)")
            _remove_empty_parents(old.parent, dest / "runs")
    write_index(dest)
    return copied, skipped


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def sweep_subdir(command: str, cfg: dict) -> Path:
    """The folder a ``train.py -m`` sweep gives the run of ``command`` (conf/train.yaml's ``hydra.sweep.subdir``:
    ``<task>/<method>_r<r>/<override_dirname>/seed<s>``). ``override_dirname`` is Hydra's: the overrides whose key
    is not excluded (:func:`sweep_name_excludes`), sorted, joined by ``_``, with ``=`` as ``-``; ``cfg`` is the
    run's saved config (task, method, budget and seed)."""
    excluded = set(sweep_name_excludes())
    words = shlex.split(command)
    overrides = words[words.index("experiments/train.py") + 1:] if "experiments/train.py" in words else words
    kept = sorted(o for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+~") not in excluded)
    name = "_".join(kept).replace("=", "-")
    cell = Path(cfg["task"]["name"]) / f"{cfg['method']['name']}_r{cfg['method']['target_r']}"
    return (cell / name if name else cell) / f"seed{cfg['seed']}"


def restore(dest: Path, sweep_dir: Path) -> tuple[list[Path], list[str]]:
    """Copy ``dest``'s published runs back into ``sweep_dir`` at their sweep folders (module docstring):
    (restored run folders, skipped runs with the reason)."""
    restored, skipped = [], []
    for run in _runs(dest / "runs") if (dest / "runs").is_dir() else []:
        rel = run.relative_to(dest)
        command = rerun_command(run)  # a published run's command.txt
        if not command or not (run / CONFIG).is_file():
            skipped.append(f"{rel}: no {COMMAND} or {CONFIG}, so its sweep folder is unknown")
            continue
        target = sweep_dir / sweep_subdir(command, yaml.safe_load((run / CONFIG).read_text()))
        if target.exists():
            skipped.append(f"{rel}: {target} already exists (left as it is)")
            continue
        shutil.copytree(run, target)
        restored.append(target)
    return restored, skipped


def write_index(dest: Path) -> Path:
    """``index.csv`` over every run published under ``dest/runs`` (also earlier ones)."""
    rows = []
    for run in _runs(dest / "runs") if (dest / "runs").is_dir() else []:
        s = read_json(run / SUMMARY) or {}
        metric = s.get("main_metric")
        rows.append({"path": str(run.relative_to(dest)), "status": s.get("status"), "task": s.get("task"),
                     "method": s.get("method"),
                     "target_r": s.get("target_r"), "seed": s.get("seed"), "main_metric": metric,
                     "final": (s.get("final") or {}).get(metric), "best": (s.get("best") or {}).get(metric),
                     "best_step": (s.get("best") or {}).get("step"), "total_steps": s.get("total_steps"),
                     "command": (run / COMMAND).read_text().strip() if (run / COMMAND).is_file() else ""})
    path = dest / INDEX
    dest.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "status", "task", "method", "target_r", "seed", "main_metric",
                                               "final", "best", "best_step", "total_steps", "command"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("dest_dir", type=Path)
    parser.add_argument("--figure-of", default=None, help="a run folder, relative to SWEEP_DIR, whose rank "
                        "history figure is copied beside the index")
    parser.add_argument("--restore", action="store_true", help="the other way: copy DEST_DIR's published runs "
                        "back into SWEEP_DIR at their sweep folders, so that the tuning protocol reuses them")
    args = parser.parse_args(argv)
    if args.restore:
        if not (args.dest_dir / "runs").is_dir():
            print(f"collect_results.py: error: {args.dest_dir / 'runs'} is not a folder; --restore takes the "
                  "sweep folder first and the published results folder second", file=sys.stderr)
            return 2
        restored, skipped = restore(args.dest_dir, args.sweep_dir)
        return _report(f"restored {len(restored)} run folders under {args.sweep_dir}", skipped)
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
        s = read_json(run / SUMMARY) or {}
        name = f"rank_history_{s.get('task')}_{s.get('method')}_r{s.get('target_r')}_seed{s.get('seed')}.png"
        shutil.copy2(fig, args.dest_dir / name)
    return _report(f"published {len(copied)} run folders under {args.dest_dir / 'runs'} (index: "
                   f"{args.dest_dir / INDEX})", skipped)


def _report(done: str, skipped: list[str]) -> int:
    renamed = [line for line in skipped if line.startswith(RENAMED)]
    skipped = [line for line in skipped if not line.startswith(RENAMED)]
    print(f"{done}; skipped {len(skipped)}" + (f"; renamed {len(renamed)}" if renamed else ""))
    for line in skipped:
        print(f"  skipped {line}")
    for line in renamed:
        print(f"  {line}")
    return 0
