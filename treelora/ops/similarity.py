"""Batched gradient similarity between a query signature and a bank of task signatures (SPEC 3.2).

Layouts
  dense:  query (L, D), bank (T, L, D)                     — every layer has the same width D
  ragged: query (S,),  bank (T, S), offsets (L + 1 ints)   — layer l is [offsets[l], offsets[l + 1])

Outputs
  full:     (T, L) with ``out[t, l] = metric(query[l], bank[t, l])``
  gathered: (L,) with ``out[l] = metric(query[l], bank[index[l], l])`` for an int64 ``index`` of length L

Metrics (``METRICS``); ``IS_DISTANCE[m]`` says whether lower means more similar:
  dot            Σ q·g                                   (similarity)
  l1             Σ |q − g|                               (distance)
  sqeuclidean    Σ (q − g)²                              (distance)
  cosine         Σ q·g / max(‖q‖₂‖g‖₂, 1e-12)            (similarity, in [-1, 1])
  l1_normalized  ‖q / max(‖q‖₁, 1e-12) − g / max(‖g‖₁, 1e-12)‖₁   (distance, in [0, 2])

Accumulation is fp32 (fp64 for fp64 inputs); the result is fp32, or fp64 when the query is fp64. Bank storage may be
fp32, fp16 or bf16. The metric names, their kernel codes and the clamp are shared with the kernels
(treelora/kernels/constants.py); the backends live in treelora/kernels/{torch,triton,cuda}/similarity.py.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from treelora import backends
from treelora.kernels.constants import FLOAT_DTYPES, IS_DISTANCE, METRICS, SIMILARITY_EPS, dtype_message
from treelora.ops._validation import check_tensor

OP = "pairwise_similarity"
OP_ACCUMULATE = "accumulate_and_compare_"

__all__ = [
    "IS_DISTANCE",
    "METRICS",
    "OP",
    "OP_ACCUMULATE",
    "accumulate_and_compare_",
    "pairwise_similarity",
    "pairwise_similarity_ref",
]

backends.register_family(
    "similarity",
    ops=(OP, OP_ACCUMULATE),
    torch="treelora.kernels.torch.similarity",
    triton="treelora.kernels.triton.similarity",
    cuda="treelora.kernels.cuda.similarity",
)


# --- reference ----------------------------------------------------------------------------------------------------


def _metric_rows(q: torch.Tensor, g: torch.Tensor, metric: str) -> torch.Tensor:
    """metric along the last dimension; q and g broadcast. The plainest possible statement of each formula."""
    if metric == "dot":
        return (q * g).sum(-1)
    if metric == "l1":
        return (q - g).abs().sum(-1)
    if metric == "sqeuclidean":
        return ((q - g) ** 2).sum(-1)
    if metric == "cosine":
        return (q * g).sum(-1) / (q.norm(dim=-1) * g.norm(dim=-1)).clamp_min(SIMILARITY_EPS)
    if metric == "l1_normalized":
        qn = q / q.abs().sum(-1, keepdim=True).clamp_min(SIMILARITY_EPS)
        gn = g / g.abs().sum(-1, keepdim=True).clamp_min(SIMILARITY_EPS)
        return (qn - gn).abs().sum(-1)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def pairwise_similarity_ref(
    query: torch.Tensor,
    bank: torch.Tensor,
    metric: str = "l1",
    index: torch.Tensor | None = None,
    offsets: Sequence[int] | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference: a Python loop over layers that materialises everything. The oracle for every backend."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    compute = dtype if upcast else query.dtype
    q, g = query.to(compute), bank.to(compute)
    if offsets is None:
        L = q.shape[0]
        layers_q = [q[l] for l in range(L)]
        layers_g = [g[:, l] for l in range(L)]
    else:
        bounds = [int(o) for o in offsets]
        L = len(bounds) - 1
        layers_q = [q[bounds[l] : bounds[l + 1]] for l in range(L)]
        layers_g = [g[:, bounds[l] : bounds[l + 1]] for l in range(L)]
    full = torch.stack([_metric_rows(layers_q[l], layers_g[l], metric) for l in range(L)], dim=-1)  # (T, L)
    if index is None:
        return full.to(dtype)
    return full[index.long().cpu(), torch.arange(L)].to(dtype)


# --- validation ---------------------------------------------------------------------------------------------------


def _normalize_offsets(offsets: Sequence[int] | torch.Tensor, total: int) -> tuple[int, ...]:
    if isinstance(offsets, torch.Tensor):
        if offsets.device.type != "cpu":
            raise ValueError("offsets must be host metadata (a sequence of ints or a CPU tensor), not a device tensor")
        offsets = offsets.tolist()
    bounds = tuple(int(o) for o in offsets)
    if len(bounds) < 2:
        raise ValueError(f"offsets must hold L + 1 >= 2 boundaries, got {list(bounds)}")
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"offsets must start at 0 and end at the query length {total}, got {list(bounds)}")
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"offsets must be strictly increasing (every layer non-empty), got {list(bounds)}")
    return bounds


def _validate(query, bank, metric, index, offsets):
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a str, one of {METRICS}, got {type(metric).__name__}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    check_tensor("query", query, dtypes=FLOAT_DTYPES)
    check_tensor("bank", bank, dtypes=FLOAT_DTYPES, device=query.device)
    if offsets is None:
        if query.dim() != 2:
            raise ValueError(f"query must be (L, D) (or (S,) with offsets), got shape {tuple(query.shape)}")
        L, D = query.shape
        if bank.dim() != 3 or tuple(bank.shape[1:]) != (L, D):
            raise ValueError(f"bank must be (T, {L}, {D}) to match query (L, D) = ({L}, {D}), got {tuple(bank.shape)}")
        if L == 0 or D == 0:
            raise ValueError(f"query must have at least one layer and one element per layer, got shape ({L}, {D})")
        bounds = None
    else:
        if query.dim() != 1:
            raise ValueError(f"with offsets, query must be the flat (S,) buffer, got shape {tuple(query.shape)}")
        if bank.dim() != 2 or bank.shape[1] != query.shape[0]:
            raise ValueError(f"with offsets, bank must be (T, {query.shape[0]}), got shape {tuple(bank.shape)}")
        bounds = _normalize_offsets(offsets, query.shape[0])
        L = len(bounds) - 1
    if index is not None:
        check_tensor("index", index, ndim=1, dtypes=(torch.int64, torch.int32), device=query.device)
        if index.shape[0] != L:
            raise ValueError(f"index must have one entry per layer (L = {L}), got shape {tuple(index.shape)}")
        if bank.shape[0] == 0:
            raise ValueError("bank has no rows (T = 0): there is nothing to gather with index")
        if index.device.type == "cpu" and index.numel() and (index.min() < 0 or index.max() >= bank.shape[0]):
            raise ValueError(f"index values must lie in [0, {bank.shape[0]}), got {index.tolist()}")
    return bounds


# --- public ops ---------------------------------------------------------------------------------------------------


def pairwise_similarity(
    query: torch.Tensor,
    bank: torch.Tensor,
    metric: str = "l1",
    index: torch.Tensor | None = None,
    offsets: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Similarity of a query signature to a bank of signatures, per layer.

    Args:
        query: (L, D) signature of the current task, or (S,) with ``offsets``.
        bank: (T, L, D) stored signatures (fp32, fp16 or bf16 storage), or (T, S) with ``offsets``.
        metric: one of ``METRICS`` (see the module docstring for formulas and which are distances).
        index: optional (L,) int64 tensor on the query's device; selects bank row ``index[l]`` for layer l and
            returns the gathered (L,) form. Values must lie in [0, T) (checked for CPU tensors only: checking a
            device tensor would synchronise the host).
        offsets: optional L + 1 layer boundaries (host ints) for the ragged layout.

    Returns:
        (T, L) without ``index``, (L,) with it; fp32 (fp64 for fp64 queries). No autograd.
    """
    bounds = _validate(query, bank, metric, index, offsets)
    with torch.no_grad():
        return backends.select(OP, query, bank, metric, index, bounds).fn(query, bank, metric, index, bounds)


