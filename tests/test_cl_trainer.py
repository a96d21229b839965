"""The continual-learning trainer on tiny models built from configs: protocols, scoring, checkpoints and resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from treelora import data
from treelora.cl.objectives import causal_lm_loss
from treelora.cl.progress import Progress
from treelora.cl.trainer import Trainer, TrainerConfig, lr_factor
from treelora.models import load_model

METHODS = ["seqlora", "olora", "ewc", "treelora"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are dominated by per-op overhead: 30 vit-tiny steps took 0.19 s on 1 thread and 6 s on 2 threads of
    # a shared 2-core machine (OpenMP threads waiting on each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _words(tasks=(0, 5, 1), train=6, test=4):
    return data.wordnet_supersense(train_per_class=train, test_per_class=test, tasks=list(tasks))


def _config(**kw):
    base = {"epochs": 2, "batch_size": 8, "lr": 5e-3, "progress": False, "eval_batch_size": 16}
    return TrainerConfig(**{**base, **kw})


def _trainer(method="seqlora", stream=None, model="bert-tiny", **kw):
    return Trainer(stream or _words(), load_model(model), method, _config(**kw))


def test_task_incremental_run_fills_the_lower_triangle_and_the_next_task():
    result = _trainer().run()
    R = result.matrix()
    n = R.shape[0]
    for i in range(n):
        for j in range(n):
            assert np.isnan(R[i, j]) == (j > i + 1), (i, j)
    assert len(result.zero_shot) == n and result.steps == [6, 6, 6]  # 24 words, batch 8, 2 epochs
    assert set(result.metrics) >= {"acc", "bwt", "bwt_gem", "bwt_official", "forgetting", "fwt"}
    assert result.metrics["acc"] == pytest.approx(R[-1].mean())
    assert result.peak_memory_bytes > 0 and len(result.train_seconds) == n and len(result.losses[0]) == 2


def test_class_incremental_evaluation_lets_every_seen_class_compete():
    trainer = _trainer(protocol="class")
    result = trainer.run()
    stream = trainer.stream
    test = stream.tasks[0].test
    with torch.no_grad():
        trainer.model.eval()
        batch = trainer.batches.classification([(0, i) for i in range(len(test))], "test")
        features = trainer.loaded.features(batch)
        logits = torch.cat([trainer.heads[k](features) for k in range(len(stream))], dim=1)
        classes = torch.tensor([c for t in stream.tasks for c in t.classes])
        expected = (classes[logits.argmax(1)] == test.labels).float().mean().item()
    assert result.R[-1][0] == pytest.approx(expected)


def test_causal_loss_is_the_cross_entropy_of_the_answer_tokens_only():
    stream = data.wordnet_instruct(train_per_task=4, test_per_task=2, tasks=["antonym"])
    trainer = _trainer(stream=stream, model="llama-tiny", max_length=512)  # byte tokens: no prompt is cut
    items = [(0, 0), (0, 1)]
    batch = trainer.batches.instruct(items, "train")
    loss = causal_lm_loss(trainer.model, batch)
    tok = trainer.loaded.tokenizer
    total, count = 0.0, 0
    for _, i in items:
        item = stream.tasks[0].train[i]
        prompt = tok.encode(item["prompt"])
        answer = tok.encode(" " + item["answer"]) + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        logits = trainer.model(input_ids=ids).logits[0].double()
        for k in range(len(answer)):
            total += F.cross_entropy(logits[len(prompt) + k - 1], torch.tensor(answer[k]), reduction="sum").item()
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_multiple_choice_scores_match_unbatched_log_likelihoods():
    stream = data.wordnet_instruct(train_per_task=2, test_per_task=3, tasks=["hypernym"])
    # batches of 5 sequences cut across questions; byte tokens and max_length 512: no prompt is cut
    trainer = _trainer(stream=stream, model="llama-tiny", eval_batch_size=5, max_length=512)
    items = stream.tasks[0].test
    scores = trainer.evaluator.option_scores(items)
    tok = trainer.loaded.tokenizer
    for item, got in zip(items, scores):
        expected = []
        for option in item["options"]:
            prompt, answer = tok.encode(item["prompt"]), tok.encode(" " + option)
            with torch.no_grad():
                logp = trainer.model(input_ids=torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
            expected.append(sum(logp[len(prompt) + k - 1, a].item() for k, a in enumerate(answer)))
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    accuracy = sum(i["options"][int(s.argmax())] == i["answer"] for i, s in zip(items, scores)) / len(items)
    assert trainer.evaluate(0, 0) == pytest.approx(accuracy)


def test_instruct_stream_trains_a_causal_model():
    stream = data.wordnet_instruct(train_per_task=8, test_per_task=3, tasks=["supersense", "antonym"])
    result = _trainer(stream=stream, model="llama-tiny", epochs=1, max_steps_per_task=2).run()
    assert result.steps == [1, 1] and result.R[1][0] is not None and result.R[0][1] is not None


def test_image_stream_on_a_tiny_vit():
    digits = data.split_digits(classes_per_task=5)
    result = _trainer(stream=digits, model="vit-tiny", epochs=1, max_steps_per_task=3).run()
    assert result.steps == [3, 3] and 0.0 <= result.metrics["acc"] <= 1.0


def test_joint_training_trains_once_on_every_task():
    trainer = _trainer("joint", epochs=1)
    result = trainer.run()
    assert result.steps == [9]  # 3 tasks x 24 words, batch 8
    assert all(v is None for row in result.R[:-1] for v in row) and all(v is not None for v in result.R[-1])
    assert result.metrics["acc"] == pytest.approx(np.mean(result.R[-1])) and result.metrics["bwt"] is None


def test_max_steps_and_schedule():
    trainer = _trainer(epochs=3, max_steps_per_task=4, schedule="linear", warmup_ratio=0.25)
    assert [lr_factor(s, 4, "linear", 0.25) for s in range(4)] == pytest.approx([0.5, 1.0, 2 / 3, 1 / 3])
    assert trainer.run().steps == [4, 4, 4]


class _Stop(Exception):
    pass


def _stop_after(task):
    def callback(trainer, k):
        if k == task:
            raise _Stop

    return callback


@pytest.mark.parametrize("method", METHODS)
def test_resume_after_a_crash_reaches_the_same_results(tmp_path, method):
    """A run stopped after task 1 and resumed from its checkpoint ends with the same accuracy matrix and adapters as
    an uninterrupted run (dropout on, so the saved RNG state matters)."""
    stream = _words(tasks=(0, 5, 1, 6), train=4)
    kw = {"lora_dropout": 0.1, "epochs": 1}

    full = Trainer(stream, load_model("bert-tiny"), method, _config(checkpoint_dir=str(tmp_path / "a"), **kw))
    reference = full.run()

    crashed = Trainer(
        stream,
        load_model("bert-tiny"),
        method,
        _config(checkpoint_dir=str(tmp_path / "b"), **kw),
        callbacks=[_stop_after(1)],
    )
    with pytest.raises(_Stop):
        crashed.run()
    torch.manual_seed(12345)  # a new process starts with another RNG state
    resumed = Trainer(stream, load_model("bert-tiny"), method, _config(checkpoint_dir=str(tmp_path / "b"), **kw))
    result = resumed.run(resume=True)

    np.testing.assert_array_equal(result.matrix(), reference.matrix())
    assert result.steps == reference.steps and result.losses == reference.losses
    assert (
        result.peak_memory_bytes >= torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["peak_memory"] > 0
    )
    for a, b in zip(full.adapter_state().items(), resumed.adapter_state().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint.pt"]  # no temporary files left


def test_resume_of_a_finished_run_returns_its_results(tmp_path):
    first = _trainer(checkpoint_dir=str(tmp_path), epochs=1).run()
    again = _trainer(checkpoint_dir=str(tmp_path), epochs=1).run(resume=True)
    np.testing.assert_array_equal(first.matrix(), again.matrix())
    assert again.train_seconds == first.train_seconds


def test_checkpoint_of_another_run_is_refused(tmp_path):
    _trainer(checkpoint_dir=str(tmp_path), epochs=1).run()
    with pytest.raises(ValueError, match="different run .*config"):
        _trainer(checkpoint_dir=str(tmp_path), epochs=1, lr=1e-2).run(resume=True)
    with pytest.raises(ValueError, match="different run .*method"):
        _trainer("ewc", checkpoint_dir=str(tmp_path), epochs=1).run(resume=True)


def test_incompatible_stream_and_model_are_refused():
    with pytest.raises(ValueError, match="needs a causal LM"):
        _trainer(stream=data.wordnet_instruct(train_per_task=2, test_per_task=2))
    with pytest.raises(ValueError, match="has image inputs"):
        _trainer(stream=data.split_digits())
    with pytest.raises(ValueError, match="unknown method 'gem'"):
        _trainer("gem")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"protocol": "domain"}, "protocol"),
        ({"schedule": "step"}, "schedule"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_trainer_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainerConfig(**kwargs)


def test_progress_line_reports_loss_and_speed():
    out = io.StringIO()
    bar = Progress(3, "[seqlora] task 1/2", stream=out)
    for step, loss in enumerate((1.0, 0.5, 0.25), start=1):
        bar.update(step, loss)
    bar.close()
    line = out.getvalue()
    assert line.count("\n") == 1 and "3/3 loss 0.2500" in line and "step/s" in line
