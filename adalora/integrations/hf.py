"""Drive AdaLoRA from ``transformers.Trainer``.

    adapters = inject_adapters(model, cfg)                      # cfg.total_steps == TrainingArguments.max_steps
    allocator = RankAllocator(adapters, cfg)
    trainer = AdaLoRATrainer(model=model, args=args, train_dataset=ds, allocator=allocator)   # callback + regularizer
    # or, without the orthogonal regularizer:  Trainer(..., callbacks=[AdaLoRACallback(allocator)])

Where the Trainer (transformers 5.x, ``Trainer._run_epoch``) calls us, once per optimizer step::

    for each micro-batch: training_step (compute_loss -> backward)
    clip -> on_pre_optimizer_step -> optimizer.step() -> on_optimizer_step -> lr_scheduler.step()
         -> model.zero_grad() -> state.global_step += 1 -> on_step_end -> log / save / evaluate

``on_optimizer_step`` therefore sees the summed gradients of the whole accumulated batch, before they are zeroed,
and ``state.global_step`` still counts the optimizer steps *before* this one: the allocator gets
``t = state.global_step + 1``, i.e. t = 1..max_steps, once per optimizer step whatever
``gradient_accumulation_steps`` is.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from transformers import Trainer, TrainerCallback

from ..allocator import RankAllocator, StepInfo
from ..checkpoint import atomic_write
from ..regularizers import orthogonal_regularization

logger = logging.getLogger(__name__)

STATE_NAME = "adalora_allocator.pt"  # the allocator's state inside each Trainer checkpoint folder


class AdaLoRACallback(TrainerCallback):
    """Calls ``allocator.step(t)`` after every optimizer step of a ``transformers.Trainer``.

    - ``on_train_begin`` checks that ``state.max_steps`` equals ``allocator.cfg.total_steps`` (the budget schedule is
      built for that many optimizer steps) and that the allocator drives adapters of the model being trained.
    - ``on_optimizer_step`` steps the allocator with the optimizer-step count t = 1..max_steps.
    - ``log_ranks``: the Trainer's logs get ``adalora_budget`` (the scheduled number of kept triplets) and
      ``adalora_kept_rank`` (the number currently kept, one host sync per log).
    - ``save_state``: the allocator's ``state_dict()`` is written into every Trainer checkpoint folder
      (``adalora_allocator.pt``) and restored by ``trainer.train(resume_from_checkpoint=...)``, so a resumed run
      continues the same schedule with the same importance scores.

    The orthogonal regularizer belongs to the loss, which a callback cannot change: use ``AdaLoRATrainer`` (or add
    ``callback.regularizer()`` to the loss in your own ``compute_loss``). With ``orth_reg_weight > 0`` and nobody
    calling ``regularizer()``, the first optimizer step warns.
    """

    def __init__(self, allocator: RankAllocator, log_ranks: bool = True, save_state: bool = True):
        if not isinstance(allocator, RankAllocator):
            raise TypeError(f"AdaLoRACallback needs a RankAllocator, got {type(allocator).__name__}")
        self.allocator = allocator
        self.log_ranks = log_ranks
        self.save_state = save_state
        self.last_info: StepInfo | None = None
        self.regularizer_calls = 0
        self._warned_reg = False

    # ------------------------------------------------------------------------------------------ regularizer
    def regularizer(self) -> torch.Tensor:
        """``orth_reg_weight * R(P, Q)`` over the allocator's adapters (0-dim tensor), in the config's form."""
        cfg = self.allocator.cfg
        self.regularizer_calls += 1
        return cfg.orth_reg_weight * orthogonal_regularization(self.allocator.adapters, form=cfg.orth_reg_form)

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        alloc = self.allocator
        cfg = alloc.cfg
        if alloc.prune and cfg.total_steps != state.max_steps:
            raise ValueError(
                f"AdaLoRA's budget schedule is built for AdaLoRAConfig.total_steps={cfg.total_steps} optimizer steps, "
                f"but the Trainer will run state.max_steps={state.max_steps} (TrainingArguments.max_steps="
                f"{args.max_steps}, num_train_epochs={args.num_train_epochs}, gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps}). Fix: build the config with total_steps={state.max_steps}, "
                f"or set TrainingArguments(max_steps={cfg.total_steps}).")
        if model is not None:
            mods = {id(m) for m in model.modules()}
            foreign = [n for n, a in alloc.adapters.items() if id(a) not in mods]
            if foreign:
                raise ValueError(f"the allocator's adapters {foreign[:3]} are not modules of the model being trained: "
                                 "inject_adapters() into the same model object that you pass to the Trainer")
        if state.global_step > 0 and alloc.last_step != state.global_step:  # resuming from a Trainer checkpoint
            self._restore(args, state)
        elif state.global_step == 0 and alloc.last_step > 0:
            raise ValueError(f"the allocator is already at step {alloc.last_step} but training starts at step 1: "
                             "build a fresh model and RankAllocator for a new run (or resume_from_checkpoint)")

    def on_optimizer_step(self, args, state, control, **kwargs):
        # global_step is incremented after this event (Trainer._run_epoch), so this is optimizer step global_step + 1
        t = state.global_step + 1
        if self.last_info is None and not self._warned_reg and self.regularizer_calls == 0 \
                and self.allocator.cfg.orth_reg_weight > 0:  # the first step's losses are computed by now
            warnings.warn(f"AdaLoRACallback: orth_reg_weight={self.allocator.cfg.orth_reg_weight} but the orthogonal "
                          "regularizer is not in the loss. Use AdaLoRATrainer(..., allocator=allocator), add "
                          "callback.regularizer() in your compute_loss, or set orth_reg_weight=0.", stacklevel=2)
            self._warned_reg = True
        info = self.allocator.step(t)
        self._sync(info)
        self.last_info = info

    def log_fields(self) -> dict[str, int]:
        """What ``on_log`` adds to the Trainer's logs: the scheduled budget and the rank kept now (summed)."""
        alloc = self.allocator
        return {"adalora_budget": int(alloc.budget), "adalora_kept_rank": int(sum(alloc.rank_pattern().values()))}

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
            logger.warning("AdaLoRACallback: checkpoint folder %s not found; allocator state not saved", folder)
            return
        state_dict = self.allocator.state_dict()
        atomic_write(os.path.join(folder, STATE_NAME), lambda tmp: torch.save(state_dict, tmp))

    def on_train_end(self, args, state, control, **kwargs):
        if self.log_ranks:
            logger.info("AdaLoRA final rank pattern: %s", self.allocator.rank_pattern())

    # ------------------------------------------------------------------------------------------ helpers
    def _restore(self, args, state) -> None:
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_NAME)
        if not os.path.exists(path):
            raise ValueError(
                f"resuming at optimizer step {state.global_step} but the allocator is at step "
                f"{self.allocator.last_step} and {path} does not exist: the checkpoint was not written with "
                "AdaLoRACallback(save_state=True) in args.output_dir. Load the allocator's state yourself "
                "(allocator.load_state_dict) before trainer.train(), or restart from step 0.")
        self.allocator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("AdaLoRACallback: allocator state restored from %s (step %d)", path, self.allocator.last_step)

    def _sync(self, info: StepInfo) -> None:
        """Under DDP every rank computes the same mask; adalora.distributed.sync_allocator makes sure of it."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        try:
            from .. import distributed
        except ImportError:
            return
        sync = getattr(distributed, "sync_allocator", None)
        if sync is not None:
            sync(self.allocator, info)


class AdaLoRATrainer(Trainer):
    """``transformers.Trainer`` with AdaLoRA: adds the ``AdaLoRACallback`` and the orthogonal regularizer.

    ``AdaLoRATrainer(model=..., args=..., train_dataset=..., allocator=allocator)``; or pass your own
    ``AdaLoRACallback`` in ``callbacks`` (then ``allocator`` may be left out). The training loss becomes
    ``task loss + orth_reg_weight * R(P, Q)`` (the regularizer in ``cfg.orth_reg_form``); evaluation losses stay the
    task loss. Under gradient accumulation R is added once per optimizer step in effect: it is scaled like the task
    loss of each micro-batch.
    """

    def __init__(self, *args, allocator: RankAllocator | None = None, **kwargs):
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
            raise ValueError("AdaLoRATrainer needs allocator=RankAllocator(...) or an AdaLoRACallback in callbacks")

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether ``training_step`` leaves the loss undivided by the accumulation steps (same rule as there)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        cb = self.adalora_callback
        if model.training and cb.allocator.cfg.orth_reg_weight > 0:
            reg = cb.regularizer()
            if self._loss_scaled_for_ga(num_items_in_batch):  # the task loss is already a share of the whole batch
                reg = reg / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            loss = loss + reg.to(device=loss.device, dtype=loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        cb = self.adalora_callback
        if cb.log_ranks and "loss" in logs:  # before the reporters (wandb, tensorboard) see the logs
            logs.update(cb.log_fields())
        super().log(logs, *args, **kwargs)
