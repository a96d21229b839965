"""The ``torch`` backend of the batched gradient similarity (SPEC 3.2): pure PyTorch, any device.

Entry points (the contract of every similarity backend, on arguments the op validated; ``offsets`` is a tuple of
L + 1 host ints or None): ``pairwise_similarity(query, bank, metric, index, offsets)``,
``accumulate_and_compare_(mean, sample, count, bank, index, metric, offsets)`` and their ``*_not_supported_reasons``.
Accumulation is fp32 (fp64 for fp64 queries).
"""

from __future__ import annotations

import torch

from treelora.kernels.constants import SIMILARITY_EPS

# The full form processes the bank in blocks of layers of about this many elements (1 MiB of fp32), so that the
# difference, its magnitude and the row sums of l1/sqeuclidean stay in cache instead of streaming a (T, L, D)
# temporary through memory three times (1.1-6.4x the speed of the eager layer loop on CPU).
_BLOCK_ELEMENTS = 1 << 18


def _acc_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _rows(q: torch.Tensor, g: torch.Tensor, metric: str) -> torch.Tensor:
    """metric along the last dimension of q and g (they broadcast)."""
    if metric == "dot":
        return (q * g).sum(-1)
    if metric == "l1":
        return (q - g).abs().sum(-1)
    if metric == "sqeuclidean":
        return ((q - g) ** 2).sum(-1)
    if metric == "cosine":
        return (q * g).sum(-1) / (q.norm(dim=-1) * g.norm(dim=-1)).clamp_min(SIMILARITY_EPS)
    qn = q / q.abs().sum(-1, keepdim=True).clamp_min(SIMILARITY_EPS)
    gn = g / g.abs().sum(-1, keepdim=True).clamp_min(SIMILARITY_EPS)
    return (qn - gn).abs().sum(-1)


def _dense_full(q: torch.Tensor, bank: torch.Tensor, metric: str) -> torch.Tensor:
    """q (L, D) in the accumulation dtype, bank (T, L, D) any float dtype -> (T, L)."""
    T, L, D = bank.shape
    acc = q.dtype
    if metric in ("dot", "cosine"):
        out = torch.einsum("ld,tld->tl", q, bank.to(acc))
        if metric == "cosine":
            out = out / (q.norm(dim=-1) * bank.to(acc).norm(dim=-1)).clamp_min(SIMILARITY_EPS)
        return out
    qn = q / q.abs().sum(-1, keepdim=True).clamp_min(SIMILARITY_EPS) if metric == "l1_normalized" else q
    out = torch.empty(T, L, dtype=acc, device=q.device)
    step = max(1, _BLOCK_ELEMENTS // max(1, T * D))
    for l0 in range(0, L, step):
        g = bank[:, l0 : l0 + step].to(acc)
        if metric == "l1_normalized":
            g = g / g.abs().sum(-1, keepdim=True).clamp_min(SIMILARITY_EPS)
        diff = g - qn[l0 : l0 + step]
        out[:, l0 : l0 + step] = diff.abs_().sum(-1) if metric != "sqeuclidean" else diff.square_().sum(-1)
    return out


def _dense_gathered(q: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, metric: str) -> torch.Tensor:
    """Gathers only the L selected rows (an (L, D) copy): the (T, L, D) difference is never formed."""
    T, L, D = bank.shape
    flat = index.long() * L + torch.arange(L, device=bank.device)
    # One index_select on the (T·L, D) view: 12 µs vs 45-85 µs for two-tensor advanced indexing at L = 64 on CPU.
    rows = bank.reshape(T * L, D).index_select(0, flat).to(q.dtype)  # (L, D)
    return _rows(q, rows, metric)


def pairwise_similarity(
    query: torch.Tensor,
    bank: torch.Tensor,
    metric: str = "l1",
    index: torch.Tensor | None = None,
    offsets: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """(T, L), or (L,) with ``index``, from query (L, D) and bank (T, L, D), or (S,) and (T, S) with ``offsets``."""
    q = query.to(_acc_dtype(query))
    if offsets is None:
        return _dense_full(q, bank, metric) if index is None else _dense_gathered(q, bank, index, metric)
    # Ragged: one slice per layer (views, no copies); the layer loop is over L <= a few hundred modules.
    cols = []
    for l in range(len(offsets) - 1):
        lo, hi = offsets[l], offsets[l + 1]
        if index is None:
            cols.append(_dense_full(q[lo:hi].unsqueeze(0), bank[:, lo:hi].unsqueeze(1), metric)[:, 0])
        else:
            row = torch.index_select(bank[:, lo:hi], 0, index[l : l + 1].long()).to(q.dtype)  # (1, width), no sync
            cols.append(_rows(q[lo:hi].unsqueeze(0), row, metric))
    return torch.stack(cols, dim=-1) if index is None else torch.cat(cols)


def accumulate_and_compare_(
    mean: torch.Tensor,
    sample: torch.Tensor,
    count: float | torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    metric: str = "l1",
    offsets: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``mean += (sample - mean) / count`` in place (mean (L, D) or (S,)), then the gathered (L,) similarity."""
    weight = 1.0 / count if not isinstance(count, torch.Tensor) else (1.0 / count).to(mean.device, mean.dtype)
    mean.lerp_(sample.to(mean.dtype), weight)  # q + (x - q)/n in one pass
    return pairwise_similarity(mean, bank, metric, index, offsets)


def pairwise_similarity_not_supported_reasons(
    query: torch.Tensor,
    bank: torch.Tensor,
    metric: str = "l1",
    index: torch.Tensor | None = None,
    offsets: tuple[int, ...] | None = None,
) -> list[str]:
    """The torch backend runs every input the op accepts."""
    return []


def accumulate_and_compare_not_supported_reasons(
    mean: torch.Tensor,
    sample: torch.Tensor,
    count: float | torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    metric: str = "l1",
    offsets: tuple[int, ...] | None = None,
) -> list[str]:
    """The torch backend runs every input the op accepts."""
    return []
