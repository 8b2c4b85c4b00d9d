"""The instruction-tuning workload: a causal LM on Alpaca-layout data, loss on the response tokens only.

Main metric: dev perplexity (exp of the token-weighted mean response loss), lower is better. With
``task.exact_match_file`` the evaluation also generates greedily for those records and reports
``exact_match`` (normalised string equality). The workload's ``finish(model, run_dir)`` writes
``samples.jsonl`` (prompt, reference, output) for the first ``task.num_samples`` dev records.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from adalora.config import ConfigError

from .schema import RunConfig
from .workload import Workload, to_device

__all__ = ["causal_lm_workload", "load_instruct_splits"]

DEFAULT_HUB_HOLDOUT = 500


def load_instruct_splits(cfg: RunConfig):
    """(train records, dev records, exact-match records or None, what was read by content)."""
    from .instruct import file_sha256, read_hub, read_jsonl

    t = cfg.task
    inputs: dict = {}
    if t.train_file:
        if not t.eval_file:
            raise ConfigError("task.eval_file is not set: give a held-out JSONL file for the dev perplexity "
                              "(task.eval_file=dev.jsonl)")
        train = read_jsonl(t.train_file, t.max_train_examples)
        dev = read_jsonl(t.eval_file, t.max_eval_examples)
        inputs.update(train_file=file_sha256(t.train_file), eval_file=file_sha256(t.eval_file))
    elif t.hub_name:
        rows, fp = read_hub(t.hub_name, "train")
        if t.hub_eval_split:
            dev, dev_fp = read_hub(t.hub_name, t.hub_eval_split)
            dev = dev[:t.max_eval_examples] if t.max_eval_examples else dev
        else:  # no dev split (Alpaca has none): the last rows are held out
            n = t.max_eval_examples or DEFAULT_HUB_HOLDOUT
            if n >= len(rows):
                raise ConfigError(f"task.hub_name={t.hub_name}: holding out {n} of {len(rows)} rows leaves no "
                                  "training data. Fix: a smaller task.max_eval_examples or task.hub_eval_split=...")
            rows, dev, dev_fp = rows[:-n], rows[-n:], fp
        train = rows[:t.max_train_examples] if t.max_train_examples else rows
        inputs.update(hub=t.hub_name, hub_fingerprint=fp, hub_eval_fingerprint=dev_fp)
    else:
        raise ConfigError("task=instruct needs data: task.train_file=... and task.eval_file=... (Alpaca-layout "
                          "JSONL), or task.hub_name=tatsu-lab/alpaca (online)")
    em = None
    if t.exact_match_file:
        em = read_jsonl(t.exact_match_file, t.max_eval_examples)
        inputs["exact_match_file"] = file_sha256(t.exact_match_file)
    return train, dev, em, inputs


def _check_config(cfg: RunConfig) -> None:
    from .models import CAUSAL_KINDS

    t, m = cfg.task, cfg.model
    if t.max_new_tokens < 1 or t.num_samples < 0:
        raise ConfigError(f"task.max_new_tokens={t.max_new_tokens}, task.num_samples={t.num_samples}: generation "
                          "needs max_new_tokens >= 1 and num_samples >= 0. Fix: e.g. task.max_new_tokens=64")
    if m.kind not in CAUSAL_KINDS:
        raise ConfigError(f"task=instruct with model.kind={m.kind}: instruction tuning needs a causal LM. "
                          "Fix: model=tiny_llama, model=tiny_gpt2_lm, or model=hub_llama model.path=<Hub name>")
    save = cfg.method.modules_to_save if cfg.method.modules_to_save is not None else m.modules_to_save
    if save:
        raise ConfigError(f"model.modules_to_save={list(save)}: a causal LM trains adapters only (the LM head "
                          "stays frozen, as PEFT's CAUSAL_LM adapters have no head). Fix: model.modules_to_save=[] "
                          "(the causal presets tiny_llama, tiny_gpt2_lm, hub_llama, hub_gpt2 set it)")
    if m.quantize and m.kind == "gpt2":
        raise ConfigError("model.quantize=nf4 with model.kind=gpt2: GPT-2's Conv1D layers have no NF4 form here. "
                          "Fix: model=tiny_llama or a Llama-style Hub model")


def causal_lm_workload(cfg: RunConfig, device: torch.device) -> Workload:
    from .data import tokenizer_fingerprint
    from .generation import exact_match, generate, write_samples
    from .instruct import PromptTemplate, make_causal_loader, perplexity, response_loss_sums, tokenize_records
    from .models import build_causal_lm, ensure_eos, load_tokenizer, model_identity

    _check_config(cfg)
    t = cfg.task
    template = PromptTemplate.preset(t.template, t.prompt_with_input, t.prompt_no_input)
    train_rec, dev_rec, em_rec, inputs = load_instruct_splits(cfg)
    tokenizer = ensure_eos(load_tokenizer(cfg.model))
    cache = Path(cfg.paths.cache_dir) / "tokenized"
    train_ds = tokenize_records(train_rec, tokenizer, template, t.max_length, cache, what="task train data")
    dev_ds = tokenize_records(dev_rec, tokenizer, template, t.max_length, cache, what="task eval data")

    model = build_causal_lm(cfg.model, tokenizer).to(device)
    if cfg.model.quantize == "nf4":
        from .quant import quantize_model

        quantize_model(model)  # on the device: quantizing is fast there
        for p in model.parameters():  # what stays dense (embeddings, norms, LM head) in fp32, like the adapters
            if type(p).__name__ != "NF4Tensor" and p.is_floating_point():
                p.data = p.data.float()
    inputs.update(model=model_identity(cfg.model, model), tokenizer=tokenizer_fingerprint(tokenizer))

    pad = tokenizer.pad_token_id
    train_loader = make_causal_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, pad_id=pad)
    dev_loader = make_causal_loader(dev_ds, cfg.eval_batch_size, shuffle=False, seed=0, pad_id=pad)
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    def epoch_batches(epoch: int, start: int = 0) -> Iterator:
        train_loader.batch_sampler.set_epoch(epoch, start_batch=start)  # order = f(seed, epoch): resumable
        return iter(train_loader)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        # transformers' causal-LM loss: shifted, mean over the labelled (response) tokens of the batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_dtype is not None):
            return m(**to_device(batch, device)).loss.float()

    def gen(m: nn.Module, records) -> list[str]:
        return generate(m, tokenizer, [template.format(r) for r in records], max_new_tokens=t.max_new_tokens,
                        batch_size=cfg.eval_batch_size, autocast_dtype=amp_dtype)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was = m.training
        m.eval()
        loss_sum, n_tok = 0.0, 0
        for batch in dev_loader:
            b = to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_dtype is not None):
                logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, L, V)
            s, n = response_loss_sums(logits, b["labels"])
            loss_sum, n_tok = loss_sum + s, n_tok + n
        m.train(was)
        loss = loss_sum / n_tok
        res = {"eval_loss": loss, "perplexity": perplexity(loss), "eval_tokens": n_tok}
        if em_rec is not None:
            res["exact_match"] = exact_match(gen(m, em_rec), [r.output for r in em_rec])
        return res

    def finish(m: nn.Module, run_dir) -> Path:
        """samples.jsonl in the run folder: prompt, reference and greedy output of the first dev records."""
        recs = dev_rec[:t.num_samples]
        return write_samples(Path(run_dir) / "samples.jsonl", [template.format(r) for r in recs],
                             [r.output for r in recs], gen(m, recs))

    base = cfg.model.path if cfg.model.kind == "hub" else None
    return Workload(model, len(train_loader), epoch_batches, loss_fn, evaluate, "perplexity", False,
                    inputs=inputs, task_type="CAUSAL_LM", finish=finish, base_model=base)
