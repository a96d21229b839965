"""Fused LoRA linear (SPEC 3.1): ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``.

Shapes: x (..., K); weight W (N, K) frozen; bias b (N,) or None, frozen; lora_A (r, K); lora_B (N, r); scaling s.
``drop`` is inverted dropout with probability p, applied only when ``training``. With ``frozen_rank = f`` the first
f rows of lora_A and the first f columns of lora_B form a stack of frozen adapters: they take part in the output and
in dx, but their gradients are zero (O-LoRA style: A_all = [A_frozen; A_new], B_all = [B_frozen, B_new]).

Every backend implements the same *launcher* interface (:class:`LoRALauncher`) and shares one autograd Function
(:class:`LoRALinearFunction`); only the launchers differ. The torch launcher here is the CPU fallback: it folds the
scale into the r-wide intermediate, accumulates ``u Bᵀ`` into the base output and ``du A`` into dx with in-place
``addmm_`` (no extra full-size passes), and saves a 1-byte dropout mask instead of the dropped activations.
"""

from __future__ import annotations

import abc
import importlib
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from treelora import backends
from treelora.ops._validation import FLOAT_DTYPES, KERNEL_DTYPES, check_finite_number, check_same_device, check_tensor

OP = "lora_linear"


# --- reference ----------------------------------------------------------------------------------------------------


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    frozen_rank: int = 0,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain-autograd reference. ``dropout_mask`` (bool, x's shape) gives the kept entries when dropout is on.

    Computes in x's dtype (the adapters and weight are cast to it), or in fp32 when ``upcast`` (fp64 inputs stay
    fp64): call it with fp64 tensors for the oracle of the tests.
    """
    out_dtype = x.dtype
    compute = x.dtype
    if upcast and x.dtype != torch.float64:
        compute = torch.float32
    xc = x.to(compute)
    xd = xc if dropout_mask is None else xc * dropout_mask.to(compute) / (1.0 - dropout_p)
    A, B = lora_A, lora_B
    if frozen_rank:
        A = torch.cat([A[:frozen_rank].detach(), A[frozen_rank:]], dim=0)
        B = torch.cat([B[:, :frozen_rank].detach(), B[:, frozen_rank:]], dim=1)
    y = F.linear(xc, weight.to(compute), None if bias is None else bias.to(compute))
    y = y + scaling * F.linear(F.linear(xd, A.to(compute)), B.to(compute))
    return y.to(out_dtype)


# --- launcher interface and the shared autograd Function ----------------------------------------------------------


class LoRALauncher(abc.ABC):
    """What a backend provides. All tensors are validated; x2d is (M, K) and may be non-contiguous.

    ``forward`` returns ``(y2d, saved, state)``: the (M, N) output in x's dtype, the tensors backward needs (saved
    through ``ctx.save_for_backward``; None entries allowed) and any non-tensor state (dropout seed/offset, ...).
    ``backward`` returns ``(dx2d, dA, dB)`` where dA is (r - frozen_rank, K) and dB is (N, r - frozen_rank): the
    trainable slices only (the Function pads the frozen part with zeros); any of them may be None when not needed.
    ``dropout_mask(saved, state)`` regenerates the boolean keep-mask of a forward (for tests), or None without
    dropout.
    """

    name = "abstract"

    @abc.abstractmethod
    def forward(self, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank, needs_grad): ...

    @abc.abstractmethod
    def backward(self, dy2d, saved, state, needs_dx, needs_dA, needs_dB): ...

    @abc.abstractmethod
    def dropout_mask(self, saved, state) -> torch.Tensor | None: ...


class LoRALinearFunction(torch.autograd.Function):
    """Autograd glue shared by every backend: reshape to 2-D, call the launcher, pad frozen gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank, launcher):
        x2d = x.reshape(-1, x.shape[-1])
        needs = ctx.needs_input_grad
        needs_grad = needs[0] or needs[3] or needs[4]
        # Launchers choose their compute dtypes explicitly; an enclosing autocast must not re-cast their matmuls.
        with torch.autocast(device_type=x.device.type, enabled=False):
            y2d, saved, state = launcher.forward(
                x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank, needs_grad
            )
        ctx.save_for_backward(*saved)
        ctx.state = state
        ctx.launcher = launcher
        ctx.meta = (x.shape, lora_A.shape, lora_B.shape, lora_A.dtype, lora_B.dtype, frozen_rank)
        return y2d.view(*x.shape[:-1], y2d.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x_shape, a_shape, b_shape, a_dtype, b_dtype, frozen_rank = ctx.meta
        needs = ctx.needs_input_grad
        dy2d = dy.reshape(-1, dy.shape[-1])
        with torch.autocast(device_type=dy.device.type, enabled=False):  # backward may run inside autocast too
            dx, dA, dB = ctx.launcher.backward(dy2d, ctx.saved_tensors, ctx.state, needs[0], needs[3], needs[4])
        if frozen_rank and dA is not None:
            full = torch.zeros(a_shape, dtype=a_dtype, device=dA.device)
            full[frozen_rank:] = dA
            dA = full
        if frozen_rank and dB is not None:
            full = torch.zeros(b_shape, dtype=b_dtype, device=dB.device)
            full[:, frozen_rank:] = dB
            dB = full
        if dx is not None:
            dx = dx.view(x_shape)
        return dx, None, None, dA, dB, None, None, None, None


class TorchLoRALauncher(LoRALauncher):
    """Pure-PyTorch launcher (any device). On CPU, fp16/bf16 inputs are computed in fp32: CPU low-precision matmuls
    are about 100x slower than fp32 on the machines we test on.

    Forward: ``y = addmm(b, x, Wᵀ)``, ``u = s · drop(x) Aᵀ`` (M, r), ``y += u Bᵀ`` in place. Backward:
    ``du = s · dy B`` (M, r) shared by dx and dA, ``dx = dy W`` with ``du A`` accumulated in place,
    ``dA = duᵀ drop(x)``, ``dB = dyᵀ u`` (du and dB computed transposed, see backward). Beyond the two base GEMMs
    each step reads or writes one operand once; PEFT's layer adds four full (M, N) elementwise passes (scale, add,
    and their backward), which is where the CPU speed-up comes from (bench/bench_lora.py). Saved for backward: x
    (the input itself, no copy), the weights, u (M, r) and, with dropout, a 1-byte keep-mask: dropped activations
    are recomputed, not stored.

    Folding the adapter into the weight (``W + s·B A``, one GEMM each way) was measured too and was not faster on
    CPU at the benchmark shapes (2 threads, side by side, machine load ~5: 0.81x vs 0.75x and 0.97x vs 0.84x PEFT's
    time), so it is not used.
    """

    name = "torch"

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return x.dtype

    def forward(self, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank, needs_grad):
        cdt = self._compute_dtype(x2d)
        xc = x2d.to(cdt)  # no copy when x is already in the compute dtype
        w = weight.to(cdt)
        y = torch.addmm(bias.to(cdt), xc, w.t()) if bias is not None else torch.mm(xc, w.t())
        mask = None
        u = None
        if scaling != 0.0:
            a, b = lora_A.to(cdt), lora_B.to(cdt)
            if dropout_p > 0.0:
                # a bool tensor straight from bernoulli_: half the time of drawing floats and comparing (CPU, 1.5M
                # entries: 9.7 ms vs 19 ms)
                mask = torch.empty(xc.shape, dtype=torch.bool, device=xc.device).bernoulli_(1.0 - dropout_p)
                u = torch.mm(xc * mask, a.t()).mul_(scaling / (1.0 - dropout_p))
            else:
                u = torch.mm(xc, a.t()).mul_(scaling)  # the scale costs M·r here instead of M·N after the expand
            y.addmm_(u, b.t())  # expand accumulated into the base output: no (M, N) temporary, no extra pass
        saved = (x2d, weight, lora_A, lora_B, u, mask) if needs_grad else ()
        return y.to(x2d.dtype), saved, (scaling, dropout_p, frozen_rank)

    def backward(self, dy2d, saved, state, needs_dx, needs_dA, needs_dB):
        x2d, weight, lora_A, lora_B, u, mask = saved
        scaling, dropout_p, frozen_rank = state
        cdt = self._compute_dtype(dy2d)
        dyc = dy2d.to(cdt)
        dx = dA = dB = None
        if scaling == 0.0:
            if needs_dx:
                dx = torch.mm(dyc, weight.to(cdt)).to(x2d.dtype)
            r_t = lora_A.shape[0] - frozen_rank
            if needs_dA:
                dA = torch.zeros(r_t, lora_A.shape[1], dtype=lora_A.dtype, device=lora_A.device)
            if needs_dB:
                dB = torch.zeros(lora_B.shape[0], r_t, dtype=lora_B.dtype, device=lora_B.device)
            return dx, dA, dB
        # MKL's skinny GEMMs are much faster with the r-wide operand on the left: duᵀ = Bᵀ dyᵀ (r, M) and
        # dBᵀ = uᵀ dy (r, N) take 0.57 ms and 0.43 ms where du = dy B and dB = dyᵀ u take 1.8 ms and 2.7 ms
        # (M=4096, K=N=384, r=8, fp32, 1 thread).
        if needs_dx or needs_dA:
            # s · duᵀ, with the inverted-dropout factor folded in (r·M multiplies instead of M·K)
            factor = scaling if mask is None else scaling / (1.0 - dropout_p)
            du_t = torch.mm(lora_B.to(cdt).t(), dyc.t()).mul_(factor)
        if needs_dx:
            dx = torch.mm(dyc, weight.to(cdt))
            if mask is None:
                dx.addmm_(du_t.t(), lora_A.to(cdt))  # dx = dy W + du A as one accumulation
            else:
                dx.addcmul_(torch.mm(du_t.t(), lora_A.to(cdt)), mask)  # the forward's mask, applied once
            dx = dx.to(x2d.dtype)
        if needs_dA:
            xc = x2d.to(cdt)
            dA = torch.mm(du_t[frozen_rank:], xc if mask is None else xc * mask).to(lora_A.dtype)
        if needs_dB:
            # u already carries s (and 1/(1-p)); dB is returned as the (N, r) transpose of the (r, N) product
            dB = torch.mm(u[:, frozen_rank:].t(), dyc).t().to(lora_B.dtype)
        return dx, dA, dB

    def dropout_mask(self, saved, state):
        return saved[5] if saved else None


TORCH_LAUNCHER = TorchLoRALauncher()


class _LazyLauncher(LoRALauncher):
    """Imports a kernel module only when its backend first runs, so ``import treelora`` never imports triton."""

    def __init__(self, name: str, module: str, attribute: str) -> None:
        self.name = name
        self._module, self._attribute = module, attribute
        self._target: LoRALauncher | None = None

    def _resolve(self) -> LoRALauncher:
        if self._target is None:
            self._target = getattr(importlib.import_module(self._module), self._attribute)
        return self._target

    def forward(self, *args):
        return self._resolve().forward(*args)

    def backward(self, *args):
        return self._resolve().backward(*args)

    def dropout_mask(self, saved, state):
        return self._resolve().dropout_mask(saved, state)


def _torch_reasons(*args: Any) -> list[str]:
    return []


backends.register(OP, "torch", TORCH_LAUNCHER, _torch_reasons)


# --- reasons shared by the kernel backends ------------------------------------------------------------------------


def kernel_input_reasons(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    kernels: str,
    device_reason: Callable[[torch.device], str | None] = lambda device: None,
) -> list[str]:
    """Why the ``kernels`` (e.g. ``"CUDA kernels"``) cannot take these inputs' dtypes (they take fp32, fp16 and bf16)
    or devices (``device_reason(device)`` says why a device is unusable, or None), one reason per input, naming it.

    Args:
        x: (..., K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); as for :func:`lora_linear`.
    """
    why = []
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is None:
            continue
        if t.dtype not in KERNEL_DTYPES:
            why.append(f"{name} has dtype {t.dtype}; the {kernels} take float32, float16 or bfloat16")
        device_problem = device_reason(t.device)
        if device_problem:
            why.append(f"{name} {device_problem}")
    return why


# --- triton backend: treelora/kernels/lora.py ---------------------------------------------------------------------


def _triton_reasons(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank) -> list[str]:
    why = backends.device_reasons_triton(x, weight, bias, lora_A, lora_B)
    if why:
        return why
    from treelora.kernels import lora as triton_lora

    return triton_lora.not_supported_reasons(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank)


backends.register(
    OP,
    "triton",
    _LazyLauncher("triton", "treelora.kernels.lora", "TRITON_LAUNCHER"),
    _triton_reasons,
    environment=backends.triton_environment,
)


# --- cuda backend: csrc/lora.cu through treelora/kernels/cuda_lora.py -----------------------------------------------


def _cuda_reasons(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank) -> list[str]:
    why = backends.device_reasons_cuda(x, weight, bias, lora_A, lora_B)
    if why:
        return why
    from treelora.kernels import cuda_lora

    return cuda_lora.not_supported_reasons(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank)


backends.register(
    OP,
    "cuda",
    _LazyLauncher("cuda", "treelora.kernels.cuda_lora", "CUDA_LAUNCHER"),
    _cuda_reasons,
    environment=lambda: backends.device_reasons_cuda(),
)


# --- validation and the public op ---------------------------------------------------------------------------------


def _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension is {x.shape[-1]} but weight (out, in) = {tuple(weight.shape)} has in={K}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        if bias.shape[0] != N:
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has out_features {N}")
    check_tensor("lora_A", lora_A, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("lora_B", lora_B, ndim=2, dtypes=FLOAT_DTYPES)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A has rank {r} (shape {tuple(lora_A.shape)}): the LoRA rank r must be >= 1")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be (r, in) = (r, {K}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must be (out, r) = ({N}, {r}) to match weight and lora_A, got {tuple(lora_B.shape)}")
    scaling = check_finite_number("scaling", scaling)
    dropout_p = check_finite_number("dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    if isinstance(frozen_rank, bool) or not isinstance(frozen_rank, int) or not 0 <= frozen_rank <= r:
        raise ValueError(f"frozen_rank must be an int in [0, r={r}], got {frozen_rank!r}")
    check_same_device({"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    return scaling, dropout_p


_warned_trainable_weight = False


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    frozen_rank: int = 0,
) -> torch.Tensor:
    """LoRA linear through the fastest backend that can run it (see the module docstring for the contract).

    Args:
        x: (..., K) activations (fp32, fp16 or bf16; fp64 runs on the torch backend).
        weight: (N, K) frozen base weight. If it requires grad, the reference path runs instead (warned once).
        bias: (N,) frozen base bias, or None.
        lora_A: (r, K), lora_B: (N, r), r >= 1; their dtype may differ from x's (computed in x's dtype).
        scaling: s = lora_alpha / r (or / sqrt(r) for rsLoRA).
        dropout_p: inverted-dropout probability in [0, 1), applied to the adapter input only when ``training``.
        training: whether dropout is active.
        frozen_rank: leading rows of lora_A / columns of lora_B that are frozen (zero gradient).

    Returns:
        (..., N) in x's dtype.
    """
    global _warned_trainable_weight
    scaling, dropout_p = _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, frozen_rank)
    p = dropout_p if training else 0.0
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        if not _warned_trainable_weight:
            warnings.warn("lora_linear: weight or bias requires grad; using the unfused reference path", stacklevel=2)
            _warned_trainable_weight = True
        mask = torch.empty_like(x).bernoulli_(1.0 - p).bool() if p > 0 else None
        return lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, p, mask, frozen_rank)
    launcher = backends.select(OP, x, weight, bias, lora_A, lora_B, scaling, p, frozen_rank).fn
    track = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)
    if not track:
        x2d = x.reshape(-1, x.shape[-1])
        y2d, _, _ = launcher.forward(x2d, weight, bias, lora_A, lora_B, scaling, p, frozen_rank, False)
        return y2d.view(*x.shape[:-1], y2d.shape[-1])
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, p, frozen_rank, launcher)
