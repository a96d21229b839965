"""Glue between torch tensors and the torch-free extension ``treelora._C``: dtype codes (the shared codes of
treelora/kernels/constants.py, which csrc/kernel_constants.h is generated from), raw pointers, the current stream
handle and small cached device metadata. Launches run inside :func:`treelora.kernels.env.device_guard`."""

from __future__ import annotations

import functools

import torch

from treelora.kernels.constants import DTYPE_CODES, KERNEL_DTYPES, dtype_message


def dtype_code(t: torch.Tensor, name: str) -> int:
    """The extension's code of ``t``'s dtype; a TypeError naming ``name`` for a dtype it does not take."""
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(dtype_message(name, t.dtype, KERNEL_DTYPES, " by the CUDA kernels")) from None


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream_handle(device: torch.device) -> int:
    """The handle of torch's current stream on ``device``: kernels queue behind torch's own work, no sync."""
    return torch.cuda.current_stream(device).cuda_stream


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
