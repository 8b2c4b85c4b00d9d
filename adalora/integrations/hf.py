"""Drive an adaptive-rank method (AdaLoRA, SoRA, IncreLoRA) from ``transformers.Trainer``.

    adapters = inject_method(model, cfg)                        # cfg.total_steps == TrainingArguments.max_steps
    ctrl = make_controller(adapters, cfg, lr=args.learning_rate)  # RankAllocator, SoRAGates or RankGrower
    trainer = AdaLoRATrainer(model=model, args=args, train_dataset=ds, allocator=ctrl)   # callback + loss term
    # AdaLoRA also as a one-liner, without the regularizer:  Trainer(..., callbacks=[AdaLoRACallback(ctrl)])

Where the Trainer (transformers 5.x, ``Trainer._run_epoch``) calls us, once per optimizer step::

    for each micro-batch: training_step (compute_loss -> backward)
    clip -> on_pre_optimizer_step -> optimizer.step() -> on_optimizer_step -> lr_scheduler.step()
         -> model.zero_grad() -> state.global_step += 1 -> on_step_end -> log / save / evaluate

``on_optimizer_step`` therefore sees the summed gradients of the whole accumulated batch, before they are zeroed,
and ``state.global_step`` still counts the optimizer steps *before* this one: the controller gets
``t = state.global_step + 1``, i.e. t = 1..max_steps, once per optimizer step whatever
``gradient_accumulation_steps`` is. The Trainer clips every parameter of the model, SoRA's gates included.

What each method needs from the Trainer, and who does it:

- SoRA: its gates (``lora_E``) are trained by ``SoRAGates`` and must stay out of the Trainer's optimizer.
  ``AdaLoRATrainer.create_optimizer`` leaves them out; with a plain ``Trainer`` (or ``optimizers=``) the callback
  refuses an optimizer that holds them. ``set_lr`` gets the main group's lr in ``on_pre_optimizer_step``.
- IncreLoRA: ``attach_optimizer`` with the Trainer's (inner torch) optimizer; each growth round adds a param
  group, and the callback then extends the Trainer's ``LambdaLR`` (every ``lr_scheduler_type`` but
  ``reduce_lr_on_plateau``) so that it drives the new groups on the main schedule; ``set_lr`` then applies the
  restart warm-up before each optimizer step. Resuming after a growth round needs ``AdaLoRATrainer``: it restores
  the grower before the Trainer loads the weights and the optimizer (which hold the grown parts).
  Not supported: more than one process (``DistributedDataParallel`` cannot take the Parameters a round adds: train
  with ``adalora.distributed`` and your own loop, which re-wraps the model).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from transformers import Trainer, TrainerCallback

from .. import adaptive, distributed
from ..adaptive import AdaptiveMethod
from ..allocator import RankAllocator, StepInfo
from ..checkpoint import atomic_write
from ..config import SoRAConfig
from ..increlora import RankGrower
from ..sora import SoRAGates

logger = logging.getLogger(__name__)

STATE_NAME = "adalora_allocator.pt"  # the controller's state inside each Trainer checkpoint folder


def _inner(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _planned_steps(ctrl) -> int | None:
    """The number of optimizer steps the method's schedule is built for (None: it has no fixed length)."""
    cfg = ctrl.cfg
    if isinstance(ctrl, RankAllocator):
        return cfg.total_steps if ctrl.prune else None
    if isinstance(ctrl, SoRAGates):
        if cfg.lambda_schedule is not None:  # the main run, then the sparsifying scheduler's later stages
            return cfg.total_steps + (cfg.lambda_num - 1) * cfg.lambda_stage_steps
        return cfg.total_steps if cfg.target_r is not None else None
    return cfg.total_steps  # IncreLoRA: the growth plan and the restart warm-up


