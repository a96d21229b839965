"""Run one method on one stream for several seeds and append one JSON line per run to a results file.

Usage (from the repository root, one thread):

    OMP_NUM_THREADS=1 python experiments/run.py --stream wordnet-classil --method seqlora --seeds 0 1 2 \
        --head label --train-logits seen --test-logits seen --out experiments/results/classil.jsonl --tag seq

Everything the run used (stream options, trainer settings, protocol, method options) is written with its numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# The experiment helpers, and this checkout's treelora ahead of any installed copy.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import methods  # noqa: E402
from protocols import ProtocolTrainer  # noqa: E402

from treelora.cl.trainer import TrainerConfig  # noqa: E402
from treelora.data import STREAMS, get_stream  # noqa: E402
from treelora.data.forgetting import (  # noqa: E402
    validation_split,
    wordnet_classil,
    wordnet_instruct_classil,
)

EXTRA_STREAMS = {"wordnet-classil": wordnet_classil, "wordnet-instruct-classil": wordnet_instruct_classil}


def build_stream(name: str, options: dict, validation: float | None):
    """A built-in or experiment stream; with ``validation`` its test sets are replaced by held-out training data."""
    stream = (
        EXTRA_STREAMS[name](**options) if name in EXTRA_STREAMS and name not in STREAMS else get_stream(name, **options)
    )
    return validation_split(stream, validation, seed=options.get("seed", 0)) if validation else stream


from treelora.models import load_model  # noqa: E402


def run_one(args: argparse.Namespace, seed: int, method_options: dict) -> dict:
    stream_options = dict(json.loads(args.stream_options))
    stream_options.setdefault("seed", seed)
    stream = build_stream(args.stream, stream_options, args.validation)
    loaded = load_model(args.model, seed=seed)
    cfg = TrainerConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        max_steps_per_task=args.max_steps,
        max_grad_norm=None if args.max_grad_norm <= 0 else args.max_grad_norm,
        eval_zero_shot=args.zero_shot,
        eval_next_task=args.zero_shot,
        seed=seed,
        progress=False,
    )
    kwargs = {}
    if stream.kind == "classification":
        kwargs = dict(head=args.head, train_logits=args.train_logits, test_logits=args.test_logits)
    method_options = dict(method_options)
    if args.method == "treelora-oracle":
        method_options.setdefault("families", stream.info["families"])
    if args.method.startswith("treelora-") and args.dump:
        method_options.setdefault("dump", f"{args.dump}-seed{seed}.pt")
    method = methods.make(args.method) or args.method
    trainer = ProtocolTrainer(stream, loaded, method, cfg, method_options=method_options, **kwargs)
    start = time.perf_counter()
    result = trainer.run()
    wall = time.perf_counter() - start
    out = {
        "tag": args.tag,
        "stream": args.stream,
        "stream_options": stream_options,
        "model": args.model,
        "method": args.method,
        "method_options": method_options,
        "protocol": kwargs,
        "trainer": {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "device", "checkpoint_dir")},
        "stream_families": stream.info.get("families"),
        "seed": seed,
        "validation": args.validation,
        "acc": result.metrics.get("acc"),
        "bwt": result.metrics.get("bwt"),
        "forgetting": result.metrics.get("forgetting"),
        "R": result.R,
        "zero_shot": result.zero_shot,
        "train_seconds": result.train_seconds,
        "wall_seconds": wall,
        "threads": torch.get_num_threads(),
    }
    if hasattr(trainer.method, "diagnostics"):
        out["diagnostics"] = trainer.method.diagnostics
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stream", required=True)
    p.add_argument("--stream-options", default="{}", help="JSON object of stream builder options")
    p.add_argument("--model", default="minilm")
    p.add_argument("--method", default="seqlora")
    p.add_argument("--method-options", default="{}", help="JSON object of method options")
    p.add_argument("--sweep", default=None, help="JSON list of method-option objects, each run for every seed")
    p.add_argument("--head", default="linear")
    p.add_argument("--train-logits", default="task")
    p.add_argument("--test-logits", default="seen")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="global gradient-norm clipping (<= 0: none)")
    p.add_argument("--zero-shot", action="store_true", help="also measure zero-shot and next-task accuracy")
    p.add_argument("--validation", type=float, default=None, help="evaluate on this share of held-out train data")
    p.add_argument("--dump", default=None, help="path prefix for the diagnostic tensors of treelora-* methods")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sweep = json.loads(args.sweep) if args.sweep else [json.loads(args.method_options)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for options in sweep:
        for seed in args.seeds:
            try:
                row = run_one(args, seed, options)
            except FloatingPointError as e:  # a diverged run is a result too (recorded, the sweep goes on)
                row = {
                    "tag": args.tag,
                    "method": args.method,
                    "method_options": options,
                    "seed": seed,
                    "stream": args.stream,
                    "validation": args.validation,
                    "error": str(e),
                    "acc": None,
                    "bwt": None,
                    "wall_seconds": 0.0,
                }
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{args.tag} {args.method} {json.dumps(options)} seed {seed}: diverged: {e}", flush=True)
                continue
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            bwt = "-" if row["bwt"] is None else f"{100 * row['bwt']:.1f}"
            print(
                f"{args.tag} {args.method} {json.dumps(options)} seed {seed}: ACC {100 * row['acc']:.1f} "
                f"BWT {bwt} ({row['wall_seconds']:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
