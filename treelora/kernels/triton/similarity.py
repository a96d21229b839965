"""Triton kernels for batched gradient similarity (SPEC 3.2): full (T, L) and gathered (L,) forms, dense and ragged
layouts, and the fused running-mean update (accumulate-then-compare).

Work decomposition. Every layer ``l`` (columns ``[offsets[l], offsets[l + 1])`` of the flat query and bank) is cut
into chunks of ``chunk`` elements; one program handles one (layer, chunk) pair for every bank row it needs (all T
rows in the full form, row ``index[l]`` in the gathered form), so the query chunk is read from HBM once whatever T
is. A cached block table maps program ids to layers, so ragged layers of very different widths waste no programs.

Determinism without a second launch. Each program writes its per-row partial sums to a workspace, then takes a
ticket from a per-layer arrival counter (an integer atomic, whose result does not depend on timing). The program
that arrives last sums the layer's partials in chunk order (a fixed order, so results are bitwise reproducible),
writes the output and resets the counter to zero for the next launch. No float atomics, no host synchronisation.

Launches per call: one for ``dot``, ``l1``, ``sqeuclidean`` and ``cosine`` (cosine accumulates q·g, q·q and g·g in
the same pass); two for ``l1_normalized``, whose per-element terms need both L1 norms first: a norms pass, then the
distance pass.

Out-of-range gathered indices cannot be checked without a host synchronisation; such a layer returns NaN instead of
reading out of bounds. All arithmetic is fp32 after loading (fp16/bf16 banks are upcast right after the load, which
also keeps the CPU interpreter exact).

Every launch runs inside :func:`treelora.kernels.env.device_guard` of the query's device. Order of this file: constants
→ ``@triton.jit`` kernels → launchers and the backend's entry points (``pairwise_similarity``,
``accumulate_and_compare_``) → their ``*_not_supported_reasons``. Compile specs live in ``compile_specs.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from treelora.kernels import env
from treelora.kernels.constants import METRIC_CODES, SIMILARITY_EPS, dtype_message

# Metric codes of the kernel: the shared codes (constants.py, also the CUDA kernels'), as constexpr so that the kernel
# compares against them at compile time. NORMS is not a metric but the first of the two passes of "l1_normalized"
# (the per-row L1 norms, then the distance pass L1_NORMALIZED): a code past the metrics'.
DOT = tl.constexpr(METRIC_CODES["dot"])
L1 = tl.constexpr(METRIC_CODES["l1"])
SQEUCLIDEAN = tl.constexpr(METRIC_CODES["sqeuclidean"])
COSINE = tl.constexpr(METRIC_CODES["cosine"])
L1_NORMALIZED = tl.constexpr(METRIC_CODES["l1_normalized"])
NORMS = tl.constexpr(max(METRIC_CODES.values()) + 1)
# Partial sums kept per (row, program): cosine needs q·g, q·q and g·g; the norms pass ‖g‖₁ and ‖q‖₁.
_COMPONENTS = {DOT.value: 1, L1.value: 1, SQEUCLIDEAN.value: 1, COSINE.value: 3, NORMS.value: 2, L1_NORMALIZED.value: 1}
EPS = tl.constexpr(SIMILARITY_EPS)  # the clamp of every backend and of the reference
NAN = tl.constexpr(float("nan"))

# 1024 elements per tile with 4 warps: 8 elements per thread, i.e. two 16-byte loads per fp32 operand (one for bf16).
BLOCK = 1024
NUM_WARPS = 4
# Tiles per program: 4096 elements (16 KB of fp32 per bank row) gives 512 programs at (L, D) = (64, 32768), about
# four per H100 SM, and 9.8K at the 7B shape (32, 1.25M); the final reduction then sums at most a few hundred
# partials per layer. Not yet tuned on a GPU.
CHUNK_TILES = 4
# Partials summed per step by the last program of a layer.
REDUCE_BLOCK = 128


# --- kernels ------------------------------------------------------------------------------------------------------


@triton.jit
def _sum_partials(ptr, n, REDUCE_BLOCK: tl.constexpr):
    """Sum of ``ptr[0:n]`` in a fixed order. ``.cg`` reads at L2, where the other programs' stores landed."""
    idx = tl.arange(0, REDUCE_BLOCK)
    acc = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)
    for i in range(0, n, REDUCE_BLOCK):
        acc += tl.load(ptr + i + idx, mask=i + idx < n, other=0.0, cache_modifier=".cg")
    return tl.sum(acc, axis=0)


