"""Benchmark harness shared by every file in bench/ (pytest-benchmark).

* Results go to ``bench/results/<device>/<name>.json`` (device ``cpu`` or the GPU's short name, e.g. ``h100``; name
  from the benchmark files run) unless ``--benchmark-json`` is given.
* Every benchmark records, in ``extra_info``: ``op``, ``provider`` (treelora-triton, treelora-cuda, treelora-torch,
  peft, torch-base, eager-reference), ``mode`` (forward, backward, full, step, ...), ``dtype``, its shape fields,
  ``device`` and the torch / triton versions (:func:`record`).
* GPU timing synchronises the device after every call (:func:`synchronized`); ratios between providers that a target
  depends on are measured side by side by alternating them in one loop and taking medians (:func:`alternating_medians`).
"""

from __future__ import annotations

import importlib.metadata
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str | None = None) -> str:
    """``cpu`` or a short GPU name (``h100``, ``h200``, ``a100``, else the sanitised full name)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "cpu"
    full = torch.cuda.get_device_name(device)
    m = re.search(r"\b([A-Z]\d{2,3})\b", full)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", full)).lower()


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "triton": _version("triton"), "peft": _version("peft")}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or ""
    return out


def record(
    benchmark, *, op: str, provider: str, mode: str, dtype: torch.dtype | str, device: str | None = None, **shape
) -> None:
    """Fill ``benchmark.extra_info`` with the fields every treelora benchmark carries (SPEC section 11)."""
    info = benchmark.extra_info
    info.update(
        op=op,
        provider=provider,
        mode=mode,
        dtype=str(dtype).replace("torch.", ""),
        device=device or device_name(),
        **shape,
    )
    info.update({f"{k}_version": v for k, v in versions().items()})
    info["cpu_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()


def synchronized(fn: Callable[[], object], device: torch.device | str | None = None) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation, so wall time covers the GPU work it queued."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def alternating_medians(
    fns: dict[str, Callable[[], object]], rounds: int = 15, warmup: int = 2, device: torch.device | str | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, measured by alternating them round by round (so drifts in clock
    speed or background load hit every provider alike)."""
    timed = {k: synchronized(f, device) for k, f in fns.items()}
    for _ in range(warmup):
        for f in timed.values():
            f()
    samples: dict[str, list[float]] = {k: [] for k in timed}
    for i in range(rounds):
        order = list(timed.items()) if i % 2 == 0 else list(reversed(timed.items()))
        for k, f in order:
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before (None on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device-copy bandwidth (GB/s, read + write) measured once per run with a large ``copy_``: 1 GiB on GPU,
    128 MiB on CPU. Memory-bound benchmarks report ``fraction_of_copy_bandwidth`` against it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = alternating_medians({"copy": lambda: dst.copy_(src)}, rounds=10, warmup=2, device=device)["copy"]
    return 2 * n * 4 / seconds / 1e9


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark_json", None) is not None or config.getoption("benchmark_disable", False):
        return
    if config.getoption("collectonly", False) or config.getoption("benchmark_skip", False):
        return  # nothing will be measured: leave earlier results untouched
    stems = sorted({Path(a.split("::")[0]).stem for a in config.args if a.split("::")[0].endswith(".py")})
    name = stems[0] if len(stems) == 1 else "all"
    out = RESULTS / device_name()
    out.mkdir(parents=True, exist_ok=True)
    config.option.benchmark_json = open(out / f"{name}.json", "wb")  # noqa: SIM115 (pytest-benchmark closes it)
