"""Triton kernels for sparse masked optimizer steps over many tensors at once (SPEC 3.3).

The semantics are those of :mod:`treelora.ops.masked_update` (read its docstring): unselected entries keep their
exact bits, moments included, because the kernels never store to them; bias correction uses the per-call ``step``
for every tensor.

Many tensors, one launch. The tensors of one dtype combination form a group; a pointer table (one row of int64
addresses per tensor: param, grad, two optimizer states, mask) is copied to the device once per distinct set of
addresses and cached (a training loop that reuses its buffers hits the cache every step; a miss is one pinned,
asynchronous copy). A block table, cached per list of sizes, maps each program to (tensor, block within it), so every
program streams ``BLOCK`` entries of one tensor and tensors of any size share one grid.

Selections:
  * none / bool or uint8 masks: read in the update kernel (a null address in the table means "whole tensor"); one
    launch, p, g, m, v loaded with 16-byte vectors and stored where selected;
  * int64 index lists: scattered into a zeroed byte mask first (one memset and one launch for all lists;
    duplicates write the same byte, so they count once; indices outside [0, numel) are ignored, since checking
    device values would synchronise the host);
  * ``density=ρ``: the exact k-th largest |g| per tensor (k = ceil(ρ·numel)), found by a radix select on the fp32
    bit pattern of |g| (non-negative floats, then +inf, then NaN, order like these 31-bit keys), compacted after the
    first pass:

    1. ``_radix_pass_kernel``, every entry: a 512-bin histogram of the key's top 9 bits (exponent and one mantissa
       bit, so a bin spans a factor of sqrt(2) or less). Programs add their local histogram to the tensor's with
       integer atomics; the tensor's last program to arrive (a ticket from an arrival counter) picks the bin ``b``
       holding the k-th largest key and the rank still to find inside it.
    2. ``_masked_adamw_kernel`` / ``_masked_sgd_kernel`` in digit mode, every entry: entries above bin ``b`` are
       selected for certain and updated now; entries in bin ``b`` (the candidates: 2-9% of a normal-like tensor at
       ρ = 1%) are appended, key and index, to the tensor's candidate list (a block-wide prefix sum and one atomic
       per program); everything below is never touched again.
    3. ``_candidate_pass_kernel`` x 3, candidates only: 256-, 128- and 128-bin histograms of the remaining 22 bits
       narrow the prefix to the exact k-th largest key.
    4. ``_candidate_update_kernel``, candidates only: those at or above it are updated (ties included, the rule).

    A list holds up to 1/8 of its tensor (CANDIDATE_SHARE); if bin ``b`` holds more (|g| spread over less than a
    factor of sqrt(2) around the threshold), steps 3-4 read that tensor's gradient again instead of its list, so
    the result never depends on the capacity. No sort, no host synchronisation; ρ = 1 skips the select (the
    threshold would be the smallest |g|).

Byte and launch model (fp32 p, g, m, v; per parameter; 7B-model LoRA adapters, r = 16: 40M parameters, 448 tensors):

  * dense fused AdamW (torch's, and this module at ρ = 1): reads p, g, m, v and writes p, m, v: 28 B, 1 launch.
  * this module at ρ = 0.01: step 1 reads g (4 B), step 2 reads g again (4 B) and writes candidates (8 B x c,
    c = 2-9%: up to 0.7 B), steps 3-4 read the candidate keys four times and the indices once (up to 1.8 B), and
    the ~1% selected entries cost one 32-byte sector of each of g, p, m, v read and p, m, v written (7 x 32 B x 1%
    = 2.2 B, sectors shared by neighbours only by chance at this density): 8 B + 2.2 B + 0.4-2.5 B = 10.6-12.7 B,
    6 launches (~20 us of launch latency in all, against ~370 us for the dense 40M-parameter step on an H100).
  * the previous design at ρ = 0.01: three 2048-bin radix passes over every entry plus the update pass (16 B + 2.2 B
    = 18.2 B, 4 launches), whose 2048-bin histograms (11 ballots and 64 bins per lane in triton's warp-level
    lowering, per register of keys) made it compute-bound; 512 bins over every entry cost 9 ballots and 16 bins per
    lane, and the 256/128-bin passes run over the candidates only.

Order of this file: constants → ``@triton.jit`` kernels → cached device metadata → launchers and the backend's entry
points (``masked_adamw_``, ``masked_sgd_``, ``density_thresholds``) → their ``*_not_supported_reasons``. Compile
specs live in ``compile_specs.py``. Every launch runs inside :func:`treelora.kernels.env.device_guard` of the
parameters' device.
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
SELECT_DIGIT = tl.constexpr(2)  # density, step 2: above the first digit's bin: update; in it: compact
# Update rules of the candidate kernel.
RULE_ADAMW = tl.constexpr(0)
RULE_SGD = tl.constexpr(1)

# 2048 entries per program with 4 warps: 16 per thread, i.e. four 16-byte loads of each fp32 stream in flight; about
# 20K programs for 40M parameters. Not yet tuned on a GPU.
BLOCK = 2048
NUM_WARPS = 4
# The candidate update gathers p, g, m, v through 64-bit pointers per entry: 8 warps (8 entries per thread) keep it
# near 110 registers where 4 warps need 210.
CANDIDATE_UPDATE_WARPS = 8
# Radix digits of the 31-bit key, most significant first, as (shift, bits): the first over every entry, the others
# over the candidates of the first digit's bin.
FIRST_DIGIT = (22, 9)
CANDIDATE_PASSES = ((14, 8), (7, 7), (0, 7))
MAX_BINS = 512
# A tensor's candidate list holds up to numel / CANDIDATE_SHARE entries (at least one block): 1 B of scratch per fp32
# parameter (int32 key and index), and room for the 2-9% a normal-like |g| puts into a sqrt(2)-wide bin at ρ = 1%.
CANDIDATE_SHARE = 8
# Table row: param, grad, state0 (exp_avg / momentum buffer), state1 (exp_avg_sq), mask; the select state per tensor:
# key prefix found so far, rank still to find below it, candidates found (step 2's atomic counter).
TABLE_WIDTH = tl.constexpr(5)
STATE_WIDTH = tl.constexpr(4)
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
def _bias_corrections(step_ptr, bias_correction1, bias_correction2, log_beta1, log_beta2, STEP_ON_DEVICE: tl.constexpr):
    if STEP_ON_DEVICE:
        step = tl.load(step_ptr).to(tl.float32)
        return _one_minus_exp(step * log_beta1), _one_minus_exp(step * log_beta2)
    return bias_correction1, bias_correction2


@triton.jit
def _adamw_rmw(
    param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, load_mask, selected, g, lr, beta1, beta2, one_minus_beta1,
    one_minus_beta2, eps, decay, bc1, bc2,
):  # fmt: skip
    """AdamW read-modify-write of the ``selected`` entries at ``offs`` (loads masked by ``load_mask``), with the
    reference's order of operations, IEEE division and square root."""
    p = tl.load(param_ptr + offs, mask=load_mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=load_mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=load_mask, other=0.0).to(tl.float32)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
    p = p * decay - tl.div_rn(lr * tl.div_rn(m, bc1), denom)
    tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=selected)
    tl.store(exp_avg_ptr + offs, m.to(exp_avg_ptr.dtype.element_ty), mask=selected)
    tl.store(exp_avg_sq_ptr + offs, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=selected)


