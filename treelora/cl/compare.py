"""Methods x seeds (x one method option swept over values): the grid of ``treelora run`` invocations, their results
read back and summarised as mean +- sd over seeds, the selection of a swept value, and the plots (the ACC-vs-BWT
plane and per-task accuracy curves). Used by ``treelora compare``; the runs themselves are launched by a callable
the caller provides (the command line starts one ``treelora run`` process per grid cell).

Layout under the output folder: ``runs/base/seed-<s>/`` holds one ``treelora run`` of every method that is not swept,
``runs/<method>-<option>-<value>/seed-<s>/`` one run of the swept method at that value; each holds the run's
``results.json`` (the schema of :func:`treelora.cl.results.results_payload`). A cell whose ``results.json`` exists is
finished and never run again.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from treelora._io import atomic_write
from treelora.cl.registry import assign_method_options, canonical_method, method_label

# Flags of `treelora run` that the comparison sets itself for every cell: given after `--` they are an error.
RESERVED_RUN_FLAGS = ("--methods", "--seed", "--out", "--resume")
SELECT_RULES = ("validation-acc",)
SUMMARY_COLUMNS = (
    *("method", "option", "value", "seeds"),
    *("acc_mean", "acc_sd", "bwt_mean", "bwt_sd", "fwt_mean", "fwt_sd"),
)


class CompareError(ValueError):
    """Bad input to a comparison (the message names the argument or the file)."""


@dataclass(frozen=True)
class Sweep:
    """One method option swept over values: ``method:option=v1,v2,...`` (values parsed as JSON where they can be)."""

    method: str
    option: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str) -> Sweep:
        """Parse ``--sweep`` (e.g. ``treelora:reg_lambda=2,20,200``); the method must be registered and the option
        one of its options with valid values."""
        head, sep, values_text = text.partition("=")
        method, colon, option = head.partition(":")
        if not (sep and colon and method.strip() and option.strip() and values_text.strip()):
            raise CompareError(f"--sweep expects METHOD:OPTION=V1,V2,..., got {text!r}")
        try:
            method = canonical_method(method.strip())
        except ValueError as e:
            raise CompareError(f"--sweep: {e}") from None
        values = tuple(_parse_value(v.strip()) for v in values_text.split(",") if v.strip())
        if len(set(map(json.dumps, values))) != len(values):
            raise CompareError(f"--sweep lists a value twice: {text!r}")
        for value in values:
            try:
                assign_method_options([method], {option.strip(): value})
            except (TypeError, ValueError) as e:
                raise CompareError(f"--sweep {text!r}: {e}") from None
        return cls(method, option.strip(), values)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value))


def parse_seeds(text: str) -> list[int]:
    """``--seeds`` as a list of distinct integers (``0,1,2``)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CompareError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds must list at least one seed, each once, got {text!r}")
    return seeds


@dataclass(frozen=True)
class Cell:
    """One ``treelora run`` of the grid: its folder and its arguments (``argv`` after ``run``)."""

    folder: Path
    argv: tuple[str, ...]
    methods: tuple[str, ...]
    seed: int
    value: Any = None

    @property
    def results_path(self) -> Path:
        return self.folder / "results.json"


