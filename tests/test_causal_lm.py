"""task=instruct: Alpaca JSONL reading, response-only labels, training a tiny decoder (LoRA, AdaLoRA, a 4-bit
base), greedy generation and the samples file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adalora import LoRAConfig, inject_adapters
from adalora.config import ConfigError
from adalora_lab.data import DataError
from adalora_lab.instruct import (
    IGNORE_INDEX,
    PromptTemplate,
    Record,
    collate_causal,
    encode_prompt,
    read_jsonl,
    response_loss_sums,
    tokenize_records,
)
from adalora_lab.loop import train
from helpers import ROOT, compose_run

FIX = ROOT / "tests" / "fixtures" / "instruct"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADALORA_CACHE", str(tmp_path / "cache"))


def instruct_run(overrides: list[str]):
    return compose_run(["task=instruct", "model=tiny_llama", f"task.train_file={FIX / 'train.jsonl'}",
                        f"task.eval_file={FIX / 'dev.jsonl'}", "task.template=plain", "task.max_length=48",
                        "batch_size=8", "eval_batch_size=16", "logger=none", "progress=false"] + overrides)


@pytest.fixture(scope="module")
def tokenizer():
    from adalora_lab.models import ensure_eos, load_tokenizer
    from adalora_lab.schema import ModelConfig

    return ensure_eos(load_tokenizer(ModelConfig(name="tiny_llama", kind="llama")))


def tiny_llama(tokenizer, seed: int = 0):
    from adalora_lab.models import build_causal_lm
    from adalora_lab.schema import ModelConfig

    torch.manual_seed(seed)
    return build_causal_lm(ModelConfig(name="tiny_llama", kind="llama"), tokenizer).eval()


# ---------------------------------------------------------------------------------------------- reading JSONL
def test_fixture_reads_with_and_without_input():
    train, dev = read_jsonl(FIX / "train.jsonl"), read_jsonl(FIX / "dev.jsonl")
    assert (len(train), len(dev)) == (40, 16)
    assert any(r.input for r in train) and any(not r.input for r in train)
    assert read_jsonl(FIX / "train.jsonl", max_records=5) == train[:5]


@pytest.mark.parametrize("line, words", [
    ('{"instruction": "a", "output": ', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"input": "x", "output": "b"}', "missing field 'instruction'"),
    ('{"instruction": "a"}', "missing field 'output'"),
    ('{"instruction": "  ", "output": "b"}', "field 'instruction' is empty"),
    ('{"instruction": "a", "output": ""}', "field 'output' is empty"),
    ('{"instruction": "a", "input": 3, "output": "b"}', "field 'input' is a int"),
    ('{"instruction": ["a"], "output": "b"}', "field 'instruction' is a list"),
])
def test_bad_record_names_file_and_line(tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "ok", "output": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert f"{path}:3: " in str(e.value) and words in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_null_or_empty_input_means_no_input():
    t = PromptTemplate.preset("alpaca")
    with_input, plain = Record("Do it.", "x y", "z"), Record("Do it.", "", "z")
    assert "### Input:\nx y" in t.format(with_input) and "### Input" not in t.format(plain)
    assert t.format(plain).endswith("### Response:")


@pytest.mark.parametrize("kwargs, words", [({"no_input": "{instruction} {input}"}, "prompt_no_input"),
                                           ({"with_input": "{input} only"}, "prompt_with_input"),
                                           ({"with_input": "{instruction} {input} {oops}"}, "oops")])
def test_bad_templates_name_the_field(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        PromptTemplate.preset("alpaca", **kwargs)
    with pytest.raises(ConfigError, match="task.template"):
        PromptTemplate.preset("vicuna")


# ---------------------------------------------------------------------------------------------- labels
def test_labels_mask_prompt_and_padding(tokenizer):
    t = PromptTemplate.preset("alpaca")
    recs = [Record("Reverse the words: cat dog", "", "dog cat"), Record("Repeat the words.", "sun moon star", "x")]
    ds = tokenize_records(recs, tokenizer, t, max_length=256)
    for i, r in enumerate(recs):
        item = ds[i]
        n_prompt = len(encode_prompt(tokenizer, t.format(r)))
        response = tokenizer(r.output, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert item["input_ids"][:n_prompt].tolist() == encode_prompt(tokenizer, t.format(r))
        assert (item["labels"][:n_prompt] == IGNORE_INDEX).all()
        assert item["labels"][n_prompt:].tolist() == response == item["input_ids"][n_prompt:].tolist()
    lens = [len(ds[i]["input_ids"]) for i in range(2)]
    assert lens[0] != lens[1]  # one row is padded
    batch = collate_causal([ds[0], ds[1]], pad_id=tokenizer.pad_token_id)
    for i, n in enumerate(lens):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lens) - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert torch.equal(batch["labels"][i, :n], ds[i]["labels"])


def test_truncation_cuts_the_response_and_drops_prompt_only_examples(tokenizer):
    t = PromptTemplate.preset("plain")
    long = Record("Repeat the words.", "", " ".join(["cat"] * 40))
    n_prompt = len(encode_prompt(tokenizer, t.format(long)))
    ds = tokenize_records([long], tokenizer, t, max_length=n_prompt + 3)
    assert len(ds[0]["input_ids"]) == n_prompt + 3 and int((ds[0]["labels"] != IGNORE_INDEX).sum()) == 3
    ds = tokenize_records([long, Record("short", "", "a")], tokenizer, t, max_length=n_prompt)
    assert len(ds) == 1 and ds.n_dropped == 1
    with pytest.raises(DataError, match="max_length"):
        tokenize_records([long], tokenizer, t, max_length=n_prompt)


def test_tokenization_is_cached_by_content(tokenizer, tmp_path):
    t = PromptTemplate.preset("plain")
    recs = read_jsonl(FIX / "dev.jsonl")
    a = tokenize_records(recs, tokenizer, t, 48, tmp_path)
    files = list(tmp_path.glob("instruct-*.pt"))
    b = tokenize_records(recs, tokenizer, t, 48, tmp_path)
    assert len(files) == 1 and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    tokenize_records(recs[:-1], tokenizer, t, 48, tmp_path)
    assert len(list(tmp_path.glob("instruct-*.pt"))) == 2


def test_eval_loss_is_token_weighted():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4]])
    s, n = response_loss_sums(logits, labels)
    per = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="none")
    assert n == 6 and math.isclose(s, float(per.sum()), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------- training
def initial_perplexity(cfg) -> float:
    """The dev perplexity of the model the loop starts from (same seed, zero adapter delta at init)."""
    from adalora_lab.causal_lm import causal_lm_workload
    from adalora_lab.loop import seed_everything

    seed_everything(cfg.seed)
    work = causal_lm_workload(cfg, torch.device("cpu"))
    return work.evaluate(work.model)["perplexity"]


@pytest.mark.parametrize("model, method, steps", [("tiny_llama", "lora", 30), ("tiny_llama", "adalora", 8),
                                                  ("tiny_gpt2_lm", "lora", 4)])
def test_train_reports_perplexity(model, method, steps, tmp_path):
    cfg = instruct_run([f"model={model}", f"method={method}", "method.target_r=2", f"max_steps={steps}",
                        f"eval_every={steps // 2}", "optim.lr=5e-3", f"task.exact_match_file={FIX / 'dev.jsonl'}",
                        "task.max_new_tokens=4", "task.max_eval_examples=8"])
    s = train(cfg, tmp_path / "run")
    assert s["status"] == "completed" and s["main_metric"] == "perplexity" and s["higher_is_better"] is False
    f = s["final"]
    assert math.isclose(f["perplexity"], math.exp(f["eval_loss"]), rel_tol=1e-9)
    assert 0.0 <= f["exact_match"] <= 1.0 and f["eval_tokens"] > 0
    ranks = json.loads((tmp_path / "run" / "rank_pattern.json").read_text())
    assert not any("lm_head" in n for n in ranks)
    if model == "tiny_llama":
        assert len(ranks) == 2 * len(LLAMA_TARGETS)
    if model == "tiny_llama" and method == "lora":  # AdaLoRA's ΔW = P Λ Q starts at Λ = 0 and grows slower
        assert f["perplexity"] < initial_perplexity(cfg) / 3  # the fixture's patterns are partly learnt
    if method == "adalora":
        assert s["final_budget"] == 2 * len(ranks) < s["init_budget"]


@pytest.fixture
def injected(monkeypatch) -> dict:
    """Filled by the loop's inject_method call: the model and its adapters (the loop keeps them local)."""
    from adalora_lab import loop

    seen, real = {}, loop.inject_method

    def spy(model, mcfg):
        seen["model"], seen["adapters"] = model, real(model, mcfg)
        return seen["adapters"]

    monkeypatch.setattr(loop, "inject_method", spy)
    return seen