@triton.jit
def _sgd_rmw(
    param_ptr, buffer_ptr, offs, load_mask, selected, g, lr, momentum, weight_decay, HAS_MOMENTUM: tl.constexpr
):
    """SGD read-modify-write (coupled weight decay, momentum without dampening) of the ``selected`` entries."""
    p = tl.load(param_ptr + offs, mask=load_mask, other=0.0).to(tl.float32)
    d = g + weight_decay * p
    if HAS_MOMENTUM:
        d = momentum * tl.load(buffer_ptr + offs, mask=load_mask, other=0.0).to(tl.float32) + d
        tl.store(buffer_ptr + offs, d.to(buffer_ptr.dtype.element_ty), mask=selected)
    tl.store(param_ptr + offs, (p - lr * d).to(param_ptr.dtype.element_ty), mask=selected)


@triton.jit
def _close_pass(row, counts, bins, state_ptr, prefix, remaining, found, BITS: tl.constexpr):
    """Run by the last program of a tensor: the bin holding the rank-``remaining`` largest key of the histogram
    ``counts`` extends the prefix; the histogram row is cleared for the next launch."""
    at_or_above = tl.cumsum(counts, 0, reverse=True)  # keys in this bin or a higher one
    bucket = tl.sum((at_or_above >= remaining).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(bins == bucket, at_or_above - counts, 0), axis=0)
    tl.store(state_ptr, (prefix << BITS) | bucket)
    tl.store(state_ptr + 1, remaining - above)
    tl.store(state_ptr + 2, found)
    tl.store(row, tl.zeros_like(counts))


