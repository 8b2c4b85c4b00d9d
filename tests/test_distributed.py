"""DDP with the controllers: 2 gloo processes on CPU keep the same rank patterns and weights (AdaLoRA, SoRA,
IncreLoRA), and match a single process that trains on the full global batch (AdaLoRA, SoRA)."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from adalora import (
    AdaLoRAConfig,
    IncreLoRAConfig,
    LoRAConfig,
    RankAllocator,
    SoRAConfig,
    adaptive,
    inject_adapters,
    inject_method,
    make_controller,
    orthogonal_regularization,
)
from adalora import distributed as D

WORLD = 2
GLOBAL_BATCH = 16
STEPS = 40
TARGETS = ["0", "2", "4"]

# what each scenario varies; the rest is alloc="first" (allocator before DDP), no compaction, the SVD adapter,
# one micro-batch per step, honest scores
SCENARIOS = {
    "alloc_then_ddp": {},
    "ddp_then_alloc": {"alloc": "after"},
    "compact_rewrap": {"compact": True},
    "prune_lora": {"adapter": "lora"},
    "grad_accum": {"accum": 2},
    "perturbed_scores": {"perturb": True},  # rank 1 scores with noise: only the broadcast keeps it in line
}
HONEST = [n for n, s in SCENARIOS.items() if not s.get("perturb")]
# the rivals, 20 steps each; "perturbed": rank 1's own decision is pushed off rank 0's before each sync
RIVALS = {"sora": {}, "sora_perturbed": {"perturb": True}, "increlora": {}, "increlora_perturbed": {"perturb": True}}
RIVAL_STEPS = 20


def _cfg(adapter: str) -> AdaLoRAConfig:
    return AdaLoRAConfig(init_r=6, target_r=2, lora_alpha=8.0, target_modules=TARGETS, tinit=4, tfinal=10,
                         delta_t=3, total_steps=STEPS, orth_reg_weight=0.1, adapter=adapter,
                         rank_pattern={"4": 4})  # "4" is Linear(16 -> 4): a rank above 4 is refused


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _global_batches():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 4, generator=g)
    out = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 8, generator=g)
        out.append((x, torch.tanh(x @ w) + 0.1 * torch.randn(GLOBAL_BATCH, 4, generator=g)))
    return out


def _grads_in_flat(alloc: RankAllocator) -> bool:
    g = alloc.layout.grads
    lo, hi = g.data_ptr(), g.data_ptr() + g.numel() * g.element_size()
    params = [getattr(s.module, s.name) for s in alloc.layout.spans]
    return all(p.grad is not None and lo <= p.grad.data_ptr() < hi for p in params)


def run_scenario(name: str) -> dict:
    """Train one scenario in this process: DDP over the process group when there is one, else alone."""
    sc = SCENARIOS[name]
    accum = sc.get("accum", 1)
    cfg = _cfg(sc.get("adapter", "svd"))
    model = _model()
    adapters = inject_adapters(model, cfg)

    def make_alloc():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return RankAllocator(adapters, cfg)

    alloc = make_alloc() if sc.get("alloc", "first") == "first" else None
    net = D.wrap_ddp(model)
    if alloc is None:
        alloc = make_alloc()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    noise = torch.Generator().manual_seed(100 + D.rank())
    rec = {"patterns": [], "keeps": [], "differed": [], "grads_in_flat": [], "ddp": net is not model}
    for t, batch in enumerate(_global_batches(), 1):
        local, w = D.shard_batch(batch)  # this rank's rows; w weights its mean loss to the global mean
        for m in range(accum):
            (x, y), wm = D.shard_batch(local, m, accum)  # micro-batches of this rank's rows
            with D.grad_sync(net, enabled=m == accum - 1):  # all-reduce once, after the last micro-batch
                loss = D.weight_loss(F.mse_loss(net(x), y), w * wm)
                loss = loss + cfg.orth_reg_weight * orthogonal_regularization(adapters)
                (loss / accum).backward()
        if t >= 2 and not alloc.compacted:
            rec["grads_in_flat"].append(_grads_in_flat(alloc))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        if sc.get("perturb") and D.rank() == 1 and alloc.ema_ipt is not None:  # scores that disagree with rank 0's
            alloc.ema_ipt.mul_(torch.rand(alloc.ema_ipt.shape, generator=noise) * 4)
        info = alloc.step(t)
        rec["differed"].append(D.sync_allocator(alloc, info))
        opt.zero_grad(set_to_none=False)
        if info.masked and not alloc.compacted:
            rec["patterns"].append((t, alloc.rank_pattern()))
            rec["keeps"].append(alloc.keep.clone())
            if D.is_dist():
                assert D.masks_agree(alloc)
        if sc.get("compact") and info.phase == "final" and not alloc.compacted:
            alloc.compact(opt)
            net = D.wrap_ddp(D.unwrap(net))  # new Parameter objects: DDP is rebuilt around them
    rec["final_pattern"] = alloc.rank_pattern()
    rec["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return rec


def _rival_cfg(name: str):
    if name.startswith("sora"):
        return SoRAConfig(r=4, lora_alpha=8.0, target_modules=TARGETS, threshold=3e-3, l1_weight=0.5)
    return IncreLoRAConfig(init_r=1, target_r=3, lora_alpha=8.0, target_modules=TARGETS, tinit=2, delta_t=3, top_h=1,
                           incre_rank_num=1, total_steps=RIVAL_STEPS, restart_warmup=2)


def run_rival(name: str) -> dict:
    """The generic loop of adalora.adaptive under DDP (or alone), with sync_controller after every step and DDP
    rebuilt whenever the controller replaced Parameters."""
    cfg, lr = _rival_cfg(name), 2e-2
    model = _model()
    adapters = inject_method(model, cfg)
    ctrl = make_controller(adapters, cfg, lr=lr)
    own = {id(p) for p in adaptive.own_parameters(ctrl)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in own], lr=lr)
    adaptive.attach_optimizer(ctrl, opt)
    net = D.wrap_ddp(model)
    version = adaptive.structure_version(ctrl)
    noise = torch.Generator().manual_seed(100 + D.rank())
    perturb = RIVALS[name].get("perturb") and D.rank() == 1
    rec = {"patterns": [], "differed": [], "agree": [], "ddp": net is not model}
    for t, batch in enumerate(_global_batches()[:RIVAL_STEPS], 1):
        adaptive.set_lr(ctrl, lr)
        (x, y), w = D.shard_batch(batch)
        reg = adaptive.regularization(ctrl)
        loss = D.weight_loss(F.mse_loss(net(x), y), w)
        (loss if reg is None else loss + reg).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        if perturb and name.startswith("sora"):  # rank 1's gates take another step than rank 0's
            for a in adapters.values():
                a.lora_E.grad.mul_(torch.rand(a.lora_E.shape, generator=noise) * 4)
        if perturb and name.startswith("increlora") and ctrl.ema_ipt is not None:  # rank 1 scores otherwise
            ctrl.ema_ipt.mul_(torch.rand(ctrl.ema_ipt.shape, generator=noise) * 4)
        info = ctrl.step(t)
        rec["differed"].append(D.sync_controller(ctrl, info))
        opt.zero_grad()
        adaptive.zero_grad(ctrl)
        rec["patterns"].append(ctrl.rank_pattern())
        rec["agree"].append(D.masks_agree(ctrl))
        if adaptive.structure_version(ctrl) != version:  # IncreLoRA grew: new Parameters, so a new DDP
            version = adaptive.structure_version(ctrl)
            net = D.wrap_ddp(D.unwrap(net))
    rec["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return rec


def _rank0_module_steps() -> int:
    """A module at rank 0 (as after compacting it away) skips its adapter: DDP must not wait for its grads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    inject_adapters(model, LoRAConfig(r=2, target_modules=["0", "2"], rank_pattern={"2": 0}))
    net = D.wrap_ddp(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps = 0
    for x, y in _global_batches()[:3]:
        F.mse_loss(net(x), y).backward()  # plain DDP raises "Expected to have finished reduction" here
        opt.step()
        opt.zero_grad()
        steps += 1
    return steps


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert D.init_from_env(timeout_s=120)
    try:
        assert (D.rank(), D.world_size(), D.is_main()) == (rank, world, rank == 0)
        results = {name: run_scenario(name) for name in SCENARIOS}
        results.update({name: run_rival(name) for name in RIVALS})
        results["object"] = D.broadcast_object(f"from rank {rank}")
        results["mean"] = D.mean_across_ranks(float(rank))
        results["rank0_module_steps"] = _rank0_module_steps()
        D.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        D.cleanup()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_results():
    assert not D.is_dist()
    return {**{name: run_scenario(name) for name in HONEST}, "sora": run_rival("sora")}


def test_helpers_across_ranks(ddp_results):
    r0, r1 = ddp_results
    assert r0["object"] == r1["object"] == "from rank 0"
    assert r0["mean"] == r1["mean"] == 0.5
    assert r0["rank0_module_steps"] == r1["rank0_module_steps"] == 3


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_agree(ddp_results, name):
    r0, r1 = ddp_results[0][name], ddp_results[1][name]
    assert r0["ddp"] and r1["ddp"]
    assert len(r0["patterns"]) > 5
    assert r0["patterns"] == r1["patterns"]  # identical rank patterns at every masking step
    assert all(torch.equal(a, b) for a, b in zip(r0["keeps"], r1["keeps"]))
    assert r0["final_pattern"] == r1["final_pattern"]
    assert r0["weights"].keys() == r1["weights"].keys()
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k  # bit-identical parameters on both ranks
    # DDP writes the averaged gradients into p.grad in place, i.e. into the allocator's flat buffer
    assert r0["grads_in_flat"] and all(r0["grads_in_flat"]) and all(r1["grads_in_flat"])


@pytest.mark.parametrize("name", HONEST)
def test_ddp_matches_single_process(ddp_results, single_results, name):
    d, s = ddp_results[0][name], single_results[name]
    assert not any(d["differed"])  # under DDP the scores agree: the broadcast never had to correct a mask
    assert d["patterns"] == s["patterns"]
    assert d["final_pattern"] == s["final_pattern"]
    assert d["weights"].keys() == s["weights"].keys()
    for k in s["weights"]:
        torch.testing.assert_close(d["weights"][k], s["weights"][k], atol=1e-5, rtol=1e-4, msg=k)


def test_sync_corrects_diverging_scores(ddp_results):
    """Rank 1 scores with noise, so left alone it would mask differently; the broadcast of rank 0's mask
    and singular values keeps the ranks identical anyway."""
    r0, r1 = ddp_results[0]["perturbed_scores"], ddp_results[1]["perturbed_scores"]
    assert not any(r0["differed"])
    assert any(r1["differed"])  # the perturbation did change rank 1's local decision


@pytest.mark.parametrize("name", list(RIVALS))
def test_rival_ranks_agree(ddp_results, name):
    """SoRA's gates and IncreLoRA's growth are rank 0's on both ranks at every step, weights bit for bit."""
    r0, r1 = ddp_results[0][name], ddp_results[1][name]
    assert r0["ddp"] and r1["ddp"]
    assert r0["patterns"] == r1["patterns"] and all(r0["agree"]) and all(r1["agree"])
    assert r0["weights"].keys() == r1["weights"].keys()
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    final = sum(r0["patterns"][-1].values())
    if name.startswith("sora"):
        assert final < 4 * len(TARGETS)  # gates reached 0
    else:
        assert final == 3 * len(TARGETS) and sum(r0["patterns"][0].values()) == len(TARGETS)  # grew to the target
    assert not any(r0["differed"])  # rank 0 keeps its own decision
    if name.endswith("perturbed"):
        assert any(r1["differed"])  # rank 1's own decision was another one, and the sync replaced it


def test_sora_ddp_matches_single_process(ddp_results, single_results):
    d, s = ddp_results[0]["sora"], single_results["sora"]
    assert not any(d["differed"])
    assert d["patterns"] == s["patterns"]
    for k in s["weights"]:
        torch.testing.assert_close(d["weights"][k], s["weights"][k], atol=1e-5, rtol=1e-4, msg=k)


def test_single_process_fallbacks():
    assert not D.is_dist()
    assert (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)
    model = nn.Linear(2, 2)
    assert D.wrap_ddp(model) is model and D.unwrap(model) is model
    batch = {"x": torch.arange(5.0), "y": torch.arange(5)}
    assert D.shard_batch(batch) == (batch, 1.0)
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.mean_across_ranks(torch.tensor(2.5)) == 2.5
    D.barrier()
    cfg = _cfg("svd")
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alloc = RankAllocator(inject_adapters(m, cfg), cfg)
    assert D.sync_allocator(alloc) is False and D.masks_agree(alloc)


def test_init_from_env_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.env_world_size() == 1 and D.init_from_env() is False and not D.is_dist()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init_from_env()


@pytest.mark.parametrize("n", [16, 7, 1])
def test_shard_batch_weights_give_the_global_mean(n):
    """Any split (also uneven, also an empty share): sum over ranks of weight * local mean / world = global mean."""
    x = torch.randn(n, 3)
    total = 0.0
    rows = []
    for r in range(WORLD):
        (local,), w = D.shard_batch((x,), r, WORLD)
        rows.append(local)
        total = total + D.weight_loss(local.square().mean(), w) / WORLD
    assert torch.equal(torch.cat(rows), x)
    torch.testing.assert_close(total, x.square().mean())
    if n == 16:
        assert D.shard_batch(x, 1, WORLD)[1] == 1.0 and torch.equal(D.shard_batch(x, 1, WORLD)[0], x[8:])
