"""Tasks and streams, and the loaders for user data: TRACE-format folders and class-incremental splits.

A :class:`Task` holds one task's train/eval/test data and how it is scored; a :class:`Stream` is the ordered list of
tasks a continual learner sees. Two kinds of task:

* ``classification``: :class:`LabelledData` (texts or a tensor of inputs, and integer labels that are *global* class
  ids of the stream, so the same data serves the task-incremental protocol, where the task's own classes are scored,
  and the class-incremental one, where every class seen so far competes);
* ``instruct``: lists of ``{"prompt", "answer"}`` items (the TRACE format), optionally with ``"options"`` for
  multiple-choice scoring by the model's likelihood of each option; without options, scored by exact match of the
  greedy answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import torch

TRACE_SPLITS = ("train", "eval", "test")


class DataError(ValueError):
    """Bad stream input (unknown name, missing file, malformed content, an option out of range); the message names
    the problem. A builder option of the wrong Python type raises TypeError instead."""


def check_count(name: str, value: Any, low: int = 1, optional: bool = True) -> int | None:
    """A builder's integer option (a size, a seed): TypeError unless an int (or None when ``optional``), DataError
    when below ``low``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {value!r}")
    if value < low:
        raise DataError(f"{name} must be >= {low}, got {value}")
    return value


@dataclass
class LabelledData:
    """Inputs with integer class labels.

    Args:
        inputs: n texts, or a tensor (n, ...) of features / images.
        labels: (n,) int64 global class ids.
    """

    inputs: Union[list[str], torch.Tensor]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.labels.dim() != 1 or len(self.inputs) != self.labels.shape[0]:
            raise DataError(
                f"labels must be 1-D with one entry per input: got {len(self.inputs)} inputs and labels "
                f"of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, index: Sequence[int] | torch.Tensor) -> LabelledData:
        index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.inputs, torch.Tensor):
            inputs: Union[list[str], torch.Tensor] = self.inputs[index]
        else:
            inputs = [self.inputs[i] for i in index.tolist()]
        return LabelledData(inputs, self.labels[index])


InstructData = list[dict[str, Any]]


@dataclass
class Task:
    """One task of a stream.

    Args:
        name: the task's name (unique in its stream).
        kind: ``"classification"`` or ``"instruct"``.
        train: training data; eval: optional validation data; test: the data the accuracy matrix is measured on.
        classes: global class ids of this task (classification), in the order of the task-incremental head.
        metric: ``"accuracy"`` (classification), ``"multiple_choice"`` or ``"exact_match"`` (instruct).
    """

    name: str
    kind: str
    train: Union[LabelledData, InstructData]
    test: Union[LabelledData, InstructData]
    eval: Union[LabelledData, InstructData, None] = None
    classes: tuple[int, ...] = ()
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "instruct"):
            raise DataError(f"task {self.name!r}: kind must be 'classification' or 'instruct', got {self.kind!r}")
        if len(self.train) == 0 or len(self.test) == 0:
            raise DataError(f"task {self.name!r} has an empty train or test split")


@dataclass
class Stream:
    """An ordered list of tasks.

    Args:
        name: the stream's name.
        tasks: the tasks in training order.
        class_names: names of the global class ids (classification streams); empty for instruct streams.
        input_kind: ``"text"`` or ``"image"`` (what a model must consume).
        info: free-form description (source, sizes, options) recorded with the results.
    """

    name: str
    tasks: list[Task]
    class_names: list[str] = field(default_factory=list)
    input_kind: str = "text"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise DataError(f"stream {self.name!r} has no tasks")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise DataError(f"stream {self.name!r} has duplicate task names: {names}")
        kinds = {t.kind for t in self.tasks}
        if len(kinds) != 1:
            raise DataError(f"stream {self.name!r} mixes task kinds {sorted(kinds)}")

    @property
    def kind(self) -> str:
        return self.tasks[0].kind

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.tasks)

    def summary(self) -> str:
        sizes = ", ".join(f"{t.name} {len(t.train)}/{len(t.test)}" for t in self.tasks)
        return f"{self.name}: {len(self.tasks)} {self.kind} tasks (train/test) {sizes}"


# --- class-incremental splits of labelled tensors --------------------------------------------------------------------


def _stratified_split(labels: torch.Tensor, test_fraction: float, generator: torch.Generator) -> tuple[list, list]:
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_test = max(1, int(test_fraction * idx.numel() + 0.5))  # half rounds up, not to even
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return sorted(train), sorted(test)


