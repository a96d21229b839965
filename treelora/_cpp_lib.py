"""Loader for the compiled CUDA extension ``treelora._C``.

Importing treelora never fails because of the extension: when it is missing (not built, built for another Python,
or a broken build), :data:`module` is None and :func:`require` raises a RuntimeError that says why, only when a
caller actually needs it. The extension itself is torch-free: launchers pass raw device pointers and the CUDA
stream handle as integers.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parent


def _read_build_info() -> dict[str, Any]:
    path = _PACKAGE_DIR / "_build_info.json"
    if not path.is_file():
        return {"built": False, "archs": [], "nvcc": None, "reason": "no build record (package not installed with pip)"}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"built": False, "archs": [], "nvcc": None, "reason": f"unreadable build record: {err}"}


def _import_extension() -> tuple[ModuleType | None, str]:
    try:
        _C = importlib.import_module("treelora._C")
    except ImportError as err:
        info = _read_build_info()
        reason = info.get("reason") or f"import failed: {err}"
        if info.get("built"):
            reason = f"built but failed to import: {err}"
        return None, reason
    return _C, ""


module, import_error = _import_extension()
build_info = _read_build_info()


def available() -> bool:
    """True when ``treelora._C`` imported (it may still find no GPU at run time)."""
    return module is not None


@functools.lru_cache(maxsize=1)
def device_error() -> str:
    """Empty when the extension sees a usable CUDA device, else the CUDA runtime's explanation."""
    if module is None:
        return import_error
    return module.device_error()


def environment_reasons() -> list[str]:
    """Input-independent reasons the ``cuda`` backend cannot run (missing extension, no device)."""
    if module is None:
        return [f"treelora._C is not available ({import_error})"]
    err = device_error()
    return [f"treelora._C finds no usable GPU ({err})"] if err else []


def require(entry: str) -> ModuleType:
    """The extension module, or a RuntimeError naming ``entry`` and why the extension is unavailable."""
    if module is None:
        raise RuntimeError(f"treelora._C.{entry} is unavailable: {import_error}")
    if not hasattr(module, entry):
        raise RuntimeError(f"treelora._C has no entry point {entry!r}; rebuild with `pip install .`")
    return module


def status() -> dict[str, Any]:
    """A summary for ``python -m treelora info``."""
    out: dict[str, Any] = {"importable": module is not None, "build": build_info}
    if module is None:
        out["reason"] = import_error
        return out
    out["archs"] = list(module.compiled_archs())
    out["cuda_runtime"] = module.cuda_runtime_version()
    out["entry_points"] = sorted(n for n in dir(module) if not n.startswith("_"))
    out["device_error"] = device_error()
    return out
