"""TreeLoRA in an accelerate training loop with gradient accumulation, on one process or several.

    python examples/accelerate_loop.py
    accelerate launch --num_processes 2 --cpu examples/accelerate_loop.py      (or torchrun --nproc-per-node 2 ...)

accelerate wraps the model in DDP, so gradients are averaged across ranks during the last micro-batch's backward.
TreeLoRA must act once per optimizer step on that accumulated, averaged gradient: the loop records each micro-batch's
loss with ``treelora.record_loss`` and calls TreeLoRA's optimizer only when accelerate syncs; the optimizer adds the
penalty toward the selected past tasks, observes the gradient for the task's signature and makes the sparse AdamW
step. ``TreeLoRACallback`` is the same object a transformers Trainer takes (examples/hf_trainer.py); here it is
driven by hand. Without gradient accumulation the method's hooks can also be called directly: ``loss =
method.before_backward(loss); accelerator.backward(loss); method.after_backward(); method.step()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from treelora.cl import TreeLoRAConfig
from treelora.cl.distributed import end_worker_process
from treelora.integrations import TreeLoRACallback
from treelora.nn import inject_lora

WIDTH, CLASSES, TASKS, EPOCHS, MICRO_BATCH, ACCUMULATION = 32, 4, 3, 3, 8, 2


def task_data(task: int, n: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(1000 + task)
    teacher = torch.randn(WIDTH, CLASSES, generator=gen)
    x = torch.randn(n, WIDTH, generator=gen)
    return TensorDataset(x, (x @ teacher).argmax(1))


def main() -> TreeLoRACallback:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, CLASSES)
    )
    inject_lora(model, ["0", "2"], r=4)
    model[4].requires_grad_(True)  # trained densely by the same AdamW step
    treelora = TreeLoRACallback(model, TreeLoRAConfig.paper(update_density=0.5))
    optimizer = treelora.optimizer(lr=2e-2)
    model, optimizer = accelerator.prepare(model, optimizer)  # DDP on several processes
    for task in range(TASKS):
        # drop_last: every rank runs the same number of steps, each on a full micro-batch.
        loader = accelerator.prepare(DataLoader(task_data(task, 256), MICRO_BATCH, shuffle=True, drop_last=True))
        treelora.begin_task(steps_per_epoch=len(loader) // ACCUMULATION, epochs=EPOCHS)
        for epoch in range(EPOCHS):
            treelora.method.begin_epoch(epoch)
            for x, y in loader:
                with accelerator.accumulate(model):
                    loss = F.cross_entropy(model(x), y)
                    accelerator.backward(loss)  # divides by ACCUMULATION
                    treelora.record_loss(loss.detach() / ACCUMULATION)
                    optimizer.step()  # TreeLoRA's step on sync steps only (accelerate skips the others)
        treelora.end_task()  # bank, tree, and the state compared across ranks
        accelerator.print(f"after task {task}: bank holds {len(treelora.method.bank)} signatures")
    accelerator.print(treelora.method.tree)
    return treelora


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # several processes (accelerate launch / torchrun)
        torch.distributed.destroy_process_group()
        end_worker_process(0)  # skips the interpreter's shutdown, where torch's gloo threads can abort (see its doc)
