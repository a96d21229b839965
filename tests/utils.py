"""Shared test helpers: the tolerance rule and small input factories.

Tolerance rule (STYLE.md, after flash-attention): a result's max error against a float64 reference must be at most
twice the error of plain PyTorch computing the same thing in the same precision, plus a small per-dtype floor scaled
by the reference's magnitude. Errors are printed before asserting so a failure shows how far off it was.
"""

from __future__ import annotations

import torch

# Per-dtype floor, relative to max(1, |reference|max): what rounding the final result to the dtype can cost.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_close_to_ref(
    name: str,
    out: torch.Tensor,
    ref64: torch.Tensor,
    baseline: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Assert ``out`` matches the float64 ``ref64`` within 2x the error of ``baseline`` (plain PyTorch in the same
    precision) plus ``FLOOR[dtype]``. Without a baseline only the floor applies (exactness checks)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    dtype = dtype or out.dtype
    scale = max(1.0, ref64.detach().abs().max().item()) if ref64.numel() else 1.0
    err = max_abs_err(out, ref64)
    mean = (out.detach().double().cpu() - ref64.detach().double().cpu()).abs().mean().item() if out.numel() else 0.0
    base = max_abs_err(baseline, ref64) if baseline is not None else 0.0
    tol = 2.0 * base + FLOOR[dtype] * scale
    print(f"{name}: max err {err:.3e} mean {mean:.3e} | torch {dtype} err {base:.3e} | tol {tol:.3e}")
    assert err <= tol, f"{name}: max error {err:.3e} exceeds {tol:.3e} (2 x torch {base:.3e} + floor)"
