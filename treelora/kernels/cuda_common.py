"""Glue between torch tensors and the torch-free extension ``treelora._C``: dtype/metric codes (mirrored in
``csrc/common.h``), raw pointers, the current stream handle, the device guard and small cached device metadata."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
METRIC_CODES = {"dot": 0, "l1": 1, "sqeuclidean": 2, "cosine": 3, "l1_normalized": 4}


def dtype_code(t: torch.Tensor, name: str) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{name} has dtype {t.dtype}; the CUDA extension supports fp32, fp16 and bf16") from None


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream_handle(device: torch.device) -> int:
    """The handle of torch's current stream on ``device``: kernels queue behind torch's own work, no sync."""
    return torch.cuda.current_stream(device).cuda_stream


@contextlib.contextmanager
def device_guard(device: torch.device) -> Iterator[None]:
    """Make ``device`` current while launching, so the kernels run on the device that holds the tensors."""
    with torch.cuda.device(device):
        yield


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached: the query is a host-side attribute read)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=256)
def device_int64(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A cached device copy of small host metadata (layer offsets): copied once, never per call."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def aligned(t: torch.Tensor | None, boundary: int = 16) -> bool:
    """Whether the tensor's first element sits on a ``boundary``-byte address (vector loads need 16)."""
    return t is None or t.data_ptr() % boundary == 0
