"""Small GLUE-format folders for the tasks that ../shared does not carry (CoLA, STS-B, QNLI, MNLI, QQP)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = "the a cat dog sat on mat is here bill said he it so ran fast slow big small red".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + " ."


def _rows(task: str, n: int, rng: random.Random, split: str) -> list[list[str]]:
    rows = []
    for i in range(n):
        a, b = _sentence(rng), _sentence(rng)
        if task == "cola":
            y = rng.choice("01")
            rows.append(["gj04", y, "" if y == "1" else "*", a])
        elif task == "stsb":
            rows.append([str(i), "main-news", "f", "2012", str(i), "none", "none", a, b, f"{rng.uniform(0, 5):.3f}"])
        elif task == "qnli":
            rows.append([str(i), a, b, rng.choice(["entailment", "not_entailment"])])
        elif task == "mnli":
            y = rng.choice(["entailment", "neutral", "contradiction"])
            extra = [y] if split == "train" else [y] * 5
            rows.append([str(i), "1", f"{i}e", "fiction", "(x)", "(y)", "(X)", "(Y)", a, b, *extra, y])
        elif task == "qqp":
            rows.append([str(i), str(2 * i), str(2 * i + 1), a, b, rng.choice("01")])
    return rows


HEADERS = {
    "stsb": "index genre filename year old_index source1 source2 sentence1 sentence2 score".split(),
    "qnli": "index question sentence label".split(),
    "mnli_train": ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                   "sentence2_parse sentence1 sentence2 label1 gold_label").split(),
    "mnli_dev": ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                 "sentence2_parse sentence1 sentence2 label1 label2 label3 label4 label5 gold_label").split(),
    "qqp": "id qid1 qid2 question1 question2 is_duplicate".split(),
}
FOLDERS = {"cola": "CoLA", "stsb": "STS-B", "qnli": "QNLI", "mnli": "MNLI", "qqp": "QQP"}


def make_glue_dir(root: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """Write <root>/<TASK>/{train,dev}.tsv for CoLA, STS-B, QNLI, MNLI (dev_matched.tsv) and QQP."""
    rng = random.Random(seed)
    for task, folder in FOLDERS.items():
        for split, n in (("train", n_train), ("dev", n_dev)):
            header = HEADERS.get(f"{task}_{split}", HEADERS.get(task))
            lines = ([header] if header else []) + _rows(task, n, rng, split)
            name = "dev_matched.tsv" if (task, split) == ("mnli", "dev") else f"{split}.tsv"
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join("\t".join(r) + "\n" for r in lines))
    return root
