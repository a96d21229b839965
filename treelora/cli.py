"""Command line: ``python -m treelora <command>`` (also installed as ``treelora``).

Commands: ``info`` (versions, devices, extension, backends per op), ``demo`` (a small tour of the ops), ``run`` (a
continual-learning run: methods compared on a stream, with the accuracy matrices, a table and result files) and
``bench`` (the kernel benchmarks under ``bench/``, through pytest-benchmark). Errors in the arguments or the inputs exit
with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

DEFAULT_METHODS = "TreeLoRA,SeqLoRA"
DEFAULT_OUT = "treelora-run"
# Per-stream defaults of `treelora run` (each overridden by its flag). wordnet-supersense on minilm is the built-in
# default run: 8 tasks of about 400 words, 3 epochs of batch 32 (39 optimizer steps per task); words are 3-6 word-piece
# tokens, so 16 tokens never cut one. TreeLoRA and SeqLoRA together take about 75 s of wall time on a 2-core CPU
# (2 threads; seeds 0-2). wordnet-instruct on smollm2-135m: a training step of batch 8 takes about 1 s on two cores
# and a question about 0.2 s to score, hence 40 steps per task and 50 test questions per task (about 6 minutes per
# method and seed).
STREAM_DEFAULTS: dict[str, dict[str, Any]] = {
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


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


def _cmd_info(args: argparse.Namespace) -> int:
    from treelora import info

    return info.main(as_json=args.json)


def _cmd_demo(args: argparse.Namespace) -> int:
    from treelora import demo

    return demo.main(seed=args.seed)


# --- run: set-up -----------------------------------------------------------------------------------------------------


def _stream_options(args: argparse.Namespace, stream: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if stream == "wordnet-supersense":
        options.update(
            difficulty=args.difficulty,
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            seed=args.seed,
        )
    elif stream == "wordnet-instruct":
        test = args.test_per_task or STREAM_DEFAULTS[stream]["test_per_task"]
        options.update(train_per_task=args.train_per_task, test_per_task=test, seed=args.seed)
    elif stream == "split-digits":
        options.update(seed=args.seed)
    else:
        options.update(max_train=args.train_per_task, max_test=args.test_per_task, seed=args.seed)
    return options


def _parse_methods(text: str) -> list[str]:
    from treelora.cl.trainer import canonical_method

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


def _device(name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
    return str(device)


def _release_memory() -> None:
    """Return freed heap memory to the OS between methods, so that each method's peak resident set size (the memory
    column on CPU) starts from the same baseline instead of inheriting the previous method's high-water mark."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(load) if load else None,
    }


# --- run: reporting --------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{round(100 * value, 1) + 0.0:.1f}"  # + 0.0: no "-0.0"


def format_matrix(result: Any) -> str:
    """The accuracy matrix in percent, rows = after task i, columns = task j (``-``: not measured)."""
    from treelora.cl.trainer import METHOD_LABELS

    n = len(result.task_names)
    lines = [
        f"{METHOD_LABELS.get(result.method, result.method)}: accuracy (%) on task j (columns) after training "
        "task i (rows)"
    ]
    lines.append("        " + "".join(f"{'t' + str(j + 1):>7}" for j in range(n)))
    if result.zero_shot is not None:
        lines.append("  zero  " + "".join(f"{_pct(v):>7}" for v in result.zero_shot))
    for i, row in enumerate(result.R):
        if all(v is None for v in row):
            continue
        lines.append(f"  {'t' + str(i + 1):<6}" + "".join(f"{_pct(v):>7}" for v in row))
    return "\n".join(lines)


TABLE_COLUMNS = ("method", "ACC (%)", "BWT (%)", "forgetting (%)", "FWT (%)", "train time (s)", "peak memory (MiB)")


