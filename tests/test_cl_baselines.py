"""Baselines: each method's loss against a hand computation, and its task-boundary behaviour on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from treelora import data
from treelora.cl import EWC, JointTraining, OLoRA, OptimizerConfig, SeqLoRA, Trainer, TrainerConfig
from treelora.models import load_model
from treelora.nn import LoRALinear


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run faster on 1 thread than on 2 contended ones (see tests/test_cl_trainer.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layers(r=3, sizes=((7, 5), (4, 6))):
    return [LoRALinear(nn.Linear(i, o), r=r) for i, o in sizes]


def _train_b(layers):
    """Give every B non-zero values, as after training (a fresh B is zero)."""
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_()


# --- O-LoRA ----------------------------------------------------------------------------------------------------------


def test_olora_orthogonality_loss_matches_a_hand_computation():
    layers = _layers()
    method = OLoRA(layers, lambda_orth=0.5)
    snapshots = []  # the A of each finished task, per layer
    for task in range(3):
        method.begin_task(task, steps_per_epoch=1, epochs=1)
        with torch.no_grad():
            for layer in layers:
                layer.lora_A.normal_()
        snapshots.append([layer.lora_A.detach().double().clone() for layer in layers])
    expected = torch.zeros((), dtype=torch.float64)
    for l, layer in enumerate(layers):
        current = layer.lora_A.detach().double()
        for old in snapshots[:-1]:
            for a in range(old[l].shape[0]):  # |<A_i row a, A_t row b>| summed over all row pairs
                for b in range(current.shape[0]):
                    expected += (old[l][a] @ current[b]).abs()
    got = method.orthogonality_loss()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    loss = torch.tensor(1.25, requires_grad=True)
    torch.testing.assert_close(method.before_backward(loss).double(), 1.25 + 0.5 * expected, rtol=1e-5, atol=1e-6)


def test_olora_gradient_flows_to_the_new_adapter_only():
    layers = _layers()
    method = OLoRA(layers)
    method.begin_task(0, 1, 1)
    _train_b(layers)
    method.begin_task(1, 1, 1)
    method.orthogonality_loss().backward()
    for layer in layers:
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
        assert not layer.frozen_A.requires_grad
        expected = torch.sign(layer.frozen_A @ layer.lora_A.T).T @ layer.frozen_A
        torch.testing.assert_close(layer.lora_A.grad, expected)


def test_olora_pushes_a_new_adapter_per_task_without_changing_the_output():
    layers = _layers(r=2)
    method = OLoRA(layers)
    x = torch.randn(3, 7)
    method.begin_task(0, 1, 1)
    assert layers[0].frozen_rank == 0
    _train_b(layers)
    before = layers[0](x)
    method._moments[id(layers[0].lora_A)] = (torch.ones(1), torch.ones(1))
    method.begin_task(1, 1, 1)
    assert [layer.frozen_rank for layer in layers] == [2, 2]
    assert not method._moments, "a fresh adapter starts with fresh optimizer moments"
    torch.testing.assert_close(layers[0](x), before)
    method.begin_task(2, 1, 1)
    assert layers[1].frozen_rank == 4 and float(layers[1].lora_B.detach().abs().sum()) == 0.0


def test_olora_l2_term_and_bad_arguments():
    layers = _layers()
    method = OLoRA(layers, lambda_orth=0.0, lambda_l2=0.1)
    method.begin_task(0, 1, 1)
    _train_b(layers)
    expected = sum(layer.lora_A.detach().square().sum() + layer.lora_B.detach().square().sum() for layer in layers)
    loss = torch.tensor(0.0)
    torch.testing.assert_close(method.before_backward(loss), 0.1 * expected)
    with pytest.raises(ValueError, match="lambda_orth"):
        OLoRA(layers, lambda_orth=-1.0)
    with pytest.raises(TypeError, match="treelora.nn.LoRALinear"):
        OLoRA([nn.Linear(2, 2)])


# --- EWC -------------------------------------------------------------------------------------------------------------


def _fake_step(method, grads):
    for p, g in zip(method.adapter_parameters(), grads):
        p.grad = g.clone()
    method.after_backward()
    for p in method.adapter_parameters():
        p.grad = None


def test_ewc_fisher_is_the_normalised_mean_squared_gradient_of_the_last_epoch():
    layers = _layers()
    method = EWC(layers, ewc_lambda=2.0)
    params = method.adapter_parameters()
    g = torch.Generator().manual_seed(1)
    method.begin_task(0, steps_per_epoch=2, epochs=2)
    method.begin_epoch(0)
    _fake_step(method, [torch.randn(p.shape, generator=g) * 100 for p in params])  # first epoch: ignored
    method.begin_epoch(1)
    last = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2)]
    for grads in last:
        _fake_step(method, grads)
    method.end_task()
    raw = [(a.double().square() + b.double().square()) / 2 for a, b in zip(*last)]
    mean = torch.cat([r.flatten() for r in raw]).mean()
    for got, want in zip(method.fisher, raw):
        torch.testing.assert_close(got.double(), want / mean, rtol=1e-5, atol=1e-7)
    for anchor, p in zip(method.anchor, params):
        assert torch.equal(anchor, p.detach())

    # the penalty on the next task: (lambda / 2) sum F (theta - theta*)^2
    method.begin_task(1, 1, 1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    expected = sum(
        (f.double() * (p.detach().double() - a.double()).square()).sum()
        for f, p, a in zip(method.fisher, params, method.anchor)
    )
    torch.testing.assert_close(method.penalty().double(), expected, rtol=1e-5, atol=1e-8)
    loss = torch.tensor(0.75)
    torch.testing.assert_close(method.before_backward(loss).double(), 0.75 + 0.5 * 2.0 * expected, rtol=1e-5, atol=1e-8)


def test_ewc_running_fisher_decays_with_gamma():
    layers = _layers()
    method = EWC(layers, gamma=0.5)
    params = method.adapter_parameters()
    fishers = []
    for task in range(2):
        method.begin_task(task, 1, 1)
        _fake_step(method, [torch.full(p.shape, float(task + 1)) * (i + 1) for i, p in enumerate(params)])
        method.end_task()
        fishers.append([f.clone() for f in method.fisher])
    # each task's normalised Fisher is the same pattern (gradients scale by a constant), so F = 0.5 F_0 + F_1
    for f0, f1 in zip(*fishers):
        torch.testing.assert_close(f1, 1.5 * f0)
    assert float(EWC(layers).penalty().detach()) == 0.0
    with pytest.raises(ValueError, match="gamma"):
        EWC(layers, gamma=2.0)


# --- SeqLoRA and joint training --------------------------------------------------------------------------------------


def test_seqlora_adds_nothing_to_the_loss_and_joint_is_flagged():
    layers = _layers()
    seq = SeqLoRA(layers, OptimizerConfig(lr=0.1))
    loss = torch.tensor(0.3)
    assert seq.before_backward(loss) is loss
    assert JointTraining(layers).joint and not getattr(seq, "joint", False)


# --- each method's total loss on a tiny model ------------------------------------------------------------------------


def _tiny_trainer(method, **options):
    stream = data.wordnet_supersense(train_per_class=4, test_per_class=2, tasks=[0, 5])
    cfg = TrainerConfig(epochs=1, batch_size=8, lr=5e-3, progress=False)
    return Trainer(stream, load_model("bert-tiny"), method, cfg, method_options=options)


@pytest.mark.parametrize(
    "method, options", [("olora", {"lambda_orth": 0.7}), ("ewc", {"ewc_lambda": 50.0}), ("seqlora", {})]
)
def test_method_loss_on_a_tiny_model_after_the_first_task(method, options):
    trainer = _tiny_trainer(method, **options)
    trainer.train_task(0, [0], "task 1")
    trainer.method.begin_task(1, 1, 1)
    m = trainer.method
    if method == "ewc":
        with torch.no_grad():  # move the adapter off its anchor so that the penalty is not zero
            for p in m.adapter_parameters():
                p.add_(0.01)
    trainer.model.eval()
    batch = trainer.batches.classification([(1, i) for i in range(8)], "train")
    task_loss = trainer.heads.loss(trainer.loaded.features(batch), batch["labels"], batch["task"], 1)
    total = m.before_backward(task_loss)
    with torch.no_grad():
        if method == "olora":
            assert all(layer.frozen_rank == 8 for layer in trainer.layers)
            extra = 0.7 * sum((layer.frozen_A @ layer.lora_A.T).abs().sum() for layer in trainer.layers)
        elif method == "ewc":
            extra = 25.0 * sum(
                (f * (p - a).square()).sum() for f, p, a in zip(m.fisher, m.adapter_parameters(), m.anchor)
            )
        else:
            extra = torch.zeros(())
    assert (float(extra) > 0) == (method != "seqlora")
    torch.testing.assert_close(total.detach(), (task_loss + extra).detach(), rtol=1e-5, atol=1e-6)
    total.backward()
    assert all(p.grad is not None for p in trainer.method.adapter_parameters())
