"""Instruction data: Alpaca-layout JSONL (or a Hub dataset), a prompt template, response-only labels.

Pipeline::

    records = read_jsonl("train.jsonl")                      # list[Record]: instruction, input, output
    template = PromptTemplate.preset("alpaca")
    ds = tokenize_records(records, tokenizer, template, max_length=256, cache_dir=".cache/tokenized")
    loader = make_causal_loader(ds, batch_size=8, shuffle=True, seed=0, pad_id=tokenizer.pad_token_id)
    for batch in loader:   # {"input_ids": (B, L) long, "attention_mask": (B, L) long, "labels": (B, L) long}
        ...                # labels = -100 on the prompt and the padding: the loss is on the response only

One example is ``[bos] + prompt + response + [eos]`` (bos only where the tokenizer adds one itself, as
Llama's does and Qwen's and GPT-2's do not), each part tokenized without special tokens, then cut at
``max_length``. The prompt is tokenized alone, exactly as :func:`encode_prompt` does for generation, so
training and generation see the same prompt tokens. An example whose prompt fills ``max_length`` keeps no
response token; it is dropped (and counted in a warning).

A JSONL file holds one JSON object per line with a non-empty string ``instruction``, an optional string
``input`` (absent, null or "" = no input) and a non-empty string ``output``; other keys are ignored, blank
lines skipped. ``datasets`` is imported only to read the Hub (``task.hub_name``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import string
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from adalora.config import ConfigError

from .data import DataError, LengthBucketSampler, tokenizer_fingerprint

__all__ = [
    "Record",
    "read_jsonl",
    "read_hub",
    "PromptTemplate",
    "TEMPLATES",
    "bos_prefix",
    "encode_prompt",
    "InstructDataset",
    "tokenize_records",
    "collate_causal",
    "make_causal_loader",
    "response_loss_sums",
    "perplexity",
    "file_sha256",
]

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
IGNORE_INDEX = -100  # the label torch's cross_entropy (and transformers' causal-LM loss) skips

# Stanford Alpaca's templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim; the response
# follows "### Response:" directly, as in their training targets.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": (ALPACA_WITH_INPUT, ALPACA_NO_INPUT),
    # no preamble: shorter sequences for small models and tests
    "plain": ("{instruction}\n{input}\nAnswer:", "{instruction}\nAnswer:"),
}
"""Template presets: name -> (with input, without input)."""


@dataclass(frozen=True)
class Record:
    """One instruction example; ``input`` is "" when the record has none."""

    instruction: str
    input: str
    output: str


def _record(obj: Any, where: str) -> Record:
    """Check one decoded JSON object; ``where`` is ``file:line`` (or ``dataset[split] row i``)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with instruction/input/output, got {type(obj).__name__}. "
                        "Fix: one object per line, e.g. {\"instruction\": \"...\", \"output\": \"...\"}")
    values = {}
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        v = obj.get(key)
        if v is None and not required:
            v = ""
        if v is None:
            raise DataError(f"{where}: missing field {key!r} (keys: {sorted(obj)[:6]}). Fix: add a non-empty "
                            f"string {key!r}, or remove this line")
        if not isinstance(v, str):
            raise DataError(f"{where}: field {key!r} is a {type(v).__name__}, not a string. Fix: write it as a "
                            "JSON string")
        if required and not v.strip():
            raise DataError(f"{where}: field {key!r} is empty. Fix: give it text, or remove this line")
        values[key] = v
    return Record(values["instruction"], values["input"], values["output"])


