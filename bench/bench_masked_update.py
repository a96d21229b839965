"""Sparse masked AdamW benchmark: ``masked_adamw_`` over the LoRA parameters of a model at update densities
ρ in {1, 0.1, 0.01}, on each backend, vs the eager reference and vs a dense ``torch.optim.AdamW(fused=True)`` step.

Parameters: the A and B matrices of r = 16 LoRA adapters on q, k, v, o, gate, up and down of a 7B Llama (hidden 4096,
MLP 11008, 32 layers): 448 tensors, 40.0M fp32 parameters (GPU). On CPU a reduced model with the same 448-tensor
structure (hidden 256, MLP 688, r = 8): 1.25M parameters.

Providers (SPEC section 11 names): ``treelora-torch`` / ``treelora-triton`` / ``treelora-cuda`` (backend forced with
``treelora.use_backend``, skipped with its reasons when it cannot run), ``eager-reference`` (a per-tensor Python loop
as a user would write it: ``kthvalue`` threshold, boolean-mask indexing with its host synchronisations) and
``torch-base`` (``torch.optim.AdamW(fused=True)``, dense: what a sparse step has to beat).

``extra_info`` of each treelora benchmark: ``bytes`` (gradients read once, plus p, m, v read and written for the
selected fraction ρ: (4 + 24ρ) bytes per fp32 parameter), ``achieved_gbps``, ``copy_gbps`` (a large ``copy_`` in the
same run), ``fraction_of_copy_bandwidth``, and, measured side by side (alternated, medians compared),
``speedup_vs_eager_reference`` and ``time_over_fused_adamw``. Targets (GPU): ρ = 0.01 faster than the dense fused
step (time_over_fused_adamw < 1), ρ = 1 within 1.2x of it.

Run: ``python -m pytest bench/bench_masked_update.py --benchmark-only -q`` (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import alternating_medians, record, synchronized

import treelora
from treelora import backends, ops
from treelora.ops.masked_update import OP_ADAMW

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ROUNDS = 20 if HAS_CUDA else 5
PROVIDERS = ("treelora-torch", "treelora-triton", "treelora-cuda", "eager-reference")
DENSITIES = (1.0, 0.1, 0.01)
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.01
TARGETS = {1.0: 1.2, 0.01: 1.0}  # time_over_fused_adamw upper bounds
# (hidden, mlp, layers, r): a 7B Llama's LoRA adapters on GPU, the same 448-tensor structure scaled down on CPU.
MODEL = (4096, 11008, 32, 16) if HAS_CUDA else (256, 688, 32, 8)


def lora_shapes(hidden: int, mlp: int, layers: int, r: int) -> list[tuple[int, int]]:
    """Shapes of every LoRA A (r, in) and B (out, r) on q, k, v, o, gate, up, down, layer by layer."""
    linears = [(hidden, hidden)] * 4 + [(hidden, mlp), (hidden, mlp), (mlp, hidden)]  # (in, out)
    return [s for _ in range(layers) for fan_in, fan_out in linears for s in ((r, fan_in), (fan_out, r))]


@pytest.fixture(scope="module")
def state():
    """params, grads, exp_avgs, exp_avg_sqs for the model's LoRA parameters (shared by every benchmark)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    shapes = lora_shapes(*MODEL)
    params = [torch.randn(s, device=DEVICE, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=DEVICE, generator=gen) for s in shapes]
    exp_avgs = [torch.zeros(s, device=DEVICE) for s in shapes]
    exp_avg_sqs = [torch.zeros(s, device=DEVICE) for s in shapes]
    return params, grads, exp_avgs, exp_avg_sqs


def eager_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, step, density):
    """The plain per-tensor loop: top-ρ threshold by kthvalue, then boolean-mask indexing (a host sync per tensor)."""
    bc1, bc2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        flat = g.abs().flatten()
        k = ops.masked_update.topk_count(flat.numel(), density)
        sel = g.abs() >= flat.kthvalue(flat.numel() - k + 1).values
        m[sel] = BETAS[0] * m[sel] + (1 - BETAS[0]) * g[sel]
        v[sel] = BETAS[1] * v[sel] + (1 - BETAS[1]) * g[sel] ** 2
        p[sel] = p[sel] * (1 - LR * WD) - LR * (m[sel] / bc1) / ((v[sel] / bc2).sqrt() + EPS)


