"""The cuda backend of masked_adamw_ / masked_sgd_ against the float64 reference and the torch backend, for every
selection form (all, bool/uint8 masks, index lists with duplicates, top-ρ density), fp32/fp16/bf16 parameters with
fp32 moments, awkward sizes, and the "untouched" semantics entry by entry (values and moments bit-identical outside
the selection) and nothing outside the tensors written. The radix select must find exactly the threshold of the
reference. Needs a GPU.

Each test's body is a ``check_*`` function taking the device, which tests/test_cuda_emulated.py also runs on CPU
tensors through the CUDA emulator (fewer cases, same references and tolerances)."""

from __future__ import annotations

import pytest
import torch

from tests.utils import assert_close_to_ref
from treelora import use_backend
from treelora.kernels.cuda import masked_update as cuda_masked_update
from treelora.ops.masked_update import (
    density_threshold_ref,
    masked_adamw_,
    masked_adamw_ref_,
    masked_sgd_,
    masked_sgd_ref_,
    selection_mask,
)

pytestmark = [pytest.mark.requires_cuda, pytest.mark.requires_cuda_ext]
DEVICE = "cuda"

# Awkward sizes: not multiples of the 4-entry groups or of the 4096-entry chunks, a single entry, an empty tensor.
SHAPES = [(37, 5), (4096,), (4097,), (3, 64), (0,), (1,), (1000,)]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SELECTIONS = ["all", "bool", "uint8", "index", "mixed", "density-0.01", "density-0.3", "density-1"]


def _tensors(dtype, shapes=SHAPES, device=DEVICE):
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    m = [torch.randn(s, device=device) * 0.1 for s in shapes]
    v = [torch.rand(s, device=device) * 0.1 for s in shapes]
    return params, grads, m, v


def _selection(kind, params, device=DEVICE):
    """(masks, density) for a selection kind."""
    if kind == "all":
        return None, None
    if kind.startswith("density"):
        return None, float(kind.split("-")[1])
    masks = []
    for i, p in enumerate(params):
        n = p.numel()
        if kind == "bool" or (kind == "mixed" and i % 3 == 0):
            masks.append(torch.rand(p.shape, device=device) < 0.3)
        elif kind == "uint8" or (kind == "mixed" and i % 3 == 1):
            masks.append((torch.rand(p.shape, device=device) < 0.3).to(torch.uint8) * 7)  # nonzero = selected
        elif kind == "index" or (kind == "mixed" and i % 3 == 2 and n):
            idx = (
                torch.randint(0, max(n, 1), (n // 3 + 1,), device=device)
                if n
                else torch.zeros(0, dtype=torch.long, device=device)
            )
            masks.append(torch.cat([idx, idx[:2]]))  # duplicates count once
        else:
            masks.append(None)
    return masks, None


def _clone(*groups):
    return [[t.clone() for t in g] for g in groups]


def _assert_untouched(name, before, after, selected):
    """Entries outside the selection keep their exact bit patterns."""
    for i, (b, a, s) in enumerate(zip(before, after, selected)):
        bits = torch.int16 if b.element_size() == 2 else torch.int32
        keep = ~s
        assert torch.equal(b.view(bits)[keep], a.view(bits)[keep]), f"{name}[{i}]: an unselected entry's bits changed"


def check_adamw(dtype, selection, shapes=SHAPES, device=DEVICE):
    params, grads, m, v = _tensors(dtype, shapes, device)
    masks, density = _selection(selection, params, device)
    selected = [
        selection_mask(p, g, None if masks is None else masks[i], density)
        for i, (p, g) in enumerate(zip(params, grads))
    ]
    kw = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, masks=masks, density=density)
    ref = [[t.double() for t in g] for g in (params, grads, m, v)]
    masked_adamw_ref_(*ref, 5, **{**kw, "masks": masks})
    base = _clone(params, grads, m, v)
    with use_backend("torch"):
        masked_adamw_(*base, 5, **kw)
    out = _clone(params, grads, m, v)
    with use_backend("cuda"):
        masked_adamw_(*out, 5, **kw)
    for i in range(len(params)):
        assert_close_to_ref(f"param[{i}]", out[0][i], ref[0][i], base[0][i], dtype=dtype)
        assert_close_to_ref(f"exp_avg[{i}]", out[2][i], ref[2][i], base[2][i], dtype=torch.float32)
        assert_close_to_ref(f"exp_avg_sq[{i}]", out[3][i], ref[3][i], base[3][i], dtype=torch.float32)
    _assert_untouched("params", params, out[0], selected)
    _assert_untouched("exp_avgs", m, out[2], selected)
    _assert_untouched("exp_avg_sqs", v, out[3], selected)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=lambda d: str(d)[6:])
def test_adamw_matches_reference_and_leaves_the_rest_untouched(dtype, selection):
    check_adamw(dtype, selection)


