"""Fused LoRA linear (SPEC 3.1): ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``.

Shapes: x (..., K); weight W (N, K) frozen; bias b (N,) or None, frozen; lora_A (r, K); lora_B (N, r); scaling s.
``drop`` is inverted dropout with probability p, applied only when ``training``. With ``frozen_rank = f`` the first
f rows of lora_A and the first f columns of lora_B form a stack of frozen adapters: they take part in the output and
in dx, but their gradients are zero (O-LoRA style: A_all = [A_frozen; A_new], B_all = [B_frozen, B_new]).

Backends (treelora/kernels/{torch,triton,cuda}/lora.py) share one autograd Function (:class:`LoRALinearFunction`) and
provide ``lora_linear_fwd``, ``lora_linear_bwd`` and ``lora_linear_dropout_mask`` (the contract is written in
treelora/kernels/torch/lora.py). Before any backend runs, this module handles, for every backend alike:

* ``torch.autocast``: inside an autocast region the op computes what PEFT's LoRA layer computes there (its base
  ``nn.Linear`` and the two adapter linears all run in the autocast dtype): x, W, b, A and B are cast to the autocast
  dtype (float64 tensors excepted, as autocast does) and the op runs with autocast off, so the output has the
  autocast dtype and no matmul inside is cast again; with or without grad (:func:`lora_linear`).
* a 0-dim tensor ``scaling`` (PEFT's ``prepare_model_for_compiled_hotswap`` makes one): it is folded into lora_B
  (``B' = s·B``, an ordinary differentiable product, so x, A, B and s get exact gradients) and the backends run with
  scale 1.0; no host synchronisation (the value is never read on the host). Cost: one (N, r) multiply in the forward,
  one more for dB in the backward (and an (N, r) product-sum for ds when s requires grad), 65K elements at N = 4096,
  r = 16 next to the 2·M·N·K = 1.4e11 FLOPs of the base GEMMs at M = K = 4096, plus the (N, r) product kept for the
  backward (256 KB in fp32). When s requires grad and a frozen stack is present, the stack is frozen by detaching
  (two (r, K) + (N, r) copies) and the backend also computes the stack's (discarded) gradient slices, f/r more
  adapter-gradient work, because ds needs the stack's share. Passing s to the kernels as a tensor instead would
  change the signatures of three kernel languages and their compile specs; folding it into the r-wide intermediate
  u would have to happen inside every backend. Python-number scalings take the unfolded path.
* routing (:func:`launch_forward`): empty inputs (M, N or K = 0: nothing to launch) and a Python scale of exactly 0
  (a disabled adapter: y is bitwise the base op ``F.linear`` in x's dtype) run on the torch backend whatever backend
  was chosen; the kernel backends never see them.
* a trainable W or b: the reference path (the fused op has no weight gradient), warned once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from treelora import backends
from treelora.kernels.constants import FLOAT_DTYPES, dtype_message
from treelora.kernels.torch import lora as torch_lora
from treelora.ops._validation import check_finite_number, check_int, check_same_device, check_tensor

OP = "lora_linear"

backends.register_family(
    "lora_linear",
    ops={OP: ("lora_linear_fwd", "lora_linear_bwd", "lora_linear_dropout_mask")},
    torch=torch_lora,
    triton="treelora.kernels.triton.lora",
    cuda="treelora.kernels.cuda.lora",
)


# --- reference ----------------------------------------------------------------------------------------------------


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    frozen_rank: int = 0,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain-autograd reference. ``dropout_mask`` (bool, x's shape) gives the kept entries when dropout is on.

    Computes in x's dtype (the adapters and weight are cast to it), or in fp32 when ``upcast`` (fp64 inputs stay
    fp64): call it with fp64 tensors for the oracle of the tests. ``scaling`` may be a 0-dim tensor.
    """
    out_dtype = x.dtype
    compute = x.dtype
    if upcast and x.dtype != torch.float64:
        compute = torch.float32
    xc = x.to(compute)
    xd = xc if dropout_mask is None else xc * dropout_mask.to(compute) / (1.0 - dropout_p)
    A, B = lora_A, lora_B
    if frozen_rank:
        A = torch.cat([A[:frozen_rank].detach(), A[frozen_rank:]], dim=0)
        B = torch.cat([B[:, :frozen_rank].detach(), B[:, frozen_rank:]], dim=1)
    y = F.linear(xc, weight.to(compute), None if bias is None else bias.to(compute))
    y = y + scaling * F.linear(F.linear(xd, A.to(compute)), B.to(compute))
    return y.to(out_dtype)


