"""The continual-learning harness on several processes (gloo, CPU): 2 processes with per-rank batch B/2 against 1
process with batch B, resume on 2 processes, a state mismatch and a failing rank; and `torchrun -m treelora run`.

All 2-process scenarios run in ONE spawn of two workers (module fixture), one after another, to pay the start-up
(torch and transformers imports, about 5-10 s per process on a busy 2-core machine) once; each worker saves what it
saw and the tests compare it with a 1-process run computed here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from treelora import cli, data
from treelora.cl import RunInterrupted, SeqLoRA, TreeLoRA
from treelora.cl.distributed import (
    CollectiveError,
    DistributedContext,
    StateMismatchError,
    all_reduce_gradients,
    init_distributed,
    method_fingerprints,
    shutdown_distributed,
)
from treelora.cl.evaluation import Evaluator
from treelora.cl.objectives import TaskHeads
from treelora.cl.trainer import Trainer, TrainerConfig, TrainingObjective
from treelora.models import load_model

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# The whole spawn (imports, 4 runs of 2-4 tasks, the failure) takes 20-40 s on a loaded 2-core machine.
SPAWN_TIMEOUT_S = 300
# 33 training examples per task in global batches of 8: 4 full batches (4 + 4 per rank) and one of a single example,
# which leaves rank 1 an empty shard (weight 0) at the last step of every epoch.
TASKS, TRAIN, TEST, GLOBAL_BATCH, EPOCHS = 4, 33, 24, 8, 2


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are dominated by per-op overhead; OpenMP threads of a shared 2-core machine wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the run shared by the workers and the 1-process reference -------------------------------------------------------


def tiny_stream():
    """The first TASKS tasks of split-digits (8x8 images, 2 classes per task), TRAIN / TEST seeded examples each."""
    stream = data.split_digits()
    gen = torch.Generator().manual_seed(0)
    tasks = []
    for task in stream.tasks[:TASKS]:
        train = torch.randperm(len(task.train), generator=gen)[:TRAIN]
        test = torch.randperm(len(task.test), generator=gen)[:TEST]
        tasks.append(dataclasses.replace(task, train=task.train.subset(train), test=task.test.subset(test)))
    return dataclasses.replace(stream, tasks=tasks)


def config(checkpoint_dir: Path | None = None) -> TrainerConfig:
    return TrainerConfig(
        epochs=EPOCHS,
        batch_size=GLOBAL_BATCH,
        eval_batch_size=16,
        lr=3e-3,
        progress=False,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
    )


class RecordingTreeLoRA(TreeLoRA):
    """TreeLoRA that records the selection of every step (vit-tiny has no dropout, so 1 and 2 processes compute the
    same thing up to the summation order of the gradients)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.selections: list[list[int] | None] = []

    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        out = super().before_backward(loss)
        self.selections.append(None if self.last_selection is None else self.last_selection.tolist())
        return out


