"""The torch backend of lora_linear (the CPU path of LoRALinear, treelora/kernels/torch/lora.py) against
lora_linear_ref in float64: awkward M, ranks, non-contiguous x, frozen stacks, dropout with the mask regenerated
through ``lora_linear_dropout_mask``."""

from __future__ import annotations

import pytest
import torch

from tests.utils import assert_close_to_ref
from treelora import use_backend
from treelora.kernels.torch import lora as torch_lora
from treelora.ops.lora_linear import lora_linear, lora_linear_ref

K, N = 40, 24  # K, N not multiples of 16 on purpose


def _inputs(M, r, dtype=torch.float64, bias=True, contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    else:  # a transposed view: stride (1, M)
        x = torch.randn(K, M, generator=gen, dtype=torch.float64).t()
    w = torch.randn(N, K, generator=gen, dtype=torch.float64) / K**0.5
    b = torch.randn(N, generator=gen, dtype=torch.float64) if bias else None
    A = torch.randn(r, K, generator=gen, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=gen, dtype=torch.float64)
    dy = torch.randn(M, N, generator=gen, dtype=torch.float64)
    cast = [t if t is None else t.to(dtype) for t in (x, w, b, A, B, dy)]
    return cast


def _grads(fn, x, A, B, dy):
    x, A, B = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    y = fn(x, A, B)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed-x"])
@pytest.mark.parametrize("frozen_rank", [0, 1])
@pytest.mark.parametrize("M", [0, 1, 113])
@pytest.mark.parametrize("r", [1, 3, 8])
def test_torch_launcher_float64_matches_reference(r, M, frozen_rank, contiguous):
    x, w, b, A, B, dy = _inputs(M, r, contiguous=contiguous)
    s = 1.75
    with use_backend("torch"):
        got = _grads(lambda x_, A_, B_: lora_linear(x_, w, b, A_, B_, s, frozen_rank=frozen_rank), x, A, B, dy)
    ref = _grads(lambda x_, A_, B_: lora_linear_ref(x_, w, b, A_, B_, s, frozen_rank=frozen_rank), x, A, B, dy)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, ref):
        assert_close_to_ref(name, g, e)
    assert torch.count_nonzero(got[2][:frozen_rank]) == 0 and torch.count_nonzero(got[3][:, :frozen_rank]) == 0
    if M and frozen_rank < r:
        assert torch.count_nonzero(got[2][frozen_rank:]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_torch_launcher_low_precision_within_twice_torch_error(dtype, bias):
    x, w, b, A, B, dy = _inputs(257, 8, bias=bias)
    low = [t if t is None else t.to(dtype) for t in (x, w, b, A, B, dy)]
    ref = _grads(lambda x_, A_, B_: lora_linear_ref(x_, w, b, A_, B_, 0.5), x, A, B, dy)
    xl, wl, bl, Al, Bl, dyl = low
    baseline = _grads(lambda x_, A_, B_: lora_linear_ref(x_, wl, bl, A_, B_, 0.5), xl, Al, Bl, dyl)
    with use_backend("torch"):
        got = _grads(lambda x_, A_, B_: lora_linear(x_, wl, bl, A_, B_, 0.5), xl, Al, Bl, dyl)
    for name, g, e, base in zip(("y", "dx", "dA", "dB"), got, ref, baseline):
        assert g.dtype == dtype
        assert_close_to_ref(name, g, e, baseline=base)


def test_torch_launcher_stacked_adapters_float64():
    # three adapters of ranks 2, 3 and 4 stacked, the last trainable: output is the sum, gradients only for it
    x, w, b, A, B, dy = _inputs(50, 9, seed=3)
    with use_backend("torch"):
        got = _grads(lambda x_, A_, B_: lora_linear(x_, w, b, A_, B_, 0.3, frozen_rank=5), x, A, B, dy)
    parts = [(0, 2), (2, 5), (5, 9)]
    y_ref = x @ w.t() + b + sum(0.3 * (x @ A[i:j].t()) @ B[:, i:j].t() for i, j in parts)
    assert_close_to_ref("y", got[0], y_ref)
    du = dy @ B[:, 5:] * 0.3
    assert_close_to_ref("dA", got[2][5:], du.t() @ x)
    assert_close_to_ref("dB", got[3][:, 5:], dy.t() @ (0.3 * x @ A[5:].t()))
    assert torch.count_nonzero(got[2][:5]) == 0 and torch.count_nonzero(got[3][:, :5]) == 0


@pytest.mark.parametrize("frozen_rank", [0, 2])
@pytest.mark.parametrize("M", [1, 113])
def test_torch_launcher_dropout_mask_regenerated_matches_reference(M, frozen_rank):
    p, s = 0.3, 1.5
    x, w, b, A, B, dy = _inputs(M, 4, seed=7)
    y, saved, state = torch_lora.lora_linear_fwd(x, w, b, A, B, s, p, frozen_rank, True)
    mask = torch_lora.lora_linear_dropout_mask(saved, state)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    dx, dA, dB = torch_lora.lora_linear_bwd(dy, saved, state, True, True, True)
    ref = _grads(lambda x_, A_, B_: lora_linear_ref(x_, w, b, A_, B_, s, p, mask, frozen_rank), x, A, B, dy)
    assert_close_to_ref("y", y, ref[0])
    assert_close_to_ref("dx", dx, ref[1])
    assert_close_to_ref("dA", dA, ref[2][frozen_rank:])
    assert_close_to_ref("dB", dB, ref[3][:, frozen_rank:])


def test_torch_launcher_dropout_keep_rate():
    p = 0.2
    x, w, b, A, B, _ = _inputs(400, 4, seed=9)
    _, saved, state = torch_lora.lora_linear_fwd(x, w, b, A, B, 1.0, p, 0, True)
    mask = torch_lora.lora_linear_dropout_mask(saved, state)
    rate = mask.double().mean().item()
    sd = (p * (1 - p) / mask.numel()) ** 0.5
    print(f"keep rate {rate:.4f}, expected {1 - p}, sd {sd:.4f}")
    assert abs(rate - (1 - p)) < 5 * sd
    _, saved, state = torch_lora.lora_linear_fwd(x, w, b, A, B, 1.0, 0.0, 0, True)
    assert torch_lora.lora_linear_dropout_mask(saved, state) is None


def test_torch_launcher_zero_scaling_is_the_base_linear_bitwise():
    x, w, b, A, B, dy = _inputs(33, 4, dtype=torch.float32)
    with use_backend("torch"):
        y, dx, dA, dB = _grads(lambda x_, A_, B_: lora_linear(x_, w, b, A_, B_, 0.0), x, A, B, dy)
    xb = x.clone().requires_grad_(True)
    yb = torch.nn.functional.linear(xb, w, b)
    yb.backward(dy)
    assert torch.equal(y, yb.detach()) and torch.equal(dx, xb.grad)
    assert torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0


def test_torch_launcher_without_grad_saves_nothing():
    x, w, b, A, B, _ = _inputs(20, 3)
    y, saved, _ = torch_lora.lora_linear_fwd(x, w, b, A, B, 1.0, 0.0, 0, False)
    assert saved == () and y.shape == (20, N)
    with use_backend("torch"), torch.no_grad():
        assert_close_to_ref("y", lora_linear(x, w, b, A, B, 1.0), lora_linear_ref(x, w, b, A, B, 1.0))


def test_lora_linear_bad_inputs_name_the_argument():
    x, w, b, A, B, _ = _inputs(5, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="lora_A has rank 0"):
        lora_linear(x, w, b, A[:0], B[:, :0], 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        lora_linear(x, w, b, A, B[:, :2], 1.0)
    with pytest.raises(ValueError, match="x's last dimension"):
        lora_linear(x[:, :7], w, b, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, b, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="frozen_rank"):
        lora_linear(x, w, b, A, B, 1.0, frozen_rank=4)
