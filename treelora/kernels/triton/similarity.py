"""Triton kernels for batched gradient similarity (SPEC 3.2): full (T, L) and gathered (L,) forms, dense and ragged
layouts, and the fused running-mean update (accumulate-then-compare).

Work decomposition. Every layer ``l`` (columns ``[offsets[l], offsets[l + 1])`` of the flat query and bank) is cut
into chunks of ``chunk`` elements; one program handles one (layer, chunk) pair for every bank row it needs (all T
rows in the full form, row ``index[l]`` in the gathered form), so the query chunk is read from HBM once whatever T
is. A cached block table maps program ids to layers, so ragged layers of very different widths waste no programs.

Bytes in flight. A memory-bound kernel reaches the copy bandwidth only if enough loads are outstanding to cover the
memory latency (Little's law): about 3.35 TB/s x 0.7 us = 2.3 MB on an H100 (4.8 TB/s, 3.4 MB on an H200), i.e. 18 KB
per SM (25 KB on an H200). Each loop iteration issues all of its loads before the first use:

* gathered form: a (1, 4096) tile with 8 warps, 16 elements of q and of g per thread, four 16-byte loads each:
  128 B per thread, 32 KB per program (fp32); the fused running-mean update, which also reads the new sample and
  writes the mean, a (1, 2048) tile: 8 elements of q, x and g per thread, 96 B per thread, 24 KB per program;
* full form: a (4 rows, 1024) tile with 8 warps, 4 elements of q and 4 x 4 of g per thread (q read once for the 4
  rows): 80 B per thread, 20 KB per program;
* the previous design, a (1024,) tile with 4 warps and one row at a time: 64 B per thread, 8 KB per program, so
  more than two programs per SM had to be inside their load phase at any time, while each also spends a dependent
  chain of metadata loads (block table, layer offsets) and its final ticket outside it.

One program now covers the SM's latency on its own, and chunks of 4 tiles (16K elements gathered, 4K x 4 rows full)
amortise the metadata chain over 4x the bytes. Compiled for sm_80 and sm_90 every specialisation uses at most 128
registers and no local memory (no spills; tests/test_similarity.py checks the cubins). Small problems cut the chunk
so that at least 4 programs per SM exist.

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

# Tiles of one loop iteration (see "Bytes in flight" above): the gathered form reads one bank row, 4096 wide; the full
# form reads FULL_ROWS bank rows 1024 wide against one read of the query. 8 warps: 16 elements per thread either way.
GATHER_BLOCK = 4096
ACCUMULATE_BLOCK = 2048  # the fused running-mean update streams q, x and g and stores q: 3 x 8 elements per thread
FULL_BLOCK = 1024
FULL_ROWS = 4
NUM_WARPS = 8
# Tiles per program: 16K elements gathered gives 2.5K programs at the 7B shape (L, D) = (32, 1.25M), 19 per H100 SM;
# the full form at (T, L, D) = (16, 64, 32768) gets 512 programs of 16 rows x 4096. Fewer tiles when that would leave
# under MIN_PROGRAMS_PER_SM programs per SM. Not yet tuned on a GPU.
CHUNK_TILES = 4
MIN_PROGRAMS_PER_SM = 4
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
    ROWS: tl.constexpr,  # bank rows per tile (1 in the gathered form)
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

    lanes = tl.arange(0, ROWS)
    for r0 in range(0, num_rows, ROWS):
        rows = r0 + lanes
        rows_ok = rows < num_rows
        if GATHER:
            row_ptrs = bank_ptr + gathered_row * bank_stride + lanes[:, None]  # (1, 1); 64-bit row offset
        else:
            row_ptrs = bank_ptr + rows.to(tl.int64)[:, None] * bank_stride  # (ROWS, 1); T * S may exceed 2^31
        if METRIC == L1_NORMALIZED:
            row_norms = tl.load(norms_ptr + rows * num_layers + layer, mask=rows_ok, other=1.0)
            inv_g = (1.0 / tl.maximum(row_norms, EPS))[:, None]
        acc0 = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([ROWS, BLOCK], dtype=tl.float32)  # cosine: g·g
        acc_q = tl.zeros([BLOCK], dtype=tl.float32)  # sums of the query alone (cosine: q·q, norms: |q|)
        for i in range(0, chunk, BLOCK):
            offs = start + i + cols
            in_layer = offs < hi
            q = tl.load(query_ptr + offs, mask=in_layer, other=0.0).to(tl.float32)
            if ACCUMULATE:  # gathered form only: this loop runs once
                x = tl.load(sample_ptr + offs, mask=in_layer, other=0.0).to(tl.float32)
                q = q + (x - q) / n_obs
                tl.store(query_ptr + offs, q, mask=in_layer)
            if GATHER:
                g_mask = (in_layer & row_ok)[None, :]
            else:
                g_mask = rows_ok[:, None] & in_layer[None, :]
            g = tl.load(row_ptrs + offs[None, :], mask=g_mask, other=0.0).to(tl.float32)  # (ROWS, BLOCK)
            qb = q[None, :]
            if METRIC == DOT:
                acc0 += qb * g
            elif METRIC == L1:
                acc0 += tl.abs(qb - g)
            elif METRIC == SQEUCLIDEAN:
                d = qb - g
                acc0 += d * d
            elif METRIC == COSINE:
                acc0 += qb * g
                acc2 += g * g
                acc_q += q * q
            elif METRIC == NORMS:
                acc0 += tl.abs(g)
                acc_q += tl.abs(q)
            else:
                acc0 += tl.abs(qb * inv_q - g * inv_g)
        slots = partial_ptr + rows * num_programs + pid
        tl.store(slots, tl.sum(acc0, axis=1), mask=rows_ok)
        if METRIC == COSINE or METRIC == NORMS:
            q_sum = tl.sum(acc_q, axis=0) + tl.zeros([ROWS], dtype=tl.float32)
            tl.store(slots + num_rows * num_programs, q_sum, mask=rows_ok)
        if METRIC == COSINE:
            tl.store(slots + 2 * num_rows * num_programs, tl.sum(acc2, axis=1), mask=rows_ok)

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


@functools.lru_cache(maxsize=16)
def _min_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return MIN_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


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
    block = block or (FULL_BLOCK if not gather else ACCUMULATE_BLOCK if accumulate else GATHER_BLOCK)
    rows = 1 if gather else FULL_ROWS
    tiles = chunk_tiles or CHUNK_TILES
    offsets_dev, block_layer, first_block, num_programs = _block_table(offsets, block * tiles, device)
    while chunk_tiles is None and tiles > 1 and num_programs < _min_programs(device):
        tiles //= 2
        offsets_dev, block_layer, first_block, num_programs = _block_table(offsets, block * tiles, device)
    chunk = block * tiles
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
                ROWS=rows,
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
    chunk_tiles: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Full or gathered similarity (see :func:`treelora.ops.pairwise_similarity` for the contract; inputs validated).

    Args:
        query: (L, D), or (S,) with ``offsets``; fp32, fp16 or bf16.
        bank: (T, L, D), or (T, S) with ``offsets``; fp32, fp16 or bf16; rows may be strided.
        metric: one of ``METRIC_CODES``.
        index: optional (L,) int64/int32 device tensor: the gathered form.
        offsets: L + 1 host ints for the ragged layout.
        chunk_tiles, block: elements per program are ``chunk_tiles * block`` (tests shrink them to exercise the
            multi-program reduction on small inputs); None picks the form's tile and CHUNK_TILES.

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
    chunk_tiles: int | None = None,
    block: int | None = None,
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
