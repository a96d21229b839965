"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, with no GPU present.

A :class:`CompileSpec` is one specialisation of a ``@triton.jit`` kernel; :func:`lora_specs`,
:func:`similarity_specs` and :func:`masked_update_specs` list every kernel's typical specialisations (their code
paths, dtypes and the tiles of the configuration table) and :func:`compile_for_target` compiles one for ``sm_<N>``.
The CPU test lane compiles every spec for sm_80 and sm_90 (tests/test_triton_compile.py): this catches what the
interpreter forgives (layout, shape and type errors, shared memory over the limit). Only tests and kernel reports
import this module; the kernel modules never do, so building the specs costs nothing on their import path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from treelora.kernels import env
from treelora.kernels.constants import KERNEL_DTYPES, METRIC_CODES
from treelora.kernels.triton import lora, masked_update, similarity
from treelora.kernels.triton.lora_configs import select_config


@dataclass(frozen=True)
class CompileSpec:
    """One specialisation of a ``@triton.jit`` kernel: argument types (``"*bf16"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``, ...) by name, and the values of its constexpr arguments."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    capabilities: tuple[int, ...] = (80, 90)  # the architectures (sm_<N>) it runs on and is compiled for


def compile_for_target(spec: CompileSpec, capability: int, warp_size: int = 32, aligned: bool = False) -> Any:
    """Compile ``spec`` to a cubin for ``sm_<capability>`` without a GPU; returns triton's compiled kernel.

    ``aligned`` adds the divisibility-by-16 hints triton attaches at run time to pointers of contiguous tensors and
    to integer sizes / strides that are multiples of 16, so the vectorised, pipelined variant that aligned shapes get
    is compiled (without it, the generic variant is)."""
    if env.TRITON_INTERPRET:
        raise RuntimeError("kernels defined under TRITON_INTERPRET=1 cannot be compiled; unset it")
    signature = dict(spec.signature)
    for name in spec.constexprs:
        signature.setdefault(name, "constexpr")
    attrs = {}
    if aligned:
        names = spec.kernel.arg_names
        hinted = [n for n, t in signature.items() if t.startswith("*") or t in ("i32", "i64")]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    src = ASTSource(fn=spec.kernel, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", capability, warp_size), options=options)


def all_specs(exhaustive: bool = False) -> list[CompileSpec]:
    """Every spec of every Triton kernel module; ``exhaustive``: the LoRA kernels of every configuration of the table
    (the kernel report's check), not only the benchmark bucket's (see :func:`lora_specs`)."""
    return [*lora_specs(exhaustive=exhaustive), *similarity_specs(), *masked_update_specs()]


# --- lora.py ------------------------------------------------------------------------------------------------------

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# One (M, r) per bucket of the configuration table (lora_configs.bucket): many/few rows x narrow/wide rank.
_BUCKET_SHAPES = ((8192, 16), (8192, 64), (1024, 16), (1024, 64))
# The architecture each table family's tiles run on: sm80 (Ampere/Ada: also checks the 99 KB of sm86/sm89 shared
# memory) and sm90 (Hopper).
FAMILY_CAPABILITY = {"sm80": 80, "sm90": 90}


def _signature(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, Any]) -> dict[str, str]:
    """Argument types in the kernel's order: the given pointers (and descriptors), fp32 scalars, i32 for the rest."""
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in pointers:
            out[name] = pointers[name]
        else:
            out[name] = "fp32" if name in floats else "i32"
    return out


# Strides that are 1 for contiguous inputs: triton specialises an integer argument equal to 1 into a constant at
# launch, which is what makes those loads contiguous (vectorised, and pipelined with cp.async), so the specs do too.
_UNIT_STRIDES = {
    "shrink": dict(stride_xk=1, stride_ak=1, stride_ur=1),
    "forward": dict(stride_ak=1, stride_bk=1, stride_ur=1, stride_vr=1, stride_cn=1),  # x, Wᵀ, u, Bᵀ, y
    "dx": dict(stride_ak=1, stride_bn=1, stride_ur=1, stride_vn=1, stride_cn=1),  # dy, W, du, A, dx
    "tma-forward": dict(stride_ur=1, stride_vr=1),  # u, Bᵀ (the operands go through descriptors)
    "tma-dx": dict(stride_ur=1, stride_vn=1),  # du, A
    "expand": dict(stride_ur=1, stride_vr=1, stride_cn=1),
    "dudb": dict(stride_dyn=1, stride_br=1, stride_ur=1, stride_dur=1, stride_dbr=1),
    "grad_a": dict(stride_xk=1, stride_dur=1, stride_dak=1),
}


def _tiles_tag(t) -> str:
    n = f"x{t.block_n}" if hasattr(t, "block_n") else ""
    return f"{t.block_m}{n}x{t.block_k}w{t.num_warps}s{t.num_stages}"


def _config_specs(fam: str, dtype: torch.dtype, prec: str, cfg, r: int, dropout: bool) -> list[CompileSpec]:
    """Every kernel a call with this configuration can launch (both GEMM kernels: the TMA one for aligned 16-bit
    operands, the pointer one for the rest), with and without atomics where the launcher picks either."""
    t = _TYPES[dtype]
    block_r = lora._block_r(r, cfg.max_block_r)  # of the streaming kernels; the GEMMs' is their tiles' block_r
    # x's dtype for the activations; adapters in fp32 with 16-bit activations (the common mixed case).
    ad = "fp32" if dtype != torch.float32 else t
    tag = f"{t}{'-ieee' if prec == 'ieee' else ''}-{'dropout' if dropout else 'nodrop'}-r{r}"
    common = dict(DOT_PRECISION=prec, UPCAST=False)
    specs = []

    def add(role, kernel, tiles, pointers, floats, constexprs):
        name = f"{fam}/{role}/{tag}/{_tiles_tag(tiles)}"
        constexprs = {**constexprs, **common}
        sig = _signature(kernel, pointers, floats, constexprs)
        specs.append(CompileSpec(name, kernel, sig, constexprs, tiles.num_warps, tiles.num_stages,
                                 (FAMILY_CAPABILITY[fam],)))  # fmt: skip

    sh = cfg.shrink
    for atomic in (False, True):
        add(f"shrink{'-atomic' if atomic else ''}", lora._lora_shrink_kernel, sh,
            {"x_ptr": f"*{t}", "a_ptr": f"*{ad}", "u_ptr": "*fp32", "seed_ptr": "*i64"}, ("p", "scale"),
            dict(_UNIT_STRIDES["shrink"], DROPOUT=dropout, ATOMIC=atomic, BLOCK_M=sh.block_m, BLOCK_K=sh.block_k,
                 BLOCK_R=block_r))  # fmt: skip
    gemm_ptrs = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "u_ptr": "*fp32", "v_ptr": f"*{ad}", "bias_ptr": f"*{t}",
                 "c_ptr": f"*{t}", "seed_ptr": "*i64"}  # fmt: skip
    # The forward GEMM (bias, never dropout) and the dx GEMM (no bias; the dropout epilogue, with its own tiles).
    for role, g, forward in (("gemm-forward", cfg.gemm, True), ("gemm-dx", cfg.gemm_dropout if dropout else cfg.gemm,
                                                                  False)):  # fmt: skip
        if forward and dropout:
            continue
        gr = lora._block_r(r, g.block_r)
        geometry = dict(BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, BLOCK_R=gr, GROUP_M=g.group_m,
                        ONE_R_BLOCK=r <= gr)  # fmt: skip
        add(role, lora._lora_gemm_kernel, g, gemm_ptrs, ("p", "drop_scale"),
            dict(_UNIT_STRIDES["forward" if forward else "dx"], BASE_GEMM=True, HAS_BIAS=forward, DROPOUT=dropout,
                 **geometry))  # fmt: skip
        if cfg.tma and dtype != torch.float32:
            b_block = [g.block_n, g.block_k] if forward else [g.block_k, g.block_n]
            descs = {
                "a_desc": f"tensordesc<{t}[{g.block_m}, {g.block_k}]>",
                "b_desc": f"tensordesc<{t}[{b_block[0]}, {b_block[1]}]>",
                "c_desc": f"tensordesc<{t}[{g.block_m}, {g.block_n // 2}]>",  # stored in two column halves
                "u_ptr": "*fp32", "v_ptr": f"*{ad}", "bias_ptr": f"*{t}", "seed_ptr": "*i64",
            }  # fmt: skip
            add(f"{role}-tma", lora._lora_gemm_tma_kernel, g, descs, ("p", "drop_scale"),
                dict(_UNIT_STRIDES["tma-forward" if forward else "tma-dx"], B_KMAJOR=forward, HAS_BIAS=forward,
                     DROPOUT=dropout, **geometry))  # fmt: skip
    e = cfg.expand
    add("expand", lora._lora_gemm_kernel, e, gemm_ptrs, ("p", "drop_scale"),
        dict(_UNIT_STRIDES["expand"], BASE_GEMM=False, HAS_BIAS=False, DROPOUT=dropout, BLOCK_M=e.block_m,
             BLOCK_N=e.block_n, BLOCK_K=e.block_k, BLOCK_R=lora._block_r(r, e.block_r), GROUP_M=e.group_m,
             ONE_R_BLOCK=r <= lora._block_r(r, e.block_r)))  # fmt: skip
    ga = cfg.grad_a
    for atomic in (False, True):
        add(f"grad-a{'-atomic' if atomic else ''}", lora._lora_grad_a_kernel, ga,
            {"x_ptr": f"*{t}", "du_ptr": "*fp32", "da_ptr": "*fp32" if atomic else f"*{ad}", "seed_ptr": "*i64"},
            ("p", "drop_scale"),
            dict(_UNIT_STRIDES["grad_a"], DROPOUT=dropout, ATOMIC=atomic, BLOCK_M=ga.block_m, BLOCK_K=ga.block_k,
                 BLOCK_R=block_r))  # fmt: skip
    if not dropout:  # du/dB has no dropout
        d = cfg.dudb
        for atomic in (False, True):
            add(f"dudb-{'atomic' if atomic else 'workspace'}", lora._lora_dudb_kernel, d,
                {"dy_ptr": f"*{t}", "b_ptr": f"*{ad}", "u_ptr": "*fp32", "du_ptr": "*fp32", "db_ptr": "*fp32"},
                ("scaling",),
                dict(_UNIT_STRIDES["dudb"], NEED_DU=True, NEED_DB=True, ATOMIC=atomic, BLOCK_M=d.block_m,
                     BLOCK_N=d.block_k, BLOCK_R=block_r))  # fmt: skip
    return specs


