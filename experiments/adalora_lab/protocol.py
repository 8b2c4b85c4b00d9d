"""The tuning protocol behind a published comparison: seed-0 grids per method, widened past an edge, then seeds.

    python experiments/glue_converged.py --task mrpc [--methods lora adalora ...] [--jobs 2] [--dry-run]

For each method of the grid file (``experiments/grids/glue_converged_<task>.yaml`` where a task has its own, as
SST-2 does, else ``experiments/grids/glue_converged.yaml``):

1. run seed 0 at every point of the method's grid (the product of its keys' values);
2. choose the point with the best final dev metric (ties: the best-epoch metric, then the first point);
3. when the chosen value of a numeric key (of the grid file's ``widen`` list) lies at an edge of its grid, add
   the next value past that edge (one decade step of the grid's spacing), at the chosen values of the other keys,
   and go back to 2, at most ``max_extend`` times per key; so the chosen value is always inside its grid, or the
   report says it is not;
4. run the other seeds at the chosen point.

Every run is one ``train.py -m`` job into the sweep folder, so its folder is the one Hydra's sweep gives it
(``<sweep>/<task>/<method>_r<r>/<overrides>/seed<s>``): a rerun of this command reuses finished runs, resumes
killed ones from their checkpoints and starts only what is missing. ``jobs`` runs go at a time, one thread
each; earlier methods go first, so the first comparison completes before the rivals start. The choices are
written to ``<sweep>/<task>/choices.json`` (grid, widened points, each key's values through the chosen point,
metric per point, chosen point, edge).
"""

from __future__ import annotations

import itertools
import json
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import rundir
from .summary import collect_runs

__all__ = ["ProtocolError", "choose", "default_grid_file", "extend", "main", "read_grid_file", "run_protocol"]

GRID_DIR = "experiments/grids"
HANDOFF_S = 120  # how long a freed worker waits for the finished job's method to queue its next runs
FIXED = ("threads=1", "progress=false", "logger=none", "checkpoint_every=200")


@dataclass(order=True)
class Job:
    """One training run: ``priority`` orders the queue (the method's place in the grid file)."""

    priority: float
    seq: int
    overrides: list[str] = field(compare=False)
    done: threading.Event = field(compare=False, default_factory=threading.Event)
    # set by the job's method once it has queued what follows from the result, so that the freed worker takes
    # that (a higher priority) rather than whatever else was queued meanwhile
    handled: threading.Event = field(compare=False, default_factory=threading.Event)
    group: list = field(compare=False, default_factory=list)  # the round it belongs to (itself included)
    rc: int | None = field(compare=False, default=None)


def _fmt(v) -> str:
    """A grid value as a Hydra override value: floats in their shortest round-trip form."""
    return repr(float(f"{v:.3g}")) if isinstance(v, float) else str(v)


def extend(grid: list[float], side: str) -> float:
    """The next value past ``side`` ("low" or "high") of a sorted numeric grid, one decade step of its spacing:
    the value two places in from the edge times 10 (for a 1-3-10 grid past 1e-2 that is 3e-2; past 1e-3, 3e-4).
    A two-value grid steps by its ratio."""
    g = sorted(grid)
    if len(g) < 2:
        raise ValueError("a grid needs two values to be widened")
    if side == "high":
        v = g[-2] * 10 if len(g) > 2 else g[-1] * (g[-1] / g[0])
    else:
        v = g[1] / 10 if len(g) > 2 else g[0] * (g[0] / g[-1])
    return float(f"{v:.3g}")


