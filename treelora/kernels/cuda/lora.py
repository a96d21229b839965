"""The ``cuda`` backend of the fused LoRA linear: launchers of the CUDA C++ LoRA-branch kernels (csrc/lora.cu) around
cuBLAS, and the backend's entry points (``lora_linear_fwd``, ``lora_linear_bwd``, ``lora_linear_dropout_mask``,
``lora_linear_not_supported_reasons``; the contract is in treelora/kernels/torch/lora.py).

Graph split (SPEC 3.1), with cuBLAS for the base GEMMs and every LoRA kernel on tensor cores (mma.sync m16n8k16); the
byte and launch model that chose this design is in docs/cuda_lora_design.md (:func:`traffic_model` computes it):

* forward: ``lora_shrink`` gives ``u = s/(1-p) · drop(x) Aᵀ`` ((M, r) fp32), ``lora_expand`` writes
  ``T = b + u Bᵀ`` once, in x's dtype, and cuBLAS accumulates the base GEMM into it (``T.addmm_(x, Wᵀ)``, beta = 1,
  T read in its epilogue): 2 launches and no pass over y.
* backward: ``lora_bwd_dy`` reads dy once for ``du = s · dy B`` and ``dB = dyᵀ u[:, f:]``; ``lora_bwd_x`` reads x
  once for ``dA = du[:, f:]ᵀ drop(x) / (1-p)`` and writes ``dxT = keep ⊙ (du A) / (1-p)`` (the dropout mask drawn
  once for both), and cuBLAS accumulates ``dy W`` into dxT; 2 launches and a memset of reduction counters.
* dropout: Philox keyed by a {seed, offset} pair drawn on the device from torch's generator (reproducible under
  ``torch.manual_seed``, no host synchronisation), counter = the element's index row·K + col in x, one draw per 4
  elements. The mask is never stored; :func:`lora_linear_dropout_mask` regenerates it for tests.
* precision: operands enter the tensor cores in the activation dtype (adapters, u and du rounded to it once; fp32
  activations as three bf16 terms per value, exact to 2^-24) and every sum accumulates in fp32; u and du stay fp32.
  The term the GEMM reads is rounded to the activation dtype, so y = rnd(x Wᵀ + rnd(T)) (the exact statement is in
  docs/cuda_lora_design.md). Cross-block sums go through partial slabs added in a fixed order: results are bitwise
  reproducible run to run.
* frozen adapters: the first ``frozen_rank`` rows of A / columns of B take part in y, du and dx; dA and dB are
  computed for the trainable slice only.

Saved for backward: x (M, K), W, A, B, u (M, r) fp32 and the (2,) int64 dropout seed; never the mask.

Inputs arrive validated, non-empty and with a non-zero Python scale: the ops layer routes empty inputs and a scale of
exactly 0 to the torch backend (treelora/ops/lora_linear.py). Every launch runs inside
:func:`treelora.kernels.env.device_guard` of its tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from treelora import _cpp_lib
from treelora.kernels import env
from treelora.kernels.cuda import common as cc

# Dropout keeps an element when the top 24 bits of its Philox word are below round((1 - p) · 2^24).
_KEEP_BITS = 24


def keep_threshold(dropout_p: float) -> int:
    """The integer keep threshold of dropout probability p in [0, 1): at least 1 (p < 1 keeps something)."""
    return max(1, min(1 << _KEEP_BITS, round((1.0 - dropout_p) * (1 << _KEEP_BITS))))


# --- launch plan and byte model -------------------------------------------------------------------------------------
# A mirror of the planner in csrc/lora.cu (plan_forward / plan_backward; tests/test_cuda_emulated.py checks that the
# two agree through the extension's lora_plan), so that the byte and launch model below needs neither a GPU nor the
# extension. The constants are csrc/lora.cu's.
_ROWS = 64  # rows of an activation tile
_STREAM_BLOCKS_PER_SM = 4  # shrink and expand: 128-thread blocks (3 with rank chunks of 64)
_WIDE_BLOCKS_PER_SM = 2  # bwd_dy and bwd_x: 256-thread blocks


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _tile_cols(dtype: torch.dtype) -> int:
    """Columns of an activation tile: fp32 tiles hold three bf16 terms per value, so they are half as wide."""
    return 32 if dtype == torch.float32 else 64


def _rank_chunk(dtype: torch.dtype, r: int) -> int:
    if r <= 16:
        return 16
    if r <= 32 or dtype == torch.float32:
        return 32
    return 64


def _choose_panels(tiles: int, blocks_per_panel: int, target: int) -> int:
    """Panels to cut ``tiles`` into: least rounds-of-target x tiles-per-panel (csrc/lora.cu's choose_panels)."""
    if tiles <= 1 or target <= 0:
        return 1
    best, best_cost = 1, _ceil_div(blocks_per_panel, target) * tiles
    p = 2
    while p <= tiles and blocks_per_panel * p <= 4 * target:
        per = _ceil_div(tiles, p)
        panels = _ceil_div(tiles, per)
        cost = _ceil_div(blocks_per_panel * panels, target) * per
        if cost * 32 < best_cost * 31:
            best, best_cost = panels, cost
        p += 1
    return best


def _split_columns(m_tiles: int, tiles: int, others: int, target: int) -> tuple[int, int]:
    """(tiles per panel, panels) of the columns of a grid with one block per m tile, panel and ``others``."""
    if m_tiles == 0 or tiles == 0:
        return 1, 1
    per = _ceil_div(tiles, _choose_panels(tiles, m_tiles * others, target))
    return per, _ceil_div(tiles, per)


def _plan_panels(tiles_a: int, tiles_b: int, max_b: int, others: int, target: int) -> tuple[int, int, int, int]:
    """(per panel a, panels a, per panel b, panels b): b in panels of at most max_b tiles, a cut by
    :func:`_choose_panels`, then b further if every a tile has its own panel."""
    if tiles_a == 0 or tiles_b == 0:
        return 1, 1, 1, 1
    pb = _ceil_div(tiles_b, max_b)
    pa = _choose_panels(tiles_a, pb * others, target)
    if pa == tiles_a:
        pb = max(pb, _choose_panels(tiles_b, pa * others, target))
    per_a, per_b = _ceil_div(tiles_a, pa), _ceil_div(tiles_b, pb)
    return per_a, _ceil_div(tiles_a, per_a), per_b, _ceil_div(tiles_b, per_b)


def _round4(n: int) -> int:
    return _ceil_div(n, 4) * 4


@dataclass(frozen=True)
class LaunchPlan:
    """How csrc/lora.cu splits one LoRA forward and backward into blocks (see :func:`launch_plan`)."""

    rank_chunk: int  # ranks per block (16, 32 or 64); r > rank_chunk runs ceil(r / rank_chunk) chunks
    chunks: int
    shrink_k_panels: int  # split-K slabs of u (1: the shrink writes u itself)
    expand_c_panels: int  # column panels of the expand (one block per m tile and panel)
    dy_m_panels: int  # bwd_dy: row panels (dB partial slabs) and column panels (du partial slabs)
    dy_n_panels: int
    x_m_panels: int  # bwd_x: row panels (dA partial slabs); one block per (row panel, K tile, dA chunk group)
    forward_workspace: int  # fp32 elements
    backward_workspace: int
    counters: int  # uint32 counters of the last-block reductions, zeroed by one memset per backward


def launch_plan(
    M: int,
    K: int,
    N: int,
    r: int,
    frozen_rank: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    num_sms: int = 132,
    need_dx: bool = True,
    need_dA: bool = True,
    need_dB: bool = True,
) -> LaunchPlan:
    """The block decomposition csrc/lora.cu chooses for x (M, K), W (N, K), rank r on a GPU with ``num_sms`` SMs."""
    rc = _rank_chunk(dtype, r)
    chunks = _ceil_div(r, rc)
    tc = _tile_cols(dtype)
    m_tiles = _ceil_div(M, _ROWS)
    stream_target = max(1, num_sms) * (3 if rc == 64 else _STREAM_BLOCKS_PER_SM)
    wide_target = max(1, num_sms) * _WIDE_BLOCKS_PER_SM
    _, k_panels = _split_columns(m_tiles, _ceil_div(K, tc), chunks, stream_target if N > 0 else 0)
    _, c_panels = _split_columns(m_tiles, _ceil_div(N, tc), 1, stream_target)
    r_t = r - frozen_rank
    need_da, need_db = need_dA and r_t > 0, need_dB and r_t > 0
    need_du = need_dx or need_da
    groups = chunks - frozen_rank // rc if need_da else 1
    dy_max_tiles = 1 if dtype == torch.float32 else 64 // rc
    _, dy_m, _, dy_n = _plan_panels(m_tiles, _ceil_div(N, tc), dy_max_tiles, chunks, wide_target)
    _, x_m, _, _ = _plan_panels(m_tiles, _ceil_div(K, tc), 1, groups, wide_target)
    du_counters = m_tiles * chunks if need_du and dy_n > 1 else 0
    da_counters = _ceil_div(K, tc) * groups if need_da and x_m > 1 else 0
    backward = (
        _round4(M * r if need_du else 0)
        + _round4(dy_n * M * r if need_du and dy_n > 1 else 0)
        + _round4(dy_m * N * r_t if need_db and dy_m > 1 else 0)
        + _round4(x_m * r_t * K if need_da and x_m > 1 else 0)
        + _round4(du_counters + da_counters)
    )
    return LaunchPlan(
        rank_chunk=rc,
        chunks=chunks,
        shrink_k_panels=k_panels,
        expand_c_panels=c_panels,
        dy_m_panels=dy_m,
        dy_n_panels=dy_n,
        x_m_panels=x_m,
        forward_workspace=_round4(k_panels * M * r) if k_panels > 1 else 0,
        backward_workspace=backward if M > 0 else 0,
        counters=du_counters + da_counters,
    )


@dataclass(frozen=True)
class KernelTraffic:
    """Modelled HBM traffic of one launch: bytes it must read and write (each partial slab written once and read
    once; operands re-read from L2 not counted) and bytes cuBLAS reads in its epilogue because of it."""

    name: str
    read: int
    write: int
    epilogue_read: int = 0


def traffic_model(
    M: int,
    K: int,
    N: int,
    r: int,
    frozen_rank: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    adapter_dtype: torch.dtype = torch.float32,
    num_sms: int = 132,
) -> dict[str, Any]:
    """Byte and launch model of one LoRA forward + backward (dx, dA, dB) on the cuda backend against the base linear's
    own (y = x Wᵀ and dx = dy W by cuBLAS, W frozen), from :func:`launch_plan`. See docs/cuda_lora_design.md.

    Returns ``kernels`` (list of :class:`KernelTraffic`), ``extra_bytes`` (HBM bytes of the LoRA kernels),
    ``epilogue_bytes`` (the LoRA terms cuBLAS reads with beta = 1), ``extra_launches`` (launches beyond the two GEMMs),
    ``base_bytes`` (the two GEMMs' compulsory traffic), ``base_flops`` and ``base_launches``.
    """
    e = torch.tensor([], dtype=dtype).element_size()
    ea = torch.tensor([], dtype=adapter_dtype).element_size()
    plan = launch_plan(M, K, N, r, frozen_rank, dtype, num_sms)
    r_t = r - frozen_rank
    u_bytes = M * r * 4
    k_slabs = plan.shrink_k_panels
    groups = plan.chunks - frozen_rank // plan.rank_chunk if r_t > 0 else 1
    kernels = [
        KernelTraffic(
            "lora_shrink", M * K * e * plan.chunks + r * K * ea, k_slabs * u_bytes if k_slabs > 1 else u_bytes
        ),
        KernelTraffic(
            "lora_expand",
            (k_slabs if k_slabs > 1 else 1) * u_bytes + N * r * ea,
            M * N * e + (u_bytes if k_slabs > 1 else 0),
            epilogue_read=M * N * e,
        ),
    ]
    if plan.counters:
        kernels.append(KernelTraffic("memset(counters)", 0, plan.counters * 4))
    du_slabs = plan.dy_n_panels * u_bytes if plan.dy_n_panels > 1 else 0
    db_slabs = plan.dy_m_panels * N * r_t * 4 if plan.dy_m_panels > 1 else 0
    da_slabs = plan.x_m_panels * r_t * K * 4 if plan.x_m_panels > 1 else 0
    kernels.append(
        KernelTraffic(
            "lora_bwd_dy",
            M * N * e * plan.chunks + u_bytes + N * r * ea + du_slabs,
            du_slabs + u_bytes + (db_slabs if db_slabs else N * r_t * ea),
        )
    )
    kernels.append(
        KernelTraffic(
            "lora_bwd_x",
            M * K * e * groups + u_bytes + r * K * ea + da_slabs + db_slabs,
            M * K * e + da_slabs + r_t * K * ea + (N * r_t * ea if db_slabs else 0),
            epilogue_read=M * K * e,
        )
    )
    return {
        "kernels": kernels,
        "extra_bytes": sum(k.read + k.write for k in kernels),
        "epilogue_bytes": sum(k.epilogue_read for k in kernels),
        "extra_launches": len(kernels),
        "base_bytes": 2 * (M * K * e + N * K * e + M * N * e),
        "base_flops": 4 * M * N * K,
        "base_launches": 2,
    }


@dataclass(frozen=True)
class _State:
    """Non-tensor forward state, handed to the backward by the ops layer."""

    scaling: float
    dropout_p: float
    frozen_rank: int


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t (M, C) with unit column stride (copied only when needed) and its row stride (C when M <= 1)."""
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else t.shape[1])


def forward_terms(
    x2d: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    seed: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u (M, r) fp32 = scale · drop(x) Aᵀ and T (M, N) = bias + u Bᵀ in x's dtype, on tensor cores.

    x2d: (M, K) with unit column stride; lora_A (r, K) and lora_B (N, r) of any strides and float dtypes; bias (N,)
    or None. The dropout mask applies only when ``seed`` is given.
    """
    C = _cpp_lib.require("lora_forward")
    x, ldx = _rows(x2d)
    M, K = x.shape
    r, N = lora_A.shape[0], lora_B.shape[0]
    device = x.device
    x_code = cc.dtype_code(x, "x")
    sms = cc.num_sms(device)
    u = torch.empty(M, r, dtype=torch.float32, device=device)
    t = torch.empty(M, N, dtype=x.dtype, device=device)
    ws = torch.empty(max(C.lora_forward_workspace_size(M, K, N, r, x_code, sms), 1), dtype=torch.float32, device=device)
    with env.device_guard(device):
        C.lora_forward(
            cc.ptr(x),
            x_code,
            ldx,
            M,
            K,
            N,
            r,
            cc.ptr(lora_A),
            cc.dtype_code(lora_A, "lora_A"),
            lora_A.stride(0),
            lora_A.stride(1),
            cc.ptr(lora_B),
            cc.dtype_code(lora_B, "lora_B"),
            lora_B.stride(0),
            lora_B.stride(1),
            cc.ptr(bias),
            0 if bias is None else cc.dtype_code(bias, "bias"),
            scale,
            cc.ptr(seed),
            keep_threshold(dropout_p),
            cc.ptr(u),
            cc.ptr(t),
            N,
            cc.ptr(ws),
            sms,
            cc.stream_handle(device),
        )
    return u, t


def backward_terms(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    u: torch.Tensor,
    state: _State,
    seed: torch.Tensor | None,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dxT = keep ⊙ (du A)/(1-p) (M, K) in x's dtype, dA (r - f, K) = du[:, f:]ᵀ drop(x) in lora_A's dtype and
    dB (N, r - f) = dyᵀ u[:, f:] in lora_B's dtype, with du = s · dy B, on tensor cores (None where not needed).

    dy (M, N) and x2d (M, K) in one dtype with unit column strides; u (M, r) fp32 contiguous from the forward.
    """
    C = _cpp_lib.require("lora_backward")
    dy, lddy = _rows(dy)
    x, ldx = _rows(x2d)
    M, N = dy.shape
    K = x.shape[1]
    r = lora_A.shape[0]
    f, p = state.frozen_rank, state.dropout_p
    r_t = r - f
    device = x.device
    code = cc.dtype_code(x, "x")
    sms = cc.num_sms(device)
    dxt = torch.empty(M, K, dtype=x.dtype, device=device) if needs_dx else None
    dA = torch.empty(r_t, K, dtype=lora_A.dtype, device=device) if needs_dA else None
    dB = torch.empty(N, r_t, dtype=lora_B.dtype, device=device) if needs_dB else None
    size = C.lora_backward_workspace_size(M, N, K, r, f, code, needs_dx, needs_dA, needs_dB, sms)
    ws = torch.empty(max(size, 1), dtype=torch.float32, device=device)
    with env.device_guard(device):
        C.lora_backward(
            cc.ptr(dy),
            lddy,
            cc.ptr(x),
            ldx,
            code,
            M,
            N,
            K,
            r,
            f,
            cc.ptr(lora_A),
            cc.dtype_code(lora_A, "lora_A"),
            lora_A.stride(0),
            lora_A.stride(1),
            cc.ptr(lora_B),
            cc.dtype_code(lora_B, "lora_B"),
            lora_B.stride(0),
            lora_B.stride(1),
            cc.ptr(u),
            state.scaling,
            cc.ptr(seed),
            keep_threshold(p),
            1.0 / (1.0 - p),
            cc.ptr(dxt),
            K,
            cc.ptr(dA),
            cc.dtype_code(lora_A, "lora_A"),
            cc.ptr(dB),
            cc.dtype_code(lora_B, "lora_B"),
            cc.ptr(ws),
            sms,
            cc.stream_handle(device),
        )
    return dxt, dA, dB


def dropout_keep_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The (M, K) bool keep mask the kernels use for this seed (regenerated, for tests)."""
    C = _cpp_lib.require("lora_dropout_mask")
    device = seed.device
    keep = torch.empty(M, K, dtype=torch.uint8, device=device)
    with env.device_guard(device):
        C.lora_dropout_mask(cc.ptr(seed), keep_threshold(dropout_p), M, K, cc.ptr(keep), cc.stream_handle(device))
    return keep.bool()


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
) -> tuple[torch.Tensor, tuple, Any]:
    """y (M, N) in x's dtype from x2d (M, K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r)."""
    dt = x2d.dtype
    x2d, _ = _rows(x2d)
    # cuBLAS needs W in x's dtype: a weight stored otherwise is converted (one pass over W per call).
    w = weight if weight.dtype == dt else weight.to(dt)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=x2d.device)  # {seed, offset}, no host sync
    u, y = forward_terms(x2d, lora_A, lora_B, bias, scaling / (1.0 - dropout_p), seed, dropout_p)
    y.addmm_(x2d, w.t())  # y += x Wᵀ with beta = 1: cuBLAS reads the LoRA term in its epilogue
    saved = (x2d, weight, lora_A, lora_B, u, seed) if needs_grad else ()
    return y, saved, _State(scaling, dropout_p, frozen_rank)


