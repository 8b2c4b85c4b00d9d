"""Run schemas: plain dataclasses. Hydra registers them (experiments/train.py); notebooks build them directly.

Values live in conf/*.yaml; the types and defaults live here, so a typo or a wrong type fails at
composition, before any compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import ConfigError

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@dataclass
class ModelConfig:
    """kind: minilm (packaged all-MiniLM-L6-v2, offline) | bert | gpt2 (tiny random) | hub | resmlp (planted task)."""

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
    """name: a GLUE task (sst2 rte mrpc cola stsb qnli mnli qqp) or planted_rank."""

    name: str = "rte"
    data_dir: Optional[str] = None  # a GLUE-format folder holding <TASK>/train.tsv, dev.tsv
    hub: bool = False  # read through `datasets` from the Hub instead (online users)
    max_length: int = 128
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    planted: PlantedConfig = field(default_factory=PlantedConfig)


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
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
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
    deterministic: bool = False
    threads: Optional[int] = None
    progress: bool = True
    traceback: bool = False  # print the full traceback on a user error instead of one line
    extra: dict = field(default_factory=dict)


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
    from ..config import AdaLoRAConfig, LoRAConfig

    targets = list(m.target_modules) if m.target_modules is not None else list(model.target_modules)
    save = list(m.modules_to_save) if m.modules_to_save is not None else list(model.modules_to_save)
    if m.kind == "full":
        return None
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