def _score(run: dict) -> tuple | None:
    m = run.get("main_metric")
    final, best = (run.get("final") or {}).get(m), (run.get("best") or {}).get(m)
    if run.get("status") != "completed" or final is None:
        return None
    sign = 1.0 if run.get("higher_is_better", True) else -1.0
    return (sign * float(final), sign * float(best if best is not None else final))


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def choose(runs: list[dict], grid: dict[str, list], extra: list[dict] | tuple = ()) -> dict:
    """The best completed run among ``runs`` over the points of ``grid`` (its product) and the ``extra`` points
    (a widened key's new value, at the chosen values of the other keys); per numeric key its edge along the
    line through the best point (the key's values at the best point's other values).

    Returns {"point": {key: value} | None, "scores": [[point, final, best], ...], "edge": {key: "low"|"high"|"no"},
    "line": {key: sorted values along that line}, "missing": [points without a completed run]}."""
    keys = list(grid)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    points += [p for p in extra if not any(all(_close(q[k], p[k]) for k in keys) for q in points)]
    scored, missing = [], []
    for p in points:
        match = [r for r in runs if all(_close(_get(r["config"], k), v) for k, v in p.items())]
        s = max((_score(r) for r in match if _score(r) is not None), default=None)
        (scored if s is not None else missing).append((p, s) if s is not None else p)
    if not scored:
        return {"point": None, "scores": [], "edge": {}, "line": {}, "missing": missing}
    best_point, _ = max(scored, key=lambda ps: ps[1])  # max keeps the first of equal scores
    edge, line = {}, {}
    for k in keys:
        vals = sorted({p[k] for p in points if all(_close(p[o], best_point[o]) for o in keys if o != k)})
        if len(vals) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            v = best_point[k]
            edge[k] = "low" if _close(v, vals[0]) else "high" if _close(v, vals[-1]) else "no"
            line[k] = vals
    return {"point": best_point, "scores": [[p, s[0], s[1]] for p, s in scored], "edge": edge, "line": line,
            "missing": missing}


def _close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return a == b