class RankStamped(SeqLoRA):
    """A method whose state differs between ranks: the end-of-task check must catch it."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rank": dist.get_rank()}


class FailsOnRank1(SeqLoRA):
    """Raises on rank 1 at its fourth step, while rank 0 goes on into the gradient all-reduce."""

    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        if dist.get_rank() == 1 and self.global_step == 3:
            raise ValueError("injected failure on rank 1")
        return super().before_backward(loss)


class RankLabels(Trainer):
    """A trainer whose label-head class vectors differ on every rank (as features computed by different GPUs' kernels
    could in the last bit): the trainer must broadcast rank 0's so that every rank scores with the same head."""

    def _label_vectors(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(100 + dist.get_rank())
        return torch.randn(self.stream.num_classes, self.loaded.hidden_size, generator=gen)


def frozen_head_config() -> TrainerConfig:
    return dataclasses.replace(config(), epochs=1, head="label", protocol="class-il")


def summary(trainer: Trainer, result) -> dict:
    return {
        "R": result.R,
        "losses": result.losses,
        "steps": result.steps,
        "tree": result.tree,
        "selections": list(getattr(trainer.method, "selections", [])),
        "state_checks": trainer.state_checks,
        "fingerprints": method_fingerprints(trainer.method),
    }


# --- the workers ---------------------------------------------------------------------------------------------------


def _scenarios(rank: int, ports: list[int], out: Path) -> dict:
    def join(port: int) -> DistributedContext:
        os.environ["MASTER_PORT"] = str(port)
        return init_distributed(device="cpu")

    res: dict = {}
    stream = tiny_stream()
    ctx = join(ports[0])
    trainer = Trainer(stream, load_model("vit-tiny"), RecordingTreeLoRA.from_options, config(out / "whole"))
    res["whole"] = summary(trainer, trainer.run())
    res["whole_checkpoint"] = (out / "whole" / "checkpoint.pt").is_file()

    def stop_after_task_2(trainer: Trainer, task: int) -> None:
        if task == 1:
            raise KeyboardInterrupt

    trainer = Trainer(
        stream,
        load_model("vit-tiny"),
        RecordingTreeLoRA.from_options,
        config(out / "stopped"),
        callbacks=[stop_after_task_2],
    )
    try:
        trainer.run()
        res["interrupted"] = None
    except RunInterrupted as exc:
        # The trainer left the process group on the way out, so that no rank waits for another.
        res["interrupted"] = (exc.completed, dist.is_initialized())
    ctx = join(ports[1])
    trainer = Trainer(stream, load_model("vit-tiny"), RecordingTreeLoRA.from_options, config(out / "stopped"))
    res["resumed"] = summary(trainer, trainer.run(resume=True))

    trainer = Trainer(stream, load_model("vit-tiny"), RankStamped, config())
    try:
        trainer.run()
        res["mismatch"] = None
    except StateMismatchError as exc:
        res["mismatch"] = str(exc)
    ctx = join(ports[2])
    trainer = RankLabels(stream, load_model("vit-tiny"), "seqlora", frozen_head_config())
    before = trainer.heads.class_vectors.clone()
    trainer.run()
    res["frozen_head"] = (before, trainer.heads.class_vectors.clone(), trainer.completed)
    trainer = Trainer(stream, load_model("vit-tiny"), FailsOnRank1, config())
    start = time.monotonic()
    try:
        trainer.run()
        res["failure"] = None
    except Exception as exc:
        res["failure"] = (type(exc).__name__, str(exc), time.monotonic() - start, dist.is_initialized())
    shutdown_distributed(ctx)
    return res


def _worker(rank: int, ports: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    results = _scenarios(rank, ports, Path(out))
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("harness")
    ports = [_free_port() for _ in range(3)]
    context = mp.start_processes(_worker, args=(ports, str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} gloo workers did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(tiny_stream(), load_model("vit-tiny"), RecordingTreeLoRA.from_options, config())
        assert not trainer.dist.is_distributed
        return summary(trainer, trainer.run())
    finally:
        torch.set_num_threads(threads)


# --- tests: 2 processes ----------------------------------------------------------------------------------------------


def test_two_processes_with_half_batches_equal_one_process(ranks, single):
    """Same seed; per-rank batch B/2 (and an empty shard on rank 1 at the end of every epoch) against batch B: the
    same tree, the same selection at every step, accuracies within 0.5 points, losses equal to rounding."""
    two = ranks[0]["whole"]
    assert two["tree"] == single["tree"] and sorted(two["tree"]["tasks"]) == list(range(TASKS))
    assert two["steps"] == single["steps"] == [2 * 5] * TASKS
    assert len(two["selections"]) == len(single["selections"]) == TASKS * 10
    assert sum(s is not None for s in single["selections"]) == (TASKS - 1) * 10
    assert two["selections"] == single["selections"]
    R1, R2 = np.array(single["R"], dtype=float), np.array(two["R"], dtype=float)
    assert np.array_equal(np.isnan(R1), np.isnan(R2))
    measured = ~np.isnan(R1)
    assert np.abs(R1[measured] - R2[measured]).max() <= 0.005
    assert abs(np.nanmean(R1[-1]) - np.nanmean(R2[-1])) <= 0.005
    # The logged loss is the loss of the whole global batch (it rides in the gradient all-reduce).
    np.testing.assert_allclose(two["losses"], single["losses"], rtol=1e-4)


def test_every_rank_holds_the_same_state_and_checks_it_at_every_task_end(ranks):
    assert ranks[0]["whole"]["fingerprints"] == ranks[1]["whole"]["fingerprints"]
    assert "treelora.bank" in ranks[0]["whole"]["fingerprints"]
    assert [r["whole"]["state_checks"] for r in ranks] == [TASKS, TASKS]
    assert ranks[0]["whole"]["R"] == ranks[1]["whole"]["R"] and ranks[0]["whole"]["tree"] == ranks[1]["whole"]["tree"]
    assert ranks[0]["whole_checkpoint"] and ranks[1]["whole_checkpoint"]


def test_resume_on_two_processes_reaches_the_uninterrupted_state(ranks):
    """Stopped after task 2 (every rank), resumed on a new process group: every rank reads rank 0's checkpoint and the
    run ends bit-identical to the uninterrupted one (state fingerprints, R, losses, selections of tasks 3-4)."""
    for r in ranks:
        assert r["interrupted"] == (1, False)
        whole, resumed = r["whole"], r["resumed"]
        assert resumed["fingerprints"] == whole["fingerprints"]
        assert resumed["R"] == whole["R"] and resumed["losses"] == whole["losses"] and resumed["tree"] == whole["tree"]
        assert resumed["selections"] == whole["selections"][2 * 10 :]
        assert resumed["state_checks"] == TASKS - 2


def test_a_state_that_differs_between_ranks_raises_on_every_rank(ranks):
    for r in ranks:
        message = r["mismatch"]
        assert message is not None and "rank 1 differs from rank 0 in ['rank']" in message
        assert "the end of task 1 of seqlora" in message


def test_a_failing_rank_does_not_leave_the_other_waiting(ranks):
    """Rank 1 raises mid-task and leaves the group; rank 0, inside the gradient all-reduce, raises at once (not after
    the 10-minute collective timeout) with an error that says another rank stopped."""
    name, message, seconds, initialised = ranks[1]["failure"]
    assert (name, message, initialised) == ("ValueError", "injected failure on rank 1", False)
    name, message, seconds, initialised = ranks[0]["failure"]
    assert name == "CollectiveError" and not initialised
    assert "the gradient all-reduce failed on rank 0 of 2: another rank probably stopped" in message
    assert seconds < 60, seconds


def test_frozen_label_head_is_rank_0s_on_every_rank_and_never_trains(ranks):
    """Each rank computed different class vectors; after construction every rank holds rank 0's (unit rows of its
    draw), and after a 2-process run over every task the head is unchanged."""
    expected = torch.nn.functional.normalize(
        torch.randn(
            tiny_stream().num_classes, load_model("vit-tiny").hidden_size, generator=torch.Generator().manual_seed(100)
        ),
        dim=-1,
    )
    for r in ranks:
        before, after, completed = r["frozen_head"]
        assert completed == TASKS - 1
        torch.testing.assert_close(before, expected, rtol=0, atol=0)
        assert torch.equal(after, before)


# --- tests: one process --------------------------------------------------------------------------------------------


def test_heads_used_follows_the_protocol():
    stream = data.wordnet_supersense(train_per_class=2, test_per_class=1, tasks=[0, 1, 2])
    task_heads = TaskHeads(stream, 4, "task")
    assert task_heads.heads_used([2, 0, 2], upto=2) == [0, 2] and task_heads.heads_used([], upto=2) == []
    assert TaskHeads(stream, 4, "class").heads_used([1], upto=2) == [0, 1, 2]
    # The rule against the heads that really get a gradient from TaskHeads.loss.
    for protocol in ("task", "class"):
        heads = TaskHeads(stream, 4, protocol)
        tasks = torch.tensor([1, 1, 0])
        labels = torch.tensor([stream.tasks[int(t)].classes[0] for t in tasks])
        heads.loss(torch.randn(3, 4), labels, tasks, upto=1).backward()
        with_grad = [k for k, head in enumerate(heads) if head.weight.grad is not None]
        assert with_grad == heads.heads_used(tasks.tolist(), upto=1)


def test_present_hint_is_checked():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"params\[0\] have a gradient on this rank but are marked absent"):
        all_reduce_gradients([p, q], present=[False, True])
    with pytest.raises(ValueError, match="present has 1 entries, params 2"):
        all_reduce_gradients([p, q], present=[True])
    with pytest.raises(ValueError, match="values must be a 1-D tensor"):
        all_reduce_gradients([p], values=torch.ones(()))
    assert all_reduce_gradients([p, q], present=[True, False], values=torch.tensor([2.5])).tolist() == [2.5]


def test_sharded_evaluation_counts_add_up_to_the_whole_test_set():
    """Each rank's share of every test set, scored separately, sums to what one process scores on the whole set."""
    stream = tiny_stream()
    loaded = load_model("vit-tiny")
    trainer = Trainer(stream, loaded, "seqlora", config())
    tasks = [0, 3]
    whole = [trainer.evaluator.counts(j, TASKS - 1) for j in tasks]
    assert [total for _, total in whole] == [TEST] * len(tasks)
    for j, reference in zip(tasks, whole):
        shares = [Evaluator(stream, loaded, trainer.heads, trainer.batches, 5, r, 3) for r in range(3)]
        parts = [share.counts(j, TASKS - 1) for share in shares]
        assert [total for _, total in parts] == [TEST // 3] * 3
        assert tuple(map(sum, zip(*parts))) == reference
    assert trainer.evaluate_tasks(tasks, TASKS - 1) == [c / t for c, t in whole]


def test_instruct_batches_count_their_scored_tokens():
    stream = data.wordnet_instruct(train_per_task=4, test_per_task=2)
    trainer = Trainer(stream, load_model("llama-tiny"), "seqlora", config())
    items = [(0, i) for i in range(4)]
    batch = trainer.batches.instruct(items, "train")
    assert batch["num_targets"] == int((batch["labels"][:, 1:] != -100).sum()) > 0
    loss, extra, weight = trainer._loss(items, TrainingObjective(trainer, [0], 0, 0))
    assert weight == batch["num_targets"] and loss.dim() == 0 and extra is None


def test_threads_are_divided_among_the_processes_of_a_node(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = cli.build_parser().parse_args(["run"])
    try:
        cli._threads(args, DistributedContext(rank=1, local_rank=1, world_size=4, backend="gloo"))
        assert torch.get_num_threads() == 4
        args = cli.build_parser().parse_args(["run", "--threads", "3"])
        cli._threads(args, DistributedContext(rank=1, local_rank=1, world_size=4, backend="gloo"))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_launch_commands_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli._launcher("python -m treelora") == "torchrun --standalone --nproc-per-node 2 -m treelora"
    assert cli._rank_tag() == " (rank 1 of 2)"
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert cli._launcher("treelora").startswith("torchrun --nnodes 4 --nproc-per-node 2 ")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli._launcher("python -m treelora") == "python -m treelora" and cli._rank_tag() == ""


def test_collective_error_is_a_runtime_error():
    assert issubclass(CollectiveError, RuntimeError) and issubclass(StateMismatchError, RuntimeError)


# --- the command itself ----------------------------------------------------------------------------------------------

# Each launch starts torchrun's agent and two workers that import torch and transformers: 10-30 s on 2 busy cores.
COMMAND_TIMEOUT_S = 300
TINY = ["--model", "bert-tiny", "--train-per-class", "4", "--test-per-class", "3", "--epochs", "1", "--batch-size", "8"]
TINY += ["--max-steps", "2"]  # 16 examples per task: 2 global batches of 8, 4 examples per rank


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "treelora", "run", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


@pytest.mark.slow
def test_torchrun_treelora_run_writes_results_once_and_resumes(tmp_path):
    out = tmp_path / "out"
    done = _torchrun(*TINY, "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    payload = json.loads((out / "results.json").read_text())
    assert payload["distributed"] == {"world_size": 2, "backend": "gloo", "state_identical_across_ranks": True}
    assert payload["command"].startswith("torchrun --standalone --nproc-per-node 2 -m treelora run --model bert-tiny")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert payload["machine"]["torch_threads"] == max(1, cores // 2)
    results = payload["results"]
    assert [r["method"] for r in results] == ["treelora", "seqlora"] and results[0]["steps"] == [2] * 8
    assert sorted(results[0]["tree"]["tasks"]) == list(range(8))
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_matrix.png",
        "checkpoints",
        "results.csv",
        "results.json",
        "tree.png",
    ]
    # Rank 0 alone prints the table and logs the progress.
    assert done.stdout.count("| TreeLoRA") == 1 and done.stdout.count("2 processes (gloo)") == 1
    assert done.stderr.count("[treelora] after task 8:") == 1

    again = _torchrun(*TINY, "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("[treelora] resumed after task 8/8") == 1
    resumed = json.loads((out / "results.json").read_text())["results"]
    for a, b in zip(results, resumed):
        assert (a["R"], a["losses"], a["tree"]) == (b["R"], b["losses"], b["tree"])
