"""Continual learning: the TreeLoRA method, baselines, the method registry, the trainer and its parts, metrics.

Modules, one job each: :mod:`~treelora.cl.method` (the interface of a method), :mod:`~treelora.cl.treelora` and
:mod:`~treelora.cl.baselines` (the methods), :mod:`~treelora.cl.registry` (which methods a run can name, their
options), :mod:`~treelora.cl.trainer` (the training loop), :mod:`~treelora.cl.batching`,
:mod:`~treelora.cl.objectives`, :mod:`~treelora.cl.evaluation`, :mod:`~treelora.cl.checkpoint`,
:mod:`~treelora.cl.results` (what the loop uses and returns), :mod:`~treelora.cl.experiment` (several methods
compared on one stream) and :mod:`~treelora.cl.metrics`.

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
    "LwF": "treelora.cl.baselines",
    "ExperienceReplay": "treelora.cl.baselines",
    "InfLoRA": "treelora.cl.baselines",
    "register_method": "treelora.cl.registry",
    "registered_methods": "treelora.cl.registry",
    "canonical_method": "treelora.cl.registry",
    "method_class": "treelora.cl.registry",
    "method_label": "treelora.cl.registry",
    "assign_method_options": "treelora.cl.registry",
    "MethodOptionError": "treelora.cl.registry",
    "Trainer": "treelora.cl.trainer",
    "TrainerConfig": "treelora.cl.trainer",
    "RunInterrupted": "treelora.cl.trainer",
    "check_compatible": "treelora.cl.trainer",
    "CheckpointError": "treelora.cl.checkpoint",
    "RunResult": "treelora.cl.results",
    "format_matrix": "treelora.cl.results",
    "format_table": "treelora.cl.results",
    "write_results": "treelora.cl.results",
    "compare_methods": "treelora.cl.experiment",
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
    "registry",
    "trainer",
    "batching",
    "objectives",
    "evaluation",
    "checkpoint",
    "results",
    "memory",
    "progress",
    "experiment",
    "distributed",
)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"treelora.cl.{name}")
    raise AttributeError(f"module 'treelora.cl' has no attribute {name!r}")