@triton.jit
def _similarity_kernel(
    query_ptr,  # (S,) query; with ACCUMULATE the fp32 running mean, updated in place
    sample_ptr,  # (S,) new observation (ACCUMULATE only)
    count_ptr,  # 1-element observation count on the device (COUNT_ON_DEVICE only)
    count,  # observation count as a number (when not COUNT_ON_DEVICE)
    bank_ptr,  # (T, S) bank, rows bank_stride elements apart
    bank_stride,
    index_ptr,  # (L,) bank row per layer (GATHER only)
    offsets_ptr,  # (L + 1,) int64 layer boundaries
    block_layer_ptr,  # (P,) int64 layer of each program
    first_block_ptr,  # (L + 1,) int64 first program of each layer
    norms_ptr,  # (R + 1, L) fp32 L1 norms: R bank rows, then the query (written by NORMS, read by L1_NORMALIZED)
    partial_ptr,  # (components, R, P) fp32 per-program partial sums
    counter_ptr,  # (L,) int32 arrival counters: zero before and after every launch
    out_ptr,  # (R, L) fp32 result (unused by NORMS)
    num_rows,  # R: T in the full form, 1 in the gathered form
    num_bank_rows,  # T
    num_layers,  # L
    num_programs,  # P
    chunk,  # elements per program, a multiple of BLOCK
    METRIC: tl.constexpr,
    GATHER: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    COUNT_ON_DEVICE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.load(block_layer_ptr + pid)
    first = tl.load(first_block_ptr + layer)
    num_chunks = tl.load(first_block_ptr + layer + 1) - first
    lo = tl.load(offsets_ptr + layer)
    hi = tl.load(offsets_ptr + layer + 1)
    start = lo + (pid - first) * chunk
    if ALIGNED:
        # Layer boundaries are multiples of 16 elements: lets the compiler emit 16-byte vector loads (it must know
        # both where a tile starts and that the bound masks whole vectors).
        start = tl.multiple_of(start, 16)
        hi = tl.multiple_of(hi, 16)
    cols = tl.arange(0, BLOCK)

    if GATHER:
        gathered_row = tl.load(index_ptr + layer).to(tl.int64)
        row_ok = (gathered_row >= 0) & (gathered_row < num_bank_rows)
        gathered_row = tl.where(row_ok, gathered_row, 0)
    if ACCUMULATE:
        if COUNT_ON_DEVICE:
            n_obs = tl.load(count_ptr).to(tl.float32)
        else:
            n_obs = count
    if METRIC == L1_NORMALIZED:
        inv_q = 1.0 / tl.maximum(tl.load(norms_ptr + num_rows * num_layers + layer), EPS)

    # Advanced row by row as a 64-bit pointer, so T * S may exceed 2^31 elements.
    row_base = bank_ptr
    if GATHER:
        row_base = bank_ptr + gathered_row * bank_stride
    for r in range(0, num_rows):
        if METRIC == L1_NORMALIZED:
            inv_g = 1.0 / tl.maximum(tl.load(norms_ptr + r * num_layers + layer), EPS)
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, chunk, BLOCK):
            offs = start + i + cols
            in_layer = offs < hi
            q = tl.load(query_ptr + offs, mask=in_layer, other=0.0).to(tl.float32)
            if ACCUMULATE:
                x = tl.load(sample_ptr + offs, mask=in_layer, other=0.0).to(tl.float32)
                q = q + (x - q) / n_obs
                tl.store(query_ptr + offs, q, mask=in_layer)
            if GATHER:
                g = tl.load(row_base + offs, mask=in_layer & row_ok, other=0.0).to(tl.float32)
            else:
                g = tl.load(row_base + offs, mask=in_layer, other=0.0).to(tl.float32)
            if METRIC == DOT:
                acc0 += q * g
            elif METRIC == L1:
                acc0 += tl.abs(q - g)
            elif METRIC == SQEUCLIDEAN:
                d = q - g
                acc0 += d * d
            elif METRIC == COSINE:
                acc0 += q * g
                acc1 += q * q
                acc2 += g * g
            elif METRIC == NORMS:
                acc0 += tl.abs(g)
                acc1 += tl.abs(q)
            else:
                acc0 += tl.abs(q * inv_q - g * inv_g)
        slot = partial_ptr + r * num_programs + pid
        tl.store(slot, tl.sum(acc0, axis=0))
        if METRIC == COSINE or METRIC == NORMS:
            tl.store(slot + num_rows * num_programs, tl.sum(acc1, axis=0))
        if METRIC == COSINE:
            tl.store(slot + 2 * num_rows * num_programs, tl.sum(acc2, axis=0))
        if not GATHER:
            row_base += bank_stride

    # Every thread's partial stores happen before the ticket (the barrier), and the ticket is acq_rel at GPU scope,
    # so the last program to arrive sees all of this layer's partials.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + layer, 1, sem="acq_rel", scope="gpu")
    if ticket == num_chunks - 1:
        for r in range(0, num_rows):
            base = partial_ptr + r * num_programs + first
            s0 = _sum_partials(base, num_chunks, REDUCE_BLOCK)
            if METRIC == NORMS:
                s1 = _sum_partials(base + num_rows * num_programs, num_chunks, REDUCE_BLOCK)
                tl.store(norms_ptr + r * num_layers + layer, s0)
                tl.store(norms_ptr + num_rows * num_layers + layer, s1)
            else:
                value = s0
                if METRIC == COSINE:
                    qq = _sum_partials(base + num_rows * num_programs, num_chunks, REDUCE_BLOCK)
                    gg = _sum_partials(base + 2 * num_rows * num_programs, num_chunks, REDUCE_BLOCK)
                    value = s0 / tl.maximum(tl.sqrt(qq) * tl.sqrt(gg), EPS)
                if GATHER:
                    value = tl.where(row_ok, value, NAN)
                tl.store(out_ptr + r * num_layers + layer, value)
        tl.store(counter_ptr + layer, 0)


