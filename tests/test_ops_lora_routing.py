"""What treelora.ops.lora_linear handles before any backend runs, for every backend alike: ``torch.autocast`` (as PEFT's
layer computes under it, with and without grad), a 0-dim tensor ``scaling`` (exact gradients, no host
synchronisation), and the routing of empty inputs and a zero scale to the torch backend. Each result is checked
against the float64 reference, with stock ``nn.Linear`` + LoRA in the same precision as the tolerance's baseline.

The torch backend runs in the CPU lane, the Triton kernels in the interpreter lane (or on a GPU); the cuda backend
runs the same checks through tests/test_cuda_lora.py (GPU) and tests/test_cuda_emulated.py (CPU emulator).
"""

from __future__ import annotations

import contextlib
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import treelora
from tests.conftest import HAS_CUDA, INTERPRET
from tests.utils import assert_close_to_ref
from treelora import ops
from treelora.kernels.torch import lora as torch_lora
from treelora.ops.lora_linear import launch_backward, launch_forward, lora_linear_ref

DEVICE = torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")
# The module (``treelora.ops.lora_linear`` as an attribute is the function of the same name).
lora_linear_module = importlib.import_module("treelora.ops.lora_linear")
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.requires_triton], id="triton"),
]
# (M, K, N, r): rows and widths off every tile size.
SHAPE = (37, 40, 24, 4)


def _inputs(dtype=torch.float32, bias=True, seed=0, device=DEVICE):
    M, K, N, r = SHAPE
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    a = torch.randn(r, K, generator=g) / K**0.5
    bb = torch.randn(N, r, generator=g)
    dy = torch.randn(M, N, generator=g)
    return [None if t is None else t.to(device=device, dtype=dtype) for t in (x, w, b, a, bb, dy)]


def _leaves(*tensors, requires_grad=True):
    return [t.detach().clone().requires_grad_(requires_grad) for t in tensors]


@contextlib.contextmanager
def no_host_reads(monkeypatch, cuda_syncs: bool = True):
    """Fail on any read of a tensor's value by the host (what a device synchronisation would be on a GPU); on a GPU
    also on any synchronising CUDA call (``cuda_syncs``)."""

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called: a host read of a tensor value (a sync on a GPU)")

        return read

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, name, refuse(name))
        if not (cuda_syncs and torch.cuda.is_available()):
            yield
            return
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


# --- autocast -----------------------------------------------------------------------------------------------------


def check_autocast_matches_stock_lora(backend, grad, bias, device=DEVICE, dtype=torch.bfloat16):
    """Inside ``torch.autocast`` the op returns what ``F.linear(x, W, b) + s · lora_B(lora_A(x))`` (PEFT's layer)
    returns there: the autocast dtype, and values within the tolerance rule of the float64 reference computed on
    the inputs as autocast rounds them; gradients in the leaves' dtypes."""
    s = 0.5
    x, w, b, a, bb, dy = _inputs(bias=bias, device=device)
    xs, As, Bs = _leaves(x, a, bb, requires_grad=grad)
    xo, Ao, Bo = _leaves(x, a, bb, requires_grad=grad)
    with torch.autocast(device.type, dtype=dtype), torch.set_grad_enabled(grad):
        stock = F.linear(xs, w, b) + F.linear(F.linear(xs, As), Bs) * s
        with treelora.use_backend(backend):
            y = ops.lora_linear(xo, w, b, Ao, Bo, s)
    assert y.dtype == stock.dtype == dtype
    assert y.requires_grad == grad
    rounded = [None if t is None else t.to(dtype).double() for t in (x, w, b, a, bb)]
    x64, A64, B64 = _leaves(rounded[0], rounded[3], rounded[4])
    y64 = lora_linear_ref(x64, rounded[1], rounded[2], A64, B64, s)
    assert_close_to_ref("y", y, y64, stock, dtype=dtype)
    if not grad:
        return
    y.backward(dy.to(dtype))
    stock.backward(dy.to(dtype))
    y64.backward(dy.to(dtype).double())
    for name, got, ref, base in (("dx", xo, x64, xs), ("dA", Ao, A64, As), ("dB", Bo, B64, Bs)):
        assert got.grad.dtype == base.grad.dtype == torch.float32, name
        assert_close_to_ref(name, got.grad, ref.grad, base.grad, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_autocast_matches_stock_lora(backend, grad, bias):
    check_autocast_matches_stock_lora(backend, grad, bias)


def test_autocast_with_a_trainable_weight_runs_the_reference_in_the_autocast_dtype(monkeypatch):
    x, w, b, a, bb, dy = _inputs(device="cpu")
    (wg,) = _leaves(w)
    (ws,) = _leaves(w)
    monkeypatch.setattr(lora_linear_module, "_warned_trainable_weight", False)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="requires grad"):
        y = ops.lora_linear(x, wg, b, a, bb, 0.5)
        stock = F.linear(x, ws, b) + F.linear(F.linear(x, a), bb) * 0.5
    assert y.dtype == stock.dtype == torch.bfloat16
    rounded = [t.bfloat16().double() for t in (x, w, b, a, bb)]
    (w64,) = _leaves(rounded[1])
    y64 = lora_linear_ref(rounded[0], w64, *rounded[2:], 0.5)
    assert_close_to_ref("y", y, y64, stock, dtype=torch.bfloat16)
    for out in (y, stock, y64):
        out.backward(dy.to(out.dtype))
    assert wg.grad.dtype == torch.float32
    assert_close_to_ref("dW", wg.grad, w64.grad, ws.grad, dtype=torch.bfloat16)


