"""The ``triton`` backend of every op family: Triton kernels and their launchers, one module per family.

This package imports no triton itself: :func:`environment_reasons` tells the backend registry whether triton can run
here before any kernel module is imported.
"""

from treelora.kernels.env import triton_environment_reasons as environment_reasons

__all__ = ["environment_reasons"]
