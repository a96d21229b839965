"""The shipped streams and the loaders for user data: sizes, disjoint splits, determinism, clear errors."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from treelora import data
from treelora.data import DataError


def _words(split):
    return set(split.inputs)


# --- wordnet-supersense ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("difficulty", ["common", "rare"])
def test_supersense_sizes_and_classes(difficulty):
    s = data.wordnet_supersense(difficulty)
    assert len(s) == 8 and s.num_classes == 32 and s.kind == "classification"
    for k, task in enumerate(s.tasks):
        assert [s.class_names[c] for c in task.classes] == list(data.SUPERSENSE_TASKS[k])
        for split, minimum in (("train", 60), ("test", 25)):
            labels = getattr(task, split).labels
            assert set(labels.tolist()) == set(task.classes)
            counts = torch.bincount(labels, minlength=32)[list(task.classes)]
            assert counts.min() >= minimum, (task.name, split, counts)
            assert counts.max() <= (100 if split == "train" else 40)


@pytest.mark.parametrize("difficulty", ["common", "rare"])
def test_supersense_train_and_test_words_are_disjoint_and_each_word_has_one_class(difficulty):
    s = data.wordnet_supersense(difficulty)
    label_of: dict[str, int] = {}
    for task in s.tasks:
        assert not _words(task.train) & _words(task.test), task.name
        for split in (task.train, task.test):
            for word, label in zip(split.inputs, split.labels.tolist()):
                assert label_of.setdefault(word, label) == label, f"{word} has two supersenses"


def test_supersense_common_words_are_more_frequent_than_rare_ones():
    rows = resources.files("treelora.data").joinpath("files", "wordnet_supersense.tsv.gz").read_bytes()
    import csv
    import gzip
    import io

    reader = csv.DictReader(io.StringIO(gzip.decompress(rows).decode()), delimiter="\t")
    counts = {"common": [], "rare": []}
    for row in reader:
        counts[row["difficulty"]].append(int(row["tag_count"]))
    assert sum(counts["common"]) / len(counts["common"]) > 5 * max(1e-9, sum(counts["rare"]) / len(counts["rare"]))


def test_supersense_subsets_are_deterministic_given_the_seed():
    a = data.wordnet_supersense(train_per_class=10, test_per_class=5, seed=3)
    b = data.wordnet_supersense(train_per_class=10, test_per_class=5, seed=3)
    c = data.wordnet_supersense(train_per_class=10, test_per_class=5, seed=4)
    assert [t.train.inputs for t in a.tasks] == [t.train.inputs for t in b.tasks]
    assert [t.test.inputs for t in a.tasks] == [t.test.inputs for t in b.tasks]
    assert [t.train.inputs for t in a.tasks] != [t.train.inputs for t in c.tasks]
    full = data.wordnet_supersense()
    for small, big in zip(a.tasks, full.tasks):
        assert len(small.train) == 40 and len(small.test) == 20
        assert _words(small.train) <= _words(big.train) and _words(small.test) <= _words(big.test)


def test_supersense_text_formats_and_task_selection():
    s = data.wordnet_supersense(text="word_gloss", tasks=[5, 0], train_per_class=2, test_per_class=1)
    assert [t.name for t in s.tasks] == ["verb:motion/communication/change/contact", "noun:animal/plant/food/artifact"]
    assert all(": " in x for x in s.tasks[0].train.inputs)
    assert s.class_names[:4] == list(data.SUPERSENSE_TASKS[5])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"difficulty": "medium"}, "difficulty"),
        ({"text": "gloss"}, "text must be"),
        ({"tasks": [8]}, "tasks must"),
        ({"tasks": [1, 1]}, "tasks must"),
        ({"train_per_class": 0}, "train_per_class"),
    ],
)
def test_supersense_bad_options_are_named(kwargs, match):
    with pytest.raises(DataError, match=match):
        data.wordnet_supersense(**kwargs)


# --- wordnet-instruct ------------------------------------------------------------------------------------------------


def test_instruct_items_are_four_option_questions_with_disjoint_splits():
    s = data.wordnet_instruct()
    assert [t.name for t in s.tasks] == ["supersense", "hypernym", "antonym", "definition"]
    for task in s.tasks:
        assert task.kind == "instruct" and task.metric == "multiple_choice"
        assert (len(task.train), len(task.eval), len(task.test)) == (400, 50, 100)
        for item in task.train + task.eval + task.test:
            assert len(item["options"]) == 4 and len(set(item["options"])) == 4
            assert item["answer"] in item["options"]
            assert item["prompt"].endswith("Answer:") and all(o in item["prompt"] for o in item["options"])
        prompts = {split: {i["prompt"] for i in getattr(task, split)} for split in ("train", "eval", "test")}
        assert not prompts["train"] & prompts["test"] and not prompts["eval"] & prompts["test"], task.name


def test_instruct_subsets_are_deterministic():
    a = data.wordnet_instruct(train_per_task=7, test_per_task=3, tasks=["antonym"], seed=1)
    b = data.wordnet_instruct(train_per_task=7, test_per_task=3, tasks=["antonym"], seed=1)
    assert a.tasks[0].train == b.tasks[0].train and len(a.tasks[0].test) == 3
    with pytest.raises(DataError, match="tasks must be distinct names"):
        data.wordnet_instruct(tasks=["synonym"])


# --- split-digits and class-incremental splits -----------------------------------------------------------------------


def test_split_digits_sizes_and_classes():
    s = data.split_digits()
    x, y = data.load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0
    assert [t.classes for t in s.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert sum(len(t.train) + len(t.test) for t in s.tasks) == 1797
    for task in s.tasks:
        for c in task.classes:
            n_test = int((task.test.labels == c).sum())
            assert n_test == int(0.3 * int((y == c).sum()) + 0.5)
    with pytest.raises(DataError, match="classes_per_task"):
        data.split_digits(classes_per_task=3)


def test_class_incremental_split_has_no_overlap_and_is_deterministic():
    inputs = torch.arange(60).float().unsqueeze(1)  # each input is its own index
    labels = torch.arange(60) % 6
    a = data.class_incremental_split(inputs, labels, 2, test_fraction=0.2, class_order=[5, 4, 3, 2, 1, 0], seed=7)
    b = data.class_incremental_split(inputs, labels, 2, test_fraction=0.2, class_order=[5, 4, 3, 2, 1, 0], seed=7)
    c = data.class_incremental_split(inputs, labels, 2, test_fraction=0.2, class_order=[5, 4, 3, 2, 1, 0], seed=8)
    assert [t.classes for t in a.tasks] == [(5, 4), (3, 2), (1, 0)]
    seen_train, seen_test = set(), set()
    for task in a.tasks:
        train = set(task.train.inputs.flatten().long().tolist())
        test = set(task.test.inputs.flatten().long().tolist())
        assert not train & test and len(train) == 16 and len(test) == 4
        assert {i % 6 for i in train | test} == set(task.classes)
        seen_train |= train
        seen_test |= test
    assert len(seen_train | seen_test) == 60
    assert all(torch.equal(x.test.inputs, y.test.inputs) for x, y in zip(a.tasks, b.tasks))
    assert any(not torch.equal(x.test.inputs, y.test.inputs) for x, y in zip(a.tasks, c.tasks))


def test_class_incremental_split_with_given_test_set_and_text_inputs():
    s = data.class_incremental_split(
        ["a", "b", "c", "d"],
        torch.tensor([0, 1, 2, 3]),
        2,
        test_inputs=["e", "f"],
        test_labels=torch.tensor([3, 0]),
        class_names=["w", "x", "y", "z"],
    )
    assert s.input_kind == "text" and [t.name for t in s.tasks] == ["w-x", "y-z"]
    assert s.tasks[0].test.inputs == ["f"] and s.tasks[1].test.inputs == ["e"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"classes_per_task": 4}, "divide"),
        ({"classes_per_task": 2, "class_order": [0, 0, 1, 2, 3, 4]}, "permutation"),
        ({"classes_per_task": 2, "test_fraction": 1.0}, "test_fraction"),
        ({"classes_per_task": 2, "class_names": ["a"]}, "class_names"),
    ],
)
def test_class_incremental_split_errors_name_the_argument(kwargs, match):
    with pytest.raises(DataError, match=match):
        data.class_incremental_split(torch.zeros(12, 2), torch.arange(12) % 6, **kwargs)


# --- TRACE folders ---------------------------------------------------------------------------------------------------


def _trace_folder(tmp_path, tasks=("alpha", "beta"), n=5):
    for name in tasks:
        (tmp_path / name).mkdir(parents=True)
        for split in ("train", "eval", "test"):
            items = [{"prompt": f"{name} {split} question {i}?", "answer": f"a{i}"} for i in range(n)]
            (tmp_path / name / f"{split}.json").write_text(json.dumps(items))
    return tmp_path


def test_trace_folder_loads_in_name_order_and_round_trips(tmp_path):
    s = data.load_trace(_trace_folder(tmp_path / "trace"))
    assert [t.name for t in s.tasks] == ["alpha", "beta"] and s.kind == "instruct"
    assert s.tasks[0].metric == "exact_match" and len(s.tasks[1].test) == 5
    ordered = data.load_trace(tmp_path / "trace", tasks=["beta", "alpha"], max_train=2)
    assert [t.name for t in ordered.tasks] == ["beta", "alpha"] and len(ordered.tasks[0].train) == 2
    instruct = data.wordnet_instruct(train_per_task=3, test_per_task=2, tasks=["hypernym", "antonym"])
    again = data.load_trace(data.write_trace(instruct, tmp_path / "copy"), tasks=["hypernym", "antonym"])
    assert [t.test for t in again.tasks] == [t.test for t in instruct.tasks]
    assert again.tasks[0].metric == "multiple_choice"
    assert data.get_stream(str(tmp_path / "trace")).tasks[0].name == "alpha"


def test_trace_missing_split_is_named(tmp_path):
    root = _trace_folder(tmp_path / "trace")
    (root / "beta" / "eval.json").unlink()
    with pytest.raises(DataError, match=r"missing split file .*beta/eval.json"):
        data.load_trace(root)


def test_trace_malformed_json_names_file_and_line(tmp_path):
    root = _trace_folder(tmp_path / "trace")
    (root / "alpha" / "test.json").write_text('[\n{"prompt": "p", "answer": "a"},\n{"prompt": }\n]')
    with pytest.raises(DataError, match=r"malformed JSON in .*alpha/test.json \(line 3"):
        data.load_trace(root)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"prompt": "p"}', "must hold a JSON list"),
        ('[{"prompt": "p"}]', 'item 0 .* string "prompt" and "answer"'),
        ('[{"prompt": "p", "answer": "a", "options": ["b"]}]', "options"),
    ],
)
def test_trace_bad_items_are_named(tmp_path, content, match):
    root = _trace_folder(tmp_path / "trace", tasks=("alpha",))
    (root / "alpha" / "train.json").write_text(content)
    with pytest.raises(DataError, match=match):
        data.load_trace(root)


def test_unknown_stream_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="unknown stream 'wordnet'"):
        data.get_stream("wordnet")
    with pytest.raises(DataError, match="does not exist"):
        data.get_stream(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no task sub-folders"):
        data.load_trace(tmp_path / "empty")


def test_licence_notices_ship_with_the_data():
    files = resources.files("treelora.data").joinpath("files")
    wordnet = files.joinpath("WORDNET_LICENSE.txt").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in wordnet and "AS IS" in wordnet
    assert "CC BY 4.0" in files.joinpath("DIGITS_NOTICE.txt").read_text()