# --- tensor scalings ----------------------------------------------------------------------------------------------


def check_tensor_scaling(backend, s_dtype, s_device, s_grad, monkeypatch, device=DEVICE, frozen_rank=1):
    """A 0-dim tensor scaling: y and the gradients of x, A, B (and s when it requires grad) against the float64
    reference, with no host read of any tensor value during the forward and the backward."""
    x, w, b, a, bb, dy = _inputs(device=device)
    s = torch.tensor(0.75, dtype=s_dtype, device=s_device).requires_grad_(s_grad)
    xg, Ag, Bg = _leaves(x, a, bb)
    # A trainable scale kept on the CPU beside GPU tensors gets its gradient copied back: a sync the caller chose.
    syncs_checked = not (s_grad and torch.device(s_device).type != torch.device(device).type)
    with treelora.use_backend(backend), no_host_reads(monkeypatch, cuda_syncs=syncs_checked):
        y = ops.lora_linear(xg, w, b, Ag, Bg, s, frozen_rank=frozen_rank)
        y.backward(dy)
    x64, A64, B64 = _leaves(x.double(), a.double(), bb.double())
    s64 = s.detach().double().requires_grad_(s_grad)
    y64 = lora_linear_ref(x64, w.double(), b.double(), A64, B64, s64, frozen_rank=frozen_rank)
    y64.backward(dy.double())
    s_base = s.detach().clone().requires_grad_(s_grad)  # plain PyTorch in the inputs' precision: the baseline
    baseline = lora_linear_ref(x, w, b, a, bb, s_base, frozen_rank=frozen_rank)
    if s_grad:
        baseline.backward(dy)
    assert y.dtype == x.dtype
    assert_close_to_ref("y", y, y64, baseline)
    for name, got, ref in (("dx", xg, x64), ("dA", Ag, A64), ("dB", Bg, B64)):
        assert_close_to_ref(name, got.grad, ref.grad)
    assert torch.count_nonzero(Ag.grad[:frozen_rank]) == 0 and torch.count_nonzero(Bg.grad[:, :frozen_rank]) == 0
    if s_grad:
        assert s.grad.dtype == s_dtype and s.grad.device == s.device
        # computed in x's precision, then rounded to s's dtype: the floor of the coarser of the two
        coarser = s_dtype if torch.finfo(s_dtype).eps > torch.finfo(x.dtype).eps else x.dtype
        assert_close_to_ref("ds", s.grad, s64.grad, s_base.grad, dtype=coarser)
    else:
        assert s.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s_grad", [False, True], ids=["s-frozen", "s-trainable"])
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("s_on_cpu", [True, False], ids=["s-cpu", "s-on-x-device"])
def test_tensor_scaling_matches_reference_without_host_reads(backend, s_on_cpu, s_dtype, s_grad, monkeypatch):
    check_tensor_scaling(backend, s_dtype, "cpu" if s_on_cpu else DEVICE, s_grad, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_scaling_under_no_grad_and_autocast(backend, monkeypatch):
    """The hot-swapped PEFT model at inference: a tensor scale inside no_grad and autocast."""
    x, w, b, a, bb, _ = _inputs()
    s = torch.tensor(0.75)
    with treelora.use_backend(backend), torch.no_grad(), no_host_reads(monkeypatch):
        plain = ops.lora_linear(x, w, b, a, bb, s)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            low = ops.lora_linear(x, w, b, a, bb, s)
    ref = lora_linear_ref(x.double(), w.double(), b.double(), a.double(), bb.double(), 0.75)
    assert plain.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert_close_to_ref("y", plain, ref, lora_linear_ref(x, w, b, a, bb, 0.75))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        stock = F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * s
    rounded = [t.bfloat16().double() for t in (x, w, b, a, bb)]
    assert_close_to_ref("y autocast", low, lora_linear_ref(*rounded, 0.75), stock, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "scaling, error, match",
    [
        (torch.tensor([0.5]), ValueError, "0-dim"),
        (torch.tensor(1), TypeError, "scaling has dtype torch.int64"),
        (torch.tensor(0.5, device="meta"), ValueError, "scaling is on meta"),
        ("0.5x", TypeError, "scaling must be a number"),
        (float("inf"), ValueError, "scaling must be finite"),
    ],
    ids=["1-dim", "int-tensor", "other-device", "str", "inf"],
)
def test_bad_scaling_names_the_argument(scaling, error, match):
    x, w, b, a, bb, _ = _inputs(device="cpu")
    with pytest.raises(error, match=match):
        ops.lora_linear(x, w, b, a, bb, scaling)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(frozen_rank=1.0), TypeError, "frozen_rank"),
        (dict(frozen_rank=True), TypeError, "frozen_rank"),
        (dict(frozen_rank=-1), ValueError, "frozen_rank"),
        (dict(x=torch.zeros(3, 40, dtype=torch.int32)), TypeError, "x has dtype torch.int32"),
        (dict(weight=torch.zeros(24, 40, device="meta")), ValueError, "weight is on meta"),
    ],
    ids=["rank-float", "rank-bool", "rank-negative", "x-int", "device-mismatch"],
)
def test_error_types_follow_the_policy(kwargs, error, match):
    """TypeError for a wrong Python type or dtype, ValueError for a wrong value, range, shape or device."""
    x, w, b, a, bb, _ = _inputs(device="cpu")
    args = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.lora_linear(**args)


