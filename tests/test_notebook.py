"""notebooks/rank_allocation.ipynb runs top to bottom against a fake multirun (ADALORA_RUN_DIR)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fake_runs import make_multirun

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "rank_allocation.ipynb"


def _kernelspec(tmp_path: Path) -> str:
    """A kernelspec that runs this interpreter (the venv's), found through JUPYTER_PATH."""
    name = "adalora-test"
    kdir = tmp_path / "jupyter" / "kernels" / name
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "adalora test", "language": "python"}))
    return name


def test_committed_notebook_is_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert 'os.environ.get("ADALORA_RUN_DIR"' in code[0].source and "RUN_DIR" in code[0].source


def test_notebook_runs_on_a_multirun(tmp_path, monkeypatch):
    root = make_multirun(tmp_path / "multirun")
    kernel = _kernelspec(tmp_path)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("ADALORA_RUN_DIR", str(root))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=120,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on any failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    texts = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(root) in texts
    markdown = "".join(o["data"].get("text/markdown", "") for o in outputs if o.output_type == "display_data")
    assert "72.00 ± 2.00" in markdown and "Failed / incomplete runs" in markdown
    assert "## Paired differences vs LoRA" in markdown and "## Final and best-epoch dev metric" in markdown
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o["data"]]
    # comparison, budget; learning curves of 2 tasks, LoRA vs AdaLoRA growth at 2 budgets; 4 heat maps; one run:
    # rank history, learning curves, growth
    assert len(images) == 2 + 2 + 2 + 4 + 3
    out = root / "summary"
    assert (out / "summary.md").exists()
    for name in ("rank_history.png", "run_learning_curves.png", "run_growth.png", "budget_vs_metric.png"):
        assert (out / name).stat().st_size > 5000
