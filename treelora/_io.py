"""Atomic file writes, the one way treelora writes a file that a user keeps (checkpoints, adapters, results, caches).

:func:`atomic_write` hands its ``write`` callable a temporary path beside the target (same folder, so the same file
system) and renames it over the target only once ``write`` has returned. A reader, or a run resumed after a crash or a
kill, sees either the old content or the new one, never a half-written file; when ``write`` raises, the temporary is
removed and the old target is left as it was.

This module sits in the lowest layer of the package (the standard library only), so that every layer can use it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` creates a file or a folder at ``tmp``, which then replaces ``path``.

    Args:
        path: the target file or folder; its parent folders are created.
        write: called once with the temporary path (a sibling of ``path`` named ``.<stem>.<pid>-<random>.tmp<suffix>``
            so that writers which infer the format from the suffix, such as matplotlib's ``savefig``, still work). It
            must create a file or a folder there.
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    Raises:
        FileNotFoundError: ``write`` returned without creating anything at the temporary path.
        Whatever ``write`` raises (the target is then untouched).

    A file is flushed to disk (``fsync``) before the rename, so that a power loss cannot leave an empty target. A
    folder replaces an existing folder in two renames (the old one is moved aside, then deleted), the closest to
    atomic that POSIX offers for non-empty folders.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.with_name(f".{target.stem}.{token}.tmp{target.suffix}")
    try:
        write(tmp)
        if tmp.is_dir():
            if target.is_dir():
                aside = target.with_name(f".{target.name}.{token}.old")
                os.replace(target, aside)
                os.replace(tmp, target)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(tmp, target)
        elif tmp.exists():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            raise FileNotFoundError(f"atomic_write({str(target)!r}): the writer created nothing at {tmp}")
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return target