def table_rows(results: Sequence[Any]) -> list[list[str]]:
    from treelora.cl.trainer import METHOD_LABELS

    rows = []
    for r in results:
        m = r.metrics
        rows.append(
            [
                METHOD_LABELS.get(r.method, r.method),
                _pct(m.get("acc")),
                _pct(m.get("bwt")),
                _pct(m.get("forgetting")),
                _pct(m.get("fwt")),
                f"{r.train_time:.1f}",
                f"{r.peak_memory_bytes / 2**20:.0f}",
            ]
        )
    return rows


def format_table(results: Sequence[Any]) -> str:
    """A Markdown table: one row per method (ACC, BWT in the paper's convention, forgetting, FWT, time, memory)."""
    rows = [list(TABLE_COLUMNS), *table_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows[1:])])


def _plot_matrices(results: Sequence[Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from treelora.cl.trainer import METHOD_LABELS

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.0), squeeze=False)
    for ax, r in zip(axes[0], results):
        R = 100 * r.matrix()
        ax.imshow(np.ma.masked_invalid(R), vmin=0, vmax=100, cmap="viridis")
        n = R.shape[0]
        for i in range(n):
            for j in range(n):
                if not np.isnan(R[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{R[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if R[i, j] < 60 else "black",
                    )
        ax.set_xticks(range(n), [f"t{j + 1}" for j in range(n)], fontsize=7)
        ax.set_yticks(range(n), [f"after t{i + 1}" for i in range(n)], fontsize=7)
        acc = r.metrics.get("acc")
        bwt = r.metrics.get("bwt")
        ax.set_title(f"{METHOD_LABELS.get(r.method, r.method)}: ACC {_pct(acc)}%, BWT {_pct(bwt)}", fontsize=9)
    fig.suptitle(f"Accuracy R[i, j] (%): {results[0].stream} on {results[0].model}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tree_layout(node: dict, depth: int, leaves: list[float], boxes: list, edges: list) -> float:
    """Positions of a nested tree: leaves left to right, each internal node above the middle of its children."""
    if "left" not in node:
        x = float(len(leaves))
        leaves.append(x)
        boxes.append((x, -depth, node["tasks"], True))
        return x
    xl = _tree_layout(node["left"], depth + 1, leaves, boxes, edges)
    xr = _tree_layout(node["right"], depth + 1, leaves, boxes, edges)
    x = (xl + xr) / 2
    edges += [((x, -depth), (xl, -depth - 1)), ((x, -depth), (xr, -depth - 1))]
    boxes.append((x, -depth, node["tasks"], False))
    return x


def _plot_tree(result: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boxes: list = []
    edges: list = []
    leaves: list[float] = []
    _tree_layout(result.tree, 0, leaves, boxes, edges)
    height = 1 + max(-y for _, y, _, _ in boxes)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(leaves)), 1.0 + 1.1 * height))
    for (x0, y0), (x1, y1) in edges:
        ax.plot([x0, x1], [y0, y1], color="0.5", linewidth=1, zorder=1)
    for x, y, tasks, leaf in boxes:
        if leaf:
            label = "\n".join(f"t{t + 1} {result.task_names[t]}".replace("/", "/\n") for t in tasks)
        else:
            label = "{" + ",".join(f"t{t + 1}" for t in tasks) + "}"
        ax.text(
            x,
            y,
            label,
            ha="center",
            va="center",
            fontsize=7,
            zorder=2,
            bbox={"boxstyle": "round", "facecolor": "#e8f0fe" if leaf else "white", "edgecolor": "0.4"},
        )
    ax.set_xlim(-0.8, len(leaves) - 0.2)
    ax.set_ylim(-height + 0.4, 0.6)
    ax.axis("off")
    ax.set_title(
        f"TreeLoRA's gradient-similarity tree after {len(result.task_names)} tasks ({result.stream}, "
        f"{result.model}); shallow layers split the top",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_results(out: Path, payload: dict[str, Any], results: Sequence[Any]) -> list[Path]:
    """Write results.json, results.csv and the PNGs into a temporary folder, then move each into ``out`` with an
    atomic rename, so that a crash never leaves a half-written result file."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    written = []
    try:
        (staging / "results.json").write_text(json.dumps(payload, indent=1))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(
            [
                "method",
                "acc",
                "bwt",
                "bwt_gem",
                "bwt_official",
                "forgetting",
                "fwt",
                "average_incremental_accuracy",
                "train_time_s",
                "eval_time_s",
                "peak_memory_bytes",
                "memory_kind",
            ]
        )
        for r in results:
            m = r.metrics
            writer.writerow(
                [
                    r.method,
                    *(
                        m.get(k)
                        for k in (
                            "acc",
                            "bwt",
                            "bwt_gem",
                            "bwt_official",
                            "forgetting",
                            "fwt",
                            "average_incremental_accuracy",
                        )
                    ),
                    f"{r.train_time:.3f}",
                    f"{sum(r.eval_seconds):.3f}",
                    r.peak_memory_bytes,
                    r.memory_kind,
                ]
            )
        (staging / "results.csv").write_text(buf.getvalue())
        try:
            _plot_matrices(results, staging / "accuracy_matrix.png")
            trees = [r for r in results if r.tree is not None]
            if trees:
                _plot_tree(trees[0], staging / "tree.png")
        except ImportError:
            print("treelora run: matplotlib is not installed, no PNG written (pip install matplotlib)", file=sys.stderr)
        for f in sorted(staging.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


# --- run -------------------------------------------------------------------------------------------------------------


def _trainer_config(args: argparse.Namespace, defaults: dict[str, Any], device: str) -> Any:
    from treelora.cl.trainer import TrainerConfig

    return TrainerConfig(
        epochs=args.epochs or defaults["epochs"],
        batch_size=args.batch_size or defaults["batch_size"],
        eval_batch_size=64,
        lr=args.lr or defaults["lr"],
        rank=args.rank or 8,
        protocol=args.protocol,
        schedule=args.schedule,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_length=defaults["max_length"],
        max_steps_per_task=args.max_steps if args.max_steps is not None else defaults.get("max_steps"),
        seed=args.seed,
        device=device,
        progress=not args.quiet,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from treelora.cl.trainer import Trainer, TrainerConfig, _check_compatible
    from treelora.data import STREAMS, DataError, get_stream
    from treelora.models import ModelError, load_model

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    methods = _parse_methods(args.methods)
    method_options = _parse_options(args.method_option)
    device = _device(args.device)
    # torch's default (one thread per core) unless --threads says otherwise: on an idle 2-core machine the default run
    # took 73 s with 2 threads and 105 s with 1; on a machine shared with other jobs, --threads 1 avoids OpenMP threads
    # spinning while others hold the cores (seen: 3.5 step/s with 1 thread vs 0.5 with 2).
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in ("epochs", "batch_size", "max_steps", "rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    kind = args.stream if args.stream in STREAMS else "trace"
    defaults = STREAM_DEFAULTS[kind]
    try:
        config = _trainer_config(args, defaults, device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        stream = get_stream(args.stream, **_stream_options(args, args.stream if kind != "trace" else "trace"))
    except DataError as e:
        raise UsageError(str(e)) from None
    model_name = args.model or defaults["model"]

    def fresh_model() -> Any:
        try:
            return load_model(model_name, device=device, seed=args.seed)
        except ModelError as e:
            raise UsageError(str(e)) from None

    first_model = fresh_model()
    try:
        _check_compatible(stream, first_model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    print(stream.summary())
    print(
        f"model {model_name}: {first_model.kind}, {first_model.info['parameters'] / 1e6:.1f}M parameters; "
        f"methods {', '.join(methods)}; epochs {config.epochs}, batch {config.batch_size}, lr {config.lr:g}, "
        f"protocol {config.protocol}, seed {config.seed}, device {device}, {torch.get_num_threads()} threads"
    )
    model_kind, model_info = first_model.kind, dict(first_model.info)
    pending = first_model  # handed to the first method only, so that no finished method's model stays in memory
    del first_model
    start = time.perf_counter()
    results = []
    for method in methods:
        loaded, pending = (pending if pending is not None else fresh_model()), None
        cfg = TrainerConfig(**{**config.to_dict(), "checkpoint_dir": str(out / "checkpoints" / method)})
        options = method_options if len(methods) == 1 or method == "treelora" else {}
        try:
            trainer = Trainer(stream, loaded, method, cfg, method_options=options)
        except (TypeError, ValueError) as e:
            raise UsageError(f"method {method}: {e}") from None
        try:
            results.append(trainer.run(resume=args.resume))
        except ValueError as e:
            if "checkpoint" in str(e):
                raise UsageError(str(e)) from None
            raise
        del trainer, loaded
        _release_memory()
    wall = time.perf_counter() - start
    for r in results:
        print()
        print(format_matrix(r))
    print()
    print(format_table(results))
    payload = {
        "command": "treelora " + " ".join(args.argv),
        "machine": _machine(),
        "wall_seconds": wall,
        "stream": {
            "name": stream.name,
            "tasks": [t.name for t in stream.tasks],
            "info": stream.info,
            "train_sizes": [len(t.train) for t in stream.tasks],
            "test_sizes": [len(t.test) for t in stream.tasks],
        },
        "model": {"name": model_name, "kind": model_kind, **model_info},
        "method_options": method_options,
        "results": [r.to_dict() for r in results],
    }
    written = _write_results(out, payload, results)
    print(f"\nwall time {wall:.1f} s; wrote " + ", ".join(str(p) for p in written))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treelora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("info", help="versions, devices, the CUDA extension and the backends of each op")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="run each op once on small CPU tensors and check it against its reference")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "run",
        help="continual learning: train methods task after task on a stream and compare them",
        description="Train each method on the stream's tasks in order, evaluate every task seen so far after each "
        "task, print the accuracy matrices and a table, and write results.json, results.csv, accuracy_matrix.png and "
        "tree.png into --out. With no arguments: wordnet-supersense on minilm, TreeLoRA vs SeqLoRA.",
    )
    p.add_argument(
        "--stream",
        default="wordnet-supersense",
        help="wordnet-supersense (default), wordnet-instruct, split-digits, or a TRACE folder path",
    )
    p.add_argument(
        "--model",
        default=None,
        help="minilm, smollm2-135m, llama-tiny, bert-tiny, vit-tiny or a local "
        "model path (default: minilm for wordnet-supersense, smollm2-135m for instruction streams, vit-tiny "
        "for split-digits)",
    )
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated: TreeLoRA, SeqLoRA, O-LoRA, EWC, Joint (default %(default)s)",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: per stream)")
    p.add_argument("--seed", type=int, default=0, help="seeds the adapters, heads, data order and subsets")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--protocol",
        choices=("task", "class"),
        default="task",
        help="task-incremental (a head per task) or class-incremental (all seen classes compete)",
    )
    p.add_argument("--batch-size", type=int, default=None)
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
    p.add_argument("--difficulty", choices=("common", "rare"), default="common", help="wordnet-supersense words")
    p.add_argument("--train-per-class", type=int, default=None, help="wordnet-supersense: train words per class")
    p.add_argument("--test-per-class", type=int, default=None, help="wordnet-supersense: test words per class")
    p.add_argument("--train-per-task", type=int, default=None, help="instruction streams: train items per task")
    p.add_argument("--test-per-task", type=int, default=None, help="instruction streams: test items per task")
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the method (TreeLoRAConfig fields such as split=mean_dot or reg_lambda=0; "
        "lambda_orth for O-LoRA, ewc_lambda for EWC); applies to TreeLoRA, or to the only method",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: one per core; 1 helps on a busy shared machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="the kernel benchmarks (pytest-benchmark over bench/)")
    p.add_argument("-k", default=None, help="pytest -k expression selecting benchmarks")
    p.add_argument("--path", default=None, help="the benchmark folder (default: bench/ of the source checkout)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="further pytest arguments")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"treelora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
