"""The ``cuda`` backend of the sparse masked optimizer steps: launchers of the CUDA C++ multi-tensor kernels in
``treelora._C`` (csrc/masked_update.cu, which describes the pipeline and its byte and launch model) and the backend's
entry points (``masked_adamw_``, ``masked_sgd_`` and their ``*_not_supported_reasons``, on the arguments of the ops in
treelora/ops/masked_update.py).

The kernels read one row of 16 int64 words per tensor from a device table (addresses, sizes, dtypes, the selection
kind, the place and size of its candidate list). The table is built here from the tensor lists and cached by
everything it contains, so a training loop that passes the same tensors (and masks) every step pays for one
host-to-device copy in total; a new mask tensor gives a new table. Each call then queues a fixed number of launches
whatever the number of tensors, with no host synchronisation (the step may be a device tensor), inside
:func:`treelora.kernels.env.device_guard` of the parameters' device. A ``density`` becomes the per-tensor count
``topk_count(numel, density)`` in the table (the kernels select the k largest |grad| of each tensor) and a candidate
list of ``numel / CANDIDATE_SHARE`` entries (8 bytes each) in the workspace.
"""

from __future__ import annotations

import collections
from typing import Sequence

import torch

from treelora import _cpp_lib
from treelora.kernels import env
from treelora.kernels.constants import DTYPE_CODES, topk_count
from treelora.kernels.cuda import common as cc

# Elements per chunk (one block at a time): 256 threads x 4 entries x 4 steps. 40M parameters make ~10K chunks.
CHUNK_ELEMS = 4096
# A density tensor's candidate list holds numel / CANDIDATE_SHARE entries rounded up to whole chunks: 1 byte of
# workspace per parameter, room for the 2-9% of a normal-like |grad| that share the threshold's first-digit bin.
CANDIDATE_SHARE = 8
# The select counts and ranks entries in 32 bits.
MAX_NUMEL = 2**31 - 1
# Selection kinds, as in csrc/masked_update.h (SelectKind).
SELECT_ALL, SELECT_BYTE_MASK, SELECT_INDEX_LIST, SELECT_DENSITY = 0, 1, 2, 3
TABLE_WORDS = 16
# Tables kept: a training loop needs one per parameter group (and per distinct set of mask tensors).
_TABLE_CACHE_SIZE = 32
_tables: collections.OrderedDict[tuple, tuple[torch.Tensor, dict]] = collections.OrderedDict()


def _dtype(t: torch.Tensor | None) -> int:
    return 0 if t is None else DTYPE_CODES[t.dtype]


def _describe(params, grads, state0, state1, masks, topk, full_selects_all) -> tuple:
    """Everything a table row is made of, per tensor (the cache key)."""
    rows = [full_selects_all]
    for i, p in enumerate(params):
        s0 = state0[i] if state0 is not None else None
        s1 = state1[i] if state1 is not None else None
        mask = masks[i] if masks is not None else None
        k = topk[i] if topk is not None else None
        rows.append(
            (
                p.data_ptr(),
                p.numel(),
                p.dtype,
                grads[i].data_ptr(),
                grads[i].dtype,
                cc.ptr(s0),
                None if s0 is None else s0.dtype,
                cc.ptr(s1),
                None if s1 is None else s1.dtype,
                cc.ptr(mask),
                None if mask is None else (mask.dtype, mask.numel()),
                k,
            )
        )
    return tuple(rows)