def fused_adamw(params, grads):
    """A dense ``torch.optim.AdamW`` step over the same tensors (fused kernel where torch has one)."""
    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    for leaf, g in zip(leaves, grads):
        leaf.grad = g
    try:
        opt = torch.optim.AdamW(leaves, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
        opt.step()
        flavour = "fused"
    except RuntimeError:
        opt = torch.optim.AdamW(leaves, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=True)
        opt.step()
        flavour = "foreach"
    return opt.step, flavour


def _call(provider: str, state, density: float):
    params, grads, exp_avgs, exp_avg_sqs = state
    if provider == "eager-reference":
        return lambda: eager_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, 10, density)
    backend = provider.removeprefix("treelora-")
    kwargs = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, masks=None, density=density)
    table = backends.backends_for(OP_ADAMW)
    try:
        why = (
            table[backend].reasons(params, grads, exp_avgs, exp_avg_sqs, 10, **kwargs)
            if backend in table
            else ["not registered"]
        )
    except Exception as err:  # a kernel module that fails to import is a reason too
        why = [f"{type(err).__name__}: {err}"]
    if why:
        pytest.skip(f"{provider} cannot run this input: " + "; ".join(why))

    def run():
        with treelora.use_backend(backend):
            ops.masked_adamw_(
                params, grads, exp_avgs, exp_avg_sqs, 10, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, density=density
            )

    return run


def _shape_info(state) -> dict:
    params = state[0]
    return {
        "tensors": len(params),
        "parameters": sum(p.numel() for p in params),
        "hidden": MODEL[0],
        "mlp": MODEL[1],
        "layers": MODEL[2],
        "r": MODEL[3],
    }


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"rho{d:g}")
def test_masked_adamw(benchmark, copy_gbps, state, density, provider):
    fn = _call(provider, state, density)
    shape = _shape_info(state)
    record(benchmark, op=OP_ADAMW, provider=provider, mode="step", dtype=torch.float32, density=density, **shape)
    info = benchmark.extra_info
    info.update(bytes=int(shape["parameters"] * (4 + 24 * density)), copy_gbps=round(copy_gbps, 1))
    if provider != "eager-reference":
        fused, flavour = fused_adamw(state[0], state[1])
        eager = _call("eager-reference", state, density)
        medians = alternating_medians(
            {"provider": fn, "eager": eager, "fused": fused}, rounds=9 if HAS_CUDA else 3, device=DEVICE
        )
        achieved = info["bytes"] / medians["provider"] / 1e9
        target = TARGETS.get(density) if HAS_CUDA and provider != "treelora-torch" else None
        info.update(
            achieved_gbps=round(achieved, 1),
            fraction_of_copy_bandwidth=round(achieved / copy_gbps, 4),
            speedup_vs_eager_reference=round(medians["eager"] / medians["provider"], 2),
            time_over_fused_adamw=round(medians["provider"] / medians["fused"], 3),
            fused_adamw_flavour=flavour,
            target_time_over_fused_adamw=target,
            meets_target=None if target is None else medians["provider"] / medians["fused"] <= target,
        )
        print(
            f"\n{provider} rho={density}: {achieved:.1f} GB/s = {info['fraction_of_copy_bandwidth']:.2f} of copy, "
            f"{info['speedup_vs_eager_reference']}x eager, {info['time_over_fused_adamw']}x the {flavour} AdamW"
        )
    benchmark.pedantic(synchronized(fn, DEVICE), rounds=ROUNDS, warmup_rounds=1)


def test_fused_adamw_dense(benchmark, copy_gbps, state):
    """``torch.optim.AdamW(fused=True)``, dense, over the same tensors: the baseline of the targets."""
    step, flavour = fused_adamw(state[0], state[1])
    shape = _shape_info(state)
    record(benchmark, op="adamw", provider="torch-base", mode="step", dtype=torch.float32, density=1.0, **shape)
    benchmark.extra_info.update(flavour=flavour, bytes=shape["parameters"] * 28, copy_gbps=round(copy_gbps, 1))
    benchmark.pedantic(synchronized(step, DEVICE), rounds=ROUNDS, warmup_rounds=1)
