"""Triton fused LoRA linear (treelora/kernels/triton/lora.py) against the float64 reference.

Kernel tests carry the ``interpreter`` marker: on CPU they run under ``TRITON_INTERPRET=1`` (the interpreter lane of
`make test`), on a GPU machine natively. Each compares y, dx, dA and dB with ``lora_linear_ref`` on fp64 inputs through
the tolerance rule (tests/utils.py), the baseline being the same reference in the inputs' own precision. Dropout is
checked by regenerating the kernels' mask with ``lora_linear_dropout_mask`` and feeding it to the reference. The
backend is launched as the ops layer launches it (``launch_forward``: empty inputs and a zero scale routed to the torch
backend). Every GEMM path is covered: the persistent TMA kernel (16-bit operands whose rows TMA can address), the
pointer kernel (the rest, and tma=False), several persistent programs, and cuBLAS with the in-place expand. The checks
of the configuration table, the compile specs and the reasons run in the CPU lane.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import INTERPRET
from tests.utils import assert_close_to_ref

pytest.importorskip("triton")

from treelora import use_backend  # noqa: E402
from treelora.kernels.triton import compile_specs, lora_configs  # noqa: E402
from treelora.kernels.triton import lora as kernels  # noqa: E402
from treelora.ops.lora_linear import (  # noqa: E402
    LoRALinearFunction,
    launch_backward,
    launch_dropout_mask,
    launch_forward,
    lora_linear,
    lora_linear_ref,
)

DEVICE = "cpu" if INTERPRET else "cuda"
interpreter = pytest.mark.interpreter

# (M, K, N): K and N are not multiples of 16 or of the interpreter's 32-wide tiles; M = 113 spans four row tiles.
SHAPE = (113, 40, 24)


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True, seed=0):
    """x (M, K), W (N, K), b (N,), A (r, K), B (N, r) with B non-zero (a fresh adapter's zero B hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    x = rand(M, K)
    w = rand(N, K, scale=K**-0.5)
    b = rand(N) if bias else None
    a = rand(r, K, scale=K**-0.5, dt=adapter_dtype)
    bb = rand(N, r, scale=0.5, dt=adapter_dtype)
    dy = rand(M, N)
    return x, w, b, a, bb, dy


def run_launcher(impl, x2d, w, b, a, bb, s, p, f, dy):
    """Forward and backward through a backend module directly; returns y, dx, dA, dB (trainable slices) and the
    mask."""
    y, saved, launch = launch_forward(impl, x2d, w, b, a, bb, s, p, f, True)
    mask = launch_dropout_mask(saved, launch)
    dx, dA, dB = launch_backward(dy, saved, launch, True, True, True)
    return y, dx, dA, dB, mask


def with_config(cfg):
    """The triton backend with a fixed kernel configuration instead of the table's."""
    return SimpleNamespace(
        lora_linear_fwd=functools.partial(kernels.lora_linear_fwd, config=cfg),
        lora_linear_bwd=kernels.lora_linear_bwd,
        lora_linear_dropout_mask=kernels.lora_linear_dropout_mask,
    )


def reference(x, w, b, a, bb, s, p, mask, f, dy, dtype=None):
    """lora_linear_ref forward + backward, in fp64 (dtype=float64) or in the inputs' own precision (dtype=None)."""

    def cast(t):
        return None if t is None else (t.detach().to(dtype) if dtype else t.detach())

    xr, ar, br = (cast(t).requires_grad_() for t in (x, a, bb))
    y = lora_linear_ref(xr, cast(w), cast(b), ar, br, s, p, mask, f)
    y.backward(cast(dy))
    return y.detach(), xr.grad, ar.grad[f:], br.grad[:, f:]


def check(tag, outs, x, w, b, a, bb, s, p, mask, f, dy):
    """Every output within the tolerance rule of its fp64 reference (baseline: the inputs' own precision)."""
    ref64 = reference(x, w, b, a, bb, s, p, mask, f, dy, torch.float64)
    base = reference(x, w, b, a, bb, s, p, mask, f, dy)
    for name, out, r64, rb in zip(("y", "dx", "dA", "dB"), outs, ref64, base):
        assert out.dtype == (a.dtype if name == "dA" else bb.dtype if name == "dB" else x.dtype), name
        assert_close_to_ref(f"{tag} {name}", out, r64, rb, dtype=x.dtype)


def config(M, r, dtype, **changes):
    """The configuration the launcher would pick on this device, with ``changes``."""
    return dataclasses.replace(kernels.config_for(torch.device(DEVICE), M, r, dtype), **changes)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    # warn_only: cuBLAS would otherwise demand CUBLAS_WORKSPACE_CONFIG; the flag the launcher reads is the same.
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@interpreter
@pytest.mark.parametrize("r", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, r):
    M, K, N = SHAPE
    x, w, b, a, bb, dy = make_inputs(M, K, N, r, dtype)
    s = 2.0 / r
    outs = run_launcher(kernels, x, w, b, a, bb, s, 0.0, 0, dy)
    assert outs[4] is None
    check(f"{dtype} r={r}", outs[:4], x, w, b, a, bb, s, 0.0, None, 0, dy)


@interpreter
@pytest.mark.parametrize("M", [0, 1, 113])
@pytest.mark.parametrize("K, N", [(17, 72), (40, 1), (1, 24)], ids=["K17-N72", "K40-N1", "K1-N24"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_awkward_shapes(dtype, M, K, N):
    x, w, b, a, bb, dy = make_inputs(M, K, N, 3, dtype)
    outs = run_launcher(kernels, x, w, b, a, bb, 0.5, 0.0, 0, dy)
    check(f"M={M} K={K} N={N}", outs[:4], x, w, b, a, bb, 0.5, 0.0, None, 0, dy)


@interpreter
@pytest.mark.parametrize("r, frozen", [(8, 0), (19, 16)], ids=["single", "stacked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_reference_with_regenerated_mask(dtype, r, frozen):
    M, K, N = SHAPE
    p = 0.25
    x, w, b, a, bb, dy = make_inputs(M, K, N, r, dtype)
    y, dx, dA, dB, mask = run_launcher(kernels, x, w, b, a, bb, 1.5, p, frozen, dy)
    assert mask is not None and mask.dtype == torch.bool and mask.shape == x.shape
    keep = mask.float().mean().item()
    assert abs(keep - (1 - p)) < 0.03, f"keep rate {keep:.3f}, expected {1 - p}"  # 4520 draws: 3 % is 4.7 sigma
    check(f"{dtype} p={p} f={frozen}", (y, dx, dA, dB), x, w, b, a, bb, 1.5, p, mask, frozen, dy)


@interpreter
def test_dropout_mask_is_drawn_per_call_from_torchs_generator():
    M, K, N = SHAPE
    x, w, b, a, bb, dy = make_inputs(M, K, N, 4, torch.float32)

    def mask_of_a_forward():
        _, saved, launch = launch_forward(kernels, x, w, b, a, bb, 1.0, 0.5, 0, True)
        return launch_dropout_mask(saved, launch)

    torch.manual_seed(7)
    first, second = mask_of_a_forward(), mask_of_a_forward()
    torch.manual_seed(7)
    again = mask_of_a_forward()
    assert torch.equal(first, again), "the same torch seed must give the same mask"
    assert not torch.equal(first, second), "consecutive calls must draw new masks"


@interpreter
@pytest.mark.parametrize("r, frozen", [(8, 3), (19, 16), (5, 5)], ids=["8-f3", "19-f16", "all-frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stacked_adapters_through_the_function(dtype, r, frozen):
    """The shared autograd Function pads the frozen slice with zero gradients; dx includes every adapter."""
    M, K, N = SHAPE
    x, w, b, a, bb, dy = make_inputs(M, K, N, r, dtype)
    xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, bb))
    y = LoRALinearFunction.apply(xg, w, b, ag, bg, 0.8, 0.0, frozen, kernels)
    y.backward(dy)
    assert torch.count_nonzero(ag.grad[:frozen]) == 0 and torch.count_nonzero(bg.grad[:, :frozen]) == 0
    check(f"{dtype} r={r} f={frozen}", (y, xg.grad, ag.grad[frozen:], bg.grad[:, frozen:]), x, w, b, a, bb, 0.8, 0.0,
          None, frozen, dy)  # fmt: skip


@interpreter
@pytest.mark.parametrize("base", ["fused", "cublas"])
@pytest.mark.parametrize("mode", ["atomic", "deterministic"])
def test_reduction_modes_and_base_strategies(mode, base):
    """Split-K shrink, split-M dA and multi-block dB in both reduction modes; deterministic runs are bitwise equal."""
    M, K, N = SHAPE
    dtype, r, f, p = torch.float16, 19, 3, 0.125
    x, w, b, a, bb, dy = make_inputs(M, K, N, r, dtype)
    cfg = config(M, r, dtype, forward_base=base, grad_base=base, split_k=2, split_m=3)
    launcher = with_config(cfg)
    with deterministic_algorithms(mode == "deterministic"):
        torch.manual_seed(3)
        first = run_launcher(launcher, x, w, b, a, bb, 0.6, p, f, dy)
        torch.manual_seed(3)
        second = run_launcher(launcher, x, w, b, a, bb, 0.6, p, f, dy)
    if mode == "deterministic":
        for name, one, two in zip(("y", "dx", "dA", "dB", "mask"), first, second):
            assert torch.equal(one, two), f"{name} differs between two deterministic runs"
    check(f"{mode} {base}", first[:4], x, w, b, a, bb, 0.6, p, first[4], f, dy)


# The GEMM paths of lora.py's fused GEMM and the cuBLAS alternative, as LoRAConfig changes.
GEMM_PATHS = {
    "tma": dict(tma=True),
    "tma-3-programs": dict(tma=True, max_programs=3),  # each program takes several tiles of the persistent loop
    "pointer": dict(tma=False),
    "cublas-expand": dict(forward_base="cublas", grad_base="cublas", side_stream=True),
}


@interpreter
@pytest.mark.parametrize("path", list(GEMM_PATHS))
@pytest.mark.parametrize("p, r, frozen", [(0.0, 3, 0), (0.25, 19, 16)], ids=["r3", "dropout-stacked-r19"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemm_paths_match_reference(dtype, p, r, frozen, path):
    """Every way the base GEMM and the LoRA slice meet, with 3 column tiles and 4 row tiles (N = 72, M = 113)."""
    M, K, N = 113, 40, 72
    x, w, b, a, bb, dy = make_inputs(M, K, N, r, dtype)
    launcher = with_config(config(M, r, dtype, **GEMM_PATHS[path]))
    outs = run_launcher(launcher, x, w, b, a, bb, 0.7, p, frozen, dy)
    check(f"{path} {dtype} p={p} r={r} f={frozen}", outs[:4], x, w, b, a, bb, 0.7, p, outs[4], frozen, dy)


@interpreter
@pytest.mark.parametrize(
    "dtype, K, N, x_row_pad, expected",
    [
        (torch.bfloat16, 40, 24, 0, 2),  # rows of 80 and 48 bytes: both GEMMs go through TMA
        (torch.float16, 17, 24, 0, 0),  # x's, W's and dx's rows are 34 bytes, not a multiple of 16
        (torch.bfloat16, 40, 12, 0, 0),  # y's and dy's rows are 24 bytes
        (torch.bfloat16, 40, 24, 3, 1),  # x read in place with rows 86 bytes apart: only the dx GEMM uses TMA
        (torch.float32, 40, 24, 0, 0),  # fp32 takes the pointer kernel (an IEEE fp32 product is no wgmma job)
    ],
    ids=["aligned", "K17", "N12", "x-row-stride", "fp32"],
)
def test_tma_kernel_runs_where_tma_can_address_the_operands(monkeypatch, dtype, K, N, x_row_pad, expected):
    calls = []
    real = kernels.lora_gemm_tma

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "lora_gemm_tma", spy)
    M, r = 50, 4
    x, w, b, a, bb, dy = make_inputs(M, K, N, r, dtype)
    if x_row_pad:
        x = torch.cat([x, x[:, :x_row_pad]], dim=1)[:, :K]
    launcher = with_config(config(M, r, dtype, tma=True, forward_base="fused", grad_base="fused"))
    outs = run_launcher(launcher, x, w, b, a, bb, 0.5, 0.0, 0, dy)
    assert len(calls) == expected, calls
    check(f"{dtype} K={K} N={N}", outs[:4], x, w, b, a, bb, 0.5, 0.0, None, 0, dy)


def _philox4x32(counter: int, seed: int) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al., SC 2011) of the 64-bit counter (low, high, 0, 0) under the 64-bit key ``seed``."""
    mask = 0xFFFFFFFF
    c0, c1, c2, c3 = counter & mask, counter >> 32, 0, 0
    k0, k1 = seed & mask, seed >> 32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


def _uniform(word: int) -> np.float32:
    """A 32-bit word as the float in [0, 1) the kernels compare with p: its int32 value folded onto [0, 2^31)
    (x < 0 -> -x - 1) times 2^-31, in float32 arithmetic."""
    x = word - (1 << 32) if word >= 1 << 31 else word
    x = -x - 1 if x < 0 else x
    return np.float32(x) * np.float32(4.6566127342e-10)


@interpreter
def test_dropout_mask_takes_one_philox_draw_per_four_elements():
    """Element (row, col) of the (M, K) keep-mask is word col % 4 of Philox(row · ceil(K/4) + col // 4): one draw
    serves four consecutive elements; an independent Philox4x32-10 regenerates the kernels' mask bit for bit."""
    M, K, p = 6, 13, 0.3
    seed_value = 0x1234_5678_9ABC_DEF
    seed = torch.tensor([seed_value], dtype=torch.int64, device=DEVICE)
    mask = kernels.dropout_keep_mask(seed, M, K, p).cpu()
    groups = -(-K // 4)
    expected = torch.zeros(M, K, dtype=torch.bool)
    for row in range(M):
        for g in range(groups):
            words = _philox4x32(row * groups + g, seed_value)
            for j in range(4):
                if 4 * g + j < K:
                    expected[row, 4 * g + j] = bool(_uniform(words[j]) >= np.float32(p))
    assert 0 < expected.sum() < M * K
    assert torch.equal(mask, expected), (mask ^ expected).nonzero()


@interpreter
@pytest.mark.parametrize("layout", ["row-stride", "last-dim-stride", "transposed-3d"])
def test_non_contiguous_x(layout):
    M, K, N = 114, 40, 24
    x, w, b, a, bb, dy = make_inputs(M, K, N, 8, torch.float16)
    if layout == "transposed-3d":
        # (57, 2, K) view of a (2, 57, K) tensor, through the public op (the Function reshapes it to 2-D).
        x3 = x.reshape(2, M // 2, K).transpose(0, 1)
        assert not x3.is_contiguous()
        dy3 = dy.reshape(M // 2, 2, N)
        xg, ag, bg = (t.clone().requires_grad_() for t in (x3, a, bb))
        with use_backend("triton"):
            y = lora_linear(xg, w, b, ag, bg, 0.5)
        y.backward(dy3)
        outs = (y.reshape(M, N), xg.grad.reshape(M, K), ag.grad, bg.grad)
        x, dy = x3.reshape(M, K), dy3.reshape(M, N)
    else:
        if layout == "row-stride":
            x = torch.cat([x, x[:, :7]], dim=1)[:, :K]  # rows 47 apart: read in place
        else:
            x = torch.stack([x, x], dim=2).flatten(1)[:, ::2]  # columns 2 apart: copied once
        assert not x.is_contiguous()
        outs = run_launcher(kernels, x, w, b, a, bb, 0.5, 0.0, 0, dy)[:4]
    check(layout, outs, x, w, b, a, bb, 0.5, 0.0, None, 0, dy)


@interpreter
@pytest.mark.parametrize(
    "dtype, adapter_dtype, weight_dtype",
    [
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float16, torch.float32, torch.float16),
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
    ],
    ids=["bf16-fp32-adapters", "fp16-fp32-adapters", "fp32-bf16-adapters", "bf16-fp32-weight"],
)
@pytest.mark.parametrize("base", ["fused", "cublas"])
def test_mixed_dtypes(dtype, adapter_dtype, weight_dtype, base):
    """Adapters (and the weight) in another dtype than x: computed in x's dtype, gradients in the adapters'."""
    M, K, N = SHAPE
    x, w, b, a, bb, dy = make_inputs(M, K, N, 8, dtype, adapter_dtype=adapter_dtype)
    w = w.to(weight_dtype)
    launcher = with_config(config(M, 8, dtype, forward_base=base, grad_base=base))
    outs = run_launcher(launcher, x, w, b, a, bb, 0.5, 0.0, 2, dy)[:4]
    # The reference computes in x's dtype after casting W, A and B to it: the same contract.
    check(f"{dtype} adapters {adapter_dtype} weight {weight_dtype}", outs, x, w, b, a, bb, 0.5, 0.0, None, 2, dy)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_scale_is_bitwise_the_base_op(dtype):
    M, K, N = SHAPE
    x, w, b, a, bb, dy = make_inputs(M, K, N, 4, dtype)
    y, dx, dA, dB, _ = run_launcher(kernels, x, w, b, a, bb, 0.0, 0.5, 0, dy)
    assert torch.equal(y, F.linear(x, w, b))
    assert torch.equal(dx, dy @ w)
    assert torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0


@interpreter
@pytest.mark.parametrize("needs", ["x-only", "adapters-only", "B-only"])
def test_partial_gradients(needs):
    """Only the requested gradients are produced (frozen adapters with a trainable input, and the reverse)."""
    M, K, N = SHAPE
    x, w, b, a, bb, dy = make_inputs(M, K, N, 8, torch.float32)
    flags = {"x-only": (True, False, False), "adapters-only": (False, True, True), "B-only": (False, False, True)}
    needs_dx, needs_dA, needs_dB = flags[needs]
    xg, ag, bg = (
        x.clone().requires_grad_(needs_dx),
        a.clone().requires_grad_(needs_dA),
        bb.clone().requires_grad_(needs_dB),
    )
    with use_backend("triton"):
        y = lora_linear(xg, w, b, ag, bg, 0.5)
    y.backward(dy)
    ref = reference(x, w, b, a, bb, 0.5, 0.0, None, 0, dy, torch.float64)
    base = reference(x, w, b, a, bb, 0.5, 0.0, None, 0, dy)
    for name, t, r64, rb in zip(("dx", "dA", "dB"), (xg, ag, bg), ref[1:], base[1:]):
        if t.requires_grad:
            assert_close_to_ref(f"{needs} {name}", t.grad, r64, rb)
        else:
            assert t.grad is None


@interpreter
def test_no_grad_forward_saves_nothing():
    M, K, N = SHAPE
    x, w, b, a, bb, _ = make_inputs(M, K, N, 8, torch.float32)
    y, saved, launch = launch_forward(kernels, x, w, b, a, bb, 0.5, 0.1, 0, False)
    assert saved == () and launch_dropout_mask(saved, launch) is None
    assert y.shape == (M, N)


@pytest.mark.requires_cuda
@pytest.mark.slow
@pytest.mark.parametrize(
    "K, N, r, p, frozen",
    [
        (4096, 4096, 16, 0.0, 0),
        (4096, 11008, 16, 0.0, 0),
        (11008, 4096, 16, 0.0, 0),
        (4096, 4096, 8, 0.0, 0),
        (4096, 4096, 64, 0.1, 0),
        (4096, 4096, 24, 0.1, 16),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_benchmark_shapes_on_gpu(dtype, K, N, r, p, frozen):
    """The table's GPU configurations at the benchmark shapes (M = 4096), against the fp64 reference on the GPU."""
    if INTERPRET:
        pytest.skip("native kernels only")
    M = 4096
    x, w, b, a, bb, dy = make_inputs(M, K, N, r, dtype, adapter_dtype=torch.float32)
    outs = run_launcher(kernels, x, w, b, a, bb, 2.0, p, frozen, dy)
    check(f"{dtype} K={K} N={N} r={r} p={p} f={frozen}", outs[:4], x, w, b, a, bb, 2.0, p, outs[4], frozen, dy)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("base", ["fused", "cublas"])
def test_side_stream_gives_the_serial_results(base):
    """dA (fused) or the shrink and du/dB (cublas) on the side stream: the same results as on the main stream."""
    if INTERPRET:
        pytest.skip("native kernels only")
    M, K, N, r = 1024, 256, 512, 16
    x, w, b, a, bb, dy = make_inputs(M, K, N, r, torch.bfloat16)
    results = []
    with deterministic_algorithms(True):
        for side in (False, True):
            cfg = config(M, r, torch.bfloat16, forward_base=base, grad_base=base, side_stream=side)
            torch.manual_seed(5)
            results.append(run_launcher(with_config(cfg), x, w, b, a, bb, 0.5, 0.1, 0, dy))
    for name, serial, overlapped in zip(("y", "dx", "dA", "dB", "mask"), *results):
        assert torch.equal(serial, overlapped), name


# --- CPU lane: the configuration table, compile specs and reasons -------------------------------------------------


def test_config_table_covers_every_family_and_bucket():
    for name, table in lora_configs.CONFIGS.items():
        for rows in ("few", "many"):
            for rank in ("narrow", "wide"):
                assert lora_configs.ShapeBucket(rows, rank) in table, (name, rows, rank)
    assert lora_configs.select_config("interpreter", 10**6, 256) is lora_configs.INTERPRETER_CONFIG
    assert (
        lora_configs.select_config("sm90", 8192, 16)
        is lora_configs.CONFIGS["sm90"][lora_configs.ShapeBucket("many", "narrow")]
    )
    assert (
        lora_configs.select_config("sm90", 1024, 64)
        is lora_configs.CONFIGS["sm90"][lora_configs.ShapeBucket("few", "wide")]
    )
    bench = lora_configs.select_config("sm90", 8192, 16)
    assert (bench.forward_base, bench.grad_base, bench.tma, bench.side_stream) == ("fused", "fused", True, True)
    fp32 = lora_configs.select_config("sm90", 8192, 16, element_size=4)
    assert (fp32.forward_base, fp32.grad_base) == ("cublas", "cublas")  # torch's own fp32 / TF32 setting applies
    assert lora_configs.family((9, 0)) == "sm90" and lora_configs.family((8, 6)) == "sm80"
    assert lora_configs.family(None) == "interpreter"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(forward_base="cutlass"), "forward_base"),
        (dict(max_block_r=24), "max_block_r"),
        (dict(split_k=0), "split_k"),
        (dict(gemm=lora_configs.GemmTiles(block_m=8)), "gemm"),
        (dict(expand=lora_configs.GemmTiles(block_r=24)), "expand"),
        (dict(max_programs=0), "max_programs"),
    ],
)
def test_config_rejects_bad_fields(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(lora_configs.INTERPRETER_CONFIG, **change)
    with pytest.raises(ValueError, match="family"):
        lora_configs.select_config("sm70", 8, 8)


@pytest.mark.skipif(INTERPRET, reason="compile specs are defined in the CPU lane")
def test_compile_specs_cover_every_kernel_dtype_and_dropout():
    specs = compile_specs.lora_specs(exhaustive=True)
    assert {s.name for s in compile_specs.lora_specs()} < {s.name for s in specs}
    kernels_seen = {s.kernel for s in specs}
    assert kernels_seen == {
        kernels._lora_shrink_kernel, kernels._lora_gemm_kernel, kernels._lora_gemm_tma_kernel,
        kernels._lora_dudb_kernel, kernels._lora_grad_a_kernel, kernels._dropout_keep_kernel,
    }  # fmt: skip
    operand = ("x_ptr", "c_ptr", "dy_ptr", "a_desc")
    for kernel in kernels_seen - {kernels._dropout_keep_kernel}:
        mine = [s for s in specs if s.kernel is kernel]
        dtypes = {next(v for k, v in s.signature.items() if k in operand).split("[")[0] for s in mine}
        expected = {"tensordesc<fp16", "tensordesc<bf16"} if kernel is kernels._lora_gemm_tma_kernel else {
            "*fp32", "*fp16", "*bf16"}  # fmt: skip
        assert dtypes == expected, kernel.__name__
        if "DROPOUT" in kernel.arg_names and kernel is not kernels._lora_dudb_kernel:
            assert {s.constexprs["DROPOUT"] for s in mine} == {False, True}, kernel.__name__
        assert all(s.constexprs["UPCAST"] is False for s in mine)
    # Each family's tiles compile for its own architecture, for every bucket of its table.
    for fam, capability in compile_specs.FAMILY_CAPABILITY.items():
        mine = [s for s in specs if s.name.startswith(fam + "/")]
        assert mine and all(s.capabilities == (capability,) for s in mine)
        table_tiles = {lora_configs.CONFIGS[fam][bucket].gemm for bucket in lora_configs.CONFIGS[fam]}
        spec_tiles = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"]) for s in mine if "gemm-forward" in s.name}
        assert {(t.block_m, t.block_n) for t in table_tiles} <= spec_tiles, fam


@pytest.mark.requires_triton
@pytest.mark.skipif(INTERPRET, reason="compile specs are defined in the CPU lane")
@pytest.mark.parametrize("family", ["sm80", "sm90"])
def test_fused_gemm_tiles_pipeline_within_shared_memory(family):
    """The interpreter forgives any tile size; a GPU refuses a launch whose pipelined tiles exceed shared memory."""
    specs = [s for s in compile_specs.bench_lora_specs() if s.name.startswith(f"{family}/gemm-")]
    assert specs
    for spec in specs:
        # aligned: as benchmark shapes specialise it
        compiled = compile_specs.compile_for_target(spec, int(family[2:]), aligned=True)
        shared = compiled.metadata.shared
        print(f"{spec.name}: {shared} bytes of shared memory")
        assert shared <= lora_configs.SHARED_MEMORY_LIMIT[family], f"{spec.name}: {shared} bytes of shared memory"
        copy = "async_tma_copy_global_to_local" if "-tma" in spec.name else "async_copy_global_to_local"
        assert copy in compiled.asm["ttgir"], f"{spec.name}: main loop not pipelined"


@pytest.mark.requires_triton
def test_tma_launch_runs_inside_the_device_guard(monkeypatch):
    """The persistent TMA GEMM launches inside env.device_guard of its output's device (as every launch must)."""
    guarded, launched = [], []

    @contextlib.contextmanager
    def guard(device):
        guarded.append(device)
        yield
        guarded.pop()

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, list(guarded)))

    monkeypatch.setattr(kernels.env, "device_guard", guard)
    monkeypatch.setattr(kernels, "_lora_gemm_tma_kernel", FakeKernel())
    x, w = torch.zeros(64, 32, dtype=torch.bfloat16), torch.zeros(48, 32, dtype=torch.bfloat16)
    u, v, out = torch.zeros(64, 4), torch.zeros(4, 48, dtype=torch.bfloat16), torch.empty(64, 48, dtype=torch.bfloat16)
    kernels.lora_gemm_tma(out, x, w, True, u, v, None, lora_configs.GemmTiles(32, 32, 32), programs=5)
    # 2 x 2 tiles of 32: 4 programs (no more than tiles), launched inside the guard of out's device.
    assert launched == [((4,), [out.device])]


def _tensors(device, dtype=torch.float32):
    return (torch.zeros(4, 8, dtype=dtype, device=device), torch.zeros(6, 8, dtype=dtype, device=device), None,
            torch.zeros(2, 8, dtype=dtype, device=device), torch.zeros(6, 2, dtype=dtype, device=device))  # fmt: skip


@pytest.mark.skipif(INTERPRET, reason="checks the kernels defined for a GPU")
def test_not_supported_reasons_name_the_argument():
    x, w, b, a, bb = _tensors("cpu")
    why = kernels.lora_linear_not_supported_reasons(x.double(), w, b, a.double(), bb, 1.0, 0.0, 0)
    assert any(r.startswith("x has dtype torch.float64") for r in why), why
    assert any(r.startswith("lora_A has dtype torch.float64") for r in why), why
    assert not any(r.startswith("weight has dtype") for r in why), why
    assert any(r.startswith("x is a CPU tensor") and "TRITON_INTERPRET=1" in r for r in why), why


@interpreter
def test_forced_triton_backend_raises_with_the_reasons():
    x, w, b, a, bb = _tensors(DEVICE, torch.float64)
    assert kernels.lora_linear_not_supported_reasons(*_tensors(DEVICE), 1.0, 0.0, 0) == []
    with use_backend("triton"), pytest.raises(RuntimeError, match="x has dtype torch.float64"):
        lora_linear(x, w, b, a, bb, 1.0)
