"""Adapter layers. They wrap a frozen ``base_layer`` (nn.Linear or transformers' Conv1D).

Every adapter parameter is named ``lora_*`` so that freezing and adapter-only saving are
one-line filters. One ``delta_weight()`` is shared by forward-equivalence tests, merge and
unmerge; ``forward`` uses the low-rank path (x @ A.T @ B.T) because it is cheaper than
materialising the (out, in) delta for every batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class AdapterLayer(nn.Module):
    """Shared plumbing: wrap ``base_layer``, dropout, merge/unmerge, rank-0 skip."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        if not supported(base_layer):
            raise TypeError(f"can only wrap nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D keeps weight as (in, out)
        w = base_layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape
        self.init_r = r  # the scale stays alpha / init_r after pruning, as in the reference
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.rank_keep: torch.Tensor | None = None  # kept triplets once the allocator froze the pattern

    @property
    def weight(self) -> torch.Tensor:  # lets code that reads module.weight keep working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def _new(self, *shape) -> nn.Parameter:
        w = self.base_layer.weight
        return nn.Parameter(torch.empty(*shape, device=w.device, dtype=w.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The adapter's ΔW in the base layer's weight layout: (out, in), or (in, out) for Conv1D."""
        d = self._delta_out_in()
        return d.T if self.fan_in_fan_out else d

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into W0 for zero-latency inference."""
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.sub_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.merged or self.r == 0:  # a module pruned to rank 0 costs nothing
            return y
        return self._add_adapter(y, self.lora_dropout(x))

    def _add_adapter(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + scale · (x Dᵀ) Bᵀ with D = ``_down()``, the second product fused into the add (one addmm):
        two fewer passes over the (..., out) activations in forward and backward than ``y + _adapter_out(x)``."""
        h = F.linear(x, self._down())  # (..., in) -> (..., r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=self.scale)
        return out.view(y.shape)  # (..., out)

    def _adapter_out(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution alone: scale · (x Dᵀ) Bᵀ, (..., in) -> (..., out)."""
        return F.linear(F.linear(x, self._down()), self.lora_B) * self.scale

    def _delta_out_in(self) -> torch.Tensor:
        return (self.lora_B @ self._down()) * self.scale  # (out, in)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, init_r={self.init_r}, merged={self.merged}"


class SVDLinear(AdapterLayer):
    """AdaLoRA's adapter: ΔW = P Λ Q * alpha / init_r, the scale fixed at init_r after pruning (as the authors'
    code, whose paper reports that rescaling by the current rank hurt results).

    lora_A = Q (r, in), N(0, 0.02); lora_E = Λ (r, 1), zeros (identity at init); lora_B = P (out, r), N(0, 0.02).
    Masking a triplet is setting its Λ to 0 (``RankAllocator`` does it); A and B stay, so it may revive.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float = 16.0, lora_dropout: float = 0.0):
        super().__init__(base_layer, r, lora_alpha, lora_dropout)
        self.scale = lora_alpha / r if r > 0 else 0.0  # r = 0 (a module pruned away): nothing to scale
        self.lora_A = self._new(r, self.in_features)
        self.lora_E = self._new(r, 1)
        self.lora_B = self._new(self.out_features, r)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def _down(self) -> torch.Tensor:
        return self.lora_A * self.lora_E  # (r, in): Q's rows scaled by the singular values


class LoRALinear(AdapterLayer):
    """Fixed-rank LoRA: ΔW = B A * scale, B zero at init, scale alpha/r (rsLoRA: alpha/sqrt(r)).

    For the prune-LoRA ablation a non-trainable ``lora_mask`` (r,) gates the rank components (``RankAllocator``
    writes it; 0 switches a component off).
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False, rank_mask: bool = False):
        super().__init__(base_layer, r, lora_alpha, lora_dropout)
        self.scale = 0.0 if r == 0 else lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = self._new(r, self.in_features)
        self.lora_B = self._new(self.out_features, r)
        w = base_layer.weight
        self.register_buffer("lora_mask", torch.ones(r, device=w.device, dtype=w.dtype) if rank_mask else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.numel():  # rank 0 (a pruned module reloaded): nothing to initialise
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as loralib / PEFT
        nn.init.zeros_(self.lora_B)

    def _down(self) -> torch.Tensor:  # (r, in), gated for prune-LoRA
        return self.lora_A if self.lora_mask is None else self.lora_A * self.lora_mask.view(-1, 1)
