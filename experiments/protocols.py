"""Classification protocols beyond the trainer's ``task`` / ``class``, as a small Trainer subclass.

The trainer builds one trainable linear head per task and either scores a task's own classes (``task``) or every
class seen so far, at training and at test (``class``). For streams where forgetting must go through the adapter
(the only thing TreeLoRA's regularizer acts on) these experiments also need:

* ``head="label"``: one frozen cosine classifier for the whole stream whose class vectors are the backbone's
  pooled features of each class's description (``stream.info["class_descriptions"]``), computed once before training
  (LoRA B = 0 then, so they are the pretrained model's features); logits = scale * cos(feature, class vector).
* ``head="fixed"``: a frozen random orthonormal class matrix (for backbones without text), same cosine logits.
* ``train_logits`` / ``test_logits``: ``"task"`` (the task's own classes) or ``"seen"`` (every class seen so far).
  ``linear``/``task``/``task`` is the trainer's ``task`` protocol, ``linear``/``seen``/``seen`` its ``class`` one,
  ``linear``/``task``/``seen`` the L2P / InfLoRA protocol.

This is an experiment-side emulation of a trainer option (a head kind and training / test logit sets).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from treelora.cl.trainer import Trainer

HEADS = ("linear", "label", "fixed")
LOGITS = ("task", "seen")


class CosineHead(nn.Module):
    """Frozen class vectors (C, H) as a buffer; ``forward(features, classes)`` -> (B, len(classes)) scaled cosines."""

    def __init__(self, vectors: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("vectors", F.normalize(vectors.float(), dim=-1))
        self.scale = scale

    def forward(self, features: torch.Tensor, classes: list[int]) -> torch.Tensor:
        idx = torch.tensor(classes, device=features.device)
        return self.scale * F.normalize(features.float(), dim=-1) @ self.vectors[idx].T


class ProtocolTrainer(Trainer):
    """Trainer with a head kind and separate training / test logit sets (see the module docstring)."""

    def __init__(
        self,
        *args: Any,
        head: str = "linear",
        train_logits: str = "task",
        test_logits: str = "seen",
        head_scale: float = 16.0,
        **kwargs: Any,
    ) -> None:
        if head not in HEADS or train_logits not in LOGITS or test_logits not in LOGITS:
            raise ValueError(f"head in {HEADS}, logits in {LOGITS}; got {head}, {train_logits}, {test_logits}")
        self.head_kind, self.train_logits, self.test_logits, self.head_scale = (
            head,
            train_logits,
            test_logits,
            head_scale,
        )
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def _build_heads(self) -> nn.ModuleList:
        if self.head_kind == "linear":
            return super()._build_heads()
        n, hidden = self.stream.num_classes, self.loaded.hidden_size
        if self.head_kind == "fixed":
            g = torch.Generator().manual_seed(12345)
            q, _ = torch.linalg.qr(torch.randn(hidden, max(hidden, n), generator=g))
            vectors = q[:, :n].T if n <= hidden else torch.randn(n, hidden, generator=g)
        else:
            texts = self.stream.info["class_descriptions"]
            self.model.eval()
            vectors = torch.cat([self.loaded.features(self._text_batch(texts[i : i + 64])) for i in range(0, n, 64)])
        return nn.ModuleList([CosineHead(vectors.to(self.device), self.head_scale)])

    def _logits(self, features: torch.Tensor, task: int, upto: int) -> tuple[torch.Tensor, list[int]]:
        which = self.train_logits if self.model.training else self.test_logits
        classes = list(self.stream.tasks[task].classes) if which == "task" else self._seen_classes(upto)
        if self.head_kind != "linear":
            return self.heads[0](features, classes), classes
        if which == "task":
            return self.heads[task](features), classes
        return torch.cat([self.heads[k](features) for k in range(upto + 1)], dim=1), classes
