"""The CUDA C++ kernels of csrc/ on the CPU emulator (tests/cuda_emulator): the checks of test_cuda_similarity.py,
test_cuda_masked_update.py and test_cuda_lora.py on CPU tensors, through the real launchers and ops, against the same
float64 references and tolerances, in ascending and (for a subset) descending order of blocks and threads; plus what
only the emulator can check (the same bits whatever that order, launch counts, grids sized for a 132-SM device) and
the emulator's own self-tests.

Run with ``TREELORA_CUDA_EMULATOR=1 python -m pytest -m cuda_emulated``; without the variable every test here skips.
Shapes are smaller than on a GPU where the GPU's are slow to emulate, but still span several blocks, vector paths
with scalar heads and tails, several chunks per layer and several partial slabs per reduction.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests import cuda_emulator
from tests import test_cuda_lora as lora
from tests import test_cuda_masked_update as masked
from tests import test_cuda_similarity as similarity
from tests import test_ops_lora_routing as routing
from tests.utils import assert_close_to_ref
from treelora import _cpp_lib, backends, use_backend
from treelora.kernels.cuda import similarity as cuda_similarity
from treelora.ops.masked_update import masked_adamw_
from treelora.ops.similarity import METRICS, pairwise_similarity_ref

pytestmark = pytest.mark.cuda_emulated
CPU = "cpu"
# Emulated SM count for grids sized like an H100's (132 SMs): every work item gets its own block.
H100_SMS = 132
# Dense similarity shapes (T, L, D): the GPU tests' shapes, whose rows are mostly not 16-byte aligned (scalar path),
# and two whose rows are, so that layers starting off the 8-element grid take the vector path with a scalar head
# and tail: D = 4100 puts a 4-element head on layer 1 and a 4-element tail on layer 0's second chunk.
SIMILARITY_SHAPES = similarity.SHAPES + [(3, 2, 4100), (2, 4, 1030)]
# LoRA (M, K, N): the GPU tests' small shapes, and scaled-down versions of the long-K and tall-M ones that keep K
# and M off the tile sizes (128 columns, 16 rows) and still give several panels per reduction.
LORA_SHAPES = [(1, 40, 24), (113, 300, 77), (37, 1030, 9), (530, 72, 40)]


@pytest.fixture(scope="session")
def emulator():
    return cuda_emulator.load()


@pytest.fixture
def on_emulator(emulator):
    with cuda_emulator.emulated_cuda(emulator) as module:
        yield module


@pytest.fixture
def on_emulator_in_reverse(emulator):
    """Blocks, and the threads of each block, in descending order: a thread that runs ahead of the others now has a
    higher index (a missing barrier after a read by low threads shows here, not in ascending order)."""
    with cuda_emulator.emulated_cuda(emulator, reverse_order=True) as module:
        yield module


def _reverse_order(module):
    """Run every later launch with blocks, and the threads of each block, in descending order."""
    return lambda: module.emulator_configure(1, True)


# --- similarity ----------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("dtypes", similarity.DTYPES, ids=similarity._ids)
@pytest.mark.parametrize("shape", SIMILARITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("metric", METRICS)
def test_similarity_dense(metric, shape, dtypes):
    similarity.check_dense(metric, shape, dtypes, device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("dtypes", similarity.DTYPES[:3], ids=similarity._ids)
@pytest.mark.parametrize("metric", METRICS)
def test_similarity_ragged(metric, dtypes):
    similarity.check_ragged(metric, dtypes, device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("metric", ["l1", "cosine", "l1_normalized"])
def test_similarity_strided_and_misaligned(metric):
    similarity.check_strided_and_misaligned(metric, device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("sample_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count_on_device", [False, True], ids=["count-number", "count-tensor"])
@pytest.mark.parametrize("metric", METRICS)
def test_similarity_accumulate_and_compare(metric, count_on_device, sample_dtype):
    similarity.check_accumulate(metric, count_on_device, sample_dtype, device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("metric", METRICS)
def test_similarity_padding_outside_the_views_is_never_read(metric, bank_dtype):
    similarity.check_padding_outside_the_views_is_never_read(metric, bank_dtype, device=CPU)


@pytest.mark.usefixtures("on_emulator_in_reverse")
@pytest.mark.parametrize("dtypes", similarity.DTYPES[:3], ids=similarity._ids)
@pytest.mark.parametrize("metric", METRICS)
def test_similarity_in_reverse_order(metric, dtypes):
    for shape in [(4, 3, 1024), (3, 2, 4100), (2, 4, 1030)]:
        similarity.check_dense(metric, shape, dtypes, device=CPU)
    similarity.check_ragged(metric, dtypes, device=CPU)
    similarity.check_accumulate(metric, True, dtypes[0], device=CPU)


def test_similarity_same_bits_in_reverse_order(on_emulator):
    similarity.check_reproducible((3, 5, 9000), device=CPU, between=_reverse_order(on_emulator))


@pytest.mark.usefixtures("on_emulator")
def test_similarity_out_of_range_index_gives_nan():
    """As test_cuda_similarity's check, through the launcher: the op checks a CPU index on the host before any
    kernel could see it (a device index cannot be checked without a synchronisation)."""
    q, bank = torch.randn(2 * 64), torch.randn(3, 2 * 64)
    for metric in METRICS:
        out = cuda_similarity.similarity_flat(q, bank, (0, 64, 128), metric, torch.tensor([1, 3]))
        ref = pairwise_similarity_ref(q.double(), bank.double(), metric, torch.tensor([1, 0]), offsets=(0, 64, 128))
        assert torch.isnan(out[1]) and not torch.isnan(out[0]), f"{metric}: {out.tolist()}"
        assert_close_to_ref(f"{metric} valid layer", out[:1], ref[:1], dtype=torch.float32)


# --- masked update -------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("selection", masked.SELECTIONS)
@pytest.mark.parametrize("dtype", masked.PARAM_DTYPES, ids=lambda d: str(d)[6:])
def test_masked_adamw(dtype, selection):
    masked.check_adamw(dtype, selection, device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("selection", ["all", "mixed", "density-0.3"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", masked.PARAM_DTYPES, ids=lambda d: str(d)[6:])
def test_masked_sgd(dtype, momentum, selection):
    masked.check_sgd(dtype, momentum, selection, device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("dtype", masked.PARAM_DTYPES, ids=lambda d: str(d)[6:])
def test_masked_radix_select(dtype):
    masked.check_radix_select(dtype, device=CPU)


@pytest.mark.usefixtures("on_emulator")
def test_masked_step_on_the_device():
    masked.check_device_step(device=CPU)


@pytest.mark.usefixtures("on_emulator")
def test_masked_many_tensors_and_misaligned_views():
    masked.check_many_tensors(device=CPU)


@pytest.mark.usefixtures("on_emulator")
def test_masked_repeated_steps():
    masked.check_repeated_steps(device=CPU)


@pytest.mark.usefixtures("on_emulator")
def test_masked_candidate_lists_overflow_and_nan():
    masked.check_candidate_lists(device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("selection", ["all", "bool", "index", "density-0.3"])
@pytest.mark.parametrize("dtype", masked.PARAM_DTYPES, ids=lambda d: str(d)[6:])
def test_masked_writes_stay_inside_each_tensor(dtype, selection):
    masked.check_writes_stay_inside_each_tensor(dtype, selection, device=CPU)


@pytest.mark.usefixtures("on_emulator_in_reverse")
@pytest.mark.parametrize("selection", masked.SELECTIONS)
def test_masked_adamw_in_reverse_order(selection):
    masked.check_adamw(torch.bfloat16, selection, device=CPU)
    masked.check_sgd(torch.float32, 0.9, selection, device=CPU)


@pytest.mark.usefixtures("on_emulator_in_reverse")
def test_masked_radix_select_in_reverse_order():
    masked.check_radix_select(torch.float32, device=CPU)


def test_masked_update_launches_do_not_grow_with_the_tensor_count(on_emulator):
    """One launch per pipeline stage for all tensors: the first digit (histogram + pick), the update with the
    candidates' compaction, 3 candidate digits x (histogram + pick), the candidates' update."""
    launches = []
    for count in (3, 60):
        params, grads, m, v = masked._tensors(torch.float32, [(50,)] * count, CPU)
        before = on_emulator.emulator_counters()["launches"]
        with use_backend("cuda"):
            masked_adamw_(params, grads, m, v, 1, lr=0.1, density=0.3)
        launches.append(on_emulator.emulator_counters()["launches"] - before)
    assert launches == [10, 10], f"launches per call for 3 and 60 tensors: {launches}"


def test_masked_update_same_bits_in_reverse_order(on_emulator):
    params, grads, m, v = masked._tensors(torch.bfloat16, masked.SHAPES, CPU)
    runs = []
    for step in range(2):
        if step:
            _reverse_order(on_emulator)()
        out = masked._clone(params, grads, m, v)
        with use_backend("cuda"):
            masked_adamw_(*out, 3, lr=0.1, weight_decay=0.05, density=0.3)
        runs.append(out)
    for group_a, group_b in zip(runs[0], runs[1]):
        for a, b in zip(group_a, group_b):
            assert torch.equal(a, b), "the update depends on the order of blocks or threads"


# --- LoRA ----------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", lora.DTYPES, ids=lambda d: str(d)[6:])
def test_lora_matches_reference(dtype, shape, dropout_p):
    lora.check_matches_reference(dtype, shape, dropout_p, device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("r", [1, 16, 40, 80], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_lora_ranks_and_stacked_adapters(dtype, r):
    """r = 1 (no frozen part, padded to a chunk of 16), 16, 40 (one chunk of 64 for bf16, two of 32 for fp32) and 80
    (two chunks of 64 / three of 32: the backward over x restages du and A per chunk; frozen_rank = 40 skips the
    first chunk's dA)."""
    lora.check_ranks_and_stacked_adapters(dtype, r, device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("needs", lora.GRADIENT_SUBSETS, ids=lora._subset_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_lora_partial_gradients(dtype, needs):
    lora.check_partial_gradients(dtype, needs, shape=(150, 200, 130), device=CPU)


@pytest.mark.usefixtures("on_emulator")
def test_lora_empty_dimensions_in_the_launchers():
    lora.check_empty_dimensions_in_the_launchers(device=CPU)


def test_lora_plan_mirror_matches_the_emulated_planner(emulator):
    lora.check_plan_mirror(emulator)


def test_lora_kernels_have_no_shared_memory_bank_conflicts(on_emulator):
    """Every ldmatrix and 16-byte shared store of the LoRA kernels takes one wavefront per access phase, for each
    precision, rank chunk width and the split-K / multi-panel paths (132 SMs)."""
    before = on_emulator.emulator_counters()
    for dtype in lora.DTYPES:
        lora.check_matches_reference(dtype, (113, 300, 77), 0.25, device=CPU)
    lora.check_ranks_and_stacked_adapters(torch.bfloat16, 80, shape=(70, 130, 90), device=CPU)
    lora.check_ranks_and_stacked_adapters(torch.float32, 40, shape=(70, 130, 90), device=CPU)
    launches = on_emulator.emulator_counters()["launches"] - before["launches"]
    conflicts = on_emulator.emulator_counters()["bank_conflicts"] - before["bank_conflicts"]
    assert launches > 0 and conflicts == 0, f"{conflicts} extra shared-memory wavefronts in {launches} launches"


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("dtype", lora.DTYPES, ids=lambda d: str(d)[6:])
def test_lora_autograd_through_the_op(dtype):
    lora.check_autograd_through_the_op(dtype, device=CPU)


@pytest.mark.usefixtures("on_emulator")
def test_lora_dropout_mask_follows_the_torch_seed():
    lora.check_dropout_mask_follows_the_torch_seed(device=CPU)


@pytest.mark.usefixtures("on_emulator")
def test_lora_disabled_adapter_is_bitwise_the_base_op():
    lora.check_disabled_adapter_is_bitwise_the_base_op(device=CPU)


@pytest.mark.usefixtures("on_emulator")
def test_lora_empty_batch():
    lora.check_empty_batch(device=CPU)


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("s_grad", [False, True], ids=["s-frozen", "s-trainable"])
def test_lora_tensor_scaling(s_grad, monkeypatch):
    routing.check_tensor_scaling("cuda", torch.float32, CPU, s_grad, monkeypatch, torch.device(CPU))


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_lora_autocast_matches_stock_lora(grad):
    routing.check_autocast_matches_stock_lora("cuda", grad, True, device=torch.device(CPU))


@pytest.mark.usefixtures("on_emulator")
@pytest.mark.parametrize("dtype", lora.DTYPES, ids=lambda d: str(d)[6:])
def test_lora_padding_outside_the_views_is_never_read(dtype):
    lora.check_padding_outside_the_views_is_never_read(dtype, device=CPU)


@pytest.mark.usefixtures("on_emulator_in_reverse")
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_in_reverse_order(shape):
    lora.check_matches_reference(torch.bfloat16, shape, 0.25, device=CPU)
    lora.check_ranks_and_stacked_adapters(torch.float32, 40, shape=shape, device=CPU)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_lora_same_bits_in_reverse_order(on_emulator, dropout_p):
    lora.check_reproducible((150, 300, 100), dropout_p, device=CPU, between=_reverse_order(on_emulator))


# --- grids sized for a large GPU -----------------------------------------------------------------------------------


def test_grids_sized_for_132_sms(emulator):
    """The launch planners at an H100's SM count: one block per similarity work item, up to 528 LoRA panels."""
    with cuda_emulator.emulated_cuda(emulator, sm_count=H100_SMS):
        similarity.check_ragged("cosine", similarity.DTYPES[1], device=CPU)
        masked.check_adamw(torch.float32, "density-0.01", device=CPU)
        lora.check_matches_reference(torch.bfloat16, (113, 300, 77), 0.25, device=CPU)
        lora.check_ranks_and_stacked_adapters(torch.float32, 40, device=CPU)


# --- the emulator itself ------------------------------------------------------------------------------------------


def test_emulated_module_is_never_the_extension(emulator):
    """Loaded under its own name and kept out of sys.modules; routed only inside emulated_cuda."""
    assert emulator.__name__ == "_treelora_cuda_emulated" and emulator.compiled_archs() == ["sm_emulated"]
    assert emulator.__name__ not in sys.modules and _cpp_lib.module is not emulator
    q, bank = torch.randn(2, 16), torch.randn(3, 2, 16)
    with cuda_emulator.emulated_cuda(emulator):
        assert backends.explain("pairwise_similarity", q, bank, "l1")["cuda"] == []
        assert _cpp_lib.module is emulator
    assert _cpp_lib.module is not emulator
    assert backends.explain("pairwise_similarity", q, bank, "l1")["cuda"], "the routing outlived its block"


def test_emulator_shuffles_sum_each_warp(emulator):
    """A 5-step xor butterfly leaves every lane with its warp's total (inputs 0, 1, 2, ...), in either order."""
    for reverse in (False, True):
        emulator.emulator_configure(1, reverse)
        out = emulator.selftest.butterfly(96, 2)
        expect = [float(sum(range(32 * (i // 32), 32 * (i // 32) + 32))) for i in range(192)]
        assert out == expect
    emulator.emulator_configure(1, False)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_emulator_exposes_a_missing_barrier(emulator, reverse):
    """Through shared memory, out[t] = in[(t + 1) % n]. With __syncthreads() every read sees its write; without it a
    thread reads its neighbour's slot before the neighbour ran (forward order: every thread but the last; reverse:
    only the last) and gets the 0xff poison (-1), in every block since each block starts poisoned."""
    emulator.emulator_configure(1, reverse)
    try:
        n = 64
        expect = [b * n + (t + 1) % n for b in range(2) for t in range(n)]
        assert emulator.selftest.rotate(n, 2, True) == expect
        racy = emulator.selftest.rotate(n, 2, False)
    finally:
        emulator.emulator_configure(1, False)
    stale = [-1 if (t < n - 1) != reverse else expect[b * n + t] for b in range(2) for t in range(n)]
    assert racy == stale


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        ("barrier_after_early_exit", "ended while 32 threads of its block wait at __syncthreads"),
        ("shuffle_with_ended_lanes", "wait for it in a shuffle"),
        ("barrier_and_shuffle_deadlock", "deadlock: no thread of the block can proceed"),
    ],
)
def test_emulator_rejects_divergent_synchronisation(emulator, kernel, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(emulator.selftest, kernel)()


@pytest.mark.parametrize("trans", [False, True], ids=["ldmatrix", "ldmatrix.trans"])
def test_emulator_ldmatrix_follows_the_ptx_fragment_layout(emulator, trans):
    """ldmatrix.x4 over a 32 x 8 matrix whose element (i, j) is 8 i + j: register m of lane 4 g + t holds matrix m's
    row g, elements 2t and 2t + 1 (transposed: rows 2t and 2t + 1 of column g), lower element in the low half."""
    regs = emulator.selftest.ldmatrix(trans, 8)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for m in range(4):
            if trans:
                lo, hi = (8 * m + 2 * t) * 8 + g, (8 * m + 2 * t + 1) * 8 + g
            else:
                lo = (8 * m + g) * 8 + 2 * t
                hi = lo + 1
            assert regs[4 * lane + m] == lo | (hi << 16), f"lane {lane} register {m}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_emulator_mma_follows_the_ptx_fragment_layout(emulator, dtype):
    """mma.sync.m16n8k16 with fragments packed by the ISA's layout: lane 4 g + t's accumulators are D[g][2t],
    D[g][2t + 1], D[g + 8][2t], D[g + 8][2t + 1] of D = A B + C, exact here (products of 16-bit values summed in
    double, rounded once)."""
    a, b, c = torch.randn(16, 16).to(dtype), torch.randn(16, 8).to(dtype), torch.randn(16, 8)
    bits = [t.view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).flatten().tolist() for t in (a, b)]
    out = torch.tensor(emulator.selftest.mma(dtype == torch.bfloat16, *bits, c.flatten().tolist()))
    d = (a.double() @ b.double() + c.double()).float()
    expect = [d[g + 8 * (i // 2), 2 * t + i % 2] for lane in range(32) for g, t in [divmod(lane, 4)] for i in range(4)]
    assert torch.equal(out, torch.stack(expect))


def test_emulator_counts_ldmatrix_bank_conflicts(emulator):
    """Rows 16 bytes apart fill the 32 banks once per 8-row matrix; rows 128 bytes apart all start in the same bank,
    so each of the 4 matrices takes 8 wavefronts instead of 1."""
    for stride, extra in [(8, 0), (16, 4), (64, 28)]:
        before = emulator.emulator_counters()["bank_conflicts"]
        emulator.selftest.ldmatrix(False, stride)
        assert emulator.emulator_counters()["bank_conflicts"] - before == extra, f"row stride {stride} elements"


def test_emulator_reports_invalid_launch_configurations(emulator):
    assert emulator.selftest.launch_error(2048) == "cudaErrorInvalidConfiguration"
    assert emulator.selftest.launch_error(1024) == "cudaSuccess"


@pytest.mark.skipif(not cuda_emulator.sanitize_enabled(), reason="TREELORA_CUDA_EMULATOR_SANITIZE=0")
@pytest.mark.parametrize(
    ("kernel", "report"),
    [
        ("misaligned_vector_load", r"misaligned-pointer-use at .*selftest\.cu:\d+.*\[block \(0, 0, 0\), thread \(0,"),
        ("shared_index_out_of_range", r"out-of-bounds-index at .*selftest\.cu:\d+:\d+: Index 32 .*thread \(31,"),
    ],
    ids=["misaligned", "out-of-bounds"],
)
def test_emulator_sanitizer_stops_faulting_kernels(emulator, kernel, report):
    """A misaligned 16-byte load and a shared-array index one past the end, which fault or corrupt on a GPU: the
    launch stops with UBSan's report, naming the source line and the thread."""
    with pytest.raises(RuntimeError, match=report):
        getattr(emulator.selftest, kernel)()


def _conversion_inputs() -> torch.Tensor:
    """Every bf16 bit pattern widened to fp32; points a quarter, half (ties) and three quarters between neighbouring
    fp16 values; random fp32 bit patterns and bf16 ties (low 16 bits 0x8000); the edges of fp16's range."""
    every_bf16 = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    finite = halves[torch.isfinite(halves)].sort().values
    between = torch.cat([finite[:-1] + (finite[1:] - finite[:-1]) * f for f in (0.25, 0.5, 0.75)])
    words = torch.randint(-(1 << 31), 1 << 31, (20000,), dtype=torch.int64).to(torch.int32)
    ties = (words & ~0xFFFF) | 0x8000
    random_bits = torch.cat([words, ties]).view(torch.float32)
    edges = torch.tensor([6.0e-8, 2.98e-8, 2.9802322e-8, 6.1e-5, 65504.0, 65519.0, 65520.0, 1e6, -1e-9, 1e-30])
    return torch.cat([every_bf16, between, random_bits, edges])


def test_emulator_half_and_bfloat16_conversions_match_torch(emulator):
    """The stand-in conversions against torch's (round to nearest even), bit for bit; NaN is canonical 0x7fff."""
    values = _conversion_inputs()
    finite = values[~torch.isnan(values)]
    st = emulator.selftest
    for name, dtype, to_bits, from_bits in [
        ("fp16", torch.float16, st.float_to_half_bits, st.half_bits_to_float),
        ("bf16", torch.bfloat16, st.float_to_bfloat16_bits, st.bfloat16_bits_to_float),
    ]:
        bits = torch.tensor(to_bits(finite.tolist()), dtype=torch.int32).to(torch.int16)
        expect = finite.to(dtype).view(torch.int16)
        mismatch = (bits != expect).nonzero().flatten()
        assert mismatch.numel() == 0, f"{name}: {finite[mismatch[:5]].tolist()} convert to other bits than torch's"
        back = torch.tensor(from_bits(expect.to(torch.int32).bitwise_and(0xFFFF).tolist()))
        assert torch.equal(back, finite.to(dtype).float()), f"{name}: widening differs from torch's"
        assert to_bits([float("nan")]) == [0x7FFF]
