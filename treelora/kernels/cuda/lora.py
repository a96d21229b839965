"""The ``cuda`` backend of the fused LoRA linear: launchers of the CUDA C++ LoRA-branch kernels (csrc/lora.cu) around
cuBLAS, and the backend's entry points (``lora_linear_fwd``, ``lora_linear_bwd``, ``lora_linear_dropout_mask``,
``lora_linear_not_supported_reasons``; the contract is in treelora/kernels/torch/lora.py).

Graph split (SPEC 3.1):

* forward: ``u = s/(1-p) · drop(x) Aᵀ`` (shrink, (M, r) fp32); the expand kernel writes ``y = b + u Bᵀ`` once, in x's
  dtype, and cuBLAS accumulates the base GEMM into it (``y.addmm_(x, Wᵀ)``, beta = 1, C read in its epilogue): no
  extra pass over y.
* backward: one pass over dy gives ``du = s · dy B`` (M, r) fp32 and ``dB = dyᵀ u[:, f:]``; the expand kernel writes
  ``dx = keep ⊙ (du A) / (1-p)`` and cuBLAS accumulates ``dy W`` into it; ``dA = du[:, f:]ᵀ drop(x) / (1-p)``
  regenerates the dropout mask.
* dropout: Philox keyed by a {seed, offset} pair drawn on the device from torch's generator (reproducible under
  ``torch.manual_seed``, no host synchronisation), counter = the element's index row·K + col in x. The mask is never
  stored; :func:`lora_linear_dropout_mask` regenerates it for tests.
* precision: every operand is converted to fp32 when it is loaded and every sum accumulates in fp32; u and du stay
  fp32 (M·r·4 bytes). Reductions over K, N or M go through per-block partial slabs summed in a fixed order:
  results are bitwise reproducible run to run.
* frozen adapters: the first ``frozen_rank`` rows of A / columns of B take part in y, du and dx; dA and dB are
  computed for the trainable slice only.

Saved for backward: x (M, K), W, A, B, u (M, r) fp32 and the (2,) int64 dropout seed; never the mask.

Inputs arrive validated, non-empty and with a non-zero Python scale: the ops layer routes empty inputs and a scale of
exactly 0 to the torch backend (treelora/ops/lora_linear.py). Every launch runs inside
:func:`treelora.kernels.env.device_guard` of its tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from treelora import _cpp_lib
from treelora.kernels import env
from treelora.kernels.cuda import common as cc

# Dropout keeps an element when the top 24 bits of its Philox word are below round((1 - p) · 2^24).
_KEEP_BITS = 24


def keep_threshold(dropout_p: float) -> int:
    """The integer keep threshold of dropout probability p in [0, 1): at least 1 (p < 1 keeps something)."""
    return max(1, min(1 << _KEEP_BITS, round((1.0 - dropout_p) * (1 << _KEEP_BITS))))


@dataclass(frozen=True)
class _State:
    """Non-tensor forward state, handed to the backward by the ops layer."""

    scaling: float
    dropout_p: float
    frozen_rank: int


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t (M, C) with unit column stride (copied only when needed) and its row stride (C when M <= 1)."""
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else t.shape[1])


def _workspace(C, device: torch.device, M: int, cols: int, r_row: int, r_col: int) -> torch.Tensor:
    size = C.lora_panel_workspace_size(M, cols, r_row, r_col, cc.num_sms(device))
    return torch.empty(max(size, 1), dtype=torch.float32, device=device)


