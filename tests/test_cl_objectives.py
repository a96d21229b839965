"""Head kinds and logit sets (treelora.cl.objectives) against hand-computed logits and losses, the frozen label head
in a run, the validation split, and the default stream and protocol arguments of `treelora run`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from treelora import cli
from treelora.cl.objectives import COSINE_SCALE, PROTOCOLS, TaskHeads, fixed_class_vectors
from treelora.cl.trainer import Trainer, TrainerConfig
from treelora.data import LabelledData, Stream, Task, validation_split, wordnet_classil
from treelora.models import load_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stream() -> Stream:
    """3 tasks over 5 classes: {0, 1}, {2, 3}, {4}."""

    def data(classes):
        return LabelledData([f"x{c}" for c in classes], torch.tensor(classes))

    tasks = [
        Task(name=f"t{i}", kind="classification", train=data(c), test=data(c), classes=c)
        for i, c in enumerate([[0, 1], [2, 3], [4]])
    ]
    return Stream(name="toy", tasks=tasks, class_names=[f"c{i}" for i in range(5)], input_kind="text")


# Unit class vectors and a feature whose cosines are exact decimals: feature (3, 4) has unit direction (0.6, 0.8).
VECTORS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.6, 0.8]])
FEATURE = torch.tensor([[3.0, 4.0]])
COSINES = [0.6, 0.8, -0.6, -0.8, 1.0]


def _ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_frozen_head_logits_and_loss_follow_the_logit_sets(protocol):
    heads = TaskHeads(_stream(), 2, protocol, head="label", class_vectors=VECTORS * 5)  # rows renormalised
    train, test = PROTOCOLS[protocol]
    assert (heads.train_logits, heads.test_logits) == (train, test)
    expected_classes = {"task": [2, 3], "seen": [0, 1, 2, 3]}
    for training, which in ((True, train), (False, test)):
        logits, classes = heads.logits(FEATURE, task=1, upto=1, training=training)
        assert classes == expected_classes[which]
        torch.testing.assert_close(logits[0], torch.tensor([COSINE_SCALE * COSINES[c] for c in classes]))
    # Label 3 of task 1 (a training row): cross-entropy over the training logit set.
    loss = heads.loss(FEATURE, torch.tensor([3]), torch.tensor([1]), upto=1)
    row = [COSINE_SCALE * COSINES[c] for c in expected_classes[train]]
    assert float(loss.detach()) == pytest.approx(_ce(row, expected_classes[train].index(3)), rel=1e-5)
    assert list(heads.parameters()) == [] and heads.heads_used([1], upto=1) == []


def test_linear_heads_task_at_training_seen_at_test():
    heads = TaskHeads(_stream(), 2, "class-il")
    with torch.no_grad():
        for k, head in enumerate(heads):
            head.weight.copy_(torch.arange(head.weight.numel(), dtype=torch.float32).view_as(head.weight) + k)
            head.bias.fill_(-k)
    # head k: W = [[k, 1 + k], [2 + k, 3 + k]] (task 2 has one row, [2, 3]), b = -k; feature (3, 4).
    train, classes = heads.logits(FEATURE, task=1, upto=1, training=True)
    assert classes == [2, 3] and train[0].tolist() == [3 * 1 + 4 * 2 - 1, 3 * 3 + 4 * 4 - 1]
    test, classes = heads.logits(FEATURE, task=1, upto=2)
    assert classes == [0, 1, 2, 3, 4]
    assert test[0].tolist() == [4.0, 18.0, 10.0, 24.0, 3 * 2 + 4 * 3 - 2]
    # Two rows of different tasks: each scored over its own task's classes (mean of the two cross-entropies).
    features = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    loss = heads.loss(features, torch.tensor([3, 0]), torch.tensor([1, 0]), upto=1)
    expected = (_ce([10.0, 24.0], 1) + _ce([0.0, 2.0], 0)) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert heads.heads_used([1, 0], upto=1) == [0, 1]
    assert TaskHeads(_stream(), 2, "class").heads_used([1], upto=2) == [0, 1, 2]


def test_fixed_head_is_orthonormal_and_the_same_whatever_the_global_seed():
    torch.manual_seed(1)
    a = fixed_class_vectors(5, 8)
    torch.manual_seed(2)
    b = fixed_class_vectors(5, 8)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.double() @ a.double().T, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    heads = TaskHeads(_stream(), 8, "class-il", head="fixed")
    torch.testing.assert_close(heads.class_vectors, a, atol=1e-6, rtol=0)
    assert not heads.class_vectors.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head": "cosine"}, "head must be one of"),
        ({"train_logits": "all"}, "train_logits must be one of"),
        ({"test_logits": "task-id"}, "test_logits must be one of"),
        ({"head": "label"}, "head='label' needs class_vectors"),
        ({"head": "fixed", "class_vectors": torch.zeros(4, 2)}, r"class_vectors must be \(5, 2\)"),
    ],
)
def test_bad_head_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskHeads(_stream(), 2, "task", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"head": "frozen"}, "head"), ({"train_logits": "every"}, "train_logits"), ({"test_logits": 1}, "test_logits")],
)
def test_bad_trainer_head_settings_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainerConfig(**kwargs)


def test_config_records_the_resolved_logit_sets():
    assert TrainerConfig(protocol="class-il").logit_sets() == ("task", "seen")
    d = TrainerConfig(protocol="class", test_logits="task").to_dict()
    assert (d["protocol"], d["train_logits"], d["test_logits"]) == ("class", "seen", "task")


# --- the frozen label head in a run -----------------------------------------------------------------------------------


def _tiny_classil():
    return wordnet_classil(train_per_class=4, test_per_class=2, seed=0)


def _label_config(**kwargs) -> TrainerConfig:
    base = dict(epochs=1, batch_size=8, lr=5e-3, max_length=16, head="label", protocol="class-il", progress=False)
    return TrainerConfig(**{**base, **kwargs})


def test_label_head_is_the_pretrained_features_of_the_descriptions_and_never_trains():
    stream = _tiny_classil()
    trainer = Trainer(stream, load_model("bert-tiny", seed=0), "seqlora", _label_config())
    reference = load_model("bert-tiny", seed=0)  # no LoRA: the pretrained features
    reference.model.eval()
    with torch.no_grad():
        texts = stream.info["class_descriptions"]
        enc = reference.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        expected = torch.nn.functional.normalize(reference.features(dict(enc)).float(), dim=-1)
    before = trainer.heads.class_vectors.clone()
    torch.testing.assert_close(before, expected, rtol=1e-5, atol=1e-6)
    assert list(trainer.heads.parameters()) == []
    result = trainer.run()
    assert torch.equal(trainer.heads.class_vectors, before)
    assert sum(result.steps) > 0 and result.metrics["fwt"] is not None  # the label head scores before training
    # The adapters did train (the forgetting goes through them).
    assert any(float(layer.lora_B.detach().abs().sum()) > 0 for layer in trainer.layers)


def test_fwt_is_not_reported_through_a_random_head():
    stream = _tiny_classil()
    for head in ("linear", "fixed"):
        config = _label_config(head=head, max_steps_per_task=1)
        result = Trainer(stream, load_model("bert-tiny", seed=0), "seqlora", config).run()
        assert result.zero_shot is not None and result.metrics["fwt"] is None and result.metrics["bwt"] is not None


def test_label_head_run_resumes_to_the_uninterrupted_result(tmp_path):
    stream = _tiny_classil()
    config = _label_config(max_steps_per_task=2)
    whole = Trainer(stream, load_model("bert-tiny", seed=0), "treelora", config).run()

    def stop(trainer, task):
        if task == 2:
            raise KeyboardInterrupt

    saved = _label_config(max_steps_per_task=2, checkpoint_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        Trainer(stream, load_model("bert-tiny", seed=0), "treelora", saved, callbacks=[stop]).run()
    resumed = Trainer(stream, load_model("bert-tiny", seed=0), "treelora", saved)
    result = resumed.run(resume=True)
    assert result.R == whole.R and result.losses[3:] == whole.losses[3:]


def test_label_head_needs_class_descriptions():
    stream = _tiny_classil()
    stream.info.pop("class_descriptions")
    with pytest.raises(ValueError, match="head='label' needs a text stream with class descriptions"):
        Trainer(stream, load_model("bert-tiny", seed=0), "seqlora", _label_config())


# --- the validation split ---------------------------------------------------------------------------------------------


def test_validation_split_is_disjoint_from_training_and_stratified():
    stream = wordnet_classil(seed=0)
    val = validation_split(stream, 0.2, seed=3)
    assert val.info["validation_fraction"] == 0.2 and val.name == "wordnet-classil-val"
    for original, task in zip(stream.tasks, val.tasks):
        pairs = lambda d: sorted(zip(d.inputs, d.labels.tolist()))  # noqa: E731
        held, kept = pairs(task.test), pairs(task.train)
        assert sorted(held + kept) == pairs(original.train)  # a partition of the training data
        assert not set(held) & set(kept)
        assert not set(held) & set(pairs(original.test))  # the test words are not used
        for c in original.classes:
            n = int((original.train.labels == c).sum())
            assert int((task.test.labels == c).sum()) == max(1, int(0.2 * n + 0.5))


# --- treelora run -----------------------------------------------------------------------------------------------------

TINY = ["--model", "bert-tiny", "--train-per-class", "4", "--test-per-class", "2", "--max-steps", "1", "--quiet"]


def _cli(capsys, *argv):
    rc = cli.main(["run", *argv, "--threads", "1"])
    return rc, *capsys.readouterr()


def test_run_with_no_arguments_is_the_class_incremental_wordnet_stream():
    args = cli.build_parser().parse_args(["run"])
    assert args.stream == "wordnet-classil" and args.model is None and args.methods == "TreeLoRA,SeqLoRA"
    defaults = cli.STREAM_DEFAULTS["wordnet-classil"]
    assert (defaults["model"], defaults["epochs"], defaults["batch_size"], defaults["lr"], defaults["max_length"]) == (
        "minilm",
        3,
        32,
        2e-3,
        16,
    )
    assert (defaults["head"], defaults["protocol"]) == ("label", "class-il")


def test_default_stream_run_records_protocol_and_the_treelora_lambda(tmp_path, capsys):
    rc, out, _ = _cli(capsys, *TINY, "--out", str(tmp_path / "a"))
    assert rc == 0 and "head label, protocol class-il" in out
    payload = json.loads((tmp_path / "a" / "results.json").read_text())
    assert payload["stream"]["name"] == "wordnet-classil" and payload["validation"] is None
    tree, seq = payload["results"]
    assert (tree["config"]["head"], tree["config"]["train_logits"], tree["config"]["test_logits"]) == (
        "label",
        "task",
        "seen",
    )
    assert tree["method_options"] == {"reg_lambda": 200.0} and seq["method_options"] == {}
    assert payload["method_defaults"] == {"treelora": {"reg_lambda": 200.0}} and payload["notes"] == {}
    # --method-option wins over the stream's default; a preset takes none of it.
    rc, _, _ = _cli(capsys, *TINY, "--methods", "TreeLoRA", "--method-option", "reg_lambda=5", "--out", str(tmp_path))
    assert rc == 0 and json.loads((tmp_path / "results.json").read_text())["results"][0]["method_options"] == {
        "reg_lambda": 5
    }
    preset = ["--methods", "TreeLoRA", "--method-option", "preset=official"]
    rc, _, _ = _cli(capsys, *TINY, *preset, "--out", str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["method_options"] == {"preset": "official"}


def test_validation_run_scores_held_out_training_data(tmp_path, capsys):
    validation = ["--methods", "SeqLoRA", "--head", "fixed", "--validation", "0.25"]
    rc, _, _ = _cli(capsys, *TINY, *validation, "--out", str(tmp_path))
    assert rc == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["validation"] == 0.25 and payload["stream"]["info"]["validation_fraction"] == 0.25
    # 4 training words per class: 1 held out (the test set), 3 left to train on.
    assert payload["stream"]["train_sizes"][0] == 12 and payload["stream"]["test_sizes"][0] == 4
    assert payload["results"][0]["metrics"]["fwt"] is None and "fixed head" in payload["notes"]["fwt"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--validation", "1.5"], "--validation must be a fraction in (0, 1), got 1.5"),
        (["--validation", "0"], "--validation must be a fraction in (0, 1)"),
        (["--stream", "split-digits", "--head", "label"], "--head label needs a stream with class descriptions"),
        (["--stream", "wordnet-instruct", "--train-logits", "seen"], "--train-logits: applies to classification"),
        (["--stream", "wordnet-instruct", "--head", "fixed"], "--head: applies to classification streams"),
    ],
)
def test_bad_protocol_arguments_exit_2_naming_the_argument(tmp_path, capsys, argv, message):
    rc, _, err = _cli(capsys, *argv, "--out", str(tmp_path))
    assert rc == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--head", "--protocol", "--train-logits", "--test-logits"])
def test_unknown_head_or_logit_set_is_refused_by_the_parser(capsys, flag):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", flag, "everything"])
    assert exc.value.code == 2 and f"argument {flag}: invalid choice" in capsys.readouterr().err
