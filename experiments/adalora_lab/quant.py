"""A 4-bit frozen base (QLoRA-style): the base model's linear layers in NF4 through torchao.

    quantized = quantize_model(model)       # every nn.Linear but the LM head -> NF4Linear, in place
    adapters = inject_adapters(model, cfg)  # wraps NF4Linear like any nn.Linear

NF4 (4-bit NormalFloat, Dettmers et al. 2023): blocks of 64 weights share an absmax scale; the scales
are themselves quantized to int8 in blocks (double quantization). The codebook and block size are
QLoRA's, and dequantized weights agree with bitsandbytes' NF4 to float rounding.

Why torchao and not bitsandbytes: both run on a CPU, but a bitsandbytes ``Linear4bit`` stores its weight
packed, shape ``(out * in / 2, 1)`` and dtype uint8, so an adapter that reads its shape and dtype from
``base_layer.weight`` gets the wrong shape and an integer dtype. torchao's ``NF4Tensor`` is a tensor
subclass that reports the logical ``(out, in)`` shape and its original dtype (fp32 here), and
``F.linear`` on it dequantizes block by block into the input's dtype, in forward and in backward (the
input gradient flows; the weight takes none). So :class:`NF4Linear` *is* an ``nn.Linear`` holding an
``NF4Tensor`` weight, the adapters built around it are fp32, and the library needs no change.

Merging is not possible on an NF4 weight (``W += ΔW`` is not defined for it): keep the adapters unmerged,
or call :func:`dequantize_model` first.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from adalora.config import ConfigError

__all__ = ["NF4Linear", "quantize_model", "dequantize_model", "param_bytes", "BLOCK_SIZE"]

log = logging.getLogger(__name__)

BLOCK_SIZE = 64  # weights per absmax scale (QLoRA's)
SCALER_BLOCK_SIZE = 256  # scales per int8 block in the double quantization (QLoRA's)


def _to_nf4():
    """torchao's to_nf4, quietly (its import logs failed optional CUDA kernels on a CPU)."""
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torchao.quantization import to_nf4
    except ImportError as e:
        raise ConfigError("model.quantize=nf4 needs torchao (pip install -e '.[qlora]', or pip install torchao "
                          "with your torch)") from e
    finally:
        quiet.setLevel(level)
    return to_nf4


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is a torchao ``NF4Tensor`` (out, in); the bias stays dense.

    It is an ``nn.Linear`` (``nn.Linear.forward`` calls ``F.linear``, which the NF4 tensor handles), so
    ``inject_adapters`` wraps it unchanged.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a dense weight first
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        """Quantize ``linear.weight`` (any float dtype) to NF4 reporting fp32: adapters built on it are fp32."""
        to_nf4 = _to_nf4()
        w = linear.weight.detach().float().contiguous()
        n_blocks = w.numel() // BLOCK_SIZE
        # torchao needs the scales to fill whole int8 blocks; a small layer gets smaller ones
        nf4 = to_nf4(w, BLOCK_SIZE, math.gcd(n_blocks, SCALER_BLOCK_SIZE))
        return cls(nf4, linear.bias)

    def dequantize(self) -> nn.Linear:
        """A dense nn.Linear (fp32) with the dequantized weight."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight.get_original_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def quantize_model(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace every plain ``nn.Linear`` of ``model`` by an :class:`NF4Linear`, in place; return their names.

    Left dense: the output embedding (the LM head, as in QLoRA), modules named in ``skip`` (suffixes), and
    layers whose size is not a multiple of the 64-weight block (logged). Call it before ``inject_adapters``.
    """
    from adalora.layers import AdapterLayer

    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ConfigError("quantize the base before injecting adapters (the model already holds adapters)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done, odd = [], []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head or any(name == s or name.endswith("." + s) for s in skip):
            continue
        if module.weight.numel() % BLOCK_SIZE:
            odd.append(name)
            continue
        parent, child = _parent(model, name)
        setattr(parent, child, NF4Linear.from_linear(module))
        done.append(name)
    if odd:
        log.warning("kept %d linear layers dense (size not a multiple of %d): %s", len(odd), BLOCK_SIZE, odd[:5])
    if not done:
        raise ConfigError(f"model.quantize=nf4: {type(model).__name__} has no nn.Linear to quantize (GPT-2's "
                          "Conv1D layers are not supported). Fix: a Llama-style model, or drop model.quantize")
    return done


def dequantize_model(model: nn.Module) -> int:
    """Replace every :class:`NF4Linear` (also inside adapters) by a dense fp32 nn.Linear; return how many.

    After it, adapters can be merged (``layer.merge()``) into the dequantized weights.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, getattr(parent, child).dequantize())
    return len(names)


def param_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters and buffers (shared tensors once); an NF4 weight counts its packed data,
    int8 scales and fp32 factors, not its logical size."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if type(t).__name__ == "NF4Tensor":  # by name: counting must not import torchao
            inner, _ = t.__tensor_flatten__()
            total += sum(getattr(t, a).numel() * getattr(t, a).element_size() for a in inner)
        else:
            total += t.numel() * t.element_size()
    return total
