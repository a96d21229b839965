"""Baseline continual-learning methods on LoRA adapters, under the :class:`~treelora.cl.method.ContinualMethod`
interface: sequential fine-tuning (SeqLoRA), O-LoRA, EWC on the LoRA parameters and joint multitask training.

Every method trains the trainable adapter of each layer (``lora_A`` (r, in), ``lora_B`` (out, r)) with AdamW. The
optimizer moments carry over from task to task (as in TreeLoRA with a shared adapter, so that the two differ only in
TreeLoRA's regularizer and update rule), except in O-LoRA, whose fresh adapter per task starts with fresh moments.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from treelora.cl._checks import check_number
from treelora.cl.method import ContinualMethod, OptimizerConfig


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
        for i, layer in enumerate(self.layers):
            if not (hasattr(layer, "freeze_adapter") and hasattr(layer, "frozen_A")):
                raise TypeError(
                    f"layers[{i}] is a {type(layer).__name__}; O-LoRA needs treelora.nn.LoRALinear layers "
                    "(a frozen adapter stack)"
                )
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