class _Pool:
    """``jobs`` worker threads running training subprocesses from one priority queue."""

    def __init__(self, jobs: int, base: list[str], log_dir: Path, dry_run: bool, runner=None):
        self.q: queue.PriorityQueue[Job] = queue.PriorityQueue()
        self.base, self.log_dir, self.dry_run = base, log_dir, dry_run
        self.runner = runner or self._train
        self.seq = itertools.count()
        self.lock = threading.Lock()
        self.workers = [threading.Thread(target=self._work, daemon=True) for _ in range(jobs)]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def submit(self, priority: float, overrides: list[str]) -> Job:
        job = Job(priority, next(self.seq), overrides)
        self.q.put(job)
        return job

    def _train(self, overrides: list[str]) -> int:
        """One ``train.py -m`` job; its output goes to ``<sweep>/logs/<overrides>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = "_".join(o.replace("/", "-") for o in overrides)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            cmd = [sys.executable, "experiments/train.py", "-m", *self.base, *overrides]
            return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)

    def _work(self) -> None:
        while True:
            job = self.q.get()
            with self.lock:
                print("run:", " ".join(job.overrides), flush=True)
            try:
                job.rc = 0 if self.dry_run else self.runner(job.overrides)
            except Exception as e:  # noqa: BLE001 - a job that cannot start fails alone; its method reports it
                job.rc = -1
                with self.lock:
                    print(f"job failed to start: {e}", flush=True)
            job.done.set()
            if all(j.done.is_set() for j in job.group or [job]):  # the round's last: its method acts now
                job.handled.wait(timeout=HANDOFF_S)


def _runs_of(sweep: Path, task: str, method: str, target_r: int) -> list[dict]:
    folder = sweep / task / f"{method}_r{target_r}"
    return collect_runs(folder) if folder.is_dir() else []


def _method_pipeline(pool: _Pool, priority: int, method: str, grid: dict, spec: dict, task: str, sweep: Path,
                     report: dict, lock: threading.Lock, ready: threading.Barrier) -> None:
    try:
        _pipeline(pool, priority, method, grid, spec, task, sweep, report, lock, ready)
    except Exception as e:  # noqa: BLE001 - one method's failure is reported; the other methods go on
        ready.abort()  # a method that fails before queueing must not hold the others at the barrier
        with lock:
            report[method] = {"grid": grid, "error": f"{type(e).__name__}: {e}"}


def _pipeline(pool: _Pool, priority: int, method: str, grid: dict, spec: dict, task: str, sweep: Path,
              report: dict, lock: threading.Lock, ready: threading.Barrier) -> None:
    grid = {k: list(v) for k, v in grid.items()}
    r, seeds, max_extend = spec["target_r"], spec["seeds"], spec["max_extend"]
    widenable = set(spec.get("widen", grid))
    common = [f"method={method}", f"method.target_r={r}"]
    extended = {k: 0 for k in grid}
    extra: list[dict] = []  # widened points: a key's next value at the chosen values of the other keys
    handled_later: list[Job] = []  # finished jobs whose follow-ups are not queued yet
    arrived = []

    def arrive() -> None:
        """Once: this method has queued its first runs (or has none), so the workers may start; they start when
        every method has, and then take the runs in priority order."""
        if not arrived:
            arrived.append(True)
            try:
                ready.wait()
            except threading.BrokenBarrierError:
                pass

    while True:
        done = _runs_of(sweep, task, method, r)
        seed0 = [x for x in done if x.get("seed") == seeds[0]]
        pending = choose(seed0, grid, extra)["missing"]
        started = [x["config"] for x in seed0 if x.get("status") != "completed"]
        # a killed run resumes before its method's other runs, so that its checkpoint is not wasted
        jobs = [pool.submit(priority - 0.5 if any(all(_close(_get(c, k), v) for k, v in p.items()) for c in started)
                            else priority,
                            [*common, *(f"{k}={_fmt(v)}" for k, v in p.items()), f"seed={seeds[0]}"])
                for p in pending]
        for j in jobs:
            j.group = jobs
        if jobs:
            arrive()
        for j in handled_later:  # the last round's follow-ups are queued: its workers may go on
            j.handled.set()
        for j in jobs:
            j.done.wait()
        handled_later = jobs
        if pool.dry_run and jobs:  # their results decide what follows; a finished round is looked past
            arrive()
            return
        pick = choose([x for x in _runs_of(sweep, task, method, r) if x.get("seed") == seeds[0]], grid, extra)
        if pick["point"] is None:
            with lock:
                report[method] = {"grid": grid, "error": "no seed-0 run completed"}
            for j in handled_later:
                j.handled.set()
            arrive()
            return
        widen = [(k, side) for k, side in pick["edge"].items()
                 if side != "no" and k in widenable and extended[k] < max_extend]
        if not widen:
            break
        for k, side in widen:
            extra.append({**pick["point"], k: extend(pick["line"][k], side)})
            extended[k] += 1
    point = pick["point"]
    cell = [*common, *(f"{k}={_fmt(v)}" for k, v in point.items())]
    with lock:
        report[method] = {"grid": grid, "widened": extra, "line": pick["line"], "chosen": point,
                          "edge": pick["edge"], "seed0_scores": pick["scores"], "cell": " ".join(cell)}
        if not pool.dry_run:
            _save_choices(sweep / task / "choices.json", {method: report[method]})  # now, not only at the end
    at_point = [x for x in _runs_of(sweep, task, method, r)
                if _score(x) is not None and all(_close(_get(x["config"], k), v) for k, v in point.items())]
    have = {x.get("seed") for x in at_point}
    jobs = [pool.submit(priority, [*cell, f"seed={s}"]) for s in seeds[1:] if s not in have]
    for j in jobs:
        j.handled.set()  # nothing follows the seeds
    arrive()
    for j in handled_later:  # the seeds are queued: the workers may go on
        j.handled.set()
    for j in jobs:
        j.done.wait()


def default_grid_file(experiment: str, task: str, root: Path = Path(".")) -> Path:
    """A task's own grid file (``<experiment>_<task>.yaml``, e.g. SST-2's reduced effort) where it exists, else the
    experiment's (``<experiment>.yaml``), so that the published command needs no ``--grid``."""
    own = root / GRID_DIR / f"{experiment}_{task}.yaml"
    return own if own.is_file() else root / GRID_DIR / f"{experiment}.yaml"


class ProtocolError(ValueError):
    """A grid file or an argument the protocol cannot use; the message names it and the fix."""


