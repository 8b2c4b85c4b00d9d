"""Orthogonality regularizer R(P, Q) as a pure function over the adapters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .layers import AdapterLayer, SVDLinear


def orthogonal_regularization(adapters: Mapping[str, AdapterLayer] | Iterable[AdapterLayer],
                              form: str = "reference", include_pruned: bool = False) -> torch.Tensor:
    """R = penalty on Q Qᵀ − I and Pᵀ P − I over every SVD adapter of rank > 0.

    form="reference" (default, the authors' code and PEFT): mean over all A and B matrices of ‖·‖_F.
    form="paper": sum over all matrices of ‖·‖_F², as written in the paper.
    Returns a 0-dim tensor (0 when there is no SVD adapter, e.g. plain LoRA).

    Once the allocator has frozen the pattern (inside ``RankAllocator.step(T - tfinal)``, so from the loss
    of step T - tfinal + 1 on), the penalty covers the kept triplets only (``layer.rank_keep``), so that
    compaction changes nothing; a module with no kept triplet leaves the mean. ``include_pruned=True``
    keeps the pruned rows of Q and columns of P in it, as the authors' code and PEFT do: with it, and
    without ``compact()``, training reproduces the reference exactly.
    """
    if form not in ("reference", "paper"):
        raise ValueError(f"orthogonal_regularization(form={form!r}): use 'reference' or 'paper'")
    layers = adapters.values() if isinstance(adapters, Mapping) else adapters
    terms = []
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer in layers:
        if not isinstance(layer, SVDLinear):
            continue
        a, b = layer.lora_A, layer.lora_B  # (r, in), (out, r)
        if layer.rank_keep is not None and not include_pruned:  # final phase: the pruned triplets are gone
            a, b = a.index_select(0, layer.rank_keep), b.index_select(1, layer.rank_keep)
        if a.shape[0] > 0:
            groups.setdefault((a.shape, b.shape), []).append((a, b))
    for pairs in groups.values():  # same shapes: one batched product per group instead of one per module
        q = torch.stack([a for a, _ in pairs])  # (n, r, in)
        p = torch.stack([b for _, b in pairs])  # (n, out, r)
        for gram in (q @ q.transpose(1, 2), p.transpose(1, 2) @ p):  # (n, r, r): Q Qᵀ and Pᵀ P
            dev = gram - torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
            terms.append(dev.square().sum((1, 2)) if form == "paper" else torch.linalg.matrix_norm(dev))
    if not terms:
        return torch.zeros(())
    total = torch.cat(terms)  # one entry per matrix: 2 per adapted module
    return total.sum() if form == "paper" else total.mean()
