"""TreeLoRA inside a Hugging Face Trainer: a PEFT LoRA model trained on two tasks, one ``trainer.train()`` per task.

    python examples/hf_trainer.py
    torchrun --standalone --nproc-per-node 2 examples/hf_trainer.py        (the Trainer wraps the model in DDP)

The model is a 2-layer Llama built from a config (random weights, nothing downloaded) and each task is random token
sequences from its own quarter of the vocabulary; swap in your model and datasets. TreeLoRA joins the Trainer in
three places: the callback (task boundaries), ``compute_loss_func`` (the task loss, recorded) and the optimizer (the
penalty toward the selected past task per layer, the task signature and the sparse AdamW step, once per optimizer
step whatever ``gradient_accumulation_steps``).
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from treelora.cl import TreeLoRAConfig
from treelora.integrations import TreeLoRACallback

VOCAB, SEQ = 64, 16


def task_dataset(task: int, n: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(task)
    ids = torch.randint(16 * task, 16 * task + 16, (n, SEQ), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def main() -> TreeLoRACallback:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

    treelora = TreeLoRACallback(model, TreeLoRAConfig.paper(update_density=0.5))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        # TreeLoRA observes the unclipped gradient and clips data + penalty itself (max_grad_norm below).
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=task_dataset(0),
        callbacks=[treelora],
        compute_loss_func=treelora.compute_loss,
        optimizers=(treelora.optimizer(args, max_grad_norm=1.0), None),
    )
    for task in range(2):
        trainer.train_dataset = task_dataset(task)
        trainer.train()
        if trainer.is_world_process_zero():
            print(f"after task {task}: the bank holds {len(treelora.method.bank)} signatures")
    return treelora


if __name__ == "__main__":
    main()