def read_grid_file(path) -> dict:
    """The grid file, checked: ``methods`` maps each method to {dotted key: [values]}; ``target_r``, ``seeds``
    (the first tunes) and ``max_extend`` are set; ``widen`` (optional) lists the keys that may be widened."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ProtocolError(f"cannot read the grid file {path}: {e.strerror}; pass --grid FILE") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ProtocolError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(spec, dict):
        raise ProtocolError(f"{path}: expected a mapping with methods, target_r, seeds, max_extend")
    for key, ok, want in (("methods", lambda v: isinstance(v, dict) and v, "a mapping method -> {key: [values]}"),
                          ("target_r", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
                          ("seeds", lambda v: isinstance(v, list) and v and all(isinstance(x, int) for x in v),
                           "a non-empty list of integers (the first tunes)"),
                          ("max_extend", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
                          ("widen", lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                           "a list of the dotted keys that may be widened (omit it: every numeric key)")):
        if not ok(spec.get(key)):
            raise ProtocolError(f"{path}: {key} must be {want}, got {spec.get(key)!r}")
    for m, grid in spec["methods"].items():
        if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
            raise ProtocolError(f"{path}: methods.{m} must map dotted config keys to non-empty lists of values")
    return spec


def run_protocol(task: str, grid_file: Path, sweep: Path, methods: list[str] | None, jobs: int,
                 dry_run: bool = False, experiment: str = "glue_converged", runner=None) -> dict:
    """Run the protocol (module docstring); returns {method: {grid, chosen, edge, seed0_scores, cell} or
    {grid, error}}. ``runner(overrides) -> returncode`` replaces the training subprocess (tests)."""
    spec = read_grid_file(grid_file)
    all_methods = spec["methods"]
    chosen = methods or list(all_methods)
    unknown = [m for m in chosen if m not in all_methods]
    if unknown:
        raise ProtocolError(f"--methods: {unknown} not in {grid_file} (it has {list(all_methods)})")
    base = [f"experiment={experiment}", f"task={task}", *FIXED, f"hydra.sweep.dir={sweep}"]
    pool = _Pool(jobs, base, sweep / "logs", dry_run, runner)
    report: dict = {}
    lock = threading.Lock()
    ready = threading.Barrier(len(chosen) + 1)
    threads = [threading.Thread(target=_method_pipeline,
                                args=(pool, i, m, all_methods[m], spec, task, sweep, report, lock, ready))
               for i, m in enumerate(chosen)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    pool.start()
    for t in threads:
        t.join()
    if not dry_run:
        _save_choices(sweep / task / "choices.json", report)
    return report


def _save_choices(path: Path, records: dict) -> None:
    """Merge ``records`` ({method: choice}) into the choices file (atomic write; the caller holds the lock)."""
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_json(path, merged)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True, help="a task config name: mrpc, rte, sst2, ...")
    ap.add_argument("--methods", nargs="*", help="methods of the grid file to run (default: all, in file order)")
    ap.add_argument("--grid", help=f"the grid file (default: {GRID_DIR}/<experiment>_<task>.yaml where it exists, "
                    f"else {GRID_DIR}/<experiment>.yaml)")
    ap.add_argument("--sweep", default="multirun/glue_converged", help="the sweep folder")
    ap.add_argument("--experiment", default="glue_converged", help="the experiment preset")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the next runs (the first round with any left to run) and stop")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error("--jobs must be at least 1")
    try:
        grid = Path(a.grid) if a.grid else default_grid_file(a.experiment, a.task)
        print(f"grid file: {grid}", flush=True)
        report = run_protocol(a.task, grid, Path(a.sweep), a.methods, a.jobs, a.dry_run, a.experiment)
    except ProtocolError as e:
        print(f"glue_converged: error: {e}", file=sys.stderr)
        return 2
    for m, rec in report.items():
        print(f"{m}: " + (rec.get("error") or f"chosen {rec['chosen']} (edge {rec['edge']})"))
    return 1 if any("error" in rec for rec in report.values()) else 0
