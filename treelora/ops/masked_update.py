"""Sparse masked optimizer steps over a list of tensors (SPEC 3.3).

Only the entries selected by a mask are updated. An unselected entry is **not touched at all**: its value and its
optimizer moments keep their exact bits (zeroing its gradient would not be the same: momentum and weight decay would
still move it).

Selections, one per tensor (``masks``) or one rule for all (``density``):
  * a bool or uint8 tensor of the parameter's shape (nonzero = selected);
  * a 1-D int64 tensor of flat indices into the parameter (duplicates are allowed and count once);
  * None in the ``masks`` list: the whole tensor;
  * ``density=ρ`` (0 < ρ <= 1): per tensor, the entries whose |grad| is at least the k-th largest |grad| with
    k = ceil(ρ · numel) (ties at the threshold are all selected, so slightly more than k entries can move). NaN
    ranks above every number and a NaN gradient is always selected, so it shows in the update as in a dense step;
    a tensor whose k is its size (ρ = 1, or a tiny tensor) is updated whole.

Bias correction uses the caller's per-call ``step`` for every tensor (a per-tensor step count, not per entry): an
entry first selected at step 100 is corrected as if it had been updated 100 times, as in a dense optimizer that
happens to see zero gradients.

The backends live in treelora/kernels/{torch,triton,cuda}/masked_update.py. Beside the torch backend sits the
family's reference (a dense update per tensor written back with ``torch.where``): run on float64 copies it is the
oracle of every backend, exported here as ``masked_adamw_ref_`` / ``masked_sgd_ref_``.
"""

from __future__ import annotations

import math
import numbers
from itertools import repeat
from operator import attrgetter
from typing import Sequence

import torch

from treelora import backends
from treelora.kernels.constants import FLOAT_DTYPES, topk_count
from treelora.kernels.torch import masked_update as torch_masked_update
from treelora.ops._validation import check_finite_number, check_nonempty_list, check_tensor

OP_ADAMW = "masked_adamw_"
OP_SGD = "masked_sgd_"
MASK_DTYPES = torch_masked_update.MASK_DTYPES

backends.register_family(
    "masked_update",
    ops=(OP_ADAMW, OP_SGD),
    torch=torch_masked_update,
    triton="treelora.kernels.triton.masked_update",
    cuda="treelora.kernels.cuda.masked_update",
)

# --- references (beside the torch backend, see the module docstring) -----------------------------------------------

masked_adamw_ref_ = torch_masked_update.masked_adamw_reference_
masked_sgd_ref_ = torch_masked_update.masked_sgd_reference_
density_threshold_ref = torch_masked_update.density_threshold
selection_mask = torch_masked_update.selection_mask

__all__ = [
    "MASK_DTYPES",
    "OP_ADAMW",
    "OP_SGD",
    "density_threshold_ref",
    "masked_adamw_",
    "masked_adamw_ref_",
    "masked_sgd_",
    "masked_sgd_ref_",
    "selection_mask",
    "topk_count",
]


# --- validation ---------------------------------------------------------------------------------------------------


# The fast paths read each attribute of a whole list with map(attrgetter(...)) (C loops): an optimizer step passes ~450
# tensors per list and runs these checks every step, and the generator-expression version cost 2 ms of a 10 ms step on
# the 2-core CPU. The per-tensor loops run only to name the offending entry.
_DTYPE, _DEVICE, _SHAPE = attrgetter("dtype"), attrgetter("device"), attrgetter("shape")
_FLOAT_SET = frozenset(FLOAT_DTYPES)


def _all_tensors(items: list) -> bool:
    return all(map(isinstance, items, repeat(torch.Tensor)))


def _check_group(name: str, tensors, params, shapes: list, *, allow_none: bool = False, dtypes=FLOAT_DTYPES) -> list:
    """``tensors`` as a list, checked against ``params`` (whose shapes are ``shapes``)."""
    tensors = check_nonempty_list(name, tensors)
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(params)}")
    if allow_none and any(t is None for t in tensors):
        present = [t for t in tensors if t is not None]
        want = [shape for shape, t in zip(shapes, tensors) if t is not None]
    else:
        present, want = tensors, shapes
    if (
        _all_tensors(present)
        and set(map(_DTYPE, present)) <= (_FLOAT_SET if dtypes is FLOAT_DTYPES else set(dtypes))
        and set(map(_DEVICE, present)) <= {params[0].device}
        and list(map(_SHAPE, present)) == want
    ):
        return tensors
    for i, (t, p) in enumerate(zip(tensors, params)):
        if t is None and allow_none:
            continue
        check_tensor(f"{name}[{i}]", t, dtypes=dtypes)
        if t.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")
        if t.device != p.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
    return tensors