def _candidate_capacity(numel: int) -> int:
    return max(1, -(-numel // (CANDIDATE_SHARE * CHUNK_ELEMS))) * CHUNK_ELEMS


def _build_table(params, grads, state0, state1, masks, topk, full_selects_all) -> tuple[torch.Tensor, dict]:
    words = []
    chunk = 0
    candidate_chunk = 0
    rows = []
    has_index = has_density = False
    for i, p in enumerate(params):
        g = grads[i]
        s0 = state0[i] if state0 is not None else None
        s1 = state1[i] if state1 is not None else None
        mask = masks[i] if masks is not None else None
        numel = p.numel()
        kind, select, select_len, k, capacity = SELECT_ALL, 0, 0, 0, 0
        if topk is not None and 0 < topk[i] and (topk[i] < numel or not full_selects_all):
            kind, k, capacity = SELECT_DENSITY, topk[i], _candidate_capacity(numel)
            has_density = True
        elif mask is not None and mask.dtype in (torch.bool, torch.uint8):
            kind, select = SELECT_BYTE_MASK, mask.data_ptr()
        elif mask is not None:
            kind, select, select_len = SELECT_INDEX_LIST, mask.data_ptr(), mask.numel()
            has_index = True
        vec_ok = all(cc.aligned(t) for t in (p, g, s0, s1)) and (kind != SELECT_BYTE_MASK or cc.aligned(mask, 4))
        dtypes = _dtype(p) | _dtype(g) << 8 | _dtype(s0) << 16 | _dtype(s1) << 24
        rows.append((kind, numel, capacity))
        words.append(
            [
                p.data_ptr(),
                g.data_ptr(),
                cc.ptr(s0),
                cc.ptr(s1),
                select,
                numel,
                select_len,
                chunk,
                k,
                0,  # scratch_offset, below
                dtypes,
                capacity,
                candidate_chunk,
                0,
                kind,
                int(vec_ok),
            ]
        )
        chunk += -(-numel // CHUNK_ELEMS)
        candidate_chunk += capacity // CHUNK_ELEMS
    # Scratch area: the candidate lists (8 bytes per entry), then the index lists' dense masks (16-byte aligned each);
    # a call has one kind or the other, never both (density and masks exclude each other).
    scratch = 0
    for row, (kind, _, capacity) in zip(words, rows):
        if kind == SELECT_DENSITY:
            row[9], scratch = scratch, scratch + 8 * capacity
    for row, (kind, numel, _) in zip(words, rows):
        if kind == SELECT_INDEX_LIST:
            row[9], scratch = scratch, scratch + -(-numel // 16) * 16
    table = torch.tensor(words, dtype=torch.int64).to(params[0].device)
    meta = dict(
        num_tensors=len(params),
        total_chunks=chunk,
        scratch_bytes=scratch,
        has_index_lists=has_index,
        has_density=has_density,
    )
    return table, meta


def _table(params, grads, state0, state1, masks, topk, full_selects_all=True) -> tuple[torch.Tensor, dict]:
    """The cached device table. With ``full_selects_all`` a density tensor whose k is its size is selected whole
    (no radix select: every |g| is >= the smallest)."""
    key = _describe(params, grads, state0, state1, masks, topk, full_selects_all)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    built = _build_table(params, grads, state0, state1, masks, topk, full_selects_all)
    _tables[key] = built
    if len(_tables) > _TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return built


def _common_args(C, table: torch.Tensor, meta: dict, device: torch.device) -> tuple[tuple, torch.Tensor]:
    size = C.masked_update_workspace_size(meta["num_tensors"], meta["scratch_bytes"])
    workspace = torch.empty(size, dtype=torch.uint8, device=device)
    args = (
        cc.ptr(table),
        meta["num_tensors"],
        meta["total_chunks"],
        CHUNK_ELEMS,
        meta["has_index_lists"],
        meta["has_density"],
        cc.ptr(workspace),
        meta["scratch_bytes"],
    )
    return args, workspace


def _contiguous(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _topk(params: Sequence[torch.Tensor], density: float | None) -> list[int] | None:
    return None if density is None else [topk_count(p.numel(), density) for p in params]


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
    """AdamW on the selected entries, in place (the contract of :func:`treelora.ops.masked_adamw_`). Tensors
    validated by the op: params and moments contiguous fp32/fp16/bf16 on one CUDA device; masks bool/uint8 (param's
    shape) or int64 flat-index lists; ``density`` selects the top ρ fraction by |grad| per tensor instead."""
    C = _cpp_lib.require("masked_adamw")
    device = params[0].device
    grads = _contiguous(grads)
    masks = None if masks is None else [None if m is None else m.contiguous() for m in masks]
    table, meta = _table(params, grads, exp_avgs, exp_avg_sqs, masks, _topk(params, density))
    step_dev = None
    step_host = 1.0
    if isinstance(step, torch.Tensor):
        step_dev = step.detach().reshape(()).to(device=device, dtype=torch.float64)  # read by the kernel: no sync
    else:
        step_host = float(step)
    args, _workspace = _common_args(C, table, meta, device)
    with env.device_guard(device):
        C.masked_adamw(
            *args, lr, betas[0], betas[1], eps, weight_decay, step_host, cc.ptr(step_dev), cc.stream_handle(device)
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
    """SGD (momentum without dampening, coupled weight decay) on the selected entries, in place (the contract of
    :func:`treelora.ops.masked_sgd_`). Buffers are used only when momentum != 0."""
    C = _cpp_lib.require("masked_sgd")
    device = params[0].device
    grads = _contiguous(grads)
    masks = None if masks is None else [None if m is None else m.contiguous() for m in masks]
    buffers = momentum_buffers if momentum != 0.0 else None
    table, meta = _table(params, grads, buffers, None, masks, _topk(params, density))
    args, _workspace = _common_args(C, table, meta, device)
    with env.device_guard(device):
        C.masked_sgd(*args, lr, momentum, weight_decay, cc.stream_handle(device))


def density_thresholds(grads: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """The radix select alone: (n,) fp32, the k-th largest |grad| of each tensor with k = ``topk_count(numel,
    density)`` (+inf where k = 0). grads: fp32/fp16/bf16 tensors on one CUDA device; density: ρ in (0, 1]."""
    C = _cpp_lib.require("masked_density_thresholds")
    device = grads[0].device
    grads = _contiguous(grads)
    table, meta = _table(grads, grads, None, None, None, _topk(grads, density), full_selects_all=False)
    out = torch.empty(len(grads), dtype=torch.float32, device=device)
    size = C.masked_update_workspace_size(meta["num_tensors"], meta["scratch_bytes"])
    workspace = torch.empty(size, dtype=torch.uint8, device=device)
    with env.device_guard(device):
        C.masked_density_thresholds(
            cc.ptr(table),
            meta["num_tensors"],
            meta["total_chunks"],
            CHUNK_ELEMS,
            cc.ptr(workspace),
            cc.ptr(out),
            cc.stream_handle(device),
        )
    return out


def _reasons(named: env.Named, states: env.Named) -> list[str]:
    """Devices, dtypes and sizes of every list; contiguity of the optimizer states updated in place."""
    why = env.cuda_device_reasons(named[:1]) + env.dtype_reasons("CUDA kernels", (*named, *states))
    for name, tensors in (*named, *states):
        big = next((i for i, t in enumerate(tensors) if t is not None and t.numel() > MAX_NUMEL), None)
        if big is not None:
            why.append(f"{name}[{big}] has {tensors[big].numel()} entries; the CUDA kernels take at most {MAX_NUMEL}")
    for name, tensors in states:
        strided = next((i for i, t in enumerate(tensors) if t is not None and not t.is_contiguous()), None)
        if strided is not None:
            why.append(f"{name}[{strided}] is not contiguous (the CUDA kernel updates it in place by flat index)")
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