def plan(
    methods: Sequence[str], seeds: Sequence[int], out: str | Path, run_args: Sequence[str], sweep: Sweep | None = None
) -> list[Cell]:
    """The grid: per seed one run of the methods that are not swept, and one run of the swept method per value.

    Args:
        methods: registered names or labels. seeds: the seeds. out: the comparison's folder.
        run_args: further ``treelora run`` arguments given to every cell (not one of :data:`RESERVED_RUN_FLAGS`, nor
            a ``--method-option`` of the swept option).
        sweep: the swept option (its method must be among ``methods``).
    """
    keys = [canonical_method(m) for m in methods]
    if len(set(keys)) != len(keys):
        raise CompareError(f"--methods lists a method twice: {','.join(methods)}")
    for i, arg in enumerate(run_args):
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_RUN_FLAGS:
            raise CompareError(f"{flag} is set by the comparison for every run: remove it from the run arguments")
        if sweep and flag == "--method-option" and i + 1 < len(run_args):
            given = arg.split("=", 1)[1] if "=" in arg else run_args[i + 1]
            if given.split("=", 1)[0] == sweep.option:
                raise CompareError(f"--method-option {given}: {sweep.option} is swept by --sweep")
    if sweep is not None and sweep.method not in keys:
        raise CompareError(f"--sweep method {method_label(sweep.method)} is not in --methods {','.join(methods)}")
    out = Path(out)
    base = [m for m in keys if sweep is None or m != sweep.method]
    cells = []
    for seed in seeds:
        if base:
            folder = out / "runs" / "base" / f"seed-{seed}"
            argv = ("--methods", ",".join(base), "--seed", str(seed), "--out", str(folder), *run_args)
            cells.append(Cell(folder, argv, tuple(base), seed))
        for value in sweep.values if sweep else ():
            folder = out / "runs" / f"{sweep.method}-{sweep.option}-{_slug(value)}" / f"seed-{seed}"
            option = f"{sweep.option}={json.dumps(value) if not isinstance(value, str) else value}"
            argv = (
                *("--methods", sweep.method, "--seed", str(seed), "--out", str(folder)),
                *("--method-option", option, *run_args),
            )
            cells.append(Cell(folder, argv, (sweep.method,), seed, value))
    return cells


def check_selection(select_by: str | None, run_args: Sequence[str], sweep: Sweep | None) -> None:
    """A value is selected on a validation split, never on test: ``--select-by`` needs a sweep and runs given
    ``--validation``."""
    if select_by is None:
        return
    if select_by not in SELECT_RULES:
        raise CompareError(f"--select-by must be one of {', '.join(SELECT_RULES)}, got {select_by!r}")
    if sweep is None:
        raise CompareError("--select-by needs --sweep (the values to select from)")
    if not any(a.split("=", 1)[0] == "--validation" for a in run_args):
        raise CompareError(
            "--select-by validation-acc selects on a validation split: give the runs --validation FRACTION after --"
        )


def _recorded_argv(results_path: Path) -> list[str] | None:
    """The ``treelora run`` arguments a finished run recorded (after ``run``, without ``--resume``)."""
    command = json.loads(results_path.read_text()).get("command", "")
    words = shlex.split(command)
    if "run" not in words:
        return None
    return [w for w in words[words.index("run") + 1 :] if w != "--resume"]


def run_grid(
    cells: Sequence[Cell], launch: Callable[[Sequence[str]], int], log: Callable[[str], None] = print
) -> list[Cell]:
    """Run every cell whose ``results.json`` does not exist yet, one after another (a folder left by an interrupted
    run is resumed from its checkpoints with ``--resume``); a finished cell is never run again.

    Args:
        cells: from :func:`plan`. launch: runs ``treelora run`` with the given arguments, returns its exit code.
        log: receives one line per cell.
    Returns:
        the cells that were run.
    Raises:
        CompareError: a finished cell was run with other arguments (the folder belongs to another comparison), or a
            run failed (its exit code, and the cells still to run).
    """
    ran = []
    for i, cell in enumerate(cells):
        what = f"[{i + 1}/{len(cells)}] seed {cell.seed}, {','.join(map(method_label, cell.methods))}"
        if cell.value is not None:
            what += f" at {cell.argv[cell.argv.index('--method-option') + 1]}"
        if cell.results_path.exists():
            recorded = _recorded_argv(cell.results_path)
            if recorded is not None and recorded != list(cell.argv):
                raise CompareError(
                    f"{cell.results_path} was run with other arguments ({shlex.join(recorded)}); use another --out "
                    "or remove that folder"
                )
            log(f"{what}: finished earlier, kept ({cell.results_path})")
            continue
        argv = [*cell.argv, "--resume"] if cell.folder.exists() else list(cell.argv)
        log(f"{what}: running -> {cell.folder}")
        code = launch(argv)
        if code != 0:
            left = len(cells) - i
            raise CompareError(f"treelora run {shlex.join(argv)} exited with code {code} ({left} runs not finished)")
        ran.append(cell)
    return ran