def _check_params(params) -> tuple[list, list]:
    """(params as a list, their shapes)."""
    params = check_nonempty_list("params", params)
    if (
        _all_tensors(params)
        and set(map(_DTYPE, params)) <= _FLOAT_SET
        and len(set(map(_DEVICE, params))) == 1
        and all(map(torch.Tensor.is_contiguous, params))
    ):
        return params, list(map(_SHAPE, params))
    for i, p in enumerate(params):
        check_tensor(f"params[{i}]", p, dtypes=FLOAT_DTYPES)
        if not p.is_contiguous():
            raise ValueError(f"params[{i}] must be contiguous (masked updates address entries by flat index)")
        if p.device != params[0].device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {params[0].device} (one device only)")
    return params, list(map(_SHAPE, params))


def _check_selection(params, masks, density):
    if masks is not None and density is not None:
        raise ValueError("pass either masks or density, not both")
    if density is not None:
        return None, check_finite_number("density", density, low=0.0, high=1.0, low_open=True)
    if masks is None:
        return None, None
    if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)):
        raise TypeError(f"masks must be a list with one entry per parameter, got {type(masks).__name__}")
    if len(masks) != len(params):
        raise ValueError(f"masks has {len(masks)} entries but params has {len(params)}")
    for i, (mask, p) in enumerate(zip(masks, params)):
        if mask is None:
            continue
        check_tensor(f"masks[{i}]", mask, dtypes=(*MASK_DTYPES, torch.int64), device=p.device)
        if mask.dtype in MASK_DTYPES:
            if mask.shape != p.shape:
                raise ValueError(f"masks[{i}] has shape {tuple(mask.shape)} but params[{i}] has {tuple(p.shape)}")
        else:
            if mask.dim() != 1:
                raise ValueError(f"masks[{i}] is an index list and must be 1-D, got shape {tuple(mask.shape)}")
            if mask.device.type == "cpu" and mask.numel() and (mask.min() < 0 or mask.max() >= p.numel()):
                raise ValueError(f"masks[{i}] holds flat indices outside [0, {p.numel()}) of params[{i}]")
    return list(masks), None


def _check_step(step, device: torch.device) -> None:
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise ValueError(f"step must be a number or a 1-element tensor, got shape {tuple(step.shape)}")
        if step.dtype == torch.bool or step.is_complex():
            raise TypeError(f"step must hold a real number, got dtype {step.dtype}")
        if step.device.type != "cpu" and step.device != device:
            raise ValueError(f"step is on {step.device} but params are on {device} (a CPU tensor is also accepted)")
        if step.device.type == "cpu" and not step.item() >= 1:
            raise ValueError(f"step is the 1-based index of this update and must be >= 1, got {step.item()!r}")
        return
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"step must be a number or a 1-element tensor, got {type(step).__name__}")
    if not step >= 1 or not math.isfinite(step):
        raise ValueError(f"step is the 1-based index of this update and must be >= 1, got {step!r}")


# --- custom ops (torch.library) -------------------------------------------------------------------------------------
# The public functions below validate their arguments and call these ops, which pick the backend. Declaring the
# mutated lists in the schema (``Tensor(a0!)[]``) lets torch.compile and functionalisation see the in-place update
# instead of treating the kernels' writes as invisible side effects. The schemas are spelled out because the schema
# language has no optional list: ``masks=[]`` stands for no masks, ``momentum_buffers=[]`` for no buffers.
#
# Defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: the latter wraps every call in
# Python-level checks that walk each list (an aliasing check over all inputs and one version bump per mutated tensor),
# 2.5 ms per call for the 448 tensors of a 32-layer model's LoRA adapters on the 2-core CPU, as much as the whole
# dense step. Here the implementation bumps the version counters of the mutated lists in one C++ call (the kernels
# write through raw pointers, which autograd would not see), and no output exists to alias an input.

_LIB = torch.library.Library("treelora", "FRAGMENT")
_LIB.define(
    f"{OP_ADAMW}(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] exp_avgs, Tensor(a3!)[] exp_avg_sqs, "
    "float step, Tensor? step_tensor, float lr, float beta1, float beta2, float eps, float weight_decay, "
    "Tensor?[] masks, float? density) -> ()"
)
_LIB.define(
    f"{OP_SGD}(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)?[] momentum_buffers, float lr, float momentum, "
    "float weight_decay, Tensor?[] masks, float? density) -> ()"
)


def _masked_adamw_op(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: float,
    step_tensor: torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    masks: list[torch.Tensor | None],
    density: float | None,
) -> None:
    """``torch.ops.treelora.masked_adamw_`` on validated arguments; ``step_tensor``, when given, replaces ``step``."""
    args = (params, grads, exp_avgs, exp_avg_sqs, step if step_tensor is None else step_tensor)
    kwargs = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, masks=masks or None, density=density)
    backends.select(OP_ADAMW, *args, **kwargs).fn(*args, **kwargs)
    torch._C._increment_version([*params, *exp_avgs, *exp_avg_sqs])


