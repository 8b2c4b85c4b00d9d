"""Greedy generation from a causal LM with adapters (merged or not), exact match, and a samples file.

    outputs = generate(model, tokenizer, ["### Instruction:\\nReverse: a b\\n\\n### Response:"], max_new_tokens=16)
    write_samples(run_dir / "samples.jsonl", prompts, references, outputs)

Prompts are encoded as training encodes them (:func:`adalora_lab.instruct.encode_prompt`), left-padded
into batches, and continued by ``model.generate`` with greedy decoding up to ``max_new_tokens`` or EOS.
Adapters are ordinary modules inside the model, so nothing changes between merged and unmerged
adapters. On a 4-bit base (``model.quantize=nf4``) adapters stay unmerged: the NF4 weight cannot take
``W += ΔW`` (dequantize first with :func:`adalora_lab.quant.dequantize_model`).
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from .instruct import encode_prompt

__all__ = ["generate", "normalize_answer", "exact_match", "write_samples"]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 8,
             autocast_dtype: torch.dtype | None = None) -> list[str]:
    """The greedy continuation of each prompt, decoded without special tokens and stripped.

    The model is put in eval mode for the call and given back in its mode.
    """
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                               pad_token_id=pad)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext())
    was = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(tokenizer, p) for p in prompts[s:s + batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for i, e in enumerate(encoded):  # left padding: every row's next token is at column `width`
                ids[i, width - len(e):], mask[i, width - len(e):] = torch.tensor(e), 1
            with amp:
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_cfg)
            for row in out[:, width:].tolist():  # the new tokens only
                if eos in row:
                    row = row[:row.index(eos)]
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was)
    return outputs


def normalize_answer(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: what exact match compares."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_match(outputs: Sequence[str], references: Sequence[str]) -> float:
    """Share of outputs equal to their reference after :func:`normalize_answer`."""
    if len(outputs) != len(references) or not outputs:
        raise ValueError(f"exact_match needs as many outputs as references (> 0), got {len(outputs)} and "
                         f"{len(references)}")
    return sum(normalize_answer(o) == normalize_answer(r) for o, r in zip(outputs, references)) / len(outputs)


def write_samples(path: str | os.PathLike, prompts: Sequence[str], references: Sequence[str],
                  outputs: Sequence[str]) -> Path:
    """One JSON object per line: prompt, reference, output, exact (normalised equality)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p, r, o in zip(prompts, references, outputs, strict=True):
            f.write(json.dumps({"prompt": p, "reference": r, "output": o,
                                "exact": normalize_answer(o) == normalize_answer(r)}, ensure_ascii=False) + "\n")
    return path
