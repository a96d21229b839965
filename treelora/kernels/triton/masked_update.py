"""Triton kernels for sparse masked optimizer steps over many tensors at once (SPEC 3.3).

The semantics are those of :mod:`treelora.ops.masked_update` (read its docstring): unselected entries keep their
exact bits, moments included, because the kernels never store to them; bias correction uses the per-call ``step``
for every tensor.

Many tensors, one launch. The tensors of one dtype combination form a group; a pointer table (one row of int64
addresses per tensor: param, grad, moments, mask) is copied to the device once per distinct set of addresses and
cached (a training loop that reuses its buffers hits the cache every step; a miss is one pinned, asynchronous copy).
A block table, cached per list of sizes, maps each program to (tensor, block within it), so every program streams
``BLOCK`` entries of one tensor and tensors of any size share one grid. Stores are masked by the selection, and so
are the loads of params and moments: at density 1% most 32-byte sectors of p, m and v are never fetched.

Selections:
  * none / bool or uint8 masks: read in the update kernel (a null address in the table means "whole tensor");
  * int64 index lists: scattered into a zeroed byte mask first (one memset and one launch for all lists;
    duplicates write the same byte, so they count once; indices outside [0, numel) are ignored, since checking
    device values would synchronise the host);
  * ``density=ρ``: the k-th largest |g| per tensor (k = ceil(ρ·numel)) found by an exact radix select on the fp32
    bit pattern of |g| (non-negative floats order like their bits): three histogram passes over 11, 11 and 9 bits.
    In each pass every program adds its local histogram to the tensor's global one with integer atomics, and the
    last program of the tensor to arrive (a ticket from an arrival counter) picks the bucket holding the k-th
    largest key and narrows the prefix. The final prefix is exactly the k-th largest |g|; entries with |g| at or
    above it are selected (ties included), the reference's rule. No sort, no host synchronisation, and ρ = 1 skips
    the passes (the threshold would be the minimum).

Launches per dtype group: 1 update, +2 with index lists, +3 with ``density < 1``; each runs inside
:func:`treelora.kernels.env.device_guard` of the parameters' device.

Order of this file: constants → ``@triton.jit`` kernels → cached device metadata → launchers and the backend's entry
points (``masked_adamw_``, ``masked_sgd_``) → their ``*_not_supported_reasons``. Compile specs live in
``compile_specs.py``.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from treelora.kernels import env
from treelora.kernels.constants import topk_count

# Selection modes of the update kernels.
SELECT_ALL = tl.constexpr(0)
SELECT_MASK = tl.constexpr(1)
SELECT_THRESHOLD = tl.constexpr(2)

# 2048 entries per program with 4 warps: 16 per thread, i.e. four 16-byte loads of each fp32 stream in flight; about
# 20K programs for 40M parameters. Not yet tuned on a GPU.
BLOCK = 2048
NUM_WARPS = 4
# Radix select over the 31 value bits of a non-negative fp32 key, most significant digit first: (shift, bits).
RADIX_PASSES = ((20, 11), (9, 11), (0, 9))
MAX_BINS = 2048
# Above this density the update kernels load p, m and v unmasked (vectorised) and only mask the stores: a 32-byte
# sector holds 8 fp32 entries, so at ρ = 1/16 already 40% of the sectors hold a selected entry. Not yet tuned on a
# GPU.
_DENSE_LOAD_DENSITY = 1 / 16
# Pointer tables kept on the device (one per distinct list of addresses).
_POINTER_CACHE_SIZE = 32
# The radix select counts entries and ranks them in int32.
MAX_NUMEL = 2**31 - 1


# --- kernels ------------------------------------------------------------------------------------------------------


@triton.jit
def _program_slice(block_tensor_ptr, first_block_ptr, numel_ptr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """(tensor id, flat offsets of this program's entries, which of them exist) from the cached block table."""
    pid = tl.program_id(0)
    tid = tl.load(block_tensor_ptr + pid)
    offs = (pid - tl.load(first_block_ptr + tid)) * BLOCK + tl.arange(0, BLOCK)
    numel = tl.load(numel_ptr + tid)
    if ALIGNED:
        numel = tl.multiple_of(numel, 16)
    return tid, offs, offs < numel


@triton.jit
def _address(row_ptr, column, anchor_ptr, ALIGNED: tl.constexpr):
    """Pointer in ``column`` of a pointer-table row, typed like ``anchor_ptr``."""
    ptr = tl.load(row_ptr + column).to(anchor_ptr.dtype, bitcast=True)
    if ALIGNED:
        # Every address and size is a multiple of 16 (bytes and entries): the bounds mask covers whole 16-byte
        # vectors, so the compiler may vectorise the unselected-agnostic loads.
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _magnitude_key(g):
    """The fp32 bit pattern of |g| as int32: non-negative floats (and +inf, NaN above it) order like these ints.
    Clearing the sign bit instead of calling abs keeps subnormals intact even where float ops flush them."""
    return g.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _one_minus_exp(x):
    """1 - exp(x) for x <= 0 (a bias correction 1 - β^t = 1 - exp(t·ln β)) without the cancellation of 1 - exp near
    0: at β2 = 0.999, t = 1 the direct form loses 4 of fp32's 7 digits. Taylor series to x^9/9! for |x| < 0.5
    (truncation error below 3e-10 relative), 1 - exp(x) beyond (the result is then above 0.39)."""
    series = 1 / 40320 + x * (1 / 362880)
    series = 1 / 5040 + x * series
    series = 1 / 720 + x * series
    series = 1 / 120 + x * series
    series = 1 / 24 + x * series
    series = 1 / 6 + x * series
    series = 1 / 2 + x * series
    series = x * (1.0 + x * series)
    return tl.where(x > -0.5, -series, 1.0 - tl.exp(x))


@triton.jit
def _radix_pass_kernel(
    table_ptr,  # (n, TABLE_WIDTH) int64 addresses; the gradients' in column GRAD_COLUMN
    grad_anchor_ptr,  # any gradient of the group: gives the element type
    block_tensor_ptr,  # (P,) int64 tensor of each program
    first_block_ptr,  # (n + 1,) int64 first program of each tensor
    numel_ptr,  # (n,) int64
    k_ptr,  # (n,) int64 entries to select per tensor (first pass only)
    hist_ptr,  # (n, MAX_BINS) int32 histograms: zero before and after every launch
    counter_ptr,  # (n,) int32 arrival counters: zero before and after every launch
    state_ptr,  # (n, 2) int32 (key prefix found so far, rank still to find below it)
    TABLE_WIDTH: tl.constexpr,
    GRAD_COLUMN: tl.constexpr,
    SHIFT: tl.constexpr,
    BITS: tl.constexpr,
    FIRST: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_BINS: tl.constexpr,
):
    tid, offs, in_range = _program_slice(block_tensor_ptr, first_block_ptr, numel_ptr, BLOCK, ALIGNED)
    grad_ptr = _address(table_ptr + tid * TABLE_WIDTH, GRAD_COLUMN, grad_anchor_ptr, ALIGNED)
    key = _magnitude_key(tl.load(grad_ptr + offs, mask=in_range, other=0.0).to(tl.float32))
    if FIRST:
        prefix = tl.zeros([], dtype=tl.int32)
        remaining = tl.load(k_ptr + tid).to(tl.int32)
    else:
        prefix = tl.load(state_ptr + 2 * tid)
        remaining = tl.load(state_ptr + 2 * tid + 1)
    match = in_range & ((key >> (SHIFT + BITS)) == prefix)
    bins = tl.arange(0, 1 << BITS)
    local = tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), 1 << BITS, mask=match)
    row = hist_ptr + tid * MAX_BINS + bins
    tl.atomic_add(row, local, mask=local > 0, sem="relaxed", scope="gpu")

    # All of this program's histogram atomics precede its ticket (barrier + acq_rel), so the last program of the
    # tensor reads the complete histogram.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + tid, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.load(first_block_ptr + tid + 1) - tl.load(first_block_ptr + tid) - 1:
        counts = tl.load(row, cache_modifier=".cg")
        at_or_above = tl.cumsum(counts, 0, reverse=True)  # keys in this bucket or a higher one
        bucket = tl.sum((at_or_above >= remaining).to(tl.int32), axis=0) - 1
        above = tl.sum(tl.where(bins == bucket, at_or_above - counts, 0), axis=0)
        tl.store(state_ptr + 2 * tid, (prefix << BITS) | bucket)
        tl.store(state_ptr + 2 * tid + 1, remaining - above)
        tl.store(row, tl.zeros_like(counts))
        tl.store(counter_ptr + tid, 0)


