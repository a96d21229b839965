"""TreeLoRA's regularizers toward the tasks selected per layer (SPEC 7.5).

All take the current adapters as one stacked (L, D) tensor that carries autograd (modules narrower than D are
zero-padded, which adds nothing to either penalty) and the selected rows of the bank as (L, D); each is a handful of
tensor ops whatever L, with no host synchronisation. Each penalty's gradient with respect to the adapters is also
given in closed form (``*_regularizer_grad``): ``A.grad`` after the backward pass holds the task loss's gradient plus
this one, so the task loss's gradient (what a ``grad`` signature must average) is recovered exactly by a subtraction,
without a second backward pass.

``official`` (released code)
    ``R = −Σ_l ⟨A_l, G_{k_l}[l]⟩`` and ``loss ← loss + λ_t · loss.detach() · R / (|R.detach()| + ε)``: the value is
    pinned to ``(1 − λ_t)·loss`` while R < 0 and the gradient ``∇loss − (λ_t·loss/|R|)·G`` moves A toward the selected
    signatures whatever the sign of R. The released code writes ``loss − λ_t·loss·R / (R.detach() + ε)``: identical
    while R < 0 (the usual case: its A stays aligned with its own past snapshots), but once R > 0 the signed
    denominator turns the pull into a push. ``signed=True`` reproduces that.
``l1`` (the paper's Eq. 3 read in parameter space)
    ``loss + λ_t · Σ_l ‖A_l − P_{k_l}[l]‖₁ / D_l`` with P the selected tasks' adapter snapshots and D_l the true width
    of module l.
"""

from __future__ import annotations

import torch

# The released code's ε in R / (R + ε).
OFFICIAL_EPS = 1e-5


def official_regularized_loss(
    loss: torch.Tensor,
    adapters: torch.Tensor,
    targets: torch.Tensor,
    lam: float | torch.Tensor,
    signed: bool = False,
    eps: float = OFFICIAL_EPS,
) -> torch.Tensor:
    """The released code's normalised inner-product penalty applied to ``loss``.

    Args:
        loss: 0-d task loss (its value is used detached as the penalty's scale).
        adapters: (L, D) stacked LoRA-A matrices of the current adapter, with autograd.
        targets: (L, D) the selected tasks' signatures, row l from task k_l (no gradient).
        lam: λ_t, the (warmed-up) weight.
        signed: divide by the signed R as the released code does.
    """
    # One dot product over the flattened (L·D) vectors: a single read of both, no (L, D) temporary.
    R = -torch.dot(adapters.reshape(-1), targets.to(adapters.dtype).reshape(-1))
    scale = lam * loss.detach()
    if signed:
        return loss - scale * R / (R.detach() + eps)
    return loss + scale * R / (R.detach().abs() + eps)


def official_regularizer_grad(
    loss: torch.Tensor,
    adapters: torch.Tensor,
    targets: torch.Tensor,
    lam: float | torch.Tensor,
    signed: bool = False,
    eps: float = OFFICIAL_EPS,
) -> torch.Tensor:
    """(L, D) gradient of the penalty of :func:`official_regularized_loss` with respect to ``adapters``.

    With s = λ_t · loss (detached) and R = −Σ_l ⟨A_l, G_l⟩: ``−s · G / (|R| + ε)``, or ``+s · G / (R + ε)`` when
    ``signed`` (R is a constant of the backward pass, as the penalty detaches it).
    """
    A = adapters.detach()
    G = targets.to(A.dtype)
    R = -torch.dot(A.reshape(-1), G.reshape(-1))
    scale = lam * loss.detach().to(A.dtype)
    if signed:
        return G * (scale / (R + eps))
    return G * (-scale / (R.abs() + eps))


def l1_regularized_loss(
    loss: torch.Tensor,
    adapters: torch.Tensor,
    snapshots: torch.Tensor,
    inv_widths: torch.Tensor,
    lam: float | torch.Tensor,
) -> torch.Tensor:
    """``loss + λ · Σ_l ‖A_l − P_l‖₁ / D_l``.

    Args:
        loss: 0-d task loss.
        adapters: (L, D) stacked LoRA-A matrices, with autograd.
        snapshots: (L, D) the selected tasks' adapter snapshots, row l from task k_l.
        inv_widths: (L,) 1 / D_l, the true (unpadded) widths.
        lam: λ_t.
    """
    # vector_norm reduces |A − P| in one pass (no |.| temporary) and its backward is one sign pass.
    per_layer = torch.linalg.vector_norm(adapters - snapshots.to(adapters.dtype), ord=1, dim=-1)
    return loss + lam * torch.dot(per_layer, inv_widths.to(per_layer.dtype))


def l1_regularizer_grad(
    adapters: torch.Tensor, snapshots: torch.Tensor, inv_widths: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """(L, D) gradient of the penalty of :func:`l1_regularized_loss`: ``λ · sign(A_l − P_l) / D_l`` (0 where
    A = P, as autograd's gradient of ``|x|`` at 0, and on the zero padding)."""
    A = adapters.detach()
    return torch.sign(A - snapshots.to(A.dtype)) * (lam * inv_widths.to(A.dtype))[:, None]
