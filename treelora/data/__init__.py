"""Task streams: offline datasets shipped in the package and loaders for user data.

Built-in streams (no download; the data lives in ``treelora/data/files`` with its licence notices):

============================ =====================================================================================
``wordnet-classil``          the 32 WordNet supersenses class-incremental: 8 tasks of 4, families interleaved, with a
                             description of every class (for the frozen ``label`` head); sequential fine-tuning
                             forgets here (the default stream of ``treelora run``)
``wordnet-instruct-classil`` the same words as prompts for causal LMs, the same question in every task and only the
                             answers (class descriptions) changing, scored as multiple choice over 16 descriptions
``wordnet-supersense``       words -> WordNet supersense, 8 tasks of 4 classes in three families (text
                             classification, task-incremental by default)
``wordnet-instruct``         WordNet relations as 4-option multiple-choice prompts, 4 tasks (causal LMs, TRACE format)
``split-digits``             scikit-learn's 8x8 digits, 5 tasks of 2 classes (image classification)
============================ =====================================================================================

:func:`validation_split` replaces each task's test set by a held-out share of its training data (for choosing
hyperparameters without the test data).

:func:`get_stream` builds one by name, or loads a TRACE-format folder given its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from treelora.data.digits import load_digits_tensors, split_digits
from treelora.data.forgetting import validation_split, wordnet_classil, wordnet_instruct_classil
from treelora.data.stream import (
    DataError,
    LabelledData,
    Stream,
    Task,
    class_incremental_split,
    load_trace,
    write_trace,
)
from treelora.data.wordnet import SUPERSENSE_FAMILIES, SUPERSENSE_TASKS, wordnet_instruct, wordnet_supersense

STREAMS: dict[str, Callable[..., Stream]] = {
    "wordnet-classil": wordnet_classil,
    "wordnet-instruct-classil": wordnet_instruct_classil,
    "wordnet-supersense": wordnet_supersense,
    "wordnet-instruct": wordnet_instruct,
    "split-digits": split_digits,
}


def get_stream(name: str, **options: Any) -> Stream:
    """A built-in stream by name (``options`` go to its builder), or a TRACE-format folder by path.

    Raises:
        DataError: an unknown name that is not an existing folder, or a malformed folder (the message says which).
    """
    if name in STREAMS:
        return STREAMS[name](**options)
    if "/" in name or Path(name).is_dir():
        return load_trace(name, **options)
    raise DataError(f"unknown stream {name!r}: choose one of {', '.join(STREAMS)} or give a TRACE folder path")


__all__ = [
    "STREAMS",
    "SUPERSENSE_FAMILIES",
    "SUPERSENSE_TASKS",
    "DataError",
    "LabelledData",
    "Stream",
    "Task",
    "class_incremental_split",
    "get_stream",
    "load_digits_tensors",
    "load_trace",
    "split_digits",
    "validation_split",
    "wordnet_classil",
    "wordnet_instruct_classil",
    "wordnet_instruct",
    "wordnet_supersense",
    "write_trace",
]
