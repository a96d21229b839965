"""Sparse masked optimizer steps over a list of tensors (SPEC 3.3).

Only the entries selected by a mask are updated. An unselected entry is **not touched at all**: its value and its
optimizer moments keep their exact bits (zeroing its gradient would not be the same: momentum and weight decay would
still move it).

Selections, one per tensor (``masks``) or one rule for all (``density``):
  * a bool or uint8 tensor of the parameter's shape (nonzero = selected);
  * a 1-D int64 tensor of flat indices into the parameter (duplicates are allowed and count once);
  * None in the ``masks`` list: the whole tensor;
  * ``density=ρ`` (0 < ρ <= 1): per tensor, the entries whose |grad| is at least the k-th largest |grad| with
    k = ceil(ρ · numel) (ties at the threshold are all selected, so slightly more than k entries can move).

Bias correction uses the caller's per-call ``step`` for every tensor (a per-tensor step count, not per entry): an
entry first selected at step 100 is corrected as if it had been updated 100 times, as in a dense optimizer that
happens to see zero gradients.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from treelora import backends
from treelora.ops._validation import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    check_finite_number,
    check_nonempty_list,
    check_tensor,
)

OP_ADAMW = "masked_adamw_"
OP_SGD = "masked_sgd_"
MASK_DTYPES = (torch.bool, torch.uint8)


# --- selections ---------------------------------------------------------------------------------------------------


def topk_count(numel: int, density: float) -> int:
    """Number of entries a density selects in a tensor of ``numel`` entries: ceil(ρ·n), computed robustly."""
    return min(numel, math.ceil(density * numel - 1e-9)) if numel else 0


def density_threshold_ref(grad: torch.Tensor, density: float) -> torch.Tensor:
    """The k-th largest |grad| (a 0-d tensor; +inf for an empty tensor) with k = :func:`topk_count`."""
    flat = grad.detach().reshape(-1).abs()
    k = topk_count(flat.numel(), density)
    if k == 0:
        return torch.full((), math.inf, dtype=flat.dtype, device=flat.device)
    return torch.kthvalue(flat.float(), flat.numel() - k + 1).values.to(flat.dtype)


def selection_mask(param: torch.Tensor, grad: torch.Tensor, mask, density: float | None) -> torch.Tensor:
    """The boolean selection (param's shape) that ``mask`` or ``density`` denotes for one tensor."""
    if density is not None:
        return grad.abs() >= density_threshold_ref(grad, density)
    if mask is None:
        return torch.ones_like(param, dtype=torch.bool)
    if mask.dtype in MASK_DTYPES:
        return mask.bool()
    sel = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
    sel[mask.long()] = True
    return sel.view_as(param)


# --- references ---------------------------------------------------------------------------------------------------


def masked_adamw_ref_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    step,
    *,
    lr,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    masks=None,
    density=None,
) -> None:
    """Reference (and torch backend): per tensor, compute the dense AdamW update in fp32 (fp64 for fp64 params)
    and write it back only where selected (``torch.where`` keeps the exact old bits elsewhere)."""
    beta1, beta2 = betas
    step_f = step.to(torch.float64) if isinstance(step, torch.Tensor) else float(step)
    bc1 = 1 - beta1**step_f
    bc2 = 1 - beta2**step_f
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        sel = selection_mask(p, g, None if masks is None else masks[i], density)
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        p32, g32, m32, v32 = p.to(acc), g.to(acc), m.to(acc), v.to(acc)
        m_new = beta1 * m32 + (1 - beta1) * g32
        v_new = beta2 * v32 + (1 - beta2) * g32 * g32
        denom = (v_new / bc2).sqrt() + eps
        p_new = p32 * (1 - lr * weight_decay) - lr * (m_new / bc1) / denom
        m.copy_(torch.where(sel, m_new.to(m.dtype), m))
        v.copy_(torch.where(sel, v_new.to(v.dtype), v))
        p.copy_(torch.where(sel, p_new.to(p.dtype), p))


def masked_sgd_ref_(
    params, grads, momentum_buffers, *, lr, momentum=0.0, weight_decay=0.0, masks=None, density=None
) -> None:
    """Reference (and torch backend) SGD with torch.optim.SGD's semantics (coupled weight decay g + wd·p,
    buf = momentum·buf + g, no dampening, no Nesterov) on the selected entries only. With momentum = 0 the buffers
    are not used (they may be None)."""
    for i, p in enumerate(params):
        g = grads[i]
        sel = selection_mask(p, g, None if masks is None else masks[i], density)
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        p32 = p.to(acc)
        d = g.to(acc) + weight_decay * p32
        if momentum != 0.0:
            buf = momentum_buffers[i]
            d = momentum * buf.to(acc) + d
            buf.copy_(torch.where(sel, d.to(buf.dtype), buf))
        p.copy_(torch.where(sel, (p32 - lr * d).to(p.dtype), p))


