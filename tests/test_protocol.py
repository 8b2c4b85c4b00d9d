"""The tuning protocol (adalora_lab.protocol): widening a grid past its edge, choosing a point, and the whole
pipeline (grid, widen, seeds) with a fake trainer whose metric peaks at a known learning rate."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import yaml

from adalora_lab import protocol
from adalora_lab.protocol import ProtocolError, choose, extend, read_grid_file, run_protocol
from adalora_lab.summary import collect_runs


def _write(folder: Path, *, method: str, lr: float, seed: int, acc: float | None, gamma: float | None = None,
           status: str = "completed", best: float | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"task": {"name": "mrpc"}, "method": {"name": method, "target_r": 2, "orth_reg_weight": gamma},
           "optim": {"lr": lr}, "seed": seed}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = {"status": status, "task": "mrpc", "method": method, "target_r": 2, "seed": seed,
               "main_metric": "accuracy", "higher_is_better": True,
               "final": {} if acc is None else {"accuracy": acc},
               "best": {} if acc is None else {"accuracy": acc if best is None else best}}
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("grid, side, want", [
    ([1e-3, 3e-3, 1e-2], "high", 3e-2), ([1e-3, 3e-3, 1e-2], "low", 3e-4),
    ([3e-4, 1e-3, 3e-3, 1e-2], "high", 3e-2), ([0.1, 0.3], "high", 0.9), ([0.1, 0.3], "low", 0.0333)])
def test_extend_steps_one_decade_of_the_grid_past_its_edge(grid, side, want):
    assert math.isclose(extend(grid, side), want, rel_tol=1e-9)


def test_choose_picks_the_best_completed_point_and_its_edge(tmp_path):
    grid = {"optim.lr": [1e-3, 3e-3, 1e-2], "method.orth_reg_weight": [0.1, 0.3]}
    accs = {(1e-3, 0.1): 0.70, (3e-3, 0.1): 0.80, (1e-2, 0.1): 0.75, (1e-3, 0.3): 0.71, (3e-3, 0.3): 0.79}
    for i, ((lr, g), acc) in enumerate(accs.items()):
        _write(tmp_path / str(i), method="adalora", lr=lr, gamma=g, seed=0, acc=acc)
    # a failed run at the missing point does not count, even with a higher metric
    _write(tmp_path / "failed", method="adalora", lr=1e-2, gamma=0.3, seed=0, acc=0.99, status="failed")
    pick = choose(collect_runs(tmp_path), grid)
    assert pick["point"] == {"optim.lr": 3e-3, "method.orth_reg_weight": 0.1}
    assert pick["edge"] == {"optim.lr": "no", "method.orth_reg_weight": "low"}
    assert pick["missing"] == [{"optim.lr": 1e-2, "method.orth_reg_weight": 0.3}]
    assert len(pick["scores"]) == 5


def test_choose_breaks_a_tie_on_the_best_epoch_then_the_first_point(tmp_path):
    grid = {"optim.lr": [1e-3, 3e-3, 1e-2]}
    _write(tmp_path / "a", method="lora", lr=1e-3, seed=0, acc=0.8, best=0.81)
    _write(tmp_path / "b", method="lora", lr=3e-3, seed=0, acc=0.8, best=0.83)
    _write(tmp_path / "c", method="lora", lr=1e-2, seed=0, acc=0.8, best=0.83)
    assert choose(collect_runs(tmp_path), grid)["point"] == {"optim.lr": 3e-3}


def _fake_trainer(sweep: Path, peak: float, calls: list, lock: threading.Lock):
    """A runner whose accuracy falls with the distance (in decades) from ``peak``; seeds add a little noise."""
    def run(overrides: list[str]) -> int:
        kv = dict(o.split("=", 1) for o in overrides)
        lr, seed, method = float(kv["optim.lr"]), int(kv["seed"]), kv["method"]
        acc = 0.9 - 0.1 * abs(math.log10(lr / peak)) + 0.001 * seed
        with lock:
            calls.append((method, lr, seed))
            folder = sweep / "mrpc" / f"{method}_r2" / f"lr{lr:g}" / f"seed{seed}"
        _write(folder, method=method, lr=lr, seed=seed, acc=acc)
        return 0
    return run


def _grid_file(tmp_path: Path, methods: dict, seeds=(0, 1, 2), max_extend=2, widen=None) -> Path:
    path = tmp_path / "grid.yaml"
    spec = {"max_extend": max_extend, "target_r": 2, "seeds": list(seeds), "methods": methods}
    path.write_text(yaml.safe_dump(spec if widen is None else {**spec, "widen": widen}, sort_keys=False))
    return path


def test_the_protocol_widens_past_the_edge_then_runs_the_seeds_at_the_chosen_point(tmp_path):
    sweep, calls, lock = tmp_path / "sweep", [], threading.Lock()
    grid = _grid_file(tmp_path, {"lora": {"optim.lr": [1e-3, 3e-3, 1e-2]}})
    report = run_protocol("mrpc", grid, sweep, None, jobs=2, runner=_fake_trainer(sweep, 3e-2, calls, lock))
    rec = report["lora"]
    # 1e-2 is best and at the top edge: 3e-2 is added; it is best and at the edge again: 1e-1 is added
    assert rec["line"] == {"optim.lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}
    assert rec["widened"] == [{"optim.lr": 3e-2}, {"optim.lr": 1e-1}]
    assert rec["chosen"] == {"optim.lr": 3e-2} and rec["edge"] == {"optim.lr": "no"}
    seeds = sorted(s for m, lr, s in calls if math.isclose(lr, 3e-2))
    assert seeds == [0, 1, 2]
    assert len(calls) == 7  # 5 seed-0 points and 2 seeds, nothing run twice
    saved = json.loads((sweep / "mrpc" / "choices.json").read_text())
    assert saved["lora"]["chosen"] == {"optim.lr": 3e-2}
    # a rerun finds everything done and runs nothing
    calls.clear()
    run_protocol("mrpc", grid, sweep, None, jobs=2, runner=_fake_trainer(sweep, 3e-2, calls, lock))
    assert calls == []


def test_the_widening_stops_at_max_extend_and_the_report_says_the_edge(tmp_path):
    sweep, calls, lock = tmp_path / "sweep", [], threading.Lock()
    grid = _grid_file(tmp_path, {"lora": {"optim.lr": [1e-3, 3e-3]}}, seeds=(0,), max_extend=1)
    rec = run_protocol("mrpc", grid, sweep, None, jobs=1, runner=_fake_trainer(sweep, 1.0, calls, lock))["lora"]
    assert rec["line"] == {"optim.lr": [1e-3, 3e-3, 9e-3]} and rec["edge"] == {"optim.lr": "high"}


def test_a_key_is_widened_at_the_chosen_values_of_the_other_keys(tmp_path):
    """Two keys: lr at its low edge widens by one point, at the chosen gamma only (not the whole product);
    gamma, at its edge too, is not in ``widen`` and stays."""
    sweep, calls, lock = tmp_path / "sweep", [], threading.Lock()
    grid = _grid_file(tmp_path, {"adalora": {"optim.lr": [1e-3, 3e-3, 1e-2], "method.orth_reg_weight": [0.1, 0.3]}},
                      seeds=(0,), max_extend=1, widen=["optim.lr"])  # gamma 0.3 is at its edge, and stays

    def folder_of(overrides):
        kv = dict(o.split("=", 1) for o in overrides)
        return f"lr{float(kv['optim.lr']):g}_g{kv['method.orth_reg_weight']}"

    def runner(overrides):  # accuracy peaks at lr 3e-4; gamma 0.3 a little better everywhere
        kv = dict(o.split("=", 1) for o in overrides)
        lr, g = float(kv["optim.lr"]), float(kv["method.orth_reg_weight"])
        with lock:
            calls.append((lr, g))
        _write(sweep / "mrpc" / "adalora_r2" / folder_of(overrides) / "seed0", method="adalora", lr=lr, seed=0,
               gamma=g, acc=0.9 - 0.1 * abs(math.log10(lr / 3e-4)) + g)
        return 0

    rec = run_protocol("mrpc", grid, sweep, None, jobs=2, runner=runner)["adalora"]
    assert len(calls) == 7 and (3e-4, 0.3) in calls and (3e-4, 0.1) not in calls  # 6 + 1, not 6 + 2
    assert rec["chosen"] == {"optim.lr": 3e-4, "method.orth_reg_weight": 0.3}
    assert rec["line"] == {"optim.lr": [3e-4, 1e-3, 3e-3, 1e-2]}  # gamma has one value at lr 3e-4: no line
    assert rec["edge"] == {"optim.lr": "low"}  # max_extend reached: the report says so


def test_earlier_methods_run_first_and_a_failing_method_does_not_stop_the_others(tmp_path):
    sweep, calls, lock = tmp_path / "sweep", [], threading.Lock()
    grid = _grid_file(tmp_path, {"lora": {"optim.lr": [1e-3, 3e-3, 1e-2]},
                                 "adalora": {"optim.lr": [1e-3, 3e-3, 1e-2]}}, seeds=(0,))
    trainer = _fake_trainer(sweep, 3e-3, calls, lock)

    def runner(overrides):
        if "method=adalora" in overrides:
            raise OSError("no such interpreter")
        return trainer(overrides)

    report = run_protocol("mrpc", grid, sweep, None, jobs=1, runner=runner)
    assert [c[0] for c in calls] == ["lora"] * 3
    assert report["lora"]["chosen"] == {"optim.lr": 3e-3}
    assert report["adalora"]["error"] == "no seed-0 run completed"


@pytest.mark.parametrize("text, field", [
    ("methods: {lora: {optim.lr: [1e-3]}}\ntarget_r: 2\nseeds: []\nmax_extend: 1\n", "seeds"),
    ("methods: {}\ntarget_r: 2\nseeds: [0]\nmax_extend: 1\n", "methods"),
    ("methods: {lora: {optim.lr: 1e-3}}\ntarget_r: 2\nseeds: [0]\nmax_extend: 1\n", "methods.lora"),
    ("methods: {lora: [\n", "grid.yaml:"),
])
def test_a_bad_grid_file_is_one_error_naming_the_field(tmp_path, text, field):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ProtocolError, match=field.replace(".", r"\.")):
        read_grid_file(path)


def test_the_cli_says_what_is_wrong_in_one_line(tmp_path, capsys):
    assert protocol.main(["--task", "mrpc", "--grid", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read the grid file" in err[0] and "--grid" in err[0]
    grid = _grid_file(tmp_path, {"lora": {"optim.lr": [1e-3, 3e-3]}})
    assert protocol.main(["--task", "mrpc", "--grid", str(grid), "--methods", "sora"]) == 2
    assert "'sora'" in capsys.readouterr().err


def test_the_shipped_grid_file_is_valid_and_every_grid_has_three_values():
    spec = read_grid_file(Path(__file__).resolve().parents[1] / "experiments/grids/glue_converged.yaml")
    assert set(spec["methods"]) == {"lora", "adalora", "sora_budget", "increlora", "adalora_lambda_lr"}
    assert all(len(spec["methods"][m]["optim.lr"]) >= 3 for m in spec["methods"])
    assert spec["methods"]["adalora"]["method.orth_reg_weight"] == [0.1, 0.3] and spec["widen"] == ["optim.lr"]


def test_a_task_with_its_own_grid_file_takes_it_by_default(tmp_path):
    grids = tmp_path / protocol.GRID_DIR
    grids.mkdir(parents=True)
    (grids / "glue_converged.yaml").write_text("methods: {}\n")
    assert protocol.default_grid_file("glue_converged", "sst2", tmp_path) == grids / "glue_converged.yaml"
    (grids / "glue_converged_sst2.yaml").write_text("methods: {}\n")
    assert protocol.default_grid_file("glue_converged", "sst2", tmp_path) == grids / "glue_converged_sst2.yaml"
    assert protocol.default_grid_file("glue_converged", "mrpc", tmp_path) == grids / "glue_converged.yaml"


@pytest.mark.parametrize("task", ["sst2", "rte"])
def test_the_shipped_reduced_grids_give_both_methods_three_learning_rates_and_both_gammas(task):
    """SST-2 and RTE (the long tasks) have their own grid files: LoRA and AdaLoRA only, the same effort each, and at
    least the issue's 3 seeds at the chosen point (both now run 5)."""
    root = Path(__file__).resolve().parents[1]
    path = protocol.default_grid_file("glue_converged", task, root)
    spec = read_grid_file(path)
    assert path.name == f"glue_converged_{task}.yaml"
    assert spec["methods"].keys() == {"adalora", "lora"}
    assert spec["seeds"][:3] == [0, 1, 2], "the chosen point runs at least 3 seeds, starting at the tuning seed 0"
    assert all(len(g["optim.lr"]) == 3 for g in spec["methods"].values())
    assert spec["methods"]["adalora"]["method.orth_reg_weight"] == [0.1, 0.3] and spec["widen"] == ["optim.lr"]
    assert protocol.default_grid_file("glue_converged", "mrpc", root).name == "glue_converged.yaml"


