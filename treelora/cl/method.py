"""The interface every continual-learning method implements, and the trainer's calling order (SPEC 8).

For each task ``k`` the trainer calls::

    method.begin_task(k, steps_per_epoch, epochs)
    method.prepare_task(objective)              # model in eval mode; may run the task's batches (no-op by default)
    for epoch in range(epochs):
        method.begin_epoch(epoch)
        for batch in loader:
            loss, extra = method.training_loss(batch, objective)   # default: objective.loss(batch), no extra
            loss = method.before_backward(loss + extra)  # may add a regularizer
            loss.backward()
            method.after_backward()                 # may read gradients (signatures, Fisher, ...)
            method.step()                           # the optimizer step (possibly sparse), then zero grads
    method.end_task()

The method owns its optimizer state (AdamW moments through :func:`treelora.ops.masked_adamw_`), so
``state_dict()`` / ``load_state_dict()`` capture everything needed to resume mid-stream. ``layers`` are the modules
returned by :func:`treelora.nn.inject_lora` (shallowest first) or PEFT LoRA layers; :func:`adapter_parameters`
reads the trainable A and B of either.

The batch seam: methods that need the batch and the model (a teacher's forward, a replay loss, input statistics
before a task) use the two hooks that receive an :class:`Objective` (the trainer's view of the data and the loss),
:meth:`ContinualMethod.prepare_task` and :meth:`ContinualMethod.training_loss`; both default to doing nothing beyond
the plain task loss, so methods that only read gradients never see them.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import torch
from torch import nn

from treelora import ops
from treelora.cl._checks import check_int


@dataclass
class OptimizerConfig:
    """AdamW settings shared by every method (decoupled weight decay, as ``torch.optim.AdamW``)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


