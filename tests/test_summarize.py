"""experiments/summarize.py on a fake Hydra multirun (``fake_runs.make_multirun``, also used by test_notebook)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adalora_lab import plots, summary
from adalora_lab.summary import main as main_cli
from fake_runs import (
    ACC,
    BEST_BONUS,
    GAIN,
    LOSS,
    LOSS_BEFORE,
    PLANTED,
    adalora_pattern,
    expected_mean_pattern,
    make_multirun,
    write_run,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "summarize.py"


# ----------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def summarized(tmp_path_factory):
    root = make_multirun(tmp_path_factory.mktemp("multirun"))
    out = root / "report"
    result = summary.summarize(root, out_dir=out)
    return root, out, result


def test_collect_runs_finds_every_run_and_skips_hydra_folders(summarized):
    root, _, result = summarized
    runs = result["runs"]
    assert len(runs) == 2 * 2 * 2 * 3 + 1
    assert not any(".hydra" in r["rel"] or "adapter" in r["rel"] for r in runs)
    crashed = [r for r in runs if r["status"] == "incomplete"]
    assert [(r["task"], r["method"], r["target_r"], r["seed"]) for r in crashed] == [("rte", "lora", 2, 3)]
    assert "last logged step 3" in crashed[0]["error"]


def _row(rows, task, method, r, metric):
    (row,) = [x for x in rows if (x["task"], x["method"], x["target_r"], x["metric"]) == (task, method, r, metric)]
    return row


def test_means_and_sample_stds(summarized):
    _, _, result = summarized
    rows = result["rows"]
    for (method, r), vals in ACC.items():
        row = _row(rows, "rte", method, r, "accuracy")
        mean = sum(vals) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
        assert row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(std) and row["n"] == 3
        assert row["is_main"] and row["higher_is_better"]
    row = _row(rows, "planted_rank", "adalora", 4, "distill_loss")
    assert (row["n"], row["higher_is_better"]) == (2, False)
    assert row["mean"] == pytest.approx(0.0065) and row["std"] == pytest.approx(math.sqrt(2) * 0.0015)
    row = _row(rows, "planted_rank", "adalora", 2, "rank_recovery")
    assert not row["is_main"] and row["mean"] == pytest.approx(0.6) and row["std"] == pytest.approx(0.1)
    assert _row(rows, "rte", "lora", 2, "accuracy")["trainable_params"] == 1_002_000
    assert _row(rows, "rte", "lora", 2, "accuracy")["wall_time_s"] == pytest.approx(11.0)


def test_markdown_table(summarized):
    _, out, result = summarized
    md = (out / "summary.md").read_text()
    assert md == result["markdown"]
    table = {line.split("|")[1].strip() + " " + line.split("|")[2].strip(): line
             for line in result["table"].splitlines()[2:]}
    assert list(table) == ["lora 2", "lora 4", "adalora 2", "adalora 4"]
    # accuracy x100 with 2 decimals, sample std
    assert "| 62.00 ± 2.00 |" in table["lora 2"]
    assert "| 67.00 ± 2.65 |" in table["lora 4"]
    assert "| 72.00 ± 2.00 |" in table["adalora 2"]
    assert "| **76.00 ± 1.73** |" in table["adalora 4"]  # best rte accuracy in bold
    # losses as-is, 4 significant digits; lower is better
    assert "| 0.03 ± 0.01 |" in table["lora 2"]
    assert "| 0.01334 ± 0.001 |" in table["adalora 2"]
    assert "| **0.0065 ± 0.002121** |" in table["adalora 4"]
    # rank_recovery column, seeds, params, wall time
    assert "| 60.00 ± 10.00 |" in table["adalora 2"] and "| 25.00 ± 0.00 |" in table["lora 2"]
    assert "| 3 |" in table["lora 2"]
    assert "rte: 3; planted_rank: 2" in table["adalora 4"]
    assert "rte: 1.00M; planted_rank: 4.0k" in table["lora 2"]
    assert "rte: 11.0; planted_rank: 2.0" in table["adalora 2"]
    header = result["table"].splitlines()[0]
    assert "rte accuracy ×100 ↑" in header and "planted_rank distill_loss ↓" in header
    assert "planted_rank rank_recovery ×100" in header


def test_single_seed_shows_n1(tmp_path):
    root = tmp_path / "one"
    write_run(root / "a", task="rte", method="lora", target_r=8, seed=0, final={"accuracy": 0.8123})
    result = summary.summarize(root, out_dir=tmp_path / "o")
    assert "| 81.23 (n=1) |" in result["table"]
    (row,) = result["rows"]
    assert row["n"] == 1 and math.isnan(row["std"])
    with open(tmp_path / "o" / "summary.csv") as f:
        (rec,) = [r for r in csv.DictReader(f) if (r["stat"], r["which"]) == ("value", "final")]
    assert rec["std"] == "" and rec["n"] == "1"


def test_failed_runs_listed(summarized):
    _, out, result = summarized
    md = (out / "summary.md").read_text()
    section = md.split("## Failed / incomplete runs")[1]
    assert "method.target_r=2,method=lora,task=rte/seed=3" in section
    assert "no summary.json" in section
    assert "method.target_r=4,method=adalora,task=planted_rank/seed=2" in section
    assert "CUDA out of memory" in section
    assert len(result["failed"]) == 2


def test_csv(summarized):
    _, out, _ = summarized
    with open(out / "summary.csv") as f:
        recs = list(csv.DictReader(f))
    assert list(recs[0])[:10] == ["task", "method", "target_r", "metric", "mean", "std", "n", "trainable_params",
                                  "adapter_params", "wall_time_s"]
    values = [r for r in recs if r["stat"] == "value"]
    assert {r["which"] for r in values} == {"final", "best"}
    by = {(r["task"], r["method"], r["target_r"], r["metric"]): r for r in values if r["which"] == "final"}
    assert len([r for r in values if r["is_main"] == "True" and r["which"] == "final"]) == 8
    rec = by["rte", "lora", "4", "accuracy"]
    assert float(rec["adapter_params"]) == float(rec["trainable_params"]) // 2  # the fake runs' final budget
    assert float(rec["mean"]) == pytest.approx(0.67) and float(rec["std"]) == pytest.approx(math.sqrt(0.0007))
    assert rec["n"] == "3"
    rec = by["planted_rank", "adalora", "2", "distill_loss"]  # raw values, not x100
    assert float(rec["mean"]) == pytest.approx(0.01334) and rec["higher_is_better"] == "False"
    assert float(by["planted_rank", "lora", "4", "rank_recovery"]["mean"]) == pytest.approx(0.25)


def test_figures(summarized):
    _, out, result = summarized
    files = result["files"]
    assert Path(files["comparison"]) == out / "comparison.png"
    assert Path(files["budget"]) == out / "budget_vs_metric.png"  # two budgets
    names = sorted(Path(p).name for p in files["heatmaps"])
    assert names == sorted(f"rank_heatmap_{t}_adalora_r{r}.png" for t in ("rte", "planted_rank") for r in (2, 4))
    assert [Path(p).name for p in files["learning_curves"]] == ["learning_curves_rte.png",
                                                                 "learning_curves_planted_rank.png"]
    # LoRA vs AdaLoRA sigma_max for the smallest seed; the planted runs logged no diagnostic
    assert [Path(p).name for p in files["growth"]] == ["growth_rte_r2_seed0.png", "growth_rte_r4_seed0.png"]
    pngs = [files["comparison"], files["budget"], *files["heatmaps"], *files["learning_curves"], *files["growth"]]
    for p in pngs:
        assert Path(p).stat().st_size > 5000
        assert f"![{Path(p).stem}]({Path(p).name})" in result["markdown"]
    assert sorted(x.name for x in out.glob("*.png")) == sorted(Path(p).name for p in pngs)


def test_aggregate_heatmap_values(summarized):
    """The figure summarize draws holds the mean rank per module over seeds, the planted ranks beside it."""
    _, _, result = summarized
    group = [r for r in result["runs"] if (r["task"], r["method"], r["target_r"]) == ("planted_rank", "adalora", 4)
             and r["status"] == "completed"]
    mean = summary._mean_pattern([r["rank_pattern"] for r in group])
    expected = expected_mean_pattern("planted_rank", 4, seeds=(0, 1))
    assert mean == pytest.approx(expected)
    fig = plots.rank_heatmap_figure(mean, planted=PLANTED)
    planted_ax, learned_ax = fig.axes[:2]
    # rows = types (up, down), columns = layers (0, 1)
    assert [t.get_text() for t in planted_ax.texts] == ["4", "0", "1", "3"]
    assert [t.get_text() for t in learned_ax.texts] == [
        plots.format_rank(expected[n]) for n in ("blocks.0.up", "blocks.1.up", "blocks.0.down", "blocks.1.down")]
    assert [t.get_text() for t in learned_ax.texts] == ["5.5", "4", "3.5", "0"]


def test_cli_writes_into_multirun_dir(tmp_path, capsys):
    root = tmp_path / "mr"
    for seed in (0, 1):
        write_run(root / f"method=adalora/seed={seed}", task="rte", method="adalora", target_r=2, seed=seed,
                  final={"accuracy": 0.5 + 0.1 * seed}, rank_pattern=adalora_pattern("rte", 2, seed))
    assert summary.main([str(root), "--no-plots"]) == 0
    assert "| adalora | 2 | 55.00 ± 7.07 |" in capsys.readouterr().out
    assert (root / "summary.md").exists() and (root / "summary.csv").exists()
    assert not (root / "comparison.png").exists()


def test_cli_missing_dir_exits_nonzero(tmp_path):
    target = tmp_path / "nope"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(target)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "does not exist" in lines[0]


def test_cli_dir_without_runs_exits_nonzero(tmp_path, capsys):
    target = tmp_path / "empty"
    (target / "sub" / ".hydra").mkdir(parents=True)
    (target / "multirun.yaml").write_text("a: 1\n")
    assert summary.main([str(target)]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "no run folder" in lines[0]


def test_summarize_raises_on_missing_dir(tmp_path):
    with pytest.raises(summary.SummarizeError):
        summary.summarize(tmp_path / "missing")


def test_by_splits_rows_by_a_config_value(tmp_path):
    """--by optim.lr: one row per (method, lr), each the mean over its own seeds (a learning-rate sweep table)."""
    accs = {("lora", 0.001): [0.6, 0.7], ("lora", 0.003): [0.5, 0.5], ("adalora", 0.001): [0.8, 0.9]}
    for (method, lr), values in accs.items():
        for seed, acc in enumerate(values):
            folder = write_run(tmp_path / "sweep" / f"{method}_{lr}" / f"seed={seed}", task="rte", method=method,
                               target_r=2, seed=seed, final={"accuracy": acc})
            (folder / "config.yaml").write_text(f"method:\n  name: {method}\ntask:\n  name: rte\nseed: {seed}\n"
                                                f"optim:\n  lr: {lr}\n")
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "sweep"), "--by", "optim.lr", "--no-plots"],
                         capture_output=True, text=True, check=True)
    rows = {(r["method"], r["n"]): float(r["mean"]) for r in csv.DictReader(open(tmp_path / "sweep" / "summary.csv"))
            if (r["stat"], r["which"]) == ("value", "final")}
    assert rows == pytest.approx({("lora optim.lr=0.001", "2"): 0.65, ("lora optim.lr=0.003", "2"): 0.5,
                                  ("adalora optim.lr=0.001", "2"): 0.85})
    assert "| lora optim.lr=0.003 | 2 | 50.00 ± 0.00 |" in out.stdout


def test_collect_results_copies_small_files_only(tmp_path):
    """collect_results.py: configs, metrics, summaries and rank files travel, weights do not; a failed run is
    published with its reason, a run still running is not."""
    sweep = make_multirun(tmp_path / "multirun")
    for run in sweep.rglob("summary.json"):
        (run.parent / "checkpoints").mkdir()
        (run.parent / "checkpoints" / "step_3.pt").write_bytes(b"weights")
        (run.parent / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    running = sweep / "rte" / "lora_r8" / "seed0"
    write_run(running, task="rte", method="lora", target_r=8, seed=0, status="running", lr=0.02)
    dest = tmp_path / "published"
    out = subprocess.run([sys.executable, str(REPO / "experiments" / "collect_results.py"), str(sweep), str(dest)],
                         capture_output=True, text=True, check=True)
    status = [json.loads(p.read_text())["status"] for p in sweep.rglob("summary.json")]
    assert status.count("completed") == 23 and status.count("failed") == 1 and status.count("running") == 1
    assert "published 24 run folders" in out.stdout and "skipped 1" in out.stdout and "status running" in out.stdout
    assert {p.name for p in dest.rglob("*") if p.is_file()} == {
        "config.yaml", "summary.json", "metrics.jsonl", "rank_pattern.json", "rank_history.jsonl",
        "planted_ranks.json", "command.txt", "index.csv"}
    paths = [str(p.relative_to(dest)) for p in dest.rglob("summary.json")]
    assert len(paths) == 24 and not [p for p in paths if "=" in p or "," in p]  # canonical: <task>/<cell>/seed<s>
    assert (dest / "runs" / "rte" / "adalora_r2" / "seed0" / "summary.json").is_file()
    # each published run says how to rerun it: the overrides Hydra recorded, without the sweep's settings
    assert (dest / "runs" / "rte" / "adalora_r2" / "seed0" / "command.txt").read_text() == (
        "python experiments/train.py method=adalora seed=0\n")
    with open(dest / "index.csv") as f:
        index = list(csv.DictReader(f))
    assert len(index) == 24 and all(r["command"].startswith("python experiments/train.py method=") for r in index)
    failed = [r for r in index if r["status"] == "failed"]
    assert len(failed) == 1 and json.loads((dest / failed[0]["path"] / "summary.json").read_text())["error"]
    assert summary.summarize(dest, quiet=True)["rows"]  # the published folder summarizes on its own
    # a published folder republishes with a new run beside it (its runs keep their names and commands)
    from adalora_lab.publish import collect

    (sweep / "more").mkdir()
    shutil.copytree(dest / "runs", sweep / "more" / "published")
    extra = sweep / "more" / "rte" / "adalora_r2" / "seed9"
    write_run(extra, task="rte", method="adalora", target_r=2, seed=9, final={"accuracy": 0.7})
    again, _ = collect(sweep / "more", tmp_path / "again")
    names = sorted(str(p.relative_to(tmp_path / "again")) for p in again)
    assert names == sorted([str(p.parent.relative_to(dest)) for p in dest.rglob("summary.json")] + [
        "runs/rte/adalora_r2/seed9"])
    assert (tmp_path / "again" / "runs" / "rte" / "adalora_r2" / "seed0" / "command.txt").read_text() == (
        "python experiments/train.py method=adalora seed=0\n")


def test_rerun_command_keeps_the_run_overrides_and_drops_the_sweep_settings(tmp_path):
    from adalora_lab.publish import rerun_command

    (tmp_path / ".hydra").mkdir()
    assert rerun_command(tmp_path) is None  # no overrides recorded: no command
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["experiment=glue_converged", "hydra/launcher=parallel", "hydra.sweep.dir=multirun/x", "threads=1",
         "hydra.launcher.n_jobs=2", "optim.lr=0.003", "tags=[a b]"]))
    assert rerun_command(tmp_path) == ("python experiments/train.py experiment=glue_converged threads=1 "
                                       "optim.lr=0.003 'tags=[a b]'")


def test_allocation_rows_mean_rank_by_type_and_layer(summarized):
    """'Where the budget went': seed-mean rank per module type and per layer, adaptive methods only."""
    _, _, result = summarized
    alloc = {(a["task"], a["method"], a["target_r"]): a for a in result["allocation"]}
    assert ("rte", "lora", 2) not in alloc  # uniform LoRA has no allocation to report
    a = alloc["rte", "adalora", 2]
    assert a["n"] == 3
    assert a["by_type"] == pytest.approx({"query": (2 + 7 / 3 + 2) / 2, "value": (2 - 2 / 3 + 2) / 2,
                                          "ffn.in": (2 + 0) / 2})
    assert a["by_layer"] == pytest.approx({0: (2 + 7 / 3 + 2 - 2 / 3 + 2) / 3, 1: (2 + 2 + 0) / 3})
    assert "## Where the budget went" in result["markdown"]


# ------------------------------------------------------------------------------------------ statistics

T975 = {1: 12.706204736174707, 2: 4.302652729911275}  # Student t 97.5% quantiles (a t table), df 1 and 2


def _t_sf_two_sided(t: float, df: int) -> float:
    """Two-sided p of a t statistic in closed form: df=1 (Cauchy) 1 - 2/pi atan|t|, df=2 1 - |t|/sqrt(2 + t^2)."""
    t = abs(t)
    return 1 - 2 / math.pi * math.atan(t) if df == 1 else 1 - t / math.sqrt(2 + t * t)


def _by_hand(diffs: list[float]) -> tuple[float, float, float, float]:
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half, _t_sf_two_sided(mean / (sd / math.sqrt(n)), n - 1)


def _pair(items, task, method, r, metric):
    (d,) = [x for x in items if (x["task"], x["method"], x["target_r"], x["metric"]) == (task, method, r, metric)]
    return d


def test_paired_differences_vs_lora_by_hand(summarized):
    """AdaLoRA − LoRA paired by seed: mean, 95% Student-t interval and p-value against the hand computation."""
    _, out, result = summarized
    d = _pair(result["paired"], "rte", "adalora", 4, "accuracy")
    diffs = [a - b for a, b in zip(ACC["adalora", 4], ACC["lora", 4])]  # 0.10, 0.09, 0.08
    mean, lo, hi, p = _by_hand(diffs)
    assert (d["n"], d["seeds"], d["baseline"], d["which"]) == (3, [0, 1, 2], "lora", "final")
    assert (d["mean"], d["ci_low"], d["ci_high"], d["p_value"]) == pytest.approx((mean, lo, hi, p))
    assert d["std"] == pytest.approx(0.01) and lo > 0 and d["significant"] and d["favours"] == "adalora"

    # a loss (lower is better) with a failed seed: only seeds 0 and 1 are paired
    d = _pair(result["paired"], "planted_rank", "adalora", 4, "distill_loss")
    mean, lo, hi, p = _by_hand([LOSS["adalora", 4][s] - LOSS["lora", 4][s] for s in (0, 1)])
    assert (d["n"], d["seeds"]) == (2, [0, 1])
    assert (d["mean"], d["ci_low"], d["ci_high"], d["p_value"]) == pytest.approx((mean, lo, hi, p))
    assert hi < 0 and d["significant"] and d["favours"] == "adalora"

    # the best epoch: LoRA r=2's best evaluation is its first (BEST_BONUS above the final value)
    d = _pair(result["paired_best"], "rte", "adalora", 2, "accuracy")
    assert d["which"] == "best" and d["mean"] == pytest.approx(
        sum(a - (b + BEST_BONUS["lora", 2]) for a, b in zip(ACC["adalora", 2], ACC["lora", 2])) / 3)
    assert not any(x["method"] == "lora" for x in result["paired"])

    md = result["markdown"].split("## Paired differences vs LoRA")[1].split("\n## ")[0]
    line = next(x for x in md.splitlines() if x.startswith("| rte | accuracy | adalora − lora | 4 |"))
    mean, lo, hi, p = _by_hand(diffs)
    assert f"| 3 (0, 1, 2) | {100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] | {p:.3f} | **yes** (adalora) |" \
        in line
    with open(out / "summary.csv") as f:
        recs = [r for r in csv.DictReader(f) if r["stat"] == "diff_vs_lora" and r["which"] == "final"]
    rec = next(r for r in recs if (r["task"], r["method"], r["target_r"]) == ("rte", "adalora", "4"))
    assert (float(rec["ci_low"]), float(rec["ci_high"]), float(rec["p_value"])) == pytest.approx((lo, hi, p))
    assert (rec["baseline"], rec["n"], rec["significant"]) == ("lora", "3", "True")


def test_paired_stats_small_and_degenerate():
    one = summary.paired_stats([0.1])
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1) and one["significant"] is None
    assert math.isnan(one["ci_low"]) and math.isnan(one["p_value"]) and one["note"] == "n<2: no CI"
    assert summary.paired_stats([])["note"] == "no seed in both"
    same = summary.paired_stats([0.25, 0.25, 0.25])
    assert (same["ci_low"], same["ci_high"], same["significant"]) == (0.25, 0.25, True)
    assert same["note"] == "all differences equal"
    mean, lo, hi, p = _by_hand([1.0, -1.0, 3.0])
    st = summary.paired_stats([1.0, -1.0, 3.0])
    assert (st["ci_low"], st["ci_high"], st["p_value"]) == pytest.approx((lo, hi, p)) and not st["significant"]


def test_paired_uses_only_seeds_in_both(tmp_path):
    """LoRA has seeds 0, 1 and AdaLoRA 1, 2: one pair (seed 1), reported as n<2 with no interval."""
    root = tmp_path / "sweep"
    for method, seeds in (("lora", (0, 1)), ("adalora", (1, 2))):
        for seed in seeds:
            write_run(root / f"{method}{seed}", task="rte", method=method, target_r=2, seed=seed,
                      final={"accuracy": 0.5 + 0.1 * seed + (0.05 if method == "adalora" else 0.0)})
    result = summary.summarize(root, plots_=False)
    (d,) = result["paired"]
    assert (d["seeds"], d["n"], d["significant"]) == ([1], 1, None) and d["mean"] == pytest.approx(0.05)
    assert "| 1 (1) | +5.00 (n=1, no CI) | - | n<2: no CI |" in result["markdown"]


def test_plateau_check(summarized):
    """The mean last-eval gain per cell: GAIN x100 points for rte, 1/3 of the previous loss (in %) for the loss."""
    _, _, result = summarized
    gains = {(g["task"], g["method"], g["target_r"]): g for g in result["plateau"]}
    for (method, r), gain in GAIN.items():
        g = gains["rte", method, r]
        assert (g["mean"], g["n"], g["unit"]) == (pytest.approx(100 * gain), 3, "points")
        assert g["still_improving"] == (100 * gain > summary.PLATEAU_POINTS)
    g = gains["planted_rank", "adalora", 4]
    assert (g["mean"], g["n"], g["unit"]) == (pytest.approx(100 * (1 - 1 / LOSS_BEFORE)), 2, "%")
    md = result["markdown"].split("## Final and best-epoch dev metric")[1].split("\n## ")[0]
    # the late trend over the 3 evaluations (acc + BEST_BONUS, acc - GAIN, acc): slope -BEST_BONUS / 2 per eval
    for (method, r), bonus in BEST_BONUS.items():
        t = gains["rte", method, r]["trend"]
        assert (t["n"], t["mean"]) == (3, pytest.approx(-100 * bonus / 2))
    assert ("| rte | lora | 2 | 3 | 62.00 ± 2.00 | 64.00 ± 2.00 | +1.00 ± 0.00 pts (n=3) | **yes** | "
            "-1.00 [-1.00, -1.00] |") in md
    assert ("| rte | lora | 4 | 3 | 67.00 ± 2.65 | 67.00 ± 2.65 | +0.20 ± 0.00 pts (n=3) | no | "
            "+2.50 [+2.50, +2.50] **rising** |") in md


def test_late_trend_tells_a_rising_curve_from_a_noisy_plateau():
    """The slope over the last half: a curve still climbing 1 point per evaluation is rising on every seed; a flat
    curve whose last evaluation happens to jump by 1 point has a last-eval gain of 1 but no significant trend."""
    def evals(values):
        return [{"step": 10 * (i + 1), "accuracy": v} for i, v in enumerate(values)]

    rising = [evals([0.70 + 0.01 * i + 0.001 * s for i in range(8)]) for s in range(3)]
    assert [summary._late_trend(e, "accuracy", True, 100.0) for e in rising] == [pytest.approx(1.0)] * 3
    flat = [evals([0.70, 0.75, 0.80, 0.81, 0.80, 0.81, 0.80, 0.81]), evals([0.70, 0.76, 0.80, 0.80, 0.81, 0.80, 0.79,
            0.80]), evals([0.70, 0.74, 0.80, 0.81, 0.80, 0.80, 0.80, 0.81])]
    assert [summary._gain(e, "accuracy", True, 100.0) for e in flat] == [pytest.approx(1.0)] * 3
    t = summary.paired_stats([summary._late_trend(e, "accuracy", True, 100.0) for e in flat])
    assert abs(t["mean"]) < 0.3 and not t["significant"]
    assert summary._late_trend(evals([0.5, 0.6]), "accuracy", True, 100.0) is None  # fewer than 3
    loss = evals([1.0, 0.8, 0.6, 0.4])  # a loss falling 0.2 per evaluation over its last half (0.8, 0.6, 0.4)
    assert summary._late_trend([{"step": e["step"], "loss": e["accuracy"]} for e in loss], "loss", False, 1.0) == (
        pytest.approx(0.2 / 0.6 * 100))


def test_eval_records_keep_the_last_write_per_step():
    recs = [{"split": "eval", "step": 5, "a": 1}, {"split": "train", "step": 4}, {"split": "eval", "step": 3, "a": 0},
            {"split": "eval", "step": 5, "a": 2}]
    assert summary.eval_records(recs) == [{"split": "eval", "step": 3, "a": 0}, {"split": "eval", "step": 5, "a": 2}]


def _lr_sweep(root: Path, accs: dict) -> Path:
    for (method, lr), values in accs.items():
        for seed, acc in enumerate(values):
            write_run(root / f"{method}_{lr}" / f"seed={seed}", task="rte", method=method, target_r=2, seed=seed,
                      final={"accuracy": acc}, lr=lr)
    return root


def test_grid_check_and_numeric_order_of_by_values(tmp_path):
    """--by optim.lr: rows in numeric lr order; the best lr of each method flagged when it is at an edge."""
    accs = {("lora", 0.001): [0.6, 0.6], ("lora", 3e-05): [0.5, 0.6], ("lora", 0.0003): [0.7, 0.8],
            ("adalora", 3e-05): [0.5, 0.5], ("adalora", 0.001): [0.9, 0.9], ("adalora", 0.0003): [0.6, 0.6]}
    result = summary.summarize(_lr_sweep(tmp_path / "sweep", accs), plots_=False, by=["optim.lr"])
    labels = [line.split("|")[1].strip() for line in result["table"].splitlines()[2:]]
    assert labels == [f"{m} optim.lr={lr}" for m in ("lora", "adalora") for lr in (3e-05, 0.0003, 0.001)]
    grid = {g["method"]: g for g in result["grid"]}
    assert grid["lora"]["grid"] == [3e-05, 0.0003, 0.001] and grid["lora"]["best_value"] == 0.0003
    assert grid["lora"]["edge"] == "no" and grid["lora"]["best_mean"] == pytest.approx(0.75)
    assert (grid["adalora"]["best_value"], grid["adalora"]["edge"]) == (0.001, "high")
    assert "## Grid check" in result["markdown"] and "**yes (high edge)**" in result["markdown"]
    # paired at the same lr
    d = next(x for x in result["paired"] if x["method"] == "adalora optim.lr=0.001")
    assert d["baseline"] == "lora optim.lr=0.001" and d["mean"] == pytest.approx(0.3)
    assert summary.summarize(tmp_path / "sweep", plots_=False)["grid"] == []


def test_method_order(tmp_path):
    """LoRA, then AdaLoRA and its variants, then the rivals; full fine-tuning first; unknown methods last."""
    methods = ["zzz_custom", "sora", "increlora", "adalora_no_orth", "svd_lora", "lora", "adalora", "full"]
    for m in methods:
        write_run(tmp_path / "sweep" / m, task="rte", method=m, target_r=2, seed=0, final={"accuracy": 0.6})
    result = summary.summarize(tmp_path / "sweep", plots_=False)
    assert [line.split("|")[1].strip() for line in result["table"].splitlines()[2:]] == [
        "full", "lora", "adalora", "adalora_no_orth", "svd_lora", "sora", "increlora", "zzz_custom"]
    assert [d["method"] for d in result["paired"]] == [
        "full", "adalora", "adalora_no_orth", "svd_lora", "sora", "increlora", "zzz_custom"]


def test_majority_class_reference(tmp_path, summarized):
    """From the dev labels when the run's data folder is here (its first max_eval_examples), else the table."""
    dev = tmp_path / "glue" / "RTE" / "dev.tsv"
    dev.parent.mkdir(parents=True)
    labels = ["entailment", "entailment", "not_entailment", "not_entailment", "not_entailment", "not_entailment",
              "not_entailment"]
    dev.write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(f"{i}\ta\tb\t{y}\n" for i, y in enumerate(labels)))
    for limit, expected in (("null", 5 / 7), (4, 0.5)):
        folder = write_run(tmp_path / f"sweep{limit}" / "run", task="rte", method="lora", target_r=2, seed=0,
                           final={"accuracy": 0.6})
        (folder / "config.yaml").write_text(f"method:\n  name: lora\ntask:\n  name: rte\n"
                                            f"  data_dir: {dev.parent.parent}\n  max_eval_examples: {limit}\nseed: 0\n")
        refs = summary.summarize(folder.parent, plots_=False)["references"]
        assert refs == {("rte", "accuracy"): (pytest.approx(expected), "majority class")}
    _, _, result = summarized  # no data folder: the full RTE dev set's majority class; the uniform allocation
    assert result["references"]["rte", "accuracy"] == (pytest.approx(146 / 277), "majority class")
    assert result["references"]["planted_rank", "rank_recovery"] == (pytest.approx(0.25), "uniform allocation")


