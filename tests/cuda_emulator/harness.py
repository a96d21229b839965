"""Routes treelora's ``cuda`` backend to the emulated module for CPU tensors, inside a ``with`` block only.

Inside :func:`emulated_cuda` the real ops and the real launchers (treelora/kernels/cuda/*.py) run unchanged; only
their view of the machine is replaced: ``treelora._cpp_lib`` reports the emulated module as the extension and a usable
device, the cuda backend accepts CPU tensors (and refuses CUDA ones), the stream handle is 0 and the SM count is the
emulator's (the device guard already does nothing for CPU tensors). ``torch.empty`` inside the launchers returns
memory filled with 0xff bytes (NaN as a float), as the caching allocator hands out another tensor's leftovers on a
GPU: a kernel that reads a workspace or output element it did not write gives a visibly wrong result. Everything is
restored on exit, so tests outside the block see the real extension (or its absence).
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any, Iterator

import torch

from treelora import _cpp_lib
from treelora.kernels import env
from treelora.kernels.cuda import common as cuda_common
from treelora.kernels.cuda import lora as cuda_lora
from treelora.kernels.cuda import masked_update as cuda_masked_update
from treelora.kernels.cuda import similarity as cuda_similarity

_LAUNCHER_MODULES = (cuda_similarity, cuda_masked_update, cuda_lora)


class _PoisoningTorch:
    """The ``torch`` module as the launchers see it under the emulator: ``empty`` poisons what it returns."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def empty(*size: Any, **kwargs: Any) -> torch.Tensor:
        out = torch.empty(*size, **kwargs)
        if out.dtype == torch.bool:
            out.fill_(True)
        elif out.numel():
            out.reshape(-1).view(torch.uint8).fill_(0xFF)
        return out


def _cpu_tensors_only(named: env.Named) -> list[str]:
    """The device check of :func:`treelora.kernels.env.cuda_device_reasons`, for the emulator's CPU tensors."""
    for name, value in named:
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                return [f"{name} is on {t.device}; the CUDA emulator runs the kernels on CPU tensors"]
    return []


@contextlib.contextmanager
def emulated_cuda(module: ModuleType, *, sm_count: int = 1, reverse_order: bool = False) -> Iterator[ModuleType]:
    """Run the ``cuda`` backend of every op on ``module`` (the emulated extension) for CPU tensors.

    Args:
        module: the module from :func:`tests.cuda_emulator.load`.
        sm_count: streaming multiprocessors the emulated device reports (1 keeps grids small, so that the
            grid-stride loops of the similarity and masked-update kernels take several turns).
        reverse_order: run blocks, and the threads of each block, in descending index order.
    """
    patches = [
        (_cpp_lib, "module", module),
        (_cpp_lib, "import_error", ""),
        (_cpp_lib, "device_error", lambda: ""),
        (env, "cuda_device_reasons", _cpu_tensors_only),
        (cuda_common, "stream_handle", lambda device: 0),
        (cuda_common, "num_sms", lambda device: sm_count),
        *((launcher, "torch", _PoisoningTorch()) for launcher in _LAUNCHER_MODULES),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    module.emulator_configure(sm_count, reverse_order)
    cuda_masked_update._tables.clear()  # tables hold addresses of the tensors they were built for
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield module
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        cuda_masked_update._tables.clear()
        module.emulator_configure(1, False)