def test_a_finished_round_hands_its_worker_to_what_follows_from_it(tmp_path):
    """One worker: when LoRA's grid is done, its seed runs before AdaLoRA's queued grid (LoRA goes first), because
    the freed worker waits for LoRA to queue it instead of taking the next job already in the queue."""
    sweep, calls, lock = tmp_path / "sweep", [], threading.Lock()
    grid = _grid_file(tmp_path, {"lora": {"optim.lr": [1e-3, 3e-3, 1e-2]},
                                 "adalora": {"optim.lr": [1e-3, 3e-3, 1e-2]}}, seeds=(0, 1))
    run_protocol("mrpc", grid, sweep, None, jobs=1, runner=_fake_trainer(sweep, 3e-3, calls, lock))
    assert [(m, s) for m, _, s in calls] == [("lora", 0)] * 3 + [("lora", 1)] + [("adalora", 0)] * 3 + [("adalora", 1)]


def test_a_rerun_queues_the_seeds_of_a_finished_grid_before_the_workers_start(tmp_path):
    """LoRA's grid finished in an earlier run of the protocol (its first round is empty now): its seeds still
    come before AdaLoRA's grid."""
    sweep, calls, lock = tmp_path / "sweep", [], threading.Lock()
    trainer = _fake_trainer(sweep, 3e-3, calls, lock)
    for lr in (1e-3, 3e-3, 1e-2):
        trainer(["method=lora", f"optim.lr={lr}", "seed=0"])
    calls.clear()
    grid = _grid_file(tmp_path, {"lora": {"optim.lr": [1e-3, 3e-3, 1e-2]},
                                 "adalora": {"optim.lr": [1e-3, 3e-3, 1e-2]}}, seeds=(0, 1))
    run_protocol("mrpc", grid, sweep, None, jobs=1, runner=trainer)
    assert [(m, s) for m, _, s in calls] == [("lora", 1)] + [("adalora", 0)] * 3 + [("adalora", 1)]


