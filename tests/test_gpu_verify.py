"""scripts/gpu_verify.sh, the one-call GPU check, on a machine without a GPU: its dry run must finish, write at most 8
files (what comes back from a device call), and prove that every step's test or benchmark selection still collects
something; its per-step time limits must hold."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_verify.sh"
MAX_FILES = 8
STEPS = ("tests", "lora", "similarity", "masked-adamw")


def _run(out: Path, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    environ = {**os.environ, "OUT": str(out), "DRY_RUN": "1", "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)
    summary = (out / "summary.txt").read_text()
    print(summary)
    return proc, summary


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_script_calls_python3_and_bounds_every_step():
    """The GPU image has python3 only; every pytest or pip call runs through run_step, i.e. under `timeout`."""
    text = SCRIPT.read_text()
    assert re.search(r'PY="\$\{PYTHON:-python3\}"', text)
    assert not re.search(r"(^|[\s;(])python\s", text, re.MULTILINE), "a bare `python` call"
    for line in text.replace("\\\n", " ").splitlines():  # continued lines joined
        if re.search(r"\$PY -m (pytest|pip)", line):
            assert "run_step" in line, f"not under a time limit: {line.strip()}"
    assert "timeout --signal=INT --kill-after=10" in text


@pytest.mark.slow
def test_dry_run_collects_every_selection_and_writes_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    proc, summary = _run(out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= MAX_FILES, files
    assert "DRY RUN" in summary and "GPU steps are not run" in summary
    for step in STEPS:
        assert re.search(rf"^{re.escape(step)} \(collect only\): ok", summary, re.MULTILINE), step
    counts = [int(n) for n in re.findall(r"(\d+)/\d+ tests collected", summary)]
    assert len(counts) == len(STEPS) and all(n > 0 for n in counts), counts
    assert re.search(r"^total: \d+ s, exit status 0", summary, re.MULTILINE)


def test_each_step_stops_at_its_time_limit(tmp_path):
    """One-second budgets: every step is cut off, says so, and the whole script still reports and fails."""
    out = tmp_path / "out"
    budgets = {name: "1" for name in ("TESTS_S", "LORA_S", "SIM_S", "MASKED_S", "BUILD_S")}
    start = time.monotonic()
    proc, summary = _run(out, timeout=300, **budgets)
    took = time.monotonic() - start
    assert proc.returncode == 1
    timed_out = re.findall(r"^(\S+) \(collect only\): TIMED OUT after 1s", summary, re.MULTILINE)
    assert timed_out == list(STEPS), summary
    # Each cut-off step costs its 1 s limit plus up to the 10 s grace before SIGKILL; the rest is shell and python3
    # start-up (device detection, the extension check): far from the minutes the steps take unbounded.
    assert took < 120, took
    assert len([p for p in out.rglob("*") if p.is_file()]) <= MAX_FILES