def class_incremental_split(
    inputs: Union[list[str], torch.Tensor],
    labels: torch.Tensor,
    classes_per_task: int,
    *,
    test_inputs: Union[list[str], torch.Tensor, None] = None,
    test_labels: torch.Tensor | None = None,
    test_fraction: float = 0.2,
    class_order: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    name: str = "class-incremental",
    input_kind: str | None = None,
) -> Stream:
    """Split any labelled data into tasks of ``classes_per_task`` disjoint classes.

    Args:
        inputs: n texts or a tensor (n, ...); labels: (n,) integer class ids 0..C-1.
        classes_per_task: classes per task; C must be a multiple of it.
        test_inputs, test_labels: a separate test set; without it, ``test_fraction`` of each class is held out
            (stratified, seeded).
        class_order: the order in which classes arrive (a permutation of 0..C-1; default 0..C-1).
        class_names: names of the C classes (default ``"0"``, ``"1"``, ...).
        seed: seeds the held-out split.
    Returns:
        a classification :class:`Stream` whose labels are the original class ids.
    """
    check_count("classes_per_task", classes_per_task, optional=False)
    check_count("seed", seed, low=0, optional=False)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.dim() != 1 or len(inputs) != labels.numel():
        raise DataError(
            f"labels must be 1-D with one entry per input: {len(inputs)} inputs, labels {tuple(labels.shape)}"
        )
    num_classes = int(labels.max().item()) + 1 if labels.numel() else 0
    if classes_per_task < 1 or num_classes % classes_per_task:
        raise DataError(f"classes_per_task={classes_per_task} must be >= 1 and divide the {num_classes} classes")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a number, got {test_fraction!r}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    if class_order is None:
        order = list(range(num_classes))
    else:
        order = [int(c) for c in class_order]
        if sorted(order) != list(range(num_classes)):
            raise DataError(f"class_order must be a permutation of 0..{num_classes - 1}, got {order}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"class_names has {len(names)} names for {num_classes} classes")
    data = LabelledData(inputs, labels)
    if test_inputs is None:
        train_idx, test_idx = _stratified_split(labels, test_fraction, g)
        train_all, test_all = data.subset(train_idx), data.subset(test_idx)
    else:
        if test_labels is None:
            raise DataError("test_inputs given without test_labels")
        train_all, test_all = data, LabelledData(test_inputs, torch.as_tensor(test_labels, dtype=torch.long))
    tasks = []
    for k in range(num_classes // classes_per_task):
        classes = tuple(order[k * classes_per_task : (k + 1) * classes_per_task])
        keep = [torch.isin(d.labels, torch.tensor(classes)).nonzero().flatten() for d in (train_all, test_all)]
        tasks.append(
            Task(
                name="-".join(names[c] for c in classes),
                kind="classification",
                train=train_all.subset(keep[0]),
                test=test_all.subset(keep[1]),
                classes=classes,
                metric="accuracy",
            )
        )
    kind = input_kind or ("text" if isinstance(inputs, list) else "image")
    return Stream(
        name=name,
        tasks=tasks,
        class_names=names,
        input_kind=kind,
        info={"classes_per_task": classes_per_task, "class_order": order, "seed": seed},
    )


# --- TRACE-format folders --------------------------------------------------------------------------------------------


def _read_trace_split(path: Path) -> InstructData:
    if not path.is_file():
        raise DataError(f"TRACE folder: missing split file {path}")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"TRACE folder: malformed JSON in {path} (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"TRACE folder: {path} is not UTF-8 text ({e.reason})") from e
    if not isinstance(items, list):
        raise DataError(f'TRACE folder: {path} must hold a JSON list of {{"prompt", "answer"}} objects')
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("prompt"), str) and isinstance(item.get("answer"), str)):
            raise DataError(f'TRACE folder: item {i} of {path} is not an object with string "prompt" and "answer"')
        options = item.get("options")
        if options is not None and not (
            isinstance(options, list) and all(isinstance(o, str) for o in options) and item["answer"] in options
        ):
            raise DataError(
                f'TRACE folder: item {i} of {path} has "options" that are not a list of strings containing the answer'
            )
    return items


def load_trace(
    path: Union[str, Path],
    tasks: Sequence[str] | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> Stream:
    """Load a TRACE-format folder: ``<path>/<task>/{train,eval,test}.json``, each a JSON list of
    ``{"prompt": str, "answer": str}`` objects (an optional ``"options"`` list makes the task multiple choice).

    Args:
        path: the folder.
        tasks: task names in training order (default: every sub-folder, sorted by name).
        max_train, max_test: keep at most this many items per task (a seeded random subset).
        seed: seeds the subsets.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    check_count("max_train", max_train)
    check_count("max_test", max_test)
    check_count("seed", seed, low=0, optional=False)
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"TRACE folder {root} does not exist or is not a directory")
    names = list(tasks) if tasks is not None else sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise DataError(
            f"TRACE folder {root} has no task sub-folders (expected <task>/train.json, eval.json, test.json)"
        )
    stream_tasks = []
    for name in names:
        if not (root / name).is_dir():
            raise DataError(f"TRACE folder {root} has no task folder {name!r}")
        splits = {s: _read_trace_split(root / name / f"{s}.json") for s in TRACE_SPLITS}
        for split, limit in (("train", max_train), ("test", max_test)):
            splits[split] = _subset_items(splits[split], limit, seed)
        multiple_choice = all("options" in item for item in splits["test"])
        stream_tasks.append(
            Task(
                name=name,
                kind="instruct",
                train=splits["train"],
                eval=splits["eval"],
                test=splits["test"],
                metric="multiple_choice" if multiple_choice else "exact_match",
            )
        )
    return Stream(name=root.name, tasks=stream_tasks, input_kind="text", info={"source": str(root)})


def _subset_items(items: InstructData, limit: int | None, seed: int) -> InstructData:
    if limit is None or limit >= len(items):
        return items
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(items), generator=g)[:limit].tolist())
    return [items[i] for i in keep]


def write_trace(stream: Stream, path: Union[str, Path]) -> Path:
    """Write an instruct stream as a TRACE-format folder (the inverse of :func:`load_trace`)."""
    if stream.kind != "instruct":
        raise DataError(f"write_trace needs an instruct stream, {stream.name!r} is {stream.kind}")
    root = Path(path)
    for task in stream.tasks:
        (root / task.name).mkdir(parents=True, exist_ok=True)
        for split in TRACE_SPLITS:
            items = getattr(task, split) if getattr(task, split) is not None else []
            (root / task.name / f"{split}.json").write_text(json.dumps(items, indent=1), encoding="utf-8")
    return root