@triton.jit
def _radix_pass_kernel(
    table_ptr,  # (n, TABLE_WIDTH) int64 addresses; the gradients' in column GRAD_COLUMN
    grad_anchor_ptr,  # any gradient of the group: gives the element type
    block_tensor_ptr,  # (P,) int64 tensor of each program
    first_block_ptr,  # (n + 1,) int64 first program of each tensor
    numel_ptr,  # (n,) int64
    k_ptr,  # (n,) int64 entries to select per tensor
    hist_ptr,  # (n, MAX_BINS) int32 histograms: zero before and after every launch
    counter_ptr,  # (n,) int32 arrival counters: zero before and after every launch
    state_ptr,  # (n, STATE_WIDTH) int32 select state, written here
    TABLE_WIDTH: tl.constexpr,
    GRAD_COLUMN: tl.constexpr,
    SHIFT: tl.constexpr,
    BITS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_BINS: tl.constexpr,
):
    """Step 1: the histogram of every entry's first digit; the last program leaves (bin, rank in it, 0 candidates)."""
    tid, offs, in_range = _program_slice(block_tensor_ptr, first_block_ptr, numel_ptr, BLOCK, ALIGNED)
    grad_ptr = _address(table_ptr + tid * TABLE_WIDTH, GRAD_COLUMN, grad_anchor_ptr, ALIGNED)
    key = _magnitude_key(tl.load(grad_ptr + offs, mask=in_range, other=0.0).to(tl.float32))
    bins = tl.arange(0, 1 << BITS)
    local = tl.histogram(key >> SHIFT, 1 << BITS, mask=in_range)
    row = hist_ptr + tid * MAX_BINS + bins
    tl.atomic_add(row, local, mask=local > 0, sem="relaxed", scope="gpu")
    # All of this program's histogram atomics precede its ticket (barrier + acq_rel), so the last program of the
    # tensor reads the complete histogram.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + tid, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.load(first_block_ptr + tid + 1) - tl.load(first_block_ptr + tid) - 1:
        counts = tl.load(row, cache_modifier=".cg")
        remaining = tl.load(k_ptr + tid).to(tl.int32)
        _close_pass(row, counts, bins, state_ptr + tid * STATE_WIDTH, 0, remaining, 0, BITS)
        tl.store(counter_ptr + tid, 0)


