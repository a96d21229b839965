"""Command line: python -m treelora <command> (also installed as treelora).

Commands: info (versions, devices, extension, backends per op), demo (a small tour of the ops), run (a
continual-learning run: methods compared on a stream, with the accuracy matrices, a table and result files), compare
(``run`` over methods x seeds x the values of one method option, summarised as mean +- sd with plots) and
bench (the kernel benchmarks under bench/, through pytest-benchmark). Errors in the arguments or the inputs exit
with code 2 and a one-line message; Ctrl-C exits with code 130 and one line saying how to resume.

This module only translates arguments: the work is done by treelora.cl (training, results), treelora.data (streams)
and treelora.models (backbones).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from treelora import demo, info
from treelora._version import __version__
from treelora.cl import compare
from treelora.cl.checkpoint import CheckpointError
from treelora.cl.distributed import (
    CollectiveError,
    DistributedContext,
    StateMismatchError,
    init_distributed,
    run_on_main,
    shutdown_distributed,
)
from treelora.cl.experiment import compare_methods
from treelora.cl.objectives import HEADS, LOGIT_SETS, PROTOCOLS
from treelora.cl.registry import assign_method_options, canonical_method, method_label, registered_methods
from treelora.cl.results import format_matrix, format_table, results_payload, write_results
from treelora.cl.trainer import RunInterrupted, TrainerConfig, check_compatible, fwt_unreported_reason
from treelora.data import STREAMS, DataError, get_stream, validation_split
from treelora.models import LoadedModel, ModelError, load_model

DEFAULT_METHODS = "TreeLoRA,SeqLoRA"
DEFAULT_OUT = "treelora-run"
DEFAULT_STREAM = "wordnet-classil"
# Exit codes: 1 for a failed run (the ranks' states differ, another rank failed), 2 for bad input (argparse's own
# convention), 130 = 128 + SIGINT for Ctrl-C (the shell's convention).
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# Per-stream defaults of `treelora run` (each overridden by its flag). wordnet-supersense on minilm is the built-in
# default run: 8 tasks of about 400 words, 3 epochs of batch 32 (39 optimizer steps per task); words are 3-6 word-piece
# tokens, so 16 tokens never cut one. TreeLoRA and SeqLoRA together take about 75 s of wall time on a 2-core CPU
# (2 threads; seeds 0-2). wordnet-instruct on smollm2-135m: a training step of batch 8 takes about 1 s on two cores
# and a question about 0.2 s to score, hence 40 steps per task and 50 test questions per task (about 6 minutes per
# method and seed).
#
# wordnet-classil on minilm is the built-in default run: the 32 supersenses class-incremental (8 tasks of 4), a frozen
# label head (the class descriptions' features: all forgetting goes through the adapter) with the class-il protocol
# (each task's classes at training, every class seen so far at test). Same epochs/batch/lr/length as
# wordnet-supersense. TreeLoRA's reg_lambda is 200 here: the lambda with the highest mean ACC on the validation split
# (20% of each task's training data, seeds 0-2) among 2, 20, 60, 200, 600 and 2000 (validation ACC 24.0 / BWT 2.5 vs
# SeqLoRA 20.2 / 15.7); the paper preset's default is tuned for task-incremental heads, where it changes nothing here.
# The run (both methods, zero-shot and next-task evaluation included) takes about 140 s of CPU time with one thread
# (seed 1: 142 s user + sys; wall time grows with the machine's load: 21 minutes at a load average of 11-18).
# A stream's "method_options" apply to a method unless --method-option sets that option or a preset for it.
STREAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "wordnet-classil": {
        "model": "minilm",
        "epochs": 3,
        "batch_size": 32,
        "lr": 2e-3,
        "max_length": 16,
        "head": "label",
        "protocol": "class-il",
        "method_options": {"treelora": {"reg_lambda": 200.0}},
    },
    # SeqLoRA forgets every earlier task's answers after the next task here (BWT about 29 on seed 0); scoring 16
    # options costs about 0.5 s per question on one core, so evaluation dominates (about 10 minutes per method).
    "wordnet-instruct-classil": {"model": "smollm2-135m", "epochs": 1, "batch_size": 8, "lr": 3e-3, "max_length": 32},
    "wordnet-supersense": {"model": "minilm", "epochs": 3, "batch_size": 32, "lr": 2e-3, "max_length": 16},
    "wordnet-instruct": {
        "model": "smollm2-135m",
        "epochs": 1,
        "batch_size": 8,
        "lr": 3e-3,
        "max_length": 64,
        "max_steps": 40,
        "test_per_task": 50,
    },
    "split-digits": {"model": "vit-tiny", "epochs": 5, "batch_size": 32, "lr": 3e-3, "max_length": 16},
    "trace": {"model": "smollm2-135m", "epochs": 1, "batch_size": 8, "lr": 1e-4, "max_length": 256},
}

RUN_DESCRIPTION = """\
Train each method on the stream's tasks in order, evaluate every task seen so far after each task,
print the accuracy matrices and a table, and write results.json, results.csv, accuracy_matrix.png and
tree.png into --out. With no arguments: wordnet-classil on minilm (32 WordNet supersenses in 8
class-incremental tasks, a frozen label head, protocol class-il), TreeLoRA vs SeqLoRA.
"""
# Printed as written (RawDescriptionHelpFormatter keeps the folder example's layout), so lines stay under 100 columns.
RUN_EPILOG = """\
TRACE folders (--stream PATH): one sub-folder per task, trained in the sorted order of their names,
each holding train.json, eval.json and test.json. Each file is a JSON list of objects
{"prompt": "...", "answer": "..."}; the model learns to continue the prompt with " " + answer. When
every test item also has an "options" list (containing the answer), the task is scored as multiple
choice (the option the model finds most likely); otherwise by exact match of the greedy answer.
eval.json is read and checked but not scored. --train-per-task / --test-per-task keep a seeded
random subset. Example:

  my-trace/
    translate/train.json  translate/eval.json  translate/test.json
    sentiment/train.json  sentiment/eval.json  sentiment/test.json

  [{"prompt": "Translate to French: cat", "answer": "chat"},
   {"prompt": "Is 'great film' positive or negative?", "answer": "positive",
    "options": ["positive", "negative"]}]

