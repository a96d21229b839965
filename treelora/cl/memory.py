"""Peak memory of a block of training: CUDA allocated bytes on a GPU, the process's resident set size on CPU."""

from __future__ import annotations

import os
import threading

import torch

# Peak-memory sampling period on CPU (resident set size read from /proc): 20 ms costs well under 1% of a core.
RSS_SAMPLE_SECONDS = 0.02


def rss_bytes() -> int:
    """The process's current resident set size in bytes (``/proc/self/statm``; the peak so far where there is no
    ``/proc``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        # Imported here: `resource` exists on POSIX systems only, and this fallback runs only without /proc.
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory while the block runs: CUDA allocated bytes on a CUDA device, else the process's resident set size
    sampled every 20 ms by a background thread (the process-wide ``ru_maxrss`` cannot be reset between runs).

    Attributes:
        kind: ``"cuda_max_allocated"`` or ``"rss"``. peak: bytes, final once the block has ended.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.kind == "rss":
            self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def current(self) -> int:
        """The peak so far."""
        if self.kind == "rss":
            return max(self.peak, rss_bytes())
        return max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        else:
            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))
