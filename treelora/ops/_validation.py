"""Argument checks shared by the public ops. Every message names the offending argument, its value and what was
expected, so a user can fix the call without reading treelora's source.

The error types follow one rule in every op and backend: ``TypeError`` when an argument has the wrong Python type or
an unsupported dtype, ``ValueError`` when its shape, value, range or device is wrong.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from treelora.kernels.constants import FLOAT_DTYPES, dtype_message


def check_tensor(
    name: str,
    t: Any,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(dtype_message(name, t.dtype, dtypes))
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def check_same_device(named: dict[str, torch.Tensor | None]) -> torch.device:
    device = None
    first = None
    for name, t in named.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}; all inputs must share a device")
    assert device is not None
    return device


def check_finite_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def check_int(name: str, value: Any, *, low: int, high: int) -> int:
    """An int in [low, high] (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def check_nonempty_list(name: str, items: Any) -> list:
    if isinstance(items, torch.Tensor) or not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(items).__name__}")
    if len(items) == 0:
        raise ValueError(f"{name} is empty: pass at least one tensor")
    return list(items)