# --- launchers ----------------------------------------------------------------------------------------------------


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _arrival_counters(num_layers: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per layer, cached per device and stream (each launch leaves it zeroed again), so a
    call needs no memset launch. Keyed by stream because launches on two streams may overlap."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < num_layers:
        buf = torch.zeros(max(num_layers, 256), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


@functools.lru_cache(maxsize=64)
def _block_table(offsets: tuple[int, ...], chunk: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Device copies of the layer offsets, program -> layer and layer -> first program, and the number of programs:
    built once per layout (a host-to-device copy per call would synchronise the host)."""
    first = [0]
    for lo, hi in zip(offsets, offsets[1:]):
        first.append(first[-1] + max(1, -(-(hi - lo) // chunk)))
    layer_of = [layer for layer in range(len(offsets) - 1) for _ in range(first[layer + 1] - first[layer])]
    as_device = lambda values: torch.tensor(values, dtype=torch.int64).to(device)
    return as_device(list(offsets)), as_device(layer_of), as_device(first), first[-1]


def _flat_layout(query: torch.Tensor, bank: torch.Tensor, offsets: tuple[int, ...] | None):
    """The flat (S,) query, the (T, S) bank with unit column stride, its row stride, and the layer offsets."""
    if offsets is None:
        L, D = query.shape
        offsets = tuple(range(0, L * D + 1, D))
        if bank.stride(2) != 1 or bank.stride(1) != D:
            bank = bank.contiguous()
        bank = (
            bank.view(bank.shape[0], L * D)
            if bank.is_contiguous()
            else bank.as_strided((bank.shape[0], L * D), (bank.stride(0), 1))
        )
        query = query.reshape(L * D)
    elif bank.stride(1) != 1:
        bank = bank.contiguous()
    return query.contiguous(), bank, offsets


def _launch(query, sample, count, bank, index, offsets, metric, accumulate, chunk_tiles, block):
    query, bank, offsets = _flat_layout(query, bank, offsets)
    if sample is not None:
        sample = sample.reshape(-1).contiguous()
    device = query.device
    num_layers = len(offsets) - 1
    gather = index is not None
    num_rows = 1 if gather else bank.shape[0]
    out = torch.empty(num_rows, num_layers, dtype=torch.float32, device=device)
    if num_rows == 0:
        return out
    chunk = block * chunk_tiles
    offsets_dev, block_layer, first_block, num_programs = _block_table(offsets, chunk, device)
    counters = _arrival_counters(num_layers, device)
    code = METRIC_CODES[metric]
    passes = (NORMS.value, code) if code == L1_NORMALIZED.value else (code,)
    norms = torch.empty(num_rows + 1, num_layers, dtype=torch.float32, device=device) if len(passes) > 1 else out
    partials = torch.empty(
        max(_COMPONENTS[p] for p in passes) * num_rows * num_programs, dtype=torch.float32, device=device
    )
    count_on_device = isinstance(count, torch.Tensor)
    aligned = all(o % 16 == 0 for o in offsets) and chunk % 16 == 0
    with env.device_guard(device):
        for i, pass_metric in enumerate(passes):
            _similarity_kernel[(num_programs,)](
                query,
                sample if sample is not None else query,
                count if count_on_device else query,
                1.0 if count_on_device or count is None else float(count),
                bank,
                bank.stride(0),
                index if gather else offsets_dev,
                offsets_dev,
                block_layer,
                first_block,
                norms,
                partials,
                counters,
                out,
                num_rows,
                bank.shape[0],
                num_layers,
                num_programs,
                chunk,
                METRIC=pass_metric,
                GATHER=gather,
                ACCUMULATE=accumulate and i == 0,
                COUNT_ON_DEVICE=count_on_device,
                ALIGNED=aligned,
                BLOCK=block,
                REDUCE_BLOCK=REDUCE_BLOCK,
                num_warps=NUM_WARPS,
            )
    return out


def pairwise_similarity(
    query: torch.Tensor,
    bank: torch.Tensor,
    metric: str,
    index: torch.Tensor | None = None,
    offsets: tuple[int, ...] | None = None,
    *,
    chunk_tiles: int = CHUNK_TILES,
    block: int = BLOCK,
) -> torch.Tensor:
    """Full or gathered similarity (see :func:`treelora.ops.pairwise_similarity` for the contract; inputs validated).

    Args:
        query: (L, D), or (S,) with ``offsets``; fp32, fp16 or bf16.
        bank: (T, L, D), or (T, S) with ``offsets``; fp32, fp16 or bf16; rows may be strided.
        metric: one of ``METRIC_CODES``.
        index: optional (L,) int64/int32 device tensor: the gathered form.
        offsets: L + 1 host ints for the ragged layout.
        chunk_tiles, block: elements per program are ``chunk_tiles * block`` (tests shrink them to exercise the
            multi-program reduction on small inputs).

    Returns:
        (T, L) fp32, or (L,) fp32 with ``index``.
    """
    out = _launch(query, None, None, bank, index, offsets, metric, False, chunk_tiles, block)
    return out[0] if index is not None else out


def accumulate_and_compare_(
    mean: torch.Tensor,
    sample: torch.Tensor,
    count: float | torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    metric: str,
    offsets: tuple[int, ...] | None = None,
    *,
    chunk_tiles: int = CHUNK_TILES,
    block: int = BLOCK,
) -> torch.Tensor:
    """``mean += (sample - mean) / count`` in place and the gathered similarity of the new mean, in one pass (two for
    ``l1_normalized``: the first pass updates the mean and takes the norms).

    Args:
        mean: (L, D) or (S,) contiguous fp32 running mean.
        sample: same shape, fp32, fp16 or bf16.
        count: a number, or a 1-element tensor on ``mean``'s device (read by the kernel: no host synchronisation).
        bank, index, metric, offsets, chunk_tiles, block: as in :func:`pairwise_similarity`.

    Returns:
        (L,) fp32.
    """
    if isinstance(count, torch.Tensor) and count.device != mean.device:
        count = float(count)  # a CPU scalar beside device tensors: reading it costs no device synchronisation
    return _launch(mean, sample, count, bank, index, offsets, metric, True, chunk_tiles, block)[0]


def pairwise_similarity_not_supported_reasons(
    query: torch.Tensor,
    bank: torch.Tensor,
    metric: str = "l1",
    index: torch.Tensor | None = None,
    offsets: tuple[int, ...] | None = None,
) -> list[str]:
    """Why the Triton kernels cannot run these (validated) inputs; empty when they can."""
    named = (("query", query), ("bank", bank), ("index", index))
    return env.triton_device_reasons(named) + env.dtype_reasons("triton kernels", named[:2])


def accumulate_and_compare_not_supported_reasons(
    mean: torch.Tensor,
    sample: torch.Tensor,
    count: float | torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    metric: str = "l1",
    offsets: tuple[int, ...] | None = None,
) -> list[str]:
    """Why the fused accumulate-then-compare kernel cannot run these (validated) inputs; empty when it can."""
    named = (("mean", mean), ("sample", sample), ("bank", bank), ("index", index))
    why = env.triton_device_reasons(named) + env.dtype_reasons("triton kernels", named[1:3])
    if mean.dtype != torch.float32:
        why.append(dtype_message("mean", mean.dtype, (torch.float32,), " by the triton kernel (its running mean)"))
    if not mean.is_contiguous():
        why.append("mean is not contiguous (it is updated in place through flat indices)")
    return why
