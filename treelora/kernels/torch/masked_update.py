"""The ``torch`` backend of the sparse masked optimizer steps (SPEC 3.3), and the family's reference.

Per tensor: compute the dense update in fp32 (fp64 for fp64 parameters) and write it back only where selected;
``torch.where`` keeps the exact old bits elsewhere, moments included. This is also the reference the tests and
treelora.ops.masked_update name ``masked_adamw_ref_`` / ``masked_sgd_ref_``: run on float64 copies it is the oracle of
the kernels, and a second copy of these few lines would only be the same statement twice.

Entry points (the contract of every masked-update backend, on arguments the op validated): ``masked_adamw_(params,
grads, exp_avgs, exp_avg_sqs, step, *, lr, betas, eps, weight_decay, masks, density)``, ``masked_sgd_(params, grads,
momentum_buffers, *, lr, momentum, weight_decay, masks, density)`` and their ``*_not_supported_reasons``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from treelora.kernels.constants import topk_count

MASK_DTYPES = (torch.bool, torch.uint8)


def density_threshold(grad: torch.Tensor, density: float) -> torch.Tensor:
    """The k-th largest |grad| (a 0-d tensor; +inf for an empty tensor) with k = ``topk_count(numel, density)``."""
    flat = grad.detach().reshape(-1).abs()
    k = topk_count(flat.numel(), density)
    if k == 0:
        return torch.full((), math.inf, dtype=flat.dtype, device=flat.device)
    return torch.kthvalue(flat.float(), flat.numel() - k + 1).values.to(flat.dtype)


def selection_mask(
    param: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None, density: float | None
) -> torch.Tensor:
    """The boolean selection (param's shape) that ``mask`` or ``density`` denotes for one tensor."""
    if density is not None:
        return grad.abs() >= density_threshold(grad, density)
    if mask is None:
        return torch.ones_like(param, dtype=torch.bool)
    if mask.dtype in MASK_DTYPES:
        return mask.bool()
    sel = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
    sel[mask.long()] = True
    return sel.view_as(param)


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
    """AdamW (decoupled weight decay) on the selected entries, in place; lists of same-shape tensors."""
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
    """SGD with torch.optim.SGD's semantics (coupled weight decay g + wd·p, buf = momentum·buf + g, no dampening, no
    Nesterov) on the selected entries, in place. With momentum = 0 the buffers are not used (they may be None)."""
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
    """The torch backend runs every input the op accepts."""
    return []


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
    """The torch backend runs every input the op accepts."""
    return []
