"""The examples in examples/ run as documented: the plain-PyTorch one gives the same tree and accuracies on 1 and 2
processes (gloo), the accelerate one trains three tasks on 2 processes, the Trainer one fills the bank."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each launch imports torch (and transformers) in every process: 10-30 s on a busy 2-core machine.
TIMEOUT_S = 300
SMALL = ["--tasks", "2", "--examples", "64", "--batch-size", "16", "--epochs", "2"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return _run(command + [str(ROOT / "examples" / script), *args])


@pytest.mark.slow
def test_plain_pytorch_example_one_and_two_processes_agree(tmp_path):
    spec = importlib.util.spec_from_file_location("plain_pytorch_example", ROOT / "examples" / "plain_pytorch.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    single = example.main(["--out", str(tmp_path / "one"), *SMALL])
    _torchrun("plain_pytorch.py", "--out", str(tmp_path / "two"), *SMALL)
    double = json.loads((tmp_path / "two" / "results.json").read_text())
    assert single["distributed"] == {"world_size": 1, "backend": None, "state_identical_across_ranks": True}
    assert double["distributed"] == {"world_size": 2, "backend": "gloo", "state_identical_across_ranks": True}
    assert double["tree"] == single["tree"] == {"tasks": [0, 1], "left": {"tasks": [0]}, "right": {"tasks": [1]}}
    for one, two in zip(single["accuracy_after_each_task"], double["accuracy_after_each_task"]):
        assert len(one) == len(two)
        assert all(abs(a - b) <= 0.005 for a, b in zip(one, two))


@pytest.mark.slow
def test_accelerate_example_two_processes():
    out = _torchrun("accelerate_loop.py").stdout
    assert "after task 2: bank holds 3 signatures" in out
    assert out.count("GradientTree: 3 tasks") == 1  # printed by the main process only


@pytest.mark.slow
def test_hf_trainer_example():
    out = _run([sys.executable, str(ROOT / "examples" / "hf_trainer.py")]).stdout
    assert "after task 1: the bank holds 2 signatures" in out
