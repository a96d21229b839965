"""treelora: TreeLoRA continual learning with fused LoRA, gradient-similarity and sparse-update kernels.

This file is the package's front door, above every layer (tests/test_layering.py): it imports the ops and the backend
switch eagerly (cheap: torch only, no triton) and every other subpackage lazily, on first attribute access
(``treelora.nn``, ``treelora.cl``, ...), so that ``import treelora`` costs no more than the ops. Modules inside the
package import what they need from its layers, never from here.
"""

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
