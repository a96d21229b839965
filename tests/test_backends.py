"""Backend registry: automatic fallback, forcing by context manager and environment, reasons in errors."""

from __future__ import annotations

import inspect
import sys
from types import SimpleNamespace

import pytest
import torch

import treelora
from tests.conftest import HAS_TRITON
from treelora import backends


def _module(op: str, fn, reasons) -> SimpleNamespace:
    """A backend module of a one-op family: the entry point named like the op and its reasons function."""
    return SimpleNamespace(**{op: fn, backends.reasons_name(op): reasons})


@pytest.fixture
def toy_op():
    """A throwaway op with a cuda backend that never runs, a triton backend that refuses big inputs, and torch."""
    op = "toy_op_for_tests"
    backends.register_family(
        "toy_family",
        ops=(op,),
        cuda=_module(op, lambda x: "cuda", lambda x: ["no GPU in this test"]),
        triton=_module(op, lambda x: "triton", lambda x: [] if x < 10 else [f"x={x} is too large"]),
        torch=_module(op, lambda x: "torch", lambda x: []),
    )
    yield op
    backends.unregister_family("toy_family")


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
        backends.register_family("x", ops=("x",), torch=_module("x", lambda: None, lambda: []), mps=object())


def test_forced_backend_missing_for_op_says_so(toy_op):
    op = "toy_op_torch_only"
    backends.register_family("toy_torch_only", ops=(op,), torch=_module(op, lambda: "torch", lambda: []))
    try:
        with treelora.use_backend("triton"):
            with pytest.raises(treelora.BackendUnavailableError, match="not implemented for this op"):
                backends.select(op)
    finally:
        backends.unregister_family("toy_torch_only")


def test_explain_lists_every_backend(toy_op):
    assert backends.explain(toy_op, 30) == {
        "cuda": ["no GPU in this test"],
        "triton": ["x=30 is too large"],
        "torch": [],
    }


def test_the_three_families_are_registered():
    assert {"lora_linear", "similarity", "masked_update"} <= set(backends.families())


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


def test_a_family_registers_in_one_call_and_imports_its_modules_only_when_asked(tmp_path, monkeypatch):
    """One registration per family: every op gets every backend; a module given by path is imported on first use,
    after its package's environment check, and its entry points and reasons are looked up by the op's name."""
    package = tmp_path / "toy_backend_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("REASONS = []\n\ndef environment_reasons():\n    return list(REASONS)\n")
    (package / "mod.py").write_text(
        "def toy_a(x):\n    return 2 * x\n\n"
        "def toy_a_not_supported_reasons(x):\n    return []\n\n"
        "def toy_b_(x):\n    return x + 1\n\n"
        "def toy_b_not_supported_reasons(x):\n    return [] if x >= 0 else ['x < 0']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    backends.register_family("toy_lazy", ops=("toy_a", "toy_b_"), torch="toy_backend_pkg.mod")
    try:
        assert backends.families()["toy_lazy"] == ("toy_a", "toy_b_")
        assert "toy_backend_pkg.mod" not in sys.modules
        assert backends.explain("toy_b_", -1) == {"torch": ["x < 0"]}
        assert "toy_backend_pkg.mod" in sys.modules
        assert backends.select("toy_a", 3).fn(3) == 6
        assert backends.select("toy_b_", 3).fn(3) == 4
        sys.modules["toy_backend_pkg"].REASONS.append("no toy device")  # asked first, also once the module is in
        assert backends.explain("toy_b_", 3) == {"torch": ["no toy device"]}
        with pytest.raises(ValueError, match="already registered by family 'toy_lazy'"):
            backends.register_family("other", ops=("toy_a",), torch="toy_backend_pkg.mod")
        with pytest.raises(ValueError, match="torch backend is required"):
            backends.register_family("no_torch", ops=("toy_c",), triton="toy_backend_pkg.mod")
    finally:
        backends.unregister_family("toy_lazy")
        monkeypatch.delitem(sys.modules, "toy_backend_pkg.mod", raising=False)
        monkeypatch.delitem(sys.modules, "toy_backend_pkg", raising=False)
    assert "toy_a" not in backends.registered_ops()


@pytest.mark.parametrize("family", sorted(backends.families()))
def test_every_op_family_registers_every_backend_with_named_entry_points(family):
    """Every family treelora.ops registers follows one contract: every backend module exports each op's entry points
    (named like the op) and its ``<op>_not_supported_reasons`` taking the op's parameters (lora_linear's without
    ``training``: its backends see the effective dropout probability)."""
    names = [n for n in backends.BACKEND_NAMES if n != "triton" or HAS_TRITON]
    for op in backends.families()[family]:
        table = backends.backends_for(op)
        assert set(table) == set(backends.BACKEND_NAMES), (op, sorted(table))
        public = [p for p in inspect.signature(getattr(treelora.ops, op)).parameters if p != "training"]
        for name in names:
            backend = table[name]
            for entry in backend.entries:
                assert entry.startswith(op.rstrip("_")), (op, name, entry)
                assert callable(getattr(backend.module, entry)), (op, name, entry)
            reasons = getattr(backend.module, backends.reasons_name(op))
            assert list(inspect.signature(reasons).parameters) == public, (op, name)
