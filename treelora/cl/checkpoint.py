"""Checkpoints of a continual-learning run: written atomically after every task, read back to resume.

A checkpoint is one ``torch.save`` file holding the run's identity (method, options, stream, model, settings: a
checkpoint of another run is refused), the trainable state (adapters and heads, through :func:`adapter_state`), the
method's ``state_dict``, the results so far and the RNG states. :class:`CheckpointStore` is the one place that
writes and reads it, so a data-parallel run can make rank 0 its only writer there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from treelora._io import atomic_write

CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume this run (another run's, another format version, unreadable); the
    message names the file and what to do."""


def adapter_state(layers: Sequence[nn.Module], heads: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every trainable tensor of the run: each LoRA layer's state without its frozen base layer
    (``layers.<i>.<name>``) and the heads (``heads.<name>``)."""
    state = {}
    for i, layer in enumerate(layers):
        for name, value in layer.state_dict().items():
            if not name.startswith("base."):
                state[f"layers.{i}.{name}"] = value.detach().cpu().clone()
    for name, value in heads.state_dict().items():
        state[f"heads.{name}"] = value.detach().cpu().clone()
    return state


def load_adapter_state(layers: Sequence[nn.Module], heads: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`adapter_state` returned, in place."""
    for i, layer in enumerate(layers):
        prefix = f"layers.{i}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        layer.load_state_dict(own, strict=False)
    heads.load_state_dict({k[len("heads.") :]: v for k, v in state.items() if k.startswith("heads.")})


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU, and every CUDA device when there is one): dropout and fresh adapters draw
    from them."""
    return {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


class CheckpointStore:
    """The checkpoint file of one run, ``<folder>/checkpoint.pt``.

    Args:
        folder: where the checkpoint lives (created on the first save).
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / CHECKPOINT_NAME

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, identity: dict[str, Any], state: dict[str, Any]) -> None:
        """Write ``state`` (with ``identity`` and the format version) atomically: a temporary file beside the old
        checkpoint, renamed over it once complete."""
        payload = {"version": CHECKPOINT_VERSION, "identity": identity, **state}
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))

    def load(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        """The saved state, or None when there is no checkpoint.

        Raises:
            CheckpointError: the file cannot be read, has another format version, or belongs to a different run
                (the message lists which parts of the identity differ).
        """
        if not self.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # torch.load raises pickle, zip and EOF errors alike for a damaged file
            raise CheckpointError(
                f"checkpoint {self.path} cannot be read ({type(e).__name__}: {e}); delete it to start over"
            ) from e
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise CheckpointError(f"checkpoint {self.path} has version {version}, expected {CHECKPOINT_VERSION}")
        theirs = state["identity"]
        if identity != theirs:
            diff = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
            raise CheckpointError(
                f"checkpoint {self.path} belongs to a different run (differs in {', '.join(diff)}); use "
                "another output folder or drop --resume"
            )
        return state
