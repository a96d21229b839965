"""The WordNet streams shipped with treelora (built by ``scripts/build_data.py`` from WordNet 3.0; the licence notice
is ``treelora/data/files/WORDNET_LICENSE.txt``).

* :func:`wordnet_supersense`: words labelled with their supersense (lexicographer file), 8 tasks of 4 supersenses in
  three families of related tasks: concrete nouns (tasks 0-2), abstract nouns (3-4) and verbs (5-7).
* :func:`wordnet_instruct`: four relation tasks for causal LMs in the TRACE format, each 4-option multiple choice:
  supersense, hypernym, antonym, definition -> word.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from importlib import resources
from typing import Sequence

import torch

from treelora.data.stream import DataError, LabelledData, Stream, Task, check_count

SUPERSENSE_TASKS: tuple[tuple[str, ...], ...] = (
    ("noun.animal", "noun.plant", "noun.food", "noun.artifact"),
    ("noun.person", "noun.location", "noun.substance", "noun.body"),
    ("noun.object", "noun.group", "noun.time", "noun.quantity"),
    ("noun.cognition", "noun.communication", "noun.act", "noun.attribute"),
    ("noun.feeling", "noun.state", "noun.event", "noun.process"),
    ("verb.motion", "verb.communication", "verb.change", "verb.contact"),
    ("verb.cognition", "verb.emotion", "verb.social", "verb.possession"),
    ("verb.creation", "verb.perception", "verb.stative", "verb.body"),
)
SUPERSENSE_FAMILIES = {"concrete nouns": (0, 1, 2), "abstract nouns": (3, 4), "verbs": (5, 6, 7)}
INSTRUCT_TASKS = ("supersense", "hypernym", "antonym", "definition")
# The shipped splits hold 100 train + 40 test words per class and difficulty (fewer for the five smallest verb
# classes, never below 60 + 25).
MIN_TRAIN_PER_CLASS, MIN_TEST_PER_CLASS = 60, 25
TEXT_FORMATS = ("word", "word_gloss")


def _read_bytes(name: str) -> bytes:
    return gzip.decompress(resources.files("treelora.data").joinpath("files", name).read_bytes())


def _select(rows: list[dict], limit: int | None, generator: torch.Generator) -> list[dict]:
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(torch.randperm(len(rows), generator=generator)[:limit].tolist())
    return [rows[i] for i in keep]


def wordnet_supersense(
    difficulty: str = "common",
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    text: str = "word",
    tasks: Sequence[int] | None = None,
    seed: int = 0,
) -> Stream:
    """Words labelled with WordNet supersenses: 8 tasks of 4 classes (32 classes).

    Every word belongs to exactly one supersense over all its noun and verb senses, so no word appears in two classes;
    train and test words are disjoint.

    Args:
        difficulty: ``"common"`` (the most frequently tagged words of each class in WordNet's semantic concordance) or
            ``"rare"`` (words drawn from the rest, mostly never tagged). The two share words only in the small verb
            classes.
        train_per_class, test_per_class: keep at most this many words per class (a seeded subset of the fixed split;
            default all: up to 100 train + 40 test, at least 60 + 25).
        text: the model's input: ``"word"`` (the lemma) or ``"word_gloss"`` (``"lemma: gloss of its first sense"``).
        tasks: indices of the tasks to keep, in order (default all 8).
        seed: seeds the subsets.
    Returns:
        a classification stream; labels are global ids into ``stream.class_names`` (the 32 supersense names).
    """
    if difficulty not in ("common", "rare"):
        raise DataError(f"difficulty must be 'common' or 'rare', got {difficulty!r}")
    if text not in TEXT_FORMATS:
        raise DataError(f"text must be one of {TEXT_FORMATS}, got {text!r}")
    check_count("train_per_class", train_per_class)
    check_count("test_per_class", test_per_class)
    check_count("seed", seed, low=0, optional=False)
    order = list(range(len(SUPERSENSE_TASKS))) if tasks is None else [int(t) for t in tasks]
    if not order or any(not 0 <= t < len(SUPERSENSE_TASKS) for t in order) or len(set(order)) != len(order):
        raise DataError(f"tasks must be distinct indices in 0..{len(SUPERSENSE_TASKS) - 1}, got {list(order)}")
    reader = csv.DictReader(io.StringIO(_read_bytes("wordnet_supersense.tsv.gz").decode()), delimiter="\t")
    by_key: dict[tuple[str, str], list[dict]] = {}
    for row in reader:
        if row["difficulty"] == difficulty:
            by_key.setdefault((row["class"], row["split"]), []).append(row)
    class_names = [c for k in order for c in SUPERSENSE_TASKS[k]]
    g = torch.Generator().manual_seed(seed)
    stream_tasks = []
    for k in order:
        splits = {}
        for split, limit in (("train", train_per_class), ("test", test_per_class)):
            inputs, labels = [], []
            for cls in SUPERSENSE_TASKS[k]:
                for row in _select(by_key[(cls, split)], limit, g):
                    inputs.append(row["lemma"] if text == "word" else f"{row['lemma']}: {row['gloss']}")
                    labels.append(class_names.index(cls))
            splits[split] = LabelledData(inputs, torch.tensor(labels, dtype=torch.long))
        classes = tuple(class_names.index(c) for c in SUPERSENSE_TASKS[k])
        name = "/".join(c.split(".")[1] for c in SUPERSENSE_TASKS[k])
        stream_tasks.append(
            Task(
                name=f"{SUPERSENSE_TASKS[k][0].split('.')[0]}:{name}",
                kind="classification",
                train=splits["train"],
                test=splits["test"],
                classes=classes,
            )
        )
    return Stream(
        name="wordnet-supersense",
        tasks=stream_tasks,
        class_names=class_names,
        input_kind="text",
        info={
            "difficulty": difficulty,
            "text": text,
            "train_per_class": train_per_class,
            "test_per_class": test_per_class,
            "tasks": order,
            "seed": seed,
            "source": "WordNet 3.0",
        },
    )


def wordnet_instruct(
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
) -> Stream:
    """WordNet relations as an instruction stream (TRACE format) for causal LMs.

    Each item is ``{"prompt", "answer", "options"}``: a question listing 4 options, scored as multiple choice by the
    model's likelihood of each option after the prompt. The shipped splits hold 400 train, 50 eval and 100 test items
    per task.

    Args:
        train_per_task, test_per_task: keep at most this many items (a seeded subset).
        tasks: task names in order, from ``("supersense", "hypernym", "antonym", "definition")`` (default all four).
        seed: seeds the subsets.
    """
    order = list(INSTRUCT_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in order if t not in INSTRUCT_TASKS]
    if unknown or not order or len(set(order)) != len(order):
        raise DataError(f"tasks must be distinct names from {INSTRUCT_TASKS}, got {order}")
    check_count("train_per_task", train_per_task)
    check_count("test_per_task", test_per_task)
    check_count("seed", seed, low=0, optional=False)
    data = json.loads(_read_bytes("wordnet_instruct.json.gz"))
    g = torch.Generator().manual_seed(seed)
    stream_tasks = [
        Task(
            name=name,
            kind="instruct",
            train=_select(data[name]["train"], train_per_task, g),
            eval=data[name]["eval"],
            test=_select(data[name]["test"], test_per_task, g),
            metric="multiple_choice",
        )
        for name in order
    ]
    return Stream(
        name="wordnet-instruct",
        tasks=stream_tasks,
        input_kind="text",
        info={
            "train_per_task": train_per_task,
            "test_per_task": test_per_task,
            "tasks": order,
            "seed": seed,
            "source": "WordNet 3.0",
        },
    )
