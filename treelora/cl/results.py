"""What a continual-learning run produced, and how it is shown and stored: :class:`RunResult`, the printed accuracy
matrices and comparison table, the plots (accuracy matrices, the learned tree) and the result files
(``results.json``, ``results.csv``, the PNGs), each written atomically by :func:`write_results`, the one place that
writes them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from treelora._io import atomic_write
from treelora.cl.registry import method_label
from treelora.data.stream import Stream

# Columns of the printed comparison table, and of results.csv.
TABLE_COLUMNS = ("method", "ACC (%)", "BWT (%)", "forgetting (%)", "FWT (%)", "train time (s)", "peak memory (MiB)")
CSV_METRICS = ("acc", "bwt", "bwt_gem", "bwt_official", "forgetting", "fwt", "average_incremental_accuracy")
CSV_COLUMNS = ("method", *CSV_METRICS, "train_time_s", "eval_time_s", "peak_memory_bytes", "memory_kind")


@dataclass
class RunResult:
    """What a run produced.

    Attributes:
        method: the method's name. stream, model: names. task_names: the stream's tasks in order.
        R: (N, N) accuracy matrix as nested lists, ``None`` where not measured (fractions in [0, 1]); for joint
            training only the last row is measured.
        zero_shot: (N,) accuracy of the untrained model (None when not measured).
        metrics: :func:`treelora.cl.metrics.summarize` of R (ACC, BWT in three conventions, forgetting, FWT).
        train_seconds, eval_seconds: per task. peak_memory_bytes: the run's peak (CUDA allocated memory, or the
            process's resident set size on CPU); memory_kind says which.
        losses: mean training loss per task and epoch. steps: optimizer steps per task.
        tree: the learned tree (``to_nested()``) when the method has one. config: the trainer configuration.
        method_options: the options the method was built with.
    """

    method: str
    stream: str
    model: str
    task_names: list[str]
    R: list[list[float | None]]
    zero_shot: list[float] | None
    metrics: dict[str, float | None]
    train_seconds: list[float]
    eval_seconds: list[float]
    peak_memory_bytes: int
    memory_kind: str
    losses: list[list[float]]
    steps: list[int]
    tree: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def train_time(self) -> float:
        return float(sum(self.train_seconds))

    def matrix(self) -> np.ndarray:
        """R as an (N, N) float64 array, NaN where not measured."""
        return np.array([[np.nan if v is None else v for v in row] for row in self.R], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train_time"] = self.train_time
        return out


# --- printed tables --------------------------------------------------------------------------------------------------


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal (``-`` for None)."""
    return "-" if value is None else f"{round(100 * value, 1) + 0.0:.1f}"  # + 0.0: no "-0.0"


def format_matrix(result: RunResult) -> str:
    """The accuracy matrix in percent, rows = after task i, columns = task j (``-``: not measured)."""
    n = len(result.task_names)
    lines = [f"{method_label(result.method)}: accuracy (%) on task j (columns) after training task i (rows)"]
    lines.append("        " + "".join(f"{'t' + str(j + 1):>7}" for j in range(n)))
    if result.zero_shot is not None:
        lines.append("  zero  " + "".join(f"{percent(v):>7}" for v in result.zero_shot))
    for i, row in enumerate(result.R):
        if all(v is None for v in row):
            continue
        lines.append(f"  {'t' + str(i + 1):<6}" + "".join(f"{percent(v):>7}" for v in row))
    return "\n".join(lines)


def table_rows(results: Sequence[RunResult]) -> list[list[str]]:
    """One row per result under :data:`TABLE_COLUMNS`."""
    rows = []
    for r in results:
        m = r.metrics
        rows.append(
            [
                method_label(r.method),
                percent(m.get("acc")),
                percent(m.get("bwt")),
                percent(m.get("forgetting")),
                percent(m.get("fwt")),
                f"{r.train_time:.1f}",
                f"{r.peak_memory_bytes / 2**20:.0f}",
            ]
        )
    return rows


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table: one row per method (ACC, BWT in the paper's convention, forgetting, FWT, time, memory)."""
    rows = [list(TABLE_COLUMNS), *table_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows[1:])])


