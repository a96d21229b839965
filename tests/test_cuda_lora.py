"""The cuda backend of lora_linear against the float64 reference (and the Triton backend when it can run): forward
and the gradients of x, A and B for fp32/fp16/bf16, ranks 1, 8, 16, 64, awkward sizes, non-contiguous x, dropout
on and off (the mask regenerated from the seed, never stored), stacked frozen + trainable adapters, a disabled adapter
(bitwise the base op) and run-to-run reproducibility. Needs a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.utils import assert_close_to_ref
from treelora import backends, use_backend
from treelora.kernels.cuda_lora import CUDA_LAUNCHER
from treelora.ops.lora_linear import lora_linear, lora_linear_ref

pytestmark = [pytest.mark.requires_cuda, pytest.mark.requires_cuda_ext]
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): one typical shape, then awkward ones (M = 1, sizes off every tile and vector width, long K).
SHAPES = [(256, 512, 384), (1, 40, 24), (113, 300, 77), (37, 4100, 9), (4097, 72, 40)]


def _inputs(M, K, N, r, dtype, bias=True, contiguous=True):
    x = torch.randn(M, 2 * K if not contiguous else K, device=DEVICE).to(dtype)
    if not contiguous:
        x = x[:, ::2]  # column stride 2
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    a = torch.randn(r, K, device=DEVICE) / K**0.5  # adapters in fp32 with low-precision activations: the common case
    bb = torch.randn(N, r, device=DEVICE)
    return x, w, b, a, bb


def _launch(x, w, b, a, bb, s, p, f, dy):
    """Forward and backward through the cuda launcher; returns y, (dx, dA, dB) and the regenerated keep mask."""
    y, saved, state = CUDA_LAUNCHER.forward(x, w, b, a, bb, s, p, f, True)
    dx, dA, dB = CUDA_LAUNCHER.backward(dy, saved, state, True, True, True)
    return y, (dx, dA, dB), CUDA_LAUNCHER.dropout_mask(saved, state)


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


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_matches_reference(dtype, shape, dropout_p):
    M, K, N = shape
    x, w, b, a, bb = _inputs(M, K, N, 8, dtype)
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    y, grads, mask = _launch(x, w, b, a, bb, 0.5, dropout_p, 0, dy)
    assert (mask is None) == (dropout_p == 0.0)
    if mask is not None:
        kept = mask.float().mean().item()
        assert abs(kept - (1 - dropout_p)) < 0.05 + 3 / mask.numel() ** 0.5, f"kept fraction {kept}"
    _compare(f"{dtype} {shape}", dtype, y, grads, x, w, b, a, bb, 0.5, dropout_p, 0, dy, mask)


@pytest.mark.parametrize("r", [1, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_ranks_and_stacked_adapters(dtype, r):
    M, K, N = 130, 200, 150
    f = r // 2  # frozen rows of A / columns of B; r = 1 has none
    x, w, b, a, bb = _inputs(M, K, N, r, dtype, bias=False)
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    y, grads, mask = _launch(x, w, b, a, bb, 2.0 / r, 0.1, f, dy)
    assert grads[1].shape == (r - f, K) and grads[2].shape == (N, r - f)
    _compare(f"r={r} f={f}", dtype, y, grads, x, w, b, a, bb, 2.0 / r, 0.1, f, dy, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_autograd_through_the_op(dtype):
    """lora_linear on (batch, seq, K) with a non-contiguous x: the shared autograd Function pads frozen gradients."""
    x, w, b, a, bb = _inputs(3 * 33, 96, 80, 16, dtype, contiguous=False)
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


def test_dropout_mask_follows_the_torch_seed():
    x, w, b, a, bb = _inputs(64, 128, 32, 8, torch.bfloat16)
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        with use_backend("cuda"):
            outs.append(lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=True))
    assert torch.equal(outs[0], outs[1])
    with use_backend("cuda"):
        third = lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=True)
    assert not torch.equal(outs[0], third), "a fresh seed must give a fresh mask"


def test_disabled_adapter_is_bitwise_the_base_op():
    x, w, b, a, bb = _inputs(77, 64, 48, 8, torch.bfloat16)
    with use_backend("cuda"):
        y = lora_linear(x, w, b, a, bb, 0.0)
    assert torch.equal(y, torch.nn.functional.linear(x, w, b))


def test_empty_batch():
    x, w, b, a, bb = _inputs(0, 64, 48, 8, torch.float32)
    dy = torch.zeros(0, 48, device=DEVICE)
    y, (dx, dA, dB), _ = _launch(x, w, b, a, bb, 1.0, 0.0, 2, dy)
    assert y.shape == (0, 48) and dx.shape == (0, 64)
    assert torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0 and dA.shape == (6, 64)


def test_results_are_bitwise_reproducible():
    x, w, b, a, bb = _inputs(1000, 1024, 512, 16, torch.bfloat16)
    dy = torch.randn(1000, 512, device=DEVICE).to(torch.bfloat16)
    first = _launch(x, w, b, a, bb, 0.5, 0.0, 4, dy)
    again = _launch(x, w, b, a, bb, 0.5, 0.0, 4, dy)
    assert torch.equal(first[0], again[0])
    for g1, g2 in zip(first[1], again[1]):
        assert torch.equal(g1, g2)


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
