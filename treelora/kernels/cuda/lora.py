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


def forward_terms(
    x2d: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    seed: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u (M, r) fp32 = scale · drop(x) Aᵀ and T (M, N) = bias + u Bᵀ in x's dtype, on tensor cores.

    x2d: (M, K) with unit column stride; lora_A (r, K) and lora_B (N, r) of any strides and float dtypes; bias (N,)
    or None. The dropout mask applies only when ``seed`` is given.
    """
    C = _cpp_lib.require("lora_forward")
    x, ldx = _rows(x2d)
    M, K = x.shape
    r, N = lora_A.shape[0], lora_B.shape[0]
    device = x.device
    x_code = cc.dtype_code(x, "x")
    sms = cc.num_sms(device)
    u = torch.empty(M, r, dtype=torch.float32, device=device)
    t = torch.empty(M, N, dtype=x.dtype, device=device)
    ws = torch.empty(max(C.lora_forward_workspace_size(M, K, N, r, x_code, sms), 1), dtype=torch.float32, device=device)
    with env.device_guard(device):
        C.lora_forward(
            cc.ptr(x),
            x_code,
            ldx,
            M,
            K,
            N,
            r,
            cc.ptr(lora_A),
            cc.dtype_code(lora_A, "lora_A"),
            lora_A.stride(0),
            lora_A.stride(1),
            cc.ptr(lora_B),
            cc.dtype_code(lora_B, "lora_B"),
            lora_B.stride(0),
            lora_B.stride(1),
            cc.ptr(bias),
            0 if bias is None else cc.dtype_code(bias, "bias"),
            scale,
            cc.ptr(seed),
            keep_threshold(dropout_p),
            cc.ptr(u),
            cc.ptr(t),
            N,
            cc.ptr(ws),
            sms,
            cc.stream_handle(device),
        )
    return u, t


def backward_terms(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    u: torch.Tensor,
    state: _State,
    seed: torch.Tensor | None,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dxT = keep ⊙ (du A)/(1-p) (M, K) in x's dtype, dA (r - f, K) = du[:, f:]ᵀ drop(x) in lora_A's dtype and
    dB (N, r - f) = dyᵀ u[:, f:] in lora_B's dtype, with du = s · dy B, on tensor cores (None where not needed).

    dy (M, N) and x2d (M, K) in one dtype with unit column strides; u (M, r) fp32 contiguous from the forward.
    """
    C = _cpp_lib.require("lora_backward")
    dy, lddy = _rows(dy)
    x, ldx = _rows(x2d)
    M, N = dy.shape
    K = x.shape[1]
    r = lora_A.shape[0]
    f, p = state.frozen_rank, state.dropout_p
    r_t = r - f
    device = x.device
    code = cc.dtype_code(x, "x")
    sms = cc.num_sms(device)
    dxt = torch.empty(M, K, dtype=x.dtype, device=device) if needs_dx else None
    dA = torch.empty(r_t, K, dtype=lora_A.dtype, device=device) if needs_dA else None
    dB = torch.empty(N, r_t, dtype=lora_B.dtype, device=device) if needs_dB else None
    size = C.lora_backward_workspace_size(M, N, K, r, f, code, needs_dx, needs_dA, needs_dB, sms)
    ws = torch.empty(max(size, 1), dtype=torch.float32, device=device)
    with env.device_guard(device):
        C.lora_backward(
            cc.ptr(dy),
            lddy,
            cc.ptr(x),
            ldx,
            code,
            M,
            N,
            K,
            r,
            f,
            cc.ptr(lora_A),
            cc.dtype_code(lora_A, "lora_A"),
            lora_A.stride(0),
            lora_A.stride(1),
            cc.ptr(lora_B),
            cc.dtype_code(lora_B, "lora_B"),
            lora_B.stride(0),
            lora_B.stride(1),
            cc.ptr(u),
            state.scaling,
            cc.ptr(seed),
            keep_threshold(p),
            1.0 / (1.0 - p),
            cc.ptr(dxt),
            K,
            cc.ptr(dA),
            cc.dtype_code(lora_A, "lora_A"),
            cc.ptr(dB),
            cc.dtype_code(lora_B, "lora_B"),
            cc.ptr(ws),
            sms,
            cc.stream_handle(device),
        )
    return dxt, dA, dB


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
    dt = x2d.dtype
    x2d, _ = _rows(x2d)
    # cuBLAS needs W in x's dtype: a weight stored otherwise is converted (one pass over W per call).
    w = weight if weight.dtype == dt else weight.to(dt)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=x2d.device)  # {seed, offset}, no host sync
    u, y = forward_terms(x2d, lora_A, lora_B, bias, scaling / (1.0 - dropout_p), seed, dropout_p)
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
    r_t = lora_A.shape[0] - state.frozen_rank
    dx, dA, dB = backward_terms(dy, x2d, lora_A, lora_B, u, state, seed, needs_dx, needs_dA and r_t > 0, needs_dB)
    if needs_dx:
        w = weight if weight.dtype == dt else weight.to(dt)
        dx.addmm_(dy, w)  # dx += dy W with beta = 1
    if needs_dA and dA is None:
        dA = torch.zeros(0, K, dtype=lora_A.dtype, device=x2d.device)
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