def test_split_by_labels_leave_out_keys_a_run_does_not_set():
    runs = [{"base_method": "lora", "config": {"optim": {"lr": 0.001}, "method": {"orth_reg_weight": None}}},
            {"base_method": "adalora", "config": {"optim": {"lr": 0.01}, "method": {"orth_reg_weight": 0.1}}}]
    labels = [r["method"] for r in summary.split_by(runs, ["optim.lr", "method.orth_reg_weight"])]
    assert labels == ["lora optim.lr=0.001", "adalora optim.lr=0.01 method.orth_reg_weight=0.1"]


def test_the_summary_reports_the_compute_of_the_completed_runs(summarized):
    _, _, result = summarized
    done = [r for r in result["runs"] if r["status"] == "completed"]
    wall = sum(r["wall_time_s"] for r in done)
    assert len(done) < len(result["runs"])  # the failed and crashed runs count nowhere
    assert (f"Compute: {wall / 3600:.2f} h of run wall time and {30 * len(done):,} optimizer steps over the "
            f"{len(done)} completed runs") in result["markdown"]


def _summarize_grid(tmp_path, accs: dict) -> dict:
    """Write one RTE run per (method, lr) and seed with the given final accuracies; summarize them by lr."""
    for (method, lr), values in accs.items():
        for seed, acc in enumerate(values):
            write_run(tmp_path / f"{method}_{lr}" / f"seed{seed}", task="rte", method=method, target_r=2, seed=seed,
                      final={"accuracy": acc}, lr=lr)
    return summary.summarize(tmp_path, out_dir=tmp_path / "out", plots_=False, by=["optim.lr"])


