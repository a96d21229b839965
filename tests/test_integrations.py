"""treelora.integrations.TreeLoRACallback with the real transformers Trainer on a tiny Llama (built from a config)
with PEFT LoRA: two tasks, gradient accumulation, the bank, the regularizer's effect, the sparse step, and equality
with TreeLoRA's hooks driven by hand on the same micro-batches."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from tests.tiny_models import tiny_llama  # noqa: E402
from treelora.cl import TreeLoRA, TreeLoRAConfig  # noqa: E402
from treelora.integrations import TreeLoRACallback, causal_lm_loss, find_lora_layers  # noqa: E402

SEQ, EXAMPLES, MICRO_BATCH, ACCUMULATION, LR = 8, 24, 4, 2, 5e-3
STEPS = EXAMPLES // (MICRO_BATCH * ACCUMULATION)  # optimizer steps per task
VOCAB = 64
DENSITY = 0.5
# The official regularizer scales its penalty by the loss, which is reduced across ranks under DDP: run both.
CONFIGS = {
    "paper": TreeLoRAConfig.paper(update_density=DENSITY),
    "official": TreeLoRAConfig.official(),
}
# torchrun with 2 ranks importing transformers and peft: about 25 s on a busy 2-core machine.
DDP_TIMEOUT_S = 300


def peft_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    return get_peft_model(tiny_llama(), config)


def task_data(task: int) -> list[dict[str, torch.Tensor]]:
    """Random token sequences from a task-specific quarter of the vocabulary (a different next-token distribution per
    task)."""
    gen = torch.Generator().manual_seed(50 + task)
    low = 16 * task
    ids = torch.randint(low, low + 16, (EXAMPLES, SEQ), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def arguments(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


class Recorder(TrainerCallback):
    """Per optimizer step: the micro-batches seen, the selection, the penalty, and which entries the step changed
    versus the gradient it used."""

    def __init__(self, treelora: TreeLoRACallback) -> None:
        self.treelora = treelora
        self.micro_batches: list[list[torch.Tensor]] = [[]]
        self.selections: list[list[int] | None] = []
        self.penalties: list[float] = []
        self.updates: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._before: list[torch.Tensor] = []
        self.task_ends: list[list[torch.Tensor]] = []
        method = treelora.method
        original = method.after_backward

        def after_backward() -> None:  # the final gradient of the step (data + penalty), as the AdamW step reads it
            original()
            self._grads = [p.grad.clone() for p in method.adapter_parameters()]

        method.after_backward = after_backward

    def record_batch(self, labels: torch.Tensor) -> None:
        self.micro_batches[-1].append(labels.clone())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._before = [p.detach().clone() for p in self.treelora.method.adapter_parameters()]

    def on_optimizer_step(self, args, state, control, **kwargs):
        method = self.treelora.method
        self.selections.append(None if method.last_selection is None else method.last_selection.tolist())
        self.penalties.append(float(self.treelora.last_penalty))
        changed = [p.detach() != b for p, b in zip(method.adapter_parameters(), self._before)]
        self.updates.append((changed, self._grads))
        self.micro_batches.append([])

    def on_train_end(self, args, state, control, **kwargs):
        self.task_ends.append([p.detach().clone() for p in self.treelora.method.adapter_parameters()])


def train_with_trainer(tmp_path, config: TreeLoRAConfig) -> tuple[torch.nn.Module, TreeLoRACallback, Recorder]:
    model = peft_model()
    args = arguments(tmp_path)
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for task in range(2):
            trainer.train_dataset = task_data(task)
            trainer.train()
    recorder.micro_batches.pop()
    return model, treelora, recorder


def train_by_hand(config: TreeLoRAConfig, micro_batches: list[list[torch.Tensor]]):
    """The treelora harness's order on the same micro-batches: loss of the accumulated batch, before_backward,
    backward, after_backward, step."""
    model = peft_model()
    model.train()
    method = TreeLoRA(find_lora_layers(model), config)
    method.optim.lr = LR
    selections = []
    for task in range(2):
        method.begin_task(task, STEPS, 1)
        method.begin_epoch(0)
        for batches in micro_batches[task * STEPS : (task + 1) * STEPS]:
            count = sum(int((b[:, 1:] != -100).sum()) for b in batches)
            loss = sum(causal_lm_loss(model(input_ids=b), b, count) for b in batches)
            method.before_backward(loss).backward()
            method.after_backward()
            method.step()
            selections.append(None if method.last_selection is None else method.last_selection.tolist())
        method.end_task()
    return model, method, selections


@pytest.fixture(scope="module")
def one_thread():
    """Matrices of 4 x 8 x 32 gain nothing from a second thread, and on a busy 2-core machine OpenMP's waiting makes
    these runs about 6x slower with 2 threads (4.9 s vs 0.8 s for the two Trainer tasks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    return {
        "treelora": train_with_trainer(tmp_path_factory.mktemp("a"), CONFIGS["paper"]),
        "none": train_with_trainer(
            tmp_path_factory.mktemp("b"), TreeLoRAConfig.paper(update_density=DENSITY, regularizer="none")
        ),
    }


def test_two_tasks_fill_the_bank(runs):
    _, treelora, recorder = runs["treelora"]
    method = treelora.method
    assert len(method.bank) == 2 and method.bank.members == [[0], [1]]
    assert method.tree.to_nested() == {"tasks": [0, 1], "left": {"tasks": [0]}, "right": {"tasks": [1]}}
    assert len(recorder.selections) == 2 * STEPS
    assert all(len(b) == ACCUMULATION for b in recorder.micro_batches)
    assert recorder.selections[:STEPS] == [None] * STEPS
    assert all(s == [0] * method.num_layers for s in recorder.selections[STEPS:])  # one past task to pick
    assert set(treelora.fingerprints) >= {"treelora.bank", "treelora.tree", "parameters"}


def test_regularizer_changes_task_two_only(runs):
    """Against the same run with regularizer='none': task 1 (no past task) ends with bit-identical adapters; on task
    2 the penalty is 0 at its first step (the adapter still equals task 1's snapshot, the l1 target) and positive
    after, and the adapters end elsewhere."""
    _, _, recorder = runs["treelora"]
    _, _, plain = runs["none"]
    assert [len(b) for b in recorder.micro_batches] == [len(b) for b in plain.micro_batches]
    assert all(torch.equal(a, b) for a, b in zip(sum(recorder.micro_batches, []), sum(plain.micro_batches, [])))
    assert recorder.penalties[: STEPS + 1] == [0.0] * (STEPS + 1)
    assert all(p > 0 for p in recorder.penalties[STEPS + 1 :])
    assert plain.penalties == [0.0] * (2 * STEPS)
    ours, theirs = recorder.task_ends, plain.task_ends
    assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0]))
    assert max((a - b).abs().max().item() for a, b in zip(ours[1], theirs[1])) > 1e-4


