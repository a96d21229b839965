"""Sparse masked AdamW / SGD (SPEC 3.3) on every backend that can run here, against the float64 reference.

Every case checks the contract entry by entry: unselected entries of the parameter and of its optimizer state keep
their exact bits (``torch.equal``), selected entries match the float64 reference. The torch backend runs in the CPU
lane, the Triton kernels in the interpreter lane (or on a GPU), the CUDA extension on a GPU when it implements the op.
"""

from __future__ import annotations

import pytest
import torch

import treelora
from tests.conftest import HAS_CUDA, INTERPRET
from tests.utils import assert_close_to_ref
from treelora import backends, ops
from treelora.ops.masked_update import OP_ADAMW, OP_SGD, density_threshold_ref, selection_mask

DEVICE = torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.requires_triton], id="triton"),
    pytest.param("cuda", marks=[pytest.mark.requires_cuda, pytest.mark.requires_cuda_ext], id="cuda"),
]
# Awkward sizes: one entry, an odd count, more than one 2048-entry kernel block, an empty tensor, a 2-D tensor.
SHAPES = [(1,), (3,), (2500,), (0,), (16, 12)]
SELECTIONS = ["all", "bool", "uint8", "index", "mixed", "empty", "density-0.01", "density-0.3", "density-1", "ties"]
LR, BETAS, EPS, WD = 0.1, (0.8, 0.95), 1e-6, 0.1