def _masked_adamw_fake(
    params, grads, exp_avgs, exp_avg_sqs, step, step_tensor, lr, beta1, beta2, eps, weight_decay, masks, density
) -> None:
    return None


def _masked_sgd_op(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    lr: float,
    momentum: float,
    weight_decay: float,
    masks: list[torch.Tensor | None],
    density: float | None,
) -> None:
    """``torch.ops.treelora.masked_sgd_`` on validated arguments."""
    buffers = momentum_buffers or None
    kwargs = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, masks=masks or None, density=density)
    backends.select(OP_SGD, params, grads, buffers, **kwargs).fn(params, grads, buffers, **kwargs)
    torch._C._increment_version([*params, *(b for b in momentum_buffers if b is not None)])


def _masked_sgd_fake(params, grads, momentum_buffers, lr, momentum, weight_decay, masks, density) -> None:
    return None


_LIB.impl(OP_ADAMW, _masked_adamw_op, "CompositeExplicitAutograd")
_LIB.impl(OP_SGD, _masked_sgd_op, "CompositeExplicitAutograd")
torch.library.register_fake(f"treelora::{OP_ADAMW}", _masked_adamw_fake, lib=_LIB)
torch.library.register_fake(f"treelora::{OP_SGD}", _masked_sgd_fake, lib=_LIB)


# --- public ops ---------------------------------------------------------------------------------------------------


def masked_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: int | float | torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    masks: Sequence[torch.Tensor | None] | None = None,
    density: float | None = None,
) -> None:
    """In-place AdamW step on the selected entries of every tensor (see the module docstring for selections).

    Per selected entry: ``p *= 1 - lr·wd``; ``m = β1·m + (1-β1)·g``; ``v = β2·v + (1-β2)·g²``;
    ``p -= lr · (m / (1-β1^step)) / (sqrt(v / (1-β2^step)) + eps)``.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: equal-length lists of same-shape tensors (params contiguous).
        step: 1-based index of this update (a number, or a 1-element tensor to avoid host synchronisation).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
        masks: optional per-tensor selections (bool/uint8 masks, int64 flat-index lists, or None = all).
        density: optional top-ρ fraction by |grad| per tensor, instead of masks.
    """
    params, shapes = _check_params(params)
    grads = _check_group("grads", grads, params, shapes)
    exp_avgs = _check_group("exp_avgs", exp_avgs, params, shapes)
    exp_avg_sqs = _check_group("exp_avg_sqs", exp_avg_sqs, params, shapes)
    _check_step(step, params[0].device)
    lr = check_finite_number("lr", lr, low=0.0)
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {type(betas).__name__}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = check_finite_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    b2 = check_finite_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    eps = check_finite_number("eps", eps, low=0.0, low_open=True)
    weight_decay = check_finite_number("weight_decay", weight_decay, low=0.0)
    masks, density = _check_selection(params, masks, density)
    step_tensor = step if isinstance(step, torch.Tensor) else None
    with torch.no_grad():
        torch.ops.treelora.masked_adamw_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            1.0 if step_tensor is not None else float(step),
            step_tensor,
            lr,
            b1,
            b2,
            eps,
            weight_decay,
            masks or [],
            density,
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
    """In-place SGD (optional momentum, coupled weight decay as in ``torch.optim.SGD``) on the selected entries.

    Per selected entry: ``d = g + wd·p``; with momentum ``buf = momentum·buf + d; d = buf``; ``p -= lr·d``.
    ``momentum_buffers`` must be given (zero-initialised for a fresh optimizer) when momentum != 0.
    """
    params, shapes = _check_params(params)
    grads = _check_group("grads", grads, params, shapes)
    lr = check_finite_number("lr", lr, low=0.0)
    momentum = check_finite_number("momentum", momentum, low=0.0)
    weight_decay = check_finite_number("weight_decay", weight_decay, low=0.0)
    if momentum != 0.0:
        if momentum_buffers is None:
            raise ValueError("momentum_buffers is required when momentum != 0")
        momentum_buffers = _check_group("momentum_buffers", momentum_buffers, params, shapes)
    elif momentum_buffers is not None:
        momentum_buffers = _check_group("momentum_buffers", momentum_buffers, params, shapes, allow_none=True)
    masks, density = _check_selection(params, masks, density)
    with torch.no_grad():
        torch.ops.treelora.masked_sgd_(
            params, grads, list(momentum_buffers or []), lr, momentum, weight_decay, masks or [], density
        )
