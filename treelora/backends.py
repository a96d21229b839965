"""Backend registry: every op has up to three implementations, tried in the order ``cuda`` → ``triton`` → ``torch``.

An op family (one file in treelora/ops) registers all of its backends with one call::

    backends.register_family(
        "similarity",
        ops=("pairwise_similarity", "accumulate_and_compare_"),
        torch="treelora.kernels.torch.similarity",
        triton="treelora.kernels.triton.similarity",
        cuda="treelora.kernels.cuda.similarity",
    )

The contract of a backend module, the same in the three kernel languages: for every op ``X`` of the family it defines
the op's entry points (by default one function named ``X``; an op whose autograd the ops layer drives lists several,
e.g. ``lora_linear_fwd``, ``lora_linear_bwd`` and ``lora_linear_dropout_mask``) and ``<X without a trailing
_>_not_supported_reasons``, which takes the op's arguments and returns why the module cannot run them (empty when it
can): devices, dtypes and limits, one reason per argument, naming it. Input-independent reasons (triton missing, the
compiled extension not built, no GPU) come from ``environment_reasons()`` of the module's package
(treelora/kernels/triton/__init__.py, treelora/kernels/cuda/__init__.py), asked first, so that a module is imported
only when its backend may run: ``import treelora`` never imports triton.

An automatic choice takes the first backend with no reasons and falls back quietly; a backend forced with
``TREELORA_BACKEND=...`` or :func:`use_backend` raises :class:`BackendUnavailableError` with its reasons instead of
falling back, so a user who asked for a kernel never silently gets another one.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

BACKEND_NAMES = ("cuda", "triton", "torch")
ENV_BACKEND = "TREELORA_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("treelora_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """Raised when a backend that was explicitly requested cannot run the given input."""


def reasons_name(op: str) -> str:
    """The name of op ``op``'s reasons function in a backend module (``masked_adamw_`` ->
    ``masked_adamw_not_supported_reasons``)."""
    return f"{op.rstrip('_')}_not_supported_reasons"


# A backend module: a dotted path (imported on first use) or an object with the entry points (tests pass namespaces).
ModuleRef = Union[str, Any]


class Backend:
    """One backend of one op: its module's entry points, looked up on first use.

    ``backend.module`` is the backend module, ``backend.fn`` its first entry point for this op (``entries`` names
    them all); ``reasons(*args, **kwargs)`` says why it cannot run the op's arguments, ``environment()`` the
    input-independent part (``python -m treelora info``).
    """

    def __init__(self, family: str, op: str, name: str, module: ModuleRef, entries: Sequence[str]) -> None:
        self.family, self.op, self.name, self.entries = family, op, name, tuple(entries)
        self._ref = module
        self._module = None if isinstance(module, str) else module

    def __repr__(self) -> str:
        return f"Backend(op={self.op!r}, name={self.name!r})"

    @property
    def module(self) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._ref)
        return self._module

    def environment(self) -> list[str]:
        """Reasons that hold whatever the input: from the package of a module given by path (the module itself is
        not imported), or from the object's own ``environment_reasons`` when one is given."""
        owner = importlib.import_module(self._ref.rpartition(".")[0]) if isinstance(self._ref, str) else self._ref
        check: Callable[[], list[str]] | None = getattr(owner, "environment_reasons", None)
        return list(check()) if check is not None else []

    def reasons(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.environment() or list(getattr(self.module, reasons_name(self.op))(*args, **kwargs))

    @property
    def fn(self) -> Callable[..., Any]:
        return getattr(self.module, self.entries[0])


_REGISTRY: dict[str, dict[str, Backend]] = {}
_FAMILIES: dict[str, tuple[str, ...]] = {}


def register_family(
    family: str, *, ops: Union[Sequence[str], Mapping[str, Sequence[str]]], **modules: ModuleRef | None
) -> None:
    """Register the backends of every op of ``family`` (replacing an earlier registration of the family).

    Args:
        family: the family's name (its file in treelora/ops).
        ops: the op names, or a mapping op name -> its entry-point names (default: one entry named like the op).
        **modules: ``torch=``, ``triton=``, ``cuda=``: each backend's module, a dotted path (imported on first use)
            or an object with the entry points; None or absent when the family has no such backend. ``torch`` is
            required: it is every op's fallback.
    """
    for name in modules:
        _check_name(name, "backend name")
    if modules.get("torch") is None:
        raise ValueError(f"family {family!r}: the torch backend is required (it is the fallback of every op)")
    table = dict(ops) if isinstance(ops, Mapping) else {op: (op,) for op in ops}
    if not table:
        raise ValueError(f"family {family!r}: ops is empty")
    for op, entries in table.items():
        if isinstance(entries, str) or not entries:
            raise ValueError(f"family {family!r}: op {op!r} needs a sequence of entry-point names, got {entries!r}")
        owner = next((f for f, names in _FAMILIES.items() if op in names and f != family), None)
        if owner is not None:
            raise ValueError(f"op {op!r} is already registered by family {owner!r}")
    unregister_family(family)
    for op, entries in table.items():
        _REGISTRY[op] = {
            name: Backend(family, op, name, modules[name], entries)
            for name in BACKEND_NAMES
            if modules.get(name) is not None
        }
    _FAMILIES[family] = tuple(table)


def unregister_family(family: str) -> None:
    """Remove a family's ops (tests register toy families)."""
    for op in _FAMILIES.pop(family, ()):
        _REGISTRY.pop(op, None)


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def families() -> dict[str, tuple[str, ...]]:
    """Family name -> its op names."""
    return dict(_FAMILIES)


def backends_for(op: str) -> dict[str, Backend]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {registered_ops()}")
    return _REGISTRY[op]


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a backend name (str), got {type(name).__name__}")
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` (innermost wins) or by ``TREELORA_BACKEND``, else None."""
    name = _forced.get()
    if name is not None:  # set by use_backend; "" means use_backend(None): automatic, ignoring the environment
        return name or None
    value = os.environ.get(ENV_BACKEND, "").strip()
    return _check_name(value, ENV_BACKEND) if value else None


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
