"""The kernel report (treelora/kernels/report.py) and the LoRA byte/launch/time model (treelora/kernels/lora_model.py).

Parsing is checked on small captured samples of cuobjdump and PTX output, with the expected counts read off by hand;
the model on a shape whose bytes and times are worked out here from first principles; the end-to-end extraction on
real compiles (two Triton kernels for sm_90) and on the built extension when it is there.
"""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.conftest import INTERPRET
from treelora.kernels import lora_model, report

# `cuobjdump -res-usage` of a fat binary: a PTX section, then one ELF section per architecture (trimmed).
RES_USAGE_FATBIN = """
Fatbin ptx code:
================
arch = sm_80
code version = [9,0]
identifier = csrc/lora.cu

Fatbin elf code:
================
arch = sm_80
code version = [1,8]
identifier = csrc/lora.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN8treelora18lora_expand_kernelIfEEvNS_10ExpandArgsE:
  REG:98 STACK:48 SHARED:20480 LOCAL:0 CONSTANT[0]:480 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN8treelora19sum_partials_kernelEPKfl:
  REG:24 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:420 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
identifier = csrc/lora.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN8treelora18lora_expand_kernelIfEEvNS_10ExpandArgsE:
  REG:90 STACK:0 SHARED:20480 LOCAL:16 CONSTANT[0]:480 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# `cuobjdump -res-usage` of a bare cubin (what triton.compile produces): no arch line.
RES_USAGE_CUBIN = """
Resource usage:
 Common:
  GLOBAL:0
 Function _lora_gemm_tma_kernel:
  REG:246 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:648 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# `cuobjdump -sass`: two functions for sm_90a, one for sm_80; predicated instructions, encodings on their own lines.
SASS = """
\tcode for sm_90a
\t\tFunction : _lora_gemm_tma_kernel
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
                                                                              /* 0x000e700000000800 */
        /*2430*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24 ;   /* 0x03e00000081879f0 */
        /*2440*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;
        /*2450*/               @P0 HGMMA.64x256x16.F32.BF16 R24, gdesc[UR16], R24 ;
        /*2460*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*2470*/              @!P1 UTMALDG.2D [UR8], [UR4] ;
        /*2480*/                   EXIT ;
\t\tFunction : _lora_shrink_kernel
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   STL.64 [R1+0x8], R28 ;
        /*0020*/                   LDL R30, [R1+0x10] ;
        /*0030*/              @!PT LDL R31, [R1+0x14] ;
\tcode for sm_80
\t\tFunction : _lora_shrink_kernel
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R14, R4 ;
        /*0020*/                   EXIT ;
"""

PTX = """
.version 8.7
.target sm_90a
\twgmma.fence.sync.aligned;
\twgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, p, 1, 1, 0, 1;
\twgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%r1}, %rd3, %rd4, p, 1, 1, 0, 1;
\twgmma.commit_group.sync.aligned;
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r5, %r6}, {%r7}, {%f1, %f2, %f3, %f4};
\t// mma.sync in a comment does not count
"""


def test_resource_usage_of_a_fat_binary_is_keyed_by_architecture():
    usage = report.parse_resource_usage(RES_USAGE_FATBIN)
    expand = "_ZN8treelora18lora_expand_kernelIfEEvNS_10ExpandArgsE"
    assert usage[("sm_80", expand)] == report.ResourceUsage(registers=98, stack=48, shared=20480, local=0)
    assert usage[("sm_90a", expand)] == report.ResourceUsage(registers=90, stack=0, shared=20480, local=16)
    assert usage[("sm_80", "_ZN8treelora19sum_partials_kernelEPKfl")].registers == 24
    assert len(usage) == 3  # the PTX section has no resource usage


def test_resource_usage_of_a_bare_cubin_has_no_architecture():
    usage = report.parse_resource_usage(RES_USAGE_CUBIN)
    assert usage == {(None, "_lora_gemm_tma_kernel"): report.ResourceUsage(246, 0, 1024, 0)}