@pytest.mark.parametrize("peak, want", [(1e-2, [("lora", 3e-2, 0)]),  # best at the top edge: the widened point
                                        (3e-3, [("lora", 3e-3, 1), ("lora", 3e-3, 2)])])  # inside: the seeds
def test_a_dry_run_looks_past_a_finished_grid_to_the_runs_that_come_next(tmp_path, capsys, peak, want):
    """A dry run whose first round is already done prints what follows from it, runs nothing, and writes no
    choices file (a finished seed-0 grid used to print nothing at all)."""
    sweep, calls, lock = tmp_path / "sweep", [], threading.Lock()
    trainer = _fake_trainer(sweep, peak, calls, lock)
    for lr in (1e-3, 3e-3, 1e-2):
        trainer(["method=lora", f"optim.lr={lr}", "seed=0"])
    calls.clear()
    grid = _grid_file(tmp_path, {"lora": {"optim.lr": [1e-3, 3e-3, 1e-2]}})
    run_protocol("mrpc", grid, sweep, None, jobs=1, dry_run=True, runner=trainer)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run:")]
    got = [(kv["method"], float(kv["optim.lr"]), int(kv["seed"]))
           for kv in (dict(o.split("=", 1) for o in line.split()[1:] if "=" in o) for line in printed)]
    assert got == want
    assert calls == [] and not (sweep / "mrpc" / "choices.json").exists()
