"""GLUE data: reading the TSV files, tokenizing once (cached), length-bucketed dynamic-padding batches.

Pipeline::

    examples = load_task("rte", data_dir="/path/to/glue", split="train")     # list[Example]
    ds = tokenize(examples, tokenizer, max_length=256, cache_dir=".cache/tok")   # TokenizedDataset
    loader = make_loader(ds, batch_size=32, shuffle=True, seed=0, pad_id=tokenizer.pad_token_id)
    for epoch in range(n_epochs):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:   # {"input_ids": (B, L) long, "attention_mask": (B, L) long,
            ...                #  "token_type_ids": (B, L) long (if the tokenizer makes them), "labels": (B,)}

``data_dir`` is a folder in the layout of the standard GLUE download (``download_glue_data.py``):
``<data_dir>/<TaskFolder>/{train,dev}.tsv`` with ``TaskFolder`` one of SST-2, RTE, MRPC, CoLA, STS-B,
QNLI, MNLI, QQP (MNLI's dev split is ``dev_matched.tsv``). Pointing ``data_dir`` straight at the task
folder also works. Files are parsed with CSV quoting *off* (each line is split on tab), as GLUE and
HuggingFace ``glue`` do; with quoting on, MRPC silently loses rows.

Labels follow HuggingFace ``glue`` ids (e.g. RTE/QNLI ``entailment`` = 0, ``not_entailment`` = 1;
MNLI ``entailment`` = 0, ``neutral`` = 1, ``contradiction`` = 2), so local files and ``hub=True`` give
the same ids. STS-B is a regression task: its labels are floats in [0, 5].

This module never imports hydra or wandb; ``datasets`` is imported only when ``hub=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DataError",
    "Example",
    "GlueTask",
    "GLUE_TASKS",
    "get_task",
    "task_file",
    "read_glue_tsv",
    "load_task",
    "TokenizedDataset",
    "tokenize",
    "collate",
    "LengthBucketSampler",
    "make_loader",
]

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


class DataError(ValueError):
    """A problem with the input data that the user can fix; the message says where and how."""


@dataclass(frozen=True)
class Example:
    """One GLUE example. ``label`` is an ``int`` class id, or a ``float`` score for STS-B."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is laid out on disk and on the HuggingFace Hub.

    Attributes:
        name: canonical short name (``"rte"``), also the HuggingFace ``glue`` config name.
        folder: folder name in the GLUE download (``"RTE"``).
        files: split name -> TSV file name inside ``folder``.
        columns: column names. For files with a header these are the columns we need, looked up by name
            in the header; for header-less files (CoLA) the full, positional column list.
        has_header: whether the TSV's first line is a header.
        text_a, text_b: columns holding the text (``text_b`` is None for single-sentence tasks).
        label_column: column holding the label.
        label_values: the raw label strings as written in the TSV, in label-id order (id = position).
            Empty for regression tasks.
        label_names: human-readable names of the label ids (HuggingFace ``glue`` ``ClassLabel`` names).
        num_labels: number of classes; 1 for regression (STS-B).
        hf_dataset: ``(path, config)`` for ``datasets.load_dataset``.
        hf_text_a, hf_text_b: text columns in the HuggingFace dataset.
        hf_splits: our split name -> HuggingFace split name.
    """

    name: str
    folder: str
    files: dict[str, str]
    columns: tuple[str, ...]
    has_header: bool
    text_a: str
    text_b: str | None
    label_column: str
    label_values: tuple[str, ...]
    label_names: tuple[str, ...]
    num_labels: int
    hf_dataset: tuple[str, str]
    hf_text_a: str
    hf_text_b: str | None
    hf_splits: dict[str, str]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)


_STD_FILES = {"train": "train.tsv", "dev": "dev.tsv"}
_STD_HF_SPLITS = {"train": "train", "dev": "validation"}
_HF_GLUE = "nyu-mll/glue"  # the Hub no longer answers the bare alias "glue"

GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask(
        name="sst2",
        folder="SST-2",
        files=_STD_FILES,
        columns=("sentence", "label"),
        has_header=True,
        text_a="sentence",
        text_b=None,
        label_column="label",
        label_values=("0", "1"),
        label_names=("negative", "positive"),
        num_labels=2,
        hf_dataset=(_HF_GLUE, "sst2"),
        hf_text_a="sentence",
        hf_text_b=None,
        hf_splits=_STD_HF_SPLITS,
    ),
    "cola": GlueTask(
        # No header; columns: source code, label, original acceptability mark ("*" or empty), sentence.
        name="cola",
        folder="CoLA",
        files=_STD_FILES,
        columns=("source", "label", "original_label", "sentence"),
        has_header=False,
        text_a="sentence",
        text_b=None,
        label_column="label",
        label_values=("0", "1"),
        label_names=("unacceptable", "acceptable"),
        num_labels=2,
        hf_dataset=(_HF_GLUE, "cola"),
        hf_text_a="sentence",
        hf_text_b=None,
        hf_splits=_STD_HF_SPLITS,
    ),
    "mrpc": GlueTask(
        # Header: "\ufeffQuality  #1 ID  #2 ID  #1 String  #2 String" (BOM removed by utf-8-sig).
        name="mrpc",
        folder="MRPC",
        files=_STD_FILES,
        columns=("Quality", "#1 String", "#2 String"),
        has_header=True,
        text_a="#1 String",
        text_b="#2 String",
        label_column="Quality",
        label_values=("0", "1"),
        label_names=("not_equivalent", "equivalent"),
        num_labels=2,
        hf_dataset=(_HF_GLUE, "mrpc"),
        hf_text_a="sentence1",
        hf_text_b="sentence2",
        hf_splits=_STD_HF_SPLITS,
    ),
    "rte": GlueTask(
        # Header: index  sentence1  sentence2  label
        name="rte",
        folder="RTE",
        files=_STD_FILES,
        columns=("sentence1", "sentence2", "label"),
        has_header=True,
        text_a="sentence1",
        text_b="sentence2",
        label_column="label",
        label_values=("entailment", "not_entailment"),
        label_names=("entailment", "not_entailment"),
        num_labels=2,
        hf_dataset=(_HF_GLUE, "rte"),
        hf_text_a="sentence1",
        hf_text_b="sentence2",
        hf_splits=_STD_HF_SPLITS,
    ),
    "stsb": GlueTask(
        # Header: index genre filename year old_index source1 source2 sentence1 sentence2 score
        name="stsb",
        folder="STS-B",
        files=_STD_FILES,
        columns=("sentence1", "sentence2", "score"),
        has_header=True,
        text_a="sentence1",
        text_b="sentence2",
        label_column="score",
        label_values=(),
        label_names=(),
        num_labels=1,
        hf_dataset=(_HF_GLUE, "stsb"),
        hf_text_a="sentence1",
        hf_text_b="sentence2",
        hf_splits=_STD_HF_SPLITS,
    ),
    "qnli": GlueTask(
        # Header: index  question  sentence  label
        name="qnli",
        folder="QNLI",
        files=_STD_FILES,
        columns=("question", "sentence", "label"),
        has_header=True,
        text_a="question",
        text_b="sentence",
        label_column="label",
        label_values=("entailment", "not_entailment"),
        label_names=("entailment", "not_entailment"),
        num_labels=2,
        hf_dataset=(_HF_GLUE, "qnli"),
        hf_text_a="question",
        hf_text_b="sentence",
        hf_splits=_STD_HF_SPLITS,
    ),
    "mnli": GlueTask(
        # Header (train, 12 cols): index promptID pairID genre sentence1_binary_parse sentence2_binary_parse
        #   sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label
        # dev_matched has label1..label5 then gold_label (16 cols). We always use gold_label.
        name="mnli",
        folder="MNLI",
        files={"train": "train.tsv", "dev": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
        columns=("sentence1", "sentence2", "gold_label"),
        has_header=True,
        text_a="sentence1",
        text_b="sentence2",
        label_column="gold_label",
        label_values=("entailment", "neutral", "contradiction"),
        label_names=("entailment", "neutral", "contradiction"),
        num_labels=3,
        hf_dataset=(_HF_GLUE, "mnli"),
        hf_text_a="premise",
        hf_text_b="hypothesis",
        hf_splits={"train": "train", "dev": "validation_matched", "dev_mismatched": "validation_mismatched"},
    ),
    "qqp": GlueTask(
        # Header: id  qid1  qid2  question1  question2  is_duplicate
        name="qqp",
        folder="QQP",
        files=_STD_FILES,
        columns=("question1", "question2", "is_duplicate"),
        has_header=True,
        text_a="question1",
        text_b="question2",
        label_column="is_duplicate",
        label_values=("0", "1"),
        label_names=("not_duplicate", "duplicate"),
        num_labels=2,
        hf_dataset=(_HF_GLUE, "qqp"),
        hf_text_a="question1",
        hf_text_b="question2",
        hf_splits=_STD_HF_SPLITS,
    ),
}
"""Registry of the GLUE tasks supported, keyed by canonical short name."""

_SPLIT_ALIASES = {
    "validation": "dev",
    "val": "dev",
    "dev_matched": "dev",
    "validation_matched": "dev",
    "validation_mismatched": "dev_mismatched",
}


def get_task(task: str | GlueTask) -> GlueTask:
    """Look up a task by name; accepts ``"rte"``, ``"RTE"``, ``"SST-2"``, ``"sts_b"``, ..."""
    if isinstance(task, GlueTask):
        return task
    key = str(task).lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {task!r}; supported tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _canonical_split(spec: GlueTask, split: str) -> str:
    s = _SPLIT_ALIASES.get(split.lower(), split.lower())
    if s not in spec.files:
        hint = " (GLUE test labels are not public, so there is no labelled test split)" if s == "test" else ""
        raise DataError(
            f"task {spec.name!r} has no split {split!r}{hint}; available splits: {', '.join(spec.files)} "
            f"(aliases: 'validation' = 'dev')"
        )
    return s


def task_file(task: str | GlueTask, data_dir: str | os.PathLike, split: str) -> Path:
    """Path of the TSV file for ``(task, split)`` under ``data_dir``.

    ``data_dir`` may be the GLUE root (holding ``RTE/``, ``MRPC/``, ...) or the task folder itself.

    Raises:
        DataError: the file is not there; the message names the expected path.
    """
    spec = get_task(task)
    fname = spec.files[_canonical_split(spec, split)]
    root = Path(data_dir).expanduser()
    candidates = [root / spec.folder / fname, root / fname]
    for c in candidates:
        if c.is_file():
            return c
    if not root.is_dir():
        problem = f"data directory {str(root)!r} does not exist"
    elif not (root / spec.folder).is_dir():
        problem = f"data directory {str(root)!r} has no {spec.folder}/ folder"
    else:
        problem = f"{str(root / spec.folder)!r} has no {fname}"
    raise DataError(
        f"cannot find the {spec.name} {split} file: {problem}. Expected {str(candidates[0])!r}. "
        f"`task.data_dir` should point to a GLUE-format folder (as made by download_glue_data.py) containing "
        f"{spec.folder}/{fname}, or set `task.hub=true` to download task {spec.name!r} from the Hub with "
        f"HuggingFace datasets."
    )


def _parse_label(spec: GlueTask, raw: str, where: str) -> int | float:
    if spec.is_regression:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            raise DataError(
                f"{where}: label {raw!r} in column {spec.label_column!r} is not a number; "
                f"{spec.name} is a regression task whose labels are similarity scores in [0, 5]."
            ) from None
        if not 0.0 <= value <= 5.0:
            raise DataError(
                f"{where}: label {raw!r} in column {spec.label_column!r} is outside [0, 5], the range of "
                f"{spec.name} similarity scores; the file may be corrupt or its columns shifted. "
                "Fix or remove this line."
            )
        return value
    raw_s = raw.strip()
    try:
        return spec.label_values.index(raw_s)
    except ValueError:
        valid = ", ".join(repr(v) for v in spec.label_values)
        raise DataError(
            f"{where}: unknown label {raw!r} in column {spec.label_column!r}; valid labels for {spec.name} are "
            f"{valid}. Fix or remove this line (if this is a GLUE test file, it has no labels and cannot be used)."
        ) from None


def read_glue_tsv(path: str | os.PathLike, task: str | GlueTask) -> list[Example]:
    """Read a GLUE-format TSV file of ``task`` into examples, in file order.

    Every line is split on ``"\\t"`` with no CSV quote processing (fields may start with a bare ``"``).
    The file is decoded as UTF-8 (like ``encoding="utf-8-sig"``: a leading BOM, as in MRPC, is dropped).
    Lines are split on ``"\\n"`` only, and a trailing ``"\\r"`` is removed, so Windows line endings are
    fine. Empty lines are skipped.
    Text fields are kept verbatim (SST-2 sentences keep their trailing space, as in HuggingFace ``glue``).

    Returns:
        ``list[Example]``; labels are ids into ``GLUE_TASKS[task].label_values`` (float scores for STS-B).

    Raises:
        DataError: missing file, not UTF-8, header lacking a needed column, a line whose number of fields
            differs from the header's, an unknown label, or no data rows. Messages name ``file:line``.
    """
    spec = get_task(task)
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{str(path)!r} does not exist or is not a file. `task.data_dir` should point to a GLUE-format "
            f"folder containing {spec.folder}/{spec.files['train']} and {spec.folder}/{spec.files['dev']}."
        )
    examples: list[Example] = []
    n_fields: int | None = None if spec.has_header else len(spec.columns)
    idx: dict[str, int] = {} if spec.has_header else {c: i for i, c in enumerate(spec.columns)}
    # Binary read: only b"\n" ends a line (a stray "\r" inside a field cannot split a row), and a decoding
    # error can be reported with its exact line number.
    with open(path, "rb") as f:
        for lineno, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: the line is not valid UTF-8 ({e.reason} at byte {e.start} of the line). "
                    f"Re-download the GLUE file or re-save it as UTF-8."
                ) from None
            line = line.rstrip("\n").rstrip("\r")
            if not line:
                continue
            fields = line.split("\t")
            if n_fields is None:  # header line
                header = [h.strip() for h in fields]
                missing = [c for c in spec.columns if c not in header]
                if missing:
                    raise DataError(
                        f"{path}:{lineno}: header {header} lacks column(s) {missing} needed for {spec.name}. "
                        f"Expected the header of the GLUE {spec.folder} file (needs {list(spec.columns)}); "
                        f"was the file edited or is it from another task?"
                    )
                n_fields = len(fields)
                idx = {c: header.index(c) for c in spec.columns}
                continue
            if len(fields) != n_fields:
                what = "the header has" if spec.has_header else f"{spec.name} files (no header) have"
                raise DataError(
                    f"{path}:{lineno}: expected {n_fields} tab-separated fields ({what} {n_fields}), found "
                    f"{len(fields)}. Fields must be separated by single tabs and contain no tabs or line breaks; "
                    f"use the unmodified GLUE file (spreadsheet tools and CSV writers with quoting often "
                    f"break it), or fix/remove this line."
                )
            label = _parse_label(spec, fields[idx[spec.label_column]], f"{path}:{lineno}")
            text_b = fields[idx[spec.text_b]] if spec.text_b is not None else None
            examples.append(Example(fields[idx[spec.text_a]], text_b, label))
    if not examples:
        raise DataError(
            f"{path}: no data rows (the file is empty{' or has only a header' if spec.has_header else ''}). "
            f"Re-download the GLUE {spec.folder} data."
        )
    return examples


def load_task(
    task: str,
    data_dir: str | os.PathLike | None,
    split: str,
    max_examples: int | None = None,
    hub: bool = False,
) -> list[Example]:
    """Load one split of a GLUE task as a list of examples.

    Args:
        task: task name (see :data:`GLUE_TASKS`; ``"SST-2"``-style spellings accepted).
        data_dir: GLUE-format root folder (or the task folder itself). Ignored when ``hub=True``.
        split: ``"train"`` or ``"dev"`` (alias ``"validation"``); MNLI's ``"dev"`` is dev-matched, and
            ``"dev_mismatched"`` is also available.
        max_examples: if set, keep only the *first* ``max_examples`` examples in file order. This head
            subset is deterministic (no sampling), so debug runs and their caches are reproducible.
            Note that a head subset need not be label-balanced.
        hub: read from the HuggingFace Hub via ``datasets.load_dataset("nyu-mll/glue", config)`` instead of local
            files (needs network or a populated HF cache). Same label ids as the local files.

    Returns:
        ``list[Example]`` in file / dataset order.
    """
    spec = get_task(task)
    split_c = _canonical_split(spec, split)
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    if hub:
        examples = _load_from_hub(spec, split_c, max_examples)
    else:
        if data_dir is None:
            raise DataError(
                f"no data directory given for task {spec.name!r}: set `task.data_dir` to a GLUE-format folder "
                f"(containing {spec.folder}/{spec.files[split_c]}) or use hub=True."
            )
        examples = read_glue_tsv(task_file(spec, data_dir, split_c), spec)
    if max_examples is not None:
        examples = examples[:max_examples]
    return examples


def _load_from_hub(spec: GlueTask, split: str, max_examples: int | None) -> list[Example]:
    try:
        import datasets  # lazy: heavy import, and only needed for hub=True
    except ImportError as e:  # the optional `hub` extra
        raise DataError("hub=True needs the `datasets` package (pip install datasets)") from e
    path, cfg = spec.hf_dataset
    hf_split = spec.hf_splits[split]
    if max_examples is not None:
        hf_split = f"{hf_split}[:{max_examples}]"
    try:
        ds = datasets.load_dataset(path, cfg, split=hf_split)
    except Exception as e:  # network / hub errors: explain the alternative
        raise DataError(
            f"could not load {path}/{cfg} split {hf_split!r} from the HuggingFace Hub ({type(e).__name__}: {e}). "
            f"Without network access, download GLUE once and set `task.data_dir` (hub=False)."
        ) from e
    texts_a = ds[spec.hf_text_a]
    texts_b = ds[spec.hf_text_b] if spec.hf_text_b is not None else [None] * len(texts_a)
    labels = ds["label"]
    out: list[Example] = []
    for i, (a, b, y) in enumerate(zip(texts_a, texts_b, labels, strict=True)):
        if spec.is_regression:
            out.append(Example(a, b, float(y)))
        else:
            if not 0 <= int(y) < spec.num_labels:
                raise DataError(f"{path}/{cfg}[{hf_split}] row {i}: label {y} is not in 0..{spec.num_labels - 1}")
            out.append(Example(a, b, int(y)))
    if not out:
        raise DataError(f"{path}/{cfg} split {hf_split!r} is empty")
    return out


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


class TokenizedDataset(Dataset):
    """Tokenized examples, stored flat (no padding) for compact memory and fast caching.

    Storage: ``input_ids`` is a 1-D int32 tensor holding all sequences back to back; example ``i`` is
    ``input_ids[offsets[i]:offsets[i + 1]]`` (``offsets``: int64, shape ``(N + 1,)``). ``token_type_ids``
    (optional) has the same layout. ``labels``: shape ``(N,)``, int64 (classification) or float32
    (regression).

    ``dataset[i]`` returns ``{"input_ids": LongTensor (L_i,), "label": int | float}`` plus
    ``"token_type_ids": LongTensor (L_i,)`` when present. Use :func:`collate` to batch.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        offsets: torch.Tensor,
        labels: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> None:
        if offsets.ndim != 1 or offsets.numel() != labels.numel() + 1:
            raise ValueError(f"offsets must have shape (N + 1,) = ({labels.numel() + 1},), got {tuple(offsets.shape)}")
        if int(offsets[-1]) != input_ids.numel():
            raise ValueError("offsets[-1] must equal the total number of tokens")
        if token_type_ids is not None and token_type_ids.numel() != input_ids.numel():
            raise ValueError("token_type_ids must have the same number of elements as input_ids")
        self.input_ids = input_ids
        self.offsets = offsets.to(torch.int64)
        self.labels = labels
        self.token_type_ids = token_type_ids
        self._lengths = (self.offsets[1:] - self.offsets[:-1]).numpy()

    @classmethod
    def from_lists(
        cls,
        input_ids: Sequence[Sequence[int]],
        labels: Sequence[int | float],
        token_type_ids: Sequence[Sequence[int]] | None = None,
        regression: bool | None = None,
    ) -> TokenizedDataset:
        """Build from per-example lists; ``regression`` defaults to "any label is a float"."""
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} sequences but {len(labels)} labels")
        if regression is None:
            regression = any(isinstance(y, float) for y in labels)
        lens = np.fromiter((len(s) for s in input_ids), dtype=np.int64, count=len(input_ids))
        offsets = torch.zeros(len(input_ids) + 1, dtype=torch.int64)
        offsets[1:] = torch.from_numpy(np.cumsum(lens))
        flat = torch.tensor([t for s in input_ids for t in s], dtype=torch.int32)
        tt = None
        if token_type_ids is not None:
            tt = torch.tensor([t for s in token_type_ids for t in s], dtype=torch.int8)
        y = torch.tensor(list(labels), dtype=torch.float32 if regression else torch.int64)
        return cls(flat, offsets, y, tt)

    @property
    def is_regression(self) -> bool:
        return self.labels.dtype.is_floating_point

    @property
    def lengths(self) -> np.ndarray:
        """Sequence lengths, shape ``(N,)`` int64 (the input of :class:`LengthBucketSampler`)."""
        return self._lengths

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        item: dict[str, Any] = {"input_ids": self.input_ids[s:e].long(), "label": self.labels[i].item()}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[s:e].long()
        return item

    def state(self) -> dict[str, Any]:
        """Plain tensors/ints/strs only, loadable with ``torch.load(weights_only=True)``."""
        st: dict[str, Any] = {
            "format": CACHE_FORMAT_VERSION,
            "input_ids": self.input_ids,
            "offsets": self.offsets,
            "labels": self.labels,
        }
        if self.token_type_ids is not None:
            st["token_type_ids"] = self.token_type_ids
        return st

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> TokenizedDataset:
        if st.get("format") != CACHE_FORMAT_VERSION:
            raise ValueError(f"unsupported cache format {st.get('format')!r}")
        return cls(st["input_ids"], st["offsets"], st["labels"], st.get("token_type_ids"))