def test_sass_counts_per_function_and_architecture():
    sass = report.parse_sass(SASS)
    gemm = sass[("sm_90a", "_lora_gemm_tma_kernel")]
    assert gemm.count("HGMMA") == 3  # one of them predicated
    assert gemm.count("UTMALDG") == 1 and gemm.count("WARPGROUP") == 1
    assert gemm.instructions == 7  # the encoding-only continuation line is not an instruction
    shrink90 = sass[("sm_90a", "_lora_shrink_kernel")]
    assert (shrink90.count("HMMA"), shrink90.count("STL"), shrink90.count("LDL")) == (1, 1, 2)
    shrink80 = sass[("sm_80", "_lora_shrink_kernel")]
    assert (shrink80.count("HMMA"), shrink80.count("STL"), shrink80.instructions) == (2, 0, 3)


def test_ptx_mma_counts_ignore_fences_and_comments():
    assert report.count_ptx_mma(PTX) == {"wgmma": 2, "mma.sync": 1}


@pytest.mark.parametrize(
    "mangled, demangled, expected",
    [
        (
            "_ZN8treelora39_GLOBAL__N__5e485077_7_lora_cu_2a9fced917lora_panel_kernelILi16E13__nv_bfloat16EEvNS0_9"
            "PanelArgsE",
            "void treelora::(anonymous namespace)::lora_panel_kernel<16, __nv_bfloat16>(treelora::(anonymous "
            "namespace)::PanelArgs)",
            "lora_panel_kernel<16, __nv_bfloat16>",
        ),
        ("_ZN8treelora18lora_expand_kernelIfEEvNS_10ExpandArgsE", None, "lora_expand_kernel<IfE>"),
        ("_Z13lora_a_kernelPf", None, "lora_a_kernel"),
        ("_lora_gemm_tma_kernel", None, "_lora_gemm_tma_kernel"),
    ],
)
def test_kernel_names(mangled, demangled, expected):
    assert report.short_name(mangled, demangled) == expected


def _row(**changes) -> report.KernelRow:
    row = dict(backend="cuda", name="lora_x", arch="sm_90a", registers=96, spill_bytes=0, local_ops=0,
               shared_bytes=0, mma_kind="HGMMA", mma_count=4, lora=True, needs_mma=True)  # fmt: skip
    row.update(changes)
    return report.KernelRow(**row)


def test_check_rules_per_row():
    assert _row().problems() == []
    assert _row(mma_kind="-", mma_count=0).problems() == ["no tensor-core instruction"]
    assert _row(arch="sm_80", mma_kind="-", mma_count=0).problems() == []  # the tensor-core rule is for sm_90
    assert _row(needs_mma=False, mma_kind="-", mma_count=0).problems() == []  # an IEEE fp32 product
    assert _row(spill_bytes=48, local_ops=3).problems() == ["48 bytes of stack/local memory, 3 STL/LDL"]
    assert _row(arch="sm_80", local_ops=1).problems() == ["0 bytes of stack/local memory, 1 STL/LDL"]
    assert _row(lora=False, spill_bytes=48, mma_count=0).problems() == []  # other kernels are informational


def test_check_is_per_backend():
    rows = [_row(), _row(backend="triton", name="t", spill_bytes=8)]
    assert report.check(rows, ["cuda"]) == lora_model.check_design("cuda")
    failures = report.check(rows, ["triton"])
    assert "triton sm_90a t: 8 bytes of stack/local memory, 0 STL/LDL" in failures
    assert report.check([], ["triton"])[0] == "triton: no LoRA kernels found to check"


@pytest.mark.parametrize(
    "name, needs",
    [
        ("lora_panel_kernel<16, __nv_bfloat16>", True),
        ("lora_gemm_kernel<__half, float>", True),  # fp32 accumulators of a 16-bit product
        ("lora_panel_kernel<16, float>", False),  # fp32 data only: IEEE fp32 may run on FMA units
        ("lora_fused_kernel", True),  # no template arguments: whatever dtype it takes, it must use tensor cores
        ("similarity_partial_kernel<(treelora::Pass)0, __half, float, true>", False),  # not a LoRA kernel
    ],
)
def test_cuda_tensor_core_rule(name, needs):
    assert report._cuda_needs_mma(name) is needs


