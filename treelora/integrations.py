"""TreeLoRA inside training code you already have: a Hugging Face ``transformers.Trainer`` (or your own loop).

A ``TrainerCallback`` alone sees neither the loss nor the optimizer step, so :class:`TreeLoRACallback` plugs into the
three places the Trainer offers::

    treelora = TreeLoRACallback(peft_model, TreeLoRAConfig.paper())
    trainer = Trainer(
        model=peft_model,
        args=args,                                   # max_grad_norm=0: see "Clipping" below
        train_dataset=task_0,
        callbacks=[treelora],                        # task boundaries: one train() call = one task
        compute_loss_func=treelora.compute_loss,     # the task loss, recorded for the regularizer's scale
        optimizers=(treelora.optimizer(args), None), # TreeLoRA's regularizer, signature and (sparse) AdamW step
    )
    trainer.train()                                  # task 0
    trainer.train_dataset = task_1
    trainer.train()                                  # task 1: regularized toward task 0, bank holds 2 signatures

What happens per optimizer step (once, whatever ``gradient_accumulation_steps``): the Trainer runs forward and
backward on every micro-batch of the step with the plain task loss (under DDP the gradients are averaged in the last
backward); then :meth:`TreeLoRAOptimizer.step` calls ``before_backward`` with the accumulated loss value (TreeLoRA
selects a previous task per layer and builds its penalty, which depends only on the adapters and that value), adds
the penalty's gradient with a backward of the penalty alone, calls ``after_backward`` (the signature sees the
accumulated, averaged gradient, once per optimizer step) and ``step`` (the AdamW step, sparse when
``update_density`` < 1) with the learning rate the Trainer's scheduler set. The result is the treelora harness's step
on the accumulated batch: the penalty's gradient does not depend on the data, so adding it once after the data
gradients equals adding it to the loss before the backward.

Under DDP the penalty is added after the gradients were averaged, so it must be the same on every rank: the
``official`` regularizer scales it by the loss, which is therefore reduced across ranks first (one scalar collective
per optimizer step, only for that regularizer; a sum when the Trainer normalises by the global token count,
``average_tokens_across_devices``, else a mean). At the end of each task the state is compared across ranks
(:func:`treelora.cl.distributed.check_identical_across_ranks`).

Clipping: the Trainer clips (``max_grad_norm``, default 1.0) the data gradients before the optimizer step, hence
before TreeLoRA observes them and without the penalty. The treelora harness observes the unclipped gradient and clips
data + penalty; to do the same, pass ``TrainingArguments(max_grad_norm=0)`` and ``treelora.optimizer(args,
max_grad_norm=1.0)``.

Not supported (refused with an error): resuming a Trainer checkpoint in the middle of a task (save
:meth:`TreeLoRACallback.state_dict` between tasks instead), ``adapter='stacked'`` (new parameters each task, which a
wrapped model and the optimizer would not see), FSDP layouts other than a sharded frozen base with replicated
adapters, and fp16 loss scaling.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from treelora.cl.config import TreeLoRAConfig
from treelora.cl.distributed import check_fsdp, check_identical_across_ranks, mean_across_ranks, num_ranks
from treelora.cl.method import OptimizerConfig
from treelora.cl.treelora import TreeLoRA

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError("treelora.integrations needs the transformers package: pip install 'treelora[hf]'") from err

__all__ = ["TreeLoRACallback", "TreeLoRAOptimizer", "causal_lm_loss", "find_lora_layers"]

LossFn = Callable[..., torch.Tensor]


def _is_lora_layer(module: nn.Module) -> bool:
    A, B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter):
        return True
    return isinstance(A, nn.ModuleDict) and isinstance(B, nn.ModuleDict) and len(A) > 0


def find_lora_layers(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers of ``model`` in module order (shallowest first for a layer stack): treelora's ``LoRALinear``
    and PEFT's LoRA layers (``get_peft_model`` with or without ``treelora.peft.register()``)."""
    layers = [m for m in model.modules() if _is_lora_layer(m)]
    if not layers:
        raise ValueError(
            "model has no LoRA layers: wrap it with peft.get_peft_model(model, LoraConfig(...)) or "
            "treelora.nn.inject_lora(model, ...) first"
        )
    return layers


def causal_lm_loss(outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None) -> torch.Tensor:
    """Next-token cross-entropy, summed over the predicted tokens (labels != -100, shifted by one) and divided by
    ``num_items_in_batch`` (the Trainer's count over the whole accumulated, and with ``average_tokens_across_devices``
    global, batch) or, without it, by this micro-batch's count.

    Args:
        outputs: the model's output (``.logits`` / ``["logits"]`` / first element), logits (batch, seq, vocab).
        labels: (batch, seq) token ids, -100 where no loss is taken.
        num_items_in_batch: the Trainer's token count (int or 0-d tensor), or None.
    """
    if labels is None:
        raise ValueError(
            "labels is None: the batches must carry 'labels' (for a causal LM, usually a copy of input_ids with "
            "-100 on padding)"
        )
    logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs[0]
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(shift_logits.device)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (shift_labels != -100).sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


