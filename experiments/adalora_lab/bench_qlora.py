#!/usr/bin/env python
"""4-bit (NF4) vs 16-bit (bf16) frozen base under LoRA: memory and step time, side by side in one run.

    python experiments/bench_qlora.py             # random Llama 4L h768 (28 M linear weights), b2 x L128 (~1 min)
    python experiments/bench_qlora.py --quick     # 2L h128, a few steps (the test's variant)
    python experiments/bench_qlora.py --size medium   # 8L h1024 (102 M linear weights, ~2 min)
    python experiments/bench_qlora.py --device cuda

The same random decoder (LlamaConfig, seed 0) is built in two variants:

- ``bf16``: every base weight in bf16 (the 16-bit base LoRA usually trains on);
- ``nf4``: the blocks' linear layers in NF4 (adalora_lab.quant.NF4Linear, torchao), the rest
  (embeddings, norms, LM head) in bf16, as in QLoRA.

Both get LoRA (r = 8) on q/k/v/o/gate/up/down with fp32 adapter weights and AdamW state, and run under
bf16 autocast. A step is zero_grad, forward, loss, backward, AdamW step, on a fixed random batch.

Memory, each variant in a fresh subprocess so that its peak is its own: the base's parameter bytes,
counted (an NF4 weight counts its packed data, int8 scales and fp32 factors), the resident memory once
the model is built and has taken one step (CPU: VmRSS after freeing the fp32 construction copy; CUDA:
allocated bytes), and the peak during two more steps (CPU: VmHWM, reset just before; CUDA:
max_memory_allocated). CPU figures are above the RSS of the imported libraries, measured first; the
CPU children run with a fixed glibc mmap threshold, so that freed temporaries leave RSS (glibc's
default keeps them, and RSS then tells the allocator's history, not the live tensors). Step time: both
variants in this process, steps interleaved (one of each per round), median wall and CPU time. Also
the loss on the batch before training (how far NF4 moves the base). Ratios are nf4 / bf16.

A second table times one linear layer of the model's MLP shape (forward + backward to the input):
dense bf16, torchao NF4, and bitsandbytes NF4 when it is installed, and says whether our adapters can
wrap each (bitsandbytes' Linear4bit stores its weight packed as (out * in / 2, 1) uint8, so an adapter
that takes its shape and dtype from ``base_layer.weight`` cannot be built on it).

Importable: ``main(argv) -> int``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("bf16", "nf4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {  # hidden, layers, heads, intermediate, vocab, batch, length, steps
    "small": (768, 4, 12, 2048, 8192, 2, 128, 5),
    "medium": (1024, 8, 16, 2816, 8192, 2, 128, 4),
    "quick": (128, 2, 4, 256, 1024, 2, 32, 3),
}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _trim() -> None:
    """Give freed heap pages back to the OS, so RSS shows what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _build(variant: str, size: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from adalora import LoRAConfig, inject_adapters

    from .quant import quantize_model

    h, layers, heads, inter, vocab, *_ = SIZES[size]
    conf = LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf).to(device)  # fp32: the same weights for both variants
    if variant == "nf4":
        quantize_model(model)  # the blocks' linears; the LM head stays dense
    for p in model.parameters():  # everything dense in bf16 (for nf4: embeddings, norms, LM head)
        if type(p).__name__ != "NF4Tensor":
            p.data = p.data.to(torch.bfloat16)
    adapters = inject_adapters(model, LoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    for a in adapters.values():  # the adapters and their Adam state in fp32 for both (the library copies the
        for name in ("lora_A", "lora_B"):  # base weight's dtype: bf16 for the 16-bit base)
            getattr(a, name).data = getattr(a, name).data.float()
    return model


def _stepper(model, size: str, device: torch.device):
    """(loss before training, step()): a fixed random batch, AdamW on the adapters, bf16 autocast."""
    *_, vocab, batch, length, _ = SIZES[size]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=False)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        loss0 = model(input_ids=ids, labels=ids).loss.item()
    return loss0, step


def _child(variant: str, size: str, device_name: str) -> dict:
    """Memory of one variant (run it in a fresh process): bytes by count, resident after build, peak of steps."""
    from transformers import LlamaForCausalLM  # noqa: F401 - the libraries count in the baseline, not the model

    from .quant import param_bytes

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    _trim()
    baseline = 0 if cuda else _status_kb("VmRSS") * 1024
    model = _build(variant, size, device)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    linear_bytes = sum(param_bytes(m.base_layer) for n, m in model.named_modules() if hasattr(m, "lora_A"))
    loss0, step = _stepper(model, size, device)
    step()  # warm-up: allocates the gradients and Adam state
    _trim()
    if cuda:
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        resident = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    for _ in range(2):
        step()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return {"variant": variant, "base_bytes": param_bytes(model) - lora_bytes, "linear_bytes": linear_bytes,
            "adapter_bytes": lora_bytes, "baseline_bytes": baseline, "resident_bytes": resident - baseline,
            "peak_bytes": peak - baseline, "loss0": loss0}


