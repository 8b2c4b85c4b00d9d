"""FlatLayout: every adapter parameter, and its gradient, as a view into one flat buffer.

Why: one scoring step of the allocator is then ~5 elementwise kernels over all adapters instead of
~10 per tensor, and modules of the same shape sit next to each other so the triplet scores of a
masking step are a handful of batched reductions.

Layout of the flat buffers (length ``numel``): with SVD adapters the singular values of all modules
come first, triplet by triplet in ``order`` (so ``weights[:n_triplets]`` are all the Λ and masking
is one op); then, per shape group, the A matrices of its modules back to back, then their B's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from .config import ConfigError
from .layers import AdapterLayer

__all__ = ["FlatLayout", "ShapeGroup", "Span"]


class Span(NamedTuple):
    """One adapter parameter inside the flat buffers."""

    adapter: str  # module name (a key of the adapters dict)
    module: AdapterLayer
    name: str  # "lora_A" | "lora_E" | "lora_B"
    offset: int  # where it starts in ``weights`` / ``grads`` / any flat tensor of this layout
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


class ShapeGroup:
    """Modules sharing (r, in, out): their A's and B's sit back to back in the flat buffers."""

    def __init__(self, names: list[str], r: int, n_in: int, n_out: int, a_off: int, b_off: int):
        self.names, self.r, self.n_in, self.n_out = names, r, n_in, n_out
        self.a_off, self.b_off = a_off, b_off  # where the A block and the B block start

    def a_block(self, flat: torch.Tensor) -> torch.Tensor:  # (n, r, in)
        n = len(self.names)
        return flat[self.a_off:self.a_off + n * self.r * self.n_in].view(n, self.r, self.n_in)

    def b_block(self, flat: torch.Tensor) -> torch.Tensor:  # (n, out, r)
        n = len(self.names)
        return flat[self.b_off:self.b_off + n * self.n_out * self.r].view(n, self.n_out, self.r)


class FlatLayout:
    """Adopts the adapters' parameters: afterwards each ``lora_*`` parameter's data is a view of ``weights``
    and, from the first ``gather_grads()`` on, its ``.grad`` a view of ``grads``.

    Attributes: ``order`` (module names, shape-grouped; the triplet order of every (n_triplets,) tensor),
    ``ranks`` (r per module, in ``order``), ``n_triplets``, ``groups`` (ShapeGroup), ``spans`` (Span, one per
    parameter), ``weights`` and ``grads`` (flat, length ``numel``), ``gate`` (prune-LoRA: the flat (n_triplets,)
    rank gate that every ``lora_mask`` is a view of; None for SVD adapters), ``missing_grads`` (how many
    parameters had grad None at the last ``gather_grads()``).
    """

    def __init__(self, adapters: Mapping[str, AdapterLayer], svd: bool):
        ref = next(iter(adapters.values())).lora_A
        for n, a in adapters.items():
            if a.lora_A.device != ref.device or a.lora_A.dtype != ref.dtype:
                raise ConfigError(f"adapter {n!r} is on {a.lora_A.device}/{a.lora_A.dtype} but others on "
                                  f"{ref.device}/{ref.dtype}; RankAllocator needs all adapters on one device and dtype")
        keyed: dict[tuple, list[str]] = {}
        for n, a in adapters.items():
            keyed.setdefault((a.r, a.in_features, a.out_features), []).append(n)
        self.svd = svd
        self.order: list[str] = [n for names in keyed.values() for n in names]  # groups are contiguous runs
        self.ranks: list[int] = [adapters[n].r for n in self.order]
        self.n_triplets = sum(self.ranks)
        off = self.n_triplets if svd else 0
        self.groups: list[ShapeGroup] = []
        for (r, n_in, n_out), names in keyed.items():
            a_off = off
            b_off = a_off + len(names) * r * n_in
            off = b_off + len(names) * n_out * r
            self.groups.append(ShapeGroup(names, r, n_in, n_out, a_off, b_off))
        self.numel = off
        self.spans: list[Span] = []
        if svd:
            e_off = 0
            for n in self.order:
                self.spans.append(Span(n, adapters[n], "lora_E", e_off, adapters[n].lora_E.shape))
                e_off += adapters[n].r
        for g in self.groups:
            for i, n in enumerate(g.names):
                a = adapters[n]
                self.spans.append(Span(n, a, "lora_A", g.a_off + i * g.r * g.n_in, a.lora_A.shape))
                self.spans.append(Span(n, a, "lora_B", g.b_off + i * g.n_out * g.r, a.lora_B.shape))
        self.weights = torch.empty(off, device=ref.device, dtype=ref.dtype)
        self.grads = torch.zeros_like(self.weights)
        self.missing_grads = 0
        # per span: (module, attribute, the Parameter, its data pointer, its grad view), so that the per-step
        # checks in intact() / gather_grads() are one cheap loop; the parameters are looked up on the modules,
        # so a replaced Parameter object (load_state_dict(assign=True), model.to()) is noticed
        self._records = []
        with torch.no_grad():
            for s in self.spans:
                p = getattr(s.module, s.name)
                view = self.view(self.weights, s)
                view.copy_(p.detach())
                p.data = view
                self._records.append((s.module, s.name, p, p.data_ptr(), self.view(self.grads, s)))
        self.gate: torch.Tensor | None = None
        self._gates: list = []
        if not svd:  # prune-LoRA: the gates are views of one flat mask too
            self.gate = torch.ones(self.n_triplets, device=ref.device, dtype=ref.dtype)
            t = 0
            for n in self.order:
                a = adapters[n]
                self.gate[t:t + a.r].copy_(a.lora_mask)
                a.lora_mask = self.gate[t:t + a.r]
                t += a.r
            self._gates = [(adapters[n], adapters[n].lora_mask.data_ptr()) for n in self.order]

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    def view(self, flat: torch.Tensor, span: Span) -> torch.Tensor:
        """The part of a flat tensor of this layout (``weights``, ``grads``, an EMA) that belongs to ``span``."""
        return flat[span.offset:span.offset + span.numel].view(span.shape)

    def triplets(self, flat: torch.Tensor) -> torch.Tensor:
        """(n_triplets,): the singular values' part of a flat tensor (SVD adapters only)."""
        if not self.svd:
            raise RuntimeError("prune-LoRA adapters have no singular values in the flat layout")
        return flat[:self.n_triplets]

    def intact(self) -> bool:
        """Whether every parameter (and prune-LoRA gate) is still a view of the flat buffers."""
        for m, k, p, ptr, _ in self._records:
            if getattr(m, k) is not p or p.data_ptr() != ptr:
                return False
        return all(a.lora_mask.data_ptr() == ptr for a, ptr in self._gates)

    def gather_grads(self) -> torch.Tensor:
        """The gradients as the flat ``grads``; the per-parameter grads become views of it, so with
        ``zero_grad(set_to_none=False)`` later backwards accumulate straight into it. A grad that is None
        (module unused in this forward, or zeroed to None) counts as zero and is counted in ``missing_grads``."""
        missing = 0
        for _, _, p, _, view in self._records:
            g = p.grad
            if g is view:  # the usual case with zero_grad(set_to_none=False): nothing to do
                continue
            if g is None:  # zero sensitivity for this step; the grad is left None
                view.zero_()
                missing += 1
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
                p.grad = view
            else:
                p.grad = view
        self.missing_grads = missing
        return self.grads

    def release(self) -> None:
        """Drop the flat buffers (after ``compact()`` the parameters are standalone tensors again);
        ``order`` and ``ranks`` stay, as the record of the triplet order the keep masks use."""
        self.weights = self.grads = self.gate = None
        self._records, self._gates = [], []
