"""Baseline continual-learning methods on LoRA adapters, under the :class:`~treelora.cl.method.ContinualMethod`
interface: sequential fine-tuning (SeqLoRA), O-LoRA, EWC on the LoRA parameters, joint multitask training, Learning
without Forgetting (LwF), experience replay and InfLoRA.

Every method trains the trainable adapter of each layer (``lora_A`` (r, in), ``lora_B`` (out, r)) with AdamW. The
optimizer moments carry over from task to task (as in TreeLoRA with a shared adapter, so that the two differ only in
TreeLoRA's regularizer and update rule), except in O-LoRA, whose fresh adapter per task starts with fresh moments.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from treelora.cl._checks import check_choice, check_int, check_number
from treelora.cl.batching import seeded_generator
from treelora.cl.method import ContinualMethod, Objective, OptimizerConfig


def _require_frozen_stack(layers: Sequence[nn.Module], method: str) -> None:
    """TypeError naming the first layer without a frozen adapter stack (``freeze_adapter``, ``frozen_A``: the
    treelora.nn.LoRALinear interface that O-LoRA and InfLoRA push finished adapters onto)."""
    for i, layer in enumerate(layers):
        if not (hasattr(layer, "freeze_adapter") and hasattr(layer, "frozen_A")):
            raise TypeError(
                f"layers[{i}] is a {type(layer).__name__}; {method} needs treelora.nn.LoRALinear layers "
                "(a frozen adapter stack)"
            )


class SeqLoRA(ContinualMethod):
    """Sequential fine-tuning (SeqLoRA): one shared LoRA adapter per layer trained task after task with no protection
    against forgetting, the lower bound every method should beat.

    Its hooks: ``before_backward`` returns the task loss unchanged (no regularizer); ``step`` is one dense AdamW step
    over the adapters and the extra parameters (task heads); the AdamW moments carry over from one task to the next;
    the other hooks keep :class:`~treelora.cl.method.ContinualMethod`'s defaults. O-LoRA, EWC and joint training
    build on it.

    Args:
        layers: the LoRA layers, shallowest first.
        optimizer: AdamW settings.
    """

    name = "seqlora"
    label = "SeqLoRA"

    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The task loss itself: sequential fine-tuning adds no penalty."""
        return loss

    def step(self) -> None:
        """One dense AdamW step over every parameter that has a gradient, then zero the gradients."""
        self._adamw_step(self.parameters())


class JointTraining(SeqLoRA):
    """Joint multitask training: one adapter trained on the union of all tasks at once (the upper bound).

    The trainer sees ``joint = True`` and calls ``begin_task`` once, with the data of every task mixed; the result has
    only a final accuracy per task (backward transfer and forgetting do not apply).
    """

    name = "joint"
    label = "Joint"
    joint = True