@triton.jit
def _digit_selection(grad_ptr, state_ptr, keys_ptr, index_ptr, list_base_ptr, capacity_ptr, tid, offs, in_range,
                     FIRST_SHIFT: tl.constexpr):  # fmt: skip
    """Step 2 for one program: (entries above the first digit's bin, their fp32 g); the entries in the bin are
    appended to the tensor's candidate list."""
    g = tl.load(grad_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    key = _magnitude_key(g)
    digit = key >> FIRST_SHIFT
    bin_ = tl.load(state_ptr + tid * STATE_WIDTH)
    candidate = in_range & (digit == bin_)
    flags = candidate.to(tl.int32)
    found = tl.sum(flags, axis=0)
    if found > 0:
        first = tl.atomic_add(state_ptr + tid * STATE_WIDTH + 2, found, sem="relaxed", scope="gpu")
        slot = first + tl.cumsum(flags, 0) - 1
        keep = candidate & (slot < tl.load(capacity_ptr + tid))
        base = tl.load(list_base_ptr + tid)
        tl.store(keys_ptr + base + slot, key, mask=keep)
        tl.store(index_ptr + base + slot, offs.to(tl.int32), mask=keep)
    return in_range & (digit > bin_), g


@triton.jit
def _digit_compaction_kernel(
    table_ptr,
    grad_anchor_ptr,
    block_tensor_ptr,
    first_block_ptr,
    numel_ptr,
    state_ptr,
    keys_ptr,
    index_ptr,
    list_base_ptr,
    capacity_ptr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    FIRST_SHIFT: tl.constexpr,
):
    """Step 2 without an update (:func:`density_thresholds`): the candidates are listed, nothing is written."""
    tid, offs, in_range = _program_slice(block_tensor_ptr, first_block_ptr, numel_ptr, BLOCK, ALIGNED)
    grad_ptr = _address(table_ptr + tid * TABLE_WIDTH, 1, grad_anchor_ptr, ALIGNED)
    _digit_selection(
        grad_ptr, state_ptr, keys_ptr, index_ptr, list_base_ptr, capacity_ptr, tid, offs, in_range, FIRST_SHIFT
    )


@triton.jit
def _selection(row, MASK_COLUMN: tl.constexpr, grad_ptr, offs, in_range, SELECT: tl.constexpr, ALIGNED: tl.constexpr):
    """(selected entries, their fp32 gradient) for the whole-tensor and mask modes; g is loaded only where
    selected."""
    selected = in_range
    if SELECT == SELECT_MASK:
        mask_addr = tl.load(row + MASK_COLUMN)
        mask_ptr = mask_addr.to(tl.pointer_type(tl.uint8), bitcast=True)
        if ALIGNED:
            mask_ptr = tl.multiple_of(mask_ptr, 16)
        flags = tl.load(mask_ptr + offs, mask=in_range & (mask_addr != 0), other=1)
        selected = in_range & (flags != 0)
    g = tl.load(grad_ptr + offs, mask=selected, other=0.0).to(tl.float32)
    return selected, g


@triton.jit
def _masked_adamw_kernel(
    table_ptr,  # (n, TABLE_WIDTH) int64 addresses: param, grad, exp_avg, exp_avg_sq, mask (0 = whole tensor)
    param_anchor_ptr,  # the first tensor of each kind: gives the element types
    grad_anchor_ptr,
    exp_avg_anchor_ptr,
    exp_avg_sq_anchor_ptr,
    block_tensor_ptr,
    first_block_ptr,
    numel_ptr,
    state_ptr,  # (n, STATE_WIDTH) int32 select state (SELECT_DIGIT)
    keys_ptr,  # int32 candidate keys and flat indices, tensor i's list at list_base[i] (SELECT_DIGIT)
    index_ptr,
    list_base_ptr,  # (n,) int64
    capacity_ptr,  # (n,) int64 entries each list holds
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
    FIRST_SHIFT: tl.constexpr,
):
    tid, offs, in_range = _program_slice(block_tensor_ptr, first_block_ptr, numel_ptr, BLOCK, ALIGNED)
    row = table_ptr + tid * TABLE_WIDTH
    param_ptr = _address(row, 0, param_anchor_ptr, ALIGNED)
    grad_ptr = _address(row, 1, grad_anchor_ptr, ALIGNED)
    exp_avg_ptr = _address(row, 2, exp_avg_anchor_ptr, ALIGNED)
    exp_avg_sq_ptr = _address(row, 3, exp_avg_sq_anchor_ptr, ALIGNED)
    if SELECT == SELECT_DIGIT:
        selected, g = _digit_selection(
            grad_ptr, state_ptr, keys_ptr, index_ptr, list_base_ptr, capacity_ptr, tid, offs, in_range,
            FIRST_SHIFT,
        )  # fmt: skip
    else:
        selected, g = _selection(row, 4, grad_ptr, offs, in_range, SELECT, ALIGNED)
    bc1, bc2 = _bias_corrections(step_ptr, bias_correction1, bias_correction2, log_beta1, log_beta2, STEP_ON_DEVICE)
    # Loads masked by the selection fetch only the sectors holding selected entries (sparse selections); loads
    # masked by the bounds alone can be vectorised (dense selections). Stores are always masked by the selection.
    load_mask = in_range if DENSE_LOADS else selected
    _adamw_rmw(
        param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, load_mask, selected, g, lr, beta1, beta2, one_minus_beta1,
        one_minus_beta2, eps, decay, bc1, bc2,
    )  # fmt: skip


@triton.jit
def _masked_sgd_kernel(
    table_ptr,  # (n, TABLE_WIDTH) int64 addresses: param, grad, momentum buffer (0 without momentum), -, mask
    param_anchor_ptr,
    grad_anchor_ptr,
    buffer_anchor_ptr,
    block_tensor_ptr,
    first_block_ptr,
    numel_ptr,
    state_ptr,
    keys_ptr,
    index_ptr,
    list_base_ptr,
    capacity_ptr,
    lr,
    momentum,
    weight_decay,
    SELECT: tl.constexpr,
    DENSE_LOADS: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    FIRST_SHIFT: tl.constexpr,
):
    tid, offs, in_range = _program_slice(block_tensor_ptr, first_block_ptr, numel_ptr, BLOCK, ALIGNED)
    row = table_ptr + tid * TABLE_WIDTH
    param_ptr = _address(row, 0, param_anchor_ptr, ALIGNED)
    grad_ptr = _address(row, 1, grad_anchor_ptr, ALIGNED)
    buffer_ptr = _address(row, 2, buffer_anchor_ptr, ALIGNED)
    if SELECT == SELECT_DIGIT:
        selected, g = _digit_selection(
            grad_ptr, state_ptr, keys_ptr, index_ptr, list_base_ptr, capacity_ptr, tid, offs, in_range,
            FIRST_SHIFT,
        )  # fmt: skip
    else:
        selected, g = _selection(row, 4, grad_ptr, offs, in_range, SELECT, ALIGNED)
    load_mask = in_range if DENSE_LOADS else selected
    _sgd_rmw(param_ptr, buffer_ptr, offs, load_mask, selected, g, lr, momentum, weight_decay, HAS_MOMENTUM)


@triton.jit
def _candidate_slice(block_tensor_ptr, first_block_ptr, state_ptr, capacity_ptr):
    """(tensor, this program's rank among the tensor's, the tensor's program count, its state row, whether its
    candidates overflowed the list) for the candidate kernels."""
    pid = tl.program_id(0)
    tid = tl.load(block_tensor_ptr + pid)
    first = tl.load(first_block_ptr + tid)
    programs = tl.load(first_block_ptr + tid + 1) - first
    state = state_ptr + tid * STATE_WIDTH
    return tid, pid - first, programs, state, tl.load(state + 2) > tl.load(capacity_ptr + tid)


@triton.jit
def _candidate_pass_kernel(
    table_ptr,
    grad_anchor_ptr,
    block_tensor_ptr,  # (P,) int64 tensor of each program, P = sum of capacity / BLOCK
    first_block_ptr,  # (n + 1,) int64
    numel_ptr,
    state_ptr,
    keys_ptr,
    list_base_ptr,
    capacity_ptr,
    hist_ptr,
    counter_ptr,
    TABLE_WIDTH: tl.constexpr,
    GRAD_COLUMN: tl.constexpr,
    SHIFT: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_BINS: tl.constexpr,
):
    """Step 3: one radix digit over the candidates (program j reads block j of the list) or, for a tensor whose list
    overflowed, over its gradient (program j reads blocks j, j + P_t, ... and keeps the keys under the prefix)."""
    tid, j, programs, state, overflowed = _candidate_slice(block_tensor_ptr, first_block_ptr, state_ptr, capacity_ptr)
    prefix = tl.load(state)
    remaining = tl.load(state + 1)
    found = tl.load(state + 2)
    bins = tl.arange(0, 1 << BITS)
    local = tl.zeros([1 << BITS], dtype=tl.int32)
    if overflowed:
        grad_ptr = _address(table_ptr + tid * TABLE_WIDTH, GRAD_COLUMN, grad_anchor_ptr, False)
        numel = tl.load(numel_ptr + tid)
        for start in range(j * BLOCK, numel, programs * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            key = _magnitude_key(tl.load(grad_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32))
            match = (offs < numel) & ((key >> (SHIFT + BITS)) == prefix)
            local += tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), 1 << BITS, mask=match)
    else:
        slot = j * BLOCK + tl.arange(0, BLOCK)
        listed = slot < found
        key = tl.load(keys_ptr + tl.load(list_base_ptr + tid) + slot, mask=listed, other=0)
        match = listed & ((key >> (SHIFT + BITS)) == prefix)
        local += tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), 1 << BITS, mask=match)
    row = hist_ptr + tid * MAX_BINS + bins
    tl.atomic_add(row, local, mask=local > 0, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + tid, 1, sem="acq_rel", scope="gpu")
    if ticket == programs - 1:
        counts = tl.load(row, cache_modifier=".cg")
        _close_pass(row, counts, bins, state, prefix, remaining, found, BITS)
        tl.store(counter_ptr + tid, 0)


