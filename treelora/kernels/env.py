"""What the kernel backends need to know about the machine, read in one place, and the reasons they give when they
cannot run an input (one wording for every op family).

* ``TRITON_INTERPRET``: read once, at import, as triton itself reads it when ``@triton.jit`` runs: kernels defined
  with it set run on CPU tensors in the interpreter. Set it before importing treelora.
* whether triton is importable and a device can run its kernels; whether the compiled extension is usable
  (``treelora._cpp_lib``); whether the tensors of a call sit on a device a backend can use.
* :func:`device_guard`: every Triton and CUDA launch runs inside it, so a kernel launches on the GPU that holds its
  tensors, not on whatever device is current (which on a multi-GPU machine need not be the same).

The ``*_environment_reasons`` functions are input-independent and cheap (they never import triton); the backend
registry asks them first. Every ``<op>_not_supported_reasons`` of kernels/triton and kernels/cuda builds its messages
with :func:`triton_device_reasons` / :func:`cuda_device_reasons` and :func:`dtype_reasons`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any, ContextManager, Iterator, Sequence

import torch

from treelora import _cpp_lib
from treelora.kernels.constants import KERNEL_DTYPES, dtype_message

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (argument name, tensor | list of tensors | None): how the reasons functions receive the arguments they check.
Named = Sequence[tuple[str, Any]]


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_environment_reasons() -> list[str]:
    """Input-independent reasons the Triton backend cannot run anything here (empty when it may)."""
    if not triton_importable():
        return ["triton is not installed (pip install 'treelora[triton]')"]
    if not TRITON_INTERPRET and not torch.cuda.is_available():
        return ["no CUDA device (triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import)"]
    return []


def cuda_environment_reasons() -> list[str]:
    """Input-independent reasons the compiled extension cannot run (not built, failed to load, no usable GPU)."""
    return _cpp_lib.environment_reasons()


def _tensors(named: Named) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor among the arguments; list entries are named ``name[i]``."""
    for name, value in named:
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, (list, tuple)):
            for i, t in enumerate(value):
                if isinstance(t, torch.Tensor):
                    yield f"{name}[{i}]", t


def triton_device_reasons(named: Named) -> list[str]:
    """Why the Triton kernels cannot run on the device of these arguments (the first one that is unusable)."""
    for name, t in _tensors(named):
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu":
            if TRITON_INTERPRET:
                continue
            return [f"{name} is a CPU tensor but the triton kernels were defined without TRITON_INTERPRET=1"]
        return [f"{name} is on {t.device}; the triton kernels run on CUDA devices"]
    return []


def cuda_device_reasons(named: Named) -> list[str]:
    """Why the compiled extension cannot run on the device of these arguments (the first one that is unusable)."""
    for name, t in _tensors(named):
        if t.device.type != "cuda":
            return [f"{name} is on {t.device}; the CUDA extension needs CUDA tensors"]
    return []


def dtype_reasons(kernels: str, named: Named) -> list[str]:
    """One reason per argument holding a dtype the ``kernels`` (e.g. "triton kernels") do not take.

    Args:
        kernels: who refuses, for the message.
        named: (argument name, tensor | list of tensors | None) pairs; of a list, the first bad entry is named.
    """
    why = []
    seen = set()
    for name, t in _tensors(named):
        argument = name.split("[")[0]
        if argument in seen or t.dtype in KERNEL_DTYPES:
            continue
        seen.add(argument)
        context = f" by the {kernels} (fp64 inputs run on the torch backend)"
        why.append(dtype_message(name, t.dtype, KERNEL_DTYPES, context))
    return why


def device_guard(device: torch.device) -> ContextManager[Any]:
    """Make ``device`` the current CUDA device while launching; nothing to do for CPU tensors (the interpreter and
    the CUDA emulator)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