# --- launching a backend ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """Which backend module ran a forward (after routing) and its non-tensor state, for the backward."""

    impl: Any
    state: Any


def _routed(impl: Any, x2d: torch.Tensor, weight: torch.Tensor, scaling: float) -> Any:
    """The backend module that runs: the torch backend for empty inputs and a scale of exactly 0."""
    if scaling == 0.0 or x2d.shape[0] == 0 or x2d.shape[1] == 0 or weight.shape[0] == 0:
        return torch_lora
    return impl


def launch_forward(
    impl: Any,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    frozen_rank: int,
    needs_grad: bool,
) -> tuple[torch.Tensor, tuple, Launch]:
    """``impl.lora_linear_fwd`` on validated 2-D inputs, or the torch backend's for the inputs routed to it.

    Args:
        impl: a backend module (``backends.select(...).module``).
        x2d: (M, K), possibly non-contiguous; weight (N, K); bias (N,) or None; lora_A (r, K); lora_B (N, r).
        scaling: a Python number (a tensor scale is folded into lora_B before, by :func:`lora_linear`).
        dropout_p, frozen_rank: as for :func:`lora_linear` (p already 0 outside training).
        needs_grad: whether a backward will follow (else nothing is saved).

    Returns:
        y2d (M, N) in x's dtype, the tensors to save for backward, and the :class:`Launch` for the backward.
    """
    impl = _routed(impl, x2d, weight, scaling)
    y2d, saved, state = impl.lora_linear_fwd(
        x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank, needs_grad
    )
    return y2d, saved, Launch(impl, state)


