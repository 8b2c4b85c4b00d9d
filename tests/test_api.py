"""The public API snippet, as written in the issue, on a tiny BERT classifier, an MLP and GPT-2; the PEFT-named
calls in the order a PEFT user reaches for them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adalora
from adalora import AdaLoRAConfig, LoRAConfig, RankAllocator, inject_adapters, orthogonal_regularization


def _snippet_cfg(targets):
    return AdaLoRAConfig(init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.0,
                         target_modules=targets, tinit=10, tfinal=20, delta_t=5,
                         beta1=0.85, beta2=0.85, orth_reg_weight=0.1, total_steps=200)


def _run_snippet(model, cfg, task_loss_fn, n_modules):
    adapters = inject_adapters(model, cfg)  # {module name: adapter module}, base frozen
    assert len(adapters) == n_modules
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n
               and not any(n.startswith(m) for m in cfg.modules_to_save))
    allocator = RankAllocator(adapters, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses, budgets = [], []
    for global_step in range(1, cfg.total_steps + 1):
        task_loss = task_loss_fn(model, global_step)
        loss = task_loss + cfg.orth_reg_weight * orthogonal_regularization(adapters)
        loss.backward()
        optimizer.step()
        info = allocator.step(global_step)  # after optimizer.step(), before zero_grad()
        optimizer.zero_grad()
        pattern = allocator.rank_pattern()  # {module name: kept rank}
        if info.masked:
            assert sum(pattern.values()) == info.budget
        losses.append(task_loss.item())
        budgets.append(info.budget)
    pattern = allocator.rank_pattern()
    assert list(pattern) == list(adapters)
    assert sum(pattern.values()) == cfg.target_r * n_modules
    assert budgets[0] == cfg.init_r * n_modules and budgets[-1] == cfg.target_r * n_modules
    assert all(b1 >= b2 for b1, b2 in zip(budgets, budgets[1:]))
    return adapters, allocator, losses


def test_public_api_on_bert_sequence_classification(make_bert):
    """The snippet's config exactly as written (no modules_to_save: the random head stays frozen)."""
    model = make_bert(0)
    head = model.classifier.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (8, 12), generator=g)
    labels = (ids[:, 0] % 2).long()
    _, _, losses = _run_snippet(model, _snippet_cfg(["query", "value"]),
                                lambda m, t: m(input_ids=ids, labels=labels).loss, 4)
    assert torch.equal(model.classifier.weight, head)
    assert min(losses[-10:]) < losses[0]


def test_public_api_on_plain_mlp(make_mlp):
    model = make_mlp(0, n_in=16, hidden=32, n_out=12)  # every module at least init_r=12 wide
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=g)
    y = torch.randn(32, 12, generator=g)
    _, _, losses = _run_snippet(model, _snippet_cfg(["0", "2"]), lambda m, t: F.mse_loss(m(x), y), 2)
    assert losses[-1] < losses[0]


def test_gpt2_c_attn_conv1d_with_the_allocator(make_gpt2, gpt2_batch):
    model = make_gpt2(0)
    cfg = AdaLoRAConfig(init_r=6, target_r=2, target_modules=["c_attn"], tinit=3, tfinal=5, delta_t=2,
                        total_steps=20)
    adapters = inject_adapters(model, cfg)
    allocator = RankAllocator(adapters, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for t in range(1, 21):
        loss = model(**gpt2_batch).loss
        (loss + cfg.orth_reg_weight * orthogonal_regularization(adapters)).backward()
        opt.step()
        allocator.step(t)
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(allocator.rank_pattern().values()) == 2 * 2
    assert losses[-1] < losses[0]


def test_lora_baseline_api(make_mlp):
    model = make_mlp(0)
    adapters = inject_adapters(model, LoRAConfig(r=4, target_modules=["0", "2"]))
    assert orthogonal_regularization(adapters).item() == 0.0  # nothing to regularize for plain LoRA
    assert adalora.count_trainable(model) == 4 * (8 + 16) + 4 * (16 + 4)


def test_peft_style_calls(make_bert, tmp_path):
    """all-linear, the trainable-parameter line, save_pretrained / from_pretrained and merge_and_unload."""
    model = make_bert(0)
    cfg = AdaLoRAConfig(init_r=4, target_r=2, target_modules="all-linear", modules_to_save=["classifier"], tinit=2,
                        tfinal=3, delta_t=1, total_steps=10)
    adapters = inject_adapters(model, cfg)
    assert len(adapters) == 13 and "classifier" not in adapters  # 6 linears x 2 layers + pooler, not the head
    line = adalora.trainable_summary(model)
    trainable, total = (int(part.split(": ")[1].replace(",", "")) for part in line.split(" || ")[:2])
    assert trainable == adalora.count_trainable(model) and total == sum(p.numel() for p in model.parameters())
    allocator = RankAllocator(adapters, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (8, 12), generator=g)
    for t in range(1, 11):
        (model(input_ids=ids, labels=ids[:, 0] % 2).loss + cfg.orth_reg_weight
         * orthogonal_regularization(adapters)).backward()
        opt.step()
        allocator.step(t)
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    adalora.save_pretrained(model, tmp_path / "adapter", cfg, allocator, task_type="SEQ_CLS")
    loaded = adalora.from_pretrained(make_bert(0), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-6, rtol=1e-6)
        merged = adalora.merge_and_unload(loaded)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in make_bert(0).parameters())


def test_public_names_are_exported():
    for name in adalora.__all__:
        assert hasattr(adalora, name), name
    assert adalora.__version__


def test_wheel_builds_without_warnings_and_ships_py_typed(tmp_path):
    """setuptools builds the wheel with every warning an error (no `project.license` table deprecation), and the
    wheel carries adalora/py.typed (PEP 561) and the license file."""
    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, tmp_path)
    for pkg in ("adalora", "experiments/adalora_lab"):
        shutil.copytree(root / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    code = "from setuptools import build_meta as b; print(b.build_wheel('dist'))"
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "dist" / out.stdout.split()[-1]) as whl:
        names = whl.namelist()
        meta = whl.read("adalora-0.1.0.dist-info/METADATA").decode()
    assert "adalora/py.typed" in names and "adalora-0.1.0.dist-info/licenses/LICENSE" in names
    assert "adalora_lab/loop.py" in names  # the experiment package ships beside the library
    assert "License-Expression: MIT" in meta


def test_every_library_module_imports_without_the_experiment_extras():
    """adalora/ is the library alone: each of its modules imports with scipy, sklearn, matplotlib, hydra,
    omegaconf, wandb and peft unavailable (checked in a fresh interpreter that refuses those imports)."""
    code = """
import importlib, importlib.machinery, pkgutil, sys
BLOCKED = ("scipy", "sklearn", "matplotlib", "hydra", "omegaconf", "wandb", "peft", "adalora_lab")
class Hide:  # the path finder, blind to the blocked packages: to every importer they are not installed
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
    invalidate_caches = staticmethod(importlib.machinery.PathFinder.invalidate_caches)
    find_distributions = staticmethod(importlib.machinery.PathFinder.find_distributions)
sys.meta_path = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path
                 if "editable" not in type(f).__module__.lower() or "adalora" not in repr(f).lower()]
import adalora
names = [m.name for m in pkgutil.walk_packages(adalora.__path__, "adalora.")]
for name in names:
    importlib.import_module(name)
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "a blocked package was imported"
print(len(names))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 15  # every module was walked
