"""Batched gradient similarity (SPEC 3.2) on every backend that can run here, against the float64 reference.

The torch backend runs in the CPU lane; the Triton kernels in the interpreter lane (``TRITON_INTERPRET=1``) or on a
GPU; the CUDA extension on a GPU (it implements the gathered form of dot, l1 and sqeuclidean; other inputs skip with
its reasons).
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import treelora
from tests.conftest import HAS_CUDA, INTERPRET
from tests.utils import assert_close_to_ref
from treelora import backends, ops
from treelora.ops.similarity import OP, OP_ACCUMULATE

DEVICE = torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.requires_triton], id="triton"),
    pytest.param("cuda", marks=[pytest.mark.requires_cuda, pytest.mark.requires_cuda_ext], id="cuda"),
]
# (T, L, D): a plain shape, D not a multiple of any vector width, and the degenerate T = L = D = 1.
SHAPES = [(4, 3, 64), (3, 2, 1031), (1, 1, 1)]


def _inputs(T, L, D, bank_dtype, ragged, seed=0):
    """query, bank, offsets (None when dense) and a gather index. Ragged widths are D, D + 5, D + 11, ..."""
    g = torch.Generator().manual_seed(seed)
    if ragged:
        widths = [D + 5 * i + (i > 0) for i in range(L)]
        offsets = [0]
        for w in widths:
            offsets.append(offsets[-1] + w)
        query = torch.randn(offsets[-1], generator=g)
        bank = torch.randn(T, offsets[-1], generator=g)
    else:
        offsets = None
        query = torch.randn(L, D, generator=g)
        bank = torch.randn(T, L, D, generator=g)
    index = torch.randint(0, T, (L,), generator=g)
    return query.to(DEVICE), bank.to(bank_dtype).to(DEVICE), offsets, index.to(DEVICE)


def _run(backend, op, fn, *args):
    """Run ``fn`` under ``use_backend(backend)``; a CUDA backend that does not cover these inputs skips."""
    if backend == "cuda":
        why = backends.explain(op, *args)["cuda"] if "cuda" in backends.backends_for(op) else ["not implemented"]
        if why:
            pytest.skip("cuda backend: " + "; ".join(why))
    with treelora.use_backend(backend):
        return fn()


def _check(name, out, query, bank, metric, index, offsets):
    ref64 = ops.pairwise_similarity_ref(query.double(), bank.double(), metric, index, offsets)
    baseline = ops.pairwise_similarity_ref(query, bank, metric, index, offsets)  # plain PyTorch in fp32
    assert out.dtype == torch.float32
    assert_close_to_ref(name, out, ref64, baseline, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
@pytest.mark.parametrize("metric", ops.METRICS)
def test_full_and_gathered_match_float64_reference(backend, metric, ragged, bank_dtype, shape):
    query, bank, offsets, index = _inputs(*shape, bank_dtype, ragged)
    full = _run(
        backend,
        OP,
        lambda: ops.pairwise_similarity(query, bank, metric, offsets=offsets),
        query,
        bank,
        metric,
        None,
        offsets and tuple(offsets),
    )
    _check(f"{metric} full", full, query, bank, metric, None, offsets)
    gathered = _run(
        backend,
        OP,
        lambda: ops.pairwise_similarity(query, bank, metric, index=index, offsets=offsets),
        query,
        bank,
        metric,
        index,
        offsets and tuple(offsets),
    )
    _check(f"{metric} gathered", gathered, query, bank, metric, index, offsets)
    assert gathered.shape == (len(index),) and full.shape == (bank.shape[0], len(index))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count_kind", ["number", "tensor"])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
@pytest.mark.parametrize("metric", ops.METRICS)
def test_accumulate_and_compare_is_running_mean_then_gathered(backend, metric, ragged, count_kind):
    query, bank, offsets, index = _inputs(3, 3, 37, torch.bfloat16, ragged, seed=1)
    mean = query.clone()
    sample = torch.randn(query.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    count = 4.0 if count_kind == "number" else torch.tensor(4.0, device=DEVICE)
    out = _run(
        backend,
        OP_ACCUMULATE,
        lambda: ops.accumulate_and_compare_(mean, sample, count, bank, index, metric, offsets),
        mean,
        sample,
        count,
        bank,
        index,
        metric,
        offsets and tuple(offsets),
    )
    mean64 = query.double() + (sample.double() - query.double()) / 4
    assert_close_to_ref("running mean", mean, mean64, query + (sample - query) / 4, dtype=torch.float32)
    ref64 = ops.pairwise_similarity_ref(mean64, bank.double(), metric, index, offsets)
    baseline = ops.pairwise_similarity_ref(query + (sample - query) / 4, bank, metric, index, offsets)
    assert_close_to_ref(f"{metric} after accumulate", out, ref64, baseline, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_form_of_an_empty_bank_is_empty(backend):
    query, bank = torch.randn(3, 5, device=DEVICE), torch.randn(0, 3, 5, device=DEVICE)
    out = _run(backend, OP, lambda: ops.pairwise_similarity(query, bank, "l1"), query, bank, "l1", None, None)
    assert out.shape == (0, 3) and out.dtype == torch.float32


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
@pytest.mark.parametrize("metric", ops.METRICS)
def test_torch_gathered_form_never_materialises_the_bank_difference(metric, ragged):
    # (T, L, D) = (64, 4, 4096): the difference tensor of the full form would be 4 MiB, one gathered row set 64 KiB.
    query, bank, offsets, index = _inputs(64, 4, 4096, torch.float32, ragged)
    query, bank, index = query.cpu(), bank.cpu(), index.cpu()
    with treelora.use_backend("torch"):
        largest = _largest_allocation(
            lambda: ops.pairwise_similarity(query, bank, metric, index=index, offsets=offsets)
        )
    row_bytes = query.numel() * 4
    print(f"{metric}: largest allocation {largest} B; gathered rows {row_bytes} B; bank {bank.numel() * 4} B")
    assert largest <= 2 * row_bytes < bank.numel() * 4 // 8


# --- Triton kernels: launch geometry, determinism, edge cases --------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.requires_triton
@pytest.mark.parametrize("metric", ops.METRICS)
def test_triton_multi_program_reduction_and_determinism(metric):
    """Tiny chunks (32 entries per program) make every layer span many programs, so the arrival counters and the
    last program's fixed-order reduction are exercised; two launches must agree bit for bit (counters reset)."""
    from treelora.kernels.triton import similarity as kernels

    query, bank, offsets, index = _inputs(2, 3, 90, torch.float32, ragged=True, seed=3)
    bounds = tuple(offsets)
    for idx in (None, index):
        first = kernels.pairwise_similarity(query, bank, metric, idx, bounds, chunk_tiles=1, block=32)
        again = kernels.pairwise_similarity(query, bank, metric, idx, bounds, chunk_tiles=1, block=32)
        assert torch.equal(first, again)
        _check(f"{metric} {'gathered' if idx is not None else 'full'}", first, query, bank, metric, idx, offsets)


