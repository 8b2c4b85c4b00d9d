"""The two benchmark scripts run (``--quick``), print their tables and exit 0.

Timings are never asserted (benchmarks are not timed tests); only structural facts are: the
allocator's EMA memory is 2 x adapter params x 4 bytes while scoring and 0 once the pattern is
frozen (PEFT keeps 3x), both allocators compute the same EMAs and masks on the same inputs, and
compaction leaves exactly the target budget.
"""

from __future__ import annotations

import re

import pytest
import torch


def _rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == before, "a benchmark left torch's thread count changed"


# The benchmark modules are imported inside the tests: their print functions take ``file=sys.stdout`` as a default
# argument, bound at import, so an import at collection time would print past ``capsys``.


def test_bench_allocator_quick(capsys):
    from adalora_lab import bench_allocator as bench

    assert bench.main(["--quick", "--reps", "5", "--warmup", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "threads 1" in out
    steps = _rows(out, "| config | matrices |")
    assert len(steps) == 1 and steps[0][0] == "MiniLM-L6 h384" and steps[0][1] == "36"
    assert steps[0][2] == "0.50M"
    for cell in steps[0][3:10]:
        assert float(cell) > 0
    mem = _rows(out, "| config | adapter params | ours scoring")
    assert mem[0][7] == "2x" and mem[0][8] == "3x"  # EMA bytes / (adapter params x 4): ours 2, PEFT 3
    assert mem[0][3] == "0" and mem[0][4] == "0"  # ours: freed in the final phase and after compaction
    check = _rows(out, "| config | max rel. diff")
    assert float(check[0][1]) < 1e-4
    assert check[0][2].startswith("0 /")  # the same kept triplets as PEFT
    assert check[0][3] == "288 / 288"


def test_bench_allocator_structure():
    """The numbers behind the memory table, straight from run_config."""
    from adalora_lab import bench_allocator as bench

    r = bench.run_config("minilm", reps=2, warmup=1, check=False)
    n = r["params"]
    assert n == 6 * (4 * 12 * (384 + 384 + 1) + 2 * 12 * (384 + 1536 + 1))
    assert r["ema_ours_scoring"] == 2 * n * 4
    assert r["ema_ours_final"] == 0 and r["ema_ours_compact"] == 0
    assert r["ema_peft_scoring"] == 3 * n * 4
    assert r["final_rank_ours"] == r["target_budget"] == 8 * 36


def test_bench_step_quick(capsys):
    from adalora_lab import bench_step as bench

    assert bench.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = {r[0]: r for r in _rows(out, "| method | trainable params |")}
    assert list(rows) == ["frozen", "lora", "adalora", "adalora-compact", "peft"]
    for r in rows.values():
        assert float(r[3]) > 0 and float(r[4]) > 0 and float(r[7]) > 0
    assert rows["lora"][5] == "1.000"
    ints = {k: int(r[2].replace(",", "")) for k, r in rows.items()}  # adapter params
    assert ints["frozen"] == 0
    assert ints["adalora"] == ints["peft"] == 498_096  # init_r 12 on MiniLM's 36 matrices
    assert ints["adalora-compact"] < ints["adalora"]
    mib = lambda s: 0.0 if s == "0" else float(s.split()[0])  # noqa: E731
    assert mib(rows["adalora"][11]) == pytest.approx(2 * 498_096 * 4 / 2**20, abs=0.01)  # Ī and Ū
    assert mib(rows["adalora-compact"][11]) == 0
    assert mib(rows["peft"][11]) == pytest.approx(3 * 498_096 * 4 / 2**20, abs=0.01)
    assert mib(rows["lora"][11]) == 0 and mib(rows["frozen"][11]) == 0
    # Adam keeps 2 fp32 tensors per trainable param (+ a scalar step each)
    assert mib(rows["adalora"][10]) == pytest.approx(2 * int(rows["adalora"][1].replace(",", "")) * 4 / 2**20, rel=0.01)
    inf = {r[0]: r for r in _rows(out, "| model | ms median |")}
    assert set(inf) == {"base", "lora merged", "adalora merged", "peft merged"}
    assert inf["base"][3] == "1.000"
    assert re.search(r"\| MiniLM-L6 \(packaged\) \| \d+\.\d{3} \| \d+\.\d{3} \| \d+\.\d{3} \|", out)
    assert "compacted ranks sum 288" in out
