"""Render the benchmark results under bench/results/<device>/ as the README's Markdown tables.

Usage::

    python scripts/bench_tables.py [--device cpu] [--results bench/results] [--local | --smoke]

Reads the pytest-benchmark JSON files of one folder (one per module, or all.json for a whole-folder run; the newest
file wins for each benchmark) and prints one table per benchmark module with the ratios each target is stated on.
Every number printed is read from those files. The folder is ``<results>/<device>/``, the committed reference runs
(written by ``python -m pytest bench/<file>.py --benchmark-only --bench-reference``); with ``--local`` it is
``<results>/<device>/local/``, where every other run lands; with ``--smoke``, ``local/smoke/`` (``--bench-smoke``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(folder: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The benchmarks of every JSON file in ``folder`` by name (newest file last, so it wins) and, per file,
    a one-line description of the machine and versions."""
    benchmarks: dict[str, dict] = {}
    machines: dict[str, str] = {}
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"bench_tables: {path} is not a pytest-benchmark JSON report ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise SystemExit(f"bench_tables: {path} is not a pytest-benchmark JSON report (no 'benchmarks' list)")
        runs.append((data.get("datetime", ""), path, data))
    for _, path, data in sorted(runs, key=lambda run: run[0]):
        info = data.get("machine_info", {})
        extra = next((b["extra_info"] for b in data["benchmarks"]), {})
        machines[path.stem] = (
            f"{info.get('cpu', {}).get('brand_raw', info.get('processor', '?'))}, "
            f"{extra.get('cpu_threads', extra.get('cpu_threads_version', '?'))} threads, "
            f"torch {extra.get('torch_version', '?')}, {data.get('datetime', '?')[:16]}"
        )
        for bench in data["benchmarks"]:
            benchmarks[bench["name"]] = bench
    return benchmarks, machines


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def lora_rows(benchmarks: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, b in sorted(benchmarks.items()):
        if not name.startswith("test_side_by_side"):
            continue
        e = b["extra_info"]
        med = e["median_s"]
        rows.append(
            [
                f"M={e['M']}, K={e['K']}, N={e['N']}, r={e['r']}",
                ms(med["treelora-torch"]),
                ms(med["peft"]),
                ms(med["torch-base"]),
                f"**{e['treelora_over_peft']:.3f}**",
                f"{e['treelora_over_base']:.3f}",
                "-" if e["target_treelora_over_peft"] is None else f"<= {e['target_treelora_over_peft']}",
            ]
        )
    return rows


def step_rows(benchmarks: dict[str, dict]) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    step, book, llama = [], [], []
    for name, b in sorted(benchmarks.items()):
        e = b["extra_info"]
        if name.startswith("test_step_vs_plain_lora"):
            step.append(
                [
                    e["preset"],
                    f"{e.get('model', '?')}, batch {e.get('batch')} x seq {e.get('seq')}",
                    ms(e["median_s"]["plain"]),
                    ms(e["median_s"]["treelora"]),
                    f"**{e['treelora_over_plain']:.3f}**",
                    f"<= {e['target']}",
                ]
            )
        elif name.startswith("test_bookkeeping_vs_past_tasks"):
            med = e["median_s"]
            book.append(
                [
                    e["preset"],
                    f"L={e['layers']}, in={e['in_features']}",
                    ms(med["1"]),
                    ms(med["2"]) if "2" in med else "-",
                    ms(med["50"]),
                    f"**{e['ratio_50_over_1']:.3f}**",
                    f"{e['ratio_50_over_2']:.3f}" if "ratio_50_over_2" in e else "-",
                    f"<= {e['target']}",
                ]
            )
        elif name.startswith("test_bookkeeping_llama7b_shape"):
            ref = e["released_code_reference"]
            row = [e["preset"], f"{e['median_ms']:.2f}", str(e["compute_ops"]), str(e["host_syncs"])]
            if "released_restatement_median_ms" in e:
                row += [
                    f"{e['released_restatement_median_ms']:.2f}",
                    str(e["released_restatement_compute_ops"]),
                    str(e["released_restatement_host_syncs"]),
                ]
            else:
                row += ["-", "-", "-"]
            row.append(f"{ref['cpu_ms']:g} ms, ~{ref['launches']} launches, {ref['host_syncs']} syncs")
            llama.append(row)
    return step, book, llama


def similarity_rows(benchmarks: dict[str, dict]) -> list[list[str]]:
    cases: dict[tuple, dict[str, dict]] = {}
    for name, b in benchmarks.items():
        if not name.startswith("test_similarity"):
            continue
        e = b["extra_info"]
        key = (e["T"], e["L"], e["D"], e["form"], e["metric"])
        cases.setdefault(key, {})[e["provider"]] = b
    rows = []
    for (T, L, D, form, metric), providers in sorted(cases.items()):
        ours, eager = providers.get("treelora-torch"), providers.get("eager-reference")
        if ours is None or eager is None:
            continue
        rows.append(
            [
                f"T={T}, L={L}, D={D}",
                form,
                metric,
                ms(ours["stats"]["median"]),
                ms(eager["stats"]["median"]),
                f"{ours['extra_info']['speedup_vs_eager_reference']:.2f}x",
            ]
        )
    return rows


def masked_rows(benchmarks: dict[str, dict]) -> list[list[str]]:
    torch_steps: dict[tuple[str, str], dict] = {}
    ours: dict[tuple[str, float], dict[str, dict]] = {}
    for name, b in benchmarks.items():
        e = b["extra_info"]
        if name.startswith("test_torch_adamw"):
            torch_steps[(e["model"], e["flavour"])] = b
        elif name.startswith("test_masked_adamw"):
            ours.setdefault((e["model"], e["density"]), {})[e["provider"]] = b
    rows = []
    for (model, density), providers in sorted(ours.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        mine = providers.get("treelora-torch")
        if mine is None:
            continue
        e = mine["extra_info"]
        medians = e["median_s"]
        eager = e.get("speedup_vs_eager_reference")
        rows.append(
            [
                f"{model} ({e['parameters'] / 1e6:.2f}M)",
                f"{density:g}",
                ms(medians["provider"]),
                ms(medians["foreach"]),
                ms(medians["fused"]),
                f"**{e['time_over_foreach_adamw']:.2f}**",
                f"{e['time_over_fused_adamw']:.2f}",
                "-" if eager is None else f"{eager:.1f}x",
                "-" if e.get("target_time_over") is None else f"<= {next(iter(e['target_time_over'].values()))}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="results folder name under --results (default cpu)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--local", action="store_true", help="the runs under <device>/local/ instead of the references")
    which.add_argument("--smoke", action="store_true", help="the --bench-smoke runs under <device>/local/smoke/")
    args = parser.parse_args(argv)
    folder = Path(args.results) / args.device
    if args.local or args.smoke:
        folder = folder / "local"
    if args.smoke:
        folder = folder / "smoke"
    if not any(folder.glob("*.json")):
        print(f"no results in {folder}: run `python -m pytest bench --benchmark-only` first", file=sys.stderr)
        return 2
    benchmarks, machines = load(folder)
    out = []
    rows = lora_rows(benchmarks)
    if rows:
        out += [
            "LoRA layer forward + backward, fp32, side by side (medians, ms; `bench/bench_lora.py`):",
            "",
            table(["shape", "treelora", "PEFT", "base linear", "treelora / PEFT", "treelora / base", "target"], rows),
            "",
        ]
    step, book, llama = step_rows(benchmarks)
    if step:
        out += [
            "TreeLoRA training step vs a plain LoRA step, 10 past tasks (medians, ms; `bench/bench_treelora_step.py`):",
            "",
            table(["preset", "model", "plain LoRA", "TreeLoRA", "TreeLoRA / plain", "target"], step),
            "",
        ]
    if book:
        out += [
            "TreeLoRA's bookkeeping per step (select, distances, regularizer forward + backward, signature) "
            "against the number of past tasks (medians, ms):",
            "",
            table(["preset", "adapter shape", "1 task", "2 tasks", "50 tasks", "50 / 1", "50 / 2", "target"], book),
            "",
        ]
    if llama:
        out += [
            "Bookkeeping at the Llama-2-7B adapter shape (L = 64, r = 8, in = 4096, 7 past tasks): time, compute ops "
            "(torch profiler, top-level aten ops that are not views) and host synchronisations, against the same "
            "arithmetic written the released code's way, timed in the same run:",
            "",
            table(
                [
                    "preset",
                    "treelora ms",
                    "ops",
                    "syncs",
                    "released-code way ms",
                    "ops",
                    "syncs",
                    "released code (reported)",
                ],
                llama,
            ),
            "",
        ]
    rows = similarity_rows(benchmarks)
    if rows:
        out += [
            "Similarity of the current signature against the bank (`bench/bench_similarity.py`; eager reference = a "
            "per-layer Python loop):",
            "",
            table(["bank", "form", "metric", "treelora ms", "eager ms", "speedup"], rows),
            "",
        ]
    rows = masked_rows(benchmarks)
    if rows:
        out += [
            "Masked AdamW over the LoRA parameters of a 32-layer model (448 tensors; `bench/bench_masked_update.py`; "
            "torch's dense AdamW steps and the eager reference (per-tensor boolean indexing) timed side by side):",
            "",
            table(
                [
                    "model",
                    "density",
                    "treelora ms",
                    "torch foreach AdamW ms",
                    "torch fused AdamW ms",
                    "/ foreach",
                    "/ fused",
                    "speedup vs eager",
                    "target / foreach",
                ],
                rows,
            ),
            "",
        ]
    out.append("Machines: " + "; ".join(f"`{stem}`: {desc}" for stem, desc in sorted(machines.items())))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