class TreeLoRAOptimizer(torch.optim.Optimizer):
    """The optimizer the Trainer steps: TreeLoRA's per-step hooks and AdamW (see the module docstring).

    Its ``param_groups`` hold the method's parameters with the learning rate the Trainer's scheduler updates; the
    AdamW moments live in the method (``TreeLoRACallback.state_dict()``), so this object's own ``state`` stays empty.
    Build it with :meth:`TreeLoRACallback.optimizer`.
    """

    def __init__(self, callback: TreeLoRACallback, max_grad_norm: float | None = None) -> None:
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {max_grad_norm!r}")
        self.callback = callback
        self.max_grad_norm = max_grad_norm
        super().__init__(callback.method.parameters(), {"lr": callback.method.optim.lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            raise ValueError("closure is not supported: TreeLoRA's step uses the gradients already computed")
        self.callback._optimizer_step(self.param_groups[0]["lr"], self.max_grad_norm)


class TreeLoRACallback(TrainerCallback):
    """TreeLoRA's regularized loss, (sparse) step and per-task bank inside a ``transformers.Trainer``.

    Each ``trainer.train()`` call is one task: ``on_train_begin`` starts it (``begin_task`` with the Trainer's steps
    per epoch and epochs), ``on_epoch_begin`` marks epochs, ``on_train_end`` stores its signature in the bank, rebuilds
    the tree and, on several ranks, checks that every rank holds the same state. Pass :meth:`compute_loss` as the
    Trainer's ``compute_loss_func`` and :meth:`optimizer` as its optimizer. In your own loop (plain PyTorch,
    accelerate) call :meth:`begin_task`, :meth:`record_loss` for each micro-batch's loss, ``optimizer.step()`` once per
    optimizer step, :meth:`end_task`; or drive ``callback.method``'s hooks directly as the treelora harness does.

    Args:
        model: the model with LoRA layers (a PEFT model, or one with ``treelora.nn.LoRALinear`` layers).
        config: :class:`treelora.cl.TreeLoRAConfig` (default: the paper preset).
        layers: the LoRA layers, shallowest first (default: :func:`find_lora_layers`).
        loss_fn: ``loss_fn(outputs, labels, num_items_in_batch) -> 0-d loss``, following the Trainer's
            ``compute_loss_func`` contract (normalised over the whole accumulated batch by ``num_items_in_batch``).
            Default: :func:`causal_lm_loss`.

    Trainable parameters of ``model`` outside the LoRA layers (PEFT's ``modules_to_save``, a classifier head) are
    trained densely by the same AdamW step.

    Attributes:
        method: the :class:`treelora.cl.TreeLoRA` instance (bank, tree, search, ``last_selection``).
        last_penalty: the regularizer's value at the latest optimizer step (0-d tensor; None before the first).
        loss_reduction: how the recorded loss is combined across ranks for the ``official`` regularizer's scale:
            ``"mean"`` (each rank's loss is the mean over its own shard; the default for own loops) or ``"sum"``
            (each rank's loss is already divided by the global count; set by ``on_train_begin`` when the Trainer
            averages tokens across devices).
        fingerprints: the state fingerprints of the latest task end (checked across ranks when distributed).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TreeLoRAConfig | None = None,
        layers: list[nn.Module] | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        config = TreeLoRAConfig.paper() if config is None else config
        if isinstance(config, TreeLoRAConfig) and config.adapter == "stacked":
            raise ValueError(
                "config.adapter='stacked' is not supported by TreeLoRACallback: it creates new parameters every task, "
                "which a model already wrapped by the Trainer (DDP) and its optimizer would not see"
            )
        self.model = model
        self.method = TreeLoRA(find_lora_layers(model) if layers is None else list(layers), config)
        adapters = {id(p) for p in self.method.adapter_parameters()}
        self.method.add_parameters([p for p in model.parameters() if p.requires_grad and id(p) not in adapters])
        self.loss_fn = causal_lm_loss if loss_fn is None else loss_fn
        self.last_penalty: torch.Tensor | None = None
        self.fingerprints: dict[str, str] | None = None
        self._loss: torch.Tensor | None = None
        self.loss_reduction = "mean"
        self._epoch = 0
        self._in_task = False

    # --- the pieces the Trainer is given ---------------------------------------------------------------------------

    def compute_loss(self, outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None) -> torch.Tensor:
        """``compute_loss_func`` for the Trainer: ``loss_fn``'s task loss, recorded for the regularizer's scale."""
        loss = self.loss_fn(outputs, labels, num_items_in_batch=num_items_in_batch)
        self.record_loss(loss)
        return loss

    def record_loss(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss (as it goes into ``backward``, already divided for gradient accumulation) to the
        current optimizer step's loss value. No host synchronisation."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss must be a 0-d tensor, got {loss!r}")
        # A copy: the Trainer scales the returned loss in place (``loss *= num_processes`` under DDP), which would
        # change a detached view of it.
        value = loss.detach().reshape(()).clone()
        self._loss = value if self._loss is None else self._loss + value

    def optimizer(self, args: Any = None, max_grad_norm: float | None = None, **overrides: Any) -> TreeLoRAOptimizer:
        """The optimizer to pass as ``Trainer(optimizers=(treelora.optimizer(args), None))``.

        AdamW settings come from ``args`` (``TrainingArguments``: ``learning_rate``, ``adam_beta1``, ``adam_beta2``,
        ``adam_epsilon``, ``weight_decay``) and then from ``overrides`` (``lr``, ``betas``, ``eps``,
        ``weight_decay``). ``max_grad_norm``: clip data + penalty gradients after TreeLoRA observed them (set the
        Trainer's own ``max_grad_norm=0`` then). The moments persist in the method across tasks and optimizers.
        """
        settings: dict[str, Any] = {}
        if args is not None:
            settings = {
                "lr": float(args.learning_rate),
                "betas": (float(args.adam_beta1), float(args.adam_beta2)),
                "eps": float(args.adam_epsilon),
                "weight_decay": float(args.weight_decay),
            }
        known = set(OptimizerConfig.__dataclass_fields__)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown optimizer settings {unknown}; known: {sorted(known)}")
        settings.update(overrides)
        for name, value in settings.items():
            setattr(self.method.optim, name, value)
        return TreeLoRAOptimizer(self, max_grad_norm)

    # --- task boundaries (also for own loops) ----------------------------------------------------------------------

    def begin_task(self, steps_per_epoch: int, epochs: int = 1, task_id: int | None = None) -> None:
        """Start a task of ``epochs`` epochs of ``steps_per_epoch`` optimizer steps (``task_id``: default the next)."""
        self._loss = None
        self._epoch = 0
        self.method.begin_task(self.method.task_id + 1 if task_id is None else task_id, steps_per_epoch, epochs)
        self._in_task = True

    def end_task(self) -> None:
        """Store the task's signature, rebuild the tree and check the state across ranks."""
        if not self._in_task:
            raise RuntimeError("end_task() without begin_task(): no task is running")
        self._in_task = False
        self.method.end_task()
        self.fingerprints = check_identical_across_ranks(self.method, label=f"the end of task {self.method.task_id}")

    # --- Trainer events --------------------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0:
            raise RuntimeError(
                f"TreeLoRACallback cannot resume a task from a Trainer checkpoint (global_step {state.global_step}): "
                "its running signature and search statistics are not in the checkpoint. Restart the task from its "
                "beginning, restoring TreeLoRACallback.load_state_dict() saved at the previous task's end."
            )
        if getattr(args, "fp16", False):
            raise ValueError("fp16 loss scaling is not supported by TreeLoRACallback; use bf16=True or fp32")
        check_fsdp(self.method, kwargs.get("model"))
        self.loss_reduction = "sum" if getattr(args, "average_tokens_across_devices", False) else "mean"
        epochs = max(1, math.ceil(state.num_train_epochs))
        self.begin_task(max(1, math.ceil(state.max_steps / epochs)), epochs)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.method.begin_epoch(self._epoch)
        self._epoch += 1

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end_task()

    # --- the optimizer step ----------------------------------------------------------------------------------------

    def _loss_value(self) -> torch.Tensor:
        loss = self._loss
        needs_value = self.method.search is not None and self.method.config.regularizer == "official"
        if loss is None:
            if needs_value:
                raise RuntimeError(
                    "the official regularizer needs the step's loss value and none was recorded: pass "
                    "compute_loss_func=treelora.compute_loss to the Trainer (or call record_loss in your loop)"
                )
            return torch.zeros((), device=self.method.device)
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        world = num_ranks()
        if needs_value and world > 1:
            loss = mean_across_ranks(loss)
            if self.loss_reduction == "sum":
                loss = loss * world
        return loss

    def _optimizer_step(self, lr: float, max_grad_norm: float | None) -> None:
        method = self.method
        if not self._in_task:
            raise RuntimeError("no task is running: add the callback to the Trainer, or call begin_task() first")
        value = self._loss_value()
        self._loss = None
        with torch.enable_grad():
            total = method.before_backward(value)
            penalty = total - value
            if penalty.requires_grad:
                penalty.backward()
        self.last_penalty = penalty.detach()
        method.after_backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in method.parameters() if p.grad is not None], max_grad_norm)
        base = method.optim.lr
        method.optim.lr = lr
        try:
            method.step()
        finally:
            method.optim.lr = base

    # --- state -----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The method's state (bank, tree, search, moments, ...) to save between tasks."""
        return self.method.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)
