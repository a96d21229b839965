"""The cuda backend of lora_linear against the float64 reference (and the Triton backend when it can run): forward
and the gradients of x, A and B for fp32/fp16/bf16, ranks 1, 8, 16, 64 and 80 (two rank chunks), awkward sizes,
non-contiguous x, dropout on and off (the mask regenerated from the seed, never stored), stacked frozen + trainable
adapters, a disabled adapter (bitwise the base op), views whose rows are never read past their end, every subset of
requested gradients, empty dimensions handled by the launchers themselves, the launch planner's Python mirror, and
run-to-run reproducibility. Needs a GPU.

Each test's body is a ``check_*`` function taking the device, which tests/test_cuda_emulated.py also runs on CPU
tensors through the CUDA emulator (smaller shapes, same references and tolerances)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests import test_ops_lora_routing as routing
from tests.utils import assert_close_to_ref
from treelora import backends, use_backend
from treelora.kernels.cuda import lora as cuda_lora
from treelora.ops.lora_linear import launch_backward, launch_dropout_mask, launch_forward, lora_linear, lora_linear_ref

pytestmark = [pytest.mark.requires_cuda, pytest.mark.requires_cuda_ext]
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): one typical shape, then awkward ones (M = 1, sizes off every tile and vector width, long K).
SHAPES = [(256, 512, 384), (1, 40, 24), (113, 300, 77), (37, 4100, 9), (4097, 72, 40)]


def _inputs(M, K, N, r, dtype, bias=True, contiguous=True, device=DEVICE):
    x = torch.randn(M, 2 * K if not contiguous else K, device=device).to(dtype)
    if not contiguous:
        x = x[:, ::2]  # column stride 2
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    a = torch.randn(r, K, device=device) / K**0.5  # adapters in fp32 with low-precision activations: the common case
    bb = torch.randn(N, r, device=device)
    return x, w, b, a, bb


def _launch(x, w, b, a, bb, s, p, f, dy):
    """Forward and backward through the cuda backend as the ops layer launches it (empty inputs routed to the torch
    backend); returns y, (dx, dA, dB) and the regenerated keep mask."""
    y, saved, launch = launch_forward(cuda_lora, x, w, b, a, bb, s, p, f, True)
    dx, dA, dB = launch_backward(dy, saved, launch, True, True, True)
    return y, (dx, dA, dB), launch_dropout_mask(saved, launch)


def _reference(x, w, b, a, bb, s, p, f, dy, mask, dtype):
    """y and (dx, dA[f:], dB[:, f:]) of lora_linear_ref computed in ``dtype`` (fp64 for the oracle)."""
    xr = x.to(dtype).requires_grad_()
    ar = a.to(dtype).requires_grad_()
    br = bb.to(dtype).requires_grad_()
    y = lora_linear_ref(xr, w.to(dtype), None if b is None else b.to(dtype), ar, br, s, p, mask, f)
    y.backward(dy.to(dtype))
    return y, (xr.grad, ar.grad[f:], br.grad[:, f:])


def _compare(tag, dtype, y, grads, x, w, b, a, bb, s, p, f, dy, mask):
    y64, g64 = _reference(x, w, b, a, bb, s, p, f, dy, mask, torch.float64)
    y_base, g_base = _reference(x, w, b, a, bb, s, p, f, dy, mask, dtype)
    assert_close_to_ref(f"{tag} y", y, y64, y_base, dtype=dtype)
    for name, got, ref, base in zip(("dx", "dA", "dB"), grads, g64, g_base):
        # dA and dB are stored in the adapters' fp32 but inherit the activation dtype's error from dy and x
        assert_close_to_ref(f"{tag} {name}", got, ref, base, dtype=dtype)


def check_matches_reference(dtype, shape, dropout_p, r=8, device=DEVICE):
    M, K, N = shape
    x, w, b, a, bb = _inputs(M, K, N, r, dtype, device=device)
    dy = torch.randn(M, N, device=device).to(dtype)
    y, grads, mask = _launch(x, w, b, a, bb, 0.5, dropout_p, 0, dy)
    assert (mask is None) == (dropout_p == 0.0)
    if mask is not None:
        kept = mask.float().mean().item()
        assert abs(kept - (1 - dropout_p)) < 0.05 + 3 / mask.numel() ** 0.5, f"kept fraction {kept}"
    _compare(f"{dtype} {shape}", dtype, y, grads, x, w, b, a, bb, 0.5, dropout_p, 0, dy, mask)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_matches_reference(dtype, shape, dropout_p):
    check_matches_reference(dtype, shape, dropout_p)


def check_ranks_and_stacked_adapters(dtype, r, shape=(130, 200, 150), device=DEVICE):
    M, K, N = shape
    f = r // 2  # frozen rows of A / columns of B; r = 1 has none
    x, w, b, a, bb = _inputs(M, K, N, r, dtype, bias=False, device=device)
    dy = torch.randn(M, N, device=device).to(dtype)
    y, grads, mask = _launch(x, w, b, a, bb, 2.0 / r, 0.1, f, dy)
    assert grads[1].shape == (r - f, K) and grads[2].shape == (N, r - f)
    _compare(f"r={r} f={f}", dtype, y, grads, x, w, b, a, bb, 2.0 / r, 0.1, f, dy, mask)


@pytest.mark.parametrize("r", [1, 8, 16, 64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_ranks_and_stacked_adapters(dtype, r):
    check_ranks_and_stacked_adapters(dtype, r)


# Subsets of (dx, dA, dB) a backward may ask for: each kernel of the backward then runs partially (dB alone still sums
# its partial slabs, dA alone still regenerates the dropout mask).
GRADIENT_SUBSETS = [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]


def _subset_id(needs):
    return "+".join(name for name, need in zip(("dx", "dA", "dB"), needs) if need)


def check_partial_gradients(dtype, needs, shape=(150, 200, 130), device=DEVICE):
    M, K, N = shape
    r, f = 12, 4
    x, w, b, a, bb = _inputs(M, K, N, r, dtype, device=device)
    dy = torch.randn(M, N, device=device).to(dtype)
    y, saved, launch = launch_forward(cuda_lora, x, w, b, a, bb, 0.5, 0.25, f, True)
    grads = launch_backward(dy, saved, launch, *needs)
    mask = launch_dropout_mask(saved, launch)
    _, g64 = _reference(x, w, b, a, bb, 0.5, 0.25, f, dy, mask, torch.float64)
    _, g_base = _reference(x, w, b, a, bb, 0.5, 0.25, f, dy, mask, dtype)
    for name, need, got, ref, base in zip(("dx", "dA", "dB"), needs, grads, g64, g_base):
        if need:
            assert_close_to_ref(f"{_subset_id(needs)} {name}", got, ref, base, dtype=dtype)
        else:
            assert got is None, f"{name} was not asked for"


@pytest.mark.parametrize("needs", GRADIENT_SUBSETS, ids=_subset_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_partial_gradients(dtype, needs):
    check_partial_gradients(dtype, needs)


def check_empty_dimensions_in_the_launchers(device=DEVICE):
    """K, N or M of 0 straight through the launchers (the ops layer routes them to the torch backend, but the kernels'
    host code must still give the empty sums: u = 0 and T = bias for K = 0, du = 0 so dx and dA = 0 for N = 0,
    dA = dB = 0 for M = 0)."""
    state = cuda_lora._State(scaling=0.5, dropout_p=0.0, frozen_rank=1)
    bias = torch.randn(7, device=device)
    x, a, bb = torch.randn(5, 0, device=device), torch.randn(3, 0, device=device), torch.randn(7, 3, device=device)
    u, t = cuda_lora.forward_terms(x, a, bb, bias, 0.5, None, 0.0)
    assert torch.equal(u, torch.zeros(5, 3, device=device)) and torch.equal(t, bias.expand(5, 7))
    dy = torch.randn(5, 7, device=device)
    dxt, dA, dB = cuda_lora.backward_terms(dy, x, a, bb, u, state, None, True, True, True)
    assert dxt.shape == (5, 0) and dA.shape == (2, 0)
    assert_close_to_ref("K = 0 dB", dB, torch.zeros(7, 2, dtype=torch.float64, device=device), dtype=torch.float32)

    x, a, bb = torch.randn(5, 40, device=device), torch.randn(3, 40, device=device), torch.randn(0, 3, device=device)
    u, t = cuda_lora.forward_terms(x, a, bb, None, 0.5, None, 0.0)
    assert t.shape == (5, 0)
    assert_close_to_ref("N = 0 u", u, 0.5 * x.double() @ a.double().t(), dtype=torch.float32)
    dxt, dA, dB = cuda_lora.backward_terms(torch.zeros(5, 0, device=device), x, a, bb, u, state, None, True, True, True)
    assert torch.count_nonzero(dxt) == 0 and torch.count_nonzero(dA) == 0 and dB.shape == (0, 2)

    x, bb = torch.randn(0, 40, device=device), torch.randn(7, 3, device=device)
    u = torch.zeros(0, 3, device=device)
    dxt, dA, dB = cuda_lora.backward_terms(torch.zeros(0, 7, device=device), x, a, bb, u, state, None, True, True, True)
    assert dxt.shape == (0, 40) and torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0
    assert dA.shape == (2, 40) and dB.shape == (7, 2)


def test_empty_dimensions_in_the_launchers():
    check_empty_dimensions_in_the_launchers()


# (M, K, N, r, frozen_rank, dtype, SMs): the benchmark shapes, awkward ones, several rank chunks, fp32's narrower
# tiles, a device of one SM.
PLAN_CASES = [
    (8192, 4096, 4096, 16, 0, torch.bfloat16, 132),
    (8192, 4096, 11008, 16, 0, torch.bfloat16, 132),
    (8192, 11008, 4096, 64, 0, torch.float16, 132),
    (113, 300, 77, 40, 20, torch.float32, 132),
    (4097, 72, 40, 80, 70, torch.bfloat16, 108),
    (1, 40, 24, 1, 0, torch.float32, 1),
    (530, 1030, 600, 33, 0, torch.bfloat16, 1),
]


def check_plan_mirror(module):
    """treelora.kernels.cuda.lora.launch_plan (the byte model's planner) agrees with ``module.lora_plan``, the
    extension's own, for every subset of requested gradients (tests/test_cuda_extension.py and the emulated lane)."""
    for M, K, N, r, f, dtype, sms in PLAN_CASES:
        for needs in [(True, True, True), *GRADIENT_SUBSETS]:
            code = cuda_lora.cc.dtype_code(torch.empty(0, dtype=dtype), "x")
            got = module.lora_plan(M, K, N, r, f, code, sms, *needs)
            mirror = cuda_lora.launch_plan(M, K, N, r, f, dtype, sms, *needs)
            assert got == dataclasses.asdict(mirror), f"{(M, K, N, r, f, dtype, sms, needs)}: {got} != {mirror}"


def check_autograd_through_the_op(dtype, device=DEVICE):
    """lora_linear on (batch, seq, K) with a non-contiguous x: the shared autograd Function pads frozen gradients."""
    x, w, b, a, bb = _inputs(3 * 33, 96, 80, 16, dtype, contiguous=False, device=device)
    x = x.reshape(3, 33, 96)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    with use_backend("cuda"):
        y = lora_linear(x, w, b, a, bb, 0.25, frozen_rank=4)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, g64 = _reference(
        x.detach().reshape(-1, 96), w, b, a.detach(), bb.detach(), 0.25, 0.0, 4, dy.reshape(-1, 80), None, torch.float64
    )
    y_base, g_base = _reference(
        x.detach().reshape(-1, 96), w, b, a.detach(), bb.detach(), 0.25, 0.0, 4, dy.reshape(-1, 80), None, dtype
    )
    assert_close_to_ref("y", y.reshape(-1, 80), y64, y_base, dtype=dtype)
    assert_close_to_ref("dx", x.grad.reshape(-1, 96), g64[0], g_base[0], dtype=dtype)
    assert torch.count_nonzero(a.grad[:4]) == 0 and torch.count_nonzero(bb.grad[:, :4]) == 0
    assert_close_to_ref("dA", a.grad[4:], g64[1], g_base[1], dtype=dtype)
    assert_close_to_ref("dB", bb.grad[:, 4:], g64[2], g_base[2], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_autograd_through_the_op(dtype):
    check_autograd_through_the_op(dtype)


def _nan_padded(rows, cols, dtype, device, scale=1.0):
    """A (rows, cols) column slice of a wider buffer whose extra columns hold NaN; the row stride is a multiple of 8
    elements, so rows stay 16-byte aligned and the vector paths run up to a row end that is not a multiple of 8."""
    buf = torch.full((rows, (cols + 7) // 8 * 8 + 8), float("nan"), device=device)
    buf[:, :cols] = torch.randn(rows, cols, device=device) * scale
    return buf.to(dtype)[:, :cols]


def check_padding_outside_the_views_is_never_read(dtype, shape=(45, 203, 77), r=12, device=DEVICE):
    """x, dy and lora_A are views into wider buffers with NaN beyond each row: an element read past a row's end
    would turn some output NaN. Dropout on and a frozen part, so every kernel reads x or dy."""
    M, K, N = shape
    x = _nan_padded(M, K, dtype, device)
    dy = _nan_padded(M, N, dtype, device)
    a = _nan_padded(r, K, torch.float32, device, scale=K**-0.5)
    _, w, b, _, bb = _inputs(M, K, N, r, dtype, device=device)
    y, grads, mask = _launch(x, w, b, a, bb, 0.5, 0.25, 4, dy)
    _compare(f"padded {dtype} {shape}", dtype, y, grads, x, w, b, a, bb, 0.5, 0.25, 4, dy, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_padding_outside_the_views_is_never_read(dtype):
    check_padding_outside_the_views_is_never_read(dtype)


def check_dropout_mask_follows_the_torch_seed(device=DEVICE):
    x, w, b, a, bb = _inputs(64, 128, 32, 8, torch.bfloat16, device=device)
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        with use_backend("cuda"):
            outs.append(lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=True))
    assert torch.equal(outs[0], outs[1])
    with use_backend("cuda"):
        third = lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=True)
    assert not torch.equal(outs[0], third), "a fresh seed must give a fresh mask"


def test_dropout_mask_follows_the_torch_seed():
    check_dropout_mask_follows_the_torch_seed()


def check_disabled_adapter_is_bitwise_the_base_op(device=DEVICE):
    x, w, b, a, bb = _inputs(77, 64, 48, 8, torch.bfloat16, device=device)
    with use_backend("cuda"):
        y = lora_linear(x, w, b, a, bb, 0.0)
    assert torch.equal(y, torch.nn.functional.linear(x, w, b))


def test_disabled_adapter_is_bitwise_the_base_op():
    check_disabled_adapter_is_bitwise_the_base_op()


def check_empty_batch(device=DEVICE):
    x, w, b, a, bb = _inputs(0, 64, 48, 8, torch.float32, device=device)
    dy = torch.zeros(0, 48, device=device)
    y, (dx, dA, dB), _ = _launch(x, w, b, a, bb, 1.0, 0.0, 2, dy)
    assert y.shape == (0, 48) and dx.shape == (0, 64)
    assert torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0 and dA.shape == (6, 64)


def test_empty_batch():
    check_empty_batch()


@pytest.mark.parametrize("s_on_cpu", [True, False], ids=["s-cpu", "s-on-gpu"])
@pytest.mark.parametrize("s_grad", [False, True], ids=["s-frozen", "s-trainable"])
def test_tensor_scaling_matches_reference_without_host_syncs(s_grad, s_on_cpu, monkeypatch):
    """A 0-dim tensor scaling on the cuda backend (the checks of tests/test_ops_lora_routing.py)."""
    device = torch.device(DEVICE)
    routing.check_tensor_scaling("cuda", torch.float32, "cpu" if s_on_cpu else device, s_grad, monkeypatch, device)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_autocast_matches_stock_lora(grad):
    routing.check_autocast_matches_stock_lora("cuda", grad, True, device=torch.device(DEVICE))


def check_reproducible(shape=(1000, 1024, 512), dropout_p=0.0, device=DEVICE, between=None):
    """Two launches give the same bits; ``between()``, when given, runs between them (the emulated lane reverses the
    order of blocks and threads there). With dropout both draw the same seed."""
    M, K, N = shape
    x, w, b, a, bb = _inputs(M, K, N, 16, torch.bfloat16, device=device)
    dy = torch.randn(M, N, device=device).to(torch.bfloat16)
    torch.manual_seed(7)
    first = _launch(x, w, b, a, bb, 0.5, dropout_p, 4, dy)
    if between is not None:
        between()
    torch.manual_seed(7)
    again = _launch(x, w, b, a, bb, 0.5, dropout_p, 4, dy)
    assert torch.equal(first[0], again[0])
    for g1, g2 in zip(first[1], again[1]):
        assert torch.equal(g1, g2)


def test_results_are_bitwise_reproducible():
    check_reproducible()


@pytest.mark.requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_agrees_with_the_triton_backend(dtype):
    x, w, b, a, bb = _inputs(300, 256, 192, 16, dtype)
    if backends.explain("lora_linear", x, w, b, a, bb, 0.5, 0.0, 0)["triton"]:
        pytest.skip("the triton backend cannot run here")
    y64, _ = _reference(x, w, b, a, bb, 0.5, 0.0, 0, torch.zeros(300, 192, device=DEVICE), None, torch.float64)
    y_base, _ = _reference(x, w, b, a, bb, 0.5, 0.0, 0, torch.zeros(300, 192, device=DEVICE), None, dtype)
    for name in ("cuda", "triton"):  # both held to the same oracle and tolerance
        with use_backend(name):
            y = lora_linear(x, w, b, a, bb, 0.5)
        assert_close_to_ref(f"{name} y", y, y64, y_base, dtype=dtype)