def test_grouping_folds_instantiations_and_keeps_lora_rows():
    rows = [
        _row(name="lora_a<float>", spill_bytes=8),
        _row(name="sim<1>", lora=False, needs_mma=False, registers=40, mma_kind="-", mma_count=0),
        _row(name="sim<2>", lora=False, needs_mma=False, registers=64, local_ops=2, mma_kind="-", mma_count=0),
        _row(name="sim<2>", arch="sm_80", lora=False, needs_mma=False, registers=30, mma_kind="-", mma_count=0),
    ]
    grouped = {(r.arch, r.name): r for r in report.group_instantiations(rows)}
    assert grouped[("sm_90a", "lora_a<float>")] is rows[0]
    folded = grouped[("sm_90a", "sim (max of 2 instantiations)")]
    assert (folded.registers, folded.local_ops, folded.mma_count, folded.lora) == (64, 2, 0, False)
    assert grouped[("sm_80", "sim<2>")] is rows[3]


# --- the model ----------------------------------------------------------------------------------------------------

BENCH = lora_model.Shape(8192, 4096, 4096, 16)
MiB = 2**20


def test_base_linear_bytes_and_time_by_hand():
    """x, y, dy, dx: 64 MiB each (8192 x 4096 bf16), W 32 MiB; each GEMM 2·8192·4096·4096 FLOPs, compute-bound."""
    launches = lora_model.base_linear(BENCH)
    assert [x.bytes for x in launches] == [(64 + 32 + 64) * MiB + 8192, (64 + 32 + 64) * MiB]
    e = lora_model.estimate("triton-fused", BENCH, lora_model.H100_SXM)
    gemm_s = 2 * 8192 * 4096 * 4096 / 989.4e12
    assert e.base_time_s == pytest.approx(2 * (gemm_s + lora_model.LAUNCH_GAP_S))
    assert e.base_launches == 2


def test_fused_design_extra_bytes_by_hand():
    """Beyond the base GEMMs: x read by the shrink and by dA, dy by du/dB (64 MiB each); u written once and read by
    the GEMM and du/dB, du written once and read by the dx GEMM and dA (0.5 MiB each access); A and B read once per
    use (128 KiB); dB accumulated (read + written, 256 KiB each), dA likewise (256 KiB each); the accumulator zeroed
    and cast to bf16 (384 KiB fp32, 192 KiB bf16)."""
    e = lora_model.estimate("triton-fused", BENCH, lora_model.H100_SXM)
    u = 8192 * 16 * 4
    a = b = 16 * 4096 * 2
    acc = (16 * 4096 + 4096 * 16) * 4
    expected = 3 * 64 * MiB + 6 * u + 2 * a + 2 * b + 2 * (4096 * 16 * 4) + 2 * (16 * 4096 * 4)
    expected += 2 * acc + acc // 2
    assert e.extra_bytes == pytest.approx(expected)
    assert e.launches == 7


def test_today_design_matches_the_audit():
    """The sm_90 plan before the fused GEMM: 12 launches and, besides the base GEMMs, ~472 MB: x, dy, x once and y,
    dx read and rewritten (7 x 64 MiB = 470 MB), plus the small tensors."""
    e = lora_model.estimate("triton-cublas-expand", BENCH, lora_model.H100_SXM)
    assert e.launches == 12
    assert 7 * 64 * MiB < e.extra_bytes < 7 * 64 * MiB + 8e6


def test_side_stream_hides_only_the_last_waves_idle_time():
    """dx GEMM of 8192 x 4096 in 128 x 256 tiles: 1024 tiles on 132 SMs, 8 waves, the last one 100 tiles: 32 SMs
    idle for one tile time; dA (68 MB) needs 20.3 us of the whole H100 at 3.35 TB/s, of which 32/132 of a tile time
    hides."""
    h100 = lora_model.H100_SXM
    plan = lora_model.DESIGNS["triton-fused"](BENCH)
    gemm, grad_a = plan[4], plan[5]
    assert grad_a.side and gemm.gemm_out == (8192, 4096)
    tile_s = 2 * 128 * 256 * (4096 + 16) / (989.4e12 / 132)
    assert lora_model.last_wave_idle_time(gemm, h100) == pytest.approx(32 * tile_s / 132)
    dA_s = grad_a.bytes / 3.35e12
    assert lora_model.side_visible_time(grad_a, gemm, h100) == pytest.approx(dA_s - 32 * tile_s / 132)
    serial = lora_model.estimate("triton-fused-serial", BENCH, h100)
    overlapped = lora_model.estimate("triton-fused", BENCH, h100)
    hidden = 32 * tile_s / 132 + lora_model.LAUNCH_GAP_S
    assert serial.time_s - overlapped.time_s == pytest.approx(hidden)


