"""Glue between torch tensors and the torch-free extension ``treelora._C``: dtype/metric codes (mirrored in
``csrc/common.h``), raw pointers and the current stream handle."""

from __future__ import annotations

import functools
from typing import Sequence

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
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=256)
def device_int64(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A cached device copy of small host metadata (layer offsets): copied once, never per call."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def as_tuple(values: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        return tuple(int(v) for v in values.tolist())
    return tuple(int(v) for v in values)
