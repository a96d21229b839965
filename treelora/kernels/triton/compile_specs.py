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


def all_specs() -> list[CompileSpec]:
    """Every spec of every Triton kernel module."""
    return [*lora_specs(), *similarity_specs(), *masked_update_specs()]


# --- lora.py ------------------------------------------------------------------------------------------------------

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _signature(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, Any]) -> dict[str, str]:
    """Argument types in the kernel's order: the given pointers, fp32 scalars, i32 for sizes and strides."""
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in pointers:
            out[name] = pointers[name]
        else:
            out[name] = "fp32" if name in floats else "i32"
    return out


def _lora_spec(name, kernel, pointers, floats, constexprs, num_warps=4, num_stages=3) -> CompileSpec:
    return CompileSpec(
        name, kernel, _signature(kernel, pointers, floats, constexprs), constexprs, num_warps, num_stages
    )


# Strides that are 1 for contiguous inputs: triton specialises an integer argument equal to 1 into a constant at
# launch, which is what makes those loads contiguous (vectorised, and pipelined with cp.async), so the specs do too.
_UNIT_STRIDES = {
    "shrink": dict(stride_xk=1, stride_ak=1, stride_ur=1),
    "forward": dict(stride_ak=1, stride_bk=1, stride_ur=1, stride_vr=1, stride_cn=1),  # x, Wᵀ, u, Bᵀ, y
    "dx": dict(stride_ak=1, stride_bn=1, stride_ur=1, stride_vn=1, stride_cn=1),  # dy, W, du, A, dx
    "expand": dict(stride_ur=1, stride_vr=1, stride_cn=1),
    "dudb": dict(stride_dyn=1, stride_br=1, stride_ur=1, stride_dur=1, stride_dbr=1),
    "grad_a": dict(stride_xk=1, stride_dur=1, stride_dak=1),
}
# Tiles of which table family each dtype's specs use: both families' GEMM tiles get compiled for both architectures.
_SPEC_FAMILY = {torch.float32: "sm90", torch.float16: "sm80", torch.bfloat16: "sm90"}


def lora_specs() -> list[CompileSpec]:
    """Every kernel at fp32/fp16/bf16, with and without dropout (du/dB: both reduction modes), on the table's tiles
    for 8192 rows and r = 16; spec names end in the family whose tiles they use."""
    specs = []
    for dtype in KERNEL_DTYPES:
        fam = _SPEC_FAMILY[dtype]
        cfg = select_config(fam, 8192, 16, dtype.itemsize)
        t = _TYPES[dtype]
        prec = "ieee" if dtype == torch.float32 else "tf32"
        # bf16 activations with fp32 adapters (the common mixed case); the other dtypes with same-dtype adapters.
        ad = "fp32" if dtype == torch.bfloat16 else t
        for dropout in (False, True):
            tag = f"{t}-{'dropout' if dropout else 'nodrop'}-{fam}"
            sh = cfg.shrink
            specs.append(_lora_spec(
                f"shrink-{tag}", lora._lora_shrink_kernel,
                {"x_ptr": f"*{t}", "a_ptr": f"*{ad}", "u_ptr": "*fp32", "seed_ptr": "*i64"}, ("p", "scale"),
                dict(_UNIT_STRIDES["shrink"], DROPOUT=dropout, ATOMIC=dropout, BLOCK_M=sh.block_m,
                     BLOCK_K=sh.block_k, BLOCK_R=16, DOT_PRECISION=prec, UPCAST=False),
                sh.num_warps, sh.num_stages,
            ))  # fmt: skip
            gemm_ptrs = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "u_ptr": "*fp32", "v_ptr": f"*{ad}", "bias_ptr": f"*{t}",
                         "c_ptr": f"*{t}", "seed_ptr": "*i64"}  # fmt: skip
            # The forward GEMM (bias, no dropout epilogue) and the dx GEMM (dropout epilogue, its own tiles), with
            # r-blocks of 64 (r = 64, the widest block).
            g = cfg.gemm_dropout if dropout else cfg.gemm
            specs.append(_lora_spec(
                f"gemm-fused-{tag}", lora._lora_gemm_kernel, gemm_ptrs, ("p", "drop_scale"),
                dict(_UNIT_STRIDES["dx" if dropout else "forward"], BASE_GEMM=True, HAS_BIAS=not dropout,
                     DROPOUT=dropout, BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, BLOCK_R=64,
                     GROUP_M=g.group_m, DOT_PRECISION=prec, UPCAST=False),
                g.num_warps, g.num_stages,
            ))  # fmt: skip
            e = cfg.expand
            specs.append(_lora_spec(
                f"gemm-expand-{tag}", lora._lora_gemm_kernel, gemm_ptrs, ("p", "drop_scale"),
                dict(_UNIT_STRIDES["expand"], BASE_GEMM=False, HAS_BIAS=False, DROPOUT=dropout, BLOCK_M=e.block_m,
                     BLOCK_N=e.block_n, BLOCK_K=e.block_k, BLOCK_R=16, GROUP_M=e.group_m, DOT_PRECISION=prec,
                     UPCAST=False),
                e.num_warps, e.num_stages,
            ))  # fmt: skip
            ga = cfg.grad_a
            specs.append(_lora_spec(
                f"grad-a-{tag}", lora._lora_grad_a_kernel,
                {"x_ptr": f"*{t}", "du_ptr": "*fp32", "da_ptr": "*fp32", "seed_ptr": "*i64"}, ("p", "drop_scale"),
                dict(_UNIT_STRIDES["grad_a"], DROPOUT=dropout, ATOMIC=not dropout, BLOCK_M=ga.block_m,
                     BLOCK_K=ga.block_k, BLOCK_R=16, DOT_PRECISION=prec, UPCAST=False),
                ga.num_warps, ga.num_stages,
            ))  # fmt: skip
        for atomic in (False, True):
            d = cfg.dudb
            specs.append(_lora_spec(
                f"dudb-{t}-{'atomic' if atomic else 'workspace'}-{fam}", lora._lora_dudb_kernel,
                {"dy_ptr": f"*{t}", "b_ptr": f"*{ad}", "u_ptr": "*fp32", "du_ptr": "*fp32", "db_ptr": "*fp32"},
                ("scaling",),
                dict(_UNIT_STRIDES["dudb"], NEED_DU=True, NEED_DB=True, ATOMIC=atomic, BLOCK_M=d.block_m,
                     BLOCK_N=d.block_k, BLOCK_R=16, DOT_PRECISION=prec, UPCAST=False),
                d.num_warps, d.num_stages,
            ))  # fmt: skip
    specs.append(_lora_spec(
        "dropout-keep", lora._dropout_keep_kernel, {"seed_ptr": "*i64", "keep_ptr": "*u8"}, ("p",),
        dict(BLOCK_M=32, BLOCK_K=64),
    ))  # fmt: skip
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
        "BLOCK": similarity.BLOCK,
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
        "state_ptr": "*i32",
        "step_ptr": "*fp32",
        **{
            a: "fp32"
            for a in (
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
        },
    }
    constexprs = {
        "SELECT": select,
        "DENSE_LOADS": dense_loads,
        "STEP_ON_DEVICE": step_on_device,
        "ALIGNED": aligned,
        "BLOCK": masked_update.BLOCK,
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
        "state_ptr": "*i32",
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
    }
    return CompileSpec(name, masked_update._masked_sgd_kernel, signature, constexprs, num_warps=masked_update.NUM_WARPS)


