#!/usr/bin/env python
"""Allocator micro-benchmark: our flat-buffer ``RankAllocator.step`` vs PEFT 0.21.2's ``update_and_allocate``.

    python experiments/bench_allocator.py            # MiniLM shapes + BERT-base width at 12/24/48 layers (< 2 min)
    python experiments/bench_allocator.py --quick    # MiniLM shapes only, few repetitions (the test's variant)

Both sides live in one process and get the same model shapes, the same adapter values (A, E, B) and
the same gradients (random, filled once into ``.grad`` of every adapter parameter; no forward pass).
Per configuration it times, interleaved repetition by repetition so noise hits every column alike:

- a *scoring* step: a step inside the budget-decreasing phase that is not on the mask interval
  (sensitivity + the two EMAs; PEFT also loops over every named parameter of the model);
- a *masking* step: a step on a multiple of ``delta_t`` (scoring + triplet scores + global top-b mask;
  PEFT adds a ``kthvalue(...).item()`` and ``.tolist()`` host sync);
- ``ours gather``: our scoring step when the gradients are not views of the flat buffer (what
  ``zero_grad(set_to_none=True)`` leaves): one gather copy per parameter;
- the *floor*: the same EMA math on one preallocated flat buffer of the same size
  (I = |w*g|, two in-place EMA updates, no temporaries allocated; 8 eager kernels), and
  *floor lerp*: the same with each EMA as one ``lerp_`` (6 kernels);
- a *final-phase* step (scores frozen, the fixed pattern re-applied every step).
A cross-check then runs both allocators a few steps on identical inputs and compares Ī and the masks.

Base weights are materialised with ``to_empty`` (uninitialised): the allocators never read them, and
random-initialising a 48-layer BERT-base would cost ~15 s per copy. Timings are medians in ms (wall).
The interleaving means each side starts with the other's data in cache, as after a training step's
optimizer update, so the floor here is a cold-ish one, above a hot-loop measurement of the same ops.
On a shared host other processes stall multi-threaded ops (a descheduled OpenMP thread holds the
barrier for a scheduler quantum, ~50 ms): our big flat ops are exposed, PEFT's small per-tensor ops
run single-threaded and are not. ``--threads 1`` gives stable numbers there; ``--budget-s`` bounds
the time per configuration.

Importable: ``main(argv) -> int`` and ``run_config(...) -> dict``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
PEFT_TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]  # suffixes: same 6 per layer
BETA = 0.85

# (label, layers, hidden, intermediate, heads)
CONFIGS = {
    "minilm": ("MiniLM-L6 h384", 6, 384, 1536, 12),
    "bert12": ("BERT 12L h768", 12, 768, 3072, 12),
    "bert24": ("BERT 24L h768", 24, 768, 3072, 12),
    "bert48": ("BERT 48L h768", 48, 768, 3072, 12),
}


def _bert_shapes(layers: int, hidden: int, inter: int, heads: int):
    """A BertModel of the given shape with uninitialised base weights (nothing reads them here)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=64)
    with torch.device("meta"):
        model = BertModel(cfg, add_pooling_layer=False)
    return model.to_empty(device="cpu")


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _timed(f, arg=None) -> tuple[float, object]:
    """(wall ms, result) of f(arg), or of f() when arg is None."""
    t0 = time.perf_counter_ns()
    out = f() if arg is None else f(arg)
    return (time.perf_counter_ns() - t0) / 1e6, out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def build_sides(layers, hidden, inter, heads, *, init_r, target_r, delta_t, total_steps, seed=0):
    """Two copies of the same shapes: ours (inject_adapters + RankAllocator) and PEFT (get_peft_model)."""
    from peft import AdaLoraConfig, get_peft_model
    from peft.tuners.adalora.layer import AdaLoraLayer

    from adalora import AdaLoRAConfig, RankAllocator, inject_adapters

    ours_model = _bert_shapes(layers, hidden, inter, heads)
    cfg = AdaLoRAConfig(init_r=init_r, target_r=target_r, target_modules=list(TARGETS), tinit=0, tfinal=0,
                        delta_t=delta_t, total_steps=total_steps, beta1=BETA, beta2=BETA)
    adapters = inject_adapters(ours_model, cfg)

    peft_base = _bert_shapes(layers, hidden, inter, heads)
    pcfg = AdaLoraConfig(init_r=init_r, target_r=target_r, target_modules=list(PEFT_TARGETS), tinit=0, tfinal=0,
                         deltaT=delta_t, total_step=total_steps, beta1=BETA, beta2=BETA, lora_alpha=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(peft_base, pcfg)
    peft_layers = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, AdaLoraLayer)}
    if sorted(peft_layers) != sorted(adapters):
        raise RuntimeError(f"PEFT adapted {len(peft_layers)} modules, ours {len(adapters)}: target lists differ")

    # the same adapter values and gradients on both sides (E random too, so the masking has real scores)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, a in adapters.items():
            pl = peft_layers[name]
            for attr in ("lora_A", "lora_E", "lora_B"):
                ours_p, peft_p = getattr(a, attr), getattr(pl, attr)["default"]
                assert ours_p.shape == peft_p.shape, (name, attr, ours_p.shape, peft_p.shape)
                val = torch.randn(ours_p.shape, generator=gen) * 0.02
                grad = torch.randn(ours_p.shape, generator=gen) * 1e-3
                ours_p.copy_(val)
                peft_p.copy_(val)
                ours_p.grad = grad.clone()
                peft_p.grad = grad.clone()
    alloc = RankAllocator(adapters, cfg)  # params become views of its flat buffer; grads on its first step
    n_params = sum(p.numel() for a in adapters.values() for p in (a.lora_A, a.lora_E, a.lora_B))
    return adapters, alloc, peft_model, peft_layers, n_params