def launch_backward(
    dy2d: torch.Tensor, saved: tuple, launch: Launch, needs_dx: bool, needs_dA: bool, needs_dB: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward of a :func:`launch_forward`: dx (M, K), dA (r - f, K) and dB (N, r - f) (trainable slices)."""
    return launch.impl.lora_linear_bwd(dy2d, saved, launch.state, needs_dx, needs_dA, needs_dB)


def launch_dropout_mask(saved: tuple, launch: Launch) -> torch.Tensor | None:
    """The (M, K) bool keep-mask of a :func:`launch_forward` (for tests); None without dropout."""
    return launch.impl.lora_linear_dropout_mask(saved, launch.state)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd glue shared by every backend: reshape to 2-D, launch, pad the frozen slices' gradients with zeros.

    ``apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank, impl)`` with ``impl`` a backend module.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank, impl):
        x2d = x.reshape(-1, x.shape[-1])
        needs = ctx.needs_input_grad
        needs_grad = needs[0] or needs[3] or needs[4]
        # Backends choose their compute dtypes explicitly; an enclosing autocast must not re-cast their matmuls.
        with torch.autocast(device_type=x.device.type, enabled=False):
            y2d, saved, launch = launch_forward(
                impl, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank, needs_grad
            )
        ctx.save_for_backward(*saved)
        ctx.launch = launch
        ctx.meta = (x.shape, lora_A.shape, lora_B.shape, lora_A.dtype, lora_B.dtype, frozen_rank)
        return y2d.view(*x.shape[:-1], y2d.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x_shape, a_shape, b_shape, a_dtype, b_dtype, frozen_rank = ctx.meta
        needs = ctx.needs_input_grad
        dy2d = dy.reshape(-1, dy.shape[-1])
        with torch.autocast(device_type=dy.device.type, enabled=False):  # backward may run inside autocast too
            dx, dA, dB = launch_backward(dy2d, ctx.saved_tensors, ctx.launch, needs[0], needs[3], needs[4])
        if frozen_rank and dA is not None:
            full = torch.zeros(a_shape, dtype=a_dtype, device=dA.device)
            full[frozen_rank:] = dA
            dA = full
        if frozen_rank and dB is not None:
            full = torch.zeros(b_shape, dtype=b_dtype, device=dB.device)
            full[:, frozen_rank:] = dB
            dB = full
        if dx is not None:
            dx = dx.view(x_shape)
        return dx, None, None, dA, dB, None, None, None, None


# --- validation and the public op ---------------------------------------------------------------------------------


def _check_scaling(scaling: Any, device: torch.device) -> float | torch.Tensor:
    """A finite Python number, or a 0-dim float tensor on x's device or the CPU (its value is never read)."""
    if not isinstance(scaling, torch.Tensor):
        return check_finite_number("scaling", scaling)
    if scaling.dtype not in FLOAT_DTYPES:
        raise TypeError(dtype_message("scaling", scaling.dtype, FLOAT_DTYPES))
    if scaling.dim() != 0:
        raise ValueError(f"scaling must be a Python number or a 0-dim tensor, got shape {tuple(scaling.shape)}")
    if scaling.device.type != "cpu" and scaling.device != device:
        raise ValueError(f"scaling is on {scaling.device} but x is on {device} (a CPU tensor is also accepted)")
    return scaling


def _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension is {x.shape[-1]} but weight (out, in) = {tuple(weight.shape)} has in={K}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        if bias.shape[0] != N:
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has out_features {N}")
    check_tensor("lora_A", lora_A, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("lora_B", lora_B, ndim=2, dtypes=FLOAT_DTYPES)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A has rank {r} (shape {tuple(lora_A.shape)}): the LoRA rank r must be >= 1")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be (r, in) = (r, {K}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must be (out, r) = ({N}, {r}) to match weight and lora_A, got {tuple(lora_B.shape)}")
    scaling = _check_scaling(scaling, x.device)
    dropout_p = check_finite_number("dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    check_int("frozen_rank", frozen_rank, low=0, high=r)
    check_same_device({"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    return scaling, dropout_p


def _autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as autocast hands it to a linear op: floating tensors other than float64 cast to ``dtype``."""
    if t is None or t.dtype == torch.float64:
        return t
    return t.to(dtype)


_warned_trainable_weight = False


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    frozen_rank: int = 0,
) -> torch.Tensor:
    """LoRA linear through the fastest backend that can run it (see the module docstring for the contract).

    Args:
        x: (..., K) activations (fp32, fp16 or bf16; fp64 runs on the torch backend).
        weight: (N, K) frozen base weight. If it requires grad, the reference path runs instead (warned once).
        bias: (N,) frozen base bias, or None.
        lora_A: (r, K), lora_B: (N, r), r >= 1; their dtype may differ from x's (computed in x's dtype).
        scaling: s = lora_alpha / r (or / sqrt(r) for rsLoRA): a Python number, or a 0-dim float tensor on x's
            device or the CPU (never read on the host; it receives a gradient when it requires one).
        dropout_p: inverted-dropout probability in [0, 1), applied to the adapter input only when ``training``.
        training: whether dropout is active.
        frozen_rank: leading rows of lora_A / columns of lora_B that are frozen (zero gradient).

    Returns:
        (..., N) in x's dtype, or in the autocast dtype inside an autocast region.
    """
    scaling, dropout_p = _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank)
    p = dropout_p if training else 0.0
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return _lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, frozen_rank)
    dtype = torch.get_autocast_dtype(device_type)
    x, weight, bias, lora_A, lora_B = (_autocast(t, dtype) for t in (x, weight, bias, lora_A, lora_B))
    with torch.autocast(device_type, enabled=False):
        return _lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, frozen_rank)


def _lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, frozen_rank):
    """The op on validated inputs, outside autocast, with the effective dropout probability ``p``."""
    global _warned_trainable_weight
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        if not _warned_trainable_weight:
            warnings.warn("lora_linear: weight or bias requires grad; using the unfused reference path", stacklevel=3)
            _warned_trainable_weight = True
        mask = torch.empty_like(x).bernoulli_(1.0 - p).bool() if p > 0 else None
        return lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, p, mask, frozen_rank)
    if isinstance(scaling, torch.Tensor):
        if frozen_rank and scaling.requires_grad:
            # ds sums over every adapter, frozen ones included, but the Function zeroes the frozen slices' gradients:
            # freeze them by detaching instead (as the reference does), so that s sees their share.
            lora_A = torch.cat([lora_A[:frozen_rank].detach(), lora_A[frozen_rank:]])
            lora_B = torch.cat([lora_B[:, :frozen_rank].detach(), lora_B[:, frozen_rank:]], dim=1)
            frozen_rank = 0
        lora_B = lora_B * scaling  # the fold described in the module docstring; dtype stays lora_B's
        scaling = 1.0
    impl = backends.select(OP, x, weight, bias, lora_A, lora_B, scaling, p, frozen_rank).module
    track = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)
    if not track:
        x2d = x.reshape(-1, x.shape[-1])
        y2d, _, _ = launch_forward(impl, x2d, weight, bias, lora_A, lora_B, scaling, p, frozen_rank, False)
        return y2d.view(*x.shape[:-1], y2d.shape[-1])
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, p, frozen_rank, impl)
