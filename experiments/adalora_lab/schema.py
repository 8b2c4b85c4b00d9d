"""Run schemas: plain dataclasses. Hydra registers them (adalora_lab.cli); notebooks build them directly.

Values live in conf/*.yaml; the types and defaults live here, so a typo or a wrong type fails at
composition, before any compute.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from adalora.config import ConfigError

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

# Field metadata: ``affects_result=False`` marks what cannot change a run's numbers (where it logs, how often it
# checkpoints, threads, paths). Resume / reuse ignore those fields, and sweep folder names leave them out.
NO_EFFECT = {"affects_result": False}


def no_effect(default=None, factory=None):
    """A field that does not change the run's result."""
    if factory is not None:
        return field(default_factory=factory, metadata=NO_EFFECT)
    return field(default=default, metadata=NO_EFFECT)


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
    target_modules: list = field(default_factory=lambda: list(BERT_TARGETS))  # suffixes, or [all-linear]
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

    target_r is the budget: LoRA's rank, the final average rank of AdaLoRA and IncreLoRA (AdaLoRA starts at
    init_r = init_r_ratio x it), SoRA's optional budget cap. A method-specific field left null takes the library
    config's default (``adalora.AdaLoRAConfig``, ``SoRAConfig``, ``IncreLoRAConfig``): the defaults have one
    owner, and conf/method/*.yaml sets the values of an experiment.
    tinit / tfinal: a float < 1 is a fraction of the optimizer steps, otherwise a step count.
    """

    name: str = "adalora"
    kind: str = "adalora"  # lora | adalora | sora | increlora | full
    target_r: int = 8
    init_r_ratio: float = 1.5  # AdaLoRA
    init_r: Optional[int] = None  # overrides init_r_ratio (AdaLoRA, budget-matched SoRA)
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = None
    use_rslora: Optional[bool] = None  # LoRA
    target_modules: Any = None  # None: the model's defaults; a list of suffixes, "all-linear", or one regex string
    modules_to_save: Optional[list] = None  # None: the model's defaults
    compact: bool = True  # physically slice the adapters once their ranks are final
    # AdaLoRA (and IncreLoRA where it shares the name)
    tinit: Optional[float] = None
    tfinal: Optional[float] = None
    delta_t: Optional[int] = None
    beta1: Optional[float] = None
    beta2: Optional[float] = None
    orth_reg_weight: Optional[float] = None
    orth_reg_form: Optional[str] = None
    score: Optional[str] = None
    prune: Optional[bool] = None
    adapter: Optional[str] = None
    on_bad_scores: Optional[str] = None
    # SoRA
    l1_weight: Optional[float] = None
    threshold: Optional[float] = None
    threshold_scale: Optional[str] = None
    prox: Optional[str] = None
    sparse_lr: Optional[float] = None
    lambda_schedule: Optional[str] = None
    max_lambda: Optional[float] = None
    lambda_num: Optional[int] = None
    lambda_stage_steps: Optional[int] = None
    budget_matched: bool = False  # SoRA: keep at most target_r x n_modules gates from total_steps - tfinal on
    # AdaLoRA, opt-in (ours): Λ (every adapter's lora_E) trains at lambda_lr_scale x the learning rate, the rest
    # at the learning rate. 1 is the reference (one learning rate for everything). Λ starts at 0 and Adam moves
    # it by about lr per step, so this lifts the cap on ΔW's growth without a larger step for P, Q or the head.
    lambda_lr_scale: float = 1.0
    # IncreLoRA
    grow_from: Optional[int] = None  # the starting rank of every module (IncreLoRAConfig.init_r)
    # the share of training by which growth is over: sets delta_t from the rounds the budget needs (ours; the
    # authors give delta_t in steps). Ignored when delta_t is set.
    grow_until: Optional[float] = None
    top_h: Optional[int] = None
    incre_rank_num: Optional[int] = None
    advance_learn: Optional[bool] = None
    scale: Optional[str] = None
    restart_warmup: Optional[int] = None


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
    logger: LoggerConfig = no_effect(factory=LoggerConfig)
    paths: PathsConfig = no_effect(factory=PathsConfig)
    seed: int = 0
    epochs: float = 3.0
    max_steps: Optional[int] = None  # overrides epochs
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    eval_every: int = 0  # optimizer steps; 0 = once per epoch
    log_every: int = no_effect(10)
    checkpoint_every: int = no_effect(0)  # optimizer steps between resumable checkpoints; 0 = only at the end
    keep_checkpoints: int = no_effect(2)
    resume: Optional[str] = no_effect(None)  # a checkpoint file or run folder; by default the run folder's newest
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss instead of stopping
    max_skipped_ratio: float = 0.05  # a run that skips more than this share of its steps ends failed
    divergence_ratio: float = 10.0  # a run whose final train loss is above this x its first ends failed
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (autocast of the model's forward; weights, optimizer and scores stay fp32)
    deterministic: bool = False
    threads: Optional[int] = no_effect(None)  # torch intra-op threads; None: the launcher's share of the cores
    progress: bool = no_effect(True)
    figures: bool = no_effect(True)  # the run's figures (figures/*.png, ~1 s each) at its end; debug=fast: off
    traceback: bool = no_effect(False)  # print the full traceback on an error instead of one line
    # free-form values for interpolation (e.g. glue_compare's per-task protocol table); the loop never reads it,
    # so a resumed or reused run compares the resolved fields, not this table
    extra: dict = no_effect(factory=dict)


def result_fields(cls=None, prefix: str = "") -> tuple[list[str], list[str]]:
    """(dotted fields that affect a run's result, dotted fields that do not) of ``RunConfig``; a nested dataclass
    marked ``no_effect`` counts whole (``logger``, ``paths``)."""
    cls = cls or RunConfig
    yes, no = [], []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if not f.metadata.get("affects_result", True):
            no.append(name)
            continue
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            y, n = result_fields(sub, name + ".")
            yes += y
            no += n
        else:
            yes.append(name)
    return yes, no


# Sweep folders (conf/train.yaml: <task>/<method>_r<r>/<override_dirname>/seed<s>) name a run by its overrides,
# less those the path already holds and those that cannot change a result (the no_effect fields).
SWEEP_PATH_KEYS = ("seed", "task", "method", "method.target_r", "experiment", "debug", "hydra/launcher",
                   "hydra.sweep.dir", "hydra.run.dir")


def sweep_name_excludes() -> list[str]:
    """The override keys a sweep folder's name leaves out (Hydra's ``override_dirname.exclude_keys``)."""
    no = result_fields()[1]
    return [*SWEEP_PATH_KEYS, *no, *(f"{k}.{sub}" for k in no for sub in ("name", "mode", "project"))]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def result_config(cfg: dict) -> dict:
    """The result-affecting fields of a saved config, flattened (``optim.lr`` -> value): the ``no_effect`` fields
    and the resolved ``inputs`` left out, and a field the config lacks (written before the field existed) at its
    schema default, as a resume takes it. Two runs with equal result configs are the same experiment."""
    _, ignored = result_fields()
    full = {**flatten(dataclasses.asdict(RunConfig())), **flatten(cfg or {})}
    skip = ("inputs", *ignored)
    return {k: v for k, v in full.items() if not any(k == s or k.startswith(s + ".") for s in skip)}


def config_diff(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every field that affects the result and differs between two config dicts
    (:func:`result_config` of each). A field that the saved config lacks (written before the field existed)
    counts as its schema default, so adding a field never strands the checkpoints of runs in progress."""
    a, b = result_config(saved), result_config(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _need(ok: bool, field_name: str, value, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value}: {rule}. Fix: {fix}")


def _nonfinite(obj, prefix: str = "") -> list[str]:
    """Dotted names of float fields holding NaN or inf (lists included, e.g. optim.betas)."""
    bad = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            bad += _nonfinite(v, name + ".")
        elif isinstance(v, float) and not math.isfinite(v):
            bad.append(f"{name}={v}")
        elif isinstance(v, (list, tuple)) and any(isinstance(x, float) and not math.isfinite(x) for x in v):
            bad.append(f"{name}={list(v)}")
    return bad


def validate_run_config(cfg: RunConfig) -> None:
    """Checks that need no data or model: run first, so a typo costs a second, not a model load.

    The one place where a run config is checked; the library configs check their own fields when built.
    """
    bad = _nonfinite(cfg)
    if bad:
        raise ConfigError(f"{bad[0]}: NaN and inf are not valid settings. Fix: give a finite number")
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
    _need(cfg.threads is None or cfg.threads >= 1, "threads", cfg.threads, "must be >= 1 or null (automatic)",
          "e.g. threads=1")
    _need(0 <= cfg.max_skipped_ratio <= 1, "max_skipped_ratio", cfg.max_skipped_ratio, "must be in [0, 1]",
          "e.g. max_skipped_ratio=0.05")
    _need(cfg.divergence_ratio > 1, "divergence_ratio", cfg.divergence_ratio, "must be > 1",
          "e.g. divergence_ratio=10")
    o = cfg.optim
    _need(o.name == "adamw", "optim.name", repr(o.name), "only adamw is provided", "optim=adamw")
    _need(o.schedule in ("linear", "cosine", "constant"), "optim.schedule", repr(o.schedule),
          "use linear, cosine or constant", "optim.schedule=linear")
    _need(o.lr > 0, "optim.lr", o.lr, "must be > 0", "e.g. optim.lr=1e-3")
    _need(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas), "optim.betas",
          list(o.betas), "must be two numbers in [0, 1)", "e.g. optim.betas=[0.9,0.999]")
    _need(o.eps > 0, "optim.eps", o.eps, "must be > 0", "e.g. optim.eps=1e-8")
    _need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0", "e.g. optim.weight_decay=0")
    _need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1)", "e.g. 0.06")
    _need(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", o.max_grad_norm,
          "must be > 0 or null (no clipping)", "e.g. optim.max_grad_norm=1.0")
    m = cfg.method
    _need(m.lambda_lr_scale > 0, "method.lambda_lr_scale", m.lambda_lr_scale, "must be > 0 (1 = one learning rate)",
          "e.g. method.lambda_lr_scale=10")
    _need(m.lambda_lr_scale == 1 or m.kind == "adalora", "method.lambda_lr_scale", m.lambda_lr_scale,
          f"scales AdaLoRA's Λ, and method.kind={m.kind!r} has no Λ in the main optimizer",
          "drop it, or use method=adalora_lambda_lr")
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
    if cfg.device.startswith("mps"):
        import torch

        _need(torch.backends.mps.is_available(), "device", cfg.device, "no Apple MPS device is available here",
              "device=auto or device=cpu")
    if cfg.task.name == "planted_rank":
        pl = cfg.task.planted
        for name in ("dim", "hidden", "n_blocks", "n_train", "n_eval"):
            v = getattr(pl, name)
            _need(isinstance(v, int) and v >= 1, f"task.planted.{name}", v, "must be an integer >= 1",
                  f"e.g. task.planted.{name}={getattr(PlantedConfig(), name)}")
        _need(pl.delta_scale > 0, "task.planted.delta_scale", pl.delta_scale, "must be > 0",
              "e.g. task.planted.delta_scale=1.0")
        cap = min(pl.dim, pl.hidden)
        for module, r in (dict(pl.planted) or {"(the default pattern, 4 at most)": 4}).items():
            _need(isinstance(r, int) and 0 <= r <= cap, f"task.planted.planted.{module}", r,
                  f"a planted rank must be an integer in [0, min(dim, hidden) = {cap}]",
                  f"give a rank <= {cap}, or widen task.planted.dim / task.planted.hidden")
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


# Method fields that the loop reads itself, or turns into a library field of another name.
_LOOP_FIELDS = {"name", "kind", "target_r", "init_r_ratio", "init_r", "target_modules", "modules_to_save",
                "compact", "tinit", "tfinal", "budget_matched", "grow_from", "grow_until", "lambda_lr_scale"}


def _library_class(kind: str):
    from adalora.config import AdaLoRAConfig, IncreLoRAConfig, LoRAConfig, SoRAConfig

    classes = {"lora": LoRAConfig, "adalora": AdaLoRAConfig, "sora": SoRAConfig, "increlora": IncreLoRAConfig}
    if kind not in (*classes, "full"):
        raise ConfigError(f"method.kind={kind!r}: expected lora, adalora, sora, increlora or full")
    return classes.get(kind)


def build_method_config(m: MethodConfig, model: ModelConfig, total_steps: int, n_modules: int | None = None) -> Any:
    """The library config for a method (None for full fine-tuning); the library validates its own fields.

    ``n_modules``: the number of adapted matrices, once known (IncreLoRA's ``grow_until`` needs it)."""
    cls = _library_class(m.kind)
    if cls is None:
        return None
    if not isinstance(m.target_r, int) or m.target_r < 1:
        raise ConfigError(f"method.target_r={m.target_r}: the budget (LoRA rank / final average rank) must be an "
                          "integer >= 1. Fix: e.g. method.target_r=8")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for f in dataclasses.fields(MethodConfig):
        v = getattr(m, f.name)
        if f.name in _LOOP_FIELDS or v is None:
            continue
        if f.name in names:  # a preset that sweeps several methods sets each one's fields: the others ignore them
            kwargs[f.name] = v
    targets = m.target_modules if m.target_modules is not None else model.target_modules
    if not isinstance(targets, str) and len(targets) == 1 and str(targets[0]).lower() == "all-linear":
        targets = "all-linear"  # a YAML list of the one keyword
    kwargs["target_modules"] = targets if isinstance(targets, str) else list(targets)
    kwargs["modules_to_save"] = list(m.modules_to_save if m.modules_to_save is not None else model.modules_to_save)
    if m.kind == "lora":
        return cls(r=m.target_r, **kwargs)
    kwargs["total_steps"] = total_steps
    if m.kind == "sora":
        if m.lambda_schedule is not None and m.lambda_stage_steps is None:  # ours: the stages fill the run
            kwargs["lambda_stage_steps"] = max(1, total_steps // (m.lambda_num or 10))
        if m.budget_matched:
            kwargs["target_r"] = m.target_r
            kwargs["tfinal"] = resolve_schedule_steps(m.tfinal if m.tfinal is not None else 0.0, total_steps,
                                                      "tfinal")
        start = max(m.target_r, int(round(m.init_r_ratio * m.target_r))) if m.budget_matched else m.target_r
        return cls(r=m.init_r or start, **kwargs)
    if m.kind == "increlora":
        if m.grow_from is not None:
            kwargs["init_r"] = m.grow_from
        if m.tinit is not None:
            kwargs["tinit"] = resolve_schedule_steps(m.tinit, total_steps, "tinit")
        if m.delta_t is None and m.grow_until is not None and n_modules:
            from adalora.increlora import rounds_needed

            probe = cls(target_r=m.target_r, **kwargs)
            rounds = rounds_needed(probe.init_r * n_modules, m.target_r * n_modules, n_modules, probe.top_h,
                                   probe.rank_step)
            end = resolve_schedule_steps(m.grow_until, total_steps, "grow_until")
            kwargs["delta_t"] = max(1, (end - probe.tinit) // max(1, rounds))
        return cls(target_r=m.target_r, **kwargs)
    init_r = m.init_r if m.init_r is not None else max(m.target_r, int(round(m.init_r_ratio * m.target_r)))
    tinit = resolve_schedule_steps(m.tinit if m.tinit is not None else 0, total_steps, "tinit")
    tfinal = resolve_schedule_steps(m.tfinal if m.tfinal is not None else 0, total_steps, "tfinal")
    if m.prune is not False and tinit + tfinal >= total_steps:
        raise ConfigError(f"method.tinit + method.tfinal = {tinit} + {tfinal} steps leave no budget-decreasing phase "
                          f"in {total_steps} steps. Fix: give them as fractions (e.g. tinit=0.1 tfinal=0.4) or "
                          "train longer")
    return cls(init_r=init_r, target_r=m.target_r, tinit=tinit, tfinal=tfinal, **kwargs)
