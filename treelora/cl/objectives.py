"""What the trainer optimises and scores: per-task linear heads for classification streams (under the task- or
class-incremental protocol) and the causal-LM loss on answer tokens for instruct streams.

Protocols for classification streams:

* ``"task"`` (task-incremental): one linear head per task over that task's classes; the task id picks the head at
  test time.
* ``"class"`` (class-incremental): the heads of all tasks seen so far are concatenated, so every class seen so far
  competes, at training and at test time; no task id is used at test time.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from treelora.data.stream import Stream

PROTOCOLS = ("task", "class")


class TaskHeads(nn.ModuleList):
    """One linear head (hidden -> the task's classes) per task of a classification stream; no heads for an instruct
    stream (its model's LM head scores the answers).

    Args:
        stream: the stream. hidden_size: width of the backbone's pooled features.
        protocol: ``"task"`` or ``"class"`` (see the module docstring).
    """

    def __init__(self, stream: Stream, hidden_size: int, protocol: str) -> None:
        classification = stream.kind == "classification"
        super().__init__(nn.Linear(hidden_size, len(t.classes)) for t in stream.tasks if classification)
        self.task_classes = [list(t.classes) for t in stream.tasks]
        self.num_classes = stream.num_classes
        self.protocol = protocol

    def seen_classes(self, upto: int) -> list[int]:
        """Global class ids of tasks 0..upto, in head order."""
        return [c for classes in self.task_classes[: upto + 1] for c in classes]

    def logits(self, features: torch.Tensor, task: int, upto: int) -> tuple[torch.Tensor, list[int]]:
        """Logits of the rows of ``features`` (B, H) belonging to ``task``: the task's head (task-incremental) or all
        heads of tasks 0..upto (class-incremental), with the global class ids of the columns."""
        if self.protocol == "task":
            return self[task](features), list(self.task_classes[task])
        return torch.cat([self[k](features) for k in range(upto + 1)], dim=1), self.seen_classes(upto)

    def heads_used(self, tasks: Iterable[int], upto: int) -> list[int]:
        """Indices of the heads that :meth:`loss` uses (and so gives a gradient) for a batch holding examples of
        ``tasks``: those tasks' heads (task-incremental) or the heads of tasks 0..upto (class-incremental); none for
        an empty batch. Worked out on the host from task ids, so a data-parallel trainer knows which heads have a
        gradient on some rank without reading anything back from the device."""
        tasks = sorted(set(int(t) for t in tasks))
        if not tasks:
            return []
        return tasks if self.protocol == "task" else list(range(upto + 1))

    def loss(self, features: torch.Tensor, labels: torch.Tensor, tasks: torch.Tensor, upto: int) -> torch.Tensor:
        """Mean cross-entropy of a batch: features (B, H), labels (B,) global class ids, tasks (B,) task ids; each
        row is scored by :meth:`logits` of its own task."""
        device = features.device
        total = features.new_zeros(())
        for task in torch.unique(tasks).tolist():
            rows = tasks == task
            logits, classes = self.logits(features[rows], task, upto)
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
