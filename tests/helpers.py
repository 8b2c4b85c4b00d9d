"""Helpers shared by test modules (``from helpers import ...``; pytest puts tests/ on the path).

- ``compose_run``, ``options``, ``ROOT``, ``CONF``: the Hydra configs, as ``experiments/train.py`` composes them.
- ``make_glue_dir``: a small GLUE-format folder for all 8 tasks, in the real files' layouts, with synthetic text
  (the session fixture ``glue_dir`` in conftest.py builds it once).
- ``SHARED_GLUE``: the real GLUE files beside the checkout, read only by tests marked ``shared_data`` (through
  the ``shared_glue`` fixture).
"""

from __future__ import annotations

import random
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from adalora_lab import cli  # registers the schemas in Hydra's ConfigStore
from adalora_lab.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_GLUE = ROOT.parent / "shared" / "data" / "glue"  # SST-2, RTE, MRPC as the GLUE download ships them


def options(group: str) -> list[str]:
    """The option names of a config group (its YAML files)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_run(overrides: list[str]) -> RunConfig:
    """The run config ``experiments/train.py <overrides>`` would train, as dataclasses."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=False)
    return cli.to_dataclass(cfg)


# ------------------------------------------------------------------------------------------ GLUE fixtures
# Written from the GLUE download's layouts, not from the code under test: folder and file names, headers
# (MRPC's starts with a UTF-8 BOM; CoLA has none), column order and label spellings.

FOLDERS = {"sst2": "SST-2", "rte": "RTE", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "qnli": "QNLI",
           "mnli": "MNLI", "qqp": "QQP"}
