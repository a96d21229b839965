"""Continual-learning metrics on the accuracy matrix, with their sign conventions.

``R`` is the (N, N) accuracy matrix of a stream of N tasks: ``R[i, j]`` is the accuracy on task j's test set after
training on tasks 0..i. Only ``R[i, j]`` with ``j <= i`` (and ``j = i + 1`` for forward transfer) is needed; entries
that were not measured are NaN. Accuracies may be fractions or percentages: every metric is in the unit of ``R``.

================================ ======================================================== ===========================
metric                           definition                                               sign
================================ ======================================================== ===========================
``average_accuracy`` (ACC, OP)   mean_j R[N-1, j]                                         higher is better
``average_incremental_accuracy`` mean over i of mean_{j<=i} R[i, j]                       higher is better
``bwt(convention="paper")``      (1/N) sum_j (R[j, j] - R[N-1, j])  (TreeLoRA paper)      positive = forgetting
``bwt(convention="gem")``        (1/(N-1)) sum_{j<N-1} (R[N-1, j] - R[j, j])              negative = forgetting
                                 (GEM, Lopez-Paz & Ranzato 2017; Mammoth)
``bwt(convention="official")``   (1/N) sum_j min(R[N-1, j] - R[j, j], 0)  (the TreeLoRA   <= 0; negative = forgetting,
                                 released code: positive transfer clipped to 0)           never rewards improvement
``forgetting``                   (1/(N-1)) sum_{j<N-1} (max_{j<=i<N-1} R[i, j] - R[N-1,j]) >= 0 when R[j, j] is
                                 (Chaudhry et al. 2018)                                   included; positive = forgot
``fwt``                          (1/(N-1)) sum_{j>=1} (R[j-1, j] - b[j])  (GEM), b the    positive = earlier tasks
                                 zero-shot accuracy before any training                   helped
================================ ======================================================== ===========================

The paper's BWT divides by N (the last task contributes a zero term) and reports forgetting as a positive number;
the GEM sign is the opposite and divides by N - 1.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

BWT_CONVENTIONS = ("paper", "gem", "official")
MatrixLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]


def _matrix(R: MatrixLike, name: str = "R") -> np.ndarray:
    R = np.asarray(R.detach().cpu() if isinstance(R, torch.Tensor) else R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square (N, N) accuracy matrix, got shape {R.shape}")
    n = R.shape[0]
    lower = R[np.tril_indices(n)]
    if np.isnan(lower).any():
        raise ValueError(f"{name} has NaN entries on or below the diagonal: R[i, j] for j <= i must all be measured")
    return R


def average_accuracy(R: MatrixLike) -> float:
    """Final average accuracy (ACC; the paper's OP_N): the mean of the last row, ``mean_j R[N-1, j]``.

    Args:
        R: (N, N) accuracy matrix, ``R[i, j]`` = accuracy on task j after training task i.
    """
    R = _matrix(R)
    return float(R[-1].mean())


def average_incremental_accuracy(R: MatrixLike) -> float:
    """Mean over training stages i of the average accuracy on the tasks seen so far, ``mean_{j<=i} R[i, j]`` (the
    released TreeLoRA code's "All Average" averages the lower triangle directly; this is the per-stage mean)."""
    R = _matrix(R)
    return float(np.mean([R[i, : i + 1].mean() for i in range(R.shape[0])]))


def bwt(R: MatrixLike, convention: str = "paper") -> float:
    """Backward transfer; the sign and the divisor depend on ``convention``.

    Args:
        R: (N, N) accuracy matrix.
        convention:
            ``"paper"``: ``(1/N) Σ_j (R[j, j] − R[N−1, j])``; positive = forgetting, lower is better (TreeLoRA paper;
            the last task's term is 0 and is counted).
            ``"gem"``: ``(1/(N−1)) Σ_{j<N−1} (R[N−1, j] − R[j, j])``; negative = forgetting (GEM, Mammoth). 0 for N = 1.
            ``"official"``: ``(1/N) Σ_j min(R[N−1, j] − R[j, j], 0)``; the released code's clamped form, always <= 0.
    """
    if convention not in BWT_CONVENTIONS:
        raise ValueError(f"convention must be one of {BWT_CONVENTIONS}, got {convention!r}")
    R = _matrix(R)
    n = R.shape[0]
    diff = R[-1] - np.diag(R)  # R[N-1, j] - R[j, j]; negative where task j was forgotten
    if convention == "paper":
        return float(-diff.mean())
    if convention == "official":
        return float(np.minimum(diff, 0.0).mean())
    return float(diff[: n - 1].mean()) if n > 1 else 0.0


def forgetting(R: MatrixLike) -> float:
    """Average maximum forgetting (Chaudhry et al. 2018): for each task j < N−1, the drop from its best accuracy at
    any stage i in [j, N−2] to its final accuracy, ``max_i R[i, j] − R[N−1, j]``, averaged. Positive = forgetting;
    0 for N = 1."""
    R = _matrix(R)
    n = R.shape[0]
    if n == 1:
        return 0.0
    drops = [R[j : n - 1, j].max() - R[-1, j] for j in range(n - 1)]
    return float(np.mean(drops))


def fwt(R: MatrixLike, baseline: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """Forward transfer (GEM): ``(1/(N−1)) Σ_{j>=1} (R[j−1, j] − b[j])``: how much training on tasks 0..j−1 changed
    the accuracy on task j before it was trained, compared to ``b[j]``, the accuracy of the untrained model.
    Positive = the earlier tasks helped. Needs the entries just above the diagonal; 0 for N = 1.

    Args:
        R: (N, N) accuracy matrix with ``R[j-1, j]`` measured.
        baseline: (N,) zero-shot accuracies b.
    """
    R = _matrix(R)
    b = np.asarray(baseline.detach().cpu() if isinstance(baseline, torch.Tensor) else baseline, dtype=np.float64)
    n = R.shape[0]
    if b.shape != (n,):
        raise ValueError(f"baseline must have one entry per task, shape ({n},), got {b.shape}")
    if n == 1:
        return 0.0
    above = np.array([R[j - 1, j] for j in range(1, n)])
    if np.isnan(above).any() or np.isnan(b[1:]).any():
        raise ValueError("fwt needs R[j-1, j] and baseline[j] for j >= 1 (evaluate the next task after each task)")
    return float((above - b[1:]).mean())


def summarize(R: MatrixLike, baseline: Sequence[float] | None = None) -> dict[str, float]:
    """Every metric of this module in one dict (``fwt`` only when ``baseline`` is given and R[j-1, j] is measured)."""
    out = {
        "acc": average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "bwt": bwt(R, "paper"),
        "bwt_gem": bwt(R, "gem"),
        "bwt_official": bwt(R, "official"),
        "forgetting": forgetting(R),
    }
    if baseline is not None:
        try:
            out["fwt"] = fwt(R, baseline)
        except ValueError:
            pass
    return out
