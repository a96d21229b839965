"""What the trainer optimises and scores: heads for classification streams (a head kind and separate training and
test logit sets) and the causal-LM loss on answer tokens for instruct streams.

Head kinds (``head``):

* ``"linear"``: one trainable linear head per task over that task's classes.
* ``"label"``: one frozen cosine classifier for the whole stream whose class vectors are the backbone's pooled
  features of each class's description (``stream.info["class_descriptions"]``), computed once before training while
  LoRA's B is zero (so they are the pretrained model's features); logits = ``COSINE_SCALE`` * cos(feature, class
  vector). Nothing in the head trains, so every change of the predictions (forgetting included) goes through the
  adapters, the only thing a LoRA continual-learning method acts on; and the head means something before training
  (zero-shot accuracy, forward transfer).
* ``"fixed"``: frozen random orthonormal class vectors drawn from a fixed seed (``FIXED_HEAD_SEED``), same cosine
  logits; for backbones without text (the ViT).

Logit sets (``train_logits`` at training, ``test_logits`` at test):

* ``"task"``: the classes of the example's own task (the task id picks them).
* ``"seen"``: every class of the tasks seen so far; no task id is used.

Named protocols (``protocol``) fix both logit sets: ``"task"`` = task/task (task-incremental), ``"class"`` =
seen/seen (class-incremental at training and test) and ``"class-il"`` = task/seen (class-incremental at test with
the L2P / InfLoRA training loss: each example is scored over its task's classes while training, over every class seen
so far at test). With a linear head, ``task`` and ``class`` are the trainer's original protocols.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from treelora.data.stream import Stream

HEADS = ("linear", "label", "fixed")
LOGIT_SETS = ("task", "seen")
# protocol name -> (training logit set, test logit set)
PROTOCOLS: dict[str, tuple[str, str]] = {
    "task": ("task", "task"),
    "class": ("seen", "seen"),
    "class-il": ("task", "seen"),
}
# Scale of the cosine logits of the frozen heads: cosines lie in [-1, 1], so without a scale the softmax over 4-32
# classes stays near uniform and the cross-entropy's gradient barely depends on the label; 16 is the usual
# normalised-softmax temperature, and with it the class-incremental WordNet stream trains to 45-80% on each new task.
COSINE_SCALE = 16.0
# Seed of the ``fixed`` head's class vectors: the same vectors for every run, seed and rank.
FIXED_HEAD_SEED = 12345


def fixed_class_vectors(num_classes: int, hidden_size: int) -> torch.Tensor:
    """(num_classes, hidden_size) class vectors of the ``fixed`` head: orthonormal rows of a QR factor of a Gaussian
    matrix drawn from ``FIXED_HEAD_SEED`` (unit-norm random rows when there are more classes than dimensions)."""
    g = torch.Generator().manual_seed(FIXED_HEAD_SEED)
    if num_classes > hidden_size:
        return F.normalize(torch.randn(num_classes, hidden_size, generator=g, dtype=torch.float64), dim=-1).float()
    q, _ = torch.linalg.qr(torch.randn(hidden_size, num_classes, generator=g, dtype=torch.float64))
    return q.T.contiguous().float()


class TaskHeads(nn.ModuleList):
    """The classification heads of a stream: one linear head (hidden -> the task's classes) per task, or one frozen
    cosine classifier over every class of the stream (no modules, the class vectors a buffer); nothing for an instruct
    stream (its model's LM head scores the answers).

    Args:
        stream: the stream. hidden_size: width of the backbone's pooled features.
        protocol: a name of :data:`PROTOCOLS` (the default logit sets).
        head: ``"linear"``, ``"label"`` or ``"fixed"`` (see the module docstring).
        train_logits, test_logits: ``"task"`` or ``"seen"``; None takes the protocol's.
        class_vectors: (num_classes, hidden_size) class vectors of a frozen head (``label``: the features of the
            class descriptions; ``fixed``: None draws :func:`fixed_class_vectors`).

    Attributes:
        class_vectors: (num_classes, hidden_size) unit-norm rows (float32 buffer, saved with the heads' state) of a
            frozen head; absent for linear heads.
    """

    def __init__(
        self,
        stream: Stream,
        hidden_size: int,
        protocol: str = "task",
        head: str = "linear",
        train_logits: str | None = None,
        test_logits: str | None = None,
        class_vectors: torch.Tensor | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        for name, value in (("train_logits", train_logits), ("test_logits", test_logits)):
            if value is not None and value not in LOGIT_SETS:
                raise ValueError(f"{name} must be one of {', '.join(LOGIT_SETS)}, got {value!r}")
        classification = stream.kind == "classification"
        linear = head == "linear"
        super().__init__(nn.Linear(hidden_size, len(t.classes)) for t in stream.tasks if classification and linear)
        self.task_classes = [list(t.classes) for t in stream.tasks]
        self.num_classes = stream.num_classes
        self.protocol, self.head = protocol, head
        self.train_logits = train_logits or PROTOCOLS[protocol][0]
        self.test_logits = test_logits or PROTOCOLS[protocol][1]
        self.frozen = classification and not linear
        if self.frozen:
            if class_vectors is None:
                if head == "label":
                    raise ValueError("head='label' needs class_vectors (the features of the class descriptions)")
                class_vectors = fixed_class_vectors(self.num_classes, hidden_size)
            if tuple(class_vectors.shape) != (self.num_classes, hidden_size):
                raise ValueError(
                    f"class_vectors must be ({self.num_classes}, {hidden_size}), got {tuple(class_vectors.shape)}"
                )
            self.register_buffer("class_vectors", F.normalize(class_vectors.detach().float(), dim=-1))

    def seen_classes(self, upto: int) -> list[int]:
        """Global class ids of tasks 0..upto, in head order."""
        return [c for classes in self.task_classes[: upto + 1] for c in classes]

    def logits(
        self, features: torch.Tensor, task: int, upto: int, training: bool = False
    ) -> tuple[torch.Tensor, list[int]]:
        """Logits of the rows of ``features`` (B, H) belonging to ``task`` over the training (``training``) or test
        logit set: the task's classes, or every class of tasks 0..upto; returns (B, C) logits and the global class ids
        of the C columns."""
        which = self.train_logits if training else self.test_logits
        classes = list(self.task_classes[task]) if which == "task" else self.seen_classes(upto)
        if self.frozen:
            vectors = self.class_vectors[torch.tensor(classes, device=features.device)]
            return COSINE_SCALE * F.normalize(features.float(), dim=-1) @ vectors.T, classes
        if which == "task":
            return self[task](features), classes
        return torch.cat([self[k](features) for k in range(upto + 1)], dim=1), classes

    def heads_used(self, tasks: Iterable[int], upto: int) -> list[int]:
        """Indices of the linear heads that :meth:`loss` uses (and so gives a gradient) for a batch holding examples
        of ``tasks``: those tasks' heads (training logits ``task``) or the heads of tasks 0..upto (``seen``); none for
        an empty batch or a frozen head. Worked out on the host from task ids, so a data-parallel trainer knows which
        heads have a gradient on some rank without reading anything back from the device."""
        tasks = sorted(set(int(t) for t in tasks))
        if not tasks or self.frozen:
            return []
        return tasks if self.train_logits == "task" else list(range(upto + 1))

    def loss(self, features: torch.Tensor, labels: torch.Tensor, tasks: torch.Tensor, upto: int) -> torch.Tensor:
        """Mean cross-entropy of a training batch: features (B, H), labels (B,) global class ids, tasks (B,) task ids;
        each row is scored over the training logit set of its own task (:meth:`logits` with ``training=True``)."""
        device = features.device
        total = features.new_zeros(())
        for task in torch.unique(tasks).tolist():
            rows = tasks == task
            logits, classes = self.logits(features[rows], task, upto, training=True)
            lookup = torch.full((self.num_classes,), -100, dtype=torch.long, device=device)
            lookup[torch.tensor(classes, device=device)] = torch.arange(len(classes), device=device)
            total = total + F.cross_entropy(logits, lookup[labels[rows]], reduction="sum")
        return total / labels.shape[0]


def causal_lm_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens of a padded batch (``input_ids``, ``attention_mask``,
    ``labels`` (B, S), -100 outside the answers).

    Logits are computed only over the columns that hold answer tokens (``logits_to_keep``): the LM head over the whole
    sequence is about a fifth of SmolLM2-135M's compute (49,152 x 576 of its 134.5M parameters), and the prompt
    positions are not scored.
    """
    target = batch["labels"][:, 1:]
    cols = (target != -100).any(0).nonzero().flatten()
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    keep = torch.arange(lo, hi, device=target.device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = out.logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target[:, lo:hi].reshape(-1), ignore_index=-100
    )