class OLoRA(SeqLoRA):
    """O-LoRA (Wang et al. 2023): a new adapter per task in the subspace orthogonal to the previous ones.

    At the start of every task after the first, each layer's trained adapter is pushed onto its frozen stack
    (:meth:`treelora.nn.LoRALinear.freeze_adapter`: it keeps contributing to the output, never trained again) and a
    fresh adapter is trained with

        loss + λ₁ Σ_layers Σ_{i < t} ‖A_i A_tᵀ‖₁ + λ₂ Σ_layers (‖A_t‖² + ‖B_t‖²)

    where A_i (r, in) are the frozen A matrices and A_t the trainable one: ``‖A_i A_tᵀ‖₁`` (the sum of the absolute
    entries of the r x r product) is zero exactly when the new adapter reads input directions orthogonal to every
    old one's.

    Args:
        layers: ``treelora.nn.LoRALinear`` layers (they must support ``freeze_adapter``).
        optimizer: AdamW settings.
        lambda_orth: λ₁ (O-LoRA's default 0.5).
        lambda_l2: λ₂ on the new adapter (O-LoRA's default 0).
    """

    name = "olora"
    label = "O-LoRA"
    option_help = {
        "lambda_orth": "Weight of the orthogonality penalty between the new adapter and the frozen ones (>= 0).",
        "lambda_l2": "Weight of the L2 penalty on the new adapter (>= 0).",
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        for name in ("lambda_orth", "lambda_l2"):
            if name in options:
                check_number(name, options[name], low=0.0)

    def __init__(
        self,
        layers: Sequence[nn.Module],
        optimizer: OptimizerConfig | None = None,
        lambda_orth: float = 0.5,
        lambda_l2: float = 0.0,
    ) -> None:
        self.check_options({"lambda_orth": lambda_orth, "lambda_l2": lambda_l2})
        super().__init__(layers, optimizer)
        _require_frozen_stack(self.layers, "O-LoRA")
        self.lambda_orth, self.lambda_l2 = float(lambda_orth), float(lambda_l2)

    def begin_task(self, task_id: int, steps_per_epoch: int, epochs: int) -> None:
        if task_id > 0:
            for layer in self.layers:
                layer.freeze_adapter()
        super().begin_task(task_id, steps_per_epoch, epochs)
        self.reset_optimizer_state()

    def orthogonality_loss(self) -> torch.Tensor:
        """Σ_layers ‖A_frozen A_tᵀ‖₁: A_frozen (r_f, in) holds every frozen A of the layer, so this is the sum over
        previous tasks i of ‖A_i A_tᵀ‖₁. Zero (with a graph) before any adapter is frozen."""
        terms = [
            (layer.frozen_A.to(layer.lora_A.dtype) @ layer.lora_A.T).abs().sum()
            for layer in self.layers
            if layer.frozen_A.shape[0] > 0
        ]
        if not terms:
            return self.layers[0].lora_A.sum() * 0.0
        return torch.stack(terms).sum()

    def l2_loss(self) -> torch.Tensor:
        """Σ_layers (‖A_t‖² + ‖B_t‖²) of the trainable adapters."""
        return torch.stack([layer.lora_A.square().sum() + layer.lora_B.square().sum() for layer in self.layers]).sum()

    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        if self.lambda_orth > 0:
            loss = loss + self.lambda_orth * self.orthogonality_loss()
        if self.lambda_l2 > 0:
            loss = loss + self.lambda_l2 * self.l2_loss()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(lambda_orth=self.lambda_orth, lambda_l2=self.lambda_l2)
        return state


class EWC(SeqLoRA):
    """Online elastic weight consolidation (Kirkpatrick et al. 2017; Schwarz et al. 2018) on the LoRA parameters.

    After each task, the diagonal Fisher information of every adapter entry is estimated from the squared mini-batch
    gradients of the task's last epoch (read in ``after_backward``, so no extra pass over the data), normalised to
    mean 1 over all adapter entries, and folded into a running Fisher ``F ← γ F + F_t``; the adapter values are kept as
    the anchor θ*. Later tasks add

        (λ / 2) Σ F (θ − θ*)²

    Normalising the Fisher makes λ independent of the loss scale and the batch size (the raw squared gradients of
    LoRA parameters span several orders of magnitude between models).

    Args:
        layers: LoRA layers.
        optimizer: AdamW settings.
        ewc_lambda: λ. Default 1: on the default run (wordnet-supersense on minilm, seed 0) λ = 100 gave ACC 50.9% /
            BWT 0.1, λ = 10 gave 58.1 / 0.3 and λ = 1 gave 64.6 / -0.5, against SeqLoRA's 65.4 / 2.7: larger values
            stop the adapter from learning new tasks.
        gamma: decay γ of the running Fisher (1 = sum over tasks, as online EWC with no forgetting of old tasks).
    """

    name = "ewc"
    label = "EWC"
    option_help = {
        "ewc_lambda": "Weight lambda of the penalty (lambda / 2) sum F (theta - theta*)^2 (>= 0).",
        "gamma": "Decay of the running Fisher information between tasks, in [0, 1] (1: a sum over tasks).",
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        if "ewc_lambda" in options:
            check_number("ewc_lambda", options["ewc_lambda"], low=0.0)
        if "gamma" in options:
            check_number("gamma", options["gamma"], low=0.0, high=1.0)

    def __init__(
        self,
        layers: Sequence[nn.Module],
        optimizer: OptimizerConfig | None = None,
        ewc_lambda: float = 1.0,
        gamma: float = 1.0,
    ) -> None:
        self.check_options({"ewc_lambda": ewc_lambda, "gamma": gamma})
        super().__init__(layers, optimizer)
        self.ewc_lambda, self.gamma = float(ewc_lambda), float(gamma)
        self.fisher: list[torch.Tensor] | None = None
        self.anchor: list[torch.Tensor] | None = None
        self._grad_sq: list[torch.Tensor] | None = None
        self._grad_count = 0

    def begin_task(self, task_id: int, steps_per_epoch: int, epochs: int) -> None:
        super().begin_task(task_id, steps_per_epoch, epochs)
        self._grad_sq, self._grad_count = None, 0

    def penalty(self) -> torch.Tensor:
        """Σ F (θ − θ*)² over the adapter entries (without the λ / 2 factor); zero before the first task ends."""
        params = self.adapter_parameters()
        if self.fisher is None or self.anchor is None:
            return params[0].sum() * 0.0
        return torch.stack([(f * (p - a).square()).sum() for p, f, a in zip(params, self.fisher, self.anchor)]).sum()

    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        if self.fisher is None or self.ewc_lambda == 0:
            return loss
        return loss + 0.5 * self.ewc_lambda * self.penalty()

    def after_backward(self) -> None:
        if self.epoch != self.epochs - 1:
            return
        params = self.adapter_parameters()
        if self._grad_sq is None:
            self._grad_sq = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for acc, p in zip(self._grad_sq, params):
            if p.grad is not None:
                acc.add_(p.grad.detach().float().square())
        self._grad_count += 1

    def end_task(self) -> None:
        params = self.adapter_parameters()
        if self._grad_sq is not None and self._grad_count > 0:
            fisher_t = [g / self._grad_count for g in self._grad_sq]
            mean = torch.cat([f.flatten() for f in fisher_t]).mean().clamp_min(torch.finfo(torch.float32).tiny)
            fisher_t = [f / mean for f in fisher_t]
            if self.fisher is None:
                self.fisher = fisher_t
            else:
                self.fisher = [self.gamma * f + ft for f, ft in zip(self.fisher, fisher_t)]
        self.anchor = [p.detach().float().clone() for p in params]
        self._grad_sq, self._grad_count = None, 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            ewc_lambda=self.ewc_lambda,
            gamma=self.gamma,
            fisher=None if self.fisher is None else [f.clone() for f in self.fisher],
            anchor=None if self.anchor is None else [a.clone() for a in self.anchor],
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.adapter_parameters()[0].device
        self.fisher = None if state["fisher"] is None else [f.to(device) for f in state["fisher"]]
        self.anchor = None if state["anchor"] is None else [a.to(device) for a in state["anchor"]]


def lwf_distillation(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], temperature: float, joint: bool = False
) -> torch.Tensor:
    """LwF's distillation loss ``T² KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over the rows.

    Args:
        student, teacher: one (B, C_k) logit tensor per earlier task, the same shapes in both lists (the teacher's
            carry no gradient).
        temperature: T > 0; the T² factor keeps the gradient's scale independent of T (Hinton et al. 2015).
        joint: False: one softmax per task, the KLs summed over the tasks (multi-head LwF); True: one softmax over
            the concatenation of every task's classes.
    Returns:
        a 0-d tensor (zero with a graph when there are no earlier tasks).
    """
    if len(student) != len(teacher):
        raise ValueError(f"student has logits of {len(student)} tasks, teacher of {len(teacher)}")
    if joint and student:
        student, teacher = [torch.cat(list(student), dim=1)], [torch.cat(list(teacher), dim=1)]
    total = None
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
        kl = F.kl_div(
            F.log_softmax(s.float() / temperature, dim=1),
            F.log_softmax(t.float() / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        total = kl if total is None else total + kl
    if total is None:
        raise ValueError("student and teacher hold no logits: LwF distils the classes of at least one earlier task")
    return temperature**2 * total


class LwF(SeqLoRA):
    """Learning without Forgetting (Li & Hoiem 2016) on a shared LoRA adapter.

    At the start of every task after the first, the trainable parameters (adapters and task heads) are copied as the
    teacher. Each training batch of the current task then adds

        λ T² KL(softmax(z_old / T) ‖ softmax(z / T))

    where z are the current model's logits over the classes of the earlier tasks and z_old the teacher's on the same
    batch (see :func:`lwf_distillation`; one softmax per earlier task by default). The teacher runs in eval mode
    without gradients, with its copies swapped into the parameters' storage (no second model in memory): one extra
    forward per step, about a third of a training step's compute (a backward costs about two forwards).

    Classification streams only: on an instruction stream :meth:`prepare_task` raises ValueError (answer-token
    distillation over the vocabulary is not implemented).

    Args:
        layers: LoRA layers. optimizer: AdamW settings.
        lwf_lambda: λ (default 1, Li & Hoiem's loss balance).
        lwf_temperature: T (default 2, Li & Hoiem's value).
        lwf_softmax: ``per_task`` (one softmax per earlier task) or ``joint`` (one over all earlier classes).
    """

    name = "lwf"
    label = "LwF"
    SOFTMAX = ("per_task", "joint")
    option_help = {
        "lwf_lambda": "Weight lambda of the distillation term lambda T^2 KL(old || new) (>= 0; default 1).",
        "lwf_temperature": "Distillation temperature T (> 0; default 2).",
        "lwf_softmax": "per_task: one softmax per earlier task (default); joint: one over all earlier classes.",
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        if "lwf_lambda" in options:
            check_number("lwf_lambda", options["lwf_lambda"], low=0.0)
        if "lwf_temperature" in options:
            check_number("lwf_temperature", options["lwf_temperature"], low=0.0, low_open=True)
        if "lwf_softmax" in options:
            check_choice("lwf_softmax", options["lwf_softmax"], cls.SOFTMAX)

    def __init__(
        self,
        layers: Sequence[nn.Module],
        optimizer: OptimizerConfig | None = None,
        lwf_lambda: float = 1.0,
        lwf_temperature: float = 2.0,
        lwf_softmax: str = "per_task",
    ) -> None:
        self.check_options({"lwf_lambda": lwf_lambda, "lwf_temperature": lwf_temperature, "lwf_softmax": lwf_softmax})
        super().__init__(layers, optimizer)
        self.lwf_lambda, self.lwf_temperature, self.lwf_softmax = float(lwf_lambda), float(lwf_temperature), lwf_softmax
        self.teacher: list[torch.Tensor] | None = None

    def options(self) -> dict[str, Any]:
        return {"lwf_lambda": self.lwf_lambda, "lwf_temperature": self.lwf_temperature, "lwf_softmax": self.lwf_softmax}

    def begin_task(self, task_id: int, steps_per_epoch: int, epochs: int) -> None:
        """Copy the trainable parameters as the teacher (none at the first task). Taken from the parameters as the
        previous task left them, so a run resumed from a task-end checkpoint takes the same teacher."""
        super().begin_task(task_id, steps_per_epoch, epochs)
        self.teacher = [p.detach().clone() for p in self.parameters()] if task_id > 0 else None

    def prepare_task(self, objective: Objective) -> None:
        if objective.kind != "classification":
            raise ValueError(
                "LwF distils the logits of earlier tasks' classes and needs a classification stream; this stream is "
                f"of kind {objective.kind!r} (choose another method for instruction streams)"
            )

    @contextlib.contextmanager
    def teacher_parameters(self) -> Iterator[None]:
        """Inside the block the trainable parameters hold the teacher's values (their storage is swapped, not
        copied); the current values come back after it."""
        if self.teacher is None:
            raise RuntimeError("LwF has no teacher before the second task")
        params = self.parameters()
        current = [p.data for p in params]
        try:
            for p, t in zip(params, self.teacher):
                p.data = t
            yield
        finally:
            for p, c in zip(params, current):
                p.data = c

    def training_loss(self, batch: dict[str, Any], objective: Objective) -> tuple[torch.Tensor, torch.Tensor | None]:
        old = list(range(self.task_id))
        if not old or self.lwf_lambda == 0 or self.teacher is None:
            return objective.loss(batch)[0], None
        # The teacher's forward runs first, so the student's autograd graph never sees the swapped storage.
        with torch.no_grad(), objective.eval_mode(), self.teacher_parameters():
            _, teacher = objective.loss(batch, old)
        loss, student = objective.loss(batch, old)
        distill = lwf_distillation(student, teacher, self.lwf_temperature, joint=self.lwf_softmax == "joint")
        return loss, self.lwf_lambda * distill

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self.options())
        return state


class ExperienceReplay(SeqLoRA):
    """Experience replay with a small, class-balanced-by-task memory on a shared LoRA adapter.

    Buffer: at the end of each task, ``replay_per_task`` of its training examples (default 20; all of them if the task
    has fewer) are kept, drawn without replacement by a generator seeded by ``(replay_seed, task)``: independent of
    the data order, the run's seed and the process rank, so every rank of a data-parallel run holds the same buffer.
    The buffer holds example indices, not tensors; after N tasks it has up to ``replay_per_task`` x N entries.

    Each training step after the first task adds ``replay_weight`` x the mean task loss of a replay minibatch of
    ``replay_batch_size`` buffer entries (default 8) drawn without replacement by a generator seeded by
    ``(replay_seed, task, step)`` (the same on every rank, and after a resume); every row is scored with its own
    task's logits under the run's protocol (under the class protocol, every class seen so far competes). Under
    several processes every rank replays the whole minibatch (not a shard): the trainer averages the ranks' gradients
    weighted by their share of the current batch, so identical replay terms on every rank average to exactly the
    one-process replay term, also when the shards are uneven or one is empty; the replay minibatch is small (8 against
    a global batch of 32 on the default run), so the repeated work is too. Cost: one extra forward and backward of the
    replay minibatch per step and rank.

    Args:
        layers: LoRA layers. optimizer: AdamW settings.
        replay_per_task: examples kept per finished task (>= 1).
        replay_batch_size: buffer entries replayed per step (>= 1).
        replay_weight: weight of the replay loss (>= 0).
        replay_seed: seed of the buffer's and the minibatches' draws (>= 0).
    """

    name = "replay"
    label = "Replay"
    option_help = {
        "replay_per_task": "Training examples kept in the buffer per finished task (>= 1; default 20).",
        "replay_batch_size": "Buffer examples replayed with every training batch (>= 1; default 8).",
        "replay_weight": "Weight of the replay loss added to the task loss (>= 0; default 1).",
        "replay_seed": "Seed of the buffer's and the replay minibatches' draws (>= 0; default 0).",
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        for name in ("replay_per_task", "replay_batch_size"):
            if name in options:
                check_int(name, options[name], low=1)
        if "replay_weight" in options:
            check_number("replay_weight", options["replay_weight"], low=0.0)
        if "replay_seed" in options:
            check_int("replay_seed", options["replay_seed"], low=0)

    def __init__(
        self,
        layers: Sequence[nn.Module],
        optimizer: OptimizerConfig | None = None,
        replay_per_task: int = 20,
        replay_batch_size: int = 8,
        replay_weight: float = 1.0,
        replay_seed: int = 0,
    ) -> None:
        self.check_options(
            {
                "replay_per_task": replay_per_task,
                "replay_batch_size": replay_batch_size,
                "replay_weight": replay_weight,
                "replay_seed": replay_seed,
            }
        )
        super().__init__(layers, optimizer)
        self.replay_per_task, self.replay_batch_size = int(replay_per_task), int(replay_batch_size)
        self.replay_weight, self.replay_seed = float(replay_weight), int(replay_seed)
        self.buffer: list[tuple[int, int]] = []
        self._task_size: int | None = None

    def options(self) -> dict[str, Any]:
        return {
            "replay_per_task": self.replay_per_task,
            "replay_batch_size": self.replay_batch_size,
            "replay_weight": self.replay_weight,
            "replay_seed": self.replay_seed,
        }

    def prepare_task(self, objective: Objective) -> None:
        self._task_size = objective.train_size(objective.task)

    def select(self, task: int, size: int) -> list[tuple[int, int]]:
        """The ``(task, example)`` entries the buffer keeps of a task with ``size`` training examples."""
        order = torch.randperm(size, generator=seeded_generator(self.replay_seed, task))
        return [(task, int(i)) for i in order[: self.replay_per_task]]

    def replay_items(self) -> list[tuple[int, int]]:
        """This step's global replay minibatch (before sharding): empty while the buffer is."""
        if not self.buffer:
            return []
        g = seeded_generator(self.replay_seed, self.task_id, self.global_step)
        order = torch.randperm(len(self.buffer), generator=g)[: self.replay_batch_size]
        return [self.buffer[int(i)] for i in order]

    def end_task(self) -> None:
        if self._task_size is None:
            raise RuntimeError("ExperienceReplay.end_task() before prepare_task(): the task's size is unknown")
        self.buffer.extend(self.select(self.task_id, self._task_size))
        self._task_size = None

    def training_loss(self, batch: dict[str, Any], objective: Objective) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss = objective.loss(batch)[0]
        items = self.replay_items()
        if not items or self.replay_weight == 0:
            return loss, None
        return loss, self.replay_weight * objective.loss(objective.batch(items))[0]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self.options(), buffer=[list(item) for item in self.buffer])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.buffer = [(int(t), int(i)) for t, i in state["buffer"]]


class InfLoRA(SeqLoRA):
    """InfLoRA (Liang & Li, CVPR 2024) in single-adapter form on ``treelora.nn.LoRALinear`` layers.

    Each layer keeps an orthonormal basis M (in, k) of the input subspace of the tasks seen so far. At the start of
    task t:

    1. the previous task's adapter B_{t-1} A_{t-1} is pushed onto the layer's frozen stack
       (:meth:`~treelora.nn.LoRALinear.freeze_adapter`), so it keeps contributing exactly what it did (B is zeroed
       for the new adapter, so the model's function does not change);
    2. the covariance C = Σ x xᵀ (in, in) of the layer's inputs is gathered over the first ``inflora_batches``
       training batches of the task (eval mode, no gradients; every token position of text inputs, padding included);
    3. A_t (r, in) is set to the top-r eigenvectors of C restricted to the orthogonal complement of M (so
       A_t Mᵀ = 0 exactly, up to rounding) and frozen; only B_t (and the task heads) are trained. An update
       ΔW = B_t A_t therefore sends the inputs of earlier tasks (in span M) to about zero;
    4. M grows by the fewest of those eigenvectors needed for the retained energy
       ``‖MᵀX‖² + Σ_i λ_i`` to reach ``inflora_threshold`` x ``‖X‖²`` (GPM's criterion), and at most to
       ``in - r`` columns, so the next task's adapter always has room.

    Differences from the paper (as described there; no released code was consulted): the paper keeps the old
    tasks' subspace with DualGPM, which stores the complement of M once M holds more than half the dimensions; here M
    itself is kept, capped at ``in - r`` columns of float64 (at most 1.1 MiB for in = 384). Here the basis grows with
    the statistics gathered before the task is trained (one pass instead of a second one after training), and
    padding positions of text inputs count towards the covariance. Classification is the trainer's heads under its
    protocol, not the paper's ViT classifier pipeline.

    Args:
        layers: ``treelora.nn.LoRALinear`` layers (they must support ``freeze_adapter``).
        optimizer: AdamW settings of B and the heads.
        inflora_threshold: ε in (0, 1], the share of each task's input energy the basis retains (default 0.95, not
            tuned here).
        inflora_batches: training batches per task whose inputs estimate the subspace (>= 1; default 8).
    """

    name = "inflora"
    label = "InfLoRA"
    option_help = {
        "inflora_threshold": "Share of each task's layer-input energy kept in the old-task subspace, in (0, 1] "
        "(default 0.95).",
        "inflora_batches": "Training batches of each task whose layer inputs estimate its subspace (>= 1; default 8).",
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        if "inflora_threshold" in options:
            check_number("inflora_threshold", options["inflora_threshold"], low=0.0, high=1.0, low_open=True)
        if "inflora_batches" in options:
            check_int("inflora_batches", options["inflora_batches"], low=1)

    def __init__(
        self,
        layers: Sequence[nn.Module],
        optimizer: OptimizerConfig | None = None,
        inflora_threshold: float = 0.95,
        inflora_batches: int = 8,
    ) -> None:
        self.check_options({"inflora_threshold": inflora_threshold, "inflora_batches": inflora_batches})
        super().__init__(layers, optimizer)
        _require_frozen_stack(self.layers, "InfLoRA")
        for i, layer in enumerate(self.layers):
            if layer.r > layer.in_features:
                raise ValueError(f"layers[{i}] has rank {layer.r} > in_features {layer.in_features}")
            layer.lora_A.requires_grad_(False)  # designed at every task start, never trained
        self.inflora_threshold, self.inflora_batches = float(inflora_threshold), int(inflora_batches)
        self.bases = [torch.zeros(layer.in_features, 0, dtype=torch.float64) for layer in self.layers]

    def options(self) -> dict[str, Any]:
        return {"inflora_threshold": self.inflora_threshold, "inflora_batches": self.inflora_batches}

    def begin_task(self, task_id: int, steps_per_epoch: int, epochs: int) -> None:
        if task_id > 0:
            for layer in self.layers:
                layer.freeze_adapter()
        super().begin_task(task_id, steps_per_epoch, epochs)
        self.reset_optimizer_state()

    def prepare_task(self, objective: Objective) -> None:
        covariances = self.input_covariances(objective)
        for l, (layer, cov) in enumerate(zip(self.layers, covariances)):
            A, self.bases[l] = design_adapter(cov, self.bases[l].to(cov.device), layer.r, self.inflora_threshold)
            with torch.no_grad():
                layer.lora_A.copy_(A.to(layer.lora_A.dtype))
                layer.lora_B.zero_()
            self.bases[l] = self.bases[l].cpu()

    def input_covariances(self, objective: Objective) -> list[torch.Tensor]:
        """Σ x xᵀ (in, in) in float64 of each layer's inputs over the task's first ``inflora_batches`` batches."""
        covs = [torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64) for layer in self.layers]

        def hook(index: int):
            def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                covs[index] = covs[index].to(x.device) + x.T @ x

            return record

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        try:
            for items in objective.train_batches()[: self.inflora_batches]:
                objective.loss(objective.batch(items))
        finally:
            for h in handles:
                h.remove()
        return covs

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self.options(), bases=[b.clone() for b in self.bases])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bases = [b.to(torch.float64).clone() for b in state["bases"]]


def design_adapter(
    cov: torch.Tensor, basis: torch.Tensor, r: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfLoRA's A for a new task and the grown input basis (float64).

    Args:
        cov: (in, in) covariance Σ x xᵀ of the new task's layer inputs.
        basis: (in, k) orthonormal basis M of the earlier tasks' input subspace, k <= in - r.
        r: rows of A.
        threshold: share ε of the task's input energy the grown basis must retain.
    Returns:
        A (r, in): orthonormal rows, the top-r eigenvectors of ``cov`` restricted to the complement of M (so
        A Mᵀ = 0); the new basis (in, k') with k <= k' <= in - r.
    """
    n, k = cov.shape[0], basis.shape[1]
    cov = cov.double()
    if k == 0:
        complement = torch.eye(n, dtype=torch.float64, device=cov.device)
    else:
        complement = torch.linalg.qr(basis, mode="complete").Q[:, k:]
    restricted = complement.T @ cov @ complement
    values, vectors = torch.linalg.eigh(0.5 * (restricted + restricted.T))
    values, vectors = values.flip(0).clamp_min(0.0), complement @ vectors.flip(1)
    A = vectors[:, :r].T.contiguous()
    total = float(torch.trace(cov))
    kept = float(torch.trace(basis.T @ cov @ basis)) if k else 0.0
    if total <= 0.0:
        return A, basis
    need = threshold * total - kept
    grow = 0 if need <= 0 else int((torch.cumsum(values, 0) < need).sum()) + 1
    grow = min(grow, n - r - k)
    return A, torch.cat([basis, vectors[:, :grow]], dim=1)