@pytest.mark.interpreter
@pytest.mark.requires_triton
def test_triton_strided_bank_int32_index_and_out_of_range_rows():
    from treelora.kernels.triton import similarity as kernels

    storage = torch.randn(8, 3, 40, device=DEVICE)
    bank = storage[::2]  # rows 2 * L * D apart: read in place through the row stride
    query = torch.randn(3, 40, device=DEVICE)
    index = torch.tensor([3, 0, 2], dtype=torch.int32, device=DEVICE)
    with treelora.use_backend("triton"):
        out = ops.pairwise_similarity(query, bank, "sqeuclidean", index=index)
    _check("strided bank", out, query, bank, "sqeuclidean", index.long(), None)
    # An index outside [0, T) on the device cannot be checked without a host synchronisation: that layer is NaN.
    bad = torch.tensor([1, 9, -1], device=DEVICE)
    out = kernels.pairwise_similarity(query, bank, "l1", bad)
    assert torch.isfinite(out[0]) and torch.isnan(out[1:]).all()


@pytest.mark.interpreter
@pytest.mark.requires_triton
def test_triton_backend_declines_float64_with_a_reason():
    query, bank = torch.randn(2, 5, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64)
    with treelora.use_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="fp64"):
        ops.pairwise_similarity(query.to(DEVICE), bank.to(DEVICE), "dot")


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers, stack, shared and local memory of every kernel in a cubin (the largest of each), read with the
    cuobjdump that ships with triton. Local memory is where spilled registers go: 0 means no spills."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert found, text
    return {key: max(int(f[i]) for f in found) for i, key in enumerate(("registers", "stack", "shared", "local"))}


