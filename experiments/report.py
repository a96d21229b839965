"""Table of a results file: one row per (tag, method, options), mean +- sd over seeds of ACC and BWT (percent), the
seeds, and the mean wall time per run.

    python experiments/report.py experiments/results/FILE.jsonl [--tag PREFIX] [--matrix]
"""

from __future__ import annotations

import argparse
import json
import statistics


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:5.1f} +- {100 * sd:4.1f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results", nargs="+")
    p.add_argument("--tag", default="", help="only tags starting with this")
    p.add_argument("--matrix", action="store_true", help="also print every run's accuracy matrix")
    args = p.parse_args()
    groups: dict[tuple, list[dict]] = {}
    for path in args.results:
        for line in open(path):
            r = json.loads(line)
            if not r["tag"].startswith(args.tag):
                continue
            opts = {k: v for k, v in r["method_options"].items() if k not in ("dump", "families")}
            key = (r["tag"], r["method"], json.dumps(opts, sort_keys=True))
            groups.setdefault(key, []).append(r)
    print(f"{'tag':28s} {'method':16s} {'options':44s} {'ACC':>13s} {'BWT':>13s} seeds  s/run")
    for (tag, method, opts), rows in groups.items():
        acc = [r["acc"] for r in rows if r["acc"] is not None]
        bwt = [r["bwt"] for r in rows if r["bwt"] is not None]
        seeds = ",".join(str(r["seed"]) for r in rows)
        wall = statistics.mean(r["wall_seconds"] for r in rows)
        errors = sum("error" in r for r in rows)
        note = f"  ({errors} diverged)" if errors else ""
        print(f"{tag:28s} {method:16s} {opts:44s} {fmt(acc):>13s} {fmt(bwt):>13s} {seeds:6s} {wall:5.0f}{note}")
        if args.matrix:
            for r in rows:
                if "R" not in r:
                    continue
                print(f"  seed {r['seed']}")
                for row in r["R"]:
                    print("    " + " ".join("  -  " if v is None else f"{v:.2f}" for v in row))


if __name__ == "__main__":
    main()
