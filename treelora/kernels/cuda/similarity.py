"""The ``cuda`` backend of the batched gradient similarity: launchers of the CUDA C++ kernels in ``treelora._C``
(csrc/similarity.cu) and the backend's entry points (``pairwise_similarity``, ``accumulate_and_compare_`` and their
``*_not_supported_reasons``, on the arguments of the ops in treelora/ops/similarity.py).

The launchers take the flat layout: a query (S,), a bank (T, S) whose rows may be strided, and host layer offsets
(L + 1 ints); the entry points bring the dense (L, D) layout to it with views where the strides allow. The launcher
cuts every layer into chunks of ``CHUNK_ELEMS`` elements (one block reduces one chunk of one bank row), caches the
chunk numbering on the device and allocates the partial-sum workspace; the kernels then run without any host
synchronisation, inside :func:`treelora.kernels.env.device_guard` of the query's device.
"""

from __future__ import annotations

import functools

import torch

from treelora import _cpp_lib
from treelora.kernels import env
from treelora.kernels.constants import METRIC_CODES, METRICS, dtype_message
from treelora.kernels.cuda import common as cc

# Elements per (row, chunk) work item: 256 threads x 8 elements x 2 vector steps. At (L, D) = (64, 32768) the gathered
# form has 512 items (about 4 per H100 SM) and the full form with T = 16 has 8192; the 7B shape (32 x 1.25M, T = 10)
# has ~98K. Not yet tuned on a GPU.
CHUNK_ELEMS = 4096


