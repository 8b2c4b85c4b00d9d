"""Run schemas: plain dataclasses. Hydra registers them (adalora_lab.cli); notebooks build them directly.

Values live in conf/*.yaml; the types and defaults live here, so a typo or a wrong type fails at
composition, before any compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from adalora.config import ConfigError

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@dataclass
class ModelConfig:
    """kind: minilm (packaged all-MiniLM-L6-v2, offline) | bert | gpt2 | llama (tiny random) | hub | resmlp
    (planted task). task=instruct takes a causal LM: llama, gpt2 (as GPT2LMHeadModel) or hub."""

    name: str = "minilm"
    kind: str = "minilm"
    path: Optional[str] = None  # Hub name or local folder for kind=hub
    tokenizer: Optional[str] = None  # defaults to the packaged MiniLM tokenizer for random models
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    target_modules: list = field(default_factory=lambda: list(BERT_TARGETS))
    modules_to_save: list = field(default_factory=lambda: ["classifier"])
    init_std: Optional[float] = None  # random causal LMs: weight init std (null: transformers' 0.02)
    quantize: Optional[str] = None  # nf4: the frozen base's linear layers in 4-bit NormalFloat (task=instruct)


@dataclass
class PlantedConfig:
    """The synthetic planted-rank task: a residual MLP teacher = base + low-rank ΔW* in a few modules."""

    dim: int = 64
    hidden: int = 128
    n_blocks: int = 6
    planted: dict = field(default_factory=dict)  # {module name: rank}; empty = the default heterogeneous pattern
    delta_scale: float = 1.0
    n_train: int = 4096
    n_eval: int = 1024
    task_seed: int = 1234


@dataclass
class TaskConfig:
    """name: a GLUE task (sst2 rte mrpc cola stsb qnli mnli qqp), planted_rank or instruct (a causal LM on
    Alpaca-layout JSONL: train_file, eval_file, or hub_name)."""

    name: str = "rte"
    data_dir: Optional[str] = None  # a GLUE-format folder holding <TASK>/train.tsv, dev.tsv
    hub: bool = False  # read through `datasets` from the Hub instead (online users)
    max_length: int = 128
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    planted: PlantedConfig = field(default_factory=PlantedConfig)
    # task=instruct: local JSONL files (instruction, optional input, output), or a Hub dataset
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    exact_match_file: Optional[str] = None  # held-out JSONL scored by greedy generation (exact_match metric)
    hub_name: Optional[str] = None  # e.g. tatsu-lab/alpaca; read when train_file is not set
    hub_eval_split: Optional[str] = None  # null: hold out the last max_eval_examples (default 500) train rows
    template: str = "alpaca"  # prompt preset: alpaca | plain
    prompt_with_input: Optional[str] = None  # override the preset: names {instruction} and {input}
    prompt_no_input: Optional[str] = None  # override the preset: names {instruction}
    max_new_tokens: int = 64  # generation length for exact match and samples
    num_samples: int = 8  # dev records whose generations go to samples.jsonl at the end of a run


@dataclass
class MethodConfig:
    """One schema for every method, so ``method=lora,adalora method.target_r=2,4`` sweeps compose.

    target_r is the budget: LoRA's rank, AdaLoRA's final average rank (init_r = init_r_ratio x it).
    tinit / tfinal: a float < 1 is a fraction of the optimizer steps, otherwise a step count.
    """

    name: str = "adalora"
    kind: str = "adalora"  # lora | adalora | full
    target_r: int = 8
    init_r_ratio: float = 1.5
    init_r: Optional[int] = None  # overrides init_r_ratio
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Optional[list] = None  # None: the model's defaults
    modules_to_save: Optional[list] = None
    tinit: float = 0.1
    tfinal: float = 0.4
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    orth_reg_form: str = "reference"
    score: str = "ipt"
    prune: bool = True
    adapter: str = "svd"
    compact: bool = True  # physically slice the adapters once the final phase starts


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.06
    schedule: str = "linear"  # linear | cosine | constant
    max_grad_norm: Optional[float] = 1.0


@dataclass
class LoggerConfig:
    """Local files are always written; name adds a sink: none | jsonl (console lines) | wandb."""

    name: str = "jsonl"
    project: str = "adalora"
    entity: Optional[str] = None
    mode: str = "offline"  # wandb mode: offline | online | disabled
    tags: list = field(default_factory=list)


@dataclass
class PathsConfig:
    """Where data and caches live (conf/paths/default.yaml sets them from the environment)."""

    glue_dir: Optional[str] = None
    cache_dir: str = ".cache"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    epochs: float = 3.0
    max_steps: Optional[int] = None  # overrides epochs
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    eval_every: int = 0  # optimizer steps; 0 = once per epoch
    log_every: int = 10
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # a checkpoint file or run folder; by default the run folder's own newest
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss instead of stopping
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (autocast of the model's forward; weights, optimizer and scores stay fp32)
    deterministic: bool = False
    threads: Optional[int] = None
    progress: bool = True
    traceback: bool = False  # print the full traceback on a user error instead of one line
    # free-form values for interpolation (e.g. glue_compare's per-task protocol table); the loop never reads it,
    # so a resumed or reused run compares the resolved fields, not this table
    extra: dict = field(default_factory=dict)


def _need(ok: bool, field_name: str, value, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value}: {rule}. Fix: {fix}")


def validate_run_config(cfg: RunConfig) -> None:
    """Checks that need no data or model: run first, so a typo costs a second, not a model load."""
    _need(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1", "e.g. batch_size=32")
    _need(cfg.eval_batch_size >= 1, "eval_batch_size", cfg.eval_batch_size, "must be >= 1", "e.g. eval_batch_size=128")
    _need(cfg.grad_accum >= 1, "grad_accum", cfg.grad_accum, "must be >= 1", "grad_accum=1 for no accumulation")
    _need(0 <= cfg.seed < 2**32, "seed", cfg.seed, "must be in [0, 2**32)", "e.g. seed=0")
    _need(cfg.log_every >= 1, "log_every", cfg.log_every, "must be >= 1 (optimizer steps)", "e.g. log_every=10")
    _need(cfg.eval_every >= 0, "eval_every", cfg.eval_every, "must be >= 0 (0 = once per epoch)", "eval_every=0")
    _need(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "must be >= 0 (0 = at the end only)",
          "e.g. checkpoint_every=500")
    _need(cfg.keep_checkpoints >= 1, "keep_checkpoints", cfg.keep_checkpoints, "must be >= 1", "keep_checkpoints=2")
    _need(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", cfg.max_steps, "must be >= 1 or null (use epochs)",
          "drop it or give a positive number")
    _need(cfg.epochs > 0, "epochs", cfg.epochs, "must be > 0", "e.g. epochs=3")
    o = cfg.optim
    _need(o.name == "adamw", "optim.name", repr(o.name), "only adamw is provided", "optim=adamw")
    _need(o.schedule in ("linear", "cosine", "constant"), "optim.schedule", repr(o.schedule),
          "use linear, cosine or constant", "optim.schedule=linear")
    _need(o.lr > 0, "optim.lr", o.lr, "must be > 0", "e.g. optim.lr=1e-3")
    _need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1)", "e.g. 0.06")
    _need(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", o.max_grad_norm,
          "must be > 0 or null (no clipping)", "e.g. optim.max_grad_norm=1.0")
    t = cfg.task
    _need(t.max_length >= 8, "task.max_length", t.max_length, "must be >= 8 tokens", "e.g. task.max_length=128")
    for name in ("max_train_examples", "max_eval_examples"):
        v = getattr(t, name)
        _need(v is None or v >= 1, f"task.{name}", v, "must be >= 1 or null (all examples)", f"drop task.{name}")
    _need(cfg.device in ("auto", "cpu") or cfg.device.startswith(("cuda", "mps")), "device", repr(cfg.device),
          "unknown device", "device=auto, cpu or cuda")
    if cfg.device.startswith("cuda"):
        import torch

        _need(torch.cuda.is_available(), "device", cfg.device, "no CUDA GPU is available here",
              "device=auto (uses a GPU when there is one) or device=cpu")
    _need(cfg.precision in ("fp32", "bf16"), "precision", repr(cfg.precision), "expected fp32 or bf16",
          "precision=fp32, or precision=bf16 on a GPU or a CPU with bf16 units (AMX / AVX512-BF16)")
    _need(cfg.logger.name in ("none", "jsonl", "wandb"), "logger.name", repr(cfg.logger.name),
          "expected none, jsonl or wandb", "logger=jsonl")
    _need(cfg.logger.mode in ("offline", "online", "disabled"), "logger.mode", repr(cfg.logger.mode),
          "expected offline, online or disabled", "logger.mode=offline")
    if (cfg.task.name == "planted_rank") != (cfg.model.kind == "resmlp"):
        raise ConfigError(f"task={cfg.task.name} with model.kind={cfg.model.kind}: the planted_rank task uses "
                          "model=resmlp, GLUE tasks a text model (minilm, tiny_bert, tiny_gpt2, hub)")
    _need(cfg.model.quantize in (None, "nf4"), "model.quantize", repr(cfg.model.quantize), "expected nf4 or null",
          "model.quantize=nf4 (4-bit base), or drop it")
    _need(cfg.model.quantize is None or t.name == "instruct", "model.quantize", cfg.model.quantize,
          "a 4-bit base is built for causal LMs only", "task=instruct, or drop model.quantize")
    if cfg.model.kind == "hub" and not cfg.model.path:
        raise ConfigError("model.path is empty: model=hub needs a Hub name or a local folder. "
                          "Fix: e.g. model.path=bert-base-uncased")
    # the method config with a provisional length: catches bad ranks, betas, scores, ... before any load
    build_method_config(cfg.method, cfg.model, total_steps=cfg.max_steps or 10**6)


def resolve_schedule_steps(value: float, total_steps: int, name: str) -> int:
    """tinit/tfinal: a float in [0, 1) is a fraction of training, otherwise a number of steps."""
    if value < 0:
        raise ConfigError(f"method.{name}={value}: must be >= 0 (a fraction < 1 or a step count)")
    if isinstance(value, float) and value < 1.0:
        return int(round(value * total_steps))
    if value != int(value):
        raise ConfigError(f"method.{name}={value}: a value >= 1 is a step count and must be whole; "
                          "use a fraction < 1 for a share of training")
    return int(value)


def build_method_config(m: MethodConfig, model: ModelConfig, total_steps: int) -> Any:
    """The library config for a method (None for full fine-tuning)."""
    from adalora.config import AdaLoRAConfig, LoRAConfig

    targets = list(m.target_modules) if m.target_modules is not None else list(model.target_modules)
    save = list(m.modules_to_save) if m.modules_to_save is not None else list(model.modules_to_save)
    if m.kind not in ("lora", "adalora", "full"):
        raise ConfigError(f"method.kind={m.kind!r}: expected lora, adalora or full")
    if m.kind == "full":
        return None
    if not isinstance(m.target_r, int) or m.target_r < 1:
        raise ConfigError(f"method.target_r={m.target_r}: the budget (LoRA rank / AdaLoRA final average rank) must be "
                          "an integer >= 1. Fix: e.g. method.target_r=8")
    if m.kind == "lora":
        return LoRAConfig(r=m.target_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=targets,
                          modules_to_save=save, use_rslora=m.use_rslora)
    if m.kind != "adalora":
        raise ConfigError(f"method.kind={m.kind!r}: expected lora, adalora or full")
    init_r = m.init_r if m.init_r is not None else max(m.target_r, int(round(m.init_r_ratio * m.target_r)))
    tinit = resolve_schedule_steps(m.tinit, total_steps, "tinit")
    tfinal = resolve_schedule_steps(m.tfinal, total_steps, "tfinal")
    if m.prune and tinit + tfinal >= total_steps:
        raise ConfigError(f"method.tinit + method.tfinal = {tinit} + {tfinal} steps leave no budget-decreasing phase "
                          f"in {total_steps} steps. Fix: give them as fractions (e.g. tinit=0.1 tfinal=0.4) or "
                          "train longer")
    return AdaLoRAConfig(init_r=init_r, target_r=m.target_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                         target_modules=targets, modules_to_save=save, tinit=tinit, tfinal=tfinal,
                         delta_t=m.delta_t, beta1=m.beta1, beta2=m.beta2, orth_reg_weight=m.orth_reg_weight,
                         total_steps=total_steps, score=m.score, prune=m.prune, adapter=m.adapter,
                         orth_reg_form=m.orth_reg_form)