def test_byte_budget_from_the_target():
    """1.10 x on H100: 0.10 x 2 GEMMs of 277.9 us (plus their launch gaps) x 3.35 TB/s = 186 MB."""
    gemm_s = 2 * 8192 * 4096 * 4096 / 989.4e12
    expected = 0.10 * 2 * (gemm_s + lora_model.LAUNCH_GAP_S) * 3.35e12
    assert lora_model.byte_budget(1.10, BENCH, lora_model.H100_SXM) == pytest.approx(expected)
    assert 185e6 < expected < 187e6


def test_chosen_designs_against_their_budgets():
    """The Triton design fits its budget; the CUDA plan of today (beta = 1 passes over y and dx) does not."""
    assert lora_model.check_design("triton") == []
    cuda = lora_model.check_design("cuda")
    assert len(cuda) == 1 and "cuda-beta1" in cuda[0]
    for design in lora_model.DESIGNS:
        for device in lora_model.DEVICES:
            e = lora_model.estimate(design, BENCH, device)
            assert e.ratio > 1.0 and e.critical_extra_bytes <= e.extra_bytes + 1e-6
    with pytest.raises(ValueError, match="design"):
        lora_model.estimate("nope", BENCH, lora_model.H100_SXM)


def test_model_table_prints_every_design_and_device():
    text = report.format_model(shapes=[(8192, 4096, 4096, 16)])
    for design in lora_model.DESIGNS:
        assert design in text
    for device in lora_model.DEVICES:
        assert device.name in text
    assert math.isfinite(lora_model.estimate("cuda-beta1", BENCH, lora_model.H200_SXM).ratio)


# --- end to end ---------------------------------------------------------------------------------------------------

_needs_tools = pytest.mark.skipif(
    INTERPRET or importlib.util.find_spec("triton") is None or report.find_cuobjdump() is None,
    reason="needs triton (kernels defined without TRITON_INTERPRET) and cuobjdump",
)


@pytest.mark.requires_triton
@_needs_tools
def test_triton_rows_from_real_compiles():
    """The forward GEMM of the benchmark configuration on sm_90: wgmma (HGMMA) and no spills; the dropout-mask kernel:
    no tensor cores and not a LoRA kernel the tensor-core rule applies to."""
    from treelora.kernels.triton import compile_specs

    specs = report._all_specs()
    names = [s.name for s in specs]
    gemm = next(s.name for s in compile_specs.bench_lora_specs() if s.name.startswith("sm90/gemm-forward-tma/"))
    row = report.KernelRow(**report._triton_spec_row(names.index(gemm), 90, report.find_cuobjdump()))
    print(report.format_rows([row]))
    assert row.arch.startswith("sm_90") and row.mma_kind == "HGMMA" and row.mma_count > 0
    assert row.ptx_mma["wgmma"] > 0 and row.registers > 0 and row.problems() == []
    keep = report.KernelRow(**report._triton_spec_row(names.index("dropout-keep"), 80, report.find_cuobjdump()))
    assert keep.arch == "sm_80" and keep.mma_count == 0 and keep.lora and not keep.needs_mma


@_needs_tools
def test_cuda_rows_from_the_built_extension():
    library = report.extension_path()
    if library is None:
        pytest.skip("treelora._C was not built")
    rows = report.cuda_rows(report.find_cuobjdump(), library)
    lora = [r for r in rows if r.lora]
    assert lora and {r.arch for r in lora} >= {"sm_80", "sm_90a"}
    assert all(r.registers > 0 and r.name.startswith("lora_") for r in lora)
    assert any(not r.lora for r in rows)  # the masked-update and similarity kernels are listed too