@functools.lru_cache(maxsize=256)
def chunk_layout(offsets: tuple[int, ...], chunk_elems: int) -> tuple[tuple[int, ...], int]:
    """Per-layer chunk prefix (L + 1 ints) and the total number of chunks for layer boundaries ``offsets``."""
    prefix = [0]
    for lo, hi in zip(offsets, offsets[1:]):
        prefix.append(prefix[-1] + -(-(hi - lo) // chunk_elems))
    return tuple(prefix), prefix[-1]


def _check_flat(query: torch.Tensor, bank: torch.Tensor, offsets: tuple[int, ...]) -> None:
    if query.dim() != 1 or not query.is_contiguous():
        raise ValueError(f"query must be a contiguous (S,) tensor, got shape {tuple(query.shape)}")
    if bank.dim() != 2 or bank.shape[1] != query.shape[0] or bank.stride(1) != 1:
        raise ValueError(f"bank must be (T, {query.shape[0]}) with unit column stride, got {tuple(bank.shape)}")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != query.shape[0]:
        raise ValueError(f"offsets must run from 0 to {query.shape[0]}, got {list(offsets)}")


def _check_index(index: torch.Tensor, num_layers: int) -> None:
    want = f"index must be a contiguous ({num_layers},) int64 tensor"
    if index.dtype != torch.int64:
        raise TypeError(f"{want}, got dtype {index.dtype}")
    if index.shape != (num_layers,) or not index.is_contiguous():
        raise ValueError(f"{want}, got shape {tuple(index.shape)} and strides {index.stride()}")


def similarity_flat(
    query: torch.Tensor, bank: torch.Tensor, offsets: tuple[int, ...], metric: str, index: torch.Tensor | None
) -> torch.Tensor:
    """Full (T, L) or, with ``index`` (L,) int64 on the device, gathered (L,) fp32 similarity.

    query (S,) contiguous fp32/fp16/bf16; bank (T, S) with unit column stride; offsets: L + 1 host ints.
    """
    C = _cpp_lib.require("similarity")
    _check_flat(query, bank, offsets)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    num_layers = len(offsets) - 1
    T = bank.shape[0]
    device = query.device
    gathered = index is not None
    if gathered:
        _check_index(index, num_layers)
    if not gathered and T == 0:
        return torch.empty(0, num_layers, dtype=torch.float32, device=device)
    prefix, total = chunk_layout(offsets, CHUNK_ELEMS)
    out = torch.empty(num_layers if gathered else (T, num_layers), dtype=torch.float32, device=device)
    workspace = torch.empty(
        C.similarity_workspace_size(T, num_layers, total, gathered), dtype=torch.float32, device=device
    )
    with env.device_guard(device):
        C.similarity(
            cc.ptr(query),
            cc.dtype_code(query, "query"),
            cc.ptr(bank),
            cc.dtype_code(bank, "bank"),
            cc.ptr(index),
            cc.ptr(cc.device_int64(offsets, device)),
            cc.ptr(cc.device_int64(prefix, device)),
            num_layers,
            T,
            bank.stride(0),
            CHUNK_ELEMS,
            total,
            METRIC_CODES[metric],
            cc.ptr(workspace),
            cc.ptr(out),
            cc.stream_handle(device),
        )
    return out


def accumulate_and_compare_flat(
    mean: torch.Tensor,
    sample: torch.Tensor,
    count: float | torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    offsets: tuple[int, ...],
    metric: str,
) -> torch.Tensor:
    """``mean += (sample - mean) / count`` in place, then the gathered similarity of the updated mean, in one pass.

    mean (S,) contiguous fp32; sample (S,) contiguous fp32/fp16/bf16; count a number or a 1-element tensor (read
    on the device); bank (T, S) with unit column stride; index (L,) int64 on the device; offsets L + 1 host ints.
    """
    C = _cpp_lib.require("similarity_accumulate")
    _check_flat(mean, bank, offsets)
    if mean.dtype != torch.float32:
        raise TypeError(f"mean must be fp32 for the CUDA kernel, got {mean.dtype}")
    if sample.shape != mean.shape or not sample.is_contiguous():
        raise ValueError(f"sample must be a contiguous tensor of shape {tuple(mean.shape)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    num_layers = len(offsets) - 1
    _check_index(index, num_layers)
    device = mean.device
    count_dev = None
    count_host = 1.0
    if isinstance(count, torch.Tensor):
        count_dev = count.detach().reshape(()).to(device=device, dtype=torch.float32)  # no host synchronisation
    else:
        count_host = float(count)
    prefix, total = chunk_layout(offsets, CHUNK_ELEMS)
    out = torch.empty(num_layers, dtype=torch.float32, device=device)
    workspace = torch.empty(C.similarity_workspace_size(1, num_layers, total, True), dtype=torch.float32, device=device)
    with env.device_guard(device):
        C.similarity_accumulate(
            cc.ptr(mean),
            cc.ptr(sample),
            cc.dtype_code(sample, "sample"),
            cc.ptr(count_dev),
            count_host,
            cc.ptr(bank),
            cc.dtype_code(bank, "bank"),
            cc.ptr(index),
            cc.ptr(cc.device_int64(offsets, device)),
            cc.ptr(cc.device_int64(prefix, device)),
            num_layers,
            bank.shape[0],
            bank.stride(0),
            CHUNK_ELEMS,
            total,
            METRIC_CODES[metric],
            cc.ptr(workspace),
            cc.ptr(out),
            cc.stream_handle(device),
        )
    return out


# --- the backend's entry points -----------------------------------------------------------------------------------


def _flat_layout(query: torch.Tensor, bank: torch.Tensor, offsets: tuple[int, ...] | None):
    """The kernels' flat layout: query (S,), bank (T, S) (views when the inputs allow), layer boundaries."""
    if offsets is not None:
        return query.contiguous(), bank if bank.stride(1) == 1 else bank.contiguous(), tuple(offsets)
    L, D = query.shape
    flat_bank = bank.reshape(bank.shape[0], L * D)
    if flat_bank.stride(1) != 1:
        flat_bank = flat_bank.contiguous()
    return query.reshape(L * D).contiguous(), flat_bank, tuple(range(0, L * D + 1, D))


def pairwise_similarity(
    query: torch.Tensor,
    bank: torch.Tensor,
    metric: str = "l1",
    index: torch.Tensor | None = None,
    offsets: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """(T, L), or (L,) with ``index``, from query (L, D) and bank (T, L, D), or (S,) and (T, S) with ``offsets``."""
    q, g, bounds = _flat_layout(query, bank, offsets)
    idx = None if index is None else index.long().contiguous()
    return similarity_flat(q, g, bounds, metric, idx)


def accumulate_and_compare_(
    mean: torch.Tensor,
    sample: torch.Tensor,
    count: float | torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    metric: str = "l1",
    offsets: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``mean += (sample - mean) / count`` in place (mean (L, D) or (S,), contiguous fp32), then the gathered (L,)
    similarity, in one pass."""
    _, g, bounds = _flat_layout(mean, bank, offsets)
    flat_mean = mean.view(-1)
    flat_sample = sample.reshape(-1).contiguous()
    return accumulate_and_compare_flat(flat_mean, flat_sample, count, g, index.long().contiguous(), bounds, metric)


def pairwise_similarity_not_supported_reasons(
    query: torch.Tensor,
    bank: torch.Tensor,
    metric: str = "l1",
    index: torch.Tensor | None = None,
    offsets: tuple[int, ...] | None = None,
) -> list[str]:
    """Why the CUDA kernels cannot run these (validated) inputs; empty when they can."""
    named = (("query", query), ("bank", bank), ("index", index))
    return env.cuda_device_reasons(named) + env.dtype_reasons("CUDA kernels", named[:2])


def accumulate_and_compare_not_supported_reasons(
    mean: torch.Tensor,
    sample: torch.Tensor,
    count: float | torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    metric: str = "l1",
    offsets: tuple[int, ...] | None = None,
) -> list[str]:
    """Why the fused accumulate-then-compare kernel cannot run these (validated) inputs; empty when it can."""
    named = (("mean", mean), ("sample", sample), ("bank", bank), ("index", index))
    why = env.cuda_device_reasons(named) + env.dtype_reasons("CUDA kernels", named[1:3])
    if mean.dtype != torch.float32:
        why.append(dtype_message("mean", mean.dtype, (torch.float32,), " by the CUDA kernel (its running mean)"))
    if not mean.is_contiguous():
        why.append("mean is not contiguous (the CUDA kernel updates it in place through a flat view)")
    return why
