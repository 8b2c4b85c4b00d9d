"""Spectral diagnostics of trained adapters, as pure functions: how large is each ΔW, and how fast can it grow.

σ_max(ΔW), the largest singular value of the update, is what changes a layer's output the most: ‖ΔW x‖ ≤
σ_max ‖x‖. It is computed exactly from the small factors, without materialising the (out, in) ΔW: with the
reduced QR decompositions B = Q_B R_B and Aᵀ = Q_A R_A (Q's with orthonormal columns, R's at most r × r),

    ΔW = scale · B diag(g) A = Q_B (scale · R_B diag(g) R_Aᵀ) Q_Aᵀ   so   σ_max(ΔW) = scale · ‖R_B diag(g) R_Aᵀ‖₂

with g = Λ for AdaLoRA (SVDLinear), the rank gate for prune-LoRA and 1 for LoRA. Cost O((in + out) r²)
instead of O(in · out · min(in, out)).

For AdaLoRA, scale · max|λ| is the value σ_max(ΔW) takes when P and Q are orthonormal (what the
orthogonality penalty pushes them towards); the gap between the two shows how far from orthonormal they are.
Λ starts at 0 and Adam moves an entry by about lr per step, so scale · Σ_t lr_t (``growth_bound``) is the
scale · max|λ| of a singular value that moved at full speed in one direction all along.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .layers import AdapterLayer, LoRALinear, SVDLinear

__all__ = [
    "delta_spectral_norm",
    "growth_bound",
    "lambda_spectral_bound",
    "module_type",
    "spectral_report",
    "summarize_by_type",
]

# the sub-module path after the layer index -> a short type (the same names as the rank heat maps)
_TYPE_ALIASES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.self.query_proj": "query",
    "attention.self.key_proj": "key",
    "attention.self.value_proj": "value",
    "attention.output.dense": "attn.out",
    "intermediate.dense": "ffn.in",
    "output.dense": "ffn.out",
}


def module_type(name: str) -> str:
    """The module type of a dotted module name: the path after its first integer component (the layer index),
    shortened for BERT-like models. ``bert.encoder.layer.3.attention.self.query`` -> ``query``,
    ``...attention.output.dense`` -> ``attn.out``, ``...intermediate.dense`` -> ``ffn.in``, ``...output.dense`` ->
    ``ffn.out``; GPT-2 ``transformer.h.2.attn.c_attn`` -> ``attn.c_attn``; an ``nn.Sequential`` child ``"2"`` ->
    ``linear``; a name without an integer is its own type. Encoder and decoder stacks share their types."""
    parts = name.split(".") if name else [""]
    for i, p in enumerate(parts):
        if p.isdigit():
            rest = ".".join(parts[i + 1:]) or ".".join(parts[:i]) or "linear"  # a bare index: the container's type
            return _TYPE_ALIASES.get(rest, rest)
    return _TYPE_ALIASES.get(name, name)


def _gate(adapter: AdapterLayer) -> torch.Tensor | None:
    """(r,): the diagonal between B and A (Λ, the prune-LoRA gate), or None for plain LoRA."""
    if isinstance(adapter, SVDLinear):
        return adapter.lora_E.view(-1)
    if isinstance(adapter, LoRALinear) and adapter.lora_mask is not None:
        return adapter.lora_mask.view(-1)
    return None


@torch.no_grad()
def delta_spectral_norm(adapter: AdapterLayer) -> torch.Tensor:
    """σ_max(ΔW) of one adapter (0-dim tensor), exact: scale · ‖R_B diag(g) R_Aᵀ‖₂ from the QR of B and Aᵀ.

    Equals ``torch.linalg.matrix_norm(adapter.delta_weight(), ord=2)`` to rounding; computed in at least
    float32 (QR has no half-precision kernels). 0 for a module of rank 0.
    """
    a, b = adapter.lora_A, adapter.lora_B  # (r, in), (out, r)
    dtype = torch.promote_types(a.dtype, torch.float32)
    if a.shape[0] == 0:
        return torch.zeros((), device=a.device, dtype=dtype)
    r_a = torch.linalg.qr(a.detach().to(dtype).T, mode="r").R  # (min(in, r), r): Aᵀ = Q_A R_A
    r_b = torch.linalg.qr(b.detach().to(dtype), mode="r").R  # (min(out, r), r): B = Q_B R_B
    g = _gate(adapter)
    if g is not None:
        r_b = r_b * g.detach().to(dtype)  # R_B diag(g): scales the columns
    core = r_b @ r_a.T  # (min(out, r), min(in, r))
    return torch.linalg.matrix_norm(core, ord=2) * abs(float(adapter.scale))


@torch.no_grad()
def lambda_spectral_bound(adapter: SVDLinear) -> torch.Tensor:
    """scale · max_i |λ_i| of an AdaLoRA adapter (0-dim tensor): σ_max(ΔW) if P and Q were orthonormal."""
    if not isinstance(adapter, SVDLinear):
        raise TypeError(f"lambda_spectral_bound needs an SVDLinear (AdaLoRA) adapter, got {type(adapter).__name__}")
    e = adapter.lora_E.detach()
    if e.numel() == 0:
        return torch.zeros((), device=e.device, dtype=torch.promote_types(e.dtype, torch.float32))
    return e.abs().max().to(torch.promote_types(e.dtype, torch.float32)) * abs(float(adapter.scale))


def spectral_report(adapters: Mapping[str, AdapterLayer]) -> dict[str, dict[str, float]]:
    """Per module: ``{"sigma_max": σ_max(ΔW)}``, plus ``"scale_lambda_max": scale · max|λ|`` for AdaLoRA
    adapters, as Python floats (one host sync per module), in the order of ``adapters``."""
    out = {}
    for name, a in adapters.items():
        row = {"sigma_max": float(delta_spectral_norm(a))}
        if isinstance(a, SVDLinear):
            row["scale_lambda_max"] = float(lambda_spectral_bound(a))
        out[name] = row
    return out


def summarize_by_type(report: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{module type: {key: max over the modules of that type}}`` for a ``spectral_report`` (or any
    {module name: {key: number}}); types as ``module_type`` names them, in order of first appearance."""
    out: dict[str, dict[str, float]] = {}
    for name, row in report.items():
        agg = out.setdefault(module_type(name), {})
        for key, v in row.items():
            agg[key] = max(agg.get(key, v), v)
    return out


def growth_bound(scale: float, lr_sum: float) -> float:
    """scale · Σ_t lr_t: the scale · max|λ| reached from Λ = 0 by a singular value that moved lr every step in
    one direction, the size of Adam's step (its first step is exactly ±lr per entry).

    ``lr_sum``: the learning rates of Λ summed over the optimizer steps so far (e.g. accumulated from the
    scheduler's ``get_last_lr()``). Compare ``lambda_spectral_bound`` with it: near 1 means Λ grew at full
    speed. It is not a strict bound: Adam's normalised step |m̂|/√v̂ exceeds 1 while gradients grow (v̂
    remembers longer than m̂), up to (1 − β1)/√(1 − β2) ≈ 3.2 for the defaults in Kingma & Ba's sparse case.
    """
    return abs(float(scale)) * float(lr_sum)