def test_each_method_is_compared_at_its_chosen_setting(tmp_path):
    """With --by: the cell with the most seeds is the chosen one (a protocol's extra seeds), even when a
    one-seed grid point scored higher; the paired difference is taken between the chosen cells."""
    accs = {("lora", 1e-3): [0.60, 0.62, 0.64], ("lora", 3e-3): [0.90],
            ("adalora", 1e-2): [0.70, 0.72, 0.75], ("adalora", 3e-2): [0.71]}
    result = _summarize_grid(tmp_path, accs)
    chosen = {r["base_method"]: r for r in result["chosen"]["final"] if r["is_main"]}
    assert chosen["lora"]["method"] == "lora optim.lr=0.001" and chosen["adalora"]["method"] == "adalora optim.lr=0.01"
    (diff,) = [d for d in result["chosen"]["paired_final"] if d["is_main"]]
    assert diff["n"] == 3 and diff["mean"] == pytest.approx((0.10 + 0.10 + 0.11) / 3)
    assert "## At each method's chosen setting" in result["markdown"]
    # without the chosen cells nothing pairs: lora and adalora never share an optim.lr
    assert not [d for d in result["paired_final"] if d["is_main"]]
    figs = summary.summarize(tmp_path, out_dir=tmp_path / "figs", by=["optim.lr"])["files"]["learning_curves"]
    assert [Path(f).name for f in figs] == ["learning_curves_rte.png", "learning_curves_rte_grid.png"]