class Objective(Protocol):
    """What a method's batch hooks may ask of the run: the trainer's data, loss and logits, without its internals.

    Attributes:
        kind: ``"classification"`` or ``"instruct"`` (the stream's kind).
        task: index of the task being trained (0 for joint training). rank, world_size: this process among several.
    """

    kind: str
    task: int
    rank: int
    world_size: int

    def train_size(self, task: int) -> int:
        """Number of training examples of ``task``."""
        ...

    def train_batches(self) -> list[list[tuple[int, int]]]:
        """The current task's first-epoch global training batches as ``(task, example)`` pairs: the same on every
        rank (not sharded)."""
        ...

    def batch(self, items: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """The training tensors of ``(task, example)`` pairs (any seen task), on the run's device."""
        ...

    def loss(self, batch: dict[str, Any], logits_of: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The batch's mean task loss (0-d; each row scored by its own task's classes, under the run's protocol) and,
        from the same forward, the logits of every row over the classes of each task in ``logits_of``: a list of
        (B, C_k) tensors (classification streams only; ValueError for an instruct stream)."""
        ...

    def eval_mode(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the model runs in eval mode (no dropout); training mode is restored after it."""
        ...


def adapter_parameters(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """The trainable ``(A, B)`` of a LoRA layer: A (r, in), B (out, r).

    Works for treelora's ``LoRALinear`` (parameters ``lora_A`` / ``lora_B``) and PEFT's LoRA layers (module dicts
    ``lora_A[name].weight`` / ``lora_B[name].weight``, using the active adapter).
    """
    A, B = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter):
        return A, B
    if isinstance(A, nn.ModuleDict) and isinstance(B, nn.ModuleDict):
        active = getattr(layer, "active_adapters", None) or list(A.keys())
        name = active[0]
        return A[name].weight, B[name].weight
    raise TypeError(
        f"{type(layer).__name__} is not a LoRA layer: expected lora_A/lora_B parameters (treelora.nn.LoRALinear) "
        "or PEFT's lora_A/lora_B module dicts"
    )


class ContinualMethod(abc.ABC):
    """The interface of a continual-learning method on LoRA layers; every method subclasses it.

    A subclass sets :attr:`name` and :attr:`label`, implements :meth:`before_backward` (the training loss, with the
    method's regularizer if it has one) and :meth:`step` (the parameter update), and overrides the other hooks only
    where it needs them. The hooks are called in the order of the module docstring; their defaults are stated on each.
    The base class holds what every method shares: the layers, the extra trainable parameters (task heads), the
    counters and the AdamW moments (:meth:`_adamw_step`), and their ``state_dict``.

    Options: :attr:`option_help` lists the keyword options :meth:`from_options` accepts (``--method-option`` on the
    command line, ``method_options`` of the trainer), and :meth:`check_options` validates them without any layer or
    model, so that a bad option is reported before a model is loaded.

    Args:
        layers: the LoRA layers, shallowest first.
        optimizer: AdamW settings for every trainable parameter.
    """

    #: registry key, lower case without separators (``treelora``, ``seqlora``, ``olora``); also saved in state_dict.
    name: ClassVar[str]
    #: how tables and plots name the method (``TreeLoRA``, ``O-LoRA``).
    label: ClassVar[str]
    #: option name -> help text of the keyword options :meth:`from_options` accepts (none by default).
    option_help: ClassVar[Mapping[str, str]] = {}
    #: True: the trainer trains once on the union of all tasks instead of task after task (joint training).
    joint: ClassVar[bool] = False

    def __init__(self, layers: Sequence[nn.Module], optimizer: OptimizerConfig | None = None) -> None:
        if not isinstance(getattr(type(self), "name", None), str) or not isinstance(
            getattr(type(self), "label", None), str
        ):
            raise TypeError(f"{type(self).__name__} must set the class attributes name and label")
        if len(layers) == 0:
            raise ValueError("layers is empty: pass the LoRA layers returned by treelora.nn.inject_lora")
        if optimizer is not None and not isinstance(optimizer, OptimizerConfig):
            raise TypeError(f"optimizer must be an OptimizerConfig, got {type(optimizer).__name__}")
        self.layers = list(layers)
        self.optim = optimizer or OptimizerConfig()
        self.extra: list[nn.Parameter] = []
        self.task_id = -1
        self.epoch = 0
        self.steps_per_epoch, self.epochs = 1, 1
        self.step_in_task = 0
        self.global_step = 0
        self._moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- options ---------------------------------------------------------------------------------------------------

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Validate keyword options without building anything. Default: every name must be in
        :attr:`option_help` (ValueError naming the unknown ones); subclasses add value checks (TypeError for a
        wrong type, ValueError for a wrong value)."""
        unknown = sorted(set(options) - set(cls.option_help))
        if unknown:
            known = ", ".join(cls.option_help) or "none"
            raise ValueError(f"{cls.label} has no option {', '.join(map(repr, unknown))} (its options: {known})")

    @classmethod
    def from_options(
        cls, layers: Sequence[nn.Module], optimizer: OptimizerConfig | None = None, **options: Any
    ) -> ContinualMethod:
        """Build the method from keyword options (validated by :meth:`check_options`). Default:
        ``cls(layers, optimizer, **options)``."""
        cls.check_options(options)
        return cls(layers, optimizer, **options)

    # --- parameters ----------------------------------------------------------------------------------------------

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Trainable LoRA parameters, layer by layer: [A_0, B_0, A_1, B_1, ...]."""
        return [p for layer in self.layers for p in adapter_parameters(layer) if p.requires_grad]

    def add_parameters(self, params: Sequence[nn.Parameter]) -> None:
        """Register extra trainable parameters (task heads, ...) updated densely with the same AdamW settings."""
        known = {id(p) for p in self.extra}
        self.extra.extend(p for p in params if id(p) not in known)

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter: the adapters, then the extra ones."""
        return self.adapter_parameters() + [p for p in self.extra if p.requires_grad]

    # --- hooks ---------------------------------------------------------------------------------------------------

    def begin_task(self, task_id: int, steps_per_epoch: int, epochs: int) -> None:
        """A task starts (``steps_per_epoch`` optimizer steps in each of ``epochs`` epochs). Default: record them and
        restart the in-task step counter; a subclass that overrides it calls ``super().begin_task`` first."""
        check_int("steps_per_epoch", steps_per_epoch, low=1)
        check_int("epochs", epochs, low=1)
        self.task_id = task_id
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.step_in_task = 0

    def prepare_task(self, objective: Objective) -> None:
        """Called once per task right after :meth:`begin_task`, with the model in eval mode and no gradients
        recorded; a method may run the task's training batches (``objective.train_batches()``) to gather input
        statistics, or note the task's size. Every rank runs it on the same global batches, so whatever it computes
        is identical everywhere. Default: nothing."""
        return None

    def training_loss(self, batch: dict[str, Any], objective: Objective) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss of one training batch (this rank's shard), as ``(task loss, extra)``: the trainer logs and
        averages the task loss and differentiates ``before_backward(task loss + extra)``. A method that needs the
        batch (a teacher's forward, a replay loss) overrides it. Default: ``(objective.loss(batch)[0], None)``."""
        return objective.loss(batch)[0], None

    def options(self) -> dict[str, Any]:
        """The method's effective options (defaults included), recorded with the results. Default: none."""
        return {}

    def begin_epoch(self, epoch: int) -> None:
        """An epoch of the current task starts. Default: record its index."""
        self.epoch = epoch

    @abc.abstractmethod
    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate, given the task's mean loss (0-d): ``loss`` itself for a method without a
        regularizer, else ``loss`` plus the method's penalty."""

    def after_backward(self) -> None:
        """The gradients of the step are in ``.grad``; a method may read them (signatures, Fisher information).
        Default: nothing."""
        return None

    @abc.abstractmethod
    def step(self) -> None:
        """Update the parameters from their gradients and zero the gradients (usually through
        :meth:`_adamw_step`)."""

    def end_task(self) -> None:
        """The current task's training is over. Default: nothing."""
        return None

    def learned_tree(self) -> dict[str, Any] | None:
        """A learned task structure to report with the results, as nested dicts (TreeLoRA's tree). Default: None."""
        return None

    # --- optimizer -----------------------------------------------------------------------------------------------

    def _moments_for(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._moments.get(id(p))
        if state is None or state[0].shape != p.shape:
            state = (torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32))
            self._moments[id(p)] = state
        return state

    def _adamw_step(
        self, params: Sequence[torch.Tensor], density: float | None = None, dense_params: Sequence[torch.Tensor] = ()
    ) -> None:
        """One optimizer step: AdamW on ``params`` (top-``density`` entries by |grad| when given) and densely on
        ``dense_params``, then zero their gradients and count the step (``step_in_task``, ``global_step``)."""
        o = self.optim
        for group, rho in ((params, density), (dense_params, None)):
            group = [p for p in group if p.grad is not None]
            if not group:
                continue
            moments = [self._moments_for(p) for p in group]
            ops.masked_adamw_(
                [p.data for p in group],
                [p.grad for p in group],
                [m for m, _ in moments],
                [v for _, v in moments],
                self.global_step + 1,
                lr=o.lr,
                betas=o.betas,
                eps=o.eps,
                weight_decay=o.weight_decay,
                density=rho,
            )
        for p in (*params, *dense_params):
            p.grad = None
        self.step_in_task += 1
        self.global_step += 1

    def reset_optimizer_state(self) -> None:
        self._moments.clear()

    # --- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        params = self.parameters()
        return {
            "name": self.name,
            "task_id": self.task_id,
            "epoch": self.epoch,
            "step_in_task": self.step_in_task,
            "global_step": self.global_step,
            "optimizer": asdict(self.optim),
            "moments": [
                tuple(t.clone() for t in self._moments[id(p)]) if id(p) in self._moments else None for p in params
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for method {state.get('name')!r}, not {self.name!r}")
        self.task_id, self.epoch = state["task_id"], state["epoch"]
        self.step_in_task, self.global_step = state["step_in_task"], state["global_step"]
        params = self.parameters()
        if len(state["moments"]) != len(params):
            raise ValueError(
                f"state_dict holds optimizer moments for {len(state['moments'])} parameters, "
                f"this method has {len(params)}"
            )
        self._moments = {}
        for p, mv in zip(params, state["moments"]):
            if mv is not None:
                self._moments[id(p)] = (mv[0].to(p.device).clone(), mv[1].to(p.device).clone())
