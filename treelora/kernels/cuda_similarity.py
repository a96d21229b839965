"""Launchers of the CUDA C++ similarity kernels in ``treelora._C`` (see csrc/similarity.cu)."""

from __future__ import annotations

import torch

from treelora import _cpp_lib
from treelora.kernels.cuda_common import METRIC_CODES, device_int64, dtype_code, ptr, stream_handle

# Metrics the gathered kernel computes in one pass.
GATHERED_METRICS = ("dot", "l1", "sqeuclidean")
# Elements per (layer, chunk) block. 16K gives 128 blocks at (L, D) = (64, 32768), about one per H100 SM, and
# 2464 at the 7B shape (32, 1.25M); not yet tuned on a GPU.
_ELEMENTS_PER_BLOCK = 16384


def launch_gathered(
    query: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, offsets: tuple[int, ...], metric: str
) -> torch.Tensor:
    """Launch the gathered kernel. query (S,) contiguous, bank (T, S) contiguous, index (L,) int64 on the device."""
    C = _cpp_lib.require("similarity_gathered")
    num_layers = len(offsets) - 1
    widest = max(offsets[i + 1] - offsets[i] for i in range(num_layers))
    num_chunks = max(1, min(65535, -(-widest // _ELEMENTS_PER_BLOCK)))
    device = query.device
    out = torch.empty(num_layers, dtype=torch.float32, device=device)
    workspace = torch.empty(C.similarity_gathered_workspace(num_layers, num_chunks), dtype=torch.float32, device=device)
    C.similarity_gathered(
        ptr(query), dtype_code(query, "query"), ptr(bank), dtype_code(bank, "bank"), ptr(index),
        ptr(device_int64(offsets, device)), ptr(workspace), ptr(out), num_layers, bank.shape[1], num_chunks,
        METRIC_CODES[metric], stream_handle(device),
    )
    return out