def lora_linear_bwd(
    dy2d: torch.Tensor, saved: tuple, state: Any, needs_dx: bool, needs_dA: bool, needs_dB: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dx (M, K) in x's dtype, dA (r - f, K) in lora_A's and dB (N, r - f) in lora_B's, from dy2d (M, N)."""
    x2d, weight, lora_A, lora_B, u, seed = saved
    dt = x2d.dtype
    dy = dy2d.to(dt)
    K = x2d.shape[1]
    r_t = lora_A.shape[0] - state.frozen_rank
    dx, dA, dB = backward_terms(dy, x2d, lora_A, lora_B, u, state, seed, needs_dx, needs_dA and r_t > 0, needs_dB)
    if needs_dx:
        w = weight if weight.dtype == dt else weight.to(dt)
        dx.addmm_(dy, w)  # dx += dy W with beta = 1
    if needs_dA and dA is None:
        dA = torch.zeros(0, K, dtype=lora_A.dtype, device=x2d.device)
    return dx, dA, dB


def lora_linear_dropout_mask(saved: tuple, state: Any) -> torch.Tensor | None:
    """The forward's (M, K) bool keep-mask, regenerated from its seed; None without dropout or saved tensors."""
    if not saved or saved[5] is None:
        return None
    x2d = saved[0]
    return dropout_keep_mask(saved[5], x2d.shape[0], x2d.shape[1], state.dropout_p)


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
    """Why the CUDA kernels cannot run these (validated) inputs; empty when they can.

    Args:
        x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); as for ``lora_linear``.
        scaling, dropout_p, frozen_rank: as for ``lora_linear`` (every value the op accepts is supported).
    """
    named = (("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B))
    return env.cuda_device_reasons(named) + env.dtype_reasons("CUDA kernels", named)