def _radix_spec(name: str, grad: str, shift: int, bits: int, first: bool, aligned: bool = True) -> CompileSpec:
    signature = {
        "table_ptr": "*i64",
        "grad_anchor_ptr": f"*{grad}",
        **{k: "*i64" for k in ("block_tensor_ptr", "first_block_ptr", "numel_ptr", "k_ptr")},
        "hist_ptr": "*i32",
        "counter_ptr": "*i32",
        "state_ptr": "*i32",
    }
    constexprs = {
        "TABLE_WIDTH": 5,
        "GRAD_COLUMN": 1,
        "SHIFT": shift,
        "BITS": bits,
        "FIRST": first,
        "ALIGNED": aligned,
        "BLOCK": masked_update.BLOCK,
        "MAX_BINS": masked_update.MAX_BINS,
    }
    return CompileSpec(name, masked_update._radix_pass_kernel, signature, constexprs, num_warps=masked_update.NUM_WARPS)


def masked_update_specs() -> list[CompileSpec]:
    """The update kernels for every selection mode (sparse and dense loads, host and device step, aligned and not),
    each radix pass, and the index-list scatter."""
    selects = (masked_update.SELECT_ALL, masked_update.SELECT_MASK, masked_update.SELECT_THRESHOLD)
    all_, mask, threshold = (s.value for s in selects)
    return [
        _adamw_spec("masked_adamw_all_fp32", "fp32", all_, True),
        _adamw_spec("masked_adamw_all_fp32_unaligned", "fp32", all_, True, aligned=False),
        _adamw_spec("masked_adamw_mask_bf16", "bf16", mask, False),
        _adamw_spec("masked_adamw_sparse_threshold_device_step", "fp32", threshold, False, step_on_device=True),
        _adamw_spec("masked_adamw_dense_threshold_fp16", "fp16", threshold, True),
        _sgd_spec("masked_sgd_momentum_mask", mask, False, True),
        _sgd_spec("masked_sgd_threshold", threshold, True, False),
        _radix_spec("radix_pass_first_fp32", "fp32", *masked_update.RADIX_PASSES[0], True),
        _radix_spec("radix_pass_middle_bf16", "bf16", *masked_update.RADIX_PASSES[1], False),
        _radix_spec("radix_pass_last_fp16_unaligned", "fp16", *masked_update.RADIX_PASSES[2], False, aligned=False),
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