def lora_specs(families: tuple[str, ...] = ("sm80", "sm90"), exhaustive: bool = False) -> list[CompileSpec]:
    """Every LoRA kernel each family's configurations launch: fp32 (IEEE and TF32 products), fp16 and bf16, with and
    without dropout, atomic and workspace reductions, each for its family's architecture; for the benchmark bucket
    of the table (many rows, r = 16), or with ``exhaustive`` for all four (r = 64: r-blocks of 64, which also covers
    stacked adapters, whose total rank only changes R; few rows: smaller tiles). Duplicates (buckets that share
    tiles) are listed once. The CPU test lane compiles the benchmark bucket's specs (about 130, a minute and a half
    on 2 cores); the kernel report compiles all of them (about 340) and checks their registers."""
    specs: dict[str, CompileSpec] = {}
    for fam in families:
        for dtype in KERNEL_DTYPES:
            for prec in ("ieee", "tf32") if dtype == torch.float32 else ("tf32",):
                for M, r in _BUCKET_SHAPES if exhaustive else _BUCKET_SHAPES[:1]:
                    cfg = select_config(fam, M, r, dtype.itemsize)
                    for dropout in (False, True):
                        for spec in _config_specs(fam, dtype, prec, cfg, r, dropout):
                            specs.setdefault(spec.name, spec)  # a name fixes the spec: buckets share tiles
    keep = CompileSpec(
        "dropout-keep", lora._dropout_keep_kernel, {"seed_ptr": "*i64", "keep_ptr": "*u8", "M": "i32", "K": "i32",
        "p": "fp32"}, dict(BLOCK_M=32, BLOCK_K=64),
    )  # fmt: skip
    return [*specs.values(), keep]


