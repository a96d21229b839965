"""Backend registry: automatic fallback, forcing by context manager and environment, reasons in errors."""

from __future__ import annotations

import pytest
import torch

import treelora
from treelora import backends


@pytest.fixture
def toy_op():
    """A throwaway op with a cuda backend that never runs, a triton backend that refuses big inputs, and torch."""
    op = "toy_op_for_tests"
    backends.register(op, "cuda", lambda x: "cuda", lambda x: ["no GPU in this test"])
    backends.register(op, "triton", lambda x: "triton", lambda x: [] if x < 10 else [f"x={x} is too large"])
    backends.register(op, "torch", lambda x: "torch", lambda x: [])
    yield op
    del backends._REGISTRY[op]


def test_automatic_choice_takes_first_backend_that_can_run(toy_op):
    assert backends.select(toy_op, 3).name == "triton"
    assert backends.select(toy_op, 30).name == "torch"  # quiet fallback


def test_use_backend_forces_and_raises_with_reasons(toy_op):
    with treelora.use_backend("torch"):
        assert backends.select(toy_op, 3).name == "torch"
    with treelora.use_backend("triton"):
        with pytest.raises(treelora.BackendUnavailableError, match="x=30 is too large"):
            backends.select(toy_op, 30)
    with treelora.use_backend("cuda"):
        with pytest.raises(treelora.BackendUnavailableError, match="no GPU in this test"):
            backends.select(toy_op, 3)


def test_nested_use_backend_innermost_wins_and_restores(toy_op):
    with treelora.use_backend("torch"):
        with treelora.use_backend("triton"):
            assert backends.select(toy_op, 3).name == "triton"
        assert backends.select(toy_op, 3).name == "torch"
    assert backends.forced_backend() is None


def test_environment_variable_forces_and_use_backend_none_restores_auto(toy_op, monkeypatch):
    monkeypatch.setenv("TREELORA_BACKEND", "torch")
    assert backends.select(toy_op, 3).name == "torch"
    with treelora.use_backend(None):
        assert backends.select(toy_op, 3).name == "triton"
    monkeypatch.setenv("TREELORA_BACKEND", "tpu")
    with pytest.raises(ValueError, match="TREELORA_BACKEND"):
        backends.select(toy_op, 3)


def test_bad_names():
    with pytest.raises(ValueError, match="use_backend"):
        with treelora.use_backend("cudnn"):
            pass
    with pytest.raises(KeyError, match="unknown op"):
        backends.select("no_such_op")
    with pytest.raises(ValueError, match="backend name"):
        backends.register("x", "mps", lambda: None, lambda: [])


def test_forced_backend_missing_for_op_says_so(toy_op):
    op = "toy_op_torch_only"
    backends.register(op, "torch", lambda: "torch", lambda: [])
    try:
        with treelora.use_backend("triton"):
            with pytest.raises(treelora.BackendUnavailableError, match="not implemented for this op"):
                backends.select(op)
    finally:
        del backends._REGISTRY[op]


def test_explain_lists_every_backend(toy_op):
    assert backends.explain(toy_op, 30) == {
        "cuda": ["no GPU in this test"],
        "triton": ["x=30 is too large"],
        "torch": [],
    }


def test_real_ops_fall_back_to_torch_on_cpu():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    assert backends.select("lora_linear", x, w, None, a, b, 1.0, 0.0, 0).name in ("torch", "triton")
    reasons = backends.explain(
        "pairwise_similarity", torch.randn(2, 4), torch.randn(3, 2, 4), "l1", torch.zeros(2, dtype=torch.long), None
    )
    assert reasons["torch"] == []
    assert reasons["cuda"], "the cuda backend must explain why it cannot take CPU tensors"
    with treelora.use_backend("cuda"):
        with pytest.raises(treelora.BackendUnavailableError, match="cuda"):
            treelora.ops.pairwise_similarity(torch.randn(2, 4), torch.randn(3, 2, 4), index=torch.zeros(2).long())