@triton.jit
def _index_mask_kernel(
    index_table_ptr,  # (n,) int64 addresses of the index lists
    index_anchor_ptr,  # any index list: gives the element type (int64)
    block_list_ptr,  # (P,) int64 list of each program
    first_block_ptr,  # (n + 1,) int64
    length_ptr,  # (n,) int64 entries per list
    bound_ptr,  # (n,) int64 numel of the parameter each list indexes
    dest_ptr,  # (n,) int64 offset of each list's byte mask in scratch
    scratch_ptr,  # uint8 masks, zero on entry
    BLOCK: tl.constexpr,
):
    lst, offs, in_range = _program_slice(block_list_ptr, first_block_ptr, length_ptr, BLOCK, False)
    index_ptr = tl.load(index_table_ptr + lst).to(index_anchor_ptr.dtype, bitcast=True)
    idx = tl.load(index_ptr + offs, mask=in_range, other=0)
    ok = in_range & (idx >= 0) & (idx < tl.load(bound_ptr + lst))
    tl.store(scratch_ptr + tl.load(dest_ptr + lst) + idx, tl.full([BLOCK], 1, dtype=tl.uint8), mask=ok)


@triton.jit
def _selection(
    table_row_ptr,
    MASK_COLUMN: tl.constexpr,
    grad_ptr,
    state_ptr,
    tid,
    offs,
    in_range,
    SELECT: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """(selected entries, their fp32 gradient) for one program; g is loaded only where it can be selected."""
    selected = in_range
    if SELECT == SELECT_MASK:
        mask_addr = tl.load(table_row_ptr + MASK_COLUMN)
        mask_ptr = mask_addr.to(tl.pointer_type(tl.uint8), bitcast=True)
        if ALIGNED:
            mask_ptr = tl.multiple_of(mask_ptr, 16)
        flags = tl.load(mask_ptr + offs, mask=in_range & (mask_addr != 0), other=1)
        selected = in_range & (flags != 0)
    g = tl.load(grad_ptr + offs, mask=selected, other=0.0).to(tl.float32)
    if SELECT == SELECT_THRESHOLD:
        selected = in_range & (_magnitude_key(g) >= tl.load(state_ptr + 2 * tid))
    return selected, g


@triton.jit
def _masked_adamw_kernel(
    table_ptr,  # (n, 5) int64 addresses: param, grad, exp_avg, exp_avg_sq, mask (0 = whole tensor)
    param_anchor_ptr,  # the first tensor of each kind: gives the element types
    grad_anchor_ptr,
    exp_avg_anchor_ptr,
    exp_avg_sq_anchor_ptr,
    block_tensor_ptr,
    first_block_ptr,
    numel_ptr,
    state_ptr,  # (n, 2) int32: the threshold key of each tensor in column 0 (SELECT_THRESHOLD)
    step_ptr,  # the step on the device (STEP_ON_DEVICE)
    lr,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    decay,  # 1 - lr * weight_decay
    bias_correction1,  # 1 - beta1^step (host step)
    bias_correction2,
    log_beta1,  # ln beta1 (device step)
    log_beta2,
    SELECT: tl.constexpr,
    DENSE_LOADS: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tid, offs, in_range = _program_slice(block_tensor_ptr, first_block_ptr, numel_ptr, BLOCK, ALIGNED)
    row = table_ptr + tid * 5
    param_ptr = _address(row, 0, param_anchor_ptr, ALIGNED)
    grad_ptr = _address(row, 1, grad_anchor_ptr, ALIGNED)
    exp_avg_ptr = _address(row, 2, exp_avg_anchor_ptr, ALIGNED)
    exp_avg_sq_ptr = _address(row, 3, exp_avg_sq_anchor_ptr, ALIGNED)
    selected, g = _selection(row, 4, grad_ptr, state_ptr, tid, offs, in_range, SELECT, ALIGNED)

    # Loads masked by the selection fetch only the sectors holding selected entries (sparse selections); loads
    # masked by the bounds alone can be vectorised (dense selections). Stores are always masked by the selection.
    load_mask = in_range if DENSE_LOADS else selected
    p = tl.load(param_ptr + offs, mask=load_mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=load_mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=load_mask, other=0.0).to(tl.float32)
    if STEP_ON_DEVICE:
        step = tl.load(step_ptr).to(tl.float32)
        bc1 = _one_minus_exp(step * log_beta1)
        bc2 = _one_minus_exp(step * log_beta2)
    else:
        bc1 = bias_correction1
        bc2 = bias_correction2
    # The reference's order of operations, with IEEE division and square root.
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
    p = p * decay - tl.div_rn(lr * tl.div_rn(m, bc1), denom)
    tl.store(param_ptr + offs, p.to(param_anchor_ptr.dtype.element_ty), mask=selected)
    tl.store(exp_avg_ptr + offs, m.to(exp_avg_anchor_ptr.dtype.element_ty), mask=selected)
    tl.store(exp_avg_sq_ptr + offs, v.to(exp_avg_sq_anchor_ptr.dtype.element_ty), mask=selected)


@triton.jit
def _masked_sgd_kernel(
    table_ptr,  # (n, 4) int64 addresses: param, grad, momentum buffer (0 without momentum), mask (0 = whole tensor)
    param_anchor_ptr,
    grad_anchor_ptr,
    buffer_anchor_ptr,
    block_tensor_ptr,
    first_block_ptr,
    numel_ptr,
    state_ptr,
    lr,
    momentum,
    weight_decay,
    SELECT: tl.constexpr,
    DENSE_LOADS: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tid, offs, in_range = _program_slice(block_tensor_ptr, first_block_ptr, numel_ptr, BLOCK, ALIGNED)
    row = table_ptr + tid * 4
    param_ptr = _address(row, 0, param_anchor_ptr, ALIGNED)
    grad_ptr = _address(row, 1, grad_anchor_ptr, ALIGNED)
    selected, g = _selection(row, 3, grad_ptr, state_ptr, tid, offs, in_range, SELECT, ALIGNED)

    load_mask = in_range if DENSE_LOADS else selected
    p = tl.load(param_ptr + offs, mask=load_mask, other=0.0).to(tl.float32)
    d = g + weight_decay * p
    if HAS_MOMENTUM:
        buffer_ptr = _address(row, 2, buffer_anchor_ptr, ALIGNED)
        d = momentum * tl.load(buffer_ptr + offs, mask=load_mask, other=0.0).to(tl.float32) + d
        tl.store(buffer_ptr + offs, d.to(buffer_anchor_ptr.dtype.element_ty), mask=selected)
    tl.store(param_ptr + offs, (p - lr * d).to(param_anchor_ptr.dtype.element_ty), mask=selected)


# --- cached device metadata ---------------------------------------------------------------------------------------


def _stream_key(device: torch.device) -> tuple[torch.device, int]:
    return device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


_ZEROED: dict[tuple, torch.Tensor] = {}


def _zeroed_int32(name: str, numel: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 workspace that every launch leaves zeroed again, cached per device and stream, so a call needs
    no memset launch. Keyed by stream because launches on two streams may overlap."""
    key = (name, *_stream_key(device))
    buf = _ZEROED.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(max(numel, 4096), dtype=torch.int32, device=device)
        _ZEROED[key] = buf
    return buf


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)  # no host synchronisation, unlike a pageable copy
    return host


@functools.lru_cache(maxsize=64)
def _segments(lengths: tuple[int, ...], block: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Block table of a list of segments (tensors or index lists): program -> segment, segment -> first program,
    segment lengths; and the number of programs. Cached: the sizes of a model's parameters never change."""
    first = [0]
    for n in lengths:
        first.append(first[-1] + -(-n // block))
    owner = [s for s, n in enumerate(lengths) for _ in range(first[s + 1] - first[s])]
    return _to_device(owner, device), _to_device(first, device), _to_device(list(lengths), device), first[-1]


_POINTERS: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()


def _pointer_table(addresses: list[int], device: torch.device) -> torch.Tensor:
    """Device copy of a flat list of addresses, cached (LRU) by the addresses themselves."""
    key = (device, tuple(addresses))
    table = _POINTERS.get(key)
    if table is None:
        table = _to_device(addresses, device)
        _POINTERS[key] = table
        if len(_POINTERS) > _POINTER_CACHE_SIZE:
            _POINTERS.popitem(last=False)
    else:
        _POINTERS.move_to_end(key)
    return table


# --- launchers ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _k_table(numels: tuple[int, ...], density: float, device: torch.device) -> torch.Tensor:
    """Entries to select per tensor, k = ``topk_count(numel, density)``, on the device (cached per layout)."""
    return _to_device([topk_count(n, density) for n in numels], device)


def _radix_select(
    table: torch.Tensor,
    width: int,
    column: int,
    anchor: torch.Tensor,
    numels: tuple[int, ...],
    density: float,
    aligned: bool,
) -> torch.Tensor:
    """Radix-select state (n, 2) int32 whose column 0 is each tensor's threshold key (fp32 bits of the k-th largest
    |g|). Three launches; ``table`` rows hold the gradients' addresses in ``column``."""
    device = anchor.device
    n = len(numels)
    block_tensor, first_block, numel_dev, programs = _segments(numels, BLOCK, device)
    k = _k_table(numels, density, device)
    hist = _zeroed_int32("radix_hist", n * MAX_BINS, device)
    counters = _zeroed_int32("radix_counters", n, device)
    state = torch.empty(n, 2, dtype=torch.int32, device=device)
    for i, (shift, bits) in enumerate(RADIX_PASSES):
        _radix_pass_kernel[(programs,)](
            table,
            anchor,
            block_tensor,
            first_block,
            numel_dev,
            k,
            hist,
            counters,
            state,
            TABLE_WIDTH=width,
            GRAD_COLUMN=column,
            SHIFT=shift,
            BITS=bits,
            FIRST=i == 0,
            ALIGNED=aligned,
            BLOCK=BLOCK,
            MAX_BINS=MAX_BINS,
            num_warps=NUM_WARPS,
        )
    return state


def _is_aligned(addresses: list[int], numels: tuple[int, ...]) -> bool:
    return all(a % 16 == 0 for a in addresses) and all(n % 16 == 0 for n in numels)


def density_thresholds(grads: list[torch.Tensor], density: float) -> torch.Tensor:
    """The k-th largest |g| of each gradient (k = ceil(ρ·numel)), as fp32: what ``density`` selects against.

    Args:
        grads: non-empty list of non-empty contiguous tensors of one dtype on one device.
        density: ρ in (0, 1].

    Returns:
        (len(grads),) fp32 thresholds (exact: they are entries of |g|).
    """
    numels = tuple(g.numel() for g in grads)
    addresses = [g.data_ptr() for g in grads]
    table = _pointer_table(addresses, grads[0].device)
    with env.device_guard(grads[0].device):
        state = _radix_select(table, 1, 0, grads[0], numels, density, _is_aligned(addresses, numels))
    return state[:, 0].contiguous().view(torch.float32)


def _mask_addresses(params: list[torch.Tensor], masks: list, keep: list) -> list[int]:
    """Per tensor the address of a byte mask (0 = whole tensor); index lists are scattered into one zeroed scratch
    buffer by a single launch. Temporaries are appended to ``keep`` so they outlive the launches that read them."""
    addresses = [0] * len(params)
    lists = [(i, m) for i, m in enumerate(masks) if m is not None and m.dtype == torch.int64]
    for i, mask in enumerate(masks):
        if mask is not None and mask.dtype != torch.int64:
            mask = mask.contiguous()
            keep.append(mask)
            addresses[i] = mask.data_ptr()
    if not lists:
        return addresses
    device = params[0].device
    dest = [0]
    for i, _ in lists:
        dest.append(dest[-1] + params[i].numel())
    scratch = torch.zeros(dest[-1], dtype=torch.uint8, device=device)
    indices = [m.contiguous() for _, m in lists]
    keep.extend([scratch, *indices])
    block_list, first_block, length_dev, programs = _segments(tuple(m.numel() for m in indices), BLOCK, device)
    if programs:
        _index_mask_kernel[(programs,)](
            _pointer_table([m.data_ptr() for m in indices], device),
            indices[0],
            block_list,
            first_block,
            length_dev,
            _to_device([params[i].numel() for i, _ in lists], device),
            _to_device(dest[:-1], device),
            scratch,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    for (i, _), offset in zip(lists, dest):
        addresses[i] = scratch.data_ptr() + offset
    return addresses


class _Group:
    """One launch's worth of tensors (same dtypes): pointer table, block table, selection state and flags."""

    def __init__(self, idx: list[int], columns: list[list[torch.Tensor | None]], masks, density) -> None:
        params = [columns[0][i] for i in idx]
        device = params[0].device
        self.keep: list = []
        self.grads = [columns[1][i].contiguous() for i in idx]
        self.anchors = [params[0], self.grads[0]] + [
            col[idx[0]] if col[idx[0]] is not None else params[0] for col in columns[2:]
        ]
        rows = [[p.data_ptr() for p in params], [g.data_ptr() for g in self.grads]]
        rows += [[0 if col[i] is None else col[i].data_ptr() for i in idx] for col in columns[2:]]
        rows.append(
            _mask_addresses(params, [masks[i] for i in idx], self.keep) if masks is not None else [0] * len(idx)
        )
        addresses = [a for row in zip(*rows) for a in row]
        self.width = len(rows)
        self.numels = tuple(p.numel() for p in params)
        self.aligned = _is_aligned(addresses, self.numels)
        self.table = _pointer_table(addresses, device)
        self.block_tensor, self.first_block, self.numel_dev, self.programs = _segments(self.numels, BLOCK, device)
        if density is not None and density < 1.0:
            self.select = SELECT_THRESHOLD.value
            self.state = _radix_select(self.table, self.width, 1, self.grads[0], self.numels, density, self.aligned)
        else:
            # density 1 selects every entry (the threshold would be the smallest |g|): no select passes.
            self.select = SELECT_MASK.value if masks is not None else SELECT_ALL.value
            self.state = self.table
        self.dense_loads = self.select == SELECT_ALL.value or (
            self.select == SELECT_THRESHOLD.value and density > _DENSE_LOAD_DENSITY
        )


def _groups(columns: list[list[torch.Tensor | None]], masks, density) -> list[_Group]:
    """The non-empty tensors grouped by the dtypes of their row across ``columns`` (params first, grads second)."""
    by_dtype: dict[tuple, list[int]] = {}
    for i, p in enumerate(columns[0]):
        if p.numel():
            key = tuple(None if col[i] is None else col[i].dtype for col in columns)
            by_dtype.setdefault(key, []).append(i)
    return [_Group(idx, columns, masks, density) for idx in by_dtype.values()]


def masked_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: float | torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    masks: Sequence[torch.Tensor | None] | None = None,
    density: float | None = None,
) -> None:
    """Multi-tensor masked AdamW (the contract of :func:`treelora.ops.masked_adamw_`; inputs validated).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: equal-length lists of same-shape tensors (params and moments
            contiguous); one launch per combination of dtypes.
        step: 1-based step number, or a 1-element tensor (read by the kernel on the params' device).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (decoupled weight decay).
        masks: per-tensor bool/uint8 masks, int64 index lists or None; or None for all entries.
        density: top-ρ fraction by |grad| per tensor, instead of masks.
    """
    beta1, beta2 = betas
    step_on_device = isinstance(step, torch.Tensor) and step.device == params[0].device
    step_value = 1.0 if step_on_device else float(step)
    with env.device_guard(params[0].device):
        for group in _groups([params, grads, exp_avgs, exp_avg_sqs], masks, density):
            _masked_adamw_kernel[(group.programs,)](
                group.table,
                *group.anchors,
                group.block_tensor,
                group.first_block,
                group.numel_dev,
                group.state,
                step if step_on_device else group.table,
                lr,
                beta1,
                beta2,
                1.0 - beta1,
                1.0 - beta2,
                eps,
                1.0 - lr * weight_decay,
                1.0 - beta1**step_value,
                1.0 - beta2**step_value,
                math.log(beta1) if beta1 > 0 else -math.inf,
                math.log(beta2) if beta2 > 0 else -math.inf,
                SELECT=group.select,
                DENSE_LOADS=group.dense_loads,
                STEP_ON_DEVICE=step_on_device,
                ALIGNED=group.aligned,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )


def masked_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor | None] | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    masks: Sequence[torch.Tensor | None] | None = None,
    density: float | None = None,
) -> None:
    """Multi-tensor masked SGD (the contract of :func:`treelora.ops.masked_sgd_`; inputs validated).

    Args:
        params, grads: equal-length lists of same-shape tensors (params contiguous).
        momentum_buffers: contiguous buffers when ``momentum != 0`` (ignored otherwise; may be None).
        lr, momentum, weight_decay: ``torch.optim.SGD``'s (coupled weight decay, no dampening, no Nesterov).
        masks, density: as in :func:`masked_adamw_`.
    """
    has_momentum = momentum != 0.0
    buffers = list(momentum_buffers) if has_momentum else [None] * len(params)
    with env.device_guard(params[0].device):
        for group in _groups([params, grads, buffers], masks, density):
            _masked_sgd_kernel[(group.programs,)](
                group.table,
                *group.anchors,
                group.block_tensor,
                group.first_block,
                group.numel_dev,
                group.state,
                lr,
                momentum,
                weight_decay,
                SELECT=group.select,
                DENSE_LOADS=group.dense_loads,
                HAS_MOMENTUM=has_momentum,
                ALIGNED=group.aligned,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )


def _reasons(named: env.Named, states: env.Named) -> list[str]:
    """Devices, dtypes and sizes of every list; contiguity of the optimizer states updated in place."""
    why = env.triton_device_reasons(named[:1]) + env.dtype_reasons("triton kernels", (*named, *states))
    for name, tensors in (*named, *states):
        big = next((i for i, t in enumerate(tensors) if t is not None and t.numel() > MAX_NUMEL), None)
        if big is not None:
            why.append(f"{name}[{big}] has {tensors[big].numel()} entries; the triton kernels take at most {MAX_NUMEL}")
    for name, tensors in states:
        strided = next((i for i, t in enumerate(tensors) if t is not None and not t.is_contiguous()), None)
        if strided is not None:
            why.append(f"{name}[{strided}] is not contiguous (it is updated in place through flat indices)")
    return why


def masked_adamw_not_supported_reasons(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: float | torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    masks: Sequence[torch.Tensor | None] | None = None,
    density: float | None = None,
) -> list[str]:
    """Why these (validated) inputs cannot run here; empty when they can."""
    return _reasons((("params", params), ("grads", grads)), (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)))


def masked_sgd_not_supported_reasons(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor | None] | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    masks: Sequence[torch.Tensor | None] | None = None,
    density: float | None = None,
) -> list[str]:
    """Why these (validated) inputs cannot run here; empty when they can (the buffers count only with momentum)."""
    states = (("momentum_buffers", momentum_buffers),) if momentum != 0.0 else ()
    return _reasons((("params", params), ("grads", grads)), states)