def _compare(alloc, peft_model, peft_layers) -> tuple[float, int, int]:
    """(max relative EMA difference, kept triplets that differ, total triplets): ours vs PEFT, same inputs."""
    ra = peft_model.base_model.rankallocator
    worst, mism, total = 0.0, 0, 0
    scale = float(alloc.ema_ipt.abs().max()) or 1.0
    for span in alloc.layout.spans:
        p = getattr(span.module, span.name)
        ours = alloc.layout.view(alloc.ema_ipt, span)
        pname = f"{span.adapter}.{span.name}.default"
        worst = max(worst, float((ours - ra.exp_avg_ipt[pname]).abs().max()) / scale)
        if span.name == "lora_E":
            pe = peft_layers[span.adapter].lora_E["default"]
            mism += int(((p.view(-1) != 0) != (pe.view(-1) != 0)).sum())
            total += p.numel()
    return worst, mism, total


def run_config(key: str, reps: int, warmup: int, init_r: int = 12, target_r: int = 8,
               delta_t: int = 1000, check: bool = True, budget_s: float | None = None) -> dict:
    label, layers, hidden, inter, heads = CONFIGS[key]
    n_total = warmup + reps
    total_steps = 2 * (n_total + 2) * delta_t  # every timed step stays in the decreasing phase
    t_build = time.perf_counter()
    adapters, alloc, peft_model, peft_layers, n_params = build_sides(
        layers, hidden, inter, heads, init_r=init_r, target_r=target_r, delta_t=delta_t, total_steps=total_steps)
    t_build = time.perf_counter() - t_build
    peft_step = peft_model.base_model.update_and_allocate

    # the floor: one preallocated flat buffer of the same size, no temporaries
    w, g = torch.randn(n_params) * 0.02, torch.randn(n_params) * 1e-3
    e1, e2, tmp = torch.zeros(n_params), torch.zeros(n_params), torch.empty(n_params)

    def floor():
        torch.mul(w, g, out=tmp).abs_()
        e1.mul_(BETA).add_(tmp, alpha=1 - BETA)
        e2.mul_(BETA).add_(tmp.sub_(e1).abs_(), alpha=1 - BETA)

    def floor_lerp():  # the same EMAs as one lerp_ each (b*e + (1-b)*x == e.lerp_(x, 1-b)): 6 kernels, not 8
        torch.mul(w, g, out=tmp).abs_()
        e1.lerp_(tmp, 1 - BETA)
        e2.lerp_(tmp.sub_(e1).abs_(), 1 - BETA)

    # gradients that are not views of the flat buffer, re-attached before each "gather" step (untimed)
    spans = [(getattr(s.module, s.name), s.name) for s in alloc.layout.spans]
    loose = [torch.randn(p.shape) * 1e-3 for p, _ in spans]

    def detach_grads():
        for (p, _), gl in zip(spans, loose):
            p.grad = gl

    cols = {k: [] for k in ("peft_score", "peft_mask", "ours_score", "ours_mask", "ours_gather", "floor",
                            "floor_lerp")}
    t_start = time.perf_counter()
    with torch.no_grad():
        for k in range(n_total):
            base = k * delta_t
            # (function, step): per side the step numbers increase in this order; the sides alternate who goes first
            ops = {
                "peft_score": (peft_step, base + 1),
                "ours_score": (alloc.step, base + 1),
                "floor": (floor, None),
                "ours_gather": (alloc.step, base + 2),  # after an untimed detach_grads()
                "peft_mask": (peft_step, base + delta_t),
                "ours_mask": (alloc.step, base + delta_t),
                "floor_lerp": (floor_lerp, None),
            }
            order = list(ops)
            if k % 2:
                order = ["ours_score", "floor_lerp", "peft_score", "ours_gather", "floor", "ours_mask", "peft_mask"]
            timings, out = {}, {}
            for c in order:
                if c == "ours_gather":
                    detach_grads()  # untimed: grads that are not views of the flat buffer
                timings[c], out[c] = _timed(*ops[c])
            assert out["ours_mask"].masked and out["ours_mask"].phase == "decrease", out["ours_mask"]
            if k >= warmup:
                for c, v in timings.items():
                    cols[c].append(v)
                if budget_s and time.perf_counter() - t_start > budget_s and len(cols["floor"]) >= min(reps, 5):
                    break  # a loaded host: keep the whole run within its time budget
    reps_done = len(cols["floor"])
    # the "gather" steps used other gradients; scoring-only comparison is still fair (same work), but the
    # EMAs now differ from PEFT's, so the cross-check runs on a fresh pair below when asked

    ema_ours_scoring = _nbytes([alloc.ema_ipt, alloc.ema_unc])
    ra = peft_model.base_model.rankallocator
    ema_peft_scoring = _nbytes(list(ra.ipt.values()) + list(ra.exp_avg_ipt.values()) + list(ra.exp_avg_unc.values()))

    # final phase: the pattern is frozen at t = total_steps - tfinal, then re-applied every step
    t_fin = total_steps
    peft_step(t_fin)
    alloc.step(t_fin)
    ema_ours_final = _nbytes([alloc.ema_ipt, alloc.ema_unc])
    ema_peft_final = _nbytes(list(ra.ipt.values()) + list(ra.exp_avg_ipt.values()) + list(ra.exp_avg_unc.values()))
    fin_p, fin_o = [], []
    with torch.no_grad():
        for j in range(1, max(3, reps_done // 2) + 1):
            fin_p.append(_timed(peft_step, t_fin + j)[0])
            fin_o.append(_timed(alloc.step, t_fin + j)[0])
    rank_ours = sum(alloc.rank_pattern().values())
    alloc.compact()
    ema_ours_compact = _nbytes([alloc.ema_ipt, alloc.ema_unc])

    res = {
        "key": key, "label": label, "modules": len(adapters), "params": n_params, "build_s": t_build,
        **{c: statistics.median(v) for c, v in cols.items()},
        "peft_final": statistics.median(fin_p), "ours_final": statistics.median(fin_o),
        "ema_ours_scoring": ema_ours_scoring, "ema_ours_final": ema_ours_final, "ema_ours_compact": ema_ours_compact,
        "ema_peft_scoring": ema_peft_scoring, "ema_peft_final": ema_peft_final,
        "final_rank_ours": rank_ours, "target_budget": target_r * len(adapters), "reps": reps_done,
    }
    if check:
        res.update(_cross_check(layers, hidden, inter, heads, init_r, target_r))
    return res


def _cross_check(layers, hidden, inter, heads, init_r, target_r, steps: int = 6, delta_t: int = 3) -> dict:
    """Same inputs, a few steps with masking: do the two allocators compute the same EMAs and masks?"""
    adapters, alloc, peft_model, peft_layers, _ = build_sides(
        layers, hidden, inter, heads, init_r=init_r, target_r=target_r, delta_t=delta_t, total_steps=4 * steps)
    with torch.no_grad():
        for t in range(1, steps + 1):
            peft_model.base_model.update_and_allocate(t)
            alloc.step(t)
    worst, mism, total = _compare(alloc, peft_model, peft_layers)
    return {"ema_rel_diff": worst, "mask_mismatch": mism, "triplets": total}


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n else "0"


def print_table(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p("\n## Allocator step: PEFT 0.21.2 update_and_allocate vs ours RankAllocator.step (median ms)\n")
    p("| config | matrices | adapter params | PEFT score | PEFT mask | ours score | ours mask | ours gather | "
      "floor | floor lerp | PEFT/ours score | PEFT/ours mask | ours/floor | PEFT final | ours final |")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p(f"| {r['label']} | {r['modules']} | {r['params'] / 1e6:.2f}M | {r['peft_score']:.2f} | "
          f"{r['peft_mask']:.2f} | {r['ours_score']:.3f} | {r['ours_mask']:.3f} | {r['ours_gather']:.3f} | "
          f"{r['floor']:.3f} | {r['floor_lerp']:.3f} | "
          f"{r['peft_score'] / r['ours_score']:.1f}x | {r['peft_mask'] / r['ours_mask']:.1f}x | "
          f"{r['ours_score'] / r['floor']:.2f} | {r['peft_final']:.2f} | {r['ours_final']:.3f} |")
    p("\n## Allocator EMA memory (fp32)\n")
    p("| config | adapter params | ours scoring | ours final phase | ours compacted | PEFT scoring | PEFT final phase "
      "| ours/params | PEFT/params |")
    p("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n4 = r["params"] * 4
        p(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {_fmt_bytes(r['ema_ours_scoring'])} | "
          f"{_fmt_bytes(r['ema_ours_final'])} | {_fmt_bytes(r['ema_ours_compact'])} | "
          f"{_fmt_bytes(r['ema_peft_scoring'])} | {_fmt_bytes(r['ema_peft_final'])} | "
          f"{r['ema_ours_scoring'] / n4:.0f}x | {r['ema_peft_scoring'] / n4:.0f}x |")
    if any("ema_rel_diff" in r for r in rows):
        p("\n## Cross-check (same inputs, 6 steps, masking every 3): ours vs PEFT\n")
        p("| config | max rel. diff of Ī | kept-triplet mismatches | final kept (ours) / target |")
        p("|---|---|---|---|")
        for r in rows:
            if "ema_rel_diff" in r:
                p(f"| {r['label']} | {r['ema_rel_diff']:.1e} | {r['mask_mismatch']} / {r['triplets']} | "
                  f"{r['final_rank_ours']} / {r['target_budget']} |")
    p("\nscore: a step off the mask interval; mask: a step on it (scores + global top-b); gather: our scoring step "
      "with grads that are not views of the flat buffer (zero_grad(set_to_none=True)); floor: the same EMA math on "
      "one preallocated flat buffer (floor lerp: each EMA as one lerp_); final: a final-phase step (frozen pattern "
      "re-applied).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM shapes only, few repetitions (seconds)")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per config (default 150, quick 15)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-check", action="store_true", help="skip the ours-vs-PEFT numeric cross-check")
    ap.add_argument("--budget-s", type=float, default=20.0,
                    help="stop a config's repetitions after this many seconds (at least 5 reps); 0: no limit")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's default; 1 avoids OpenMP stalls on a loaded host)")
    args = ap.parse_args(argv)
    prev_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(ap, args)
    finally:
        torch.set_num_threads(prev_threads)


def _run(ap, args) -> int:
    keys = args.configs.split(",") if args.configs else (["minilm"] if args.quick else list(CONFIGS))
    unknown = [k for k in keys if k not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    reps = args.reps or (15 if args.quick else 150)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"threads {torch.get_num_threads()} ({'set' if args.threads else 'default'}), load average "
          f"{_load():.2f}, {reps} reps after {warmup} warm-up")
    rows = []
    t0 = time.perf_counter()
    for key in keys:
        # fewer repetitions for the big configs keeps the whole run under 2 minutes on 2 cores
        n = reps if CONFIGS[key][1] <= 12 or args.reps else max(reps * 12 // CONFIGS[key][1], 20)
        rows.append(run_config(key, n, warmup, check=not args.no_check and CONFIGS[key][1] <= 12,
                               budget_s=args.budget_s))
        r = rows[-1]
        print(f"  {r['label']}: built in {r['build_s']:.1f}s, {r['reps']} reps, "
              f"elapsed {time.perf_counter() - t0:.1f}s", flush=True)
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - t0:.1f}s, load average at the end {_load():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
