"""The experiments' head / logit-set options, now trainer options (:mod:`treelora.cl.objectives`).

``ProtocolTrainer(stream, model, method, config, head=..., train_logits=..., test_logits=...)`` is the trainer with
those three settings written into its config, so that the runner's command lines (``--head label --train-logits task
--test-logits seen``) keep their meaning:

* ``head="label"``: one frozen cosine classifier (scale 16) whose class vectors are the backbone's pooled features of
  each class's description, computed before training (LoRA B = 0).
* ``head="fixed"``: frozen random orthonormal class vectors (for backbones without text), same cosine logits.
* ``train_logits`` / ``test_logits``: ``"task"`` (the task's own classes) or ``"seen"`` (every class seen so far).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from treelora.cl.objectives import HEADS, LOGIT_SETS
from treelora.cl.trainer import Trainer, TrainerConfig

__all__ = ["HEADS", "LOGITS", "ProtocolTrainer"]
LOGITS = LOGIT_SETS


class ProtocolTrainer(Trainer):
    """Trainer with a head kind and separate training / test logit sets given as keyword arguments."""

    def __init__(
        self,
        stream: Any,
        model: Any,
        method: Any,
        config: TrainerConfig | None = None,
        *,
        head: str = "linear",
        train_logits: str = "task",
        test_logits: str = "seen",
        **kwargs: Any,
    ) -> None:
        config = dataclasses.replace(
            config or TrainerConfig(), head=head, train_logits=train_logits, test_logits=test_logits
        )
        super().__init__(stream, model, method, config, **kwargs)
