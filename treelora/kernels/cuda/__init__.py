"""The ``cuda`` backend of every op family: launchers of the CUDA C++ kernels (csrc/) in ``treelora._C``.

:func:`environment_reasons` tells the backend registry whether the extension is usable here (built, imported, a GPU
found) before any launcher module is imported.
"""

from treelora.kernels.env import cuda_environment_reasons as environment_reasons

__all__ = ["environment_reasons"]