def bench_lora_specs() -> list[CompileSpec]:
    """The LoRA kernels of the benchmark configuration (bf16, r = 16, many rows) of each family, with and without
    dropout: the rows the kernel report prints by default (names as in :func:`lora_specs`)."""
    specs = []
    for fam in FAMILY_CAPABILITY:
        cfg = select_config(fam, *_BUCKET_SHAPES[0], torch.bfloat16.itemsize)
        for dropout in (False, True):
            specs += _config_specs(fam, torch.bfloat16, "tf32", cfg, 16, dropout)
    return specs


# --- similarity.py ------------------------------------------------------------------------------------------------


def _similarity_spec(
    name: str,
    metric: int,
    bank: str,
    gather: bool,
    accumulate: bool = False,
    count_on_device: bool = False,
    aligned: bool = True,
) -> CompileSpec:
    signature = {
        "query_ptr": "*fp32" if accumulate else "*bf16",
        "sample_ptr": "*bf16",
        "count_ptr": "*fp32",
        "count": "fp32",
        "bank_ptr": f"*{bank}",
        "bank_stride": "i64",
        "index_ptr": "*i64",
        "offsets_ptr": "*i64",
        "block_layer_ptr": "*i64",
        "first_block_ptr": "*i64",
        "norms_ptr": "*fp32",
        "partial_ptr": "*fp32",
        "counter_ptr": "*i32",
        "out_ptr": "*fp32",
        "num_rows": "i32",
        "num_bank_rows": "i32",
        "num_layers": "i32",
        "num_programs": "i32",
        "chunk": "i32",
    }
    constexprs = {
        "METRIC": metric,
        "GATHER": gather,
        "ACCUMULATE": accumulate,
        "COUNT_ON_DEVICE": count_on_device,
        "ALIGNED": aligned,
        "ROWS": 1 if gather else similarity.FULL_ROWS,
        "BLOCK": similarity.FULL_BLOCK
        if not gather
        else similarity.ACCUMULATE_BLOCK
        if accumulate
        else similarity.GATHER_BLOCK,
        "REDUCE_BLOCK": similarity.REDUCE_BLOCK,
    }
    return CompileSpec(name, similarity._similarity_kernel, signature, constexprs, num_warps=similarity.NUM_WARPS)