def read_jsonl(path: str | os.PathLike, max_records: int | None = None) -> list[Record]:
    """The records of an Alpaca-layout JSONL file, in file order (the first ``max_records`` if set).

    Raises:
        DataError: a missing file, a line that is not UTF-8 or not JSON, a record that is not an object, a
            missing or empty ``instruction``/``output``, a field that is not a string, or no record at all;
            the message names ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist or is not a file. Fix: point task.train_file / "
                        "task.eval_file / task.exact_match_file at an Alpaca-layout JSONL file")
    records: list[Record] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}). Fix: save the file "
                                "as UTF-8") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno}). Fix: one JSON object per "
                                "line (JSONL), no trailing commas, strings in double quotes") from None
            records.append(_record(obj, where))
            if max_records is not None and len(records) >= max_records:
                break
    if not records:
        raise DataError(f"{path}: no records. Fix: one JSON object per line with instruction/input/output")
    return records


def read_hub(name: str, split: str) -> tuple[list[Record], str]:
    """The records of a Hub dataset split (e.g. ``tatsu-lab/alpaca``, ``train``) and its datasets fingerprint."""
    try:
        import datasets
    except ImportError as e:
        raise ConfigError("task.hub_name needs the package datasets (pip install -e '.[hub]')") from e
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (network, missing split, ...)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"task.hub_name={name!r} split {split!r}: cannot load it ({first}). Fix: an existing "
                          "dataset and split, online, or local files (task.train_file=...)") from None
    records = [_record(row, f"{name}[{split}] row {i}") for i, row in enumerate(ds)]
    if not records:
        raise DataError(f"{name}[{split}]: no records")
    return records, str(getattr(ds, "_fingerprint", ""))


@dataclass(frozen=True)
class PromptTemplate:
    """How a record becomes a prompt: ``with_input`` names ``{instruction}`` and ``{input}``, ``no_input``
    ``{instruction}`` only (write a literal brace as ``{{`` or ``}}``)."""

    with_input: str
    no_input: str

    def __post_init__(self):
        for field_name, text, allowed in (("prompt_with_input", self.with_input, {"instruction", "input"}),
                                          ("prompt_no_input", self.no_input, {"instruction"})):
            try:
                names = {n for _, n, _, _ in string.Formatter().parse(text) if n is not None}
            except ValueError as e:
                raise ConfigError(f"task.{field_name}={text!r}: not a format string ({e}). Fix: write literal "
                                  "braces as {{ and }}") from None
            if "instruction" not in names or not names <= allowed:
                raise ConfigError(f"task.{field_name}={text!r}: must name {{instruction}}"
                                  f"{' and {input}' if 'input' in allowed else ''} and nothing else "
                                  f"(found {sorted(names)}). Fix: e.g. the alpaca preset (task.template=alpaca)")

    @classmethod
    def preset(cls, name: str, with_input: str | None = None, no_input: str | None = None) -> PromptTemplate:
        """A preset of :data:`TEMPLATES`, either string replaced when given."""
        if name not in TEMPLATES:
            raise ConfigError(f"task.template={name!r}: expected one of {sorted(TEMPLATES)}. Fix: task.template="
                              "alpaca, or give task.prompt_with_input and task.prompt_no_input")
        w, n = TEMPLATES[name]
        return cls(with_input if with_input is not None else w, no_input if no_input is not None else n)

    def format(self, rec: Record) -> str:
        if rec.input.strip():
            return self.with_input.format(instruction=rec.instruction, input=rec.input)
        return self.no_input.format(instruction=rec.instruction)


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer puts a BOS token first on its own (Llama, Mistral), else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a").input_ids
    return [bos] if ids and ids[0] == bos else []


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, as training sees them before the response."""
    return bos_prefix(tokenizer) + list(tokenizer(prompt, add_special_tokens=False).input_ids)


