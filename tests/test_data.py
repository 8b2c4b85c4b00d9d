"""GLUE data pipeline: TSV parsing (fixture folders; the real files under -m shared_data), errors, tokenization
cache, batching."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from adalora_lab.data import (
    GLUE_TASKS,
    DataError,
    Example,
    LengthBucketSampler,
    TokenizedDataset,
    collate,
    get_task,
    load_task,
    make_loader,
    read_glue_tsv,
    tokenize,
)
from helpers import FILES, FOLDERS, LABELS, STD_FILES

# ------------------------------------------------------------------------------------------------
# The real files in ../shared/data/glue (counts and label balance from its README.md)
# ------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("task", "split", "n", "counts"),
    [
        ("rte", "dev", 277, {0: 146, 1: 131}),
        ("rte", "train", 2490, {0: 1249, 1: 1241}),
        ("mrpc", "dev", 408, {0: 129, 1: 279}),
        ("mrpc", "train", 3668, {0: 1194, 1: 2474}),
        ("sst2", "dev", 872, {0: 428, 1: 444}),
        ("sst2", "train", 67349, {0: 29780, 1: 37569}),
    ],
)
def test_real_glue_counts_and_label_balance(task, split, n, counts, shared_glue):
    examples = load_task(task, shared_glue, split)
    assert len(examples) == n
    assert dict(collections.Counter(ex.label for ex in examples)) == counts
    pair = task != "sst2"
    assert all((ex.text_b is not None) == pair for ex in examples)
    assert all(isinstance(ex.label, int) and ex.text_a for ex in examples)


@pytest.mark.shared_data
def test_real_files_keep_bare_quotes_and_text_verbatim(shared_glue):
    mrpc = load_task("mrpc", shared_glue, "validation")
    first = mrpc[0]
    assert first.label == 1
    assert first.text_a.startswith("He said the foodservice pie business")
    assert first.text_b == '" The foodservice pie business does not fit our long-term growth strategy .'
    sst = load_task("SST-2", shared_glue / "SST-2", "dev")  # task folder itself also accepted
    assert sst[0] == Example("it 's a charming and often affecting journey . ", None, 1)
    rte = load_task("rte", shared_glue, "dev", max_examples=5)
    assert len(rte) == 5 and rte == load_task("rte", shared_glue, "dev")[:5]
    assert rte[0].label == GLUE_TASKS["rte"].label_values.index("not_entailment") == 1


# ------------------------------------------------------------------------------------------------
# The fixture folder (helpers.make_glue_dir): every task in the GLUE download's layout
# ------------------------------------------------------------------------------------------------


def raw_rows(path: Path) -> list[list[str]]:
    """The lines of a TSV (the header too) split on tabs only: no quoting, no stripping."""
    return [line.split("\t") for line in path.read_bytes().decode("utf-8").split("\n")[:-1]]


def test_glue_dir_every_task_and_split(glue_dir: Path):
    """All 8 tasks, every split the registry knows, every row, each label equally often."""
    assert set(FOLDERS) == set(GLUE_TASKS)
    for task, spec in GLUE_TASKS.items():
        files = FILES.get(task, STD_FILES)
        assert spec.folder == FOLDERS[task] and dict(spec.files) == files
        for split, name in files.items():
            examples = load_task(task, glue_dir, split)
            n_rows = len(raw_rows(glue_dir / FOLDERS[task] / name)) - (task != "cola")  # CoLA: no header
            assert len(examples) == n_rows == (48 if split == "train" else 24), (task, split)
            assert all(ex.text_a and (ex.text_b is not None) == (task not in ("sst2", "cola")) for ex in examples)
            if task == "stsb":
                assert all(0.0 <= ex.label <= 5.0 for ex in examples)
                continue
            counts = collections.Counter(ex.label for ex in examples)
            assert sorted(counts) == list(range(len(LABELS[task]))) and len(set(counts.values())) == 1, (task, counts)


def test_shared_tasks_parse_verbatim(glue_dir: Path):
    """SST-2, RTE and MRPC as the real files are laid out: MRPC's header starts with a BOM and its strings
    may open a quote they never close, SST-2's sentences end in a space; text is kept byte for byte."""
    mrpc_dev = glue_dir / "MRPC" / "dev.tsv"
    assert mrpc_dev.read_bytes().startswith("\ufeffQuality\t#1 ID\t".encode())
    rows = raw_rows(mrpc_dev)[1:]
    mrpc = load_task("mrpc", glue_dir, "validation")
    assert mrpc == [Example(r[3], r[4], int(r[0])) for r in rows]
    assert any(ex.text_b.startswith('" ') and ex.text_b.count('"') == 1 for ex in mrpc)  # a bare quote, kept

    rows = raw_rows(glue_dir / "SST-2" / "dev.tsv")[1:]
    sst = load_task("SST-2", glue_dir / "SST-2", "dev")  # the task folder itself is also accepted
    assert sst == [Example(r[0], None, int(r[1])) for r in rows]
    assert all(ex.text_a.endswith(" . ") for ex in sst)

    header, *rows = raw_rows(glue_dir / "RTE" / "dev.tsv")
    assert header == ["index", "sentence1", "sentence2", "label"]
    rte = load_task("rte", glue_dir, "dev")
    assert rte == [Example(r[1], r[2], ("entailment", "not_entailment").index(r[3])) for r in rows]
    assert load_task("rte", glue_dir, "dev", max_examples=5) == rte[:5]