backends.register(OP_ADAMW, "torch", masked_adamw_ref_, lambda *a, **k: [])
backends.register(OP_SGD, "torch", masked_sgd_ref_, lambda *a, **k: [])


# --- triton backend: treelora/kernels/masked_update.py ------------------------------------------------------------


def _triton_adamw_reasons(params, grads, exp_avgs, exp_avg_sqs, step, **kwargs) -> list[str]:
    why = backends.device_reasons_triton(params[0])  # validation put every tensor on params[0]'s device
    if why:
        return why
    from treelora.kernels import masked_update as triton_masked_update

    return triton_masked_update.not_supported_reasons(
        params, grads, [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    )


def _triton_adamw(params, grads, exp_avgs, exp_avg_sqs, step, **kwargs) -> None:
    from treelora.kernels import masked_update as triton_masked_update

    triton_masked_update.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, **kwargs)


def _triton_sgd_reasons(params, grads, momentum_buffers, **kwargs) -> list[str]:
    why = backends.device_reasons_triton(params[0])
    if why:
        return why
    from treelora.kernels import masked_update as triton_masked_update

    states = [("momentum_buffers", momentum_buffers)] if kwargs.get("momentum", 0.0) != 0.0 else []
    return triton_masked_update.not_supported_reasons(params, grads, states)


def _triton_sgd(params, grads, momentum_buffers, **kwargs) -> None:
    from treelora.kernels import masked_update as triton_masked_update

    triton_masked_update.masked_sgd_(params, grads, momentum_buffers, **kwargs)


backends.register(OP_ADAMW, "triton", _triton_adamw, _triton_adamw_reasons, environment=backends.triton_environment)
backends.register(OP_SGD, "triton", _triton_sgd, _triton_sgd_reasons, environment=backends.triton_environment)


# --- cuda backend: csrc/masked_update.cu through treelora/kernels/cuda_masked_update.py ---------------------------


def _cuda_reasons(params, grads, states: list, masks) -> list[str]:
    why = backends.device_reasons_cuda(params[0])  # validation put every tensor on params[0]'s device
    if why:
        return why
    for name, group in [("params", params), ("grads", grads), *states]:
        bad = sorted({str(t.dtype) for t in group if t is not None and t.dtype not in KERNEL_DTYPES})
        if bad:
            why.append(
                f"{name} hold {', '.join(bad)}: the CUDA kernel takes fp32, fp16 and bf16 (float64 runs on the "
                "torch backend)"
            )
    for name, group in states:
        if any(t is not None and not t.is_contiguous() for t in group):
            why.append(f"{name} must be contiguous: the CUDA kernel updates them in place by flat index")
    return why


def _topk(params, density):
    return None if density is None else [topk_count(p.numel(), density) for p in params]


def _cuda_adamw_reasons(params, grads, exp_avgs, exp_avg_sqs, step, **kwargs) -> list[str]:
    return _cuda_reasons(params, grads, [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)], kwargs.get("masks"))


def _cuda_adamw(
    params, grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay, masks=None, density=None
) -> None:
    from treelora.kernels import cuda_masked_update

    cuda_masked_update.masked_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        masks=masks,
        topk=_topk(params, density),
    )


def _cuda_sgd_reasons(params, grads, momentum_buffers, **kwargs) -> list[str]:
    states = [("momentum_buffers", momentum_buffers)] if kwargs.get("momentum", 0.0) != 0.0 else []
    return _cuda_reasons(params, grads, states, kwargs.get("masks"))


def _cuda_sgd(params, grads, momentum_buffers, *, lr, momentum=0.0, weight_decay=0.0, masks=None, density=None) -> None:
    from treelora.kernels import cuda_masked_update

    cuda_masked_update.masked_sgd(
        params,
        grads,
        momentum_buffers,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        masks=masks,
        topk=_topk(params, density),
    )


backends.register(
    OP_ADAMW, "cuda", _cuda_adamw, _cuda_adamw_reasons, environment=lambda: backends.device_reasons_cuda()
)
backends.register(OP_SGD, "cuda", _cuda_sgd, _cuda_sgd_reasons, environment=lambda: backends.device_reasons_cuda())


# --- validation ---------------------------------------------------------------------------------------------------


def _all_tensors(items: list) -> bool:
    return all(isinstance(t, torch.Tensor) for t in items)