def test_among_cells_with_every_seed_the_tuning_seed_chooses(tmp_path):
    """Two AdaLoRA cells ran all three seeds (the choice moved when γ was added): the one that won on seed 0, the
    tuning seed, is the chosen setting, though the other has the better 3-seed mean; choosing by that mean would
    select on the reported seeds."""
    accs = {("lora", 1e-3): [0.80, 0.81, 0.82], ("adalora", 1e-3): [0.84, 0.90, 0.90],
            ("adalora", 3e-3): [0.88, 0.83, 0.83]}
    result = _summarize_grid(tmp_path, accs)
    chosen = {r["base_method"]: r for r in result["chosen"]["final"] if r["is_main"]}
    assert chosen["adalora"]["method"] == "adalora optim.lr=0.003"
    best = {r["base_method"]: r for r in result["chosen"]["best"] if r["is_main"]}
    assert best["adalora"]["method"] == "adalora optim.lr=0.003"  # the same cell at its best evaluation
    (diff,) = [d for d in result["chosen"]["paired_final"] if d["is_main"]]
    assert diff["mean"] == pytest.approx((0.08 + 0.02 + 0.01) / 3)


def test_published_names_leave_out_null_fields_and_never_collide():
    from adalora_lab.publish import canonical_name

    base = {"task.name": "rte", "method.name": "sora", "method.target_r": 2, "seed": 0}
    varied = ["method.l1_weight", "optim.lr"]
    unset = {**base, "optim.lr": 0.02, "method.l1_weight": None}
    assert canonical_name(unset, varied) == "rte/sora_r2_optim.lr-0.02/seed0"
    assert canonical_name({**base, "optim.lr": 0.02, "method.l1_weight": 0.01}, varied) == (
        "rte/sora_r2_method.l1_weight-0.01_optim.lr-0.02/seed0")
    assert canonical_name({**base, "optim.lr": 0.02, "method.l1_weight": None}, varied, unset=True) == (
        "rte/sora_r2_method.l1_weight-None_optim.lr-0.02/seed0")