def similarity_specs() -> list[CompileSpec]:
    """One specialisation per code path: every metric and pass in the full form, the gathered form aligned and not,
    and the fused accumulate with a host and a device count; bank dtypes spread over fp32, bf16 and fp16."""
    codes = METRIC_CODES
    norms = similarity.NORMS.value
    return [
        *(
            _similarity_spec(f"similarity_full_{m}_fp32", c, "fp32", False)
            for m, c in codes.items()
            if m != "l1_normalized"
        ),
        _similarity_spec("similarity_full_norms_bf16", norms, "bf16", False),
        _similarity_spec("similarity_full_l1_normalized_bf16", codes["l1_normalized"], "bf16", False),
        _similarity_spec("similarity_gathered_cosine_bf16", codes["cosine"], "bf16", True),
        _similarity_spec(
            "similarity_gathered_l1_normalized_fp16_unaligned", codes["l1_normalized"], "fp16", True, aligned=False
        ),
        _similarity_spec("similarity_accumulate_l1_fp32", codes["l1"], "fp32", True, accumulate=True),
        _similarity_spec(
            "similarity_accumulate_norms_device_count", norms, "bf16", True, accumulate=True, count_on_device=True
        ),
    ]


# --- masked_update.py ---------------------------------------------------------------------------------------------


