"""LwF, experience replay and InfLoRA: each against a hand computation or a float64 reference, their options, and a
2-task run (with a resume from the checkpoint) through the trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from treelora import data
from treelora.cl import ExperienceReplay, InfLoRA, Trainer, TrainerConfig
from treelora.cl.baselines import design_adapter, lwf_distillation
from treelora.cl.registry import MethodOptionError, assign_method_options, canonical_method, method_class
from treelora.cl.trainer import TrainingObjective
from treelora.models import load_model
from treelora.nn import LoRALinear

NEW_METHODS = ["lwf", "replay", "inflora"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run faster on 1 thread than on 2 contended ones (see tests/test_cl_trainer.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _words(tasks=(0, 5), train=6, test=4):
    return data.wordnet_supersense(train_per_class=train, test_per_class=test, tasks=list(tasks))


def _config(**kw):
    base = {"epochs": 1, "batch_size": 8, "lr": 5e-3, "progress": False, "eval_batch_size": 16}
    return TrainerConfig(**{**base, **kw})


def _kl_by_hand(student, teacher, T):
    """Σ_rows Σ_c p_t (log p_t - log p_s) / rows, with softmaxes at temperature T, in Python floats."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = [v / T for v in s_row]
        zt = [v / T for v in t_row]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        total += sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))
    return total / len(student)


# --- LwF -------------------------------------------------------------------------------------------------------------


def test_lwf_distillation_matches_a_hand_computed_kl():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)]
    teacher = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)]
    T = 2.0
    per_task = T**2 * sum(_kl_by_hand(s, t, T) for s, t in zip(student, teacher))
    joint = T**2 * _kl_by_hand(torch.cat(student, 1), torch.cat(teacher, 1), T)
    assert lwf_distillation(student, teacher, T).item() == pytest.approx(per_task, rel=1e-5)
    assert lwf_distillation(student, teacher, T, joint=True).item() == pytest.approx(joint, rel=1e-5)
    assert per_task != pytest.approx(joint, rel=1e-3)  # the two readings differ on these logits
    assert lwf_distillation(teacher, teacher, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        lwf_distillation([student[0]], [teacher[1]], T)


def test_lwf_adds_nothing_at_the_first_task_and_the_kl_to_its_snapshot_later():
    trainer = Trainer(_words(), load_model("bert-tiny"), "lwf", _config(), method_options={"lwf_lambda": 0.7})
    method = trainer.method
    batch_items = [(0, i) for i in range(5)]
    method.begin_task(0, 1, 1)
    objective = TrainingObjective(trainer, [0], 0, 0)
    trainer.model.eval()
    _, extra = method.training_loss(objective.batch(batch_items), objective)
    assert extra is None and method.teacher is None  # nothing to distil at the first task

    trainer.train_task(0)
    method.begin_task(1, 1, 1)
    objective = TrainingObjective(trainer, [1], 1, 1)
    trainer.model.eval()  # no dropout, so the student with the teacher's values is the teacher
    items = [(1, i) for i in range(6)]
    _, extra = method.training_loss(objective.batch(items), objective)
    assert extra.item() == pytest.approx(0.0, abs=1e-6)  # student == teacher right after the snapshot

    with torch.no_grad():  # as if task 1 had trained: move the adapters and the old head
        for p in method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = objective.batch(items)
    with torch.no_grad():  # the reference first: copying values in place would invalidate the autograd graph
        student = trainer.heads[0](trainer.loaded.features(batch)).double()
        current = [p.detach().clone() for p in method.parameters()]
        for p, t in zip(method.parameters(), method.teacher):
            p.copy_(t)
        teacher = trainer.heads[0](trainer.loaded.features(batch)).double()
        for p, c in zip(method.parameters(), current):
            p.copy_(c)
    _, extra = method.training_loss(batch, objective)
    expected = 0.7 * 2.0**2 * _kl_by_hand(student, teacher, 2.0)
    assert expected > 1e-4
    assert extra.item() == pytest.approx(expected, rel=1e-4)
    extra.backward()  # the gradient reaches the adapters, not the teacher's copies
    assert all(t.grad is None for t in method.teacher)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.adapter_parameters())