def _similarity_specs():
    if INTERPRET:
        return []
    from treelora.kernels.triton.compile_specs import similarity_specs

    return similarity_specs()


@pytest.mark.requires_triton
@pytest.mark.parametrize(
    "capability, aligned", [(80, False), (80, True), (90, True)], ids=["sm_80", "sm_80-aligned", "sm_90-aligned"]
)
@pytest.mark.parametrize("spec", _similarity_specs(), ids=lambda s: s.name)
def test_triton_similarity_kernels_compile_without_spills(spec, capability, aligned):
    """The wide tiles that keep more bytes in flight must not cost spills (local memory) or stack on sm_80 / sm_90."""
    from treelora.kernels.triton.compile_specs import compile_for_target

    usage = cubin_resources(compile_for_target(spec, capability, aligned=aligned).asm["cubin"])
    print(f"{spec.name} sm_{capability}{' aligned' if aligned else ''}: {usage}")
    assert usage["local"] == 0 and usage["stack"] == 0, usage
    assert usage["registers"] <= 128, usage  # keeps 2 programs of 256 threads resident per SM


# --- bad inputs --------------------------------------------------------------------------------------------------


def test_triton_request_without_gpu_or_interpreter_names_the_reason():
    if INTERPRET or HAS_CUDA:
        pytest.skip("triton can run here")
    with treelora.use_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.pairwise_similarity(torch.randn(2, 3), torch.randn(1, 2, 3))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, s, b, i: ops.accumulate_and_compare_(m, s, 2, b, None), ValueError, "index is required"),
        (lambda m, s, b, i: ops.accumulate_and_compare_(m, s, 0.5, b, i), ValueError, "count"),
        (lambda m, s, b, i: ops.accumulate_and_compare_(m, s, torch.ones(2), b, i), ValueError, "count"),
        (lambda m, s, b, i: ops.accumulate_and_compare_(m, s[:1], 2, b, i), ValueError, "sample"),
        (lambda m, s, b, i: ops.accumulate_and_compare_(m.half(), s, 2, b, i), TypeError, "mean"),
        (lambda m, s, b, i: ops.accumulate_and_compare_(m, s, 2, b, i, metric="cos"), ValueError, "metric"),
        (lambda m, s, b, i: ops.pairwise_similarity(m, b, index=i.float()), TypeError, "index"),
        (lambda m, s, b, i: ops.pairwise_similarity(m, b, index=i[:1]), ValueError, "index"),
        (lambda m, s, b, i: ops.pairwise_similarity(m, b, index=i + 5), ValueError, "index"),
        (lambda m, s, b, i: ops.pairwise_similarity(m, b.int()), TypeError, "bank"),
        (
            lambda m, s, b, i: ops.pairwise_similarity(m.flatten(), b.flatten(1), offsets=torch.tensor([0, 6])),
            ValueError,
            "offsets",
        ),
    ],
    ids=[
        "no-index",
        "count<1",
        "count-shape",
        "sample-shape",
        "mean-dtype",
        "metric",
        "index-dtype",
        "index-length",
        "index-range",
        "bank-dtype",
        "offsets-end",
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    mean, sample, bank, index = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 2, 4), torch.tensor([0, 2])
    with pytest.raises(error, match=match):
        call(mean, sample, bank, index)