@triton.jit
def _candidate_update_kernel(
    table_ptr,
    param_anchor_ptr,
    grad_anchor_ptr,
    state0_anchor_ptr,
    state1_anchor_ptr,
    block_tensor_ptr,
    first_block_ptr,
    numel_ptr,
    state_ptr,  # column 0: the exact threshold key (step 3 done)
    keys_ptr,
    index_ptr,
    list_base_ptr,
    capacity_ptr,
    step_ptr,
    lr,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    decay,
    bias_correction1,
    bias_correction2,
    log_beta1,
    log_beta2,
    momentum,
    weight_decay,
    RULE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
    FIRST_SHIFT: tl.constexpr,
):
    """Step 4: the candidates at or above the threshold key (ties included) are updated; the entries above the
    first digit's bin were updated by step 2."""
    tid, j, programs, state, overflowed = _candidate_slice(block_tensor_ptr, first_block_ptr, state_ptr, capacity_ptr)
    threshold = tl.load(state)
    row = table_ptr + tid * TABLE_WIDTH
    param_ptr = _address(row, 0, param_anchor_ptr, False)
    grad_ptr = _address(row, 1, grad_anchor_ptr, False)
    state0_ptr = _address(row, 2, state0_anchor_ptr, False)
    state1_ptr = _address(row, 3, state1_anchor_ptr, False)
    bc1, bc2 = _bias_corrections(step_ptr, bias_correction1, bias_correction2, log_beta1, log_beta2, STEP_ON_DEVICE)
    if overflowed:
        numel = tl.load(numel_ptr + tid)
        stride = programs * BLOCK
    else:
        numel = tl.load(state + 2).to(tl.int64)  # the list's length
        stride = numel + BLOCK  # one block per program
    for start in range(j * BLOCK, numel, stride):
        pos = start + tl.arange(0, BLOCK)
        inside = pos < numel
        if overflowed:
            offs = pos
            key = _magnitude_key(tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32))
            inside = inside & ((key >> FIRST_SHIFT) == (threshold >> FIRST_SHIFT))
        else:
            base = tl.load(list_base_ptr + tid)
            key = tl.load(keys_ptr + base + pos, mask=inside, other=0)
            offs = tl.load(index_ptr + base + pos, mask=inside, other=0).to(tl.int64)
        selected = inside & (key >= threshold)
        g = tl.load(grad_ptr + offs, mask=selected, other=0.0).to(tl.float32)
        if RULE == RULE_ADAMW:
            _adamw_rmw(
                param_ptr, state0_ptr, state1_ptr, offs, selected, selected, g, lr, beta1, beta2, one_minus_beta1,
                one_minus_beta2, eps, decay, bc1, bc2,
            )  # fmt: skip
        else:
            _sgd_rmw(param_ptr, state0_ptr, offs, selected, selected, g, lr, momentum, weight_decay, HAS_MOMENTUM)


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