def test_lwf_refuses_an_instruction_stream():
    stream = data.wordnet_instruct(train_per_task=4, test_per_task=2, tasks=["supersense", "antonym"])
    trainer = Trainer(stream, load_model("llama-tiny"), "lwf", _config(max_steps_per_task=1, eval_zero_shot=False))
    with pytest.raises(ValueError, match="LwF .*classification stream"):
        trainer.run()


# --- experience replay -----------------------------------------------------------------------------------------------


class _Recorder:
    """An objective that records which items each loss saw (no model)."""

    kind, task = "classification", 1

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size, self.seen = rank, world_size, []

    def batch(self, items):
        return {"items": list(items)}

    def loss(self, batch, logits_of=()):
        self.seen.append(batch["items"])
        return torch.zeros(()), []

    def train_size(self, task):
        return 50


def _replay(**kw):
    return ExperienceReplay([LoRALinear(nn.Linear(4, 3), r=2)], **kw)


def test_replay_buffer_is_balanced_deterministic_and_the_same_on_every_rank():
    method = _replay(replay_per_task=7, replay_batch_size=4, replay_seed=3)
    for task, size in enumerate((50, 5, 30)):
        method.begin_task(task, 1, 1)
        objective = _Recorder()
        objective.train_size = lambda t, size=size: size
        method.prepare_task(objective)
        method.end_task()
    per_task = [sum(1 for t, _ in method.buffer if t == k) for k in range(3)]
    assert per_task == [7, 5, 7]  # a task smaller than the quota contributes all of its examples
    assert len(set(method.buffer)) == len(method.buffer)
    assert sorted(i for t, i in method.buffer if t == 1) == list(range(5))
    assert all(0 <= i < 30 for t, i in method.buffer if t == 2)

    again = _replay(replay_per_task=7, replay_batch_size=4, replay_seed=3)
    for task, size in enumerate((50, 5, 30)):
        again.buffer.extend(again.select(task, size))
    assert again.buffer == method.buffer  # a second run (any data order, any rank) keeps the same examples
    other_seed = _replay(replay_per_task=7, replay_seed=4)
    assert other_seed.select(0, 50) != method.select(0, 50)

    # every rank replays the same whole minibatch
    method.begin_task(3, 1, 1)
    single, ranks = _Recorder(), [_Recorder(0, 2), _Recorder(1, 2)]
    method.training_loss({"items": [(3, 0)]}, single)
    for r in ranks:
        method.training_loss({"items": [(3, 0)]}, r)
    replayed = single.seen[1]
    assert len(replayed) == 4 and set(replayed) <= set(method.buffer)
    assert ranks[0].seen[1] == replayed and ranks[1].seen[1] == replayed
    method.global_step += 1
    assert method.replay_items() != replayed  # a fresh minibatch every step


def test_replay_adds_the_weighted_loss_of_the_replayed_rows():
    trainer = Trainer(_words(), load_model("bert-tiny"), "replay", _config(), method_options={"replay_weight": 0.5})
    trainer.train_task(0)
    method = trainer.method
    assert len(method.buffer) == 20 and {t for t, _ in method.buffer} == {0}
    method.begin_task(1, 1, 1)
    trainer.model.eval()
    objective = TrainingObjective(trainer, [1], 1, 1)
    batch = objective.batch([(1, 0), (1, 1)])
    loss, extra = method.training_loss(batch, objective)
    replay_batch = objective.batch(method.replay_items())
    expected = 0.5 * nn.functional.cross_entropy(
        trainer.heads[0](trainer.loaded.features(replay_batch)), replay_batch["labels"]
    )
    torch.testing.assert_close(extra, expected)  # task protocol: each replayed row scored by its own task's head


# --- InfLoRA ---------------------------------------------------------------------------------------------------------


class _Inputs:
    """An objective whose batches are fixed input matrices run through standalone LoRA layers."""

    kind, rank, world_size = "classification", 0, 1

    def __init__(self, layers, inputs):
        self.layers, self.inputs, self.task = layers, inputs, 0

    def train_batches(self):
        return [[(self.task, i)] for i in range(len(self.inputs))]

    def batch(self, items):
        return self.inputs[items[0][1]]

    def loss(self, batch, logits_of=()):
        return sum(layer(batch).sum() for layer in self.layers), []