def test_the_grid_check_counts_a_failed_value_as_part_of_the_grid(tmp_path):
    """lr 1e-2 diverged in every seed: 3e-3 is then inside the grid, not at its top edge; a run still going
    counts nowhere."""
    for lr, status in ((1e-3, "completed"), (3e-3, "completed"), (1e-2, "failed"), (3e-2, "running")):
        for seed in range(2):
            write_run(tmp_path / f"lr{lr}" / f"seed{seed}", task="rte", method="lora", target_r=2, seed=seed,
                      status=status, final={"accuracy": 0.5 + 100 * lr} if status == "completed" else None,
                      error="training diverged" if status == "failed" else None, lr=lr)
    result = summary.summarize(tmp_path, out_dir=tmp_path / "out", plots_=False, by=["optim.lr"])
    (g,) = result["grid"]
    assert g["grid"] == [1e-3, 3e-3, 1e-2] and g["failed_values"] == [1e-2]
    assert g["best_value"] == 3e-3 and g["edge"] == "no"
    assert "0.01: failed" in result["markdown"]


def test_the_grid_check_compares_values_on_the_seeds_they_share(tmp_path):
    """A protocol's seed-0 grid plus seeds 1, 2 at its choice (1e-3): the extra seeds lower 1e-3's mean below
    1e-2's single seed, but on seed 0, which every value has, 1e-3 is best and inside the grid."""
    accs = {("adalora", 1e-4): [0.70], ("adalora", 1e-3): [0.83, 0.80, 0.79], ("adalora", 1e-2): [0.82]}
    result = summary.summarize(_lr_sweep(tmp_path / "sweep", accs), plots_=False, by=["optim.lr"])
    (g,) = result["grid"]
    assert (g["best_value"], g["edge"], g["seeds"]) == (1e-3, "no", [0])
    assert g["best_mean"] == pytest.approx(0.83) and g["means"][1e-3] == pytest.approx(0.83)
    assert "(seeds 0, which every value has)" in result["markdown"]
    # the same seeds everywhere: the plain means, no seed note
    even = summary.summarize(_lr_sweep(tmp_path / "even", {("lora", 1e-4): [0.6, 0.7], ("lora", 1e-3): [0.8, 0.7],
                                                           ("lora", 1e-2): [0.5, 0.6]}), plots_=False, by=["optim.lr"])
    (g,) = even["grid"]
    assert g["seeds"] is None and g["best_mean"] == pytest.approx(0.75)
    assert "which every value has" not in even["markdown"]


