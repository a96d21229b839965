"""Several methods compared on one stream, as ``treelora run`` does: each method trains a fresh copy of the model,
one method after another, with its checkpoints in ``<out>/checkpoints/<method>``."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from treelora.cl.distributed import DistributedContext
from treelora.cl.registry import canonical_method
from treelora.cl.results import RunResult
from treelora.cl.trainer import RunInterrupted, Trainer, TrainerConfig
from treelora.data.stream import Stream
from treelora.models import LoadedModel


def release_memory() -> None:
    """Return freed heap memory to the OS between methods, so that each method's peak resident set size (the memory
    column on CPU) starts from the same baseline instead of inheriting the previous method's high-water mark."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compare_methods(
    stream: Stream,
    new_model: Callable[[], LoadedModel],
    methods: Sequence[str],
    config: TrainerConfig,
    out: str | Path,
    *,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    resume: bool = False,
    distributed: DistributedContext | None = None,
) -> list[RunResult]:
    """Train and evaluate each method on the stream, one after another.

    Args:
        stream: the tasks. new_model: returns a freshly loaded backbone, called once per method (LoRA modifies it in
            place, so every method gets its own; one already loaded can be handed out by the first call). methods:
            registered method names or labels.
        config: the trainer settings shared by the methods (its checkpoint_dir is replaced by
            ``<out>/checkpoints/<method>``).
        out: the output folder of the comparison.
        method_options: method name -> its options (see :func:`treelora.cl.assign_method_options`).
        resume: continue each method from its checkpoint (a finished method is read back, not retrained).
        distributed: this process's place among several (see :class:`~treelora.cl.Trainer`; default: the initialised
            default process group, else a single process). Every rank calls this function with the same arguments.
    Returns:
        the methods' results, in order.
    Raises:
        RunInterrupted: Ctrl-C, with the method that was running, its last checkpointed task and the methods that had
            finished.
    """
    options = {canonical_method(k): dict(v) for k, v in (method_options or {}).items()}
    finished: list[str] = []
    results = []
    current: str | None = None
    try:
        for method in map(canonical_method, methods):
            current = method
            loaded = new_model()
            checkpoint_dir = str(Path(out) / "checkpoints" / method)
            cfg = dataclasses.replace(config, checkpoint_dir=checkpoint_dir)
            trainer = Trainer(
                stream, loaded, method, cfg, method_options=options.get(method, {}), distributed=distributed
            )
            results.append(trainer.run(resume=resume))
            finished.append(method)
            current = None
            del trainer, loaded
            release_memory()
    except RunInterrupted as e:
        raise RunInterrupted(e.method, e.completed, e.num_tasks, finished) from e
    except KeyboardInterrupt as e:  # while a model was loading or a trainer was being built
        raise RunInterrupted(current, -1, len(stream), finished) from e
    return results
