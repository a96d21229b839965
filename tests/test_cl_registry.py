"""The method registry and the method interface: names and labels, option checks before any model exists, a new
method added with one registration, and SeqLoRA as a method of its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from treelora import data
from treelora.cl import (
    EWC,
    ContinualMethod,
    ExperienceReplay,
    InfLoRA,
    JointTraining,
    LwF,
    MethodOptionError,
    OLoRA,
    OptimizerConfig,
    SeqLoRA,
    Trainer,
    TrainerConfig,
    TreeLoRA,
    assign_method_options,
    canonical_method,
    method_class,
    method_label,
    register_method,
    registered_methods,
    registry,
)
from treelora.models import load_model
from treelora.nn import LoRALinear


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run faster on 1 thread than on 2 contended ones (see tests/test_cl_trainer.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry for tests that register methods, restored afterwards."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


def test_builtin_methods_in_listing_order_with_labels():
    assert registered_methods() == ["treelora", "seqlora", "olora", "ewc", "joint", "lwf", "replay", "inflora"]
    labels = ["TreeLoRA", "SeqLoRA", "O-LoRA", "EWC", "Joint", "LwF", "Replay", "InfLoRA"]
    assert [method_label(m) for m in registered_methods()] == labels
    classes = [method_class(m) for m in registered_methods()]
    assert classes == [TreeLoRA, SeqLoRA, OLoRA, EWC, JointTraining, LwF, ExperienceReplay, InfLoRA]
    assert method_label("my-callable") == "my-callable"  # unregistered names are shown as they are


@pytest.mark.parametrize("spelling", ["O-LoRA", "olora", "OLoRA", "o_lora", " olora "])
def test_names_and_labels_in_any_spelling(spelling):
    assert canonical_method(spelling) == "olora"


def test_unknown_and_mistyped_names():
    choices = "TreeLoRA, SeqLoRA, O-LoRA, EWC, Joint, LwF, Replay, InfLoRA"
    with pytest.raises(ValueError, match=f"unknown method 'GEM': choose from {choices}"):
        canonical_method("GEM")
    with pytest.raises(TypeError, match="method name must be a string"):
        canonical_method(3)


def test_options_go_to_the_methods_that_have_them():
    assigned = assign_method_options(["TreeLoRA", "O-LoRA", "seqlora"], {"lambda_orth": 0.3, "reg_lambda": 1.0})
    assert assigned == {"treelora": {"reg_lambda": 1.0}, "olora": {"lambda_orth": 0.3}, "seqlora": {}}


@pytest.mark.parametrize(
    "methods, options, error, match",
    [
        (
            ["treelora", "seqlora"],
            {"lambda_orth": 0.3},
            MethodOptionError,
            r"method option 'lambda_orth' does not apply to TreeLoRA or SeqLoRA \(it is an option of O-LoRA\)",
        ),
        (["seqlora"], {"reg_lambda": 1.0}, MethodOptionError, "'reg_lambda' does not apply to SeqLoRA"),
        (["ewc"], {"lamda": 1.0}, MethodOptionError, "'lamda' .* not an option of any method"),
        (["treelora"], {"reg_lambda": -1.0}, ValueError, r"TreeLoRAConfig\.reg_lambda must be in \[0, inf\)"),
        (["treelora"], {"reg_lambda": "high"}, TypeError, r"TreeLoRAConfig\.reg_lambda must be a number"),
        (["treelora"], {"preset": "released"}, ValueError, "preset must be one of"),
        (["olora"], {"lambda_orth": -0.5}, ValueError, "lambda_orth must be in"),
        (["ewc"], {"gamma": 2.0}, ValueError, r"gamma must be in \[0, 1\]"),
        (["ewc"], {"ewc_lambda": True}, TypeError, "ewc_lambda must be a number"),
    ],
)
def test_bad_options_fail_with_their_names(methods, options, error, match):
    with pytest.raises(error, match=match):
        assign_method_options(methods, options)


def test_trainer_refuses_an_option_before_touching_the_model():
    class Untouchable:
        """A stand-in model that fails on any use: the option check must come first."""

        kind, name = "encoder", "untouchable"

        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) before the options were checked")

    stream = data.wordnet_supersense(train_per_class=2, test_per_class=2, tasks=[0])
    with pytest.raises(ValueError, match="SeqLoRA has no option 'lambda_orth'"):
        Trainer(stream, Untouchable(), "seqlora", TrainerConfig(progress=False), method_options={"lambda_orth": 1.0})


def test_continual_method_is_an_interface():
    layers = [LoRALinear(nn.Linear(4, 3), r=2)]
    with pytest.raises(TypeError, match="abstract"):
        ContinualMethod(layers)

    class Nameless(SeqLoRA):
        name = None

    with pytest.raises(TypeError, match="must set the class attributes name and label"):
        Nameless(layers)


def test_seqlora_step_is_adamw_and_moments_carry_over_tasks():
    """Two tasks of SeqLoRA steps against torch.optim.AdamW on copies of the same parameters."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 4), r=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    head = nn.Linear(4, 2)
    ref_params = [p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, *head.parameters())]
    opt = OptimizerConfig(lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    method = SeqLoRA([layer], opt)
    method.add_parameters(list(head.parameters()))
    reference = torch.optim.AdamW(ref_params, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    x = torch.randn(6, 5)
    for task in range(2):
        method.begin_task(task, steps_per_epoch=2, epochs=1)
        for _ in range(2):
            loss = head(layer(x)).square().mean()
            assert method.before_backward(loss) is loss
            loss.backward()
            method.step()
            a, b, w, bias = ref_params
            base = layer.base
            ref_loss = ((x @ base.weight.T + base.bias + layer.scaling * (x @ a.T) @ b.T) @ w.T + bias).square().mean()
            ref_loss.backward()
            reference.step()
            reference.zero_grad()
        method.end_task()
    for got, want in zip((layer.lora_A, layer.lora_B, *head.parameters()), ref_params):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert method.global_step == 4 and method.step_in_task == 2 and all(p.grad is None for p in method.parameters())


def test_a_new_method_is_one_registration(scratch_registry):
    calls = []

    @register_method
    class Recorder(SeqLoRA):
        """Sequential fine-tuning that records the hooks it receives and has one option."""

        name, label = "recorder", "Recorder-LoRA"
        option_help = {"tag": "a label recorded with every hook"}

        @classmethod
        def check_options(cls, options):
            super().check_options(options)
            if not isinstance(options.get("tag", ""), str):
                raise TypeError("tag must be a string")

        def __init__(self, layers, optimizer=None, tag=""):
            super().__init__(layers, optimizer)
            self.tag = tag

        def begin_task(self, task_id, steps_per_epoch, epochs):
            super().begin_task(task_id, steps_per_epoch, epochs)
            calls.append((self.tag, "begin_task", task_id))

        def end_task(self):
            calls.append((self.tag, "end_task", self.task_id))

    assert canonical_method("Recorder-LoRA") == "recorder" and "recorder" in registered_methods()
    with pytest.raises(ValueError, match="taken by Recorder"):
        register_method(type("Other", (SeqLoRA,), {"name": "recorder", "label": "Other"}))
    assert assign_method_options(["recorder", "olora"], {"tag": "x"}) == {"recorder": {"tag": "x"}, "olora": {}}

    stream = data.wordnet_supersense(train_per_class=2, test_per_class=2, tasks=[0, 5])
    cfg = TrainerConfig(epochs=1, batch_size=4, progress=False)
    result = Trainer(stream, load_model("bert-tiny"), "Recorder-LoRA", cfg, method_options={"tag": "x"}).run()
    assert result.method == "recorder" and result.method_options == {"tag": "x"} and result.steps == [2, 2]
    assert calls == [("x", "begin_task", 0), ("x", "end_task", 0), ("x", "begin_task", 1), ("x", "end_task", 1)]


def test_registration_refuses_what_is_not_a_method(scratch_registry):
    with pytest.raises(TypeError, match="ContinualMethod subclass"):
        register_method(nn.Linear)
    with pytest.raises(ValueError, match="lower case"):
        register_method(type("Loud", (SeqLoRA,), {"name": "Loud-Method", "label": "Loud"}))