def test_a_new_varying_field_renames_published_runs_instead_of_publishing_them_twice(tmp_path):
    """A longer run joins a sweep already published: ``epochs`` now varies, the cells' names grow by it, and the
    runs published under the old names move to the new ones; the summary then finds each run once."""
    from adalora_lab.publish import collect

    sweep, dest = tmp_path / "sweep", tmp_path / "published"
    for lr in (0.001, 0.003):
        write_run(sweep / f"lr{lr}", task="mrpc", method="lora", target_r=2, seed=0, final={"accuracy": 0.8}, lr=lr)
    collect(sweep, dest)
    assert sorted(p.parent.name for p in (dest / "runs" / "mrpc").glob("*/seed0")) == [
        "lora_r2_optim.lr-0.001", "lora_r2_optim.lr-0.003"]
    longer = write_run(sweep / "long", task="mrpc", method="lora", target_r=2, seed=0, final={"accuracy": 0.7})
    (longer / "config.yaml").write_text((longer / "config.yaml").read_text() + "epochs: 30\n")
    _, notes = collect(sweep, dest)
    cells = sorted(p.parent.name for p in (dest / "runs" / "mrpc").glob("*/seed0"))
    assert len(cells) == 3 and all("epochs-" in c for c in cells), cells
    assert sum(n.startswith("renamed ") for n in notes) == 2
    with open(dest / "index.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    result = summary.summarize(dest, quiet=True, plots_=False, by=["optim.lr", "epochs"])
    assert result["pooling"] == [] and "## Pooling check" in result["markdown"]


def test_the_summary_names_a_run_counted_twice_and_a_field_the_cells_were_not_split_by(tmp_path, capsys):
    """Copies of one run, or runs of two lengths in one cell, would make a mean over seeds that is no experiment's:
    the summary says so first, names the folders and the field, and says how to fix it."""
    for name, epochs in (("a", 8), ("b", 8), ("c", 30)):
        run = write_run(tmp_path / name, task="mrpc", method="lora", target_r=2, seed=0 if name != "c" else 1,
                        final={"accuracy": 0.8})
        (run / "config.yaml").write_text((run / "config.yaml").read_text() + f"epochs: {epochs}\n")
    assert summary.main([str(tmp_path), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "one run is here 2 times (a, b)" in err and "epochs differs between its runs (30, 8)" in err
    assert "Fix: split the cells with --by epochs" in err
    md = (tmp_path / "summary.md").read_text()
    assert md.index("## Pooling check") < md.index("## Final and best-epoch dev metric")
    assert "| mrpc | lora | 2 | epochs differs between its runs (30, 8) | split the cells with --by epochs |" in md
    # split by the length, the 8-epoch cell still holds the copy, the 30-epoch cell is clean
    problems = summary.summarize(tmp_path, quiet=True, plots_=False, by=["epochs"])["pooling"]
    assert [p["problem"] for p in problems] == ["one run is here 2 times (a, b)"]


def test_where_summarizes_one_slice_of_a_folder_with_its_own_chosen_cells(tmp_path, capsys):
    """--where epochs=30 keeps the 30-epoch runs only: the chosen cells and their paired difference are those of
    that length, though the 8-epoch cells have more seeds (and would be chosen without it). The slice needs --out,
    so that it cannot overwrite the folder's own summary, and a value no run has is an error naming the values."""
    accs = {("lora", 8, 1e-3): [0.80, 0.81, 0.82, 0.83], ("adalora", 8, 1e-3): [0.90, 0.91, 0.92, 0.93],
            ("lora", 30, 1e-3): [0.70, 0.72], ("adalora", 30, 1e-3): [0.71, 0.75]}
    for (method, epochs, lr), values in accs.items():
        for seed, acc in enumerate(values):
            folder = write_run(tmp_path / "sweep" / f"{method}_{epochs}" / f"seed{seed}", task="rte", method=method,
                               target_r=2, seed=seed, final={"accuracy": acc}, lr=lr)
            with open(folder / "config.yaml", "a") as f:
                f.write(f"epochs: {float(epochs)}\n")  # as the preset resolves it: 30.0
    result = summary.summarize(tmp_path / "sweep", out_dir=tmp_path / "e30", plots_=False, by=["optim.lr"],
                               where={"epochs": "30"})
    assert len(result["runs"]) == 4 and not result["pooling"]
    assert result["markdown"].startswith(f"# Summary: {tmp_path / 'sweep'} (runs with epochs=30)\n")
    (diff,) = [d for d in result["chosen"]["paired_final"] if d["is_main"]]
    assert diff["n"] == 2 and diff["mean"] == pytest.approx((0.01 + 0.03) / 2)
    # without --where the folder pools two lengths in one cell: the pooling check says so
    assert summary.summarize(tmp_path / "sweep", out_dir=tmp_path / "all", plots_=False, by=["optim.lr"])["pooling"]

    assert main_cli([str(tmp_path / "sweep"), "--where", "epochs=30"]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "summary.md").exists()
    assert main_cli([str(tmp_path / "sweep"), "--where", "epochs=16", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--where epochs=16: no run matches" in err and "{30.0, 8.0}" in err
    assert main_cli([str(tmp_path / "sweep"), "--where", "epochs", "--out", str(tmp_path / "x")]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