def examples_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        # Unambiguous framing: JSON of the triple, one per line.
        h.update(json.dumps([ex.text_a, ex.text_b, ex.label], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's output: class, name/path, vocab size, and (fast tokenizers) its full JSON."""
    fp: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "model_input_names": list(getattr(tokenizer, "model_input_names", [])),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            spec = json.loads(backend.to_str())
            # Calling a fast tokenizer stores its last truncation/padding settings in the backend; those
            # are call options, not identity (max_length is keyed separately), so leave them out.
            spec.pop("truncation", None)
            spec.pop("padding", None)
            fp["backend_sha256"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()
        except Exception:  # noqa: BLE001 - fingerprint is best effort; name+size still key the cache
            pass
    return fp


def cache_key(examples: Sequence[Example], tokenizer: Any, max_length: int) -> str:
    """Hex digest keying the tokenization cache: examples' content, tokenizer identity, max_length."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "examples": examples_hash(examples),
        "n": len(examples),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": int(max_length),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def _run_tokenizer(
    examples: Sequence[Example], tokenizer: Any, max_length: int, chunk_size: int
) -> tuple[list[list[int]], list[list[int]] | None]:
    want_tt = "token_type_ids" in getattr(tokenizer, "model_input_names", ["token_type_ids"])
    ids: list[list[int]] = [[] for _ in examples]
    tts: list[list[int]] | None = [[] for _ in examples] if want_tt else None
    chunks = range(0, len(examples), chunk_size)
    if len(chunks) > 1:  # a large split (SST-2: 67k examples) says what it is doing, with a bar on a terminal
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"tokenizing {len(examples)} examples", unit="chunk", leave=False,
                      disable=not sys.stderr.isatty())
        log.info("tokenizing %d examples", len(examples))
    for start in chunks:
        chunk = range(start, min(start + chunk_size, len(examples)))
        # Single-sentence and pair examples are encoded separately (a task has only one kind).
        for pair in (False, True):
            sel = [i for i in chunk if (examples[i].text_b is not None) == pair]
            if not sel:
                continue
            args = [[examples[i].text_a for i in sel]]
            if pair:
                args.append([examples[i].text_b for i in sel])
            enc = tokenizer(
                *args,
                truncation=True,
                max_length=max_length,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=want_tt,
            )
            for j, i in enumerate(sel):
                ids[i] = list(enc["input_ids"][j])
                if tts is not None:
                    tts[i] = list(enc["token_type_ids"][j])
    return ids, tts


def tokenize(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    cache_dir: str | os.PathLike | None = None,
    *,
    chunk_size: int = 2048,
) -> TokenizedDataset:
    """Tokenize ``examples`` once (with truncation, no padding), caching the result on disk.

    Args:
        examples: from :func:`load_task` / :func:`read_glue_tsv`.
        tokenizer: a HuggingFace tokenizer, called as ``tokenizer(text_a[, text_b], truncation=True,
            max_length=max_length)`` (pairs truncated ``longest_first``, special tokens added).
            ``token_type_ids`` are kept iff ``"token_type_ids" in tokenizer.model_input_names``.
        max_length: maximum sequence length including special tokens.
        cache_dir: folder for the cache (created if needed); ``None`` disables caching. The file is
            ``<cache_dir>/tok-<key>.pt`` with ``key`` = hash of the examples' content (text and labels),
            the tokenizer (class, ``name_or_path``, vocab size, full serialized fast-tokenizer JSON) and
            ``max_length``. Written atomically (temp file + ``os.replace``), so concurrent runs and
            crashes never leave a half-written cache; loaded with ``torch.load(weights_only=True)``.
            A corrupt or unreadable cache file is ignored (with a warning) and rebuilt.
        chunk_size: examples per tokenizer call.

    Returns:
        :class:`TokenizedDataset` (regression iff the examples' labels are floats).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if len(examples) == 0:
        raise DataError("tokenize() got no examples")
    cache_path: Path | None = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"tok-{cache_key(examples, tokenizer, max_length)}.pt"
        if cache_path.is_file():
            try:
                ds = TokenizedDataset.from_state(torch.load(cache_path, map_location="cpu", weights_only=True))
                if len(ds) == len(examples):
                    log.info("loaded tokenized cache %s (%d examples)", cache_path, len(ds))
                    return ds
                log.warning("tokenization cache %s has the wrong size; rebuilding", cache_path)
            except Exception as e:  # noqa: BLE001 - any unreadable cache is simply rebuilt
                log.warning("ignoring unreadable tokenization cache %s (%s); rebuilding", cache_path, e)

    regression = any(isinstance(ex.label, float) for ex in examples)
    ids, tts = _run_tokenizer(examples, tokenizer, max_length, chunk_size)
    ds = TokenizedDataset.from_lists(ids, [ex.label for ex in examples], tts, regression=regression)

    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=cache_path.name + ".", suffix=".tmp", dir=cache_path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(ds.state(), f)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, cache_path)
            log.info("wrote tokenized cache %s (%d examples)", cache_path, len(ds))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ds


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def collate(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`TokenizedDataset` items to the longest sequence in the batch (right padding).

    Returns:
        ``input_ids``: (B, L) long, padded with ``pad_id``; ``attention_mask``: (B, L) long, 1 = real token;
        ``token_type_ids``: (B, L) long, padded with 0 (only if the items have them);
        ``labels``: (B,) long for classification, float32 for regression. ``L = max_i len(input_ids_i)``.
    """
    if len(batch) == 0:
        raise ValueError("collate() got an empty batch")
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token; set one (e.g. tokenizer.pad_token_id)")
    lens = [len(it["input_ids"]) for it in batch]
    b, max_len = len(batch), max(lens)
    input_ids = torch.full((b, max_len), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((b, max_len), dtype=torch.long)
    has_tt = "token_type_ids" in batch[0]
    token_type_ids = torch.zeros((b, max_len), dtype=torch.long) if has_tt else None
    for i, (it, n) in enumerate(zip(batch, lens, strict=True)):
        input_ids[i, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        if token_type_ids is not None:
            token_type_ids[i, :n] = torch.as_tensor(it["token_type_ids"], dtype=torch.long)
    labels_list = [it["label"] for it in batch]
    regression = any(isinstance(y, float) for y in labels_list)
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor(labels_list, dtype=torch.float32 if regression else torch.long),
    }
    if token_type_ids is not None:
        out["token_type_ids"] = token_type_ids
    return out


class LengthBucketSampler(Sampler[list[int]]):
    """Batch sampler grouping examples of similar length, to minimise padding.

    Per epoch (``shuffle=True``): permute all indices, cut the permutation into chunks of
    ``batch_size * bucket_size_multiplier``, sort each chunk by length (stable), cut chunks into batches,
    then shuffle the order of the batches. Randomness comes only from ``numpy.random.default_rng([seed,
    epoch])``, so the batch order is a pure function of ``(seed, epoch)`` (see :meth:`batches`).

    ``shuffle=False``: indices in order, chunks sorted by length, batches in chunk order (independent
    of the epoch). With ``bucket=False`` no length sorting is done at all (``shuffle=False, bucket=False``
    gives plain sequential batches in dataset order).

    Only the last batch of an epoch can be smaller than ``batch_size``; ``drop_last=True`` drops it.

    Resuming mid-epoch: ``set_epoch(epoch, start_batch=k)`` makes the next iteration skip the first ``k``
    batches of that epoch (the same batches a non-interrupted run would have produced next). ``len()``
    is the number of batches the next iteration yields (``num_batches - start_batch``).
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int,
        bucket_size_multiplier: int = 50,
        drop_last: bool = False,
        bucket: bool = True,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence")
        if batch_size < 1 or bucket_size_multiplier < 1:
            raise ValueError("batch_size and bucket_size_multiplier must be >= 1")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.bucket_size_multiplier = int(bucket_size_multiplier)
        self.drop_last = bool(drop_last)
        self.bucket = bool(bucket)
        self.epoch = 0
        self.start_batch = 0
        n = self.lengths.size
        self.num_batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        if self.num_batches == 0:
            raise ValueError(f"drop_last=True with {n} examples < batch_size {batch_size} leaves no batch")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (reseeds the order) and how many leading batches of it to skip (for resuming)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one), as lists of dataset indices."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = self.lengths.size
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        order = rng.permutation(n) if rng is not None else np.arange(n)
        if self.bucket:
            chunk = self.batch_size * self.bucket_size_multiplier
            parts = []
            for s in range(0, n, chunk):
                c = order[s : s + chunk]
                parts.append(c[np.argsort(self.lengths[c], kind="stable")])
            order = np.concatenate(parts)
        batches = [order[s : s + self.batch_size].tolist() for s in range(0, n, self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if rng is not None:
            perm = rng.permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start_batch :]

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


def make_loader(
    dataset: TokenizedDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    pad_id: int,
    *,
    bucket_size_multiplier: int = 50,
    drop_last: bool = False,
    bucket: bool = True,
) -> DataLoader:
    """DataLoader over ``dataset`` with a :class:`LengthBucketSampler` and :func:`collate` (``num_workers=0``).

    The sampler is ``loader.batch_sampler``: call ``loader.batch_sampler.set_epoch(epoch)`` before each
    epoch (and ``set_epoch(epoch, start_batch=k)`` to resume after ``k`` batches). Batches are dicts as
    described in :func:`collate`. For evaluation use ``shuffle=False``; add ``bucket=False`` if you need
    predictions in dataset order (otherwise recover it from ``loader.batch_sampler.batches()``).
    """
    sampler = LengthBucketSampler(
        dataset.lengths,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        bucket_size_multiplier=bucket_size_multiplier,
        drop_last=drop_last,
        bucket=bucket,
    )
    # A private generator: iterating must not draw from the global RNG (dropout's), or a resumed run diverges.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=partial(collate, pad_id=pad_id), num_workers=0,
                      generator=torch.Generator().manual_seed(seed))