def _timed(size: str, device: torch.device) -> dict[str, tuple[float, float]]:
    """{variant: (median wall ms, median CPU ms)} per step, both models in this process, steps interleaved
    (one of each per round, the first rotating) so that load on the host hits both alike."""
    steppers = {v: _stepper(_build(v, size, device), size, device)[1] for v in VARIANTS}
    for step in steppers.values():
        step()  # warm-up
    wall = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    for r in range(SIZES[size][-1]):
        for v in VARIANTS[r % 2:] + VARIANTS[:r % 2]:
            t0, c0 = time.perf_counter(), time.process_time()
            steppers[v]()
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return {v: (1e3 * statistics.median(wall[v]), 1e3 * statistics.median(cpu[v])) for v in VARIANTS}


def _run_child(variant: str, args) -> dict:
    cmd = [sys.executable, "-m", "adalora_lab.bench_qlora", "--child", variant, "--size", args.size,
           "--device", args.device]
    env = dict(os.environ)
    # A fixed mmap threshold: glibc then maps every block over 128 KiB on its own and unmaps it when freed, so
    # RSS follows the live tensors (its default raises the threshold as big blocks are freed, and keeps them)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _layer_table(size: str, device: torch.device, reps: int) -> list[tuple[str, float, str]]:
    """(backend, fwd+bwd ms median, can our adapters wrap it) for one (intermediate, hidden) linear layer."""
    from adalora import LoRAConfig, inject_adapters

    from .quant import NF4Linear

    h, _, _, inter, _, batch, length, _ = SIZES[size]
    torch.manual_seed(0)
    dense = torch.nn.Linear(h, inter, bias=False, device=device)
    x = torch.randn(batch, length, h, device=device)
    layers = {"dense bf16": torch.nn.Linear(h, inter, bias=False, device=device, dtype=torch.bfloat16),
              "torchao nf4": NF4Linear.from_linear(dense)}
    layers["dense bf16"].load_state_dict({"weight": dense.weight.detach().bfloat16()})
    try:
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(h, inter, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
        q.load_state_dict(dense.state_dict())
        layers["bitsandbytes nf4"] = q.to(device)  # quantizes on .to()
    except ImportError:
        pass
    rows = []
    for name, layer in layers.items():
        try:
            inject_adapters(torch.nn.Sequential(layer), LoRAConfig(r=8, target_modules=["0"]))
            wraps = "yes"
        except Exception as e:  # noqa: BLE001 - the reason is the finding
            wraps = f"no ({type(e).__name__}: {str(e).splitlines()[0][:70]})"
        inner = layer.base_layer if hasattr(layer, "base_layer") else layer
        xx = x.to(torch.bfloat16).requires_grad_(True)
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            inner(xx).float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
        rows.append((name, 1e3 * statistics.median(times), wraps))
    return rows


def _mib(b: float) -> str:
    return f"{b / 2**20:8.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer h128 decoder, 3 steps (seconds)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the measured processes")
    ap.add_argument("--layer-reps", type=int, default=5, help="timed forward+backward passes per layer backend")
    ap.add_argument("--child", choices=["bf16", "nf4"], help=argparse.SUPPRESS)
    ap.add_argument("--size", choices=list(SIZES), default=None,
                    help="small (default): 4L h768; medium: 8L h1024 (102 M linear weights, ~2 min); quick")
    args = ap.parse_args(argv)
    args.size = args.size or ("quick" if args.quick else "small")
    if args.child:  # one measured variant, in its own process
        print(json.dumps(_child(args.child, args.size, args.device)))
        return 0
    h, layers, heads, inter, vocab, batch, length, steps = SIZES[args.size]
    print(f"random Llama {layers}L h{h} ffn{inter} vocab{vocab}, LoRA r=8 on {len(TARGETS)} linears per layer, "
          f"batch {batch} x {length}, bf16 autocast, median of {steps} steps, device {args.device}")
    res = {v: _run_child(v, args) for v in VARIANTS}
    threads = args.threads
    if threads:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        for v, (wall, cpu) in _timed(args.size, torch.device(args.device)).items():
            res[v].update(step_ms=wall, cpu_ms=cpu)
        rows = _layer_table(args.size, torch.device(args.device), args.layer_reps)
    finally:
        if threads:
            torch.set_num_threads(prev)
    mem = "RSS" if args.device == "cpu" else "CUDA"
    if args.device == "cpu":
        print(f"RSS after the imports, before any model: {res['bf16']['baseline_bytes'] / 2**20:.0f} MiB (not counted "
              "below)")
    print(f"\n{'':26s}{'bf16':>10s}{'nf4':>10s}{'nf4/bf16':>10s}")
    for key, label, fmt in (("linear_bytes", "base linears (MiB)", _mib), ("base_bytes", "whole base (MiB)", _mib),
                            ("adapter_bytes", "adapters fp32 (MiB)", _mib),
                            ("resident_bytes", f"{mem} after 1 step (MiB)", _mib),
                            ("peak_bytes", f"{mem} peak of steps (MiB)", _mib),
                            ("step_ms", "step wall (ms)", lambda v: f"{v:8.1f}"),
                            ("cpu_ms", "step CPU (ms)", lambda v: f"{v:8.1f}"),
                            ("loss0", "loss before training", lambda v: f"{v:8.4f}")):
        a, b = res["bf16"][key], res["nf4"][key]
        print(f"{label:26s}{fmt(a):>10s}{fmt(b):>10s}{b / a:10.3f}")
    print(f"\none linear {h} -> {inter}, input {batch} x {length}, forward + backward to the input:")
    for name, ms, wraps in rows:
        print(f"  {name:18s} {ms:8.2f} ms   our adapters wrap it: {wraps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
