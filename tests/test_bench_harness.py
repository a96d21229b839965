"""The benchmark harness end to end, at smoke size: ``pytest bench/bench_lora.py --benchmark-only --bench-smoke`` exits
0 and prints its table, writes its JSON report under ``local/`` and never touches the committed reference files,
``--benchmark-compare`` against a saved run works, and ``scripts/bench_tables.py`` renders the report.

The JSON report target is checked against both ways pytest-benchmark writes it (an open file before 5.3, a path
from 5.3 on), whichever version is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

pytest.importorskip("pytest_benchmark")


def _harness():
    spec = importlib.util.spec_from_file_location("treelora_bench_harness", BENCH / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.json"))}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's treelora, whatever is installed
    env.pop("TREELORA_BENCH_REFERENCE", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_json_report_is_written_only_when_pytest_benchmark_writes(tmp_path):
    harness = _harness()
    target = tmp_path / "cpu" / "local" / "bench_lora.json"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"earlier run")
    report = harness.JsonReport(target)
    assert target.read_bytes() == b"earlier run"  # creating the target opens nothing
    with report as fh:  # pytest-benchmark <= 5.2: `with self.json as fh`
        fh.write(b'{"old": 1}')
    assert json.loads(target.read_text()) == {"old": 1}
    fresh = harness.JsonReport(tmp_path / "new" / "folder" / "report.json")
    with open(fresh, mode="wb") as fh:  # pytest-benchmark >= 5.3: `open(self.json, mode="wb")`
        fh.write(b'{"new": 2}')
    assert json.loads((tmp_path / "new" / "folder" / "report.json").read_text()) == {"new": 2}
    assert str(fresh) == str(tmp_path / "new" / "folder" / "report.json")


def test_bench_lora_smoke_run_keeps_references_and_compares(tmp_path):
    results = tmp_path / "results"
    references = {}
    for device_folder in (BENCH / "results").iterdir():
        if device_folder.is_dir():
            copy = results / device_folder.name
            copy.mkdir(parents=True)
            for path in device_folder.glob("*.json"):
                (copy / path.name).write_bytes(path.read_bytes())
            references[device_folder.name] = _digests(copy)
    assert references.get("cpu"), "the committed CPU reference results are missing"
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCH / "bench_lora.py"),
        "--benchmark-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "--bench-smoke",
        f"--bench-results={results}",
        "--benchmark-storage=file://storage",  # relative to cwd: pytest-benchmark 5.2 needs storage under cwd
    ]
    first = _run([*command, "--benchmark-autosave"], cwd=tmp_path)
    print(first.stdout[-3000:], first.stderr[-3000:])
    assert first.returncode == 0
    assert "Name (time in" in first.stdout  # pytest-benchmark's table
    assert "test_side_by_side_cpu[M64-K32-N32-r4]" in first.stdout
    for device, digests in references.items():
        assert _digests(results / device) == digests, f"a smoke run changed the {device} reference results"
    reports = list(results.glob("*/local/smoke/bench_lora.json"))
    assert len(reports) == 1
    data = json.loads(reports[0].read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert "test_lora_layer[smoke-M64-K32-N32-r4-treelora-torch-full]" in names
    assert "test_lora_layer[smoke-M64-K32-N32-r4-peft-forward]" in names
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        assert {"op", "provider", "mode", "dtype", "device", "M", "K", "N", "r"} <= info.keys(), bench["name"]

    device = reports[0].parents[2].name
    table = _run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_tables.py"),
            f"--results={results}",
            f"--device={device}",
            "--smoke",
        ],
        cwd=tmp_path,
    )
    assert table.returncode == 0, table.stderr
    assert "| M=64, K=32, N=32, r=4 |" in table.stdout and "| - |" in table.stdout  # no target at smoke size

    second = _run([*command, "--benchmark-compare", "-k", "torch-base"], cwd=tmp_path)
    print(second.stdout[-3000:], second.stderr[-3000:])
    assert second.returncode == 0
    output = second.stdout + second.stderr
    assert "Comparing against benchmarks from" in output and "/0001_" in output and "(NOW)" in output


def test_bench_tables_names_a_broken_report(tmp_path):
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / "bench_lora.json").write_bytes(b"")  # what a crashed run used to leave behind
    out = _run([sys.executable, str(ROOT / "scripts" / "bench_tables.py"), f"--results={tmp_path}"], cwd=tmp_path)
    assert out.returncode != 0
    assert f"{folder / 'bench_lora.json'} is not a pytest-benchmark JSON report" in out.stderr


def test_reports_go_to_local_unless_a_reference_run_is_asked_for(tmp_path, monkeypatch):
    harness = _harness()

    class Config:
        args = ["bench/bench_lora.py::test_lora_layer"]

        @staticmethod
        def getoption(name, default=None):
            return {"bench_results": str(tmp_path)}.get(name, default)

    device = harness.device_name()
    assert harness.report_path(Config, reference=False) == tmp_path / device / "local" / "bench_lora.json"
    assert harness.report_path(Config, reference=False, smoke=True) == tmp_path / device / "local/smoke/bench_lora.json"
    assert harness.report_path(Config, reference=True) == tmp_path / device / "bench_lora.json"
    monkeypatch.setenv("TREELORA_BENCH_REFERENCE", "yes")
    with pytest.raises(pytest.UsageError, match="TREELORA_BENCH_REFERENCE must be unset, '0' or '1'"):
        harness._reference_requested(Config)