class AdaLoRACallback(TrainerCallback):
    """Calls ``allocator.step(t)`` after every optimizer step of a ``transformers.Trainer``.

    ``allocator``: the method's controller, a ``RankAllocator`` (AdaLoRA), ``SoRAGates`` (SoRA) or ``RankGrower``
    (IncreLoRA); any ``adalora.adaptive.AdaptiveMethod``.

    - ``on_train_begin`` checks that ``state.max_steps`` is the number of steps the method's schedule is built for
      (``cfg.total_steps``; SoRA's sparsifying scheduler adds its later stages), that the controller drives adapters
      of the model being trained and was built with the optimizer's peak learning rate, and attaches the
      optimizer (IncreLoRA).
    - ``on_pre_optimizer_step`` passes the main group's learning rate to ``adaptive.set_lr`` (SoRA's gates,
      IncreLoRA's restart warm-up).
    - ``on_optimizer_step`` steps the controller with the optimizer-step count t = 1..max_steps and, when the
      step added param groups (IncreLoRA), extends the Trainer's lr scheduler to them.
    - ``log_ranks``: the Trainer's logs get ``adalora_budget`` (the controller's ``budget``) and
      ``adalora_kept_rank`` (the rank in use now, summed; one host sync per log).
    - ``save_state``: the controller's ``state_dict()`` is written into every Trainer checkpoint folder
      (``adalora_allocator.pt``) and restored by ``trainer.train(resume_from_checkpoint=...)``, so a resumed run
      continues the same schedule with the same scores.

    The method's loss term (AdaLoRA / IncreLoRA: the orthogonal regularizer; SoRA: the L1 penalty on the gates)
    belongs to the loss, which a callback cannot change: use ``AdaLoRATrainer`` (or add ``callback.regularizer()``
    to the loss in your own ``compute_loss``). If the method has one and nobody calls ``regularizer()``, the first
    optimizer step warns.
    """

    def __init__(self, allocator: AdaptiveMethod, log_ranks: bool = True, save_state: bool = True):
        if not isinstance(allocator, AdaptiveMethod) or not hasattr(allocator, "cfg"):
            raise TypeError(f"AdaLoRACallback needs a RankAllocator, SoRAGates or RankGrower, got "
                            f"{type(allocator).__name__}")
        self.allocator = allocator
        self.log_ranks = log_ranks
        self.save_state = save_state
        self.last_info: StepInfo | None = None
        self.regularizer_calls = 0
        self.optimizer: torch.optim.Optimizer | None = None  # the torch optimizer the controller is attached to
        self._version = adaptive.structure_version(allocator)
        self._warned_reg = False

    # ------------------------------------------------------------------------------------------ loss and optimizer
    def regularizer(self) -> torch.Tensor | None:
        """The method's extra loss term, weight included (``adaptive.regularization``; None: nothing to add)."""
        self.regularizer_calls += 1
        return adaptive.regularization(self.allocator)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the controller the Trainer's optimizer (IncreLoRA adds its param groups to it). Refuses one that
        holds parameters the controller trains itself (SoRA's gates)."""
        inner = _inner(optimizer)
        held = {id(p) for g in inner.param_groups for p in g["params"]}
        own = [p for p in adaptive.own_parameters(self.allocator) if id(p) in held]
        if own:
            raise ValueError(f"the Trainer's optimizer holds {len(own)} parameters that "
                             f"{type(self.allocator).__name__} trains itself (SoRA's gates, lora_E), so they "
                             "would be updated twice. Fix: use AdaLoRATrainer(..., allocator=...), which leaves "
                             "them out, or pass optimizers=(an optimizer without adaptive.own_parameters(ctrl), "
                             "its scheduler)")
        adaptive.attach_optimizer(self.allocator, inner)
        self.optimizer = inner

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        ctrl = self.allocator
        cfg = ctrl.cfg
        planned = _planned_steps(ctrl)
        if planned is not None and planned != state.max_steps:
            fix = planned - cfg.total_steps
            raise ValueError(
                f"{type(ctrl).__name__}'s schedule is built for {type(cfg).__name__}.total_steps={cfg.total_steps} "
                f"optimizer steps{f' + {fix} of later stages' if fix else ''}, but the Trainer will run "
                f"state.max_steps={state.max_steps} (TrainingArguments.max_steps={args.max_steps}, num_train_epochs="
                f"{args.num_train_epochs}, gradient_accumulation_steps={args.gradient_accumulation_steps}). Fix: "
                f"build the config with total_steps={state.max_steps - fix}, or set TrainingArguments(max_steps="
                f"{planned}).")
        if model is not None:
            mods = {id(m) for m in model.modules()}
            foreign = [n for n, a in ctrl.adapters.items() if id(a) not in mods]
            if foreign:
                raise ValueError(f"the controller's adapters {foreign[:3]} are not modules of the model being "
                                 "trained: inject the adapters into the same model object that you pass to the Trainer")
        if isinstance(ctrl, RankGrower) and not ctrl.done and args.world_size > 1:
            raise ValueError(f"IncreLoRA under a distributed Trainer (world_size={args.world_size}) is not supported: "
                             "each growth round adds Parameters that the Trainer's DistributedDataParallel wrapper "
                             "does not know. Train in one process, or with your own loop and adalora.distributed "
                             "(wrap_ddp again after each round)")
        if isinstance(ctrl, SoRAGates) and args.fp16:
            raise ValueError("SoRA with fp16=True is not supported: the gates are outside the Trainer's optimizer, so "
                             "its GradScaler does not unscale their gradients. Use bf16=True or float32")
        if optimizer is not None:
            self._check_lr(_inner(optimizer))
        if state.global_step > 0 and ctrl.last_step != state.global_step:  # resuming from a Trainer checkpoint
            self._restore(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), state.global_step)
        elif state.global_step == 0 and ctrl.last_step > 0:
            raise ValueError(f"the controller is already at step {ctrl.last_step} but training starts at step 1: "
                             "build a fresh model and controller for a new run (or resume_from_checkpoint)")
        if optimizer is not None:
            self.attach(optimizer)
        self._version = adaptive.structure_version(ctrl)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.optimizer is not None:  # the lr the Trainer's scheduler set for this step
            adaptive.set_lr(self.allocator, float(self.optimizer.param_groups[0]["lr"]))

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        # global_step is incremented after this event (Trainer._run_epoch), so this is optimizer step global_step + 1
        t = state.global_step + 1
        if self.last_info is None and not self._warned_reg and self.regularizer_calls == 0:
            self._warn_without_regularizer()  # the first step's losses are computed by now
        info = self.allocator.step(t)
        distributed.sync_controller(self.allocator, info)  # under DDP every rank holds rank 0's decision
        adaptive.zero_grad(self.allocator)
        if adaptive.structure_version(self.allocator) != self._version:
            self._version = adaptive.structure_version(self.allocator)
            self._extend_scheduler(lr_scheduler)
        self.last_info = info

    def log_fields(self) -> dict[str, int]:
        """What ``on_log`` adds to the Trainer's logs: the controller's budget and the rank in use now (summed)."""
        ctrl = self.allocator
        return {"adalora_budget": int(ctrl.budget), "adalora_kept_rank": int(sum(ctrl.rank_pattern().values()))}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_ranks or logs is None or "loss" not in logs:  # training logs only, not eval metrics
            return
        fields = self.log_fields()
        logs.update(fields)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(fields)  # the Trainer appended a copy of logs before calling on_log

    def on_save(self, args, state, control, **kwargs):
        if not self.save_state or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):  # e.g. a hyperparameter-search run folder: say so instead of guessing
            logger.warning("AdaLoRACallback: checkpoint folder %s not found; controller state not saved", folder)
            return
        state_dict = self.allocator.state_dict()
        atomic_write(os.path.join(folder, STATE_NAME), lambda tmp: torch.save(state_dict, tmp))

    def on_train_end(self, args, state, control, **kwargs):
        if self.log_ranks:
            logger.info("AdaLoRACallback: final rank pattern %s", self.allocator.rank_pattern())

    # ------------------------------------------------------------------------------------------ helpers
    def _check_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """SoRA's gates and IncreLoRA's restart warm-up scale the main lr by the controller's peak ``base_lr``."""
        ctrl = self.allocator
        uses = isinstance(ctrl, SoRAGates) or (isinstance(ctrl, RankGrower) and ctrl.cfg.restart_warmup is not None)
        if not uses:
            return
        group = optimizer.param_groups[0]
        peak = float(group.get("initial_lr", group["lr"]))  # the scheduler keeps the peak as initial_lr
        if ctrl.base_lr is None or abs(ctrl.base_lr - peak) > 1e-12 * peak:
            raise ValueError(f"{type(ctrl).__name__} was built with lr={ctrl.base_lr} but the Trainer's optimizer "
                             f"peaks at lr={peak}. Fix: build it with make_controller(adapters, cfg, lr={peak})")

    def _extend_scheduler(self, lr_scheduler) -> None:
        """Param groups added mid-run (an IncreLoRA round): the Trainer's LambdaLR drives them on the main schedule
        (``set_lr`` then applies their restart warm-up before each step)."""
        if lr_scheduler is None or self.optimizer is None:
            return
        inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler
        extra = len(self.optimizer.param_groups) - len(getattr(inner, "base_lrs", ()))
        if extra <= 0:
            return
        if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
            raise RuntimeError(f"{type(self.allocator).__name__} added {extra} param groups at step "
                               f"{self.allocator.last_step}, and the Trainer's {type(inner).__name__} cannot take "
                               "them. Fix: use a LambdaLR schedule (every lr_scheduler_type but reduce_lr_on_plateau)")
        inner.base_lrs.extend([inner.base_lrs[0]] * extra)
        inner.lr_lambdas.extend([inner.lr_lambdas[0]] * extra)

    def _warn_without_regularizer(self) -> None:
        with torch.no_grad():
            if adaptive.regularization(self.allocator) is None:
                return
        cfg = self.allocator.cfg
        what, weight = (("the L1 penalty on the gates", f"l1_weight={cfg.l1_weight}") if isinstance(cfg, SoRAConfig)
                        else ("the orthogonal regularizer", f"orth_reg_weight={cfg.orth_reg_weight}"))
        warnings.warn(f"AdaLoRACallback: {what} is not in the loss ({weight}). Use AdaLoRATrainer(..., allocator=...), "
                      f"add callback.regularizer() in your compute_loss, or set {weight.split('=')[0]}=0.",
                      stacklevel=3)
        self._warned_reg = True

    def restore(self, folder: str | os.PathLike) -> bool:
        """Load the controller's state from a Trainer checkpoint ``folder``, if it holds one; return whether it did.
        ``AdaLoRATrainer.train`` calls it for IncreLoRA before the Trainer loads the (grown) weights."""
        path = os.path.join(folder, STATE_NAME)
        if not os.path.exists(path):
            return False
        self.allocator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("AdaLoRACallback: controller state restored from %s (step %d)", path, self.allocator.last_step)
        return True

    def _restore(self, folder: str, step: int) -> None:
        if isinstance(self.allocator, RankGrower):
            raise ValueError(f"resuming IncreLoRA at optimizer step {step} needs AdaLoRATrainer(...).train("
                             "resume_from_checkpoint=...): it restores the grower before the Trainer loads the grown "
                             "weights and the optimizer's param groups")
        if not self.restore(folder):
            raise ValueError(
                f"resuming at optimizer step {step} but the controller is at step {self.allocator.last_step} and "
                f"{os.path.join(folder, STATE_NAME)} does not exist: the checkpoint was not written with "
                "AdaLoRACallback(save_state=True) in args.output_dir. Load the controller's state yourself "
                "(load_state_dict) before trainer.train(), or restart from step 0.")