def shrink(
    x2d: torch.Tensor, lora_A: torch.Tensor, scale: float, seed: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """u (M, r) fp32 = scale · drop(x) Aᵀ. x2d (M, K) with unit column stride; lora_A (r, K) any strides."""
    C = _cpp_lib.require("lora_shrink")
    x, ldx = _rows(x2d)
    M, K = x.shape
    r = lora_A.shape[0]
    device = x.device
    u = torch.empty(M, r, dtype=torch.float32, device=device)
    ws = _workspace(C, device, M, K, r, 0)
    with env.device_guard(device):
        C.lora_shrink(
            cc.ptr(x),
            cc.dtype_code(x, "x"),
            ldx,
            M,
            K,
            cc.ptr(lora_A),
            cc.dtype_code(lora_A, "lora_A"),
            lora_A.stride(1),
            lora_A.stride(0),
            r,
            scale,
            cc.ptr(seed),
            keep_threshold(dropout_p),
            cc.ptr(ws),
            cc.ptr(u),
            cc.num_sms(device),
            cc.stream_handle(device),
        )
    return u


def expand(
    u: torch.Tensor,
    operand: torch.Tensor,
    stride_c: int,
    stride_j: int,
    cols: int,
    bias: torch.Tensor | None,
    scale: float,
    seed: torch.Tensor | None,
    dropout_p: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """out (M, cols) in ``dtype`` = bias + scale · keep ⊙ (u Pᵀ) with P(c, j) = operand[c·stride_c + j·stride_j].

    u: (M, r) fp32 contiguous; the keep mask applies only when ``seed`` is given.
    """
    C = _cpp_lib.require("lora_expand")
    M, r = u.shape
    device = u.device
    out = torch.empty(M, cols, dtype=dtype, device=device)
    with env.device_guard(device):
        C.lora_expand(
            cc.ptr(u),
            r,
            M,
            cols,
            r,
            cc.ptr(operand),
            cc.dtype_code(operand, "operand"),
            stride_c,
            stride_j,
            cc.ptr(bias),
            0 if bias is None else cc.dtype_code(bias, "bias"),
            scale,
            cc.ptr(seed),
            keep_threshold(dropout_p),
            cc.ptr(out),
            cc.dtype_code(out, "out"),
            cols,
            cc.stream_handle(device),
        )
    return out


def backward_dy(
    dy: torch.Tensor,
    lora_B: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    frozen_rank: int,
    need_du: bool,
    need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """du (M, r) fp32 = s · dy B and dB (N, r - f) = dyᵀ u[:, f:] in lora_B's dtype, from one read of dy (M, N)."""
    C = _cpp_lib.require("lora_backward_dy")
    dy, lddy = _rows(dy)
    M, N = dy.shape
    r = lora_B.shape[1]
    r_t = r - frozen_rank
    device = dy.device
    du = torch.empty(M, r, dtype=torch.float32, device=device) if need_du else None
    db = torch.empty(N, r_t, dtype=lora_B.dtype, device=device) if need_db else None
    ws = _workspace(C, device, M, N, r if need_du else 0, r_t if need_db else 0)
    with env.device_guard(device):
        C.lora_backward_dy(
            cc.ptr(dy),
            cc.dtype_code(dy, "dy"),
            lddy,
            M,
            N,
            cc.ptr(lora_B),
            cc.dtype_code(lora_B, "lora_B"),
            lora_B.stride(0),
            lora_B.stride(1),
            r,
            scaling,
            cc.ptr(du),
            cc.ptr(u),
            r,
            frozen_rank,
            r_t,
            cc.ptr(db),
            cc.dtype_code(lora_B, "lora_B"),
            cc.ptr(ws),
            cc.num_sms(device),
            cc.stream_handle(device),
        )
    return du, db


def grad_a(
    x2d: torch.Tensor,
    du: torch.Tensor,
    frozen_rank: int,
    dtype: torch.dtype,
    scale: float,
    seed: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """dA (r - f, K) in ``dtype`` = scale · du[:, f:]ᵀ drop(x); du (M, r) fp32 contiguous, x2d (M, K)."""
    C = _cpp_lib.require("lora_grad_a")
    x, ldx = _rows(x2d)
    M, K = x.shape
    r = du.shape[1]
    r_t = r - frozen_rank
    device = x.device
    da = torch.empty(r_t, K, dtype=dtype, device=device)
    ws = _workspace(C, device, M, K, 0, r_t)
    with env.device_guard(device):
        C.lora_grad_a(
            cc.ptr(x),
            cc.dtype_code(x, "x"),
            ldx,
            M,
            K,
            cc.ptr(du),
            r,
            frozen_rank,
            r_t,
            scale,
            cc.ptr(seed),
            keep_threshold(dropout_p),
            cc.ptr(da),
            cc.dtype_code(da, "dA"),
            cc.ptr(ws),
            cc.num_sms(device),
            cc.stream_handle(device),
        )
    return da


def dropout_keep_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The (M, K) bool keep mask the kernels use for this seed (regenerated, for tests)."""
    C = _cpp_lib.require("lora_dropout_mask")
    device = seed.device
    keep = torch.empty(M, K, dtype=torch.uint8, device=device)
    with env.device_guard(device):
        C.lora_dropout_mask(cc.ptr(seed), keep_threshold(dropout_p), M, K, cc.ptr(keep), cc.stream_handle(device))
    return keep.bool()


def lora_linear_fwd(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    frozen_rank: int,
    needs_grad: bool,
) -> tuple[torch.Tensor, tuple, Any]:
    """y (M, N) in x's dtype from x2d (M, K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r)."""
    N = weight.shape[0]
    dt = x2d.dtype
    x2d, _ = _rows(x2d)
    # cuBLAS needs W in x's dtype: a weight stored otherwise is converted (one pass over W per call).
    w = weight if weight.dtype == dt else weight.to(dt)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=x2d.device)  # {seed, offset}, no host sync
    u = shrink(x2d, lora_A, scaling / (1.0 - dropout_p), seed, dropout_p)
    y = expand(u, lora_B, lora_B.stride(0), lora_B.stride(1), N, bias, 1.0, None, 0.0, dt)
    y.addmm_(x2d, w.t())  # y += x Wᵀ with beta = 1: cuBLAS reads the LoRA term in its epilogue
    saved = (x2d, weight, lora_A, lora_B, u, seed) if needs_grad else ()
    return y, saved, _State(scaling, dropout_p, frozen_rank)


def lora_linear_bwd(
    dy2d: torch.Tensor, saved: tuple, state: Any, needs_dx: bool, needs_dA: bool, needs_dB: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dx (M, K) in x's dtype, dA (r - f, K) in lora_A's and dB (N, r - f) in lora_B's, from dy2d (M, N)."""
    x2d, weight, lora_A, lora_B, u, seed = saved
    dt = x2d.dtype
    dy = dy2d.to(dt)
    K = x2d.shape[1]
    f, p = state.frozen_rank, state.dropout_p
    r_t = lora_A.shape[0] - f
    w = weight if weight.dtype == dt else weight.to(dt)
    dx = dA = None
    need_du = needs_dx or (needs_dA and r_t > 0)
    du, dB = backward_dy(dy, lora_B, u, state.scaling, f, need_du, needs_dB)
    if needs_dx:
        dx = expand(du, lora_A, lora_A.stride(1), lora_A.stride(0), K, None, 1.0 / (1.0 - p), seed, p, dt)
        dx.addmm_(dy, w)  # dx += dy W with beta = 1
    if needs_dA:
        dA = (
            grad_a(x2d, du, f, lora_A.dtype, 1.0 / (1.0 - p), seed, p)
            if r_t > 0
            else torch.zeros(0, K, dtype=lora_A.dtype, device=x2d.device)
        )
    return dx, dA, dB


def lora_linear_dropout_mask(saved: tuple, state: Any) -> torch.Tensor | None:
    """The forward's (M, K) bool keep-mask, regenerated from its seed; None without dropout or saved tensors."""
    if not saved or saved[5] is None:
        return None
    x2d = saved[0]
    return dropout_keep_mask(saved[5], x2d.shape[0], x2d.shape[1], state.dropout_p)


def lora_linear_not_supported_reasons(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    frozen_rank: int = 0,
) -> list[str]:
    """Why the CUDA kernels cannot run these (validated) inputs; empty when they can.

    Args:
        x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); as for ``lora_linear``.
        scaling, dropout_p, frozen_rank: as for ``lora_linear`` (every value the op accepts is supported).
    """
    named = (("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B))
    return env.cuda_device_reasons(named) + env.dtype_reasons("CUDA kernels", named)