def check_sgd(dtype, momentum, selection, shapes=SHAPES, device=DEVICE):
    params, grads, bufs, _ = _tensors(dtype, shapes, device)
    masks, density = _selection(selection, params, device)
    selected = [
        selection_mask(p, g, None if masks is None else masks[i], density)
        for i, (p, g) in enumerate(zip(params, grads))
    ]
    kw = dict(lr=0.1, momentum=momentum, weight_decay=0.05, masks=masks, density=density)
    ref = [[t.double() for t in g] for g in (params, grads, bufs)]
    masked_sgd_ref_(*ref, **kw)
    base = _clone(params, grads, bufs)
    with use_backend("torch"):
        masked_sgd_(*base, **kw)
    out = _clone(params, grads, bufs)
    with use_backend("cuda"):
        masked_sgd_(out[0], out[1], out[2] if momentum else None, **kw)
    for i in range(len(params)):
        assert_close_to_ref(f"param[{i}]", out[0][i], ref[0][i], base[0][i], dtype=dtype)
        if momentum:
            assert_close_to_ref(f"buffer[{i}]", out[2][i], ref[2][i], base[2][i], dtype=torch.float32)
    _assert_untouched("params", params, out[0], selected)
    _assert_untouched(
        "momentum_buffers", bufs, out[2], selected if momentum else [torch.zeros_like(s) for s in selected]
    )


@pytest.mark.parametrize("selection", ["all", "mixed", "density-0.3"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=lambda d: str(d)[6:])
def test_sgd_matches_reference_and_leaves_the_rest_untouched(dtype, momentum, selection):
    check_sgd(dtype, momentum, selection)


def check_radix_select(dtype, densities=(1e-4, 0.01, 0.3, 0.999, 1.0), device=DEVICE):
    grads = [torch.randn(s, device=device).to(dtype) for s in [(5000,), (37, 5), (1,), (64,)]]
    grads.append(torch.randint(-3, 4, (3000,), device=device).to(dtype))  # heavy ties
    grads.append(torch.zeros(100, device=device, dtype=dtype))  # all equal
    for density in densities:
        out = cuda_masked_update.density_thresholds(grads, density)
        for i, g in enumerate(grads):
            expect = density_threshold_ref(g, density).float()
            assert out[i].item() == expect.item(), f"tensor {i}, density {density}: {out[i].item()} != {expect}"


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=lambda d: str(d)[6:])
def test_radix_select_finds_the_exact_threshold(dtype):
    check_radix_select(dtype)


def check_candidate_lists(device=DEVICE):
    """The select's candidate lists: a normal-like tensor whose first-digit bin fills two list chunks (at ρ = 0.3),
    one whose |g| all share one bin so that its list overflows and the gradient is read again, NaN gradients
    (ranked above every number, always selected). Thresholds bit for bit, the update against the reference."""
    gen = torch.Generator().manual_seed(11)
    grads = [
        torch.randn(40000, generator=gen),
        1.0 + 0.4 * torch.rand(10000, generator=gen),  # one first-digit bin: 10000 candidates, a 4096-entry list
        torch.randn(5000, generator=gen),
    ]
    grads[2][[0, 17, 4999]] = float("nan")
    assert cuda_masked_update._candidate_capacity(grads[1].numel()) < grads[1].numel()
    grads = [g.to(device) for g in grads]
    for density in (0.01, 0.3):
        got = cuda_masked_update.density_thresholds(grads, density).cpu()
        want = torch.stack([density_threshold_ref(g, density).float() for g in grads]).cpu()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"density {density}: {got} != {want}"
        params = [torch.randn(g.shape, generator=gen).to(device) for g in grads]
        m = [torch.rand(g.shape, generator=gen).to(device) * 0.1 for g in grads]
        v = [torch.rand(g.shape, generator=gen).to(device) * 0.1 for g in grads]
        selected = [selection_mask(p, g, None, density) for p, g in zip(params, grads)]
        ref = [[t.double() for t in group] for group in (params, grads, m, v)]
        masked_adamw_ref_(*ref, 4, lr=0.1, weight_decay=0.05, density=density)
        out = _clone(params, grads, m, v)
        with use_backend("cuda"):
            masked_adamw_(*out, 4, lr=0.1, weight_decay=0.05, density=density)
        for name, k, before in (("param", 0, params), ("exp_avg", 2, m), ("exp_avg_sq", 3, v)):
            for i in range(len(grads)):
                assert torch.equal(out[k][i].isnan().cpu(), ref[k][i].isnan().cpu()), f"{name}[{i}]: NaN entries"
                got_i, want_i = out[k][i].nan_to_num(), ref[k][i].nan_to_num()
                assert_close_to_ref(f"{density} {name}[{i}]", got_i, want_i, dtype=torch.float32)
            _assert_untouched(name, before, out[k], selected)


def test_candidate_lists_overflow_and_nan():
    check_candidate_lists()


# Tensor sizes with every remainder modulo the 4-entry group, around the 4096-entry chunk.
GUARDED_SIZES = [1, 2, 3, 4, 5, 6, 7, 4093, 4094, 4095, 4096, 4097, 8191]