class AdaLoRATrainer(Trainer):
    """``transformers.Trainer`` with an adaptive-rank method: adds the ``AdaLoRACallback`` and the method's loss term.

    ``AdaLoRATrainer(model=..., args=..., train_dataset=..., allocator=ctrl)`` with ``ctrl`` a ``RankAllocator``,
    ``SoRAGates`` or ``RankGrower``; or pass your own ``AdaLoRACallback`` in ``callbacks`` (then ``allocator`` may be
    left out). The training loss becomes ``task loss + adaptive.regularization(ctrl)`` (AdaLoRA / IncreLoRA:
    orth_reg_weight · R(P, Q); SoRA: l1_weight · mean|g|); evaluation losses stay the task loss. Under gradient
    accumulation the term is added once per optimizer step in effect: it is scaled like the task loss of each
    micro-batch. The optimizer it builds leaves out the parameters the controller trains itself (SoRA's gates).
    """

    def __init__(self, *args, allocator: AdaptiveMethod | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        mine = [cb for cb in self.callback_handler.callbacks if isinstance(cb, AdaLoRACallback)]
        if len(mine) > 1:
            raise ValueError("AdaLoRATrainer got more than one AdaLoRACallback")
        if mine:
            if allocator is not None and mine[0].allocator is not allocator:
                raise ValueError("AdaLoRATrainer: `allocator` differs from the AdaLoRACallback's allocator")
            self.adalora_callback = mine[0]
        elif allocator is not None:
            self.adalora_callback = AdaLoRACallback(allocator)
            self.add_callback(self.adalora_callback)
        else:
            raise ValueError("AdaLoRATrainer needs allocator=<RankAllocator, SoRAGates or RankGrower> or an "
                             "AdaLoRACallback in callbacks")

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        own = {id(p) for p in adaptive.own_parameters(self.adalora_callback.allocator)}
        if fresh and own:  # the controller trains these itself (SoRA's gates)
            for group in _inner(optimizer).param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in own]
        self.adalora_callback.attach(optimizer)  # before the Trainer loads a checkpoint's optimizer state
        return optimizer

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        ctrl = self.adalora_callback.allocator
        folder = resume_from_checkpoint
        if folder is True:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir)
        if isinstance(ctrl, RankGrower) and isinstance(folder, (str, os.PathLike)):
            # the grower grows the adapters to the saved parts first, so that the weights and the optimizer fit
            if not self.adalora_callback.restore(folder):
                raise ValueError(f"resuming IncreLoRA from {folder}, which holds no {STATE_NAME}: the checkpoint was "
                                 "not written with AdaLoRACallback(save_state=True)")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether ``training_step`` leaves the loss undivided by the accumulation steps (same rule as there)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        reg = self.adalora_callback.regularizer() if model.training else None
        if reg is not None:
            if self._loss_scaled_for_ga(num_items_in_batch):  # the task loss is already a share of the whole batch
                reg = reg / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            loss = loss + reg.to(device=loss.device, dtype=loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        cb = self.adalora_callback
        if cb.log_ranks and "loss" in logs:  # before the reporters (wandb, tensorboard) see the logs
            logs.update(cb.log_fields())
        super().log(logs, *args, **kwargs)
