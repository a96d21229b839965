"""ACC-vs-BWT trade-off of lambda sweeps, and the lambda each method would pick on the validation split.

    python experiments/tradeoff.py experiments/results/sweep_a_val.jsonl --tag val-a \
        --png experiments/tradeoff_a_val.png

Groups runs by (method, options without the lambda), averages ACC and BWT over seeds per lambda, prints one table per
method with the lambda of the highest mean validation ACC marked (the selection rule: ACC after the last task is what
forgetting costs in a class-incremental stream; only lambdas run on all of the group's seeds compete), and draws
every (method, lambda) point in the ACC-BWT plane.
"""

from __future__ import annotations

import argparse
import json
import statistics

LAMBDA_KEYS = ("reg_lambda", "ewc_lambda", "lambda_orth", "agem_strength")


def load(paths: list[str], tag: str) -> dict[tuple[str, str], dict[float, list[dict]]]:
    groups: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if r["tag"] != tag or r.get("acc") is None:
                continue
            opts = {k: v for k, v in r["method_options"].items() if k not in ("dump", "families")}
            lam = next((float(opts.pop(k)) for k in LAMBDA_KEYS if k in opts), 0.0)
            label = r["method"] + (" " + json.dumps(opts, sort_keys=True) if opts else "")
            groups.setdefault((r["method"], label), {}).setdefault(lam, []).append(r)
    return groups


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results", nargs="+")
    p.add_argument("--tag", required=True)
    p.add_argument("--png", default=None)
    args = p.parse_args()
    groups = load(args.results, args.tag)
    points = []
    for (_, label), by_lam in sorted(groups.items()):
        rows = []
        for lam, runs in sorted(by_lam.items()):
            acc = mean_sd([100 * r["acc"] for r in runs])
            bwt = mean_sd([100 * r["bwt"] for r in runs])
            rows.append((lam, acc, bwt, sorted(r["seed"] for r in runs)))
        # Only lambdas run on every seed of the group compete (a mean over other seeds is not comparable).
        full = max(len(row[3]) for row in rows)
        best = max((row for row in rows if len(row[3]) == full), key=lambda row: row[1][0])
        print(f"{label}")
        for lam, acc, bwt, seeds in rows:
            mark = "  <- chosen (max mean val ACC)" if row_is(best, lam) and len(rows) > 1 else ""
            print(
                f"  lambda {lam:>9g}: ACC {acc[0]:5.1f} +- {acc[1]:4.1f}  BWT {bwt[0]:5.1f} +- {bwt[1]:4.1f}"
                f"  seeds {seeds}{mark}"
            )
            points.append((label, lam, acc[0], bwt[0]))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 5))
        for label in dict.fromkeys(p[0] for p in points):
            pts = [p for p in points if p[0] == label]
            ax.plot([p[3] for p in pts], [p[2] for p in pts], marker="o", label=label)
            for _, lam, acc, bwt in pts:
                if lam:
                    ax.annotate(f"{lam:g}", (bwt, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("BWT (%, lower = less forgetting)")
        ax.set_ylabel("ACC (%)")
        ax.set_title(f"{args.tag}: mean over seeds, labels = lambda")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


def row_is(best: tuple, lam: float) -> bool:
    return best[0] == lam


if __name__ == "__main__":
    main()
