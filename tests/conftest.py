"""Test lanes and hardware gates.

* CPU lane (``pytest -m "not interpreter"``): everything that runs on a CPU; GPU tests skip with their reason.
* Interpreter lane (``TRITON_INTERPRET=1 pytest -m interpreter``): Triton kernels on CPU tensors. The variable must be
  set before the kernels are defined, hence a separate process; `make test` runs both lanes.
* GPU tests carry ``requires_cuda`` (and ``requires_cuda_ext`` when they need the compiled extension).
* CUDA emulator lane (``TREELORA_CUDA_EMULATOR=1 pytest -m cuda_emulated``): the CUDA C++ kernels of csrc/ compiled
  for the CPU emulator in tests/cuda_emulator and run on CPU tensors. Without the variable those tests skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
EMULATE_CUDA = os.environ.get("TREELORA_CUDA_EMULATOR", "0") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda_emulated: CUDA C++ kernels on the CPU emulator (TREELORA_CUDA_EMULATOR=1, tests/cuda_emulator)"
    )


def _extension_importable() -> bool:
    from treelora import _cpp_lib

    return _cpp_lib.available()


def pytest_collection_modifyitems(config, items):
    has_ext = _extension_importable()
    for item in items:
        if "requires_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "requires_cuda_ext" in item.keywords and not has_ext:
            item.add_marker(pytest.mark.skip(reason="treelora._C was not built (no nvcc at install time)"))
        if "requires_triton" in item.keywords and not HAS_TRITON:
            item.add_marker(pytest.mark.skip(reason="triton is not installed"))
        if "interpreter" in item.keywords and not (INTERPRET or HAS_CUDA):
            item.add_marker(pytest.mark.skip(reason="Triton kernel test: run with TRITON_INTERPRET=1 (make test does)"))
        if "cuda_emulated" in item.keywords and not EMULATE_CUDA:
            item.add_marker(
                pytest.mark.skip(reason="CUDA emulator lane: run with TREELORA_CUDA_EMULATOR=1 pytest -m cuda_emulated")
            )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