# --- routing ------------------------------------------------------------------------------------------------------


def _refusing_backend():
    """A backend module that must never be launched (the routing sends these inputs elsewhere)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the kernel backend was launched on an input the ops layer routes to torch")

    return SimpleNamespace(lora_linear_fwd=refuse, lora_linear_bwd=refuse, lora_linear_dropout_mask=refuse)


@pytest.mark.parametrize("case", ["zero-scale", "no-rows", "no-columns", "no-outputs"], ids=lambda c: c)
def test_empty_inputs_and_zero_scale_run_on_the_torch_backend(case):
    x, w, b, a, bb, dy = _inputs(device="cpu")
    s = 0.0 if case == "zero-scale" else 0.5
    if case == "no-rows":
        x, dy = x[:0], dy[:0]
    if case == "no-columns":
        x, w, a = x[:, :0], w[:, :0], a[:, :0]
    if case == "no-outputs":
        w, b, bb, dy = w[:0], b[:0], bb[:0], dy[:, :0]
    y, saved, launch = launch_forward(_refusing_backend(), x, w, b, a, bb, s, 0.25, 1, True)
    assert launch.impl is torch_lora
    dx, dA, dB = launch_backward(dy, saved, launch, True, True, True)
    if case == "zero-scale":  # the base op, bitwise, and zero adapter gradients
        assert torch.equal(y, F.linear(x, w, b)) and torch.equal(dx, dy @ w)
        assert torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0
    assert y.shape == (x.shape[0], w.shape[0]) and dx.shape == x.shape
    assert dA.shape == (a.shape[0] - 1, a.shape[1]) and dB.shape == (bb.shape[0], bb.shape[1] - 1)


def test_other_inputs_reach_the_chosen_backend():
    x, w, b, a, bb, _ = _inputs(device="cpu")
    calls = []

    def fwd(*args):
        calls.append(args[5])
        return torch_lora.lora_linear_fwd(*args)

    impl = SimpleNamespace(lora_linear_fwd=fwd)
    _, _, launch = launch_forward(impl, x, w, b, a, bb, 0.5, 0.0, 0, False)
    assert launch.impl is impl and calls == [0.5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_scale_under_autocast_is_the_base_op_under_autocast(backend):
    x, w, b, a, bb, _ = _inputs()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), treelora.use_backend(backend), torch.no_grad():
        y = ops.lora_linear(x, w, b, a, bb, 0.0)
        base = F.linear(x, w, b)
    assert y.dtype == base.dtype == torch.bfloat16
    assert torch.equal(y, base)
