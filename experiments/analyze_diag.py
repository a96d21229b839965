"""Summarise a diagnostic run of ``treelora-diag`` / ``treelora-oracle`` (experiments/methods.py).

    python experiments/analyze_diag.py RESULTS.jsonl --tag TAG [--dump PREFIX]

Prints, per seed: the regularizer/task-loss gradient ratio per task and the check of the gradient split; the share of
pulls on the bank entry closest (per layer) to the finished task's signature; and, from the dumped tensors, the L1
norm of every task's signature by stream position, the rank correlation of signature L1 distances with the distance in
stream position, the within-family vs across-family cosine of signatures (bank signature, task-loss gradient of A,
task-loss gradient of B), and how far apart the adapter snapshots are.
"""

from __future__ import annotations

import argparse
import json

import torch


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def cosine_matrix(sig: torch.Tensor) -> torch.Tensor:
    """(T, T) cosine between signatures: mean over layers for (T, L, D), over the flat vector for (T, N)."""
    s = sig.double()
    if s.dim() == 3:
        s = torch.nn.functional.normalize(s, dim=-1)
        return torch.einsum("ild,jld->ijl", s, s).mean(-1)
    s = torch.nn.functional.normalize(s, dim=-1)
    return s @ s.T


def family_contrast(cos: torch.Tensor, families: list[int]) -> tuple[float, float]:
    T = cos.shape[0]
    within, across = [], []
    for i in range(T):
        for j in range(i + 1, T):
            (within if families[i] == families[j] else across).append(float(cos[i, j]))
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return mean(within), mean(across)


def position_correlation(sig: torch.Tensor) -> float:
    T = sig.shape[0]
    flat = sig.reshape(T, -1).double()
    d, gap = [], []
    for i in range(T):
        for j in range(i + 1, T):
            d.append(float((flat[i] - flat[j]).abs().sum()))
            gap.append(j - i)
    return spearman(torch.tensor(d), torch.tensor(gap, dtype=torch.float64))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--tag", required=True)
    p.add_argument("--dump", default=None)
    p.add_argument("--families", default=None, help="JSON list: family of each stream position (else from the run)")
    args = p.parse_args()
    rows = [json.loads(line) for line in open(args.results)]
    rows = [r for r in rows if r["tag"] == args.tag]
    for r in rows:
        d = r.get("diagnostics", {})
        seed = r["seed"]
        print(f"== seed {seed}: ACC {100 * r['acc']:.1f} BWT {100 * r['bwt']:.1f}")
        if d:
            print("  reg/task grad L1 ratio per task:", " ".join(f"{x:.2f}" for x in d["ratio"]))
            print("  task-loss grad L1 per task:", " ".join(f"{x:.3g}" for x in d["task_l1"]))
            errs = [e / s if s else 0.0 for e, s in zip(d["split_check_max_abs_err"], d["split_check_scale"])]
            print("  split check max |err| / max |dCE/dA|:", " ".join(f"{x:.1e}" for x in errs))
            hits, total = 0.0, 0.0
            per_task = []
            for pulls, costs in zip(d["pulls"], d["final_costs"]):
                if not costs:
                    continue
                P, C = torch.tensor(pulls), torch.tensor(costs)
                best = C.argmin(0)
                h = float(P[best, torch.arange(P.shape[1])].sum())
                per_task.append(h / float(P.sum()))
                hits += h
                total += float(P.sum())
            if total:
                K = [len(c) for c in d["final_costs"] if c]
                print(
                    "  share of pulls on the closest entry per task:",
                    " ".join(f"{x:.2f}(1/{k})" for x, k in zip(per_task, K)),
                    f"overall {hits / total:.2f}",
                )
        if args.dump:
            t = torch.load(f"{args.dump}-seed{seed}.pt")
            families = json.loads(args.families) if args.families else r.get("stream_families")
            for key in ("sig_bank", "sig_task_A", "sig_task_B"):
                sig = t[key]
                norms = sig.reshape(sig.shape[0], -1).abs().sum(1)
                line = f"  {key}: L1 norm by position " + " ".join(f"{float(x):.3g}" for x in norms)
                line += f"; spearman(L1 dist, |i-j|) {position_correlation(sig):+.2f}"
                if families:
                    w, a = family_contrast(cosine_matrix(sig), families)
                    line += f"; cosine within family {w:.3f} vs across {a:.3f}"
                print(line)
            for key in ("snap_A", "snap_B"):
                s = t[key].reshape(t[key].shape[0], -1).double()
                per_entry = s.abs().mean(1)
                steps = (s[1:] - s[:-1]).abs().mean(1)
                from_first = (s - s[0]).abs().mean(1)
                print(
                    f"  {key}: mean |entry| " + " ".join(f"{float(x):.4f}" for x in per_entry),
                    "| mean |consecutive diff| " + " ".join(f"{float(x):.4f}" for x in steps),
                    "| mean |diff to task 0| " + " ".join(f"{float(x):.4f}" for x in from_first),
                )


if __name__ == "__main__":
    main()
