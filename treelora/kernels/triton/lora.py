"""Triton kernels of the fused LoRA linear (SPEC 3.1): ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``.

Design ("graph split"; the byte, launch and time model that chose it is ``treelora/kernels/lora_model.py``):

* forward: the shrink kernel computes u = s·drop(x)Aᵀ / (1 - p) (M, r) in fp32, split over K only when the rows alone
  leave most SMs idle; then the base GEMM x Wᵀ runs with u Bᵀ folded in as an extra K-slice after its main loop and
  the bias in its epilogue: one write of y, no pass over y afterwards.
* backward: one pass over dy gives du = s·dy B (M, r) and dB = dyᵀ u (N, r_t); dx = dy W + drop'(du A) is the same
  GEMM with du A as the extra K-slice (under dropout, du A is kept in a second accumulator and masked in the
  epilogue); dA = du_tᵀ drop(x) / (1 - p) runs on a side stream while the dx GEMM runs, so it fills the SMs that the
  GEMM's last wave of tiles leaves idle instead of adding its pass after the GEMM. dA and dB accumulate atomically in
  one zeroed fp32 buffer (one fill, one cast for both), or, under ``torch.are_deterministic_algorithms_enabled()``, in
  per-block workspaces summed in a fixed order.
* the GEMM: on sm_90 a persistent kernel (one program per SM, tiles in an L2-grouped order) that loads x / dy and W
  through TMA tensor descriptors (``TensorDescriptor``, host-side, in triton 3.6 and 3.7); elsewhere, and for inputs
  TMA cannot address (row strides not a multiple of 16 bytes, W in another dtype than x, fp32), a pointer-based
  kernel with one program per tile. ``LoRAConfig.forward_base = "cublas"`` instead runs torch's GEMM, overlaps the
  shrink / du-dB kernel with it on the side stream and adds the LoRA term into its output in place (the alternative
  the model rejected, kept for measurement).
* dropout: Philox keyed by a seed drawn on the device with torch's generator (no host synchronisation). One
  ``tl.randint4x`` call, four 32-bit words, serves four consecutive elements of a row of x: counter row·⌈K/4⌉ + col//4.
  The mask is regenerated in every kernel that needs it and is never stored.
* dtypes: operands are rounded to the activation dtype (x's) right after loading, whatever the dtype of W, A, B, and
  every product accumulates in fp32. u and du are kept in fp32 (M·r·4 bytes, small) so split-K can accumulate them.
  fp32 activations take the cuBLAS base GEMM (see ``lora_configs.py``). Under ``TRITON_INTERPRET=1`` the kernels
  continue in fp32 after that rounding (``UPCAST``): the interpreter computes fp16/bf16 arithmetic on raw bits.
* frozen adapters: the first ``frozen_rank`` rows of A / columns of B take part in y, du and dx; dA and dB are
  produced for the trainable slice only.

Inputs arrive validated, non-empty and with a non-zero Python scale: the ops layer routes empty inputs and a scale of
exactly 0 to the torch backend and folds a tensor scale into lora_B (treelora/ops/lora_linear.py).

Order of this file: constants → ``@triton.jit`` kernels → launchers → the backend's entry points (``lora_linear_fwd``,
``lora_linear_bwd``, ``lora_linear_dropout_mask``) and ``lora_linear_not_supported_reasons``. Ahead-of-time compile
specs of these kernels live in ``compile_specs.py``, off this module's import path.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from treelora.kernels import env
from treelora.kernels.triton.lora_configs import GemmTiles, LoRAConfig, family, select_config

# Smallest r-block: tl.dot needs every dimension >= 16, so r is padded (with masked zeros) to 16 inside a block.
MIN_BLOCK_R = 16
# A split-K / split-M part keeps at least this many loop steps so the pipelined loads (num_stages) have work to overlap.
MIN_STEPS_PER_SPLIT = 4
# A reduction is split only while its programs fill less than this share of the SMs: a split costs a zero-filled
# output (one more launch) and atomics, which 128 programs on 132 SMs (the shrink at M = 8192) do not repay.
SPLIT_BELOW_FILL = 0.75
# Grids, tile offsets and element counters other than the row offsets are 32-bit.
MAX_DIM = 2**31 - 1
# TMA addresses global memory in 16-byte units: base address and every stride but the last must be multiples of it.
TMA_ALIGN_BYTES = 16


# --- kernels ------------------------------------------------------------------------------------------------------


@triton.jit
def _operand(t, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Round a loaded tile to the compute dtype; under the interpreter continue in fp32 (it has no 16-bit math)."""
    t = t.to(DTYPE)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _keep_mask(seed, rows, col0, row_len, p, BLOCK_K: tl.constexpr):
    """Dropout keep-mask (len(rows), BLOCK_K) of columns col0 .. col0 + BLOCK_K - 1 of an (M, row_len) input.

    One Philox call gives four 32-bit words: those of counter row·⌈row_len/4⌉ + g go to columns 4g .. 4g + 3 in
    order, so a mask costs a quarter of the Philox rounds of one draw per element. col0 is a multiple of 4 (tiles
    start at multiples of their width, >= 16). An element is kept when its word, as a uniform float in [0, 1), is
    >= p.
    """
    groups = col0 // 4 + tl.arange(0, BLOCK_K // 4)
    counter = rows[:, None] * ((row_len + 3) // 4) + groups[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    return tl.uint_to_uniform_float(words) >= p


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, u_ptr, seed_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_us, stride_um, stride_ur,
    p, scale,
    DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """u[s] (M, R) fp32 = scale · drop(x)[:, K-part s] A[:, K-part s]ᵀ for the split s = program_id(2).

    Grid (row blocks, r-blocks, splits). ATOMIC adds into a zeroed u; otherwise split s stores at u + s·stride_us.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    # Rows past M are wrapped onto valid rows for the loads (their sums are never stored): no row mask in the loop.
    rows = (offs_m % M).to(tl.int64)
    cdt = x_ptr.dtype.element_ty
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=k_ok[None, :], other=0.0)
        x = _operand(x, cdt, UPCAST)
        if DROPOUT:
            x = tl.where(_keep_mask(seed, rows, k0, K, p, BLOCK_K), x, 0.0)
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(x, _operand(a, cdt, UPCAST), acc, input_precision=DOT_PRECISION)
    acc = acc * scale
    out_rows = offs_m.to(tl.int64)
    u_ptrs = u_ptr + pid_s.to(tl.int64) * stride_us + out_rows[:, None] * stride_um + offs_r[None, :] * stride_ur
    out_mask = (offs_m < M)[:, None] & r_ok[None, :]
    if ATOMIC:
        tl.atomic_add(u_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(u_ptrs, acc, mask=out_mask)


@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear tile index ``tile``, GROUP_M row-tiles at a time so that consecutive tiles
    share column tiles of the B operand in L2."""
    group_width = GROUP_M * num_pid_n
    first_m = (tile // group_width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group_width) % group_rows
    pid_n = (tile % group_width) // group_rows
    return pid_m, pid_n


@triton.jit
def _lora_tiles(
    u_ptr, v_ptr, rows, cols, r0, R, stride_um, stride_ur, stride_vr, stride_vn,
    BLOCK_R: tl.constexpr, CDT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The rank block r0 .. r0 + BLOCK_R of the LoRA slice: U[rows] (BLOCK_M, BLOCK_R) and V[:, cols] (BLOCK_R,
    BLOCK_N), zero past R, rounded to the compute dtype."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    u = tl.load(u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur, mask=r_ok[None, :], other=0.0)
    v = tl.load(v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn, mask=r_ok[:, None], other=0.0)
    return _operand(u, CDT, UPCAST), _operand(v, CDT, UPCAST)


@triton.jit
def _lora_epilogue(
    acc, u, v, bias, u_ptr, v_ptr, seed,
    rows, cols, off_n, N, R,
    stride_um, stride_ur, stride_vr, stride_vn,
    p, drop_scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ONE_R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    CDT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """acc + (U[rows] V[:, cols])[⊙ keep / (1 - p)] (+ bias), fp32 (BLOCK_M, BLOCK_N).

    U (M, R) fp32 and V (R, N) are the LoRA factors, R the extra K-slice; ``u``, ``v`` its first rank block (from
    :func:`_lora_tiles`, loaded before the main loop so that their latency hides behind it) and ``bias`` the tile's
    bias (loaded likewise; unused without HAS_BIAS). Unless ONE_R_BLOCK (R <= BLOCK_R), the further rank blocks are
    loaded here. ``rows`` / ``cols`` are the tile's (wrapped, always valid) indices, off_n its first column. Without
    dropout the slice accumulates straight into acc; with it, into a second accumulator that the keep-mask of the
    (M, N) input gates.
    """
    if DROPOUT:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        lora = acc
    lora = tl.dot(u, v, lora, input_precision=DOT_PRECISION)
    if not ONE_R_BLOCK:
        # Not software-pipelined: r <= 256 takes a few steps, and staging fp32 u tiles costs shared memory.
        for r0 in tl.range(BLOCK_R, R, BLOCK_R, num_stages=1):
            u_r, v_r = _lora_tiles(
                u_ptr, v_ptr, rows, cols, r0, R, stride_um, stride_ur, stride_vr, stride_vn, BLOCK_R, CDT, UPCAST
            )
            lora = tl.dot(u_r, v_r, lora, input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _keep_mask(seed, rows, off_n, N, p, BLOCK_N)
        acc += tl.where(keep, lora * drop_scale, 0.0)
    else:
        acc = lora
    if HAS_BIAS:
        acc += _operand(bias, CDT, UPCAST).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lora_gemm_kernel(
    a_ptr, b_ptr, u_ptr, v_ptr, bias_ptr, c_ptr, seed_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_um, stride_ur, stride_vr, stride_vn,
    stride_cm, stride_cn,
    p, drop_scale,
    BASE_GEMM: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ONE_R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """C (M, N) = base + (U V)[⊙ keep / (1 - p)] (+ bias), with U (M, R) fp32 and V (R, N); pointer loads.

    base = A (M, K) @ B (K, N) when BASE_GEMM (the fused GEMM: U V is its extra K-slice), else the current C (the
    in-place expand after a cuBLAS GEMM). Forward: A = x, B = Wᵀ, U = u, V = Bᵀ. dx: A = dy, B = W, U = du, V = A_lora
    and DROPOUT masks U V with the keep-mask of x (N = K of x). ONE_R_BLOCK: R <= BLOCK_R. Grid: (tiles,), in
    ``_grouped_tile`` order.
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped rows/columns for the loads (results past the edge are never stored): only K and R need masks.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    cdt = c_ptr.dtype.element_ty
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    u, v = _lora_tiles(u_ptr, v_ptr, rows, cols, 0, R, stride_um, stride_ur, stride_vr, stride_vn, BLOCK_R, cdt,
                       UPCAST)  # fmt: skip
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BASE_GEMM:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(_operand(a, cdt, UPCAST), _operand(b, cdt, UPCAST), acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    acc = _lora_epilogue(
        acc, u, v, bias, u_ptr, v_ptr, seed, rows, cols, pid_n * BLOCK_N, N, R,
        stride_um, stride_ur, stride_vr, stride_vn, p, drop_scale,
        HAS_BIAS, DROPOUT, ONE_R_BLOCK, BLOCK_M, BLOCK_N, BLOCK_R, cdt, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    if not BASE_GEMM:
        # Read after the LoRA term so that only one (BLOCK_M, BLOCK_N) fp32 tile besides it is live.
        acc += tl.load(c_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(cdt), mask=out_mask)


@triton.jit
def _lora_gemm_tma_kernel(
    a_desc, b_desc, c_desc, u_ptr, v_ptr, bias_ptr, seed_ptr,
    M, N, K, R, num_programs,
    stride_um, stride_ur, stride_vr, stride_vn,
    p, drop_scale,
    B_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ONE_R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """C (M, N) = A (M, K) @ B + (U V)[⊙ keep / (1 - p)] (+ bias): persistent, operands through TMA descriptors.

    ``b_desc`` holds B as (N, K) (B_KMAJOR: the forward's W, so C = A Wᵀ) or as (K, N) (the dx GEMM's W). Program i
    of ``num_programs`` (one per SM) takes tiles i, i + num_programs, ... in ``_grouped_tile`` order. TMA fills
    rows, columns and K past the edges with zeros and clips the store; the LoRA slice and the bias use pointer loads
    (r columns are too narrow for a descriptor when r is odd), issued before the main loop.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    cdt: tl.constexpr = c_desc.dtype
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = ((off_m + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
        cols = ((off_n + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        u, v = _lora_tiles(u_ptr, v_ptr, rows, cols, 0, R, stride_um, stride_ur, stride_vr, stride_vn, BLOCK_R, cdt,
                           UPCAST)  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = _operand(a_desc.load([off_m, off_k]), cdt, UPCAST)
            if B_KMAJOR:
                b = _operand(b_desc.load([off_n, off_k]), cdt, UPCAST).T
            else:
                b = _operand(b_desc.load([off_k, off_n]), cdt, UPCAST)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols)
        acc = _lora_epilogue(
            acc, u, v, bias, u_ptr, v_ptr, seed, rows, cols, off_n, N, R,
            stride_um, stride_ur, stride_vr, stride_vn, p, drop_scale,
            HAS_BIAS, DROPOUT, ONE_R_BLOCK, BLOCK_M, BLOCK_N, BLOCK_R, cdt, DOT_PRECISION, UPCAST,
        )  # fmt: skip
        # Stored in two column halves: staging a whole 128x256 bf16 tile for the TMA store takes 64 KB of shared
        # memory, which with the 144 KB of pipelined operands is over the 227 KB an sm_90 block may use.
        halves = tl.permute(tl.reshape(acc.to(cdt), (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        c_desc.store([off_m, off_n], left)
        c_desc.store([off_m, off_n + BLOCK_N // 2], right)


@triton.jit
def _lora_dudb_kernel(
    dy_ptr, b_ptr, u_ptr, du_ptr, db_ptr,
    M, N, R, F,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_um, stride_ur, stride_dum, stride_dur,
    stride_dbs, stride_dbn, stride_dbr,
    scaling,
    NEED_DU: tl.constexpr, NEED_DB: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One pass over dy (M, N): du = scaling · dy B (M, R) fp32 and dB = dyᵀ u[:, F:] (N, R - F).

    Grid (row blocks, r-blocks). dB partial sums of row block m go to db + m·stride_dbs (a workspace, summed later),
    or are added atomically into a zeroed fp32 dB (stride_dbs = 0) when ATOMIC.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    # Not wrapped: dB sums over rows, so rows past M must load as zeros.
    m_ok = offs_m < M
    rows = offs_m.to(tl.int64)
    r_ok = offs_r < R
    trainable = r_ok & (offs_r >= F)
    cdt = dy_ptr.dtype.element_ty
    if NEED_DB:
        u = tl.load(
            u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
            mask=m_ok[:, None] & trainable[None, :],
            other=0.0,
        )
        u = _operand(u, cdt, UPCAST)
    du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        dy = _operand(dy, cdt, UPCAST)
        if NEED_DU:
            b = tl.load(
                b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            du = tl.dot(dy, _operand(b, cdt, UPCAST), du, input_precision=DOT_PRECISION)
        if NEED_DB:
            part = tl.dot(tl.trans(dy), u, input_precision=DOT_PRECISION)
            db_ptrs = (
                db_ptr
                + pid_m.to(tl.int64) * stride_dbs
                + offs_n[:, None] * stride_dbn
                + (offs_r - F)[None, :] * stride_dbr
            )
            db_mask = n_ok[:, None] & trainable[None, :]
            if ATOMIC:
                tl.atomic_add(db_ptrs, part, mask=db_mask, sem="relaxed")
            else:
                tl.store(db_ptrs, part.to(db_ptr.dtype.element_ty), mask=db_mask)
    if NEED_DU:
        tl.store(
            du_ptr + rows[:, None] * stride_dum + offs_r[None, :] * stride_dur,
            du * scaling,
            mask=m_ok[:, None] & r_ok[None, :],
        )


@triton.jit
def _lora_grad_a_kernel(
    x_ptr, du_ptr, da_ptr, seed_ptr,
    M, K, F, RT, m_per_split,
    stride_xm, stride_xk, stride_dum, stride_dur, stride_das, stride_dar, stride_dak,
    p, drop_scale,
    DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dA (RT, K) = drop_scale · du[:, F:F+RT]ᵀ drop(x) over the rows of split s = program_id(2).

    Grid (column blocks of K, r-blocks of RT, splits over M). ATOMIC adds into a zeroed fp32 dA; otherwise split s
    stores at da + s·stride_das.
    """
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    r_ok = offs_r < RT
    cdt = x_ptr.dtype.element_ty
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_hi
        rows = offs_m.to(tl.int64)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        x = _operand(x, cdt, UPCAST)
        if DROPOUT:
            x = tl.where(_keep_mask(seed, rows, pid_k * BLOCK_K, K, p, BLOCK_K), x, 0.0)
        du_t = tl.load(
            du_ptr + rows[None, :] * stride_dum + (F + offs_r)[:, None] * stride_dur,
            mask=r_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(_operand(du_t, cdt, UPCAST), x, acc, input_precision=DOT_PRECISION)
    acc = acc * drop_scale
    da_ptrs = da_ptr + pid_s.to(tl.int64) * stride_das + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
    da_mask = r_ok[:, None] & k_ok[None, :]
    if ATOMIC:
        tl.atomic_add(da_ptrs, acc, mask=da_mask, sem="relaxed")
    else:
        tl.store(da_ptrs, acc.to(da_ptr.dtype.element_ty), mask=da_mask)


@triton.jit
def _dropout_keep_kernel(seed_ptr, keep_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """keep (M, K) uint8 = the dropout keep-mask the other kernels draw (``_keep_mask``). Grid (tiles,)."""
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    offs_m = (pid // num_pid_k) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = (pid % num_pid_k) * BLOCK_K
    offs_k = col0 + tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    keep = _keep_mask(tl.load(seed_ptr), rows, col0, K, p, BLOCK_K)
    idx = rows[:, None] * K + offs_k[None, :]
    tl.store(keep_ptr + idx, keep.to(tl.uint8), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


# --- launchers ----------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_r(r: int, max_block_r: int) -> int:
    """Power-of-two r-block >= 16 (tl.dot's minimum): the rank is padded inside the block with masked zeros."""
    return max(MIN_BLOCK_R, min(triton.next_power_of_2(r), max_block_r))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's matmul setting (tf32 only when torch allows it); 16-bit ones ignore it."""
    if dtype == torch.float32 and (env.TRITON_INTERPRET or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


@functools.cache
def _cuda_properties(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _family_and_sms(device: torch.device) -> tuple[str, int]:
    """The config family and the number of SMs (1 under the interpreter: no split pays there)."""
    if env.TRITON_INTERPRET or device.type != "cuda":
        return family(None), 1
    capability, sms = _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())
    return family(capability), sms


def config_for(device: torch.device, M: int, r: int, dtype: torch.dtype) -> LoRAConfig:
    """The table's configuration for a call with M rows, total rank r and activations of ``dtype`` on ``device``."""
    return select_config(_family_and_sms(device)[0], M, r, dtype.itemsize)


def _splits(programs: int, length: int, block: int, sms: int, forced: int | None) -> int:
    """Parts of a reduction of ``length`` (in blocks of ``block``) so that ``programs`` x parts fills ``sms`` SMs."""
    steps = _cdiv(length, block)
    if forced is not None:
        return max(1, min(forced, steps))
    if programs >= SPLIT_BELOW_FILL * sms:
        return 1
    return max(1, min(_cdiv(sms, programs), steps // MIN_STEPS_PER_SPLIT))


def _seed_ptr(seed: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Kernels without dropout never read the seed; any tensor on the device stands in for the pointer."""
    return seed if seed is not None else like


def _tma_addressable(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these 2-D tensors: unit last stride, 16-byte aligned base and row stride."""
    for t in tensors:
        size = t.element_size()
        if t.stride(1) != 1 or (t.stride(0) * size) % TMA_ALIGN_BYTES or t.data_ptr() % TMA_ALIGN_BYTES:
            return False
    return True


_SIDE_STREAMS: dict[int, Any] = {}


class _SideStream:
    """Work that runs on a second CUDA stream, concurrently with what the current stream launches after the fork.

    Created at the fork point (everything queued so far on the current stream is ready for the side work); the side
    work is launched *after* the main-stream launch it should overlap, so that the GEMM gets the SMs first and the side
    kernel fills those its last wave leaves idle. :meth:`join` makes the current stream wait for the side work and
    marks the tensors the side work allocated as used by the current stream (the caching allocator then keeps them
    until the current stream is done with them). Tensors allocated before the fork need nothing: the current stream
    waits for the side stream before any later launch could reuse their memory. Off CUDA (the interpreter) this is a
    no-op and the work runs in order.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.active = enabled and device.type == "cuda"
        if self.active:
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index not in _SIDE_STREAMS:
                _SIDE_STREAMS[index] = torch.cuda.Stream(device)
            self.stream = _SIDE_STREAMS[index]
            self.main = torch.cuda.current_stream(device)
            self.ready = torch.cuda.Event()
            self.ready.record(self.main)

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        if not self.active:
            yield
            return
        self.stream.wait_event(self.ready)
        with torch.cuda.stream(self.stream):
            yield

    def join(self, *allocated: torch.Tensor | None) -> None:
        if not self.active:
            return
        self.main.wait_stream(self.stream)
        for t in allocated:
            if t is not None:
                t.record_stream(self.main)


def lora_shrink(
    x2d: torch.Tensor,
    lora_A: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    config: LoRAConfig,
    sms: int,
    deterministic: bool,
) -> torch.Tensor:
    """u = scale · drop(x) Aᵀ in fp32.

    Args:
        x2d: (M, K) activations, last stride 1 (any row stride).
        lora_A: (r, K) all adapters (frozen and trainable), any float dtype.
        scale: s / (1 - p).
        dropout_p: p; seed: (1,) int64 on x's device when p > 0.
        config, sms, deterministic: tiles, SM count and reduction mode (workspace instead of atomics).

    Returns:
        (M, r) float32.
    """
    M, K = x2d.shape
    R = lora_A.shape[0]
    tiles = config.shrink
    block_r = _block_r(R, config.max_block_r)
    grid_m, grid_r = _cdiv(M, tiles.block_m), _cdiv(R, block_r)
    split = _splits(grid_m * grid_r, K, tiles.block_k, sms, config.split_k)
    k_per_split = _cdiv(_cdiv(K, tiles.block_k), split) * tiles.block_k
    split = _cdiv(K, k_per_split)
    atomic = split > 1 and not deterministic
    if split == 1:
        out = torch.empty(M, R, dtype=torch.float32, device=x2d.device)
    elif atomic:
        out = torch.zeros(M, R, dtype=torch.float32, device=x2d.device)
    else:
        out = torch.empty(split, M, R, dtype=torch.float32, device=x2d.device)
    stride_us = out.stride(0) if out.dim() == 3 else 0
    with env.device_guard(x2d.device):
        _lora_shrink_kernel[(grid_m, grid_r, split)](
            x2d, lora_A, out, _seed_ptr(seed, x2d),
            M, K, R, k_per_split,
            x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), stride_us, out.stride(-2), out.stride(-1),
            dropout_p, scale,
            DROPOUT=dropout_p > 0.0, ATOMIC=atomic,
            BLOCK_M=tiles.block_m, BLOCK_K=tiles.block_k, BLOCK_R=block_r,
            DOT_PRECISION=_dot_precision(x2d.dtype), UPCAST=env.TRITON_INTERPRET,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    return out.sum(0) if out.dim() == 3 else out


def lora_gemm(
    out: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    tiles: GemmTiles,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (M, N) = [a @ b, or out itself when a is None] + (u v)[⊙ keep / (1 - p)] + bias, written into ``out``;
    the pointer-based kernel, one program per tile.

    Args:
        out: (M, N) in the compute (activation) dtype; read first when ``a`` is None (in-place expand).
        a: (M, K) and b: (K, N) (any strides), the base GEMM; None for the in-place expand.
        u: (M, r) float32; v: (r, N) any float dtype (any strides).
        bias: (N,) or None.
        tiles: GEMM tiles (with the rank block of the LoRA slice).
        dropout_p, seed: with p > 0, u v is masked with the keep-mask of an (M, N) input (the dx GEMM).

    Returns:
        ``out``.
    """
    M, N = out.shape
    R = u.shape[1]
    base = a is not None
    K = a.shape[1] if base else 0
    stride_a = a.stride() if base else (0, 0)
    stride_b = b.stride() if base else (0, 0)
    block_r = _block_r(R, tiles.block_r)
    grid = (_cdiv(M, tiles.block_m) * _cdiv(N, tiles.block_n),)
    with env.device_guard(out.device):
        # Pointers a kernel variant never reads (no base GEMM, no bias, no dropout) are given ``out``.
        _lora_gemm_kernel[grid](
            a if base else out, b if base else out, u, v, bias if bias is not None else out, out, _seed_ptr(seed, out),
            M, N, K, R,
            *stride_a, *stride_b,
            u.stride(0), u.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            dropout_p, 1.0 / (1.0 - dropout_p),
            BASE_GEMM=base, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, ONE_R_BLOCK=R <= block_r,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=block_r, GROUP_M=tiles.group_m,
            DOT_PRECISION=_dot_precision(out.dtype), UPCAST=env.TRITON_INTERPRET,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    return out


def lora_gemm_tma(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    b_kmajor: bool,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    tiles: GemmTiles,
    programs: int,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (M, N) = a @ (bᵀ if b_kmajor else b) + (u v)[⊙ keep / (1 - p)] + bias: the persistent TMA kernel.

    Args:
        out: (M, N), a: (M, K), b: (N, K) when ``b_kmajor`` else (K, N); all in the same 16-bit dtype and
            addressable by TMA (:func:`_tma_addressable`).
        u: (M, r) float32; v: (r, N) any float dtype (any strides); bias: (N,) or None.
        tiles: GEMM tiles (with the rank block of the LoRA slice).
        programs: the most programs to launch (one per SM; fewer when there are fewer tiles).
        dropout_p, seed: as for :func:`lora_gemm`.

    Returns:
        ``out``.
    """
    M, N = out.shape
    K = a.shape[1]
    R = u.shape[1]
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    block_r = _block_r(R, tiles.block_r)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b, [bn, bk] if b_kmajor else [bk, bn])
    c_desc = TensorDescriptor.from_tensor(out, [bm, bn // 2])
    grid = (max(1, min(programs, _cdiv(M, bm) * _cdiv(N, bn))),)
    with env.device_guard(out.device):
        _lora_gemm_tma_kernel[grid](
            a_desc, b_desc, c_desc, u, v, bias if bias is not None else out, _seed_ptr(seed, out),
            M, N, K, R, grid[0],
            u.stride(0), u.stride(1), v.stride(0), v.stride(1),
            dropout_p, 1.0 / (1.0 - dropout_p),
            B_KMAJOR=b_kmajor, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, ONE_R_BLOCK=R <= block_r,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, GROUP_M=tiles.group_m,
            DOT_PRECISION=_dot_precision(out.dtype), UPCAST=env.TRITON_INTERPRET,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    return out


def _fused_gemm(
    out: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    forward: bool,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    tiles: GemmTiles,
    config: LoRAConfig,
    sms: int,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The base GEMM with the LoRA slice folded in: out = a Wᵀ (forward) or a W (dx) + (u v)[masked] + bias.

    The persistent TMA kernel when the config asks for it and the operands allow it (one 16-bit dtype, TMA-aligned);
    the pointer kernel otherwise.
    """
    if config.tma and out.dtype in (torch.float16, torch.bfloat16) and a.dtype == w.dtype == out.dtype:
        if _tma_addressable(out, a, w):
            programs = config.max_programs or sms
            return lora_gemm_tma(out, a, w, forward, u, v, bias, tiles, programs, dropout_p, seed)
    return lora_gemm(out, a, w.t() if forward else w, u, v, bias, tiles, dropout_p, seed)


def lora_dudb(
    dy: torch.Tensor,
    lora_B: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    frozen_rank: int,
    need_du: bool,
    need_db: bool,
    config: LoRAConfig,
    deterministic: bool,
    db_accumulator: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """du = s · dy B and dB = dyᵀ u[:, frozen_rank:] in one pass over dy.

    Args:
        dy: (M, N) output gradient in the activation dtype (any strides).
        lora_B: (N, r) all adapters; u: (M, r) float32 from the forward (already carries s and 1 / (1 - p)).
        scaling: s; frozen_rank: f, the leading columns of B that get no gradient.
        need_du, need_db: which outputs to produce.
        config, deterministic: tiles and reduction mode (per-row-block workspace instead of atomics).
        db_accumulator: a zeroed (N, r - f) float32 tensor that the row blocks add dB into atomically, required when
            :func:`dudb_accumulates` says so (see :func:`lora_linear_bwd`).

    Returns:
        du (M, r) float32 or None; dB (N, r - f) or None: float32 (the accumulator) when accumulated, else in
        lora_B's dtype.
    """
    M, N = dy.shape
    R = lora_B.shape[1]
    RT = R - frozen_rank
    tiles = config.dudb
    block_r = _block_r(R, config.max_block_r)
    grid = (_cdiv(M, tiles.block_m), _cdiv(R, block_r))
    device = dy.device
    du = torch.empty(M, R, dtype=torch.float32, device=device) if need_du else None
    atomic = need_db and dudb_accumulates(M, config, deterministic)
    db = None
    stride_dbs = 0
    if need_db:
        if atomic:
            if db_accumulator is None:
                raise ValueError("db_accumulator: a zeroed (N, r - f) float32 tensor is needed for this launch")
            db = db_accumulator
        elif grid[0] == 1:
            db = torch.empty(N, RT, dtype=lora_B.dtype, device=device)
        else:
            db = torch.empty(grid[0], N, RT, dtype=torch.float32, device=device)
            stride_dbs = db.stride(0)
    du_arg = du if du is not None else u
    db_arg = db if db is not None else u
    with env.device_guard(dy.device):
        _lora_dudb_kernel[grid](
            dy, lora_B, u, du_arg, db_arg,
            M, N, R, frozen_rank,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1),
            du_arg.stride(0), du_arg.stride(1), stride_dbs, db_arg.stride(-2), db_arg.stride(-1),
            scaling,
            NEED_DU=need_du, NEED_DB=need_db, ATOMIC=atomic,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_k, BLOCK_R=block_r,
            DOT_PRECISION=_dot_precision(dy.dtype), UPCAST=env.TRITON_INTERPRET,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    if db is not None and db.dim() == 3:
        db = db.sum(0).to(lora_B.dtype)
    return du, db


def dudb_accumulates(M: int, config: LoRAConfig, deterministic: bool) -> bool:
    """Whether :func:`lora_dudb` adds dB atomically into an accumulator (several row blocks, not deterministic)."""
    return not deterministic and _cdiv(M, config.dudb.block_m) > 1


def _grad_a_split(M: int, K: int, RT: int, config: LoRAConfig, sms: int) -> tuple[int, int]:
    """(splits over M, rows per split) of the dA kernel."""
    tiles = config.grad_a
    programs = _cdiv(K, tiles.block_k) * _cdiv(RT, _block_r(RT, config.max_block_r))
    split = _splits(programs, M, tiles.block_m, sms, config.split_m)
    m_per_split = _cdiv(_cdiv(M, tiles.block_m), split) * tiles.block_m
    return _cdiv(M, m_per_split), m_per_split


def grad_a_accumulates(M: int, K: int, RT: int, config: LoRAConfig, sms: int, deterministic: bool) -> bool:
    """Whether :func:`lora_grad_a` adds dA atomically into an accumulator (split over M, not deterministic)."""
    return not deterministic and _grad_a_split(M, K, RT, config, sms)[0] > 1


def lora_grad_a(
    x2d: torch.Tensor,
    du: torch.Tensor,
    frozen_rank: int,
    a_dtype: torch.dtype,
    dropout_p: float,
    seed: torch.Tensor | None,
    config: LoRAConfig,
    sms: int,
    deterministic: bool,
    da_accumulator: torch.Tensor | None = None,
) -> torch.Tensor:
    """dA = du[:, f:]ᵀ drop(x) / (1 - p), split over M when the K column blocks alone do not fill the GPU.

    Args:
        x2d: (M, K) activations (last stride 1); du: (M, r) float32 (carries s).
        frozen_rank: f; a_dtype: dtype of the result (lora_A's) when it is not accumulated.
        dropout_p, seed: the forward's dropout (the mask is regenerated).
        config, sms, deterministic: tiles, SM count and reduction mode.
        da_accumulator: a zeroed (r - f, K) float32 tensor that the splits add into atomically, required when
            :func:`grad_a_accumulates` says so.

    Returns:
        (r - f, K): the float32 accumulator when accumulated, else in ``a_dtype``.
    """
    M, K = x2d.shape
    RT = du.shape[1] - frozen_rank
    tiles = config.grad_a
    block_r = _block_r(RT, config.max_block_r)
    grid_k, grid_r = _cdiv(K, tiles.block_k), _cdiv(RT, block_r)
    split, m_per_split = _grad_a_split(M, K, RT, config, sms)
    atomic = split > 1 and not deterministic
    if atomic:
        if da_accumulator is None:
            raise ValueError("da_accumulator: a zeroed (r - f, K) float32 tensor is needed for this launch")
        out = da_accumulator
    elif split == 1:
        out = torch.empty(RT, K, dtype=a_dtype, device=x2d.device)
    else:
        out = torch.empty(split, RT, K, dtype=torch.float32, device=x2d.device)
    stride_das = out.stride(0) if out.dim() == 3 else 0
    with env.device_guard(x2d.device):
        _lora_grad_a_kernel[(grid_k, grid_r, split)](
            x2d, du, out, _seed_ptr(seed, x2d),
            M, K, frozen_rank, RT, m_per_split,
            x2d.stride(0), x2d.stride(1), du.stride(0), du.stride(1), stride_das, out.stride(-2), out.stride(-1),
            dropout_p, 1.0 / (1.0 - dropout_p),
            DROPOUT=dropout_p > 0.0, ATOMIC=atomic,
            BLOCK_M=tiles.block_m, BLOCK_K=tiles.block_k, BLOCK_R=block_r,
            DOT_PRECISION=_dot_precision(x2d.dtype), UPCAST=env.TRITON_INTERPRET,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    if out.dim() == 3:
        out = out.sum(0).to(a_dtype)
    return out


def dropout_keep_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The (M, K) bool keep-mask that the kernels draw from ``seed`` ((1,) int64) with probability p of dropping."""
    keep = torch.empty(M, K, dtype=torch.uint8, device=seed.device)
    # Regenerating a mask serves tests and debugging, not the training step: any tile works; 32x64 keeps the
    # interpreter's per-program arrays small and gives a GPU many programs.
    block_m, block_k = 32, 64
    if M and K:
        with env.device_guard(seed.device):
            _dropout_keep_kernel[(_cdiv(M, block_m) * _cdiv(K, block_k),)](
                seed, keep, M, K, dropout_p, BLOCK_M=block_m, BLOCK_K=block_k
            )
    return keep.view(torch.bool)


# --- the backend's entry points -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    """Non-tensor forward state, handed to the backward by the ops layer."""

    scaling: float
    dropout_p: float
    frozen_rank: int
    config: LoRAConfig


def lora_linear_fwd(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    frozen_rank: int,
    needs_grad: bool,
    *,
    config: LoRAConfig | None = None,
) -> tuple[torch.Tensor, tuple, Any]:
    """y (M, N) in x's dtype from x2d (M, K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r).

    ``config`` fixes the kernel configuration (tests); None picks one per call from the table in ``lora_configs.py``
    by GPU family and shape. Saved for backward: x (M, K), W, A, B, u (M, r) fp32 and the dropout seed (1,) int64;
    never the mask.
    """
    M, K = x2d.shape
    N = weight.shape[0]
    dt = x2d.dtype
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()  # every kernel streams x along K: a strided last dimension would not coalesce
    config = config or config_for(x2d.device, M, lora_A.shape[0], dt)
    _, sms = _family_and_sms(x2d.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    seed = None
    if dropout_p > 0.0:
        # Drawn on the device from torch's generator: reproducible under torch.manual_seed, no host sync.
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x2d.device)
    scale = scaling / (1.0 - dropout_p)
    # A weight in another dtype than x would need a converted copy for cuBLAS; the fused GEMM converts tiles.
    if config.forward_base == "fused" or weight.dtype != dt:
        u = lora_shrink(x2d, lora_A, scale, dropout_p, seed, config, sms, deterministic)
        y = torch.empty(M, N, dtype=dt, device=x2d.device)
        _fused_gemm(y, x2d, weight, True, u, lora_B.t(), bias, config.gemm, config, sms)
    else:
        side = _SideStream(x2d.device, config.side_stream)
        y = torch.addmm(bias.to(dt), x2d, weight.t()) if bias is not None else torch.mm(x2d, weight.t())
        with side.run():
            u = lora_shrink(x2d, lora_A, scale, dropout_p, seed, config, sms, deterministic)
        side.join(u)
        lora_gemm(y, None, None, u, lora_B.t(), None, config.expand)
    saved = (x2d, weight, lora_A, lora_B, u, seed) if needs_grad else ()
    return y, saved, _State(scaling, dropout_p, frozen_rank, config)


def lora_linear_bwd(
    dy2d: torch.Tensor, saved: tuple, state: Any, needs_dx: bool, needs_dA: bool, needs_dB: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dx (M, K) in x's dtype, dA (r - f, K) in lora_A's and dB (N, r - f) in lora_B's, from dy2d (M, N)."""
    x2d, weight, lora_A, lora_B, u, seed = saved
    dt = x2d.dtype
    dy = dy2d.to(dt)
    M, K = x2d.shape
    N = weight.shape[0]
    RT = lora_A.shape[0] - state.frozen_rank
    config = state.config
    device = x2d.device
    _, sms = _family_and_sms(device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    p, f = state.dropout_p, state.frozen_rank
    need_da, need_db = needs_dA and RT > 0, needs_dB and RT > 0
    need_du = needs_dx or need_da
    fused = config.grad_base == "fused" or weight.dtype != dt

    # dA and dB that several programs add into share one zeroed fp32 buffer: one fill and, for 16-bit adapters of one
    # dtype, one cast for both.
    acc_db = need_db and dudb_accumulates(M, config, deterministic)
    acc_da = need_da and grad_a_accumulates(M, K, RT, config, sms, deterministic)
    db_acc = da_acc = flat = None
    if acc_db or acc_da:
        db_size = N * RT if acc_db else 0
        flat = torch.zeros(db_size + (RT * K if acc_da else 0), dtype=torch.float32, device=device)
        db_acc = flat[:db_size].view(N, RT) if acc_db else None
        da_acc = flat[db_size:].view(RT, K) if acc_da else None

    dx = dA = dB = None
    if fused:
        du, dB = lora_dudb(dy, lora_B, u, state.scaling, f, need_du, need_db, config, deterministic, db_acc)
        side = _SideStream(device, config.side_stream and need_da)
        if needs_dx:
            tiles = config.gemm_dropout if p > 0.0 else config.gemm
            dx = _fused_gemm(torch.empty(M, K, dtype=dt, device=device), dy, weight, False, du, lora_A, None, tiles,
                             config, sms, p, seed)  # fmt: skip
        if need_da:
            with side.run():
                dA = lora_grad_a(x2d, du, f, lora_A.dtype, p, seed, config, sms, deterministic, da_acc)
            side.join(dA)
    else:
        side = _SideStream(device, config.side_stream)
        base = torch.mm(dy, weight) if needs_dx else None
        with side.run():
            du, dB = lora_dudb(dy, lora_B, u, state.scaling, f, need_du, need_db, config, deterministic, db_acc)
        side.join(du, dB)
        if needs_dx:
            dx = lora_gemm(base, None, None, du, lora_A, None, config.expand, p, seed)
        if need_da:
            dA = lora_grad_a(x2d, du, f, lora_A.dtype, p, seed, config, sms, deterministic, da_acc)

    if acc_db and acc_da and lora_A.dtype == lora_B.dtype:
        cast = flat.to(lora_A.dtype)
        dB, dA = cast[: N * RT].view(N, RT), cast[N * RT :].view(RT, K)
    else:
        dA = dA.to(lora_A.dtype) if dA is not None else None
        dB = dB.to(lora_B.dtype) if dB is not None else None
    if needs_dA and RT == 0:
        dA = torch.zeros(0, K, dtype=lora_A.dtype, device=device)
    if needs_dB and RT == 0:
        dB = torch.zeros(N, 0, dtype=lora_B.dtype, device=device)
    return dx, (dA if needs_dA else None), (dB if needs_dB else None)


def lora_linear_dropout_mask(saved: tuple, state: Any) -> torch.Tensor | None:
    """The forward's (M, K) bool keep-mask, regenerated from its seed; None without dropout or without saved tensors
    (a forward with needs_grad=False)."""
    if not saved or state.dropout_p == 0.0:
        return None
    x2d, seed = saved[0], saved[5]
    return dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], state.dropout_p)


def lora_linear_not_supported_reasons(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    frozen_rank: int = 0,
) -> list[str]:
    """Why the Triton kernels cannot run these (validated) inputs; empty when they can.

    Args:
        x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); as for ``lora_linear``.
        scaling, dropout_p, frozen_rank: as for ``lora_linear`` (every value the op accepts is supported).
    """
    named = (("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B))
    why = env.triton_device_reasons(named) + env.dtype_reasons("triton kernels", named)
    if x.is_cuda and x.dtype == torch.bfloat16 and not env.TRITON_INTERPRET:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        capability = _cuda_properties(index)[0]
        if capability < (8, 0):
            why.append(f"x is bfloat16 but {x.device} has compute capability {capability}; bf16 tl.dot needs 8.0+")
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    for name, size in (("x's rows", rows), ("in_features", weight.shape[1]), ("out_features", weight.shape[0])):
        if size > MAX_DIM:
            why.append(f"{name} = {size} exceeds {MAX_DIM}: tile offsets in the kernels are 32-bit")
    return why
