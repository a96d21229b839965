"""Continual learning: the TreeLoRA method, baselines, the trainer and metrics.

Names are imported lazily from their modules so that ``import treelora.cl`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ContinualMethod": "treelora.cl.method",
    "OptimizerConfig": "treelora.cl.method",
    "adapter_parameters": "treelora.cl.method",
    "TreeLoRAConfig": "treelora.cl.config",
    "TreeLoRA": "treelora.cl.treelora",
    "TaskBank": "treelora.cl.bank",
    "GradientTree": "treelora.cl.tree",
    "LCBSearch": "treelora.cl.search",
    "SeqLoRA": "treelora.cl.baselines",
    "OLoRA": "treelora.cl.baselines",
    "EWC": "treelora.cl.baselines",
    "JointTraining": "treelora.cl.baselines",
    "Trainer": "treelora.cl.trainer",
    "TrainerConfig": "treelora.cl.trainer",
}
_SUBMODULES = (
    "metrics",
    "method",
    "config",
    "treelora",
    "bank",
    "tree",
    "search",
    "regularizer",
    "baselines",
    "trainer",
)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"treelora.cl.{name}")
    raise AttributeError(f"module 'treelora.cl' has no attribute {name!r}")