class InstructDataset(Dataset):
    """Tokenized examples, stored flat: ``input_ids`` and ``labels`` (sum of lengths,) int32, ``offsets`` (N+1,).

    Item ``i`` is ``{"input_ids": (L_i,) long, "labels": (L_i,) long}``.
    """

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor, n_dropped: int = 0):
        self.input_ids, self.labels, self.offsets, self.n_dropped = input_ids, labels, offsets, int(n_dropped)
        self._lengths = (offsets[1:] - offsets[:-1]).numpy()

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], n_dropped: int = 0):
        lens = torch.tensor([len(x) for x in ids], dtype=torch.int64)
        offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lens, 0)
        flat = lambda seqs: torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
        return cls(flat(ids), flat(labels), offsets, n_dropped)

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64 sequence lengths, for :class:`LengthBucketSampler`."""
        return self._lengths

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.input_ids[s:e].long(), "labels": self.labels[s:e].long()}

    def state(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT_VERSION, "input_ids": self.input_ids, "labels": self.labels,
                "offsets": self.offsets, "n_dropped": self.n_dropped}

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> InstructDataset:
        if st.get("format") != CACHE_FORMAT_VERSION:
            raise ValueError(f"unsupported cache format {st.get('format')!r}")
        return cls(st["input_ids"], st["labels"], st["offsets"], st["n_dropped"])


def _encode(records: Sequence[Record], tokenizer: Any, template: PromptTemplate, max_length: int):
    """(ids, labels) per kept record and the number dropped (no response token left after the cut)."""
    prefix, eos = bos_prefix(tokenizer), tokenizer.eos_token_id
    prompts = tokenizer([template.format(r) for r in records], add_special_tokens=False).input_ids
    responses = tokenizer([r.output for r in records], add_special_tokens=False).input_ids
    ids, labels, dropped = [], [], 0
    for p, r in zip(prompts, responses, strict=True):
        prompt = prefix + list(p)
        full = (prompt + list(r) + [eos])[:max_length]
        if len(full) <= len(prompt):  # the prompt alone fills max_length: nothing to learn
            dropped += 1
            continue
        ids.append(full)
        labels.append([IGNORE_INDEX] * len(prompt) + full[len(prompt):])
    return ids, labels, dropped


def _cache_key(records: Sequence[Record], tokenizer: Any, template: PromptTemplate, max_length: int) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.instruction, r.input, r.output], ensure_ascii=False).encode("utf-8") + b"\n")
    payload = {"format": CACHE_FORMAT_VERSION, "records": h.hexdigest(), "n": len(records),
               "template": [template.with_input, template.no_input], "max_length": int(max_length),
               "tokenizer": tokenizer_fingerprint(tokenizer), "eos": tokenizer.eos_token_id,
               "bos": bos_prefix(tokenizer)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def tokenize_records(records: Sequence[Record], tokenizer: Any, template: PromptTemplate, max_length: int,
                     cache_dir: str | os.PathLike | None = None, what: str = "records") -> InstructDataset:
    """Tokenize once, caching ``<cache_dir>/instruct-<key>.pt`` (key: the records' content, the template, the
    tokenizer's identity, bos/eos and ``max_length``); written atomically, read with ``weights_only=True``,
    rebuilt when unreadable.

    Raises:
        ConfigError: the tokenizer has no EOS token.
        DataError: every record's prompt fills ``max_length`` (``what`` names the data in the message).
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: a causal LM needs one to learn where an answer ends. "
                          "Fix: model.tokenizer=<a tokenizer with eos_token>")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"instruct-{_cache_key(records, tokenizer, template, max_length)}.pt"
        if path.is_file():
            try:
                return InstructDataset.from_state(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - any unreadable cache is simply rebuilt
                log.warning("ignoring unreadable tokenization cache %s (%s); rebuilding", path, e)
    ids, labels, dropped = _encode(records, tokenizer, template, max_length)
    if not ids:
        raise DataError(f"{what}: every prompt is at least task.max_length={max_length} tokens, so no response "
                        "token is left to learn. Fix: raise task.max_length or shorten the template "
                        "(task.template=plain)")
    if dropped:
        log.warning("%s: %d of %d examples dropped (prompt >= task.max_length=%d tokens)", what, dropped,
                    len(records), max_length)
    ds = InstructDataset.from_lists(ids, labels, dropped)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(ds.state(), f)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ds


def collate_causal(batch: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids with ``pad_id``, labels with -100, attention_mask 0 (B, L)."""
    lens = [len(it["input_ids"]) for it in batch]
    b, n = len(batch), max(lens)
    input_ids = torch.full((b, n), int(pad_id), dtype=torch.long)
    labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, n), dtype=torch.long)
    for i, (it, k) in enumerate(zip(batch, lens, strict=True)):
        input_ids[i, :k], labels[i, :k], mask[i, :k] = it["input_ids"], it["labels"], 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_causal_loader(ds: InstructDataset, batch_size: int, shuffle: bool, seed: int, pad_id: int,
                       bucket: bool = True) -> DataLoader:
    """Length-bucketed batches with :class:`LengthBucketSampler`: the order is a function of (seed, epoch) and
    ``loader.batch_sampler.set_epoch(epoch, start_batch)`` resumes mid-epoch."""
    sampler = LengthBucketSampler(ds.lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=partial(collate_causal, pad_id=pad_id), num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def response_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over the response tokens, and their count.

    logits (B, L, V) predict token t+1 at position t; labels (B, L) with -100 where no loss is taken.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B (L-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B (L-1),)
    total = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((shift_labels != IGNORE_INDEX).sum())


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def perplexity(loss: float) -> float:
    """exp(loss); inf past float range (an untrained model on a large vocabulary stays far below that)."""
    return math.exp(loss) if loss < 700 else float("inf")