def accumulate_and_compare_(
    mean: torch.Tensor,
    sample: torch.Tensor,
    count: float | torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    metric: str = "l1",
    offsets: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Running-mean update ``mean += (sample - mean) / count`` in place, then the gathered similarity of the updated
    mean against ``bank`` rows ``index`` (one pass over the data in the kernel backends).

    Args:
        mean: (L, D) or (S,) running mean, fp32, updated in place.
        sample: same shape as ``mean``: the new observation.
        count: the 1-based number of observations including ``sample`` (a number or a 0-d tensor on the device,
            so the caller needs no host synchronisation).
        bank, index, metric, offsets: as in :func:`pairwise_similarity`.

    Returns:
        (L,) gathered similarity.
    """
    if index is None:
        raise ValueError("index is required: accumulate_and_compare_ returns the gathered (L,) form")
    bounds = _validate(mean, bank, metric, index, offsets)
    check_tensor("sample", sample, dtypes=FLOAT_DTYPES, device=mean.device)
    if sample.shape != mean.shape:
        raise ValueError(f"sample must have the shape of mean {tuple(mean.shape)}, got {tuple(sample.shape)}")
    if mean.dtype not in (torch.float32, torch.float64):
        raise TypeError(dtype_message("mean", mean.dtype, (torch.float32, torch.float64), " (a running accumulator)"))
    if isinstance(count, torch.Tensor):
        if count.numel() != 1:
            raise ValueError(f"count must be a number or a 0-d tensor, got shape {tuple(count.shape)}")
        if count.device.type != "cpu" and count.device != mean.device:
            raise ValueError(f"count is on {count.device} but mean is on {mean.device}")
    elif isinstance(count, bool) or not isinstance(count, numbers.Real):
        raise TypeError(f"count must be a number or a 0-d tensor, got {type(count).__name__}")
    elif not count >= 1:
        raise ValueError(f"count must be >= 1 (the number of observations including sample), got {count!r}")
    with torch.no_grad():
        backend = backends.select(OP_ACCUMULATE, mean, sample, count, bank, index, metric, bounds)
        return backend.fn(mean, sample, count, bank, index, metric, bounds)