# ------------------------------------------------------------------------------------------------
# Hand-written files for the other tasks' edge cases (Windows line endings, quotes in CoLA, MNLI's dev files)
# ------------------------------------------------------------------------------------------------


def write(path: Path, lines: list[str], *, newline: str = "\n", bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = newline.join(lines) + newline
    path.write_bytes(("\ufeff" if bom else "").encode("utf-8") + data.encode("utf-8"))
    return path


def tsv(*fields: str) -> str:
    return "\t".join(fields)


MNLI_TRAIN_HEADER = tsv(
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
)
MNLI_DEV_HEADER = tsv(
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "label2",
    "label3",
    "label4",
    "label5",
    "gold_label",
)


@pytest.fixture
def edge_glue(tmp_path: Path) -> Path:
    root = tmp_path / "glue"
    write(
        root / "CoLA" / "dev.tsv",  # no header, 4 columns
        [
            tsv("gj04", "1", "", "The sailors rode the breeze clear of the rocks."),
            tsv("gj04", "0", "*", "The more books I ask to whom he will give, the more he reads."),
            tsv("cj99", "1", "", '"Bill," he said, "is here."'),
        ],
    )
    write(
        root / "STS-B" / "dev.tsv",
        [
            tsv(
                "index",
                "genre",
                "filename",
                "year",
                "old_index",
                "source1",
                "source2",
                "sentence1",
                "sentence2",
                "score",
            ),
            tsv(
                "0",
                "main-captions",
                "MSRvid",
                "2012test",
                "0000",
                "none",
                "none",
                "A man with a hard hat is dancing.",
                "A man wearing a hard hat is dancing.",
                "5.000",
            ),
            tsv(
                "1",
                "main-captions",
                "MSRvid",
                "2012test",
                "0002",
                "none",
                "none",
                "A young child is riding a horse.",
                "A child is riding a horse.",
                "4.750",
            ),
            tsv(
                "2",
                "main-news",
                "MSRpar",
                "2012test",
                "0003",
                "none",
                "none",
                "Oil prices fell.",
                "Cats purr.",
                "0.000",
            ),
        ],
    )
    write(
        root / "QNLI" / "train.tsv",
        [
            tsv("index", "question", "sentence", "label"),
            tsv(
                "0", "When did the third Digimon series begin?", "Unlike the two seasons before it...", "not_entailment"
            ),
            tsv(
                "1",
                "Which missile batteries often have individual launchers?",
                "When MANPADS is operated...",
                "entailment",
            ),
        ],
    )
    mnli_row = ["( ( The cat ) sat )", "( It sat )", "(ROOT (S ...))", "(ROOT (S ...))", "The cat sat.", "It sat."]
    write(
        root / "MNLI" / "train.tsv",
        [
            MNLI_TRAIN_HEADER,
            tsv("0", "31193", "31193n", "government", *mnli_row, "neutral", "neutral"),
            tsv("1", "101457", "101457e", "telephone", *mnli_row, "entailment", "entailment"),
            tsv("2", "134793", "134793e", "fiction", *mnli_row, "contradiction", "contradiction"),
        ],
    )
    dev_labels = ["neutral", "entailment", "neutral", "neutral", "neutral"]
    write(
        root / "MNLI" / "dev_matched.tsv",
        [MNLI_DEV_HEADER, tsv("0", "63735", "63735n", "slate", *mnli_row, *dev_labels, "neutral")],
    )
    write(
        root / "MNLI" / "dev_mismatched.tsv",
        [MNLI_DEV_HEADER, tsv("0", "75290", "75290c", "letters", *mnli_row, *dev_labels, "contradiction")],
    )
    write(
        root / "QQP" / "dev.tsv",
        [
            tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
            tsv(
                "201359",
                "303345",
                "303346",
                "Why are African-Americans so beautiful?",
                "Why are hispanics so beautiful?",
                "0",
            ),
            tsv(
                "263843",
                "69383",
                "380476",
                "I want to pursue PhD in Computer Science?",
                "How can I pursue a PhD in Computer Science?",
                "1",
            ),
        ],
        newline="\r\n",  # Windows line endings must be fine
    )
    write(
        root / "MRPC" / "dev.tsv",
        [
            tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
            tsv("1", "1355540", "1355592", "He said it .", '" It said so .'),
        ],
        bom=True,
    )
    return root


def test_edge_case_files_parse(edge_glue: Path):
    cola = load_task("cola", edge_glue, "dev")
    assert [ex.label for ex in cola] == [1, 0, 1]
    assert cola[2] == Example('"Bill," he said, "is here."', None, 1)

    stsb = load_task("stsb", edge_glue, "dev")
    assert [ex.label for ex in stsb] == [5.0, 4.75, 0.0]
    assert all(isinstance(ex.label, float) for ex in stsb)
    assert stsb[0].text_a == "A man with a hard hat is dancing."
    assert stsb[0].text_b == "A man wearing a hard hat is dancing."
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1

    qnli = load_task("qnli", edge_glue, "train")
    assert [ex.label for ex in qnli] == [1, 0]
    assert qnli[0].text_a == "When did the third Digimon series begin?"

    mnli = load_task("mnli", edge_glue, "train")
    assert [ex.label for ex in mnli] == [1, 0, 2]  # HF order: entailment, neutral, contradiction
    assert mnli[0].text_a == "The cat sat." and mnli[0].text_b == "It sat."
    assert [ex.label for ex in load_task("mnli", edge_glue, "validation_matched")] == [1]
    assert [ex.label for ex in load_task("mnli", edge_glue, "dev_mismatched")] == [2]

    qqp = load_task("QQP", edge_glue, "dev")
    assert [ex.label for ex in qqp] == [0, 1]
    assert qqp[1].text_b == "How can I pursue a PhD in Computer Science?"  # no trailing "\r"

    mrpc = load_task("mrpc", edge_glue, "dev")
    assert mrpc == [Example("He said it .", '" It said so .', 1)]


def test_registry():
    assert set(GLUE_TASKS) == {"sst2", "rte", "mrpc", "cola", "stsb", "qnli", "mnli", "qqp"}
    assert GLUE_TASKS["mnli"].files["dev"] == "dev_matched.tsv"
    assert GLUE_TASKS["mnli"].label_values == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["rte"].hf_dataset == ("nyu-mll/glue", "rte")  # the bare alias "glue" 404s on the Hub
    assert not GLUE_TASKS["cola"].has_header
    for spec in GLUE_TASKS.values():
        assert spec.num_labels == (1 if spec.name == "stsb" else len(spec.label_values))
        assert len(spec.label_names) == len(spec.label_values)


# ------------------------------------------------------------------------------------------------
# Errors speak to the user
# ------------------------------------------------------------------------------------------------


def test_wrong_column_count_names_file_and_line(tmp_path: Path):
    path = write(
        tmp_path / "RTE" / "train.tsv",
        [
            tsv("index", "sentence1", "sentence2", "label"),
            tsv("0", "a", "b", "entailment"),
            tsv("1", "a b", "entailment"),
        ],
    )
    with pytest.raises(DataError, match=rf"{path}:3: expected 4 tab-separated fields .*found 3"):
        read_glue_tsv(path, "rte")
    cola = write(tmp_path / "CoLA" / "dev.tsv", [tsv("gj04", "1", "", "ok."), tsv("gj04", "1", "ok.")])
    with pytest.raises(DataError, match=rf"{cola}:2: expected 4 .*no header"):
        read_glue_tsv(cola, "cola")


def test_unknown_label_lists_valid_ones(tmp_path: Path):
    path = write(tmp_path / "x.tsv", [tsv("index", "sentence1", "sentence2", "label"), tsv("0", "a", "b", "maybe")])
    with pytest.raises(DataError, match=rf"{path}:2: unknown label 'maybe'.*'entailment', 'not_entailment'"):
        read_glue_tsv(path, "rte")
    sts = write(tmp_path / "s.tsv", [tsv("sentence1", "sentence2", "score"), tsv("a", "b", "high")])
    with pytest.raises(DataError, match=rf"{sts}:2: label 'high' .* not a number"):
        read_glue_tsv(sts, "stsb")


def test_header_without_needed_columns(tmp_path: Path):
    path = write(tmp_path / "dev.tsv", [tsv("sentence", "label"), tsv("a b", "1")])
    with pytest.raises(DataError, match=rf"{path}:1: header .* lacks column\(s\) \['sentence1', 'sentence2'\]"):
        read_glue_tsv(path, "rte")


def test_missing_data_dir_and_file(tmp_path: Path):
    with pytest.raises(DataError, match=r"does not exist.*RTE[/\\]dev.tsv.*task.data_dir.*GLUE-format"):
        load_task("rte", tmp_path / "nowhere", "dev")
    with pytest.raises(DataError, match=r"has no RTE/ folder"):
        load_task("rte", tmp_path, "dev")
    (tmp_path / "RTE").mkdir()
    with pytest.raises(DataError, match=r"has no dev.tsv"):
        load_task("rte", tmp_path, "dev")
    with pytest.raises(DataError, match="task.data_dir"):
        load_task("rte", None, "dev")
    with pytest.raises(DataError, match="test labels are not public"):
        load_task("rte", tmp_path, "test")
    with pytest.raises(DataError, match="unknown GLUE task 'wnli'"):
        load_task("wnli", tmp_path, "dev")
    with pytest.raises(DataError, match="does not exist or is not a file"):
        read_glue_tsv(tmp_path / "missing.tsv", "rte")


def test_empty_split(tmp_path: Path):
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{empty}: no data rows"):
        read_glue_tsv(empty, "sst2")
    header_only = write(tmp_path / "h.tsv", [tsv("sentence", "label")])
    with pytest.raises(DataError, match="only a header"):
        read_glue_tsv(header_only, "sst2")


def test_invalid_utf8_names_line(tmp_path: Path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"sentence\tlabel\nok\t1\nbad \xff byte\t0\n")
    with pytest.raises(DataError, match=rf"{path}:3: .*not valid UTF-8"):
        read_glue_tsv(path, "sst2")


# ------------------------------------------------------------------------------------------------
# Tokenization and caching
# ------------------------------------------------------------------------------------------------

WORDS = "the a cat dog sat on mat . is here bill said he it so".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(vocab))
    assert len(tok) == 5 + len(WORDS), "tiny vocab not loaded"
    return tok