def test_sparse_step_changes_exactly_the_top_entries(runs):
    _, _, recorder = runs["treelora"]
    for changed, grads in recorder.updates:
        for mask, grad in zip(changed, grads):
            k = int(mask.sum())
            assert 1 <= k <= math.ceil(DENSITY * grad.numel())
            top = torch.zeros(grad.numel(), dtype=torch.bool)
            top[grad.abs().reshape(-1).topk(k).indices] = True
            assert torch.equal(mask.reshape(-1), top)


def test_equals_hooks_driven_by_hand(runs, one_thread):
    """Trainer + callback = TreeLoRA's hooks on the accumulated batch (once per optimizer step): same selections,
    bank and adapters up to fp32 rounding (micro-batch gradients are summed in another order)."""
    model, treelora, recorder = runs["treelora"]
    hand_model, method, selections = train_by_hand(CONFIGS["paper"], recorder.micro_batches)
    assert selections == recorder.selections
    assert treelora.method.tree.to_nested() == method.tree.to_nested()
    torch.testing.assert_close(treelora.method.bank.signatures, method.bank.signatures, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), hand_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_refusals_name_the_problem():
    model = peft_model()
    with pytest.raises(ValueError, match="adapter='stacked' is not supported"):
        TreeLoRACallback(model, TreeLoRAConfig.paper(adapter="stacked"))
    with pytest.raises(ValueError, match="model has no LoRA layers"):
        TreeLoRACallback(tiny_llama())
    treelora = TreeLoRACallback(model, TreeLoRAConfig.official())
    with pytest.raises(ValueError, match="unknown optimizer settings"):
        treelora.optimizer(learning_rate=1.0)
    optimizer = treelora.optimizer(lr=1e-3)
    with pytest.raises(RuntimeError, match="no task is running"):
        optimizer.step()
    with pytest.raises(ValueError, match="labels is None"):
        causal_lm_loss({"logits": torch.zeros(1, 3, VOCAB)}, None)


@pytest.mark.slow
def test_ddp_under_trainer_equals_one_process(runs, tmp_path):
    """torchrun, 2 ranks: the Trainer wraps the model in DDP (gloo), each rank takes half of every micro-batch. Every
    rank ends each task with the same state, and the run equals the 1-process Trainer run with the full micro-batch:
    same data, same selections and tree, bank and adapters equal to fp32 rounding; for the official regularizer too
    (its loss-scaled penalty is computed after DDP's average, from the loss summed across ranks)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(root / "tests" / "trainer_ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    single = {"paper": runs["treelora"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single["official"] = train_with_trainer(tmp_path / "single", CONFIGS["official"])
    finally:
        torch.set_num_threads(threads)
    for name in CONFIGS:
        ranks = [torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=False) for r in range(2)]
        _, treelora, recorder = single[name]
        assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["ddp"] == "DistributedDataParallel"
        assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
        for step, batches in enumerate(recorder.micro_batches):
            for i, batch in enumerate(batches):
                union = torch.cat([ranks[0]["micro_batches"][step][i], ranks[1]["micro_batches"][step][i]])
                assert sorted(map(tuple, union.tolist())) == sorted(map(tuple, batch.tolist()))
        assert ranks[0]["selections"] == recorder.selections
        assert ranks[0]["tree"] == treelora.method.tree.to_nested()
        torch.testing.assert_close(ranks[0]["bank"], treelora.method.bank.signatures, rtol=1e-4, atol=1e-7)
        for got, ref in zip(ranks[0]["adapters"], treelora.method.adapter_parameters()):
            torch.testing.assert_close(got, ref.detach(), rtol=1e-4, atol=1e-7)