FILES = {"mnli": {"train": "train.tsv", "dev": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"}}
STD_FILES = {"train": "train.tsv", "dev": "dev.tsv"}
MNLI_COLUMNS = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                "sentence2_parse sentence1 sentence2").split()
HEADERS = {
    "sst2": ["sentence", "label"],
    "rte": ["index", "sentence1", "sentence2", "label"],
    "mrpc": ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "cola": None,
    "stsb": "index genre filename year old_index source1 source2 sentence1 sentence2 score".split(),
    "qnli": ["index", "question", "sentence", "label"],
    "mnli_train": [*MNLI_COLUMNS, "label1", "gold_label"],
    "mnli_dev": [*MNLI_COLUMNS, "label1", "label2", "label3", "label4", "label5", "gold_label"],
    "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
}
# Labels as the files spell them (STS-B: similarity levels, written as scores); each file holds every label
# equally often.
LABELS = {"sst2": ("0", "1"), "rte": ("entailment", "not_entailment"), "mrpc": ("0", "1"), "cola": ("0", "1"),
          "stsb": ("0", "1", "2", "3"), "qnli": ("entailment", "not_entailment"),
          "mnli": ("entailment", "neutral", "contradiction"), "qqp": ("0", "1")}

SUBJECTS = ("the cat", "a dog", "the old man", "my sister", "the committee", "a small bird", "the new film",
            "the river", "her brother", "the company")
VERBS = ("sat on", "walked to", "looked at", "ran past", "wrote about", "waited near", "painted", "left",
         "bought", "cleaned")
OBJECTS = ("the mat", "the station", "a red house", "the market", "the long report", "the garden",
           "an empty room", "the bridge", "the old car", "the kitchen")
POSITIVE = ("charming", "moving", "funny", "smart", "beautiful", "gripping")
NEGATIVE = ("dull", "tedious", "bland", "clumsy", "lifeless", "predictable")


def _other(rng: random.Random, pool: tuple[str, ...], not_this: str) -> str:
    return rng.choice([w for w in pool if w != not_this])


def _fields(task: str, i: int, label: str, rng: random.Random, split: str) -> list[str]:
    """One row: the text says its label (shared words, a sentiment word), so a tiny model can learn it."""
    s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
    S = s.capitalize()
    y = LABELS[task].index(label)
    if task == "sst2":  # lower-cased, PTB-style spacing, the trailing space of the real file
        adj = rng.choice(POSITIVE if label == "1" else NEGATIVE)
        return [f"{s} is {adj} , and {s} 's {rng.choice(OBJECTS).split()[-1]} is {adj} too . ", label]
    if task == "rte":  # untokenized prose; the hypothesis is or is not part of the premise
        s2, v2, o2 = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        hyp = f"{S} {v} {o}." if y == 0 else f"{S} {_other(rng, VERBS, v)} {o}."
        return [str(i), f"{S} {v} {o}, while {s2} {v2} {o2} in the afternoon.", hyp, label]
    if task == "mrpc":  # tokenized; some strings open a quote they never close, as in the real file
        b_obj = o if label == "1" else _other(rng, OBJECTS, o)
        a, b = f"{S} {v} {o} , officials said .", f"Officials said {s} {v} {b_obj} ."
        if i % 4 == 0:
            b = f'" {b}'
        return [label, str(1_000_000 + 7 * i), str(2_000_000 + 11 * i), a, b]
    if task == "cola":  # no header: source, label, original mark ("*" = unacceptable), sentence
        sentence = f"{S} {v} {o}." if label == "1" else f"{S} {o} {v}."  # scrambled word order
        return [rng.choice(("gj04", "bc01", "cj99")), label, "" if label == "1" else "*", sentence]
    if task == "stsb":  # score in [0, 5]: how many of subject / verb / object the two sentences share
        kept = [s, v, o][:y] + [_other(rng, p, w) for p, w in zip((SUBJECTS, VERBS, OBJECTS), (s, v, o))][y:]
        score = min(5.0, max(0.0, 5 * y / 3 + rng.uniform(-0.3, 0.3)))
        return [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", f"{S} {v} {o}.",
                " ".join(kept).capitalize() + ".", f"{score:.3f}"]
    if task == "qnli":
        answer = f"{S} {v} {o} in the morning." if y == 0 else f"{S} {_other(rng, VERBS, v)} {o} at night."
        return [str(i), f"Who {v} {o}?", answer, label]
    if task == "mnli":  # entailment, neutral, contradiction; dev rows carry five annotator labels
        hyp = (f"{S} {v} something.", f"{S} {v} {o} yesterday.", f"{S} never {v} {o}.")[y]
        prem = f"{S} {v} {o}."
        parses = [f"( {s} ( {v} {o} ) )", f"( {s} ( {hyp[:-1].lower()} ) )", f"(ROOT (S {prem}))",
                  f"(ROOT (S {hyp}))"]
        genre = rng.choice(("fiction", "government", "slate", "telephone", "travel") if split != "dev_mismatched"
                           else ("letters", "nineeleven", "oup", "verbatim"))
        pid = 10_000 + i
        annotators = [label] if split == "train" else [label] * 4 + [rng.choice(LABELS["mnli"])]
        return [str(i), str(pid), f"{pid}{label[0]}", genre, *parses, prem, hyp, *annotators, label]
    if task == "qqp":
        q2 = f"What is the reason {s} {v} {o}?" if label == "1" else f"Why {s} {v} {_other(rng, OBJECTS, o)}?"
        return [str(300_000 + i), str(2 * i + 1), str(2 * i + 2), f"Why {s} {v} {o}?", q2, label]
    raise ValueError(f"unknown GLUE task {task!r}")


def make_glue_dir(root: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """Write ``<root>/<TASK>/<split file>`` for all 8 GLUE tasks (SST-2, RTE, MRPC, CoLA, STS-B, QNLI, MNLI with
    dev_matched / dev_mismatched, QQP): ``n_train`` rows in train, ``n_dev`` in each dev file; returns ``root``."""
    rng = random.Random(seed)
    for task, folder in FOLDERS.items():
        for split, name in FILES.get(task, STD_FILES).items():
            n = n_train if split == "train" else n_dev
            labels = [LABELS[task][i % len(LABELS[task])] for i in range(n)]
            rng.shuffle(labels)
            header = HEADERS[task] if task in HEADERS else HEADERS[f"mnli_{'train' if split == 'train' else 'dev'}"]
            rows = ([header] if header else []) + [_fields(task, i, y, rng, split) for i, y in enumerate(labels)]
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8", newline="\n")
    return root