Heads and protocols (classification streams): --head linear (a trainable head per task), label (a
frozen cosine classifier over the features of the stream's class descriptions, computed before
training; streams with class descriptions only: wordnet-classil) or fixed (frozen random
orthonormal class vectors, for backbones without text). --protocol task = train and test on the
task's classes; class = every class seen so far, at training and test; class-il = the task's
classes at training, every class seen so far at test (no task id). --train-logits / --test-logits
(task or seen) override one side. Class-incremental split-digits on the ViT:
  treelora run --stream split-digits --head fixed --protocol class-il
FWT is reported only where the head scores the classes before training (label head, instruction
streams); a random linear or fixed head's zero-shot accuracy is chance (results.json says why).

--validation 0.2: each task's test set is replaced by a stratified 20% of its training data (and
those items leave training), so that hyperparameters are chosen without the test data.

Ctrl-C stops a run with one line naming the last finished task and the command that resumes it
(exit code 130).

Several processes: torchrun --standalone --nproc-per-node 2 -m treelora run ... (gloo on CPU,
nccl with --device cuda). Each process trains on its share of every batch, the gradients are
averaged once per step, and every process holds the same TreeLoRA state (checked after each task);
process 0 prints and writes the results and checkpoints, and --resume works the same way.
"""


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


def _cmd_info(args: argparse.Namespace) -> int:
    return info.main(as_json=args.json)


def _cmd_demo(args: argparse.Namespace) -> int:
    return demo.main(seed=args.seed)


# --- run: arguments --------------------------------------------------------------------------------------------------


def _stream_options(args: argparse.Namespace, stream: str) -> dict[str, Any]:
    """The builder options of a built-in stream (or of a TRACE folder, ``stream == "trace"``) from the flags."""
    if stream in ("wordnet-supersense", "wordnet-classil"):
        return {
            "difficulty": args.difficulty,
            "train_per_class": args.train_per_class,
            "test_per_class": args.test_per_class,
            "seed": args.seed,
        }
    if stream == "wordnet-instruct-classil":
        out: dict[str, Any] = {"seed": args.seed}
        if args.train_per_class is not None:
            out["train_per_class"] = args.train_per_class
        if args.test_per_class is not None:
            out["test_per_class"] = args.test_per_class
        return out
    if stream == "wordnet-instruct":
        test = args.test_per_task or STREAM_DEFAULTS[stream]["test_per_task"]
        return {"train_per_task": args.train_per_task, "test_per_task": test, "seed": args.seed}
    if stream == "split-digits":
        return {"seed": args.seed}
    return {"max_train": args.train_per_task, "max_test": args.test_per_task, "seed": args.seed}


def _parse_methods(text: str) -> list[str]:
    names = [m for m in (s.strip() for s in text.split(",")) if m]
    if not names:
        raise UsageError("--methods is empty: give a comma-separated list such as TreeLoRA,SeqLoRA")
    try:
        keys = [canonical_method(m) for m in names]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if len(set(keys)) != len(keys):
        raise UsageError(f"--methods lists a method twice: {text}")
    return keys


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``--method-option key=value`` pairs; values parsed as JSON when they can be (numbers, true/false, null)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--method-option expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _assign_options(methods: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's share of the --method-option values, all names and values checked (before any model loads)."""
    try:
        return assign_method_options(methods, options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--method-option: {e}") from None


def _device(name: str) -> str:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
    return str(device)


def _trainer_config(args: argparse.Namespace, defaults: dict[str, Any], device: str) -> TrainerConfig:
    try:
        return TrainerConfig(
            epochs=args.epochs or defaults["epochs"],
            batch_size=args.batch_size or defaults["batch_size"],
            eval_batch_size=64,
            lr=args.lr or defaults["lr"],
            rank=args.rank or 8,
            protocol=args.protocol or defaults.get("protocol", "task"),
            head=args.head or defaults.get("head", "linear"),
            train_logits=args.train_logits,
            test_logits=args.test_logits,
            schedule=args.schedule,
            warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay,
            max_length=defaults["max_length"],
            max_steps_per_task=args.max_steps if args.max_steps is not None else defaults.get("max_steps"),
            seed=args.seed,
            device=device,
            progress=not args.quiet,
        )
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def _stream_method_defaults(
    kind: str, methods: list[str], method_options: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Add the stream's per-method defaults (STREAM_DEFAULTS[kind]["method_options"]) to ``method_options`` in place,
    except options the command line set and, for a method given a ``preset``, every one (the preset decides); returns
    what was added, per method."""
    applied: dict[str, dict[str, Any]] = {}
    for method in methods:
        given = method_options.setdefault(method, {})
        if "preset" in given:
            continue
        extra = {
            k: v for k, v in STREAM_DEFAULTS[kind].get("method_options", {}).get(method, {}).items() if k not in given
        }
        if extra:
            given.update(extra)
            applied[method] = extra
    return applied


def _check_protocol_args(args: argparse.Namespace, stream: Any) -> None:
    """--head / --train-logits / --test-logits against the stream (before a model loads)."""
    if stream.kind != "classification":
        given = [f"--{n.replace('_', '-')}" for n in ("head", "train_logits", "test_logits") if getattr(args, n)]
        if given and not (args.head in (None, "linear") and given == ["--head"]):
            raise UsageError(
                f"{', '.join(given)}: applies to classification streams; {stream.name} is an instruction stream"
            )
    elif args.head == "label" and not stream.info.get("class_descriptions"):
        raise UsageError(
            f"--head label needs a stream with class descriptions (wordnet-classil); {stream.name} has none: "
            "use --head fixed or --head linear"
        )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def _launcher(prog: str, single: str | None = None) -> str:
    """How to launch this command again: ``single`` (default ``prog``) for one process; under torchrun, the torchrun
    command for the same number of processes per node (``--standalone`` on one node)."""
    world, local = _env_int("WORLD_SIZE") or 1, _env_int("LOCAL_WORLD_SIZE") or 1
    if world == 1:
        return single or prog
    if world == local:
        return f"torchrun --standalone --nproc-per-node {local} -m treelora"
    return f"torchrun --nnodes {world // local} --nproc-per-node {local} <rendezvous options> -m treelora"


def _rank_tag() -> str:
    """`` (rank r of N)`` under torchrun, to say which process printed an error; empty for one process."""
    world = _env_int("WORLD_SIZE") or 1
    return f" (rank {_env_int('RANK') or 0} of {world})" if world > 1 else ""


def _resume_command(args: argparse.Namespace) -> str:
    argv = list(args.argv)
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join([*shlex.split(_launcher(args.prog)), *argv])


def _interrupted_line(args: argparse.Namespace, e: KeyboardInterrupt) -> str:
    """One line for Ctrl-C during ``run``: the last task whose checkpoint was written, and the resume command."""
    done = ""
    if isinstance(e, RunInterrupted):
        if e.method is not None and e.completed >= 0:
            last = f"{method_label(e.method)} task {e.completed + 1}/{e.num_tasks}"
        elif e.finished_methods:
            last = f"{method_label(e.finished_methods[-1])} task {e.num_tasks}/{e.num_tasks}"
        else:
            last = "none"
        others = [m for m in e.finished_methods if m != e.method]
        if others and e.method is not None and e.completed >= 0:
            done = f"; finished: {', '.join(map(method_label, others))}"
    else:
        last = "none"
    return f"interrupted (last finished task: {last}{done}); resume with: {_resume_command(args)}"


# --- run -------------------------------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    # Everything that can be checked without a model is checked first: loading one takes seconds to minutes.
    for name in ("epochs", "batch_size", "max_steps", "rank", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.validation is not None and not 0.0 < args.validation < 1.0:
        raise UsageError(f"--validation must be a fraction in (0, 1), got {args.validation}")
    methods = _parse_methods(args.methods)
    raw_options = _parse_options(args.method_option)
    method_options = _assign_options(methods, raw_options)
    device = _device(args.device)
    context = _join_processes(device)
    try:
        return _run_methods(args, methods, raw_options, method_options, context)
    finally:
        shutdown_distributed(context)


def _join_processes(device: str) -> DistributedContext:
    """The process group torchrun describes (gloo on CPU, nccl on CUDA; each rank on cuda:LOCAL_RANK), or a single
    process."""
    if (_env_int("WORLD_SIZE") or 1) > 1 and torch.device(device).index is not None:
        raise UsageError(
            f"--device {device} names one GPU, which every process would share: under torchrun use --device cuda "
            "(rank r takes cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose the GPUs"
        )
    try:
        return init_distributed(device=device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(str(e)) from None


# OpenMP's wait policy is read once, when torch loads the OpenMP runtime, so it cannot be changed from here; `run`
# and `compare` restart the interpreter with it set (see prefer_passive_openmp). Measured on a 2-core CPU shared with
# other jobs (load average 11-13), 10 LoRA training steps of the default run's shape (bench/threads_workload.py): 119 s
# with 2 threads and GNU OpenMP's default spin-waiting, 11-21 s with 1 thread, 5.9 s with 2 threads and PASSIVE: a
# spinning thread holds its core while the thread it waits for is descheduled, so every parallel region waits a
# scheduler time slice (README "Threads on a shared machine").
OPENMP_WAIT_ENV = "OMP_WAIT_POLICY"
REEXEC_COMMANDS = ("run", "compare")


def prefer_passive_openmp(argv: Sequence[str] | None = None) -> None:
    """Restart this process with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (a user's choice wins).

    Threads waiting at the end of a parallel region then sleep instead of spinning, which keeps a training run
    proportional on a machine where other processes hold cores. Called by :func:`main` for the commands in
    :data:`REEXEC_COMMANDS` when it runs as the program (``argv`` None); does nothing on Windows or before Python 3.10
    (no ``sys.orig_argv`` to restart with).

    Args:
        argv: the command's arguments (default ``sys.argv[1:]``); only their first word (the command) is looked at.
    """
    command = list(sys.argv[1:] if argv is None else argv)[:1]
    original = getattr(sys, "orig_argv", None)
    if OPENMP_WAIT_ENV in os.environ or not command or command[0] not in REEXEC_COMMANDS:
        return
    if os.name != "posix" or not original:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *original[1:]], {**os.environ, OPENMP_WAIT_ENV: "PASSIVE"})


def _threads(args: argparse.Namespace, context: DistributedContext) -> None:
    """--threads, else torch's default (one thread per core, or OMP_NUM_THREADS when set); under torchrun the cores
    are divided among the node's processes (torchrun itself sets OMP_NUM_THREADS=1)."""
    # With OpenMP's passive wait policy (prefer_passive_openmp), one thread per core stays the fastest choice on a
    # quiet machine (default run: 73 s with 2 threads, 105 s with 1 on a quiet 2-core CPU) and degrades in
    # proportion when another process takes a core; without it (a user's OMP_WAIT_POLICY=ACTIVE, or `run` called
    # from Python), --threads 1 is the safe choice on a shared machine.
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif context.is_distributed:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = _env_int("LOCAL_WORLD_SIZE") or context.world_size
        torch.set_num_threads(max(1, cores // local))


def _run_methods(
    args: argparse.Namespace,
    methods: list[str],
    raw_options: dict[str, Any],
    method_options: dict[str, dict[str, Any]],
    context: DistributedContext,
) -> int:
    _threads(args, context)
    device = str(context.device)
    # Rank 0 alone prints and writes; every rank trains (the state is the same everywhere).
    say = print if context.is_main else _quiet
    kind = args.stream if args.stream in STREAMS else "trace"
    defaults = STREAM_DEFAULTS[kind]
    config = _trainer_config(args, defaults, device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    try:
        stream = get_stream(args.stream, **_stream_options(args, kind))
        if args.validation is not None:
            stream = validation_split(stream, args.validation, seed=args.seed)
    except DataError as e:
        raise UsageError(str(e)) from None
    _check_protocol_args(args, stream)
    method_defaults = _stream_method_defaults(kind, methods, method_options)
    model_name = args.model or defaults["model"]

    def new_model() -> LoadedModel:
        try:
            return load_model(model_name, device=device, seed=args.seed)
        except ModelError as e:
            raise UsageError(str(e)) from None

    first_model = new_model()
    try:
        check_compatible(stream, first_model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    processes = ""
    if context.is_distributed:
        processes = f" per process; {context.world_size} processes ({context.backend}), batch split across them"
    say(stream.summary())
    train_logits, test_logits = config.logit_sets()
    say(
        f"model {model_name}: {first_model.kind}, {first_model.info['parameters'] / 1e6:.1f}M parameters; "
        f"methods {', '.join(methods)}; epochs {config.epochs}, batch {config.batch_size}, lr {config.lr:g}, "
        + (
            f"head {config.head}, protocol {config.protocol} "
            f"(logits: {train_logits} at training, {test_logits} at test), "
            if stream.kind == "classification"
            else ""
        )
        + (f"validation {args.validation:g} of the training data as test sets, " if args.validation else "")
        + f"seed {config.seed}, device {device}, {torch.get_num_threads()} threads"
        + processes
    )
    model = {"name": model_name, "kind": first_model.kind, **first_model.info}
    # The model loaded for the checks above serves the first method; held only by this list until then, so that no
    # finished method's model stays in memory while the next one trains.
    preloaded = [first_model]
    del first_model

    def next_model() -> LoadedModel:
        return preloaded.pop() if preloaded else new_model()

    start = time.perf_counter()
    try:
        results = compare_methods(
            stream,
            next_model,
            methods,
            config,
            out,
            method_options=method_options,
            resume=args.resume,
            distributed=context,
        )
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    wall = time.perf_counter() - start
    for r in results:
        say()
        say(format_matrix(r))
    say()
    say(format_table(results))
    # compare_methods raised if any method's state differed between ranks at the end of any task.
    payload = results_payload(
        shlex.join([*shlex.split(_launcher(args.prog, "treelora")), *args.argv]),
        stream,
        model,
        raw_options,
        results,
        wall_seconds=wall,
        distributed=context.record(state_identical_across_ranks=True),
    )
    # What the methods were scored on and with what defaults, beside the options as given.
    payload["validation"] = args.validation
    payload["method_defaults"] = method_defaults
    fwt_reason = fwt_unreported_reason(stream, config.head)
    payload["notes"] = {"fwt": fwt_reason} if fwt_reason else {}
    written = run_on_main(
        write_results, out, payload, results, log=lambda msg: print(f"treelora run: {msg}", file=sys.stderr)
    )
    say(f"\nwall time {wall:.1f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


def _quiet(*args: Any, **kwargs: Any) -> None:
    """print() on ranks other than 0."""


# --- compare ---------------------------------------------------------------------------------------------------------

COMPARE_DESCRIPTION = """\
Run `treelora run` once per seed (and per value of --sweep) into sub-folders of --out, then
print a table of ACC, BWT and FWT as mean +- sd over the seeds and write comparison.md,
comparison.csv, comparison.json, tradeoff.png (ACC vs BWT) and task_curves.png (accuracy on each
task after each stage). Arguments after -- go to every run. A run whose results.json exists is
kept: rerun the same command to continue an interrupted comparison.
"""
COMPARE_EPILOG = """\
Choosing an option value on validation, then measuring it on test (two steps):

  treelora compare --methods TreeLoRA,SeqLoRA --seeds 0,1,2 \\
      --sweep treelora:reg_lambda=2,20,200,2000,20000 --select-by validation-acc \\
      --out cmp-val -- --validation 0.2
  treelora compare --methods TreeLoRA,SeqLoRA --seeds 0,1,2 \\
      --method-option reg_lambda=<selected> --out cmp-test

The first scores a validation split carved from the training data and prints the selected value;
the second reruns that value on the test split.
"""


def _launch_run(argv: Sequence[str]) -> int:
    """``treelora run`` in its own process (its memory and threads are its own); returns its exit code."""
    env = {OPENMP_WAIT_ENV: "PASSIVE", **os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "treelora", "run", *argv], env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # the run got the same Ctrl-C: let it finish writing its checkpoint
        raise


def _cmd_compare(args: argparse.Namespace) -> int:
    run_args = list(args.run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    run_args += [x for pair in args.method_option for x in ("--method-option", pair)]
    try:
        methods = _parse_methods(args.methods)
        seeds = compare.parse_seeds(args.seeds)
        sweep = compare.Sweep.parse(args.sweep) if args.sweep else None
        compare.check_selection(args.select_by, run_args, sweep)
        cells = compare.plan(methods, seeds, args.out, run_args, sweep)
        compare.run_grid(cells, _launch_run)
        written = compare.report(cells, args.out, sweep, args.select_by)
    except (compare.CompareError, ImportError) as e:
        raise UsageError(str(e)) from None
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# --- bench -----------------------------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    folder = Path(args.path) if args.path else Path(__file__).resolve().parents[1] / "bench"
    if not folder.is_dir():
        raise UsageError(f"benchmark folder {folder} not found: run from a source checkout or pass --path")
    command = [sys.executable, "-m", "pytest", str(folder), "--benchmark-only", "-q"]
    if args.k:
        command += ["-k", args.k]
    command += list(args.pytest_args)
    print(" ".join(command))
    return subprocess.call(command)


# --- parser ----------------------------------------------------------------------------------------------------------


def build_parser(prog: str = "treelora") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="TreeLoRA continual learning: kernels, LoRA layers and a continual-learning harness.",
    )
    parser.add_argument("--version", action="version", version=f"treelora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("info", help="versions, devices, the CUDA extension and the backends of each op")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="run each op once on small CPU tensors and check it against its reference")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    labels = ", ".join(method_label(m) for m in registered_methods())
    p = sub.add_parser(
        "run",
        help="continual learning: train methods task after task on a stream and compare them",
        description=RUN_DESCRIPTION,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--stream",
        default=DEFAULT_STREAM,
        help="wordnet-classil (default), wordnet-instruct-classil, wordnet-supersense, wordnet-instruct, "
        "split-digits, or a TRACE folder path (format below)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="minilm, smollm2-135m, llama-tiny, bert-tiny, vit-tiny or a local "
        "model path (default: minilm for the wordnet-supersense and wordnet-classil streams, smollm2-135m for "
        "instruction streams, vit-tiny for split-digits)",
    )
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated: {labels} (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: per stream)")
    p.add_argument("--seed", type=int, default=0, help="seeds the adapters, heads, data order and subsets")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda, cuda:1, ... (under torchrun: cpu, or cuda for one GPU per process)",
    )
    p.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default=None,
        help="logit sets at training/test: task = the task's classes at both (task-incremental), class = every "
        "class seen so far at both, class-il = the task's classes at training and every seen class at test "
        "(default: class-il for wordnet-classil, task otherwise)",
    )
    p.add_argument(
        "--head",
        choices=HEADS,
        default=None,
        help="classification head: linear (trainable, one per task), label (frozen, the class descriptions' "
        "features) or fixed (frozen random orthonormal class vectors) (default: label for wordnet-classil, linear "
        "otherwise)",
    )
    p.add_argument("--train-logits", choices=LOGIT_SETS, default=None, help="override the protocol's training logits")
    p.add_argument("--test-logits", choices=LOGIT_SETS, default=None, help="override the protocol's test logits")
    p.add_argument(
        "--validation",
        type=float,
        default=None,
        metavar="FRACTION",
        help="replace each task's test set by a stratified FRACTION of its training data, removed from training "
        "(for choosing hyperparameters without the test data)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch size (default: per stream); under torchrun the global batch, split across the processes",
    )
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: per stream)")
    p.add_argument(
        "--schedule",
        choices=("constant", "linear", "cosine"),
        default="constant",
        help="learning-rate schedule within each task",
    )
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of each task's steps with linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps per task")
    p.add_argument(
        "--difficulty", choices=("common", "rare"), default="common", help="wordnet-supersense/-classil words"
    )
    p.add_argument("--train-per-class", type=int, default=None, help="wordnet streams by class: train words per class")
    p.add_argument("--test-per-class", type=int, default=None, help="wordnet streams by class: test words per class")
    p.add_argument("--train-per-task", type=int, default=None, help="instruction streams: train items per task")
    p.add_argument("--test-per-task", type=int, default=None, help="instruction streams: test items per task")
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of a method, given to every method of the run that has it (TreeLoRA: preset=official or "
        "any TreeLoRAConfig field such as split=mean_dot or reg_lambda=0; O-LoRA: lambda_orth, lambda_l2; EWC: "
        "ewc_lambda, gamma; LwF: lwf_lambda, lwf_temperature, lwf_softmax; Replay (default 20 examples per "
        "finished task): replay_per_task, replay_batch_size, replay_weight, replay_seed; InfLoRA: inflora_threshold, "
        "inflora_batches); an option that none of the methods has is an error",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: one per core, divided among the processes under torchrun; "
        "1 helps on a busy shared machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "compare",
        help="run methods x seeds (x one option's values) and summarise them: mean +- sd table and plots",
        description=COMPARE_DESCRIPTION,
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated: {labels} (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    p.add_argument(
        "--sweep",
        default=None,
        metavar="METHOD:OPTION=V1,V2,...",
        help="run one method at each value of one of its options, e.g. treelora:reg_lambda=2,20,200,2000",
    )
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option given to every run (as treelora run --method-option)",
    )
    p.add_argument(
        "--select-by",
        choices=compare.SELECT_RULES,
        default=None,
        help="mark per swept method the value of the highest mean ACC over the seeds (on a --validation run)",
    )
    p.add_argument("--out", default="treelora-compare", help="output folder (default %(default)s)")
    p.add_argument(
        "run_args", nargs=argparse.REMAINDER, help="after --: arguments for every treelora run (--stream, ...)"
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("bench", help="the kernel benchmarks (pytest-benchmark over bench/)")
    p.add_argument("-k", default=None, help="pytest -k expression selecting benchmarks")
    p.add_argument("--path", default=None, help="the benchmark folder (default: bench/ of the source checkout)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="further pytest arguments")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "treelora") -> int:
    """Run one command; returns the exit code (0, 2 for bad input, 130 for Ctrl-C).

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
        prog: how the program was invoked, for help texts and the resume command (``python -m treelora`` when run as
            a module).
    """
    if argv is None:
        prefer_passive_openmp()
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv, args.prog = argv, prog
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"treelora {args.command}: error{_rank_tag()}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        if (_env_int("RANK") or 0) != 0:
            return EXIT_INTERRUPTED  # rank 0 prints the line for every process
        if args.command == "run":
            print(f"treelora run: {_interrupted_line(args, e)}", file=sys.stderr)
        else:
            print(f"treelora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StateMismatchError as e:
        # Raised on every rank together, with the same message: rank 0 prints it.
        if (_env_int("RANK") or 0) == 0:
            print(f"treelora {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except CollectiveError as e:
        print(f"treelora {args.command}: error{_rank_tag()}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
