"""The ``torch`` backend of the fused LoRA linear (SPEC 3.1): pure PyTorch, any device; the CPU fallback.

On CPU, fp16/bf16 inputs are computed in fp32: CPU low-precision matmuls are about 100x slower than fp32 on the
machines we test on.

Forward: ``y = addmm(b, x, Wᵀ)``, ``u = s · drop(x) Aᵀ`` (M, r), ``y += u Bᵀ`` in place. Backward: ``du = s · dy B``
(M, r) shared by dx and dA, ``dx = dy W`` with ``du A`` accumulated in place, ``dA = duᵀ drop(x)``, ``dB = dyᵀ u``
(du and dB computed transposed, see :func:`lora_linear_bwd`). Beyond the two base GEMMs each step reads or writes
one operand once; PEFT's layer adds four full (M, N) elementwise passes (scale, add, and their backward), which is
where the CPU speed-up comes from (bench/bench_lora.py). Saved for backward: x (the input itself, no copy), the
weights, u (M, r) and, with dropout, a 1-byte keep-mask: dropped activations are recomputed, not stored.

Folding the adapter into the weight (``W + s·B A``, one GEMM each way) was measured too and was not faster on CPU at
the benchmark shapes (2 threads, side by side, machine load ~5: 0.81x vs 0.75x and 0.97x vs 0.84x PEFT's time), so
it is not used.

This backend also serves the inputs the ops layer routes here whatever backend was chosen (treelora/ops/
lora_linear.py): empty inputs (nothing to launch) and a scale of exactly 0, where y is exactly the base op
``addmm(b, x, Wᵀ)`` in x's dtype, as ``F.linear`` computes it, dx its backward ``dy W``, and the adapters' gradients
are zeros.

Entry points (the contract of every lora_linear backend; x2d is (M, K), possibly non-contiguous):

* ``lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank, needs_grad)`` ->
  ``(y2d, saved, state)``: the (M, N) output in x's dtype, the tensors backward needs (saved through
  ``ctx.save_for_backward``; empty when ``needs_grad`` is False) and any non-tensor state;
* ``lora_linear_bwd(dy2d, saved, state, needs_dx, needs_dA, needs_dB)`` -> ``(dx2d, dA, dB)`` with dA, dB the
  trainable slices ((r - f, K) and (N, r - f)), None where not needed;
* ``lora_linear_dropout_mask(saved, state)``: the forward's (M, K) bool keep-mask, for tests;
* ``lora_linear_not_supported_reasons(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank)``.
"""

from __future__ import annotations

from typing import Any

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def _base(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x Wᵀ + b in ``dtype``: ``F.linear``'s own addmm when ``dtype`` is x's."""
    w = weight.to(dtype)
    xc = x2d.to(dtype)  # no copy when x is already in this dtype
    return torch.addmm(bias.to(dtype), xc, w.t()) if bias is not None else torch.mm(xc, w.t())


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
    """y2d (M, N) in x's dtype from x2d (M, K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r)."""
    if scaling == 0.0:
        # Disabled adapter: exactly the base op in x's dtype, bitwise (even on CPU, where 16-bit matmuls are slow).
        y = _base(x2d, weight, bias, x2d.dtype)
        saved = (x2d, weight, lora_A, lora_B, None, None) if needs_grad else ()
        return y, saved, (scaling, dropout_p, frozen_rank)
    cdt = _compute_dtype(x2d)
    xc = x2d.to(cdt)
    y = _base(xc, weight, bias, cdt)
    a, b = lora_A.to(cdt), lora_B.to(cdt)
    mask = None
    if dropout_p > 0.0:
        # a bool tensor straight from bernoulli_: half the time of drawing floats and comparing (CPU, 1.5M
        # entries: 9.7 ms vs 19 ms)
        mask = torch.empty(xc.shape, dtype=torch.bool, device=xc.device).bernoulli_(1.0 - dropout_p)
        u = torch.mm(xc * mask, a.t()).mul_(scaling / (1.0 - dropout_p))
    else:
        u = torch.mm(xc, a.t()).mul_(scaling)  # the scale costs M·r here instead of M·N after the expand
    y.addmm_(u, b.t())  # expand accumulated into the base output: no (M, N) temporary, no extra pass
    saved = (x2d, weight, lora_A, lora_B, u, mask) if needs_grad else ()
    return y.to(x2d.dtype), saved, (scaling, dropout_p, frozen_rank)


def lora_linear_bwd(
    dy2d: torch.Tensor, saved: tuple, state: Any, needs_dx: bool, needs_dA: bool, needs_dB: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dx (M, K) in x's dtype, dA (r - f, K) in lora_A's dtype and dB (N, r - f) in lora_B's, from dy2d (M, N)."""
    x2d, weight, lora_A, lora_B, u, mask = saved
    scaling, dropout_p, frozen_rank = state
    dx = dA = dB = None
    if scaling == 0.0:
        if needs_dx:
            dx = torch.mm(dy2d.to(x2d.dtype), weight.to(x2d.dtype))  # F.linear's own input gradient, bitwise
        r_t = lora_A.shape[0] - frozen_rank
        if needs_dA:
            dA = torch.zeros(r_t, lora_A.shape[1], dtype=lora_A.dtype, device=lora_A.device)
        if needs_dB:
            dB = torch.zeros(lora_B.shape[0], r_t, dtype=lora_B.dtype, device=lora_B.device)
        return dx, dA, dB
    cdt = _compute_dtype(dy2d)
    dyc = dy2d.to(cdt)
    # MKL's skinny GEMMs are much faster with the r-wide operand on the left: duᵀ = Bᵀ dyᵀ (r, M) and
    # dBᵀ = uᵀ dy (r, N) take 0.57 ms and 0.43 ms where du = dy B and dB = dyᵀ u take 1.8 ms and 2.7 ms
    # (M=4096, K=N=384, r=8, fp32, 1 thread).
    if needs_dx or needs_dA:
        # s · duᵀ, with the inverted-dropout factor folded in (r·M multiplies instead of M·K)
        factor = scaling if mask is None else scaling / (1.0 - dropout_p)
        du_t = torch.mm(lora_B.to(cdt).t(), dyc.t()).mul_(factor)
    if needs_dx:
        dx = torch.mm(dyc, weight.to(cdt))
        if mask is None:
            dx.addmm_(du_t.t(), lora_A.to(cdt))  # dx = dy W + du A as one accumulation
        else:
            dx.addcmul_(torch.mm(du_t.t(), lora_A.to(cdt)), mask)  # the forward's mask, applied once
        dx = dx.to(x2d.dtype)
    if needs_dA:
        xc = x2d.to(cdt)
        dA = torch.mm(du_t[frozen_rank:], xc if mask is None else xc * mask).to(lora_A.dtype)
    if needs_dB:
        # u already carries s (and 1/(1-p)); dB is returned as the (N, r) transpose of the (r, N) product
        dB = torch.mm(u[:, frozen_rank:].t(), dyc).t().to(lora_B.dtype)
    return dx, dA, dB


def lora_linear_dropout_mask(saved: tuple, state: Any) -> torch.Tensor | None:
    """The forward's (M, K) bool keep-mask; None without dropout, with scale 0 or without saved tensors."""
    return saved[5] if saved else None


def lora_linear_not_supported_reasons(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    frozen_rank: int = 0,
) -> list[str]:
    """The torch backend runs every input the op accepts."""
    return []
