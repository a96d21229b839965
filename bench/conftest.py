"""Benchmark harness shared by every file in bench/ (pytest-benchmark).

* Every measuring run writes its JSON report to ``bench/results/<device>/local/<name>.json`` (git-ignored; device
  ``cpu`` or the GPU's short name, e.g. ``h100``; name = the stem of the one benchmark file run, else ``all``) unless
  ``--benchmark-json`` is given; the file is opened only when the report is written, after the run. The committed
  reference files ``bench/results/<device>/<name>.json`` are written only on request: ``--bench-reference`` or
  ``TREELORA_BENCH_REFERENCE=1``. ``--bench-results DIR`` moves the whole tree elsewhere. pytest-benchmark's own
  storage (``--benchmark-save`` / ``--benchmark-autosave`` into ``.benchmarks/``, ``--benchmark-compare``) works
  alongside.
* ``--bench-smoke``: tiny shapes and a few rounds (modules that define ``SMOKE_SHAPES``; the others skip), report
  under ``local/smoke/``: the seconds-long end-to-end check CI runs (``tests/test_bench_harness.py``).
* Every benchmark records, in ``extra_info``: ``op``, ``provider`` (treelora-triton, treelora-cuda, treelora-torch,
  peft, torch-base, eager-reference), ``mode`` (forward, backward, full, step, ...), ``dtype``, its shape fields,
  ``device`` and the torch / triton versions (:func:`record`).
* GPU timing synchronises the device after every call (:func:`synchronized`); ratios between providers that a target
  depends on are measured side by side by alternating them in one loop and taking medians (:func:`alternating_medians`).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import statistics
import time
from pathlib import Path
from typing import BinaryIO, Callable

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


REFERENCE_ENV = "TREELORA_BENCH_REFERENCE"
_smoke = False


def smoke_run() -> bool:
    """Whether this run is ``--bench-smoke``: the modules that define ``SMOKE_SHAPES`` run only those (tiny shapes,
    a few rounds); the others skip. For checking the harness end to end in seconds, never for numbers."""
    return _smoke


class JsonReport(os.PathLike):
    """The ``--benchmark-json`` target in the form every pytest-benchmark version accepts, opened only when the report
    is written (after the run), so a run that crashes or measures nothing leaves an existing file as it was.

    pytest-benchmark 4.x to 5.2 expect an open binary file (``argparse.FileType("wb")``) and write the report inside
    ``with target as fh``; 5.3 takes a path and ``open()``s it itself (``os.PathLike``). Both are tested in
    ``tests/test_bench_harness.py``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def __fspath__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)  # 5.3 opens the path itself, right after asking for it
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __enter__(self) -> BinaryIO:
        self._file = open(self.__fspath__(), "wb")  # noqa: SIM115 (closed by __exit__)
        return self._file

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def pytest_addoption(parser):
    group = parser.getgroup("treelora", "treelora benchmark harness")
    group.addoption(
        "--bench-reference",
        action="store_true",
        default=False,
        help="write the JSON report to the committed reference file <results>/<device>/<name>.json instead of the "
        f"git-ignored <results>/<device>/local/<name>.json (same as {REFERENCE_ENV}=1)",
    )
    group.addoption(
        "--bench-results",
        metavar="DIR",
        default=None,
        help=f"the results folder the JSON report goes under (default {RESULTS})",
    )
    group.addoption(
        "--bench-smoke",
        action="store_true",
        default=False,
        help="tiny shapes and a few rounds, to check the harness end to end in seconds (report under "
        "<results>/<device>/local/smoke/; modules without a smoke parametrisation skip)",
    )


def _reference_requested(config) -> bool:
    value = os.environ.get(REFERENCE_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise pytest.UsageError(f"{REFERENCE_ENV} must be unset, '0' or '1', got {value!r}")
    return value == "1" or config.getoption("bench_reference", False)


def report_path(config, reference: bool, smoke: bool = False) -> Path:
    """Where a run's JSON report goes: ``<results>/<device>/<name>.json`` for a reference run, else
    ``<results>/<device>/local/[smoke/]<name>.json`` (see the module docstring)."""
    stems = sorted({Path(a.split("::")[0]).stem for a in config.args if a.split("::")[0].endswith(".py")})
    name = stems[0] if len(stems) == 1 else "all"
    folder = Path(config.getoption("bench_results", None) or RESULTS) / device_name()
    if not reference:
        folder = folder / "local"
        if smoke:
            folder = folder / "smoke"
    return folder / f"{name}.json"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # tryfirst: pytest-benchmark reads benchmark_json when its own pytest_configure creates the benchmark session.
    global _smoke
    _smoke = config.getoption("bench_smoke", False)
    reference = _reference_requested(config)
    if reference and _smoke:
        raise pytest.UsageError("--bench-smoke measures nothing worth keeping: it cannot write the reference results")
    if config.getoption("benchmark_json", None) is not None:
        if reference:
            raise pytest.UsageError(
                f"--benchmark-json and --bench-reference / {REFERENCE_ENV}=1 both name the JSON report: give one"
            )
        return
    if config.getoption("benchmark_disable", False) or config.getoption("collectonly", False):
        return
    if config.getoption("benchmark_skip", False):
        return  # nothing will be measured
    config.option.benchmark_json = JsonReport(report_path(config, reference, _smoke))


def pytest_collection_modifyitems(config, items):
    if not _smoke:
        return
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and not hasattr(module, "SMOKE_SHAPES"):
            item.add_marker(pytest.mark.skip(reason="--bench-smoke: this module has no smoke parametrisation"))
