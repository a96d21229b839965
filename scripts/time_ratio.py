"""TreeLoRA's training time relative to SeqLoRA's at equal epochs, measured side by side.

The two methods train the same stream in one process, task by task in alternation (TreeLoRA task k, SeqLoRA task k,
TreeLoRA task k + 1, ...), so that the load of a shared machine falls on both alike; the per-task ratios and their
median are printed. Evaluation is skipped (it is the same for both methods).

Usage: ``python scripts/time_ratio.py [--stream wordnet-supersense] [--model minilm] [--epochs 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from treelora.cl import Trainer, TrainerConfig
from treelora.cli import STREAM_DEFAULTS
from treelora.data import get_stream
from treelora.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", default="wordnet-supersense")
    parser.add_argument("--model", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    defaults = STREAM_DEFAULTS[args.stream]
    stream = get_stream(args.stream)
    config = TrainerConfig(
        epochs=args.epochs or defaults["epochs"],
        batch_size=defaults["batch_size"],
        lr=defaults["lr"],
        max_length=defaults["max_length"],
        max_steps_per_task=defaults.get("max_steps"),
        seed=args.seed,
        progress=False,
    )
    trainers = {
        m: Trainer(stream, load_model(args.model or defaults["model"]), m, config) for m in ("treelora", "seqlora")
    }
    seconds: dict[str, list[float]] = {m: [] for m in trainers}
    torch.manual_seed(args.seed)
    for k in range(len(stream)):
        for method, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_task(k, label=method)
            seconds[method].append(time.perf_counter() - start)
        print(
            f"task {k + 1}: TreeLoRA {seconds['treelora'][-1]:.2f} s, SeqLoRA {seconds['seqlora'][-1]:.2f} s, "
            f"ratio {seconds['treelora'][-1] / seconds['seqlora'][-1]:.3f}",
            flush=True,
        )
    ratios = [a / b for a, b in zip(seconds["treelora"], seconds["seqlora"])]
    total = sum(seconds["treelora"]) / sum(seconds["seqlora"])
    print(
        f"total TreeLoRA {sum(seconds['treelora']):.1f} s, SeqLoRA {sum(seconds['seqlora']):.1f} s: ratio {total:.3f}; "
        f"median per-task ratio {statistics.median(ratios):.3f}; tasks 2-{len(stream)} (with the regularizer) "
        f"{sum(seconds['treelora'][1:]) / sum(seconds['seqlora'][1:]):.3f}"
    )


if __name__ == "__main__":
    main()
