"""Regenerate the README's continual-learning tables: `treelora run` over several seeds, averaged.

Tables (each a Markdown table of mean ± standard deviation over the seeds, with the commands and the machine):

* ``supersense``: the task-incremental stream wordnet-supersense on minilm, TreeLoRA vs SeqLoRA;
* ``instruct``: wordnet-instruct on smollm2-135m, TreeLoRA vs SeqLoRA, few steps per task (CPU budget);
* ``supersense-baselines``: O-LoRA, EWC and joint multitask training on wordnet-supersense;
* ``instruct-ablation``: TreeLoRA on the instruct stream with the released scripts' lambda (0.5);
* ``supersense-ablation``: TreeLoRA variants on wordnet-supersense (regularizer off, lambda, random search, split
  rule, update density, the official preset), each one ``--method-option`` away from its defaults.

The default stream's tables (wordnet-classil) come from ``treelora compare`` (see the README's Results section).

Usage::

    python scripts/readme_tables.py supersense [--seeds 0,1,2] [--root readme-runs] [--resume]
    python scripts/readme_tables.py instruct
    python scripts/readme_tables.py supersense-ablation

Every run is a separate ``python -m treelora run`` process (its peak memory is its own) writing into
``<root>/<table>/<variant>-seed<s>``; ``--resume`` continues interrupted runs from their checkpoints. The table is
printed and written to ``<root>/<table>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from treelora.cl import method_label

INSTRUCT_ARGS = ["--stream", "wordnet-instruct", "--model", "smollm2-135m"]
SUPERSENSE = ["--stream", "wordnet-supersense"]
# name -> (extra `treelora run` arguments, methods)
TABLES: dict[str, dict[str, tuple[list[str], str]]] = {
    "supersense": {"default": (SUPERSENSE, "TreeLoRA,SeqLoRA")},
    "instruct": {"instruct": (INSTRUCT_ARGS, "TreeLoRA,SeqLoRA")},
    "supersense-baselines": {"default": (SUPERSENSE, "O-LoRA,EWC,Joint")},
    "instruct-ablation": {"lambda-0.5": ([*INSTRUCT_ARGS, "--method-option", "reg_lambda=0.5"], "TreeLoRA")},
    "supersense-ablation": {
        "regularizer-none": ([*SUPERSENSE, "--method-option", "regularizer=none"], "TreeLoRA"),
        "lambda-0.5": ([*SUPERSENSE, "--method-option", "reg_lambda=0.5"], "TreeLoRA"),
        "lambda-1": ([*SUPERSENSE, "--method-option", "reg_lambda=1.0"], "TreeLoRA"),
        "lambda-4": ([*SUPERSENSE, "--method-option", "reg_lambda=4.0"], "TreeLoRA"),
        "search-random": ([*SUPERSENSE, "--method-option", "search=random"], "TreeLoRA"),
        "split-mean_dot": ([*SUPERSENSE, "--method-option", "split=mean_dot"], "TreeLoRA"),
        "split-mean_distance": ([*SUPERSENSE, "--method-option", "split=mean_distance"], "TreeLoRA"),
        "density-0.5": ([*SUPERSENSE, "--method-option", "update_density=0.5"], "TreeLoRA"),
        "density-0.1": ([*SUPERSENSE, "--method-option", "update_density=0.1"], "TreeLoRA"),
        "official-preset": ([*SUPERSENSE, "--method-option", "preset=official"], "TreeLoRA"),
    },
}
COLUMNS = [
    ("acc", "ACC (%)", 100.0),
    ("bwt", "BWT (%)", 100.0),
    ("forgetting", "forgetting (%)", 100.0),
    ("train_time", "train time (s)", 1.0),
    ("peak_memory_mib", "peak memory (MiB)", 1.0),
]


def _run(variant_dir: Path, extra: list[str], methods: str, seed: int, resume: bool) -> float:
    command = [
        sys.executable,
        "-m",
        "treelora",
        "run",
        *extra,
        "--methods",
        methods,
        "--seed",
        str(seed),
        "--out",
        str(variant_dir),
    ]
    if resume:
        command.append("--resume")
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def _fmt(values: list[float], scale: float) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", type=Path, default=Path("readme-runs"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    walls: list[float] = []
    machine = None
    commands = []
    for variant, (extra, methods) in TABLES[args.table].items():
        for seed in seeds:
            out = args.root / args.table / f"{variant}-seed{seed}"
            done = (out / "results.json").is_file() and args.resume
            if not done:
                walls.append(_run(out, extra, methods, seed, args.resume))
            payload = json.loads((out / "results.json").read_text())
            machine = machine or payload["machine"]
            commands.append(payload["command"])
            for r in payload["results"]:
                key = (variant, method_label(r["method"]))
                cell = rows.setdefault(key, {c: [] for c, _, _ in COLUMNS})
                m = r["metrics"]
                cell["acc"].append(m.get("acc"))
                cell["bwt"].append(m.get("bwt"))
                cell["forgetting"].append(m.get("forgetting"))
                cell["train_time"].append(r["train_time"])
                cell["peak_memory_mib"].append(r["peak_memory_bytes"] / 2**20)
    header = ["variant", "method", *(label for _, label, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for (variant, method), cell in rows.items():
        lines.append("| " + " | ".join([variant, method, *(_fmt(cell[c], s) for c, _, s in COLUMNS)]) + " |")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    notes = [
        f"Mean ± sd over seeds {args.seeds}. BWT: paper convention (positive = forgetting).",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, Python {machine['python']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in load) if load else 'n/a'}.",
        "Wall time per run (s): " + (", ".join(f"{w:.0f}" for w in walls) if walls else "reused earlier runs") + ".",
        "Commands:",
        *(f"    {c}" for c in dict.fromkeys(commands)),
    ]
    text = "\n".join(lines + [""] + notes) + "\n"
    print(text)
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / f"{args.table}.md").write_text(text)


if __name__ == "__main__":
    main()