def _low_rank_inputs(g, dims, n=40, in_features=16):
    """Rows in the span of the coordinate axes ``dims`` (plus nothing else)."""
    x = torch.zeros(n, in_features)
    x[:, dims] = torch.randn(n, len(dims), generator=g)
    return [x[:20], x[20:]]


def test_design_adapter_takes_the_top_directions_and_grows_the_basis_by_energy():
    cov = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    A, basis = design_adapter(cov, torch.zeros(6, 0, dtype=torch.float64), r=2, threshold=0.9)
    torch.testing.assert_close(A.abs(), torch.eye(6, dtype=torch.float64)[:2])
    assert basis.shape == (6, 2)  # 10 + 5 = 15 >= 0.9 x 16.5 = 14.85, 10 alone is not
    A2, basis2 = design_adapter(cov, basis, r=2, threshold=0.99)
    torch.testing.assert_close(A2.abs(), torch.eye(6, dtype=torch.float64)[2:4])
    assert basis2.shape == (6, 4)  # 16.5 x 0.99 = 16.3 needs 1 and 0.5 too
    _, capped = design_adapter(torch.eye(6, dtype=torch.float64), basis2, r=2, threshold=1.0)
    assert capped.shape == (6, 4)  # never more than in - r columns
    torch.testing.assert_close(capped.T @ capped, torch.eye(4, dtype=torch.float64))


def test_inflora_adapters_are_orthogonal_to_old_inputs_train_b_only_and_keep_the_function():
    g = torch.Generator().manual_seed(0)
    layers = [LoRALinear(nn.Linear(16, 6), r=2), LoRALinear(nn.Linear(16, 5), r=3)]
    method = InfLoRA(layers, inflora_threshold=0.99)
    assert [p for p in method.parameters()] == [layers[0].lora_B, layers[1].lora_B]

    method.begin_task(0, 1, 1)
    task0 = _low_rank_inputs(g, [0, 1, 2, 3])
    method.prepare_task(_Inputs(layers, task0))
    for layer, basis in zip(layers, method.bases):
        A = layer.lora_A.detach().double()
        torch.testing.assert_close(A @ A.T, torch.eye(layer.r, dtype=torch.float64), atol=1e-6, rtol=0)
        assert A[:, 4:].abs().max() < 1e-6  # the rows lie in task 0's input span
        assert 1 <= basis.shape[1] <= 4 and basis[4:].abs().max() < 1e-9

    A_before = [layer.lora_A.detach().clone() for layer in layers]
    x = torch.randn(7, 16, generator=g)
    for layer in layers:  # one optimizer step on B only
        layer(x).square().sum().backward()
        assert layer.lora_A.grad is None
    method.step()
    for layer, A in zip(layers, A_before):
        assert torch.equal(layer.lora_A, A) and layer.lora_B.abs().sum() > 0

    with torch.no_grad():
        before = [layer(x).double() for layer in layers]
    old_bases = [b.clone() for b in method.bases]
    method.begin_task(1, 1, 1)
    task1 = _low_rank_inputs(g, [2, 3, 6, 7, 8, 9])
    objective = _Inputs(layers, task1)
    objective.task = 1
    method.prepare_task(objective)
    with torch.no_grad():
        after = [layer(x).double() for layer in layers]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the merged delta keeps the function
    for layer, basis, A in zip(layers, old_bases, A_before):
        assert layer.frozen_rank == layer.r and torch.equal(layer.frozen_A, A)
        new_A = layer.lora_A.detach().double()
        assert (new_A @ basis).abs().max() < 1e-6  # orthogonal to the stored old subspace
        assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))

    state = method.state_dict()
    fresh = InfLoRA([LoRALinear(nn.Linear(16, 6), r=2), LoRALinear(nn.Linear(16, 5), r=3)], inflora_threshold=0.99)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.bases, method.bases):
        assert torch.equal(a, b)