def check_writes_stay_inside_each_tensor(dtype, selection, device=DEVICE):
    """Parameters and moments are consecutive slices of shared buffers, each slice followed by NaN guard entries and
    starting on a 16-byte boundary (the vector path runs up to each tensor's end): after the step every guard keeps
    its bits and the slices match the reference."""
    guard = 16  # entries after each tensor; also keeps every start a multiple of 16 entries
    starts, total = [], 0
    for n in GUARDED_SIZES:
        starts.append(total)
        total += -(-n // guard) * guard + guard
    inside = torch.zeros(total, dtype=torch.bool, device=device)
    for start, n in zip(starts, GUARDED_SIZES):
        inside[start : start + n] = True
    buffers = [
        torch.randn(total, device=device).to(dtype),
        torch.randn(total, device=device) * 0.1,
        torch.rand(total, device=device) * 0.1,
    ]
    for buf in buffers:
        buf[~inside] = float("nan")
    params, m, v = ([buf[s : s + n] for s, n in zip(starts, GUARDED_SIZES)] for buf in buffers)
    grads = [torch.randn(n, device=device).to(dtype) for n in GUARDED_SIZES]
    masks, density = _selection(selection, params, device)
    ref = [[t.double() for t in g] for g in (params, grads, m, v)]
    masked_adamw_ref_(*ref, 2, lr=0.1, weight_decay=0.05, masks=masks, density=density)
    before = [buf.clone() for buf in buffers]
    with use_backend("cuda"):
        masked_adamw_(params, grads, m, v, 2, lr=0.1, weight_decay=0.05, masks=masks, density=density)
    for name, old, new in zip(("params", "exp_avgs", "exp_avg_sqs"), before, buffers):
        bits = torch.int16 if old.element_size() == 2 else torch.int32
        assert torch.equal(old.view(bits)[~inside], new.view(bits)[~inside]), f"{name}: a guard entry was written"
    for i in range(len(params)):
        assert_close_to_ref(f"param[{i}]", params[i], ref[0][i], dtype=dtype)
        assert_close_to_ref(f"exp_avg_sq[{i}]", v[i], ref[3][i], dtype=torch.float32)


@pytest.mark.parametrize("selection", ["all", "bool", "index", "density-0.3"])
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=lambda d: str(d)[6:])
def test_writes_stay_inside_each_tensor(dtype, selection):
    check_writes_stay_inside_each_tensor(dtype, selection)


def check_device_step(shapes=SHAPES, device=DEVICE):
    params, grads, m, v = _tensors(torch.float32, shapes, device)
    a = _clone(params, grads, m, v)
    b = _clone(params, grads, m, v)
    with use_backend("cuda"):
        masked_adamw_(*a, 17, lr=1e-2, density=0.1)
        masked_adamw_(*b, torch.tensor(17, device=device), lr=1e-2, density=0.1)
    for x, y in zip(a[0] + a[2] + a[3], b[0] + b[2] + b[3]):
        assert_close_to_ref("device step", x, y.double(), dtype=torch.float32)


def test_step_on_the_device_matches_a_host_step():
    check_device_step()


def check_many_tensors(count=300, device=DEVICE):
    """``count`` tensors in one call, some of them views that start off the 16-byte grid (the scalar path)."""
    storage = torch.randn(count * 41 + 3, device=device)
    params = [storage[1 + 41 * i : 1 + 41 * i + 40] for i in range(count)]
    grads = [torch.randn(40, device=device) for _ in range(count)]
    m = [torch.zeros(40, device=device) for _ in range(count)]
    v = [torch.zeros(40, device=device) for _ in range(count)]
    masks = [torch.rand(40, device=device) < 0.5 for _ in range(count)]
    ref = [[t.double() for t in g] for g in (params, grads, m, v)]
    masked_adamw_ref_(*ref, 1, lr=0.1, masks=masks)
    before = [p.clone() for p in params]
    with use_backend("cuda"):
        masked_adamw_(params, grads, m, v, 1, lr=0.1, masks=masks)
    for i in range(count):
        assert_close_to_ref(f"param[{i}]", params[i], ref[0][i], dtype=torch.float32)
    _assert_untouched("params", before, params, masks)


def test_many_tensors_and_misaligned_views():
    check_many_tensors()


def check_repeated_steps(device=DEVICE):
    params, grads, m, v = _tensors(torch.float32, [(100,), (7, 9)], device)
    ref = [[t.double() for t in g] for g in (params, grads, m, v)]
    with use_backend("cuda"):
        for step in (1, 2, 3):
            masked_adamw_(params, grads, m, v, step, lr=0.05, density=0.5)
    for step in (1, 2, 3):
        masked_adamw_ref_(*ref, step, lr=0.05, density=0.5)
    for i in range(2):
        assert_close_to_ref(f"param[{i}] after 3 steps", params[i], ref[0][i], dtype=torch.float32)


def test_repeated_steps_reuse_the_cached_table():
    check_repeated_steps()
