"""Do related tasks' signatures end up closest? For every task with an earlier task of its own family, whether its
nearest earlier task (summed over layers under a metric) is of its family; chance = the share of same-family tasks
among the earlier ones. Reads the tensors dumped by ``treelora-diag`` runs.

    python experiments/family_nn.py /tmp/dumps/diag-fixed-l2 0 1 2 --families '[0,1,2,0,1,2,0,2]'
"""

from __future__ import annotations

import argparse
import json

import torch

from treelora.ops import pairwise_similarity
from treelora.ops.similarity import IS_DISTANCE


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("prefix")
    p.add_argument("seeds", nargs="+", type=int)
    p.add_argument("--families", required=True)
    args = p.parse_args()
    fam = json.loads(args.families)
    for key in ("sig_task_A", "sig_task_B", "snap_A"):
        for metric in ("l1", "l1_normalized", "cosine"):
            hits, chance, n = 0.0, 0.0, 0
            for seed in args.seeds:
                sig = torch.load(f"{args.prefix}-seed{seed}.pt")[key].float()
                if sig.dim() == 2:  # B signatures are flat: one "layer"
                    sig = sig[:, None, :]
                for k in range(1, sig.shape[0]):
                    earlier = [j for j in range(k) if fam[j] == fam[k]]
                    if not earlier:
                        continue
                    cost = pairwise_similarity(sig[k], sig[:k], metric).sum(1)
                    cost = cost if IS_DISTANCE[metric] else -cost
                    hits += fam[int(cost.argmin())] == fam[k]
                    chance += len(earlier) / k
                    n += 1
            print(
                f"{key:11s} {metric:14s} nearest earlier task in the family: {hits / n:.2f} "
                f"(chance {chance / n:.2f}, {n} cases)"
            )


if __name__ == "__main__":
    main()