_TABLES = {"block_tensor_ptr": "*i64", "first_block_ptr": "*i64", "numel_ptr": "*i64"}
_LISTS = {"state_ptr": "*i32", "keys_ptr": "*i32", "index_ptr": "*i32", "list_base_ptr": "*i64", "capacity_ptr": "*i64"}
_ADAMW_SCALARS = (
    "lr",
    "beta1",
    "beta2",
    "one_minus_beta1",
    "one_minus_beta2",
    "eps",
    "decay",
    "bias_correction1",
    "bias_correction2",
    "log_beta1",
    "log_beta2",
)


def _adamw_spec(
    name: str, param: str, select: int, dense_loads: bool, step_on_device: bool = False, aligned: bool = True
) -> CompileSpec:
    signature = {
        "table_ptr": "*i64",
        "param_anchor_ptr": f"*{param}",
        "grad_anchor_ptr": f"*{param}",
        "exp_avg_anchor_ptr": "*fp32",
        "exp_avg_sq_anchor_ptr": "*fp32",
        **_TABLES,
        **_LISTS,
        "step_ptr": "*fp32",
        **{a: "fp32" for a in _ADAMW_SCALARS},
    }
    constexprs = {
        "SELECT": select,
        "DENSE_LOADS": dense_loads,
        "STEP_ON_DEVICE": step_on_device,
        "ALIGNED": aligned,
        "BLOCK": masked_update.BLOCK,
        "FIRST_SHIFT": masked_update.FIRST_DIGIT[0],
    }
    return CompileSpec(
        name, masked_update._masked_adamw_kernel, signature, constexprs, num_warps=masked_update.NUM_WARPS
    )


def _sgd_spec(name: str, select: int, dense_loads: bool, has_momentum: bool) -> CompileSpec:
    signature = {
        "table_ptr": "*i64",
        "param_anchor_ptr": "*fp32",
        "grad_anchor_ptr": "*fp32",
        "buffer_anchor_ptr": "*fp32",
        **_TABLES,
        **_LISTS,
        "lr": "fp32",
        "momentum": "fp32",
        "weight_decay": "fp32",
    }
    constexprs = {
        "SELECT": select,
        "DENSE_LOADS": dense_loads,
        "HAS_MOMENTUM": has_momentum,
        "ALIGNED": True,
        "BLOCK": masked_update.BLOCK,
        "FIRST_SHIFT": masked_update.FIRST_DIGIT[0],
    }
    return CompileSpec(name, masked_update._masked_sgd_kernel, signature, constexprs, num_warps=masked_update.NUM_WARPS)


def _radix_spec(name: str, grad: str, aligned: bool = True) -> CompileSpec:
    signature = {
        "table_ptr": "*i64",
        "grad_anchor_ptr": f"*{grad}",
        **{k: "*i64" for k in ("block_tensor_ptr", "first_block_ptr", "numel_ptr", "k_ptr")},
        "hist_ptr": "*i32",
        "counter_ptr": "*i32",
        "state_ptr": "*i32",
    }
    shift, bits = masked_update.FIRST_DIGIT
    constexprs = {
        "TABLE_WIDTH": masked_update.TABLE_WIDTH.value,
        "GRAD_COLUMN": 1,
        "SHIFT": shift,
        "BITS": bits,
        "ALIGNED": aligned,
        "BLOCK": masked_update.BLOCK,
        "MAX_BINS": masked_update.MAX_BINS,
    }
    return CompileSpec(name, masked_update._radix_pass_kernel, signature, constexprs, num_warps=masked_update.NUM_WARPS)


def _candidate_pass_spec(name: str, grad: str, shift: int, bits: int) -> CompileSpec:
    signature = {
        "table_ptr": "*i64",
        "grad_anchor_ptr": f"*{grad}",
        **_TABLES,
        "state_ptr": "*i32",
        "keys_ptr": "*i32",
        "list_base_ptr": "*i64",
        "capacity_ptr": "*i64",
        "hist_ptr": "*i32",
        "counter_ptr": "*i32",
    }
    constexprs = {
        "TABLE_WIDTH": masked_update.TABLE_WIDTH.value,
        "GRAD_COLUMN": 1,
        "SHIFT": shift,
        "BITS": bits,
        "BLOCK": masked_update.BLOCK,
        "MAX_BINS": masked_update.MAX_BINS,
    }
    return CompileSpec(
        name, masked_update._candidate_pass_kernel, signature, constexprs, num_warps=masked_update.NUM_WARPS
    )


