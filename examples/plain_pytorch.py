"""TreeLoRA in a plain PyTorch loop, on one process or several (torchrun), with its hooks and the distributed helpers.

    python examples/plain_pytorch.py --out /tmp/treelora-example
    torchrun --standalone --nproc-per-node 2 examples/plain_pytorch.py --out /tmp/treelora-example

Three tasks of synthetic classification (a different random teacher per task) on a small MLP whose hidden layers get
LoRA adapters. The global batch is ``--batch-size`` whatever the number of processes: each rank takes its stride of
every global batch (ShardedBatchSampler), gradients are averaged across ranks after ``backward`` and before
``after_backward`` (one collective), so TreeLoRA's bank, tree and search stay identical on every rank, which is
checked at each task end. Rank 0 alone writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from treelora.cl import OptimizerConfig, TreeLoRA, TreeLoRAConfig
from treelora.cl.distributed import (
    ShardedBatchSampler,
    all_reduce_gradients,
    broadcast_parameters,
    check_identical_across_ranks,
    end_worker_process,
    init_distributed,
    run_on_main,
    shutdown_distributed,
)
from treelora.nn import inject_lora

WIDTH, CLASSES = 32, 4


def task_data(task: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + task)
    teacher = torch.randn(WIDTH, CLASSES, generator=gen)
    x = torch.randn(n, WIDTH, generator=gen)
    return x, (x @ teacher).argmax(1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json (written by rank 0)")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--examples", type=int, default=256, help="training examples per task")
    parser.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch size (all ranks together)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-2)
    args = parser.parse_args(argv)

    ctx = init_distributed(device="cpu")  # torchrun's environment, or a single process
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, CLASSES)
    )
    layers = inject_lora(model, ["0", "2"], r=4)
    model[4].requires_grad_(True)  # the classifier is trained densely beside the adapters
    method = TreeLoRA(layers, TreeLoRAConfig.paper(update_density=0.5), OptimizerConfig(lr=args.lr))
    method.add_parameters(list(model[4].parameters()))
    broadcast_parameters(method.parameters())  # start from rank 0's values, as DDP would

    history = []
    for task in range(args.tasks):
        x, y = task_data(task, args.examples)
        sampler = ShardedBatchSampler(len(x), args.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=task)
        method.begin_task(task, len(sampler), args.epochs)
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            method.begin_epoch(epoch)
            for local in sampler:
                loss = F.cross_entropy(model(x[local]), y[local])
                method.before_backward(loss).backward()
                all_reduce_gradients(method.parameters(), weight=len(local))  # before after_backward()
                method.after_backward()
                method.step()
        method.end_task()
        check_identical_across_ranks(method, label=f"the end of task {task}")
        with torch.no_grad():
            accuracy = []
            for seen in range(task + 1):
                x_test, y_test = task_data(seen, 512)
                accuracy.append(round(float((model(x_test).argmax(1) == y_test).float().mean()), 4))
        history.append(accuracy)

    result = {
        "tree": method.tree.to_nested(),
        "accuracy_after_each_task": history,
        "distributed": ctx.record(state_identical_across_ranks=True),
    }

    def write() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))

    run_on_main(write)
    shutdown_distributed(ctx)
    return result


if __name__ == "__main__":
    result = main()
    if result["distributed"]["world_size"] > 1:
        end_worker_process(0)  # skips the interpreter's shutdown, where torch's gloo threads can abort (see its doc)