def test_nf4_base_trains_with_fp32_adapters(tmp_path, injected):
    pytest.importorskip("torchao")
    from adalora.layers import AdapterLayer
    from adalora_lab.quant import NF4Linear

    seen = injected
    s = train(instruct_run(["method=adalora", "method.target_r=2", "max_steps=4", "model.quantize=nf4"]),
              tmp_path / "run")
    assert s["status"] == "completed" and math.isfinite(s["final"]["perplexity"])
    adapters = seen["adapters"]
    assert len(adapters) == 2 * len(LLAMA_TARGETS)
    assert all(isinstance(a, AdapterLayer) and isinstance(a.base_layer, NF4Linear) for a in adapters.values())
    trainable = [p for p in seen["model"].parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert not isinstance(seen["model"].lm_head, NF4Linear)


def test_hub_folder_with_a_4bit_base(tmp_path, tokenizer, injected):
    """model=hub_llama on a local folder (what a Hub download is): read in bf16, linears to NF4, the rest fp32."""
    pytest.importorskip("torchao")
    from adalora_lab.quant import NF4Linear

    folder = tmp_path / "tiny-llama"
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    s = train(instruct_run(["model=hub_llama", f"model.path={folder}", "model.quantize=nf4", "method=lora",
                            "max_steps=2"]), tmp_path / "run")
    assert s["status"] == "completed" and math.isfinite(s["final"]["perplexity"])
    model = injected["model"]
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 2 * len(LLAMA_TARGETS)
    dense = [p for p in model.parameters() if type(p).__name__ != "NF4Tensor"]
    assert all(p.dtype == torch.float32 for p in dense)  # read in bf16, cast back: embeddings, norms, head


def test_hub_dataset_holds_out_its_last_rows(tmp_path, monkeypatch):
    """task.hub_name through datasets.load_dataset (here a local folder, as the Hub is offline)."""
    pytest.importorskip("datasets")
    from adalora_lab.causal_lm import load_instruct_splits

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    folder = tmp_path / "alpaca-like"
    folder.mkdir()
    (folder / "train.jsonl").write_text((FIX / "train.jsonl").read_text())
    cfg = instruct_run(["task.train_file=null", "task.eval_file=null", f"task.hub_name={folder}",
                        "task.max_eval_examples=8"])
    train_rec, dev_rec, em, inputs = load_instruct_splits(cfg)
    rows = read_jsonl(FIX / "train.jsonl")
    assert train_rec == rows[:-8] and dev_rec == rows[-8:] and em is None
    assert inputs["hub"] == str(folder) and inputs["hub_fingerprint"]


def test_causal_configs_are_checked_before_loading(tmp_path):
    for bad, words in ((["model=tiny_bert"], "needs a causal LM"),
                       (["model=tiny_gpt2"], "modules_to_save"),  # the classifier preset's [score]
                       (["model=tiny_gpt2_lm", "model.quantize=nf4"], "Conv1D"),
                       (["task.train_file=null"], "task.train_file"),
                       (["task.eval_file=null"], "task.eval_file"),
                       (["task.max_new_tokens=0"], "task.max_new_tokens")):
        with pytest.raises(ConfigError, match=words):
            train(instruct_run(bad + ["method=lora", "max_steps=2"]), tmp_path / "_".join(bad))
    with pytest.raises(ConfigError, match="model.quantize"):
        train(compose_run(["model=tiny_bert", "model.quantize=nf4", "logger=none"]), tmp_path / "glue")


def test_workload_records_its_inputs_by_content(tmp_path):
    from adalora_lab.causal_lm import causal_lm_workload
    from adalora_lab.instruct import file_sha256

    work = causal_lm_workload(instruct_run([]), torch.device("cpu"))
    assert work.task_type == "CAUSAL_LM" and work.main_metric == "perplexity"
    assert work.inputs["train_file"] == file_sha256(FIX / "train.jsonl") != work.inputs["eval_file"]
    assert work.inputs["model"]["class"] == "LlamaForCausalLM" and "backend_sha256" in work.inputs["tokenizer"]
    copy = tmp_path / "train.jsonl"
    copy.write_text((FIX / "train.jsonl").read_text().replace("cat", "dog"))
    other = causal_lm_workload(instruct_run([f"task.train_file={copy}"]), torch.device("cpu"))
    assert other.inputs["train_file"] != work.inputs["train_file"]
    assert other.inputs["model"] == work.inputs["model"]


def test_resumable_order(tmp_path):
    from adalora_lab.causal_lm import causal_lm_workload

    work = causal_lm_workload(instruct_run(["seed=3"]), torch.device("cpu"))
    full = [b["input_ids"] for b in work.epoch_batches(1, 0)]
    tail = [b["input_ids"] for b in work.epoch_batches(1, 2)]
    assert work.batches_per_epoch == 5 and len(tail) == 3
    assert all(torch.equal(a, b) for a, b in zip(full[2:], tail))


# ---------------------------------------------------------------------------------------------- generation
def test_generate_batched_equals_one_by_one(tokenizer):
    from adalora_lab.generation import generate

    model = tiny_llama(tokenizer)
    prompts = ["Repeat the words.\ncat dog\nAnswer:", "Say the word twice: sun\nAnswer:", "a\nAnswer:"]
    together = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    alone = [generate(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone and all(isinstance(o, str) for o in together) and any(together)
    assert not model.training


def test_generate_same_with_merged_and_unmerged_adapters(tokenizer):
    from adalora_lab.generation import generate

    model = tiny_llama(tokenizer)
    prompts = ["Repeat the words.\ncat dog\nAnswer:", "Give the first word.\nred blue\nAnswer:"]
    before = generate(model, tokenizer, prompts, max_new_tokens=6)
    adapters = inject_adapters(model, LoRAConfig(r=4, target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(0, 0.5)  # a delta large enough to change the greedy tokens
    unmerged = generate(model, tokenizer, prompts, max_new_tokens=6)
    for a in adapters.values():
        a.merge()
    assert generate(model, tokenizer, prompts, max_new_tokens=6) == unmerged != before


def test_finish_writes_samples_next_to_references(tmp_path):
    from adalora_lab.causal_lm import causal_lm_workload

    work = causal_lm_workload(instruct_run(["task.num_samples=3", "task.max_new_tokens=4"]), torch.device("cpu"))
    path = work.finish(work.model, tmp_path)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    dev = read_jsonl(FIX / "dev.jsonl")[:3]
    assert path == tmp_path / "samples.jsonl" and [r["reference"] for r in rows] == [d.output for d in dev]
    assert all(isinstance(r["output"], str) and r["prompt"].endswith("Answer:") for r in rows)


def test_exact_match_normalises():
    from adalora_lab.generation import exact_match, normalize_answer

    assert normalize_answer("  Cat\n DOG ") == "cat dog"
    assert exact_match(["Cat  dog", "sun"], ["cat dog", "moon"]) == 0.5
    with pytest.raises(ValueError):
        exact_match(["a"], [])


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_run_adapter_loads_in_peft_with_the_same_logits(method, tmp_path):
    """The adapter/ folder of a causal-LM run is PEFT's format (task type CAUSAL_LM): PeftModel.from_pretrained on
    the same base gives the logits of our own loaded model, and resuming the finished run reuses it."""
    peft = pytest.importorskip("peft")
    from adalora import from_pretrained
    from adalora_lab.causal_lm import causal_lm_workload
    from adalora_lab.loop import seed_everything

    cfg = instruct_run([f"method={method}", "method.target_r=2", "max_steps=8", "eval_every=4", "optim.lr=5e-3"])
    train(cfg, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == ("ADALORA" if method == "adalora" else "LORA")

    def base():  # the run's base: a random tiny decoder, built from the run's seed exactly as the run built it
        seed_everything(cfg.seed)
        return causal_lm_workload(cfg, torch.device("cpu")).model.eval()

    ours = from_pretrained(base(), tmp_path / "run" / "adapter")
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "run" / "adapter")).eval()
    ids = torch.randint(5, 1000, (2, 12))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-5
    assert train(cfg, tmp_path / "run")["status"] == "completed"  # a rerun reuses the finished run


def test_interrupted_causal_run_resumes_exactly(tmp_path, monkeypatch):
    """The causal-LM path resumes like GLUE: a run stopped mid-schedule and rerun ends as an uninterrupted one."""
    from adalora_lab.resume import FAULT_ENV

    overrides = ["method=adalora", "method.target_r=2", "max_steps=10", "eval_every=5", "checkpoint_every=3",
                 "optim.lr=5e-3", "deterministic=true", "threads=1", "method.delta_t=1"]
    ref = train(instruct_run(overrides), tmp_path / "ref")
    monkeypatch.setenv(FAULT_ENV, "raise@step:7")
    with pytest.raises(KeyboardInterrupt):
        train(instruct_run(overrides), tmp_path / "run")
    monkeypatch.delenv(FAULT_ENV)
    again = train(instruct_run(overrides), tmp_path / "run")
    assert again["final"] == ref["final"]
    for name in ("metrics.jsonl", "rank_history.jsonl", "rank_pattern.json"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "ref" / name).read_text(), name


def test_trainer_callback_on_a_causal_lm(tmp_path, tokenizer):
    """AdaLoRATrainer drives the allocator on a decoder with its language-modelling loss: the budget ends at
    target_r x n and the loss falls."""
    from transformers import TrainingArguments

    from adalora import AdaLoRAConfig, RankAllocator
    from adalora.integrations import AdaLoRATrainer
    from adalora_lab.instruct import PromptTemplate, read_jsonl, tokenize_records

    model = tiny_llama(tokenizer)
    cfg = AdaLoRAConfig(init_r=3, target_r=2, target_modules=LLAMA_TARGETS, tinit=2, tfinal=4, delta_t=1,
                        total_steps=12)
    adapters = inject_adapters(model, cfg)
    alloc = RankAllocator(adapters, cfg)
    ds = tokenize_records(read_jsonl(FIX / "train.jsonl"), tokenizer, PromptTemplate.preset("plain"), 48)
    data = [ds[i] for i in range(len(ds))]

    def collate(batch):  # right-padded; labels -100 on the padding
        n = max(len(b["input_ids"]) for b in batch)
        pad = tokenizer.pad_token_id

        def fill(t, value):
            return torch.cat([t, torch.full((n - len(t),), value, dtype=t.dtype)])

        return {"input_ids": torch.stack([fill(b["input_ids"], pad) for b in batch]),
                "labels": torch.stack([fill(b["labels"], -100) for b in batch]),
                "attention_mask": torch.stack([fill(torch.ones_like(b["input_ids"]), 0) for b in batch])}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", learning_rate=5e-3, disable_tqdm=True,
                             seed=0, remove_unused_columns=False)
    trainer = AdaLoRATrainer(model=model, args=args, train_dataset=data, data_collator=collate, allocator=alloc)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(alloc.rank_pattern().values()) == 2 * len(adapters)
    assert losses[-1] < losses[0]