# --- plots (matplotlib is an optional dependency: imported when a plot is drawn) ------------------------------------


def _pyplot() -> Any:
    # Imported here, not at the top: matplotlib is optional (the `cl` extra) and takes about 0.5 s to import.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrices(results: Sequence[RunResult], path: str | Path) -> None:
    """One heat map per result of R[i, j] in percent, side by side, saved as a PNG at ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = _pyplot()
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
        ax.set_title(f"{method_label(r.method)}: ACC {percent(acc)}%, BWT {percent(bwt)}", fontsize=9)
    fig.suptitle(f"Accuracy R[i, j] (%): {results[0].stream} on {results[0].model}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
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


def plot_tree(result: RunResult, path: str | Path) -> None:
    """The learned tree of ``result`` (``result.tree``), leaves labelled with their tasks, saved as a PNG at ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = _pyplot()
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
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


# --- result files ----------------------------------------------------------------------------------------------------


def results_csv(results: Sequence[RunResult]) -> str:
    """results.csv: one row per method under :data:`CSV_COLUMNS` (metrics as fractions, times in seconds)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in results:
        writer.writerow(
            [
                r.method,
                *(r.metrics.get(k) for k in CSV_METRICS),
                f"{r.train_time:.3f}",
                f"{sum(r.eval_seconds):.3f}",
                r.peak_memory_bytes,
                r.memory_kind,
            ]
        )
    return buf.getvalue()


def machine_info() -> dict[str, Any]:
    """The machine a run ran on (recorded in results.json): platform, Python, torch, CPU model and count, torch
    threads, the CUDA device, the load average."""
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


def results_payload(
    command: str,
    stream: Stream,
    model: Mapping[str, Any],
    method_options: Mapping[str, Any],
    results: Sequence[RunResult],
    wall_seconds: float,
    distributed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json document of a comparison: the command, the machine, the wall time, the processes
    (``distributed``: world size, backend, whether the methods' states were identical on every rank at every task's
    end, see :meth:`treelora.cl.distributed.DistributedContext.record`; left out when None), the stream (tasks and
    sizes), the model (``model``: name, kind and load information), the method options as given, and every result."""
    out: dict[str, Any] = {
        "command": command,
        "machine": machine_info(),
        "wall_seconds": wall_seconds,
    }
    if distributed is not None:
        out["distributed"] = dict(distributed)
    return out | {
        "stream": {
            "name": stream.name,
            "tasks": [t.name for t in stream.tasks],
            "info": stream.info,
            "train_sizes": [len(t.train) for t in stream.tasks],
            "test_sizes": [len(t.test) for t in stream.tasks],
        },
        "model": dict(model),
        "method_options": dict(method_options),
        "results": [r.to_dict() for r in results],
    }


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_results(
    out: str | Path,
    payload: dict[str, Any],
    results: Sequence[RunResult],
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``results.json`` (``payload``), ``results.csv``, ``accuracy_matrix.png`` and, when a method learned a
    tree, ``tree.png`` into ``out``, each atomically (a crash never leaves a half-written result file).

    Args:
        out: the output folder (created). payload: the JSON document. results: the runs, for the CSV and the plots.
        log: receives one line when the PNGs are skipped because matplotlib is not installed.
    Returns:
        the paths written, sorted by name.
    """
    out = Path(out)
    written = [
        _write_text(out / "results.json", json.dumps(payload, indent=1)),
        _write_text(out / "results.csv", results_csv(results)),
    ]
    try:
        written.append(atomic_write(out / "accuracy_matrix.png", lambda tmp: plot_matrices(results, tmp)))
        trees = [r for r in results if r.tree is not None]
        if trees:
            written.append(atomic_write(out / "tree.png", lambda tmp: plot_tree(trees[0], tmp)))
    except ImportError:
        if log is not None:
            log("matplotlib is not installed, no PNG written (pip install matplotlib)")
    return sorted(written)
