"""treelora: TreeLoRA continual learning with fused LoRA, gradient-similarity and sparse-update kernels."""

from __future__ import annotations

import importlib
from typing import Any

from treelora import ops
from treelora._version import __version__
from treelora.backends import BackendUnavailableError, use_backend

_LAZY_SUBMODULES = ("nn", "cl", "data", "models", "peft", "kernels", "cli", "info")

__all__ = ["BackendUnavailableError", "__version__", "ops", "use_backend", *_LAZY_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"treelora.{name}")
    raise AttributeError(f"module 'treelora' has no attribute {name!r}")
