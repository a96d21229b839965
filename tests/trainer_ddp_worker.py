"""One rank of the 2-process Trainer + TreeLoRACallback run (launched by tests/test_integrations.py with torchrun).

The Trainer wraps the PEFT model in DDP (gloo on CPU); each rank trains two tasks with per-device batch
MICRO_BATCH / 2 for each of CONFIGS and saves what it saw and what it ended with to ``<out>/<config>.rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import Trainer

from tests.test_integrations import CONFIGS, MICRO_BATCH, Recorder, arguments, peft_model, task_data
from treelora.cl import TreeLoRAConfig
from treelora.cl.distributed import end_worker_process
from treelora.integrations import TreeLoRACallback, causal_lm_loss


def run(name: str, config: TreeLoRAConfig, out: Path) -> None:
    model = peft_model()
    args = arguments(tempfile.mkdtemp())
    args.per_device_train_batch_size = MICRO_BATCH // 2
    treelora = TreeLoRACallback(model, config)
    recorder = Recorder(treelora)

    def loss_fn(outputs, labels, num_items_in_batch=None):
        recorder.record_batch(labels)
        return causal_lm_loss(outputs, labels, num_items_in_batch)

    treelora.loss_fn = loss_fn
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=task_data(0),
        callbacks=[treelora, recorder],
        compute_loss_func=treelora.compute_loss,
        optimizers=(treelora.optimizer(args), None),
    )
    for task in range(2):
        trainer.train_dataset = task_data(task)
        trainer.train()
    recorder.micro_batches.pop()
    method = treelora.method
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "world_size": torch.distributed.get_world_size(),
            "ddp": type(trainer.model_wrapped).__name__,
            "micro_batches": recorder.micro_batches,
            "selections": recorder.selections,
            "fingerprints": treelora.fingerprints,
            "tree": method.tree.to_nested(),
            "bank": method.bank.signatures.clone(),
            "adapters": [p.detach().clone() for p in method.adapter_parameters()],
        },
        out / f"{name}.rank{rank}.pt",
    )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name, config in CONFIGS.items():
        run(name, config, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if torch.distributed.is_initialized():  # the Trainer's process group
        torch.distributed.destroy_process_group()
        end_worker_process(0)  # skips the interpreter's shutdown, where torch's gloo threads can abort (see its doc)
