"""The trainer's progress line: loss and steps per second while a task trains."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A one-line progress bar (loss, step/s) on a terminal; on a pipe, one line per task only.

    Args:
        total: optimizer steps of the task. label: the line's prefix. enabled: False prints nothing.
        stream: where to write (default: standard error).
    """

    def __init__(self, total: int, label: str, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.out = stream or sys.stderr
        self.tty = self.enabled and self.out.isatty()
        self.start = time.perf_counter()
        self.step = 0
        self.loss = float("nan")
        self._open = False  # a partial line is on the terminal (drawn with "\r", not yet ended)

    def update(self, step: int, loss: float) -> None:
        self.step = step
        self.loss = loss
        if self.tty:
            self.out.write(f"\r{self._line()}")
            self.out.flush()
            self._open = True

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.step / elapsed if elapsed > 0 else 0.0
        width = 20
        done = int(width * self.step / max(self.total, 1))
        return (
            f"{self.label} [{'#' * done}{'.' * (width - done)}] {self.step}/{self.total} loss {self.loss:.4f} "
            f"{rate:.1f} step/s"
        )

    def close(self, extra: str = "") -> None:
        """End the task's line (the final state of the bar)."""
        if self.enabled:
            self.out.write(("\r" if self.tty else "") + self._line() + extra + "\n")
            self.out.flush()
        self._open = False

    def abandon(self) -> None:
        """End a partial terminal line without redrawing it (training was interrupted), so that what is printed next
        starts on its own line."""
        if self._open:
            self.out.write("\n")
            self.out.flush()
            self._open = False
