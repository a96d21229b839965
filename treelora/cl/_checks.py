"""Argument checks shared by the continual-learning modules, with one rule for the exception type.

A value of the wrong Python type (a string where a number is expected, a float where an int is) raises
:class:`TypeError`; a value of the right type that is out of range or not one of the allowed choices raises
:class:`ValueError`. Every message starts with the argument's name. ``bool`` is not accepted as a number (``True``
is an ``int`` to Python, but never a meaningful count or weight here).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def check_int(name: str, value: Any, low: int | None = None) -> int:
    """``value`` as an int; TypeError unless it is an int, ValueError when it is below ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_number(
    name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> float:
    """``value`` as a float; TypeError unless it is a real number, ValueError when it is NaN, infinite or outside
    ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{']' if high is not None else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; TypeError unless it is a string, ValueError for any other string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {tuple(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool; TypeError otherwise (a 0/1 or a string such as ``"yes"`` is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value
