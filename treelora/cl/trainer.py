"""The continual-learning trainer: a stream of tasks, a backbone with LoRA adapters, one method (SPEC 8).

For each task: train for its epochs with the method's hooks (the calling order of
:mod:`treelora.cl.method`), evaluate every task seen so far (and the next one, for forward transfer), record the row
``R[i, :]`` of the accuracy matrix with the training and evaluation times and the peak memory, and write a checkpoint
atomically. Before the first task, every task is evaluated zero-shot (the baseline of forward transfer). A run that
is stopped resumes from the last finished task and reaches the same results as an uninterrupted run with the same
seed: data order is drawn from generators seeded by (seed, task, epoch), and the global RNG state (dropout, fresh
adapter initialisation) is saved with each checkpoint.

Several processes (``torchrun``; SPEC 9): the run is data-parallel with the same state on every rank. Every rank
draws the same global batches of ``batch_size`` and trains on its stride of each
(:func:`~treelora.cl.distributed.shard`: rank r of N takes ``batch[r::N]``); between ``loss.backward()`` and the
method's ``after_backward()`` the gradients are averaged over ranks, weighted by each rank's example (or
answer-token) count, in ONE collective per step (:func:`~treelora.cl.distributed.all_reduce_gradients`) that also
carries the loss and reads nothing back to the host. Every rank then sees the gradient one process would see on the
whole batch, so TreeLoRA's running signature (the "signature all-reduce" rides on the gradient all-reduce, every
step), the search's distances and statistics, the optimizer step, the bank and the tree are identical on every rank
without a collective of their own; the search's random draws come from a generator seeded by the method's config and
advanced identically everywhere. At task boundaries the global RNG state is broadcast from rank 0 (a fresh adapter
is drawn identically; dropout is then reseeded per rank). Each rank scores its share of every test set and the
counts are summed (one collective per evaluation round). At the end of every task a hash of the method's state and
parameters is compared across ranks (:func:`~treelora.cl.distributed.check_identical_across_ranks`; a mismatch
raises on every rank); rank 0 alone logs and writes the checkpoint, which every rank reads back on resume.

This module is the loop; its parts live beside it: :mod:`~treelora.cl.batching` (data order and tensors),
:mod:`~treelora.cl.objectives` (heads, protocols and losses), :mod:`~treelora.cl.evaluation` (scoring),
:mod:`~treelora.cl.checkpoint` (save and resume), :mod:`~treelora.cl.results` (what a run returns and writes) and
:mod:`~treelora.cl.registry` (the methods a run can name). Instruct streams (prompts and answers) train a causal LM
on the answer tokens; the prompt carries the task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch

from treelora.cl import metrics
from treelora.cl._checks import check_choice, check_int, check_number
from treelora.cl.batching import BatchBuilder, Sampler, SeededShuffle, epoch_batches
from treelora.cl.checkpoint import (
    CheckpointStore,
    adapter_state,
    load_adapter_state,
    rng_state,
    set_rng_state,
)
from treelora.cl.distributed import (
    DistributedContext,
    abort_distributed,
    all_reduce_gradients,
    broadcast_parameters,
    broadcast_rng_state,
    check_identical_across_ranks,
    current_context,
    run_on_main,
    seed_per_rank,
    shard,
    sum_across_ranks,
)
from treelora.cl.evaluation import Evaluator
from treelora.cl.memory import PeakMemory
from treelora.cl.method import ContinualMethod, OptimizerConfig
from treelora.cl.objectives import HEADS, LOGIT_SETS, PROTOCOLS, TaskHeads, causal_lm_loss
from treelora.cl.progress import Progress
from treelora.cl.registry import method_class
from treelora.cl.results import RunResult
from treelora.data.stream import Stream
from treelora.models import LoadedModel
from treelora.nn import inject_lora

SCHEDULES = ("constant", "linear", "cosine")
# The loss is read back (a host synchronisation) for the progress bar and the NaN check only every this many steps, so
# that a GPU run does not wait for the device at every step.
SYNC_EVERY = 10


@dataclass
class TrainerConfig:
    """Settings of a continual-learning run (everything but the stream, the model and the method).

    Args:
        epochs: epochs per task: one number for every task, or one per task.
        batch_size: training batch size (under several processes the global batch, split across the ranks).
        eval_batch_size: evaluation batch size of classification tasks, per process (multiple-choice questions are
            scored one at a time, their options sharing the prompt's key/value cache).
        lr, betas, eps, weight_decay: AdamW settings of the adapters and heads.
        schedule: learning-rate schedule within each task: ``constant``, ``linear`` (decay to 0) or ``cosine``.
        warmup_ratio: share of each task's steps with a linear warm-up.
        max_grad_norm: gradient-norm clipping (None: none).
        max_steps_per_task: stop a task after this many optimizer steps (None: full epochs).
        rank, lora_alpha, lora_dropout: LoRA settings; target_modules: layers to wrap (None: the model's default);
            lora_depth: wrap only the first K matching layers.
        protocol: ``task``, ``class`` or ``class-il``: the training and test logit sets of classification streams
            (task/task, seen/seen, task/seen; see :mod:`treelora.cl.objectives`).
        head: ``linear`` (a trainable head per task), ``label`` (a frozen cosine classifier over the features of the
            stream's class descriptions) or ``fixed`` (frozen random orthonormal class vectors).
        train_logits, test_logits: ``task`` or ``seen``, overriding the protocol's logit set at training / test
            (None: the protocol's).
        max_length: maximum tokens per text input (prompt + answer for instruct streams; the prompt is cut on the left).
        eval_zero_shot: evaluate every task before training (the baseline of forward transfer).
        eval_next_task: also evaluate task i + 1 after task i (R[i, i + 1], needed for forward transfer).
        seed: seeds the adapters, heads, data order and dropout.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        checkpoint_dir: where the checkpoint is written after every task (None: no checkpoints).
        progress: print a progress line (loss, step/s) while training.

    Raises:
        TypeError: a setting of the wrong type (``batch_size=2.5``, ``lr="0.1"``).
        ValueError: a setting out of range or not one of its choices; the message names the setting.
    """

    epochs: Union[int, Sequence[int]] = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    max_steps_per_task: int | None = None
    rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    lora_depth: int | None = None
    protocol: str = "task"
    head: str = "linear"
    train_logits: str | None = None
    test_logits: str | None = None
    max_length: int = 64
    eval_zero_shot: bool = True
    eval_next_task: bool = True
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "rank", "max_length"):
            check_int(name, getattr(self, name), low=1)
        if isinstance(self.epochs, (str, bytes)) or not isinstance(self.epochs, (int, Sequence)):
            raise TypeError(f"epochs must be an int or a sequence of ints (one per task), got {self.epochs!r}")
        epochs = [self.epochs] if isinstance(self.epochs, int) else list(self.epochs)
        if not epochs:
            raise ValueError("epochs must be >= 1 (one number or one per task), got an empty sequence")
        for e in epochs:
            check_int("epochs", e, low=1)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("protocol", self.protocol, tuple(PROTOCOLS))
        check_choice("head", self.head, HEADS)
        for name in ("train_logits", "test_logits"):
            if getattr(self, name) is not None:
                check_choice(name, getattr(self, name), LOGIT_SETS)
        check_number("warmup_ratio", self.warmup_ratio, low=0.0)
        if self.warmup_ratio >= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("lora_dropout", self.lora_dropout, low=0.0, high=1.0)
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        if self.max_steps_per_task is not None:
            check_int("max_steps_per_task", self.max_steps_per_task, low=1)
        check_int("seed", self.seed, low=0)

    def epochs_for(self, task: int) -> int:
        """Epochs of task ``task`` (the last entry of a per-task list repeats)."""
        if isinstance(self.epochs, int):
            return self.epochs
        epochs = list(self.epochs)
        return int(epochs[task] if task < len(epochs) else epochs[-1])

    def logit_sets(self) -> tuple[str, str]:
        """(training, test) logit sets: ``train_logits`` / ``test_logits``, else the protocol's."""
        train, test = PROTOCOLS[self.protocol]
        return self.train_logits or train, self.test_logits or test

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay)

    def to_dict(self) -> dict[str, Any]:
        """The settings, with the logit sets resolved (what the run used, not None)."""
        out = dataclasses.asdict(self)
        out["epochs"] = self.epochs if isinstance(self.epochs, int) else list(self.epochs)
        out["train_logits"], out["test_logits"] = self.logit_sets()
        return out


def lr_factor(step: int, total: int, schedule: str, warmup_ratio: float) -> float:
    """Multiplier of the base learning rate at 0-based ``step`` of a task of ``total`` steps: a linear warm-up over
    the first ``warmup_ratio`` of the steps, then ``schedule`` (constant, linear decay to 0, or cosine)."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def fwt_unreported_reason(stream: Stream, head: str) -> str | None:
    """Why forward transfer is not reported for ``stream`` under ``head`` (None when it is).

    FWT compares the accuracy on task j after training task j - 1 with the accuracy of the untrained model on task j.
    An instruct stream's LM head and the ``label`` head score the answers before any training, so the zero-shot
    accuracy is a real baseline. A ``linear`` head of a task is random until that task trains (and a ``fixed`` head's
    class vectors are random directions unrelated to the classes), so both accuracies are those of a random head:
    their difference measures noise, not transfer."""
    if stream.kind != "classification" or head == "label":
        return None
    return (
        f"not reported with the {head} head: its class vectors are random before a task trains, so the zero-shot "
        "accuracy that FWT subtracts is chance and the difference measures noise; use the label head (or an "
        "instruction stream) for forward transfer"
    )


def check_compatible(stream: Stream, model: LoadedModel) -> None:
    """Raise ValueError when ``model`` cannot learn ``stream``: an instruct stream needs a causal LM, image inputs a
    vision model, text inputs a text model."""
    if stream.kind == "instruct" and model.kind != "causal":
        raise ValueError(
            f"stream {stream.name!r} is an instruction stream and needs a causal LM; model "
            f"{model.name!r} is of kind {model.kind}"
        )
    if stream.kind == "classification":
        wants = "vision" if stream.input_kind == "image" else "text"
        has = "vision" if model.kind == "vision" else "text"
        if wants != has:
            raise ValueError(
                f"stream {stream.name!r} has {stream.input_kind} inputs; model {model.name!r} is of kind {model.kind}"
            )


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with where the run stood (still a KeyboardInterrupt for code that does not look inside).

    Attributes:
        method: the method being trained (registry name), or None when no method had started.
        completed: 0-based index of the last task whose checkpoint was written (-1: none).
        num_tasks: tasks in the stream. finished_methods: methods of the same command that had finished.
    """

    def __init__(
        self, method: str | None, completed: int, num_tasks: int, finished_methods: Sequence[str] = ()
    ) -> None:
        super().__init__(method, completed, num_tasks)
        self.method, self.completed, self.num_tasks = method, completed, num_tasks
        self.finished_methods = list(finished_methods)


MethodFactory = Callable[..., ContinualMethod]


def _silent(message: str) -> None:
    """The log of a run that prints nothing (progress off, or a rank other than 0)."""


class TrainingObjective:
    """The trainer's side of the batch seam (:class:`treelora.cl.method.Objective`): the data, loss and logits of
    the training step that covers ``tasks`` (the current task, or every task for joint training), scored with the
    heads of tasks 0..``upto``.

    Args:
        trainer: the trainer. tasks: the tasks trained in this step. task: its index. upto: the last seen task.
    """

    def __init__(self, trainer: Trainer, tasks: Sequence[int], task: int, upto: int) -> None:
        self._trainer, self._tasks, self.task, self._upto = trainer, list(tasks), task, upto
        self.kind = trainer.stream.kind
        self.rank, self.world_size = trainer.dist.rank, trainer.dist.world_size

    def train_size(self, task: int) -> int:
        return len(self._trainer.stream.tasks[task].train)

    def train_batches(self) -> list[list[tuple[int, int]]]:
        t = self._trainer
        return epoch_batches(t.stream, self._tasks, self.task, 0, t.config.batch_size, t.sampler)

    def batch(self, items: Sequence[tuple[int, int]]) -> dict[str, Any]:
        return self._trainer.batches(items, "train")

    def loss(self, batch: dict[str, Any], logits_of: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        t = self._trainer
        if self.kind != "classification":
            if logits_of:
                raise ValueError(f"logits_of: stream {t.stream.name!r} is an instruction stream without class logits")
            return causal_lm_loss(t.model, batch), []
        features = t.loaded.features(batch)
        loss = t.heads.loss(features, batch["labels"], batch["task"], self._upto)
        logits = []
        for k in logits_of:
            # The columns of task k's classes among the logits the protocol gives task k (its own head, or every head
            # up to k under the class protocol).
            scores, classes = t.heads.logits(features, k, k)
            own = set(t.heads.task_classes[k])
            cols = [i for i, c in enumerate(classes) if c in own]
            logits.append(scores if len(cols) == len(classes) else scores[:, cols])
        return loss, logits

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        model = self._trainer.model
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


class Trainer:
    """Runs one continual-learning method over a stream.

    Args:
        stream: the tasks (:mod:`treelora.data`).
        model: a backbone from :func:`treelora.models.load_model`; LoRA is injected into it here (it is modified in
            place: load a fresh one per run).
        method: a registered method name or label (:func:`treelora.cl.registered_methods`: ``treelora``,
            ``seqlora``, ``olora``, ``ewc``, ``joint``, ``lwf``, ``replay``, ``inflora``) or a callable
            ``(layers, optimizer, **options) -> ContinualMethod``.
        config: :class:`TrainerConfig`.
        method_options: keyword options of the method (e.g. ``lambda_orth`` for O-LoRA, TreeLoRAConfig fields and
            ``preset`` for TreeLoRA); a registered method refuses options it does not have.
        callbacks: functions called as ``callback(trainer, task_index)`` after each task's checkpoint is written.
        sampler: the order of each epoch's training examples (default: :class:`~treelora.cl.batching.SeededShuffle`
            of the config's seed).
        distributed: where this process stands among several (default: the initialised torch.distributed default
            group, else a single process); see the module docstring for what a data-parallel run shares.

    Attributes:
        model: the backbone module (with LoRA layers). layers: the LoRA layers. heads: the classification heads.
        method: the :class:`ContinualMethod`. method_name: its registry name. batches, evaluator, checkpoints: the
            parts the loop uses. R: (N, N) accuracy matrix so far (NaN where not measured). completed: index of
            the last finished task (-1: none). dist: the :class:`~treelora.cl.distributed.DistributedContext`.
            state_checks: how many task ends found the method's state identical on every rank.
    """

    def __init__(
        self,
        stream: Stream,
        model: LoadedModel,
        method: Union[str, MethodFactory],
        config: TrainerConfig | None = None,
        method_options: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callable[[Trainer, int], None]] = (),
        sampler: Sampler | None = None,
        distributed: DistributedContext | None = None,
    ) -> None:
        if config is not None and not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        self.stream, self.loaded, self.config = stream, model, config or TrainerConfig()
        check_compatible(stream, model)
        cfg = self.config
        self.method_options = dict(method_options or {})
        if isinstance(method, str):
            registered = method_class(method)
            registered.check_options(self.method_options)  # a bad option fails before the model is touched
            factory: MethodFactory = registered.from_options
        elif callable(method):
            factory = method
        else:
            raise TypeError(f"method must be a method name or a callable, got {type(method).__name__}")
        self.device = torch.device(cfg.device)
        if distributed is not None and not isinstance(distributed, DistributedContext):
            raise TypeError(f"distributed must be a DistributedContext, got {type(distributed).__name__}")
        self.dist = distributed if distributed is not None else current_context(self.device)
        self.callbacks = list(callbacks)
        self.model = model.model.to(self.device)
        self.batches = BatchBuilder(stream, model.tokenizer, cfg.max_length, self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.layers = inject_lora(
                self.model,
                cfg.target_modules or model.target_modules,
                r=cfg.rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                lora_depth=cfg.lora_depth,
            )
            self.heads = self._build_heads()
        self.method = factory(self.layers, cfg.optimizer(), **self.method_options)
        if not isinstance(self.method, ContinualMethod):
            raise TypeError(f"method built a {type(self.method).__name__}, not a treelora.cl.ContinualMethod")
        self.method_name = self.method.name
        self.method.add_parameters(list(self.heads.parameters()))
        self.joint = bool(self.method.joint)
        self.sampler = sampler or SeededShuffle(cfg.seed)
        self.evaluator = Evaluator(
            stream, model, self.heads, self.batches, cfg.eval_batch_size, self.dist.rank, self.dist.world_size
        )
        self.checkpoints = CheckpointStore(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        n = len(stream)
        self.R = np.full((n, n), np.nan)
        self.zero_shot: np.ndarray | None = None
        self.train_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.losses: list[list[float]] = []
        self.steps: list[int] = []
        self.peak_memory = 0
        self.memory_kind = "rss"
        self.completed = -1
        self.checkpointed = -1
        self.state_checks = 0
        self._memory: PeakMemory | None = None

    # --- heads -----------------------------------------------------------------------------------------------------

    def _build_heads(self) -> TaskHeads:
        """The classification heads of the config's head kind and logit sets (nothing for an instruct stream).

        A ``label`` head's class vectors are the pooled features of the stream's class descriptions, computed here,
        before any training: LoRA's B is zero, so they are the pretrained backbone's features, the same on every
        run of the same model (and saved with the heads in each checkpoint). Under several processes rank 0's frozen
        class vectors are broadcast, so that every rank scores with the same head even if its features differ in the
        last bit (another GPU's kernels).

        Raises:
            ValueError: a frozen head on an instruct stream, or a ``label`` head on a stream without class
                descriptions or with image inputs (the message names ``head``).
        """
        cfg, stream = self.config, self.stream
        train_logits, test_logits = cfg.logit_sets()
        vectors = None
        if cfg.head != "linear":
            if stream.kind != "classification":
                raise ValueError(
                    f"head={cfg.head!r} applies to classification streams; {stream.name!r} is an instruction stream "
                    "(its LM head scores the answers): use head='linear'"
                )
            if cfg.head == "label":
                vectors = self._label_vectors()
        heads = TaskHeads(
            stream,
            self.loaded.hidden_size,
            cfg.protocol,
            head=cfg.head,
            train_logits=train_logits,
            test_logits=test_logits,
            class_vectors=vectors,
        ).to(self.device)
        if heads.frozen and self.dist.is_distributed:
            broadcast_parameters([heads.class_vectors])
        return heads

    @torch.no_grad()
    def _label_vectors(self) -> torch.Tensor:
        """(C, H) pooled features of ``stream.info["class_descriptions"]`` (the model in eval mode, 64 at a time)."""
        stream = self.stream
        descriptions = stream.info.get("class_descriptions")
        if stream.input_kind != "text" or not descriptions:
            raise ValueError(
                f"head='label' needs a text stream with class descriptions (stream.info['class_descriptions']); "
                f"{stream.name!r} has none: use head='fixed' or head='linear'"
            )
        if len(descriptions) != stream.num_classes:
            raise ValueError(
                f"head='label': {stream.name!r} has {len(descriptions)} class descriptions for "
                f"{stream.num_classes} classes"
            )
        training = self.model.training
        self.model.eval()
        texts = list(descriptions)
        vectors = torch.cat(
            [self.loaded.features(self.batches.text(texts[i : i + 64])) for i in range(0, len(texts), 64)]
        )
        self.model.train(training)
        return vectors

    # --- evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self, task: int, upto: int) -> float:
        """Accuracy in [0, 1] on ``task``'s test set with the model as it is after training task ``upto``
        (:meth:`treelora.cl.evaluation.Evaluator.counts`); every rank of a data-parallel run must call it."""
        return self.evaluate_tasks([task], upto)[0]

    def evaluate_tasks(self, tasks: Sequence[int], upto: int) -> list[float]:
        """Accuracies in [0, 1] on the test sets of ``tasks`` after training task ``upto``. Under several processes
        each rank scores its share of every test set and the counts are summed over ranks in one collective, so every
        rank returns the numbers one process would."""
        counts = [c for j in tasks for c in self.evaluator.counts(j, upto)]
        if self.dist.is_distributed:
            counts = sum_across_ranks(counts)
        return [correct / total for correct, total in zip(counts[0::2], counts[1::2])]

    # --- training --------------------------------------------------------------------------------------------------

    def _loss(
        self, items: list[tuple[int, int]], objective: TrainingObjective
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The task loss of one training batch (heads of tasks 0..upto compete under the class protocol), the
        method's extra loss on it (:meth:`ContinualMethod.training_loss`), and what the task loss is a mean over:
        examples (classification) or scored answer tokens (instruct), the rank's weight when the gradients are
        averaged over ranks."""
        batch = objective.batch(items)
        loss, extra = self.method.training_loss(batch, objective)
        weight = len(items) if self.stream.kind == "classification" else batch["num_targets"]
        return loss, extra, weight

    def _gradient_owners(self) -> list[int] | None:
        """For each of ``method.parameters()``: -1 for a LoRA adapter (every example's forward goes through every
        LoRA layer), k for a parameter of head k; None (for the whole list) when some parameter is neither, so that
        which parameters have a gradient must be read back from the all-reduce."""
        heads = {id(p): k for k, head in enumerate(self.heads) for p in head.parameters()}
        adapters = {id(p) for p in self.method.adapter_parameters()}
        owners: list[int] = []
        for p in self.method.parameters():
            if id(p) in adapters:
                owners.append(-1)
            elif id(p) in heads:
                owners.append(heads[id(p)])
            else:
                return None
        return owners

    def _average_gradients(
        self,
        params: list[torch.Tensor],
        items: list[tuple[int, int]],
        local: bool,
        weight: int,
        loss: torch.Tensor,
        owners: list[int] | None,
        upto: int,
    ) -> torch.Tensor:
        """Average the gradients over ranks (one collective, the loss riding in the same buffer); returns the loss of
        the whole global batch ``items``. ``local``: this rank's shard was not empty."""
        present = None
        if owners is not None:
            used = set(self.heads.heads_used((t for t, _ in items), upto))
            present = [k == -1 or k in used for k in owners]
            if local:
                missing = [i for i, (k, p) in enumerate(zip(owners, params)) if k == -1 and p.grad is None]
                if missing:
                    raise RuntimeError(
                        f"LoRA parameters {missing[:6]} of {self.method_name} got no gradient from a training batch: "
                        "every LoRA layer must be on the path of every example (check target_modules)"
                    )
        mean = all_reduce_gradients(params, weight, present=present, values=loss.detach().float().reshape(1))
        return mean[0]

    def train_task(
        self, index: int, tasks: Sequence[int] | None = None, label: str | None = None
    ) -> tuple[list[float], int]:
        """Train on task ``index`` (or, for joint training, on the mixed ``tasks``) for its epochs, calling the
        method's hooks in order; no evaluation.

        Returns:
            (mean loss per epoch, optimizer steps taken).
        Raises:
            FloatingPointError: the loss became NaN or infinite.
        """
        cfg = self.config
        tasks = [index] if tasks is None else list(tasks)
        label = label or f"[{self.method_name}] task {index + 1}/{len(self.stream)} {self.stream.tasks[index].name}"
        epochs = cfg.epochs_for(index)

        def batches(epoch: int) -> list[list[tuple[int, int]]]:
            return epoch_batches(self.stream, tasks, index, epoch, cfg.batch_size, self.sampler)

        batches_per_epoch = len(batches(0))
        total = batches_per_epoch * epochs
        if cfg.max_steps_per_task is not None:
            total = min(total, cfg.max_steps_per_task)
            epochs = math.ceil(total / batches_per_epoch)
        steps_per_epoch = min(batches_per_epoch, total)
        base_lr = self.method.optim.lr
        rank, world = self.dist.rank, self.dist.world_size
        # A method may draw random numbers at a task boundary (a fresh adapter): every rank must draw the same ones.
        if world > 1:
            broadcast_rng_state()
        self.method.begin_task(index, steps_per_epoch, epochs)
        upto = len(self.stream) - 1 if self.joint else index
        objective = TrainingObjective(self, tasks, index, upto)
        with objective.eval_mode(), torch.no_grad():
            self.method.prepare_task(objective)
        if world > 1:
            seed_per_rank()  # then independent dropout masks per rank
        self.model.train()
        bar = Progress(total, label, cfg.progress and self.dist.is_main)
        epoch_losses, step = [], 0
        params = self.method.parameters()
        # A method with its own batch loss (replay, distillation) may give a gradient to heads of tasks outside the
        # batch: which parameters have one is then read back from the all-reduce instead of worked out from the batch.
        own_loss = type(self.method).training_loss is not ContinualMethod.training_loss
        owners = self._gradient_owners() if self.dist.is_distributed and not own_loss else None
        try:
            for epoch in range(epochs):
                self.method.begin_epoch(epoch)
                running, count = torch.zeros((), device=self.device), 0
                for items in batches(epoch):
                    if step >= total:
                        break
                    local = shard(items, rank, world) if world > 1 else items
                    extra = None
                    if local:
                        loss, extra, weight = self._loss(local, objective)
                    else:
                        # A global batch smaller than the number of ranks: this rank still runs the method's hooks
                        # (the search draws and counts every step on every rank) with weight 0.
                        loss, weight = torch.zeros((), device=self.device), 0
                    total_loss = self.method.before_backward(loss if extra is None else loss + extra)
                    if local or total_loss.requires_grad:
                        total_loss.backward()
                    if world > 1:
                        loss = self._average_gradients(params, items, bool(local), weight, loss, owners, upto)
                    self.method.after_backward()
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
                    self.method.optim.lr = base_lr * lr_factor(step, total, cfg.schedule, cfg.warmup_ratio)
                    self.method.step()
                    self.method.optim.lr = base_lr
                    running = running + loss.detach().float()
                    count += 1
                    step += 1
                    if step % SYNC_EVERY == 0 or step == total:
                        # The loss of the whole global batch, the same on every rank: all ranks stop together.
                        value = float(loss.detach())
                        if not math.isfinite(value):
                            raise FloatingPointError(
                                f"training loss became {value} at step {step} of task {index} "
                                f"({self.stream.tasks[index].name}); lower the learning rate"
                            )
                        bar.update(step, value)
                epoch_losses.append(float(running) / max(count, 1))
        except KeyboardInterrupt:
            bar.abandon()
            raise
        if world > 1:
            broadcast_rng_state()
        self.method.end_task()
        bar.close()
        return epoch_losses, step

    # --- checkpoints -----------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        """The checkpoint file, or None when the config has no checkpoint_dir."""
        return self.checkpoints.path if self.checkpoints is not None else None

    def identity(self) -> dict[str, Any]:
        """What makes a checkpoint this run's: method and options, stream (name, info, task sizes), model, and the
        settings that change results (not the checkpoint folder, the progress flag or the device)."""
        cfg = self.config.to_dict()
        for key in ("checkpoint_dir", "progress", "device"):
            cfg.pop(key)
        return {
            "method": self.method_name,
            "method_options": dict(self.method_options),
            "stream": self.stream.name,
            "stream_info": dict(self.stream.info),
            "tasks": [(t.name, len(t.train), len(t.test)) for t in self.stream.tasks],
            "model": self.loaded.name,
            "config": cfg,
        }

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the adapters and heads (:func:`treelora.cl.checkpoint.adapter_state`)."""
        return adapter_state(self.layers, self.heads)

    def save_checkpoint(self) -> None:
        """Write the state after the last completed task, atomically (nothing without a checkpoint_dir). Under several
        processes rank 0 writes it (the state is the same on every rank) and an error there raises on every rank."""
        if self.checkpoints is None:
            return
        if self.dist.is_distributed:
            run_on_main(self._write_checkpoint)
        else:
            self._write_checkpoint()
        self.checkpointed = self.completed

    def _write_checkpoint(self) -> None:
        state = {
            "completed": self.completed,
            "adapters": self.adapter_state(),
            "method": self.method.state_dict(),
            "R": self.R.copy(),
            "zero_shot": None if self.zero_shot is None else self.zero_shot.copy(),
            "train_seconds": list(self.train_seconds),
            "eval_seconds": list(self.eval_seconds),
            "losses": [list(x) for x in self.losses],
            "steps": list(self.steps),
            "peak_memory": self.peak_memory,
            **rng_state(),
        }
        self.checkpoints.save(self.identity(), state)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint if there is one; False when there is none. Under several processes every rank
        reads the same file (a folder every rank can read: one machine, or a shared file system).

        Raises:
            treelora.cl.CheckpointError: the checkpoint belongs to a different run (method, stream, model or
                settings), has another format version or cannot be read.
        """
        state = self.checkpoints.load(self.identity()) if self.checkpoints is not None else None
        if state is None:
            return False
        load_adapter_state(self.layers, self.heads, state["adapters"])
        self.method.load_state_dict(state["method"])
        self.completed = self.checkpointed = state["completed"]
        self.R = state["R"]
        self.zero_shot = state["zero_shot"]
        self.train_seconds, self.eval_seconds = state["train_seconds"], state["eval_seconds"]
        self.losses, self.steps, self.peak_memory = state["losses"], state["steps"], state["peak_memory"]
        set_rng_state(state)
        return True

    # --- the run ---------------------------------------------------------------------------------------------------

    def run(self, resume: bool = False, log: Callable[[str], None] | None = None) -> RunResult:
        """Train task after task and return the results (resuming from the checkpoint when ``resume``).

        Under several processes only rank 0 logs, and an error on one rank (Ctrl-C included) leaves the process group
        (:func:`treelora.cl.distributed.abort_distributed`) before it propagates, so that the other ranks' next
        collective raises :class:`treelora.cl.distributed.CollectiveError` at once instead of waiting for the timeout.

        Raises:
            RunInterrupted: Ctrl-C (a KeyboardInterrupt), with the last task whose checkpoint was written.
            treelora.cl.CheckpointError: ``resume`` and a checkpoint that is not this run's.
            treelora.cl.distributed.StateMismatchError: the method's state differs between ranks at a task's end.
        """
        if self.dist.is_distributed:
            try:
                return self._run(resume, log)
            except BaseException:
                abort_distributed()
                raise
        return self._run(resume, log)

    def _run(self, resume: bool, log: Callable[[str], None] | None) -> RunResult:
        cfg = self.config
        if not self.dist.is_main:
            log = _silent
        elif log is None:
            log = (lambda msg: print(msg, file=sys.stderr)) if cfg.progress else _silent
        n = len(self.stream)
        try:
            loaded = resume and self.load_checkpoint()
            if resume and self.dist.is_distributed:
                # Every rank must have read the same checkpoint (or none): a folder that is not shared between the
                # machines, or a file replaced in between, is caught here instead of mid-task.
                check_identical_across_ranks(self.method, label=f"resuming {self.method_name} from the checkpoint")
            if loaded:
                log(f"[{self.method_name}] resumed after task {self.completed + 1}/{n} from {self.checkpoint_path}")
            else:
                torch.manual_seed(cfg.seed)
            with PeakMemory(self.device) as memory:
                self._memory = memory
                if self.completed < 0 and self.zero_shot is None and cfg.eval_zero_shot:
                    start = time.perf_counter()
                    self.zero_shot = np.array(self.evaluate_tasks(range(n), 0))
                    log(
                        f"[{self.method_name}] zero-shot accuracy: "
                        + " ".join(f"{a:.3f}" for a in self.zero_shot)
                        + f" ({time.perf_counter() - start:.1f} s)"
                    )
                if self.joint:
                    self._run_joint(log)
                else:
                    for k in range(self.completed + 1, n):
                        self._run_task(k, log)
        except RunInterrupted:
            raise
        except KeyboardInterrupt as e:
            raise RunInterrupted(self.method_name, self.checkpointed, n) from e
        finally:
            self._memory = None
        self.peak_memory = max(self.peak_memory, memory.peak)
        self.memory_kind = memory.kind
        return self.result()

    def _run_task(self, k: int, log: Callable[[str], None]) -> None:
        n = len(self.stream)
        start = time.perf_counter()
        losses, steps = self.train_task(k)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        last = min(k + 1, n - 1) if self.config.eval_next_task else k
        self.R[k, : last + 1] = self.evaluate_tasks(range(last + 1), k)
        eval_s = time.perf_counter() - start
        self._finish(k, losses, steps, train_s, eval_s, log)

    def _run_joint(self, log: Callable[[str], None]) -> None:
        n = len(self.stream)
        if self.completed == n - 1:
            return
        start = time.perf_counter()
        losses, steps = self.train_task(0, range(n), f"[{self.method_name}] all {n} tasks")
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        self.R[n - 1] = self.evaluate_tasks(range(n), n - 1)
        self._finish(n - 1, losses, steps, train_s, time.perf_counter() - start, log)

    def _finish(
        self, k: int, losses: list[float], steps: int, train_s: float, eval_s: float, log: Callable[[str], None]
    ) -> None:
        self.losses.append(losses)
        self.steps.append(steps)
        self.train_seconds.append(train_s)
        self.eval_seconds.append(eval_s)
        self.completed = k
        if self._memory is not None:  # so that a resumed run keeps the peak of the part before the interruption
            self.peak_memory = max(self.peak_memory, self._memory.current())
        row = " ".join("  -  " if np.isnan(v) else f"{v:.3f}" for v in self.R[k])
        log(f"[{self.method_name}] after task {k + 1}: {row} (train {train_s:.1f} s, eval {eval_s:.1f} s)")
        if self.dist.is_distributed:
            # Raises on every rank if any differs; a mismatched state is never checkpointed.
            check_identical_across_ranks(self.method, label=f"the end of task {k + 1} of {self.method_name}")
            self.state_checks += 1
        self.save_checkpoint()
        for callback in self.callbacks:
            callback(self, k)

    def result(self) -> RunResult:
        """The results so far (metrics only once every task is done)."""
        n = len(self.stream)
        R = self.R
        if self.joint:
            final = R[n - 1]
            summary: dict[str, float | None] = {"acc": float(np.mean(final)) if self.completed == n - 1 else None}
            summary.update(
                dict.fromkeys(("average_incremental_accuracy", "bwt", "bwt_gem", "bwt_official", "forgetting", "fwt"))
            )
        elif self.completed == n - 1:
            summary = dict(metrics.summarize(R, self.zero_shot))
            summary.setdefault("fwt", None)
            if fwt_unreported_reason(self.stream, self.config.head) is not None:
                summary["fwt"] = None
        else:
            summary = {}
        return RunResult(
            method=self.method_name,
            stream=self.stream.name,
            model=self.loaded.name,
            task_names=[t.name for t in self.stream.tasks],
            R=[[None if np.isnan(v) else float(v) for v in row] for row in R],
            zero_shot=None if self.zero_shot is None else [float(v) for v in self.zero_shot],
            metrics=summary,
            train_seconds=list(self.train_seconds),
            eval_seconds=list(self.eval_seconds),
            peak_memory_bytes=int(self.peak_memory),
            memory_kind=self.memory_kind,
            losses=self.losses,
            steps=list(self.steps),
            tree=self.method.learned_tree(),
            config=self.config.to_dict(),
            method_options={**self.method.options(), **self.method_options},
        )
