"""A fixed small training workload for the thread-default measurements (run as a script, one configuration per
process, since OpenMP reads its environment when torch loads it).

    python bench/threads_workload.py --steps 30 [--threads N] [--cli-default]

(``--cli-default``: restart with OMP_WAIT_POLICY=PASSIVE as ``treelora run`` does, unless the variable is set.)

Trains LoRA (r = 8 on query and value) on a MiniLM-shaped encoder built from a config (6 layers, hidden 384, 12 heads,
intermediate 1536; random weights, no download) with a linear head: batch 32, 16 tokens, AdamW, the default run's
shape. Prints one JSON line: seconds for ``--steps`` steps after 3 warm-up steps, the torch thread count and the
OpenMP wait policy in effect.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Run as a script from anywhere: the checkout's package first (as `python -m pytest` from the root does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's)")
    p.add_argument(
        "--cli-default", action="store_true", help="start as `treelora run` does (OpenMP's passive wait policy)"
    )
    args = p.parse_args()
    if args.cli_default:
        from treelora.cli import prefer_passive_openmp

        prefer_passive_openmp(["run"])  # restarts this script with the policy set, as `treelora run` restarts
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import BertConfig, BertModel

    from treelora.nn import inject_lora

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=384, num_attention_heads=12, num_hidden_layers=6, intermediate_size=1536, vocab_size=30522
    )
    encoder = BertModel(config, add_pooling_layer=False)
    head = nn.Linear(384, 16)
    inject_lora(encoder, ["query", "value"], r=8, lora_alpha=16)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (32, 16))
    labels = torch.randint(0, 16, (32,))

    def step() -> None:
        loss = F.cross_entropy(head(encoder(input_ids=ids).last_hidden_state[:, 0]), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": seconds,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            }
        )
    )


if __name__ == "__main__":
    main()
