"""`run` and `compare` start with OpenMP's passive wait policy (a restart of the interpreter, since OpenMP reads it
once when torch loads), unless the user set one; --threads and the torchrun division of cores stay as they were."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from treelora import cli


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _capture_execve(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    return calls


def test_run_restarts_with_the_passive_wait_policy(monkeypatch):
    calls = _capture_execve(monkeypatch)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cli.sys, "orig_argv", ["python3", "-m", "treelora", "run", "--seed", "1"], raising=False)
    cli.prefer_passive_openmp(["run", "--seed", "1"])
    assert len(calls) == 1
    path, argv, env = calls[0]
    assert path == sys.executable and argv == [sys.executable, "-m", "treelora", "run", "--seed", "1"]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize("policy, argv", [("ACTIVE", ["run"]), (None, ["info"]), (None, [])])
def test_a_set_policy_and_other_commands_are_left_alone(monkeypatch, policy, argv):
    calls = _capture_execve(monkeypatch)
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    monkeypatch.setattr(cli.sys, "orig_argv", ["python3", "-m", "treelora", *argv], raising=False)
    cli.prefer_passive_openmp(argv)
    assert calls == []


def test_main_called_from_python_does_not_restart(monkeypatch, capsys):
    calls = _capture_execve(monkeypatch)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cli.main(["run", "--threads", "0"]) == 2
    assert calls == [] and "--threads must be >= 1" in capsys.readouterr().err


def test_the_restart_happens_in_a_real_process():
    # The snippet prints the policy it sees, then calls main as the program does: the first print comes from the
    # process before the restart, the second from the restarted one, which then reports the bad --threads.
    code = (
        "import os, sys; print('policy', os.environ.get('OMP_WAIT_POLICY'), flush=True); "
        "sys.argv = ['treelora', 'run', '--threads', '0']; "
        "from treelora.cli import main; sys.exit(main())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stdout.splitlines() == ["policy None", "policy PASSIVE"]
    assert "--threads must be >= 1" in out.stderr


def test_compare_runs_get_the_passive_policy_unless_set(monkeypatch):
    seen = []

    class FakePopen:
        def __init__(self, command, env):
            seen.append(env)

        def wait(self):
            return 0

    monkeypatch.setattr(cli.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli._launch_run(["--seed", "0"])
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli._launch_run(["--seed", "0"])
    assert [e["OMP_WAIT_POLICY"] for e in seen] == ["PASSIVE", "ACTIVE"]


def _context(world_size: int) -> SimpleNamespace:
    return SimpleNamespace(is_distributed=world_size > 1, world_size=world_size)


def test_threads_flag_and_the_torchrun_division_of_cores(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    cli._threads(SimpleNamespace(threads=3), _context(1))
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cli._threads(SimpleNamespace(threads=None), _context(4))
    assert torch.get_num_threads() == 4  # 8 cores shared by the node's 2 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    cli._threads(SimpleNamespace(threads=None), _context(16))
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    cli._threads(SimpleNamespace(threads=None), _context(1))
    assert torch.get_num_threads() == 2  # one process: torch's default is left as it is
