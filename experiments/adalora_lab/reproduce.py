"""Rerun a finished run with its recorded command and say whether it reproduces.

    python experiments/reproduce.py RUN_DIR [--out DIR] [--tol 0] [--check-only]

RUN_DIR is a published run folder (``command.txt``) or a run folder of a sweep (``.hydra/overrides.yaml``).
Before any compute, the command is composed in this checkout and its result-affecting fields are compared with
the run's ``config.yaml``: when one differs (a default changed since the run), it is named and nothing runs,
since the rerun would be another experiment. The rerun then trains into a folder of its own (``--out``, default
``outputs/reproduce/<task>/<cell>/seed<s>_<time>``) and every logged number of the two runs is compared, step
by step: the dev metrics at each evaluation, the training losses, the budget and the final rank pattern. The
verdict: identical, within ``--tol`` (on the main dev metric), or not, with the largest differences. The thread
count is part of the command (``threads=1``), since it changes the order of float sums.

Bit-identical reruns hold within one environment (the library versions and the CPU, which summary.json records
under ``environments``). Elsewhere a rerun parts from the record in the last bits of the first logged loss, and
training carries that to another end point; for a rerun that is not identical the verdict says where the two
runs part, how the environments differ, and how the final metric's difference compares with the standard
deviation over the cell's seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .environment import environment_diff
from .publish import rerun_command
from .rundir import CONFIG, METRICS, RANK_PATTERN, SUMMARY, read_json
from .schema import config_diff, flatten

__all__ = ["ReproduceError", "compare_runs", "config_drift", "explain", "main", "parse_command", "reproduce",
           "seed_spread"]

REPO = Path(__file__).resolve().parents[2]
_TRAIN = "experiments/train.py"
_RUN_ONLY = ("hydra.run.dir=", "-m", "--multirun")  # the rerun is one run, in the folder given here
# Where the data lies differs between machines; what it is (the fingerprints of the files and of the examples)
# is compared after the rerun.
_LOCATIONS = ("task.data_dir:",)


class ReproduceError(ValueError):
    """A run folder or command that cannot be rerun as recorded; the message names the file and the fix."""


def parse_command(run: Path) -> list[str]:
    """The overrides of the run's recorded ``python experiments/train.py ...`` command (folder settings dropped)."""
    command = rerun_command(run)
    if command is None:
        raise ReproduceError(f"{run}: no command.txt and no .hydra/overrides.yaml, so there is no recorded command; "
                             "pass a published run folder (experiments/results/.../seed<s>) or a sweep's run folder")
    words = shlex.split(command)
    if len(words) < 2 or Path(words[0]).name not in ("python", "python3") or words[1] != _TRAIN:
        raise ReproduceError(f"{run}: the recorded command is not `python {_TRAIN} ...`: {command!r}")
    return [w for w in words[2:] if not w.startswith(_RUN_ONLY)]