# --- reading and summarising ----------------------------------------------------------------------------------------


@dataclass
class Group:
    """The runs of one method at one option value, over seeds.

    Attributes:
        method: registry name. value: the swept option's value (None for a method that is not swept).
        seeds: the seeds, sorted. acc, bwt, fwt: per seed, in percent (bwt, fwt: None where the run had none).
        matrices: per seed, the (N, N) accuracy matrix in percent (NaN where not measured).
    """

    method: str
    value: Any
    seeds: list[int] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    bwt: list[float | None] = field(default_factory=list)
    fwt: list[float | None] = field(default_factory=list)
    matrices: list[np.ndarray] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)

    def label(self, option: str | None) -> str:
        name = method_label(self.method)
        return name if self.value is None or option is None else f"{name} {option}={self.value}"


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(paths: Sequence[str | Path], sweep: Sweep | None = None) -> list[Group]:
    """Read results.json files into groups per (method, swept value), in order of first appearance.

    The swept value of a result is the swept method's option as the run recorded it (``method_options`` of the
    file); any other method's value is None. ACC, BWT and FWT come from each result's ``metrics`` (fractions, shown
    in percent); the seed from its ``config``.

    Raises:
        CompareError: a file is not a results.json, or a (method, value, seed) appears twice.
    """
    groups: dict[tuple[str, str], Group] = {}
    for path in map(Path, paths):
        try:
            payload = json.loads(path.read_text())
            results = payload["results"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CompareError(f"{path} is not a treelora results.json ({e})") from None
        for r in results:
            method = r["method"]
            value = None
            if sweep is not None and method == sweep.method:
                value = payload.get("method_options", {}).get(sweep.option)
            key = (method, json.dumps(value))
            group = groups.setdefault(key, Group(method, value, task_names=list(r.get("task_names", []))))
            seed = int(r["config"]["seed"])
            if seed in group.seeds:
                raise CompareError(f"{path}: {method_label(method)} seed {seed} appears in two results files")
            m = r["metrics"]
            group.seeds.append(seed)
            group.acc.append(100 * m["acc"])
            group.bwt.append(None if m.get("bwt") is None else 100 * m["bwt"])
            group.fwt.append(None if m.get("fwt") is None else 100 * m["fwt"])
            group.matrices.append(100 * np.array([[math.nan if v is None else v for v in row] for row in r["R"]]))
    for group in groups.values():
        order = np.argsort(group.seeds)
        for name in ("seeds", "acc", "bwt", "fwt", "matrices"):
            setattr(group, name, [getattr(group, name)[i] for i in order])
    return list(groups.values())


def select(groups: Sequence[Group]) -> dict[str, Group]:
    """Per method with several values: the value of the highest mean ACC among the values run on every seed that
    any of the method's values was run on (a mean over fewer seeds is not comparable); ties go to the value seen
    first."""
    chosen: dict[str, Group] = {}
    by_method: dict[str, list[Group]] = {}
    for g in groups:
        by_method.setdefault(g.method, []).append(g)
    for method, candidates in by_method.items():
        if len(candidates) < 2:
            continue
        seeds = set().union(*(g.seeds for g in candidates))
        full = [g for g in candidates if set(g.seeds) == seeds]
        if full:
            chosen[method] = max(full, key=lambda g: statistics.mean(g.acc))
    return chosen


def summary_rows(groups: Sequence[Group], option: str | None) -> list[dict[str, Any]]:
    """One row per group under :data:`SUMMARY_COLUMNS` (percent; fwt_* None when any seed has no FWT)."""
    rows = []
    for g in groups:
        acc = mean_sd(g.acc)
        # Joint training has no BWT (one stage); FWT exists only through a head that means something before training.
        bwt = mean_sd(g.bwt) if all(v is not None for v in g.bwt) else (None, None)
        fwt = mean_sd(g.fwt) if all(v is not None for v in g.fwt) else (None, None)
        rows.append(
            {
                "method": g.method,
                "option": option if g.value is not None else None,
                "value": g.value,
                "seeds": list(g.seeds),
                "acc_mean": acc[0],
                "acc_sd": acc[1],
                "bwt_mean": bwt[0],
                "bwt_sd": bwt[1],
                "fwt_mean": fwt[0],
                "fwt_sd": fwt[1],
            }
        )
    return rows


def format_summary(rows: Sequence[dict[str, Any]], chosen: dict[str, Group] | None = None) -> str:
    """A Markdown table: method (and option value), ACC, BWT and (when any row has it) FWT as mean +- sd over the
    seeds, and the seeds; the selected value of a swept method is marked."""
    with_fwt = any(r["fwt_mean"] is not None for r in rows)
    header = ["method", "ACC (%)", "BWT (%)", *(["FWT (%)"] if with_fwt else []), "seeds"]
    table = [header]
    for r in rows:
        name = method_label(r["method"]) + (f" {r['option']}={r['value']}" if r["option"] else "")
        picked = chosen is not None and r["method"] in chosen and chosen[r["method"]].value == r["value"]
        cells = [name + (" (selected)" if picked else "")]
        cells.append(f"{r['acc_mean']:.1f} +- {r['acc_sd']:.1f}")
        cells.append("-" if r["bwt_mean"] is None else f"{r['bwt_mean']:.1f} +- {r['bwt_sd']:.1f}")
        if with_fwt:
            cells.append("-" if r["fwt_mean"] is None else f"{r['fwt_mean']:.1f} +- {r['fwt_sd']:.1f}")
        cells.append(",".join(map(str, r["seeds"])))
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, table[1:])])


def summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for r in rows:
        writer.writerow(["" if r[k] is None else (" ".join(map(str, r[k])) if k == "seeds" else r[k]) for k in r])
    return buf.getvalue()


# --- plots ----------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the comparison's plots need matplotlib: pip install matplotlib (or the package's `cl` extra)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(groups: Sequence[Group], path: str | Path, option: str | None, chosen: dict[str, Group]) -> None:
    """Every group's mean (BWT, ACC) with sd error bars in both directions; a swept method's values joined by a line
    in value order and labelled, the selected value ringed. Saved as a PNG at ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    by_method: dict[str, list[Group]] = {}
    for g in groups:
        if all(v is not None for v in g.bwt):  # a run without BWT (joint training) has no point in this plane
            by_method.setdefault(g.method, []).append(g)
    for method, gs in by_method.items():
        acc = [mean_sd(g.acc) for g in gs]
        bwt = [mean_sd(g.bwt) for g in gs]
        xs, ys = [b[0] for b in bwt], [a[0] for a in acc]
        bars = ax.errorbar(
            xs,
            ys,
            xerr=[b[1] for b in bwt],
            yerr=[a[1] for a in acc],
            fmt="o-" if len(gs) > 1 else "o",
            capsize=3,
            markersize=5,
            label=method_label(method),
        )
        if len(gs) > 1:
            for g, x, y in zip(gs, xs, ys):
                ax.annotate(f"{g.value}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if method in chosen:
            g = chosen[method]
            x, y = mean_sd(g.bwt)[0], mean_sd(g.acc)[0]
            ax.plot([x], [y], marker="o", markersize=14, markerfacecolor="none", color=bars[0].get_color())
    if chosen:
        ring = {"marker": "o", "markersize": 10, "markerfacecolor": "none", "color": "0.3", "linestyle": "none"}
        ax.plot([], [], label="selected", **ring)
    ax.axvline(0.0, color="0.8", linewidth=0.8, zorder=0)
    ax.set_xlabel("BWT (%, forgetting: lower is better)")
    ax.set_ylabel("ACC (%, after the last task)")
    title = "ACC vs BWT, mean +- sd over seeds"
    if option:
        title += f"; labels: {option}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def plot_task_curves(groups: Sequence[Group], path: str | Path, option: str | None) -> None:
    """One panel per group: accuracy on each task (a line per task) after each training stage, mean over seeds,
    from the stage that trained it on. Saved as a PNG at ``path``."""
    plt = _pyplot()
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    # The legend under the panels: four tasks per row (names run to about 30 characters), 0.22 inch per row.
    tasks = max((m.shape[0] for g in groups for m in g.matrices), default=0)
    legend_inches = 0.22 * math.ceil(tasks / 4) + 0.15
    height = 3.4 * rows + legend_inches
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, height), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, g in zip(axes.flat, groups):
        stacked = np.stack(g.matrices)
        measured = (~np.isnan(stacked)).sum(axis=0)
        # Mean over the seeds that measured an entry; NaN where none did (above the diagonal).
        R = np.where(measured > 0, np.nansum(stacked, axis=0) / np.maximum(measured, 1), np.nan)
        n = R.shape[0]
        for j in range(n):
            stages = [i for i in range(j, n) if not math.isnan(R[i, j])]
            name = g.task_names[j] if j < len(g.task_names) else f"task {j + 1}"
            ax.plot(
                [i + 1 for i in stages],
                [R[i, j] for i in stages],
                marker="o",
                markersize=3,
                color=cmap(j / max(1, n - 1)),
                label=f"t{j + 1} {name if len(name) <= 32 else name[:31] + '…'}",
            )
        ax.set_title(f"{g.label(option)} ({len(g.seeds)} seeds)", fontsize=9)
        ax.set_xlabel("after training task", fontsize=8)
        ax.set_xticks(range(1, n + 1))
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)", fontsize=8)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=7)
    fig.suptitle("Accuracy on each task after each training stage (mean over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1 - 0.3 / height))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# --- the whole report -----------------------------------------------------------------------------------------------


def report(
    cells: Sequence[Cell],
    out: str | Path,
    sweep: Sweep | None = None,
    select_by: str | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Summarise the finished cells into ``out``: ``comparison.md`` (the table, printed too), ``comparison.csv``,
    ``comparison.json`` (rows, the selected values and the runs read), ``tradeoff.png`` (ACC vs BWT) and
    ``task_curves.png``; each written atomically.

    Args:
        select_by: ``validation-acc`` marks, per swept method, the value of the highest mean ACC (run the
            comparison with a validation split for this: the value is then rerun on the test split).
    Returns:
        the paths written.
    """
    if select_by is not None and select_by not in SELECT_RULES:
        raise CompareError(f"--select-by must be one of {', '.join(SELECT_RULES)}, got {select_by!r}")
    paths = [c.results_path for c in cells if c.results_path.exists()]
    if not paths:
        raise CompareError(f"no finished run under {out}")
    groups = collect(paths, sweep)
    option = sweep.option if sweep else None
    chosen = select(groups) if select_by else {}
    rows = summary_rows(groups, option)
    table = format_summary(rows, chosen)
    log(table)
    for method, g in chosen.items():
        log(f"selected by mean {select_by}: {method_label(method)} {option}={g.value}")
    out = Path(out)
    document = {
        "sweep": None if sweep is None else {"method": sweep.method, "option": sweep.option, "values": sweep.values},
        "select_by": select_by,
        "selected": {m: g.value for m, g in chosen.items()},
        "rows": rows,
        "runs": [str(p) for p in paths],
    }
    written = [
        atomic_write(out / "comparison.md", lambda tmp: tmp.write_text(table + "\n", encoding="utf-8")),
        atomic_write(out / "comparison.csv", lambda tmp: tmp.write_text(summary_csv(rows), encoding="utf-8")),
        atomic_write(out / "comparison.json", lambda tmp: tmp.write_text(json.dumps(document, indent=1))),
        atomic_write(out / "tradeoff.png", lambda tmp: plot_tradeoff(groups, tmp, option, chosen)),
        atomic_write(out / "task_curves.png", lambda tmp: plot_task_curves(groups, tmp, option)),
    ]
    return written