def _candidate_update_spec(name: str, param: str, rule: int, has_momentum: bool, step_on_device: bool) -> CompileSpec:
    signature = {
        "table_ptr": "*i64",
        "param_anchor_ptr": f"*{param}",
        "grad_anchor_ptr": f"*{param}",
        "state0_anchor_ptr": "*fp32",
        "state1_anchor_ptr": "*fp32",
        **_TABLES,
        **_LISTS,
        "step_ptr": "*fp32",
        **{a: "fp32" for a in (*_ADAMW_SCALARS, "momentum", "weight_decay")},
    }
    constexprs = {
        "RULE": rule,
        "HAS_MOMENTUM": has_momentum,
        "STEP_ON_DEVICE": step_on_device,
        "BLOCK": masked_update.BLOCK,
        "FIRST_SHIFT": masked_update.FIRST_DIGIT[0],
    }
    return CompileSpec(
        name,
        masked_update._candidate_update_kernel,
        signature,
        constexprs,
        num_warps=masked_update.CANDIDATE_UPDATE_WARPS,
    )


def masked_update_specs() -> list[CompileSpec]:
    """The update kernels for every selection mode (sparse and dense loads, host and device step, aligned and not),
    each step of the density select, and the index-list scatter."""
    selects = (masked_update.SELECT_ALL, masked_update.SELECT_MASK, masked_update.SELECT_DIGIT)
    all_, mask, digit = (s.value for s in selects)
    adamw, sgd = masked_update.RULE_ADAMW.value, masked_update.RULE_SGD.value
    passes = masked_update.CANDIDATE_PASSES
    return [
        _adamw_spec("masked_adamw_all_fp32", "fp32", all_, True),
        _adamw_spec("masked_adamw_all_fp32_unaligned", "fp32", all_, True, aligned=False),
        _adamw_spec("masked_adamw_mask_bf16", "bf16", mask, False),
        _adamw_spec("masked_adamw_sparse_digit_device_step", "fp32", digit, False, step_on_device=True),
        _adamw_spec("masked_adamw_dense_digit_fp16", "fp16", digit, True),
        _sgd_spec("masked_sgd_momentum_mask", mask, False, True),
        _sgd_spec("masked_sgd_digit", digit, True, False),
        _radix_spec("radix_first_digit_fp32", "fp32"),
        _radix_spec("radix_first_digit_fp16_unaligned", "fp16", aligned=False),
        _candidate_pass_spec("candidate_pass_1_fp32", "fp32", *passes[0]),
        _candidate_pass_spec("candidate_pass_2_bf16", "bf16", *passes[1]),
        _candidate_pass_spec("candidate_pass_3_fp16", "fp16", *passes[2]),
        _candidate_update_spec("candidate_update_adamw_device_step", "fp32", adamw, False, True),
        _candidate_update_spec("candidate_update_sgd_momentum_bf16", "bf16", sgd, True, False),
        CompileSpec(
            "digit_compaction",
            masked_update._digit_compaction_kernel,
            {"table_ptr": "*i64", "grad_anchor_ptr": "*fp32", **_TABLES, **_LISTS},
            {"ALIGNED": True, "BLOCK": masked_update.BLOCK, "FIRST_SHIFT": masked_update.FIRST_DIGIT[0]},
            num_warps=masked_update.NUM_WARPS,
        ),
        CompileSpec(
            "index_mask",
            masked_update._index_mask_kernel,
            {
                "index_table_ptr": "*i64",
                "index_anchor_ptr": "*i64",
                "block_list_ptr": "*i64",
                "first_block_ptr": "*i64",
                "length_ptr": "*i64",
                "bound_ptr": "*i64",
                "dest_ptr": "*i64",
                "scratch_ptr": "*u8",
            },
            {"BLOCK": masked_update.BLOCK},
            num_warps=masked_update.NUM_WARPS,
        ),
    ]