def composed_config(overrides: list[str]) -> dict:
    """The run config (as a dict) that ``train.py <overrides>`` would train in this checkout."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .cli import CONF_DIR, to_dataclass

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[o for o in overrides if not o.startswith("hydra")])
        run_cfg = to_dataclass(cfg)
    except Exception as e:  # noqa: BLE001 - a recorded override this checkout no longer knows: say which
        raise ReproduceError(f"the recorded command does not compose in this checkout: {e}. The run was made with "
                             "another version of conf/; check out that version to rerun it") from None
    finally:
        GlobalHydra.instance().clear()
    return dataclasses.asdict(run_cfg)


def config_drift(run: Path, overrides: list[str]) -> list[str]:
    """``field: recorded -> now`` for every result-affecting field on which the recorded run and the command
    composed now differ (the same check as a resume's; empty: the rerun is the same experiment)."""
    recorded = yaml.safe_load((run / CONFIG).read_text()) or {}
    return [d for d in config_diff(recorded, composed_config(overrides)) if not d.startswith(_LOCATIONS)]


def _records(run: Path) -> dict[tuple, dict]:
    """{(split, step): numbers} of the run's metrics.jsonl."""
    out = {}
    path = run / METRICS
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        numbers = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        out[(rec.get("split"), rec.get("step"))] = numbers
    return out


def _environments(summary: dict) -> list[dict]:
    return [e for e in summary.get("environments") or [] if isinstance(e, dict)]


def seed_spread(run: Path, metric: str) -> tuple[float, int] | None:
    """(standard deviation, number of seeds) of the final ``metric`` over the run's cell: the ``seed*`` folders
    beside it (the published layout); None with fewer than two."""
    values = []
    for folder in sorted(run.parent.glob("seed*")):
        value = ((read_json(folder / SUMMARY) or {}).get("final") or {}).get(metric)
        if isinstance(value, (int, float)):
            values.append(float(value))
    return (statistics.stdev(values), len(values)) if len(values) >= 2 else None


def compare_runs(recorded: Path, rerun: Path, tol: float = 0.0) -> dict:
    """Step-by-step comparison of two run folders: {identical, reproduced, main_metric, max_main_diff, diffs
    (the largest difference per field), missing (records one run has and the other lacks), first_difference
    (the earliest record that differs: split, step, field, recorded, rerun), environment (how the rerun's
    environment differs from the recorded one's; None when the run did not record it), seed_spread}."""
    s_old, s_new = read_json(recorded / SUMMARY) or {}, read_json(rerun / SUMMARY) or {}
    metric = s_old.get("main_metric") or s_new.get("main_metric")
    old, new = _records(recorded), _records(rerun)
    diffs: dict[str, float] = {}
    first = None
    for key in sorted(set(old) & set(new), key=lambda k: (k[1] if isinstance(k[1], int) else -1, str(k[0]))):
        for field in sorted(set(old[key]) | set(new[key])):
            a, b = old[key].get(field), new[key].get(field)
            name = f"{key[0]}/{field}"
            d = math.inf if a is None or b is None else abs(float(a) - float(b))
            diffs[name] = max(diffs.get(name, 0.0), d)
            if d > 0 and first is None:
                first = {"split": key[0], "step": key[1], "field": field, "recorded": a, "rerun": b}
    missing = sorted({f"{k[0]} step {k[1]}" for k in set(old) ^ set(new)})
    final = {}
    for which in ("final", "best"):
        a, b = (s_old.get(which) or {}).get(metric), (s_new.get(which) or {}).get(metric)
        final[which] = (a, b)
        diffs[f"{which}/{metric}"] = math.inf if a is None or b is None else abs(a - b)
    for field in ("final_budget", "status"):
        if s_old.get(field) != s_new.get(field):
            diffs[f"summary/{field}"] = math.inf
    inputs_new = flatten(s_new.get("inputs") or {})
    for key, value in flatten(s_old.get("inputs") or {}).items():
        if not key.endswith("path") and inputs_new.get(key) != value:
            diffs[f"inputs/{key}"] = math.inf  # another data file, tokenizer or model than the run's
    if (read_json(recorded / RANK_PATTERN) or None) != (read_json(rerun / RANK_PATTERN) or None):
        diffs["rank_pattern"] = math.inf
    main = [v for k, v in diffs.items() if k in (f"eval/{metric}", f"final/{metric}", f"best/{metric}")]
    max_main = max(main) if main else math.inf
    identical = not missing and all(v == 0 for v in diffs.values())
    env_old, env_new = _environments(s_old), _environments(s_new)
    environment = environment_diff(env_old[0], env_new[0]) if env_old and env_new else None
    return {"identical": identical, "reproduced": identical or (not missing and max_main <= tol),
            "main_metric": metric, "max_main_diff": max_main, "final": final, "missing": missing,
            "diffs": {k: v for k, v in sorted(diffs.items(), key=lambda kv: -kv[1]) if v > 0},
            "first_difference": first, "environment": environment, "recorded_resumed_elsewhere": len(env_old) > 1,
            "seed_spread": seed_spread(recorded, metric) if metric else None}


def _default_out(run: Path) -> Path:
    parts = run.resolve().parts
    tail = Path(*parts[-3:]) if len(parts) >= 3 else Path(run.name)
    return REPO / "outputs" / "reproduce" / tail.parent / f"{tail.name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"


def reproduce(run: Path, out: Path | None = None, tol: float = 0.0, check_only: bool = False) -> dict:
    """Check the recorded command against this checkout, rerun it into ``out`` and compare (module docstring)."""
    run = Path(run)
    if not (run / SUMMARY).is_file() or not (run / CONFIG).is_file():
        raise ReproduceError(f"{run}: not a finished run folder (it needs {SUMMARY} and {CONFIG})")
    overrides = parse_command(run)
    drift = config_drift(run, overrides)
    if drift:
        raise ReproduceError(f"{run}: the recorded command composes to another config in this checkout, so a rerun "
                             "would not be the same experiment:\n  " + "\n  ".join(drift) +
                             "\nFix: add these values to the command, or check out the version of conf/ that made "
                             "the run")
    out = Path(out) if out is not None else _default_out(run)
    if check_only:
        return {"overrides": overrides, "out": out, "checked_only": True}
    if (out / SUMMARY).exists():
        raise ReproduceError(f"--out {out} already holds a run; pass a new folder (a rerun never reuses one)")
    cmd = [sys.executable, _TRAIN, *overrides, f"hydra.run.dir={out}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0 or not (out / SUMMARY).is_file():
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise ReproduceError(f"the rerun failed (exit {p.returncode}; its folder: {out}):\n{tail}")
    return {"overrides": overrides, "out": out, **compare_runs(run, out, tol)}


def _fmt(v) -> str:
    return "missing" if v is None else f"{v:.6g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a run folder: published (command.txt) or a sweep's (.hydra)")
    ap.add_argument("--out", type=Path, help="the rerun's folder (default: outputs/reproduce/...)")
    ap.add_argument("--tol", type=float, default=0.0,
                    help="largest difference of the main dev metric still called reproduced (default 0: identical)")
    ap.add_argument("--check-only", action="store_true", help="check the command against this checkout; no rerun")
    a = ap.parse_args(argv)
    if a.tol < 0:
        ap.error("--tol must be >= 0")
    try:
        res = reproduce(a.run, a.out, a.tol, a.check_only)
    except ReproduceError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    command = " ".join(["python", _TRAIN, *(shlex.quote(o) for o in res["overrides"])])
    if res.get("checked_only"):
        print(f"the recorded command composes to the recorded config in this checkout:\n  {command}")
        return 0
    metric = res["main_metric"]
    print(f"rerun of {a.run}\n  {command}\n  into {res['out']}")
    for which, (old, new) in res["final"].items():
        print(f"  {which} {metric}: recorded {_fmt(old)}, rerun {_fmt(new)}")
    if res["identical"]:
        print("identical: every logged number, the budget and the rank pattern match exactly")
    else:
        worst = list(res["diffs"].items())[:8]
        print("differences (largest first): " + ", ".join(f"{k} {v:.3g}" for k, v in worst))
        if res["missing"]:
            print(f"records in one run only: {', '.join(res['missing'][:8])}")
        verdict = "reproduced" if res["reproduced"] else "NOT reproduced"
        print(f"{verdict}: the main dev metric differs by at most {res['max_main_diff']:.3g} (--tol {a.tol:g})")
        for line in explain(res):
            print(f"  {line}")
    return 0 if res["reproduced"] else 1


def explain(res: dict) -> list[str]:
    """Where the two runs part and what differed between their environments, for a rerun that is not
    identical: a first difference in the last bits of the first logged loss, with the same config and inputs,
    is the mark of other kernels or library versions; a config or data difference shows from the start."""
    out = []
    first = res.get("first_difference")
    if first is not None:
        a, b = first["recorded"], first["rerun"]
        size = "" if a is None or b is None else (
            f", {abs(a - b):.3g} apart" + (f" (relative {abs(a - b) / abs(a):.1g})" if a else ""))
        out.append(f"first difference: {first['split']} step {first['step']}, {first['field']} "
                   f"recorded {_fmt(a)}, rerun {_fmt(b)}{size}")
    env = res.get("environment")
    if env is None:
        out.append("the recorded run did not record its environment (library versions, CPU), so whether it "
                   "differs cannot be said")
    elif env:
        out.append("the environment differs: " + "; ".join(env))
    else:
        out.append("the environment is the same (library versions, CPU model and vector units, threads)")
    if res.get("recorded_resumed_elsewhere"):
        out.append("the recorded run was resumed in another environment (its summary.json lists them)")
    spread, final = res.get("seed_spread"), res["final"].get("final", (None, None))
    if spread is not None and None not in final:
        d = abs(final[0] - final[1])
        out.append(f"the final {res['main_metric']} differs by {d:.3g}; over the cell's {spread[1]} seeds it has "
                   f"a standard deviation of {spread[0]:.3g} ({d / spread[0]:.2f}x)" if spread[0] > 0 else
                   f"the final {res['main_metric']} differs by {d:.3g}; the cell's {spread[1]} seeds all have the "
                   "same value")
    return out