# --- cached device metadata ---------------------------------------------------------------------------------------


def _stream_key(device: torch.device) -> tuple[torch.device, int]:
    return device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


_ZEROED: dict[tuple, torch.Tensor] = {}
_SCRATCH: dict[tuple, torch.Tensor] = {}


def _zeroed_int32(name: str, numel: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 workspace that every launch leaves zeroed again, cached per device and stream, so a call needs
    no memset launch. Keyed by stream because launches on two streams may overlap."""
    key = (name, *_stream_key(device))
    buf = _ZEROED.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(max(numel, 4096), dtype=torch.int32, device=device)
        _ZEROED[key] = buf
    return buf


def _scratch_int32(name: str, numel: int, device: torch.device) -> torch.Tensor:
    """An int32 workspace whose contents do not matter between calls (the candidate lists), cached per device and
    stream and grown as needed."""
    key = (name, *_stream_key(device))
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 4096), dtype=torch.int32, device=device)
        _SCRATCH[key] = buf
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


def _capacity(numel: int) -> int:
    """Entries a tensor's candidate list holds: numel / CANDIDATE_SHARE rounded up to whole blocks (at least one)."""
    return max(1, -(-numel // (CANDIDATE_SHARE * BLOCK))) * BLOCK


@functools.lru_cache(maxsize=64)
def _candidate_layout(numels: tuple[int, ...], device: torch.device) -> tuple:
    """Candidate lists of a layout: each list's offset and capacity, the block table of the candidate kernels
    (capacity / BLOCK programs per tensor) and the total capacity."""
    capacities = [_capacity(n) for n in numels]
    bases = [0]
    for c in capacities:
        bases.append(bases[-1] + c)
    block_tensor, first_block, capacity_dev, programs = _segments(tuple(capacities), BLOCK, device)
    return _to_device(bases[:-1], device), capacity_dev, block_tensor, first_block, programs, bases[-1]


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


def _is_aligned(addresses: list[int], numels: tuple[int, ...]) -> bool:
    return all(a % 16 == 0 for a in addresses) and all(n % 16 == 0 for n in numels)


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
    """One launch's worth of tensors (same dtypes): pointer table, block table, selection state and flags. With a
    density below 1 it runs steps 1 (first digit) and leaves ``select == SELECT_DIGIT`` for the update launch;
    :meth:`finish_select` runs step 3 after it."""

    def __init__(
        self, idx: list[int], columns: list[list[torch.Tensor | None]], masks, density, select_at_one: bool = False
    ) -> None:
        params = [columns[0][i] for i in idx]
        device = params[0].device
        self.device = device
        self.keep: list = []
        self.grads = [columns[1][i].contiguous() for i in idx]
        self.anchors = [params[0], self.grads[0]] + [
            col[idx[0]] if col[idx[0]] is not None else params[0] for col in columns[2:]
        ]
        rows = [[p.data_ptr() for p in params], [g.data_ptr() for g in self.grads]]
        rows += [[0 if col[i] is None else col[i].data_ptr() for i in idx] for col in columns[2:]]
        rows += [[0] * len(idx)] * (TABLE_WIDTH.value - 1 - len(rows))
        rows.append(
            _mask_addresses(params, [masks[i] for i in idx], self.keep) if masks is not None else [0] * len(idx)
        )
        addresses = [a for row in zip(*rows) for a in row]
        self.numels = tuple(p.numel() for p in params)
        self.aligned = _is_aligned(addresses, self.numels)
        self.table = _pointer_table(addresses, device)
        self.block_tensor, self.first_block, self.numel_dev, self.programs = _segments(self.numels, BLOCK, device)
        self.state = self.table  # a placeholder pointer where no select runs
        self.lists = (self.table, self.table, self.table, self.table)
        if density is not None and (density < 1.0 or select_at_one):
            self.select = SELECT_DIGIT.value
            self._start_select(density)
        else:
            # density 1 selects every entry (the threshold would be the smallest |g|): no select passes.
            self.select = SELECT_MASK.value if masks is not None else SELECT_ALL.value
        self.dense_loads = self.select == SELECT_ALL.value or (
            self.select == SELECT_DIGIT.value and density > _DENSE_LOAD_DENSITY
        )

    def _start_select(self, density: float) -> None:
        """Step 1: the first digit's histogram and bin per tensor."""
        n = len(self.numels)
        bases, capacities, self.cblock_tensor, self.cfirst_block, self.cprograms, total = _candidate_layout(
            self.numels, self.device
        )
        keys = _scratch_int32("candidate_keys", total, self.device)
        index = _scratch_int32("candidate_index", total, self.device)
        self.lists = (keys, index, bases, capacities)
        self.hist = _zeroed_int32("radix_hist", n * MAX_BINS, self.device)
        self.counters = _zeroed_int32("radix_counters", n, self.device)
        self.state = torch.empty(n, STATE_WIDTH.value, dtype=torch.int32, device=self.device)
        shift, bits = FIRST_DIGIT
        _radix_pass_kernel[(self.programs,)](
            self.table,
            self.grads[0],
            self.block_tensor,
            self.first_block,
            self.numel_dev,
            _k_table(self.numels, density, self.device),
            self.hist,
            self.counters,
            self.state,
            TABLE_WIDTH=TABLE_WIDTH.value,
            GRAD_COLUMN=1,
            SHIFT=shift,
            BITS=bits,
            ALIGNED=self.aligned,
            BLOCK=BLOCK,
            MAX_BINS=MAX_BINS,
            num_warps=NUM_WARPS,
        )

    def finish_select(self) -> None:
        """Step 3: the remaining digits over the candidates; the state's column 0 is then each threshold key."""
        keys, _, bases, capacities = self.lists
        for shift, bits in CANDIDATE_PASSES:
            _candidate_pass_kernel[(self.cprograms,)](
                self.table,
                self.grads[0],
                self.cblock_tensor,
                self.cfirst_block,
                self.numel_dev,
                self.state,
                keys,
                bases,
                capacities,
                self.hist,
                self.counters,
                TABLE_WIDTH=TABLE_WIDTH.value,
                GRAD_COLUMN=1,
                SHIFT=shift,
                BITS=bits,
                BLOCK=BLOCK,
                MAX_BINS=MAX_BINS,
                num_warps=NUM_WARPS,
            )


def _groups(columns: list[list[torch.Tensor | None]], masks, density) -> list[_Group]:
    """The non-empty tensors grouped by the dtypes of their row across ``columns`` (params first, grads second)."""
    by_dtype: dict[tuple, list[int]] = {}
    for i, p in enumerate(columns[0]):
        if p.numel():
            key = tuple(None if col[i] is None else col[i].dtype for col in columns)
            by_dtype.setdefault(key, []).append(i)
    return [_Group(idx, columns, masks, density) for idx in by_dtype.values()]


def density_thresholds(grads: list[torch.Tensor], density: float) -> torch.Tensor:
    """The k-th largest |g| of each gradient (k = ceil(ρ·numel)), as fp32: what ``density`` selects against. Runs
    steps 1-3 of the select (step 2 without updating anything), also at ρ = 1.

    Args:
        grads: non-empty list of non-empty contiguous tensors of one dtype on one device.
        density: ρ in (0, 1].

    Returns:
        (len(grads),) fp32 thresholds (exact: they are entries of |g|).
    """
    with env.device_guard(grads[0].device):
        group = _Group(list(range(len(grads))), [grads, grads], None, density, select_at_one=True)
        keys, index, bases, capacities = group.lists
        _digit_compaction_kernel[(group.programs,)](
            group.table,
            group.grads[0],
            group.block_tensor,
            group.first_block,
            group.numel_dev,
            group.state,
            keys,
            index,
            bases,
            capacities,
            ALIGNED=group.aligned,
            BLOCK=BLOCK,
            FIRST_SHIFT=FIRST_DIGIT[0],
            num_warps=NUM_WARPS,
        )
        group.finish_select()
    return group.state[:, 0].contiguous().view(torch.float32)


def _candidate_update(group: _Group, rule: int, scalars: tuple, step, step_on_device: bool, has_momentum: bool) -> None:
    """Step 4 for one group (after step 3)."""
    keys, index, bases, capacities = group.lists
    _candidate_update_kernel[(group.cprograms,)](
        group.table,
        *group.anchors,
        *group.anchors[:1] * (4 - len(group.anchors)),  # SGD has no second state: any pointer
        group.cblock_tensor,
        group.cfirst_block,
        group.numel_dev,
        group.state,
        keys,
        index,
        bases,
        capacities,
        step if step_on_device else group.table,
        *scalars,
        RULE=rule,
        HAS_MOMENTUM=has_momentum,
        STEP_ON_DEVICE=step_on_device,
        BLOCK=BLOCK,
        FIRST_SHIFT=FIRST_DIGIT[0],
        num_warps=CANDIDATE_UPDATE_WARPS,
    )


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
            contiguous); one launch per combination of dtypes (six with a density below 1).
        step: 1-based step number, or a 1-element tensor (read by the kernel on the params' device).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (decoupled weight decay).
        masks: per-tensor bool/uint8 masks, int64 index lists or None; or None for all entries.
        density: top-ρ fraction by |grad| per tensor, instead of masks.
    """
    beta1, beta2 = betas
    step_on_device = isinstance(step, torch.Tensor) and step.device == params[0].device
    step_value = 1.0 if step_on_device else float(step)
    adamw = (
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
    )
    with env.device_guard(params[0].device):
        for group in _groups([params, grads, exp_avgs, exp_avg_sqs], masks, density):
            _masked_adamw_kernel[(group.programs,)](
                group.table,
                *group.anchors,
                group.block_tensor,
                group.first_block,
                group.numel_dev,
                group.state,
                *group.lists,
                step if step_on_device else group.table,
                *adamw,
                SELECT=group.select,
                DENSE_LOADS=group.dense_loads,
                STEP_ON_DEVICE=step_on_device,
                ALIGNED=group.aligned,
                BLOCK=BLOCK,
                FIRST_SHIFT=FIRST_DIGIT[0],
                num_warps=NUM_WARPS,
            )
            if group.select == SELECT_DIGIT.value:
                group.finish_select()
                _candidate_update(group, RULE_ADAMW.value, (*adamw, 0.0, 0.0), step, step_on_device, False)


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
                *group.lists,
                lr,
                momentum,
                weight_decay,
                SELECT=group.select,
                DENSE_LOADS=group.dense_loads,
                HAS_MOMENTUM=has_momentum,
                ALIGNED=group.aligned,
                BLOCK=BLOCK,
                FIRST_SHIFT=FIRST_DIGIT[0],
                num_warps=NUM_WARPS,
            )
            if group.select == SELECT_DIGIT.value:
                group.finish_select()
                unused = (0.0,) * 11  # the AdamW scalars
                _candidate_update(
                    group, RULE_SGD.value, (lr, *unused[1:], momentum, weight_decay), None, False, has_momentum
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