def _grads(kind: str, gen: torch.Generator) -> list[torch.Tensor]:
    if kind == "ties":
        # Magnitudes on a coarse grid (0, 0.5, ..., 2) with zeros: at density 0.3 the threshold falls inside a run of
        # equal |g| and every tied entry must be selected.
        return [torch.randint(-4, 5, s, generator=gen).float() / 2 for s in SHAPES]
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _selections(kind: str, gen: torch.Generator):
    """(masks, density) arguments for the tensors of SHAPES."""
    numels = [torch.Size(s).numel() for s in SHAPES]
    if kind == "all":
        return None, None
    if kind.startswith("density"):
        return None, float(kind.split("-")[1])
    if kind == "ties":
        return None, 0.3
    if kind == "bool":
        return [torch.rand(s, generator=gen) < 0.3 for s in SHAPES], None
    if kind == "uint8":
        return [(torch.rand(s, generator=gen) < 0.5).to(torch.uint8) for s in SHAPES], None
    if kind == "index":  # duplicates count once
        return [torch.randint(0, max(n, 1), (n // 3 + 2 if n else 0,), generator=gen) for n in numels], None
    if kind == "mixed":
        return [
            torch.tensor([0]),
            None,
            torch.rand(2500, generator=gen) < 0.1,
            torch.zeros(0, dtype=torch.bool),
            torch.tensor([5, 7, 5, 191]),
        ], None
    if kind == "empty":
        return [
            torch.zeros(s, dtype=torch.bool) if i % 2 else torch.zeros(0, dtype=torch.int64)
            for i, s in enumerate(SHAPES)
        ], None
    raise AssertionError(kind)


def _state(kind, param_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(param_dtype) for s in SHAPES]
    grads = [g.to(param_dtype) for g in _grads(kind, gen)]
    exp_avgs = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
    exp_avg_sqs = [torch.rand(s, generator=gen) * 0.1 for s in SHAPES]
    masks, density = _selections(kind, gen)
    to = lambda ts: None if ts is None else [None if t is None else t.to(DEVICE) for t in ts]
    return to(params), to(grads), to(exp_avgs), to(exp_avg_sqs), to(masks), density


def _run(backend, op, fn, *args, **kwargs):
    if backend == "cuda":
        why = backends.explain(op, *args, **kwargs)["cuda"] if "cuda" in backends.backends_for(op) else ["none"]
        if why:
            pytest.skip("cuda backend: " + "; ".join(why))
    with treelora.use_backend(backend):
        fn()


def _check_entrywise(name, new, old, ref64, selected):
    """Unselected entries keep their bits; selected ones match the float64 reference."""
    for i, (t, before, want, sel) in enumerate(zip(new, old, ref64, selected)):
        assert torch.equal(t[~sel], before[~sel]), f"{name}[{i}]: an unselected entry changed"
        assert_close_to_ref(f"{name}[{i}]", t[sel], want[sel], dtype=t.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step_kind", ["int", "tensor"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", SELECTIONS)
def test_masked_adamw_matches_float64_reference_and_leaves_unselected_bits(backend, kind, param_dtype, step_kind):
    params, grads, exp_avgs, exp_avg_sqs, masks, density = _state(kind, param_dtype)
    old = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
    selected = [
        selection_mask(p, g, None if masks is None else masks[i], density)
        for i, (p, g) in enumerate(zip(params, grads))
    ]
    ref64 = [[t.double() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    ops.masked_adamw_ref_(*ref64, 3, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, masks=masks, density=density)
    step = 3 if step_kind == "int" else torch.tensor(3.0, device=DEVICE)
    kwargs = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, masks=masks, density=density)
    _run(
        backend,
        OP_ADAMW,
        lambda: ops.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, **kwargs),
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        step,
        **kwargs,
    )
    for name, new, before, want in zip(
        ("param", "exp_avg", "exp_avg_sq"), (params, exp_avgs, exp_avg_sqs), old, (ref64[0], ref64[2], ref64[3])
    ):
        _check_entrywise(f"{kind} {name}", new, before, want, selected)
    if kind == "empty":
        assert all(torch.equal(p, o) for p, o in zip(params, old[0]))
    if kind in ("all", "density-1"):
        assert all(s.all() for s in selected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("kind", ["all", "bool", "index", "density-0.3", "ties"])
def test_masked_sgd_matches_float64_reference_and_leaves_unselected_bits(backend, kind, momentum):
    params, grads, buffers, _, masks, density = _state(kind, torch.float32, seed=1)
    buffers = buffers if momentum else None
    old = [[t.clone() for t in ts] for ts in (params, buffers or params)]
    selected = [
        selection_mask(p, g, None if masks is None else masks[i], density)
        for i, (p, g) in enumerate(zip(params, grads))
    ]
    ref64 = [[t.double() for t in ts] for ts in (params, grads, buffers or params)]
    ops.masked_sgd_ref_(
        ref64[0],
        ref64[1],
        ref64[2] if momentum else None,
        lr=LR,
        momentum=momentum,
        weight_decay=WD,
        masks=masks,
        density=density,
    )
    kwargs = dict(lr=LR, momentum=momentum, weight_decay=WD, masks=masks, density=density)
    _run(backend, OP_SGD, lambda: ops.masked_sgd_(params, grads, buffers, **kwargs), params, grads, buffers, **kwargs)
    _check_entrywise(f"{kind} param", params, old[0], ref64[0], selected)
    if momentum:
        _check_entrywise(f"{kind} momentum", buffers, old[1], ref64[2], selected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_mixed_dtypes_in_one_call(backend):
    """fp32 and bf16 parameters (two launch groups in the kernel backends), fp16 moments for one of them."""
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(40, generator=gen), torch.randn(33, generator=gen).bfloat16(), torch.randn(7, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    exp_avgs = [torch.zeros(40), torch.zeros(33), torch.zeros(7, dtype=torch.float16)]
    exp_avg_sqs = [torch.zeros(40), torch.zeros(33), torch.zeros(7, dtype=torch.float16)]
    lists = [[t.to(DEVICE) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    ref64 = [[t.double() for t in ts] for ts in lists]
    ops.masked_adamw_ref_(*ref64, 1, lr=LR, density=0.5)
    _run(backend, OP_ADAMW, lambda: ops.masked_adamw_(*lists, 1, lr=LR, density=0.5), *lists, 1, lr=LR, density=0.5)
    for i in range(3):
        for got, want in zip((lists[0][i], lists[2][i], lists[3][i]), (ref64[0][i], ref64[2][i], ref64[3][i])):
            assert_close_to_ref(f"tensor {i}", got, want, dtype=got.dtype)


# --- the torch backend's batched paths ---------------------------------------------------------------------------


def _lora_like(seed: int, dtype=torch.float32) -> list[list[torch.Tensor]]:
    """params, grads, exp_avgs, exp_avg_sqs of a 3-layer LoRA model (r = 4; A (4, 96), B (80, 4) and (96, 4)): the
    shapes repeat across layers, so the torch backend stacks them into chunks of rows."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for _ in range(3) for s in ((4, 96), (80, 4), (4, 96), (96, 4), (4, 300), (96, 4))]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    # Per-tensor scales over three orders of magnitude: a shared threshold would be wrong for most of them.
    grads = [(torch.randn(s, generator=gen) * 10.0 ** (i % 4 - 2)).to(dtype) for i, s in enumerate(shapes)]
    exp_avgs = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
    exp_avg_sqs = [torch.rand(s, generator=gen) * 1e-4 for s in shapes]
    return [params, grads, exp_avgs, exp_avg_sqs]


def _assert_torch_backend_matches_reference(lists, step=7, **selection) -> None:
    """The torch backend against the reference run in the same precision: the selection must be the same set of
    entries, unselected bits unchanged, and (sparse path) the selected entries bitwise the reference's."""
    ref = [[t.clone() for t in ts] for ts in lists]
    before = [[t.clone() for t in ts] for ts in lists]
    kwargs = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **selection)
    ops.masked_adamw_ref_(*ref, step, **kwargs)
    with treelora.use_backend("torch"):
        ops.masked_adamw_(*lists, step, **kwargs)
    for name, got, want, old in zip(("param", "grad", "exp_avg", "exp_avg_sq"), lists, ref, before):
        for i, (g, w, o) in enumerate(zip(got, want, old)):
            moved_ref, moved = _bits(w) != _bits(o), _bits(g) != _bits(o)
            assert torch.equal(moved, moved_ref), f"{name}[{i}]: the backend moved other entries than the reference"
            assert torch.equal(_bits(g), _bits(w)), f"{name}[{i}] differs in bits"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t``, flat (NaN payloads and signed zeros compare exactly)."""
    return t.contiguous().view(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("density", [0.003, 0.01, 0.05, 0.2, 0.3])
@pytest.mark.parametrize("chunk_entries", [64, 1 << 18], ids=["chunks-of-one-or-two-rows", "one-chunk-per-shape"])
def test_torch_backend_selects_and_updates_like_the_reference(monkeypatch, density, chunk_entries):
    """Sparse densities: the sampled bound (k up to a quarter of the row) and the exact path (ρ = 0.3), with the
    same-shape tensors stacked into one chunk or cut into many."""
    from treelora.kernels.torch import masked_update as torch_backend

    monkeypatch.setattr(torch_backend, "CHUNK_ENTRIES", chunk_entries)
    _assert_torch_backend_matches_reference(_lora_like(0), density=density)


def test_torch_backend_bf16_gradients_and_moments_in_another_dtype():
    lists = _lora_like(1, dtype=torch.bfloat16)
    lists[2] = [t.half() for t in lists[2]]
    _assert_torch_backend_matches_reference(lists, density=0.02)


def test_torch_backend_fp64_sparse_step():
    """fp64 gradients take the NumPy selection in their own precision: the 2nd and 3rd largest |g| of the first
    tensor differ only below fp32's precision, and k = 2 keeps exactly one of them."""
    lists = [[t.double() for t in ts] for ts in _lora_like(3)]
    lists[1][0].mul_(1e-3)
    lists[1][0][0, :3] = torch.tensor([2.0, 1.0 + 2**-40, -1.0], dtype=torch.float64)
    _assert_torch_backend_matches_reference(lists, density=0.005)
    assert lists[0][0][0, 2] == _lora_like(3)[0][0][0, 2].double()  # the -1.0 entry lost the fp64 tie-break


def test_torch_backend_strided_gradients_and_moments():
    lists = _lora_like(2)
    lists[1] = [g.t().contiguous().t() for g in lists[1]]  # same values, column-major storage
    lists[3] = [v.t().contiguous().t() for v in lists[3]]
    _assert_torch_backend_matches_reference(lists, density=0.02)


def test_torch_backend_redoes_a_chunk_exactly_when_the_sample_misleads_the_bound(monkeypatch):
    """Large |g| exactly at the sampled positions: the bound lands above all but a few entries, fewer than k are
    candidates, and the chunk is redone by the exact path, which must still select the true top k."""
    from treelora.kernels.torch import masked_update as torch_backend

    n, k = 4096, 41  # density 0.01
    positions = torch.from_numpy(
        torch_backend._sample_positions(n, min(torch_backend.SAMPLE, n // torch_backend.SAMPLE_STRIDE))
    )
    gen = torch.Generator().manual_seed(3)
    grads = []
    for _ in range(3):
        g = torch.rand(n, generator=gen)
        g[positions] += 100.0  # only the sampled entries are huge: the bound keeps fewer than k candidates
        grads.append(g.view(64, 64))
    assert positions.numel() > k
    grads[1].view(-1)[positions[k // 2 :]] -= 100.0  # a row whose sample is representative, in the same chunk
    exact_calls = []
    exact = torch_backend._exact_top_entries
    monkeypatch.setattr(torch_backend, "_exact_top_entries", lambda m, kk: exact_calls.append(m.shape) or exact(m, kk))
    params = [torch.randn(64, 64, generator=gen) for _ in grads]
    lists = [params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]]
    _assert_torch_backend_matches_reference(lists, density=0.01)
    assert exact_calls, "the misleading sample did not trigger the exact path"


def test_torch_backend_nan_gradients_follow_the_rule():
    """NaN ranks above every number and is always selected (also where k NaNs fill the whole top k)."""
    lists = _lora_like(4)
    lists[1][0].view(-1)[[3, 50, 70]] = float("nan")  # a few NaNs: the k-th largest is a number
    lists[1][6].view(-1)[:] = float("nan")  # every entry NaN: the threshold is NaN
    lists[1][7].view(-1)[::2] = float("nan")  # NaNs fill more than the top k
    _assert_torch_backend_matches_reference(lists, density=0.02)
    dense, ref = _lora_like(4), _lora_like(4)
    for ts in (dense, ref):
        ts[1][0].view(-1)[[3, 50]] = float("nan")
    with treelora.use_backend("torch"):
        ops.masked_adamw_(*dense, 7, lr=LR, density=1.0)
    ops.masked_adamw_ref_(*ref, 7, lr=LR, density=1.0)
    for got, want in zip(dense[0], ref[0]):  # ρ = 1 is the dense step: every NaN gradient reaches its parameter
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got[~got.isnan()], want[~want.isnan()], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("step_kind", ["int", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_torch_backend_dense_step_is_torch_fused_adamw(dtype, step_kind):
    """No selection runs torch's fused AdamW kernel: for fp32 the result equals ``torch.optim.AdamW(fused=True)`` on
    the same tensors, and every dtype matches the float64 reference within the tolerance rule."""
    params, grads, exp_avgs, exp_avg_sqs = _lora_like(5)
    params = [p.to(dtype) for p in params]
    grads = [g.to(dtype) for g in grads]
    ref64 = [[t.double() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    for leaf, g in zip(leaves, grads):
        leaf.grad = g.clone()
    opt = torch.optim.AdamW(leaves, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    for leaf, m, v in zip(leaves, exp_avgs, exp_avg_sqs):
        opt.state[leaf] = {"step": torch.tensor(6.0), "exp_avg": m.clone().to(dtype), "exp_avg_sq": v.clone().to(dtype)}
    opt.step()
    step = 7 if step_kind == "int" else torch.tensor(7)
    with treelora.use_backend("torch"):
        ops.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ops.masked_adamw_ref_(*ref64, 7, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for i, (p, leaf) in enumerate(zip(params, leaves)):
        if dtype == torch.float32:  # the case where torch's optimizer holds the same dtypes as these lists
            assert torch.equal(p, leaf.detach()), f"params[{i}] differs from torch.optim.AdamW(fused=True)"
        assert_close_to_ref(f"params[{i}]", p, ref64[0][i], dtype=dtype)
        assert_close_to_ref(f"exp_avgs[{i}]", exp_avgs[i], ref64[2][i], dtype=torch.float32)
        assert_close_to_ref(f"exp_avg_sqs[{i}]", exp_avg_sqs[i], ref64[3][i], dtype=torch.float32)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("density", [None, 0.02], ids=["dense", "density-0.02"])
def test_torch_backend_sgd_matches_the_reference_in_the_same_precision(density, momentum):
    params, grads, buffers, _ = _lora_like(6)
    ref = [[t.clone() for t in ts] for ts in (params, grads, buffers)]
    kwargs = dict(lr=LR, momentum=momentum, weight_decay=WD, density=density)
    ops.masked_sgd_ref_(ref[0], ref[1], ref[2] if momentum else None, **kwargs)
    with treelora.use_backend("torch"):
        ops.masked_sgd_(params, grads, buffers if momentum else None, **kwargs)
    for name, got, want in (("param", params, ref[0]), ("buffer", buffers, ref[2])):
        for i, (g, w) in enumerate(zip(got, want)):
            if density is None:
                assert_close_to_ref(f"{name}[{i}]", g, w.double(), dtype=torch.float32)
            else:
                assert torch.equal(g, w), f"{name}[{i}] differs from the reference"


# --- the Triton radix select -----------------------------------------------------------------------------------


def _threshold_cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    normal = torch.randn(3000, generator=gen)
    return {
        "normal": normal,
        "ties": torch.randint(-3, 4, (2049,), generator=gen).float(),
        "zeros": torch.zeros(64),
        "one": torch.tensor([-2.5]),
        "wide-exponents": normal * torch.logspace(-30, 30, 3000),
        "subnormal": torch.full((100,), 1e-40) * torch.arange(100),
        "bf16": torch.randn(777, generator=gen).bfloat16(),
    }


@pytest.mark.interpreter
@pytest.mark.requires_triton
@pytest.mark.parametrize("density", [1e-4, 0.01, 0.37, 0.5, 0.999, 1.0])
def test_triton_radix_select_finds_the_exact_kth_largest_magnitude(density):
    from treelora.kernels.triton.masked_update import density_thresholds

    cases = _threshold_cases()
    for dtype in (torch.float32, torch.bfloat16):
        grads = [g.to(DEVICE) for g in cases.values() if g.dtype == dtype]
        got = density_thresholds(grads, density)
        want = torch.stack([density_threshold_ref(g, density).float() for g in grads])
        assert torch.equal(got.cpu(), want.cpu()), f"{dtype}: {got.tolist()} != {want.tolist()}"


@pytest.mark.interpreter
@pytest.mark.requires_triton
@pytest.mark.parametrize("share", [2, 64], ids=["lists-of-many-blocks", "lists-overflow"])
def test_triton_select_compacts_candidates_and_rereads_a_tensor_whose_list_overflows(monkeypatch, share):
    """64-entry blocks: a list of capacity numel / 2 spans many blocks (many programs per tensor in steps 3-4); with
    numel / 64 the candidates of a narrow |g| (all in one or two first-digit bins) overflow it, and steps 3-4 must
    read the gradient again. Thresholds and the update must match the reference either way, NaN included."""
    from treelora.kernels.triton import masked_update as kernels

    monkeypatch.setattr(kernels, "BLOCK", 64)
    monkeypatch.setattr(kernels, "CANDIDATE_SHARE", share)
    kernels._candidate_layout.cache_clear()
    try:
        gen = torch.Generator().manual_seed(7)
        grads = [
            torch.randn(3000, generator=gen),
            1.0 + 0.3 * torch.rand(2500, generator=gen),  # |g| in [1, 1.3): one first-digit bin holds every entry
            torch.randint(-3, 4, (1999,), generator=gen).float(),  # ties
            torch.randn(700, generator=gen) * torch.logspace(-12, 12, 700),  # g * g stays inside fp32
        ]
        grads[0][[5, 1000, 2999]] = float("nan")
        grads = [g.to(DEVICE) for g in grads]
        capacities = [kernels._capacity(g.numel()) for g in grads]
        assert capacities[1] < grads[1].numel()  # every entry of the narrow tensor is a candidate: its list overflows
        if share == 2:  # the ties at ρ = 0.3 (about 570 entries with |g| = 2) fill 9 blocks of a 1024-entry list
            assert capacities[2] == 1024
        else:
            assert max(capacities) == 64  # every list overflows at ρ = 0.3
        for density in (0.01, 0.3):
            got = kernels.density_thresholds(grads, density)
            want = torch.stack([density_threshold_ref(g, density).float() for g in grads])
            assert torch.equal(got.cpu().view(torch.int32), want.cpu().view(torch.int32)), f"{got} != {want}"
            params = [torch.randn(g.shape, generator=gen).to(DEVICE) for g in grads]
            moments = [[torch.rand(g.shape, generator=gen).to(DEVICE) * 0.1 for g in grads] for _ in range(2)]
            old = [[t.clone() for t in ts] for ts in (params, *moments)]
            ref64 = [[t.double() for t in ts] for ts in (params, grads, *moments)]
            kwargs = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, density=density)
            ops.masked_adamw_ref_(*ref64, 3, **kwargs)
            kernels.masked_adamw_(params, grads, *moments, 3, **kwargs)
            selected = [selection_mask(p, g, None, density) for p, g in zip(params, grads)]
            states = zip(("param", "exp_avg", "exp_avg_sq"), (params, *moments), old, (ref64[0], *ref64[2:]))
            for name, new, before, want in states:
                # The NaN gradients make NaN entries: those must be the same entries, then compare the rest.
                assert all(torch.equal(t.isnan().cpu(), w.isnan()) for t, w in zip(new, want)), name
                finite = [[t.nan_to_num() for t in ts] for ts in (new, before, want)]
                _check_entrywise(f"{density} {name}", *finite, selected)
    finally:
        kernels._candidate_layout.cache_clear()


def _masked_update_specs():
    if INTERPRET:
        return []
    from treelora.kernels.triton.compile_specs import masked_update_specs

    return masked_update_specs()


@pytest.mark.requires_triton
@pytest.mark.parametrize("capability, aligned", [(80, True), (90, True)], ids=["sm_80-aligned", "sm_90-aligned"])
@pytest.mark.parametrize("spec", _masked_update_specs(), ids=lambda s: s.name)
def test_triton_masked_update_kernels_compile_without_spills(spec, capability, aligned):
    """Every step of the select and every update compiles to cubins without local memory (spills) or stack."""
    from tests.test_similarity import cubin_resources
    from treelora.kernels.triton.compile_specs import compile_for_target

    usage = cubin_resources(compile_for_target(spec, capability, aligned=aligned).asm["cubin"])
    print(f"{spec.name} sm_{capability}: {usage}")
    assert usage["local"] == 0 and usage["stack"] == 0, usage


@pytest.mark.requires_cuda_ext
def test_cuda_masked_update_kernels_use_no_local_memory():
    """Every masked-update kernel of the built extension, for every architecture it holds: no stack and no local
    memory, i.e. no spills (cuobjdump -res-usage, no GPU needed)."""
    import re
    import subprocess
    from pathlib import Path

    import triton

    from treelora import _cpp_lib

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(tool), "-res-usage", _cpp_lib.module.__file__], capture_output=True, text=True).stdout
    found = re.findall(r"Function (\S*masked_update_cu\S*):\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    kernels = {name for name, *_ in found}
    print("\n".join(f"{n[-60:]}: REG {r} STACK {st} LOCAL {lo}" for n, r, st, lo in found))
    assert len(kernels) >= 10, f"expected the masked-update kernels in the extension, found {sorted(kernels)}"
    assert all(st == "0" and lo == "0" for _, _, st, lo in found), "a masked-update kernel uses local memory"


# --- torch.library registration ------------------------------------------------------------------------------------


def _op_args(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]
    gs = [torch.randn(p.shape, generator=gen) for p in ps]
    return ps, gs, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]


def test_custom_ops_declare_their_mutations():
    ps, gs, ms, vs = _op_args()
    adamw = (ps, gs, ms, vs, 2.0, None, 0.01, 0.9, 0.999, 1e-8, 0.0, [None, torch.tensor([1, 4])], None)
    torch.library.opcheck(
        torch.ops.treelora.masked_adamw_.default, adamw, test_utils=("test_schema", "test_faketensor")
    )
    sgd = (ps, gs, ms, 0.1, 0.9, 0.0, [], 0.5)
    torch.library.opcheck(torch.ops.treelora.masked_sgd_.default, sgd, test_utils=("test_schema", "test_faketensor"))
    schema = str(torch.ops.treelora.masked_adamw_.default._schema)
    assert "Tensor(a0!)[] params" in schema and "Tensor[] grads" in schema


def test_torch_compile_functionalises_the_in_place_update():
    from torch._dynamo.backends.common import aot_autograd

    def step(p, g, m, v):
        torch.ops.treelora.masked_adamw_([p], [g], [m], [v], 1.0, None, 0.1, 0.9, 0.999, 1e-8, 0.0, [], 0.5)
        return p + 0

    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    ps, gs, ms, vs = _op_args(1)
    eager = [t.clone() for t in (ps[0], ms[0], vs[0])]
    out_eager = step(eager[0], gs[0], eager[1], eager[2])
    compiled = [t.clone() for t in (ps[0], ms[0], vs[0])]
    backend = aot_autograd(fw_compiler=keep_graph)
    out_compiled = torch.compile(step, backend=backend, fullgraph=True)(compiled[0], gs[0], compiled[1], compiled[2])
    # The functionalised graph runs the op out of place and hands its new p, m, v back to be copied into the inputs.
    assert "auto_functionalized" in graphs[0] and "treelora.masked_adamw_" in graphs[0], graphs[0]
    assert torch.equal(out_eager, out_compiled)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert not torch.equal(compiled[0], ps[0])


# --- bad inputs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(step=torch.tensor(True)), TypeError, "step"),
        (dict(step=torch.tensor(0.0)), ValueError, "step"),
        (dict(step=torch.ones(2)), ValueError, "step"),
        (dict(params="meta"), ValueError, "params\\[1\\]"),
        (dict(exp_avgs="short"), ValueError, "exp_avgs"),
        (dict(grads="shape"), ValueError, "grads\\[1\\]"),
        (dict(masks=[torch.tensor([0]), torch.tensor([6])]), ValueError, "masks\\[1\\]"),
        (dict(masks=[None, torch.ones(2, dtype=torch.bool)]), ValueError, "masks\\[1\\]"),
        (dict(masks=[None, None], density=0.5), ValueError, "either masks or density"),
        (dict(density=0.0), ValueError, "density"),
    ],
    ids=[
        "step-bool",
        "step-zero",
        "step-shape",
        "params-device",
        "exp_avgs-length",
        "grads-shape",
        "index-range",
        "mask-shape",
        "masks-and-density",
        "density-zero",
    ],
)
def test_bad_inputs_name_the_argument(change, error, match):
    params, grads, exp_avgs, exp_avg_sqs = _op_args()
    args = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, step=1, lr=0.1)
    if change.pop("params", None) == "meta":
        args["params"] = [params[0], params[1].to("meta")]
    if change.pop("exp_avgs", None) == "short":
        args["exp_avgs"] = exp_avgs[:1]
    if change.pop("grads", None) == "shape":
        args["grads"] = [grads[0], grads[1].t()]
    args.update(change)
    with pytest.raises(error, match=match):
        ops.masked_adamw_(**args)


@pytest.mark.interpreter
@pytest.mark.requires_triton
def test_triton_backend_explains_what_it_cannot_run():
    params, grads, exp_avgs, exp_avg_sqs = _op_args()
    as_device = lambda ts: [t.to(DEVICE) for t in ts]
    params, grads, exp_avgs, exp_avg_sqs = map(as_device, (params, grads, exp_avgs, exp_avg_sqs))
    with treelora.use_backend("triton"):
        with pytest.raises(backends.BackendUnavailableError, match="float64"):
            ops.masked_adamw_(
                [p.double() for p in params], [g.double() for g in grads], exp_avgs, exp_avg_sqs, 1, lr=0.1
            )
        strided = [exp_avgs[0], torch.zeros(3, 2, device=DEVICE).t()]
        with pytest.raises(backends.BackendUnavailableError, match="exp_avgs\\[1\\] is not contiguous"):
            ops.masked_adamw_(params, grads, strided, exp_avg_sqs, 1, lr=0.1)


def test_triton_request_without_gpu_or_interpreter_names_the_reason():
    if INTERPRET or HAS_CUDA:
        pytest.skip("triton can run here")
    params, grads, exp_avgs, exp_avg_sqs = _op_args()
    with treelora.use_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.masked_sgd_(params, grads, None, lr=0.1)
