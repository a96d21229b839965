"""Backend registry: every op has up to three implementations, tried in the order ``cuda`` → ``triton`` → ``torch``.

Each implementation is registered with a function that returns the *reasons* it cannot run a given input (an
empty list means it can). An automatic choice takes the first backend with no reasons and falls back quietly; a
backend forced with ``TREELORA_BACKEND=...`` or :func:`use_backend` raises :class:`BackendUnavailableError` with
its reasons instead of falling back, so a user who asked for a kernel never silently gets another one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

BACKEND_NAMES = ("cuda", "triton", "torch")
ENV_BACKEND = "TREELORA_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("treelora_forced_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """Raised when a backend that was explicitly requested cannot run the given input."""


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``fn`` takes the op's (validated) arguments. ``reasons`` takes the same arguments and returns why this backend
    cannot run them (empty when it can). ``environment`` returns the input-independent reasons (library missing,
    no GPU), used by ``python -m treelora info``.
    """

    op: str
    name: str
    fn: Callable[..., Any]
    reasons: Callable[..., list[str]]
    environment: Callable[[], list[str]]


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register(
    op: str,
    name: str,
    fn: Callable[..., Any],
    reasons: Callable[..., list[str]],
    environment: Callable[[], list[str]] | None = None,
) -> Backend:
    """Register ``fn`` as backend ``name`` of ``op`` (replacing an earlier registration of the same pair)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
    backend = Backend(op, name, fn, reasons, environment or (lambda: []))
    _REGISTRY.setdefault(op, {})[name] = backend
    return backend


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def backends_for(op: str) -> dict[str, Backend]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {registered_ops()}")
    return _REGISTRY[op]


def _check_name(name: str, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` (innermost wins) or by ``TREELORA_BACKEND``, else None."""
    name = _forced.get()
    if name is not None:  # set by use_backend; "" means use_backend(None): automatic, ignoring the environment
        return name or None
    env = os.environ.get(ENV_BACKEND, "").strip()
    return _check_name(env, ENV_BACKEND) if env else None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force backend ``name`` ("torch", "triton" or "cuda") for every op called inside the block.

    ``use_backend(None)`` restores automatic selection inside the block (it also overrides ``TREELORA_BACKEND``).
    """
    if name is not None:
        _check_name(name, "use_backend(name)")
    token = _forced.set(name if name is not None else "")
    try:
        yield
    finally:
        _forced.reset(token)


def select(op: str, *args: Any, **kwargs: Any) -> Backend:
    """The backend that runs ``op`` on these arguments (see the module docstring for the rules)."""
    table = backends_for(op)
    forced = forced_backend()
    if forced:
        backend = table.get(forced)
        if backend is None:
            raise BackendUnavailableError(f"{op}: backend {forced!r} was requested but is not implemented for this op")
        why = backend.reasons(*args, **kwargs)
        if why:
            raise BackendUnavailableError(f"{op}: backend {forced!r} was requested but cannot run: " + "; ".join(why))
        return backend
    collected = []
    for name in BACKEND_NAMES:
        backend = table.get(name)
        if backend is None:
            continue
        why = backend.reasons(*args, **kwargs)
        if not why:
            return backend
        collected.append(f"{name}: " + "; ".join(why))
    raise BackendUnavailableError(f"{op}: no backend can run this input: " + " | ".join(collected))


def explain(op: str, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
    """For each registered backend of ``op``, the reasons it cannot run these arguments (empty = it can)."""
    return {name: b.reasons(*args, **kwargs) for name, b in backends_for(op).items()}


# --- environment checks shared by the ops -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (must be set before the kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_environment() -> list[str]:
    if not triton_importable():
        return ["triton is not installed (pip install 'treelora[triton]')"]
    return []


def device_reasons_triton(*tensors: Any) -> list[str]:
    """Reasons the Triton backend cannot run on these tensors' device(s)."""
    why = triton_environment()
    if why:
        return why
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and triton_interpret():
            continue
        return [f"tensor on {t.device} (triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1)"]
    return []


def device_reasons_cuda(*tensors: Any) -> list[str]:
    """Reasons the compiled extension cannot run on these tensors' device(s)."""
    from treelora import _cpp_lib

    why = _cpp_lib.environment_reasons()
    if why:
        return why
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            return [f"tensor on {t.device} (the CUDA extension needs CUDA tensors)"]
    return []
