"""``LoRALinear``: a LoRA adapter around an ``nn.Linear`` in PEFT's layout, computed by the fused ``lora_linear`` op.

``y = x Wᵀ + b + s · (drop(x) A_allᵀ) B_allᵀ`` with A_all = [frozen_A; lora_A] (r_f + r, in) and
B_all = [frozen_B, lora_B] (out, r_f + r). The frozen stack is empty until :meth:`LoRALinear.freeze_adapter` pushes
the trained adapter onto it (O-LoRA style); every adapter in the stack shares the layer's scaling ``s``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Iterator

import torch
import torch.nn as nn

from treelora.ops.lora_linear import lora_linear


def check_rank(name: str, r: object) -> int:
    """``r`` as an int >= 1, or a ValueError/TypeError naming ``name``."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1 (the LoRA rank), got {r!r}")
    if r < 1:
        raise ValueError(f"{name} must be >= 1 (the LoRA rank), got {r}")
    return int(r)


def check_dropout(name: str, p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


def check_alpha(name: str, alpha: object) -> float | None:
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)):
        raise ValueError(f"{name} must be a finite number or None (None means lora_alpha = r), got {alpha!r}")
    return float(alpha)


def check_linear(name: str, module: object) -> nn.Linear:
    """``module`` if LoRALinear can wrap it: an nn.Linear whose forward is nn.Linear's own."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear, got {type(module).__name__}")
    if type(module).forward is not nn.Linear.forward:
        raise TypeError(
            f"{name} is a {type(module).__name__}, an nn.Linear subclass with its own forward (a quantized or "
            "otherwise customised layer); LoRALinear computes x Wᵀ + b itself and would bypass it"
        )
    return module


def fused_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float,
    training: bool,
    frozen_rank: int = 0,
) -> torch.Tensor:
    """:func:`treelora.ops.lora_linear` with ``torch.autocast`` honoured the way ``nn.Linear`` honours it.

    Under autocast, x is cast to the autocast dtype and the op runs with autocast off: the op already computes in
    x's dtype (fp32 on CPU), and letting autocast re-cast its internal matmuls would undo that choice.
    Shapes: x (..., in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r); returns (..., out).
    ``scaling`` is a Python number or a 0-dim tensor (PEFT's compiled hotswap keeps it as one), passed on as is.
    """
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, frozen_rank)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, frozen_rank)


class LoRALinear(nn.Module):
    """LoRA around ``base``: ``base(x) + s · dropout(x) @ A_allᵀ @ B_allᵀ`` in one fused op.

    Args:
        base: the ``nn.Linear`` to adapt, (out, in) weight; kept as ``self.base`` and never modified except by
            :meth:`merge` / :meth:`unmerge`. Its weight and bias are frozen (``requires_grad = False``); a user who
            sets them trainable again gets the unfused reference path (the fused op has no weight gradient).
        r: rank of the trainable adapter, >= 1.
        lora_alpha: scaling numerator. ``None`` means ``lora_alpha = r``, i.e. scaling 1 (or sqrt(r) with rsLoRA);
            PEFT's default is 8 whatever r is, so pass it explicitly to reproduce a PEFT configuration.
        lora_dropout: inverted-dropout probability on the adapter input, applied only in training mode.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        adapter_dtype: dtype of ``lora_A`` / ``lora_B`` and of the frozen stack; default the base weight's dtype.
            Pass ``torch.float32`` to keep fp32 adapters on a bf16 model (what PEFT's ``get_peft_model`` does).

    Attributes:
        lora_A: trainable (r, in), kaiming-uniform (a = sqrt(5)) like PEFT. lora_B: trainable (out, r), zeros.
        frozen_A: buffer (r_f, in); frozen_B: buffer (out, r_f): the frozen stack, 0 rows until
            :meth:`freeze_adapter`. They take part in the output and in dx but never receive a gradient.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)``), shared by the frozen stack and the trainable adapter.
        merged: whether the adapters are currently added into ``base.weight``.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_linear("base", base)
        self.r = check_rank("r", r)
        alpha = check_alpha("lora_alpha", lora_alpha)
        self.lora_alpha = float(self.r) if alpha is None else alpha
        self.lora_dropout = check_dropout("lora_dropout", lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.base = base
        base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        if adapter_dtype is not None and not adapter_dtype.is_floating_point:
            raise TypeError(f"adapter_dtype must be a floating-point dtype, got {adapter_dtype}")
        factory = {"device": base.weight.device, "dtype": adapter_dtype or base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        self.register_buffer("frozen_A", torch.empty(0, self.in_features, **factory))
        self.register_buffer("frozen_B", torch.empty(self.out_features, 0, **factory))
        self.merged = False
        self.adapters_enabled = True
        self.reset_lora_parameters()
        self.train(base.training)  # wrapping a layer of a model in eval mode must not switch dropout on

    # --- configuration ----------------------------------------------------------------------------------------

    @property
    def scaling(self) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def frozen_rank(self) -> int:
        """Rows in the frozen stack (sum of the ranks of the frozen adapters)."""
        return self.frozen_A.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (out, in), for code that reads ``module.weight`` (dtype checks, weight tying)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: kaiming-uniform(a = sqrt(5)) A, zero B, so a fresh adapter changes nothing."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def adapter_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole stack as one adapter: A_all (r_f + r, in) and B_all (out, r_f + r), gradients flowing only to
        the trainable slice."""
        if self.frozen_rank == 0:
            return self.lora_A, self.lora_B
        return torch.cat([self.frozen_A, self.lora_A]), torch.cat([self.frozen_B, self.lora_B], dim=1)

    # --- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out). Merged or disabled adapters run the base layer alone."""
        if self.merged or not self.adapters_enabled:
            return self.base(x)
        A, B = self.adapter_weights()
        return fused_lora_forward(
            x,
            self.base.weight,
            self.base.bias,
            A,
            B,
            self.scaling,
            self.lora_dropout,
            self.training,
            self.frozen_rank,
        )

    # --- merge / unmerge ----------------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """``s · B_all @ A_all``, (out, in) in the base weight's dtype: what :meth:`merge` adds to the weight.

        Computed in fp32 (fp64 for an fp64 weight) so a bf16/fp16 merge rounds once, at the end; differentiable
        with respect to lora_A and lora_B.
        """
        A, B = self.adapter_weights()
        compute = torch.float64 if self.base.weight.dtype == torch.float64 else torch.float32
        delta = (B.to(compute) @ A.to(compute)) * self.scaling
        return delta.to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add the adapters (frozen stack included) into ``base.weight``; forward then runs the base layer alone.

        With ``safe_merge`` the sum is formed in a copy and checked for NaN/inf before it replaces the weight.
        Merging a merged layer warns and does nothing (PEFT's behaviour).
        """
        if self.merged:
            warnings.warn(
                "LoRALinear.merge(): the adapter is already merged into the base weight; nothing done", stacklevel=2
            )
            return
        delta = self.delta_weight()
        weight = self.base.weight
        if safe_merge:
            merged = weight + delta
            if not torch.isfinite(merged).all():
                raise ValueError(
                    "LoRALinear.merge(safe_merge=True): the merged weight has NaN or inf entries; "
                    "the adapter is broken and the base weight was left unchanged"
                )
            weight.copy_(merged)
        else:
            weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapters from ``base.weight`` (restores it up to rounding). Warns when not merged."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): the adapter is not merged; nothing done", stacklevel=2)
            return
        self.base.weight.sub_(self.delta_weight())
        self.merged = False

    # --- frozen stack -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def freeze_adapter(self) -> None:
        """Push the trainable adapter onto the frozen stack and start a fresh one (kaiming A, zero B).

        The output is unchanged by the call (the fresh B is zero). lora_A / lora_B stay the same Parameter objects,
        so optimizers keep referencing them; their moments, however, belong to the old adapter: reset them.
        """
        if self.merged:
            raise RuntimeError("LoRALinear.freeze_adapter(): the layer is merged; call unmerge() first")
        self.frozen_A = torch.cat([self.frozen_A, self.lora_A.detach().to(self.frozen_A.dtype)])
        self.frozen_B = torch.cat([self.frozen_B, self.lora_B.detach().to(self.frozen_B.dtype)], dim=1)
        self.reset_lora_parameters()

    def set_frozen_stack(self, frozen_A: torch.Tensor, frozen_B: torch.Tensor) -> None:
        """Replace the frozen stack: frozen_A (r_f, in), frozen_B (out, r_f), r_f >= 0; copied in the adapter dtype."""
        if self.merged:
            raise RuntimeError("LoRALinear.set_frozen_stack(): the layer is merged; call unmerge() first")
        if frozen_A.dim() != 2 or frozen_A.shape[1] != self.in_features:
            raise ValueError(f"frozen_A must be (r_f, in={self.in_features}), got {tuple(frozen_A.shape)}")
        if tuple(frozen_B.shape) != (self.out_features, frozen_A.shape[0]):
            raise ValueError(
                f"frozen_B must be (out, r_f) = ({self.out_features}, {frozen_A.shape[0]}), got {tuple(frozen_B.shape)}"
            )
        factory = {"device": self.lora_A.device, "dtype": self.lora_A.dtype}
        self.frozen_A = frozen_A.detach().to(**factory, copy=True).contiguous()
        self.frozen_B = frozen_B.detach().to(**factory, copy=True).contiguous()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint taken after freeze_adapter() has a taller stack than a freshly built layer: resize the
        # buffers to the checkpoint's so that resuming a stacked run needs no manual set-up.
        for name, dim in (("frozen_A", 0), ("frozen_B", 1)):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.dim() == 2 and incoming.shape != current.shape:
                other = 1 - dim
                if incoming.shape[other] == current.shape[other]:
                    shape = list(current.shape)
                    shape[dim] = incoming.shape[dim]
                    setattr(self, name, current.new_empty(shape))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, frozen_rank={self.frozen_rank}, merged={self.merged}"
        )


def lora_layers(module: nn.Module) -> list[LoRALinear]:
    """Every :class:`LoRALinear` in ``module`` (itself included), in ``named_modules`` order: shallowest first."""
    return [m for m in module.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def disable_adapters(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model: every LoRALinear inside computes ``base(x)`` only while the block runs.

    Merged layers are unmerged on entry and merged again on exit (their base weights then differ from before by
    floating-point rounding of one subtract/add pair).
    """
    layers = lora_layers(module)
    if not layers:
        raise ValueError(f"disable_adapters: {type(module).__name__} contains no treelora.nn.LoRALinear layers")
    states = [(layer, layer.adapters_enabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            layer.adapters_enabled = False
        yield
    finally:
        for layer, enabled, merged in states:
            layer.adapters_enabled = enabled
            if merged and not layer.merged:
                layer.merge()