def test_inflora_refuses_layers_without_a_frozen_stack():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A, self.lora_B = nn.Parameter(torch.zeros(2, 4)), nn.Parameter(torch.zeros(3, 2))

    with pytest.raises(TypeError, match="layers\\[0\\].*InfLoRA needs treelora.nn.LoRALinear"):
        InfLoRA([Plain()])


# --- registry and options --------------------------------------------------------------------------------------------


def test_registry_names_and_option_errors():
    names = [canonical_method(n) for n in ("LwF", "Replay", "InfLoRA", "inf-lora")]
    assert names == ["lwf", "replay", "inflora", "inflora"]
    assert method_class("replay") is ExperienceReplay
    for name, options, error, match in [
        ("lwf", {"lwf_temperature": 0}, ValueError, "lwf_temperature"),
        ("lwf", {"lwf_softmax": "global"}, ValueError, "lwf_softmax"),
        ("lwf", {"lwf_lambda": "1"}, TypeError, "lwf_lambda"),
        ("replay", {"replay_per_task": 2.5}, TypeError, "replay_per_task"),
        ("replay", {"replay_batch_size": 0}, ValueError, "replay_batch_size"),
        ("replay", {"replay_weight": -1.0}, ValueError, "replay_weight"),
        ("inflora", {"inflora_threshold": 1.5}, ValueError, "inflora_threshold"),
        ("inflora", {"inflora_threshold": 0.0}, ValueError, "inflora_threshold"),
        ("inflora", {"inflora_batches": 0}, ValueError, "inflora_batches"),
        ("inflora", {"lwf_lambda": 1.0}, ValueError, "InfLoRA has no option 'lwf_lambda'"),
    ]:
        with pytest.raises(error, match=match):
            method_class(name).check_options(options)
    assigned = assign_method_options(["seqlora", "lwf", "replay"], {"replay_per_task": 3, "lwf_lambda": 2.0})
    assert assigned == {"seqlora": {}, "lwf": {"lwf_lambda": 2.0}, "replay": {"replay_per_task": 3}}
    with pytest.raises(MethodOptionError, match="inflora_threshold.*InfLoRA"):
        assign_method_options(["lwf"], {"inflora_threshold": 0.9})


# --- through the trainer ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", NEW_METHODS)
def test_two_task_run_records_options_and_resumes_to_the_same_result(tmp_path, method):
    stream = _words()
    cfg = {"max_steps_per_task": 2}
    full = Trainer(stream, load_model("bert-tiny"), method, _config(checkpoint_dir=str(tmp_path / "a"), **cfg))
    reference = full.run()
    assert reference.steps == [2, 2] and 0.0 <= reference.metrics["acc"] <= 1.0
    assert reference.method_options == full.method.options() and reference.method_options

    def stop(trainer, k):
        if k == 0:
            raise _Stop

    crashed = Trainer(
        stream, load_model("bert-tiny"), method, _config(checkpoint_dir=str(tmp_path / "b"), **cfg), callbacks=[stop]
    )
    with pytest.raises(_Stop):
        crashed.run()
    torch.manual_seed(12345)
    resumed = Trainer(stream, load_model("bert-tiny"), method, _config(checkpoint_dir=str(tmp_path / "b"), **cfg))
    result = resumed.run(resume=True)
    np.testing.assert_array_equal(result.matrix(), reference.matrix())
    assert result.losses == reference.losses
    for (ka, a), (kb, b) in zip(full.adapter_state().items(), resumed.adapter_state().items()):
        assert ka == kb and torch.equal(a, b), ka


def test_inflora_trains_through_the_trainer_with_a_stack_per_task():
    trainer = Trainer(_words(tasks=(0, 5, 1)), load_model("bert-tiny"), "inflora", _config(max_steps_per_task=2))
    trainer.run()
    for layer, basis in zip(trainer.layers, trainer.method.bases):
        assert layer.frozen_rank == 2 * layer.r and not layer.lora_A.requires_grad
        assert 0 < basis.shape[1] <= layer.in_features - layer.r  # three tasks' inputs, within the bound
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64))
