"""Shared fixtures: tiny random transformers models (built from configs, never downloaded), MLPs, GLUE data;
and how the default run spreads over its two pytest-xdist workers.

Helpers that tests import live in helpers.py and fake_runs.py; this file holds fixtures and that one hook.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

# Tiny models gain nothing from intra-op threads, and on a shared 2-core box oversubscribed
# threads make each step ~10x slower; one thread keeps the suite fast and deterministic.
torch.set_num_threads(1)


# Modules whose module-scoped fixtures build expensive shared state (entry-point subprocesses, finished
# sweeps, a reference run, a process group): each runs whole on one worker, so that it is built once, not on
# both. Every other test goes to whichever worker is free. (xdist's own `xdist_group` mark cannot do this on
# pytest 9, whose node ids it no longer rewrites.)
ONE_WORKER_MODULES = ("tests/test_bad_inputs.py", "tests/test_sweep_failures.py", "tests/test_reproduce.py",
                      "tests/test_distributed.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With ``--dist loadscope`` (pyproject.toml's default): the modules above each as one unit, the largest
    first, and every other test on its own."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module.endswith(ONE_WORKER_MODULES) else nodeid

    return ModuleUnits(config, log)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so it is reproducible on its own."""
    torch.manual_seed(0)


def _bert(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _mlp(seed: int = 0, n_in: int = 8, hidden: int = 16, n_out: int = 4):
    """nn.Sequential(Linear, ReLU, Linear): target modules "0" and "2"."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def _deep_mlp(seed: int = 0):
    """Four linears "0", "2", "4", "6" where "0" and "6" share a shape but are not neighbours,
    so the allocator's shape-grouped order (0, 6, 2, 4) differs from the module order."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 8))


@pytest.fixture
def make_bert():
    """Builder ``make_bert(seed=0)``: the same seed gives the same base weights."""
    return _bert


@pytest.fixture
def make_gpt2():
    return _gpt2


@pytest.fixture
def make_mlp():
    return _mlp


@pytest.fixture
def make_deep_mlp():
    return _deep_mlp


@pytest.fixture
def tiny_bert():
    return _bert()


@pytest.fixture
def tiny_gpt2():
    return _gpt2()


@pytest.fixture
def mlp():
    return _mlp()


@pytest.fixture
def bert_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (4, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}


@pytest.fixture
def gpt2_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _mlp_batches(n: int, n_in: int = 8, n_out: int = 4, batch: int = 16, seed: int = 3):
    """A fixed list of (x, y) regression batches; the same seed gives the same data."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, n_in, generator=g), torch.randn(batch, n_out, generator=g)) for _ in range(n)]


@pytest.fixture
def batches():
    """``batches(n, n_in=8, n_out=4)``: deterministic regression data for the MLPs."""
    return _mlp_batches


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """A small GLUE-format folder for all 8 tasks (``helpers.make_glue_dir``), built once per session.

    Pass it as ``task.data_dir=<glue_dir>`` or ``paths.glue_dir=<glue_dir>`` (or ADALORA_GLUE_DIR through
    ``monkeypatch``); nothing global is set here. Tests must not write into it.
    """
    from helpers import make_glue_dir  # not at the top: helpers imports Hydra, which the library tests do not need

    return make_glue_dir(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def shared_glue() -> Path:
    """The real GLUE files (../shared/data/glue beside the checkout), for tests marked ``shared_data``."""
    from helpers import SHARED_GLUE

    if not (SHARED_GLUE / "RTE" / "dev.tsv").is_file():
        pytest.skip(f"the shared GLUE files are not at {SHARED_GLUE}")
    return SHARED_GLUE
