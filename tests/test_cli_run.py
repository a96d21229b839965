"""`treelora run` on tiny models built from configs: outputs, resume after a kill, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import treelora
from treelora import cli
from treelora.cl import RunInterrupted

PNG = b"\x89PNG\r\n\x1a\n"
# The stream these tests were written for (the default stream is wordnet-classil; its tests are in test_cl_objectives).
TINY = [
    "--stream",
    "wordnet-supersense",
    "--model",
    "bert-tiny",
    "--train-per-class",
    "4",
    "--test-per-class",
    "3",
    "--epochs",
    "1",
    "--quiet",
    "--threads",
    "1",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(capsys, *argv):
    rc = cli.main(["run", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_writes_the_table_matrices_and_result_files(tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, out, _ = _run(capsys, *TINY, "--methods", "TreeLoRA,SeqLoRA,O-LoRA,EWC,Joint", "--out", str(out_dir))
    assert rc == 0
    assert "| method" in out and "ACC (%)" in out and "BWT (%)" in out and "peak memory (MiB)" in out
    for label in ("TreeLoRA", "SeqLoRA", "O-LoRA", "EWC", "Joint"):
        assert f"| {label}" in out
    assert "TreeLoRA: accuracy (%) on task j" in out and "  t8 " in out
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["accuracy_matrix.png", "checkpoints", "results.csv", "results.json", "tree.png"]
    assert (out_dir / "accuracy_matrix.png").read_bytes()[:8] == PNG and (out_dir / "tree.png").read_bytes()[:8] == PNG
    payload = json.loads((out_dir / "results.json").read_text())
    assert [r["method"] for r in payload["results"]] == ["treelora", "seqlora", "olora", "ewc", "joint"]
    tree = payload["results"][0]["tree"]
    assert sorted(tree["tasks"]) == list(range(8))
    assert payload["stream"]["train_sizes"] == [16] * 8 and payload["machine"]["cpu_count"] >= 1
    rows = (out_dir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,acc,bwt,") and len(rows) == 6
    seq = payload["results"][1]
    assert float(rows[2].split(",")[1]) == pytest.approx(seq["metrics"]["acc"])


def test_run_on_a_trace_folder_with_exact_match_scoring(tmp_path, capsys):
    trace = tmp_path / "trace"
    for task in ("copy", "echo"):
        (trace / task).mkdir(parents=True)
        for split in ("train", "eval", "test"):
            items = [{"prompt": f"Say {w}.", "answer": w} for w in ("yes", "no", "maybe")]
            (trace / task / f"{split}.json").write_text(json.dumps(items))
    rc, out, _ = _run(
        capsys,
        "--stream",
        str(trace),
        "--model",
        "llama-tiny",
        "--methods",
        "SeqLoRA",
        "--max-steps",
        "1",
        "--quiet",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "out"),
    )
    assert rc == 0 and "| SeqLoRA" in out
    result = json.loads((tmp_path / "out" / "results.json").read_text())["results"][0]
    assert result["task_names"] == ["copy", "echo"] and result["steps"] == [1, 1]


def _trace_with(tmp_path, broken: str) -> Path:
    root = tmp_path / "trace"
    (root / "task").mkdir(parents=True)
    for split in ("train", "eval", "test"):
        (root / "task" / f"{split}.json").write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    if broken == "missing":
        (root / "task" / "test.json").unlink()
    else:
        (root / "task" / "train.json").write_text('[{"prompt": "p", "answer": "a"},')
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stream", "wordnet-verbs"], "unknown stream 'wordnet-verbs'"),
        (["--model", "gpt-17"], "unknown model 'gpt-17'"),
        (["--methods", "TreeLoRA,GEM"], "unknown method 'GEM'"),
        (["--model", "./no/such/model"], "model path no/such/model does not exist"),
        (["--stream", "TRACE:missing"], "missing split file"),
        (["--stream", "TRACE:malformed"], "malformed JSON in"),
        (["--stream", "wordnet-instruct", "--model", "bert-tiny"], "needs a causal LM"),
        (["--methods", "SeqLoRA,seqlora"], "lists a method twice"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--method-option", "lambda"], "expects key=value"),
        (
            ["--method-option", "lambda_orth=0.3"],
            "method option 'lambda_orth' does not apply to TreeLoRA or SeqLoRA (it is an option of O-LoRA)",
        ),
        (["--method-option", "reg_lambda=-1"], "TreeLoRAConfig.reg_lambda must be in [0, inf)"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, argv, message):
    argv = [str(_trace_with(tmp_path, a.split(":")[1])) if a.startswith("TRACE:") else a for a in argv]
    out_dir = tmp_path / "out"
    rc, _, err = _run(capsys, *argv, "--out", str(out_dir), "--quiet")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("treelora run: error: ") and message in lines[0], err
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--methods", "SeqLoRA,EWC", "--method-option", "reg_lambda=1"],
        ["--methods", "O-LoRA", "--method-option", "lambda_orth=strong"],
        ["--method-option", "preset=released"],
    ],
)
def test_method_options_are_checked_before_any_model_loads(tmp_path, capsys, monkeypatch, argv):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the method options were checked")

    monkeypatch.setattr(cli, "load_model", no_loading)
    rc, _, err = _run(capsys, *argv, "--out", str(tmp_path / "out"), "--quiet")
    assert rc == 2 and err.startswith("treelora run: error: --method-option: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_method_options_go_to_the_methods_that_have_them(tmp_path, capsys):
    out_dir = tmp_path / "out"
    argv = [*TINY, "--methods", "TreeLoRA,O-LoRA", "--method-option", "lambda_orth=0.3", "--out", str(out_dir)]
    rc, _, _ = _run(capsys, *argv)
    assert rc == 0
    payload = json.loads((out_dir / "results.json").read_text())
    assert payload["method_options"] == {"lambda_orth": 0.3}
    assert [(r["method"], r["method_options"]) for r in payload["results"]] == [
        ("treelora", {}),
        ("olora", {"lambda_orth": 0.3}),
    ]


def test_ctrl_c_prints_one_line_with_the_last_task_and_the_resume_command(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise RunInterrupted("seqlora", 2, 8, finished_methods=["treelora"])

    monkeypatch.setattr(cli, "compare_methods", interrupted)
    out_dir = tmp_path / "my run"
    rc, _, err = _run(capsys, *TINY, "--out", str(out_dir))
    assert rc == 130
    resume = shlex.join(["treelora", "run", *TINY, "--out", str(out_dir), "--resume"])
    assert err == (
        f"treelora run: interrupted (last finished task: SeqLoRA task 3/8; finished: TreeLoRA); resume with: {resume}\n"
    )


def test_version_and_help_are_plain_text(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"treelora {treelora.__version__}\n"
    for argv in ([], ["run"], ["bench"]):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text and ":class:" not in text and ":func:" not in text, text
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    assert '{"prompt": "...", "answer": "..."}' in text and "train.json, eval.json and test.json" in text
    methods = "TreeLoRA, SeqLoRA, O-LoRA, EWC, Joint, LwF, Replay, InfLoRA"
    assert methods in " ".join(text.split()) and "exit code 130" in text  # the help wraps the list of methods


def test_bench_without_a_benchmark_folder_is_exit_2(tmp_path, capsys):
    assert cli.main(["bench", "--path", str(tmp_path / "none")]) == 2
    assert "benchmark folder" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_killing_the_process_reaches_the_same_numbers(tmp_path, capsys):
    """Kill `python -m treelora run` once the first task's checkpoint exists, resume it, compare with a run that was
    never interrupted."""
    argv = [
        "--model",
        "bert-tiny",
        "--train-per-class",
        "24",
        "--test-per-class",
        "3",
        "--epochs",
        "2",
        "--quiet",
        "--threads",
        "1",
    ]
    assert _run(capsys, *argv, "--out", str(tmp_path / "whole"))[0] == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "treelora", "run", *argv, "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = killed / "checkpoints" / "treelora" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (killed / "results.json").exists(), "the run was not killed mid-way"
    assert not [p for p in checkpoint.parent.iterdir() if p.name != "checkpoint.pt"]
    rc, out, _ = _run(capsys, *argv, "--out", str(killed), "--resume")
    assert rc == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["results"]
    resumed = json.loads((killed / "results.json").read_text())["results"]
    for a, b in zip(whole, resumed):
        assert a["method"] == b["method"] and a["R"] == b["R"] and a["losses"] == b["losses"]
        assert a["metrics"] == b["metrics"]


@pytest.mark.slow
def test_ctrl_c_on_a_real_run_exits_130_with_one_line_and_the_command_resumes_it(tmp_path, capsys):
    """SIGINT to `python -m treelora run` once a checkpoint exists: exit code 130, no traceback, one line naming the
    last checkpointed task; running the printed command finishes the run."""
    out_dir = tmp_path / "run"
    argv = ["run", *TINY[:4], "--train-per-class", "40", "--test-per-class", "3", "--epochs", "2", "--quiet"]
    argv += ["--threads", "1", "--methods", "SeqLoRA", "--out", str(out_dir)]
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "treelora", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    checkpoint = out_dir / "checkpoints" / "seqlora" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"the run was not interrupted mid-way (exit {proc.returncode}): {err}"
    completed = torch.load(checkpoint, weights_only=False)["completed"]
    resume = shlex.join(["python", "-m", "treelora", *argv, "--resume"])
    assert (
        err
        == f"treelora run: interrupted (last finished task: SeqLoRA task {completed + 1}/8); resume with: {resume}\n"
    )
    assert not (out_dir / "results.json").exists()
    command = shlex.split(err.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "treelora"]
    assert cli.main(command[3:]) == 0 and (out_dir / "results.json").is_file()