class CountingTokenizer:
    """Wraps a tokenizer and counts calls (attribute access is delegated)."""

    def __init__(self, tok):
        self._tok = tok
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tok(*args, **kwargs)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def pair_examples(n: int = 40, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))
        b = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
        out.append(Example(a, b, i % 2))
    return out


def test_tokenize_contents_and_truncation(tokenizer):
    examples = [Example("the cat sat", "a dog", 1), Example("the cat sat on the mat . " * 5, "he said so", 0)]
    ds = tokenize(examples, tokenizer, max_length=12, cache_dir=None)
    assert len(ds) == 2 and not ds.is_regression
    item = ds[0]
    assert tokenizer.convert_ids_to_tokens(item["input_ids"].tolist()) == [
        "[CLS]",
        "the",
        "cat",
        "sat",
        "[SEP]",
        "a",
        "dog",
        "[SEP]",
    ]
    assert item["token_type_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert item["label"] == 1
    assert ds.lengths.tolist() == [8, 12]  # second one truncated to max_length
    single = tokenize([Example("the cat", None, 0.5)], tokenizer, max_length=12)
    assert single.is_regression and single[0]["label"] == 0.5
    assert single[0]["input_ids"].tolist() == tokenizer("the cat")["input_ids"]


def test_tokenize_cache_hit_skips_tokenizer(tokenizer, tmp_path: Path):
    examples = pair_examples()
    counting = CountingTokenizer(tokenizer)
    first = tokenize(examples, counting, max_length=16, cache_dir=tmp_path / "cache")
    assert counting.calls > 0
    files = list((tmp_path / "cache").glob("tok-*.pt"))
    assert len(files) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic write leaves no temp file
    torch.load(files[0], weights_only=True)  # plain tensors only

    counting.calls = 0
    second = tokenize(examples, counting, max_length=16, cache_dir=tmp_path / "cache")
    assert counting.calls == 0, "cache hit must not call the tokenizer"
    for i in range(len(examples)):
        assert torch.equal(first[i]["input_ids"], second[i]["input_ids"])
        assert torch.equal(first[i]["token_type_ids"], second[i]["token_type_ids"])
        assert first[i]["label"] == second[i]["label"]

    # Different max_length or different examples -> different cache entry.
    tokenize(examples, counting, max_length=8, cache_dir=tmp_path / "cache")
    assert counting.calls > 0
    counting.calls = 0
    tokenize(examples[:-1] + [Example("x", "y", 0)], counting, max_length=16, cache_dir=tmp_path / "cache")
    assert counting.calls > 0
    assert len(list((tmp_path / "cache").glob("tok-*.pt"))) == 3


def test_corrupt_cache_is_rebuilt(tokenizer, tmp_path: Path):
    examples = pair_examples(10)
    counting = CountingTokenizer(tokenizer)
    tokenize(examples, counting, max_length=16, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("tok-*.pt")
    cache_file.write_bytes(b"garbage")
    counting.calls = 0
    ds = tokenize(examples, counting, max_length=16, cache_dir=tmp_path)
    assert counting.calls > 0 and len(ds) == 10
    assert [p.name for p in tmp_path.glob("tok-*.pt")] == [cache_file.name]
    assert torch.load(cache_file, weights_only=True)["offsets"].numel() == 11  # rewritten


# ------------------------------------------------------------------------------------------------
# Collation and sampling
# ------------------------------------------------------------------------------------------------


def test_collate_pads_to_batch_max():
    ds = TokenizedDataset.from_lists(
        [[2, 5, 3], [2, 5, 6, 7, 3], [2, 3]], [1, 0, 1], token_type_ids=[[0, 0, 0], [0, 0, 1, 1, 1], [0, 0]]
    )
    batch = collate([ds[0], ds[1], ds[2]], pad_id=9)
    assert batch["input_ids"].shape == (3, 5) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[2, 5, 3, 9, 9], [2, 5, 6, 7, 3], [2, 3, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0, 1] and batch["labels"].dtype == torch.long
    short = collate([ds[0], ds[2]], pad_id=0)
    assert short["input_ids"].shape == (2, 3)  # padded to this batch's max, not the dataset's

    reg = TokenizedDataset.from_lists([[1, 2], [1]], [0.5, 4.25])
    b = collate([reg[0], reg[1]], pad_id=0)
    assert b["labels"].dtype == torch.float32 and b["labels"].tolist() == [0.5, 4.25]
    assert "token_type_ids" not in b


def all_indices(batches):
    return sorted(i for b in batches for i in b)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("bucket", [True, False])
def test_sampler_yields_every_index_once(shuffle, bucket):
    lengths = np.random.default_rng(0).integers(1, 100, size=1003)
    s = LengthBucketSampler(lengths, batch_size=16, shuffle=shuffle, seed=3, bucket_size_multiplier=4, bucket=bucket)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 63
        assert all_indices(batches) == list(range(1003))
        assert sum(len(b) < 16 for b in batches) == 1
    if not shuffle and not bucket:
        assert [i for b in s for i in b] == list(range(1003))  # plain sequential order


def test_sampler_drop_last():
    s = LengthBucketSampler(np.arange(1, 51), batch_size=8, shuffle=True, seed=0, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 6 and all(len(b) == 8 for b in batches)
    assert len(set(i for b in batches for i in b)) == 48


def test_sampler_deterministic_per_seed_and_epoch():
    lengths = np.random.default_rng(1).integers(1, 64, size=500)

    def order(seed, epoch):
        s = LengthBucketSampler(lengths, batch_size=10, shuffle=True, seed=seed, bucket_size_multiplier=5)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    s = LengthBucketSampler(lengths, batch_size=10, shuffle=True, seed=0, bucket_size_multiplier=5)
    assert s.batches(2) == order(0, 2)  # pure function of (seed, epoch)


def test_sampler_resume_mid_epoch():
    lengths = np.random.default_rng(2).integers(1, 64, size=300)
    s = LengthBucketSampler(lengths, batch_size=7, shuffle=True, seed=5)
    s.set_epoch(4)
    full = list(s)
    resumed = LengthBucketSampler(lengths, batch_size=7, shuffle=True, seed=5)
    resumed.set_epoch(4, start_batch=10)
    assert len(resumed) == len(full) - 10
    assert list(resumed) == full[10:]
    resumed.set_epoch(5)
    assert len(resumed) == len(full)
    with pytest.raises(ValueError):
        resumed.set_epoch(5, start_batch=len(full) + 1)


def padding_ratio(batches, lengths):
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - lengths.sum() / padded


def test_bucketing_reduces_padding():
    lengths = np.random.default_rng(3).integers(5, 128, size=4000)
    bucketed = LengthBucketSampler(lengths, batch_size=32, shuffle=True, seed=0, bucket_size_multiplier=50)
    plain = LengthBucketSampler(lengths, batch_size=32, shuffle=True, seed=0, bucket=False)
    rb, rp = padding_ratio(list(bucketed), lengths), padding_ratio(list(plain), lengths)
    assert rp > 0.35  # random batches of uniform lengths waste ~45% on padding
    assert rb < 0.05, (rb, rp)
    # batches hold similar lengths
    spreads = [lengths[b].max() - lengths[b].min() for b in bucketed.batches()]
    assert np.median(spreads) <= 3


def test_make_loader_end_to_end(tokenizer):
    examples = pair_examples(50)
    ds = tokenize(examples, tokenizer, max_length=16)
    loader = make_loader(ds, batch_size=8, shuffle=True, seed=0, pad_id=tokenizer.pad_token_id)
    assert isinstance(loader.batch_sampler, LengthBucketSampler) and len(loader) == 7
    loader.batch_sampler.set_epoch(1)
    seen = []
    for batch in loader:
        b, L = batch["input_ids"].shape
        assert batch["attention_mask"].sum(1).max() == L  # padded to the longest in the batch
        assert batch["token_type_ids"].shape == (b, L) and batch["labels"].shape == (b,)
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
        seen.append(b)
    assert sum(seen) == 50
    eval_loader = make_loader(ds, batch_size=8, shuffle=False, seed=0, pad_id=0, bucket=False)
    labels = torch.cat([b["labels"] for b in eval_loader])
    assert labels.tolist() == [ex.label for ex in examples]  # dataset order


def test_tokenized_dataset_validates():
    with pytest.raises(ValueError):
        TokenizedDataset(torch.zeros(5, dtype=torch.int32), torch.tensor([0, 2]), torch.zeros(2, dtype=torch.long))


def test_hub_loading_maps_columns(monkeypatch):
    """hub=True goes through datasets.load_dataset (faked here: no network in tests)."""
    import sys
    import types

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    examples = load_task("mnli", None, "dev", max_examples=2, hub=True)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched[:2]")]
    assert examples == [Example("p0", "h0", 2), Example("p1", "h1", 0)]

    def failing(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=failing))
    with pytest.raises(DataError, match="task.data_dir"):
        load_task("rte", None, "train", hub=True)