def _check_group(name: str, tensors, params, *, allow_none: bool = False, dtypes=FLOAT_DTYPES) -> list:
    tensors = check_nonempty_list(name, tensors)
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(params)}")
    # Fast path: whole-list comparisons (an optimizer step may pass ~450 tensors per list, and this check runs every
    # step); the per-tensor loop below runs only to name the offending entry.
    present = [t for t in tensors if t is not None] if allow_none else tensors
    if (
        _all_tensors(present)
        and {t.dtype for t in present} <= set(dtypes)
        and {t.device for t in present} <= {params[0].device}
        and [t.shape for t in tensors if t is not None] == [p.shape for p, t in zip(params, tensors) if t is not None]
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


def _check_params(params) -> list:
    params = check_nonempty_list("params", params)
    if (
        _all_tensors(params)
        and {p.dtype for p in params} <= set(FLOAT_DTYPES)
        and len({p.device for p in params}) == 1
        and all(p.is_contiguous() for p in params)
    ):
        return params
    for i, p in enumerate(params):
        check_tensor(f"params[{i}]", p, dtypes=FLOAT_DTYPES)
        if not p.is_contiguous():
            raise ValueError(f"params[{i}] must be contiguous (masked updates address entries by flat index)")
        if p.device != params[0].device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {params[0].device} (one device only)")
    return params


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
                raise IndexError(f"masks[{i}] holds flat indices outside [0, {p.numel()}) of params[{i}]")
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
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step >= 1 or not math.isfinite(step):
        raise ValueError(f"step is the 1-based index of this update and must be >= 1, got {step!r}")


# --- custom ops (torch.library) -------------------------------------------------------------------------------------
# The public functions below validate their arguments and call these ops, which pick the backend. Declaring the
# mutated lists (``mutates_args``) lets torch.compile and functionalisation see the in-place update instead of
# treating the kernels' writes as invisible side effects. The schemas are spelled out because the schema language has
# no optional list: ``masks=[]`` stands for no masks, ``momentum_buffers=[]`` for no buffers.


@torch.library.custom_op(
    f"treelora::{OP_ADAMW}",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs"),
    schema="(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] exp_avgs, Tensor(a3!)[] exp_avg_sqs, float step, "
    "Tensor? step_tensor, float lr, float beta1, float beta2, float eps, float weight_decay, Tensor?[] masks, "
    "float? density) -> ()",
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


@_masked_adamw_op.register_fake
def _masked_adamw_fake(
    params, grads, exp_avgs, exp_avg_sqs, step, step_tensor, lr, beta1, beta2, eps, weight_decay, masks, density
) -> None:
    return None


@torch.library.custom_op(
    f"treelora::{OP_SGD}",
    mutates_args=("params", "momentum_buffers"),
    schema="(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)?[] momentum_buffers, float lr, float momentum, "
    "float weight_decay, Tensor?[] masks, float? density) -> ()",
)
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


@_masked_sgd_op.register_fake
def _masked_sgd_fake(params, grads, momentum_buffers, lr, momentum, weight_decay, masks, density) -> None:
    return None


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
    params = _check_params(params)
    grads = _check_group("grads", grads, params)
    exp_avgs = _check_group("exp_avgs", exp_avgs, params)
    exp_avg_sqs = _check_group("exp_avg_sqs", exp_avg_sqs, params)
    _check_step(step, params[0].device)
    lr = check_finite_number("lr", lr, low=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = check_finite_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    b2 = check_finite_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    eps = check_finite_number("eps", eps, low=0.0, low_open=True)
    weight_decay = check_finite_number("weight_decay", weight_decay, low=0.0)
    masks, density = _check_selection(params, masks, density)
    step_tensor = step if isinstance(step, torch.Tensor) else None
    with torch.no_grad():
        _masked_adamw_op(
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
    params = _check_params(params)
    grads = _check_group("grads", grads, params)
    lr = check_finite_number("lr", lr, low=0.0)
    momentum = check_finite_number("momentum", momentum, low=0.0)
    weight_decay = check_finite_number("weight_decay", weight_decay, low=0.0)
    if momentum != 0.0:
        if momentum_buffers is None:
            raise ValueError("momentum_buffers is required when momentum != 0")
        momentum_buffers = _check_group("momentum_buffers", momentum_buffers, params)
    elif momentum_buffers is not None:
        momentum_buffers = _check_group("momentum_buffers", momentum_buffers, params, allow_none=True)
    masks, density = _check_selection(params, masks, density)
    with torch.no_grad():
        _masked_sgd_op(params, grads, list(momentum_buffers or []), lr, momentum, weight_decay, masks or [], density)
