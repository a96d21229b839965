"""LoRA layer benchmark: treelora's ``LoRALinear`` on each backend vs PEFT's LoRA ``Linear`` vs the frozen base linear.

Providers (SPEC section 11 names): ``torch-base`` (``F.linear`` with the frozen weight: the floor any LoRA layer pays),
``peft`` (PEFT's ``lora.Linear`` on the same weights), ``treelora-torch`` / ``treelora-triton`` / ``treelora-cuda``
(``treelora.nn.LoRALinear`` with the backend forced by ``treelora.use_backend``; a backend that cannot run the input
is skipped with its reasons). Modes: ``forward`` (with autograd recording, as in training), ``backward`` (the
backward of a fresh forward; gradients for x, A and B), ``full`` (both). Peak memory of one ``full`` call is recorded
on GPU.

Shapes: on CPU (fp32, 2 threads) M=4096, K=N=384, r=8 and M=2048, K=N=1024, r=16; on GPU (bf16) the grid M in
{4096, 8192, 16384} x (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096)} x r in {8, 16, 64}.

The targets are ratios, measured side by side (providers alternated round by round, medians compared) by the
``test_side_by_side_*`` benchmarks and stored in their ``extra_info``:

* CPU: treelora-torch forward+backward at most 0.90x PEFT's time at (4096, 384, 384, 8) and at most 0.95x at
  (2048, 1024, 1024, 16);
* GPU, (8192, 4096, 4096, 16, bf16): treelora-triton and treelora-cuda forward at most 1.10x and forward+backward at
  most 1.15x the base linear's time, and PEFT's forward+backward at least 1.35x theirs.

Run: ``python -m pytest bench/bench_lora.py --benchmark-only -q`` (about a minute on a 2-core CPU). With
``--bench-smoke`` only ``SMOKE_SHAPES`` run, a few rounds each (the harness check CI runs; no numbers to keep).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import alternating_medians, peak_memory_bytes, record, smoke_run, synchronized

import treelora
from treelora import backends
from treelora.nn import LoRALinear

OP = "lora_linear"
PROVIDERS = ("torch-base", "peft", "treelora-torch", "treelora-triton", "treelora-cuda")
MODES = ("forward", "backward", "full")
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
CPU_THREADS = 2  # the CPU targets are stated for 2 threads (the CI machines' core count)
SMOKE = smoke_run()
ROUNDS = 2 if SMOKE else 20 if HAS_CUDA else 8
CPU_COMPARE_ROUNDS = 3 if SMOKE else 31  # 31: CPU timings on a shared 2-core machine vary from round to round

SMOKE_SHAPES = [(64, 32, 32, 4)]  # --bench-smoke: every provider and mode in well under a second, on any device
CPU_SHAPES = SMOKE_SHAPES if SMOKE else [(4096, 384, 384, 8), (2048, 1024, 1024, 16)]
GPU_SHAPES = [
    (M, K, N, r)
    for M in (4096, 8192, 16384)
    for K, N in ((4096, 4096), (4096, 11008), (11008, 4096))
    for r in (8, 16, 64)
]
GPU_COMPARE_SHAPE = (8192, 4096, 4096, 16)
CPU_TARGETS = {(4096, 384, 384, 8): 0.90, (2048, 1024, 1024, 16): 0.95}  # treelora-torch / peft, full
GPU_TARGETS = {"forward_over_base": 1.10, "full_over_base": 1.15, "peft_over_treelora_full": 1.35}

_skip_gpu = pytest.mark.skipif(not HAS_CUDA, reason="GPU grid: needs a CUDA GPU")
_skip_cpu = pytest.mark.skipif(HAS_CUDA and not SMOKE, reason="CPU shapes: run on a machine without a GPU")
if SMOKE:
    SHAPES = [pytest.param(s, id="smoke-M{}-K{}-N{}-r{}".format(*s)) for s in SMOKE_SHAPES]
else:
    SHAPES = [pytest.param(s, marks=_skip_cpu, id="cpu-M{}-K{}-N{}-r{}".format(*s)) for s in CPU_SHAPES] + [
        pytest.param(s, marks=_skip_gpu, id="gpu-M{}-K{}-N{}-r{}".format(*s)) for s in GPU_SHAPES
    ]


@pytest.fixture(autouse=True, scope="module")
def _cpu_threads():
    if HAS_CUDA:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(before)


@dataclass
class Problem:
    """One shape's tensors, shared by every provider so they all see the same weights and inputs."""

    M: int
    K: int
    N: int
    r: int
    base: nn.Linear
    x: torch.Tensor
    dy: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor

    @property
    def scaling(self) -> float:
        return 2.0  # lora_alpha = 2 r, the common choice

    @property
    def shape(self) -> dict[str, int]:
        return {"M": self.M, "K": self.K, "N": self.N, "r": self.r}


def make_problem(M: int, K: int, N: int, r: int) -> Problem:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    base = nn.Linear(K, N, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_(True)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE, generator=gen)
    A = torch.randn(r, K, device=DEVICE, dtype=DTYPE, generator=gen) / K**0.5
    B = torch.randn(N, r, device=DEVICE, dtype=DTYPE, generator=gen) / r**0.5
    return Problem(M, K, N, r, base, x, dy, A, B)


def _backend_reasons(name: str, p: Problem) -> list[str]:
    backend = backends.backends_for(OP)[name]
    try:
        return backend.reasons(p.x, p.base.weight, p.base.bias, p.lora_A, p.lora_B, p.scaling, 0.0, 0)
    except Exception as err:  # a kernel module that fails to import is a reason too
        return [f"{type(err).__name__}: {err}"]


def make_forward(provider: str, p: Problem) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """A zero-argument forward for ``provider`` and the tensors whose gradients its backward produces."""
    if provider == "torch-base":
        return (lambda: F.linear(p.x, p.base.weight, p.base.bias)), [p.x]
    if provider == "peft":
        peft = pytest.importorskip("peft")
        from peft.tuners.lora.layer import Linear as PeftLinear

        config = peft.LoraConfig(r=p.r, lora_alpha=2 * p.r)
        layer = PeftLinear(p.base, "default", config=config, r=p.r, lora_alpha=2 * p.r)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(p.lora_A)
            layer.lora_B["default"].weight.copy_(p.lora_B)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return (lambda: layer(p.x)), [p.x, *params]
    backend = provider.removeprefix("treelora-")
    why = _backend_reasons(backend, p)
    if why:
        pytest.skip(f"{provider} cannot run this input: " + "; ".join(why))
    layer = LoRALinear(p.base, p.r, lora_alpha=2 * p.r)
    with torch.no_grad():
        layer.lora_A.copy_(p.lora_A)
        layer.lora_B.copy_(p.lora_B)

    def forward():
        with treelora.use_backend(backend):
            return layer(p.x)

    return forward, [p.x, layer.lora_A, layer.lora_B]


def _clear(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def make_full(forward: Callable[[], torch.Tensor], grads: list[torch.Tensor], dy: torch.Tensor):
    def full():
        _clear(grads)
        forward().backward(dy)

    return full


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_layer(benchmark, shape, provider, mode):
    p = make_problem(*shape)
    forward, grads = make_forward(provider, p)
    record(benchmark, op=OP, provider=provider, mode=mode, dtype=DTYPE, **p.shape)
    full = make_full(forward, grads, p.dy)
    if HAS_CUDA:
        benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(full, DEVICE)
    if mode == "forward":
        benchmark.pedantic(synchronized(forward, DEVICE), rounds=ROUNDS, warmup_rounds=2)
    elif mode == "full":
        benchmark.pedantic(synchronized(full, DEVICE), rounds=ROUNDS, warmup_rounds=2)
    else:

        def setup():
            _clear(grads)
            y = forward()
            if HAS_CUDA:
                torch.cuda.synchronize(DEVICE)
            return (y,), {}

        def backward(y):
            y.backward(p.dy)
            if HAS_CUDA:
                torch.cuda.synchronize(DEVICE)

        benchmark.pedantic(backward, setup=setup, rounds=ROUNDS, warmup_rounds=2)


def _side_by_side(providers: list[str], p: Problem, mode: str, rounds: int) -> dict[str, float]:
    fns = {}
    for provider in providers:
        forward, grads = make_forward(provider, p)
        fns[provider] = forward if mode == "forward" else make_full(forward, grads, p.dy)
    return alternating_medians(fns, rounds=rounds, warmup=2, device=DEVICE)


@_skip_cpu
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=["M{}-K{}-N{}-r{}".format(*s) for s in CPU_SHAPES])
def test_side_by_side_cpu(benchmark, shape):
    """treelora-torch vs PEFT vs the base linear, forward+backward, alternated in one loop (the CPU target)."""
    p = make_problem(*shape)
    medians = _side_by_side(["treelora-torch", "peft", "torch-base"], p, "full", rounds=CPU_COMPARE_ROUNDS)
    ratio = medians["treelora-torch"] / medians["peft"]
    target = CPU_TARGETS.get(shape)  # None for the smoke shape
    record(benchmark, op=OP, provider="treelora-torch", mode="full", dtype=DTYPE, **p.shape)
    benchmark.extra_info.update(
        median_s={k: round(v, 6) for k, v in medians.items()},
        treelora_over_peft=round(ratio, 4),
        treelora_over_base=round(medians["treelora-torch"] / medians["torch-base"], 4),
        target_treelora_over_peft=target,
        meets_target=None if target is None else ratio <= target,
    )
    print(
        f"\nM={p.M} K={p.K} N={p.N} r={p.r}: treelora/peft = {ratio:.3f} (target <= {target}), "
        f"treelora/base = {benchmark.extra_info['treelora_over_base']:.3f}, medians {medians}"
    )
    forward, grads = make_forward("treelora-torch", p)
    benchmark.pedantic(make_full(forward, grads, p.dy), rounds=3, warmup_rounds=0)


@pytest.mark.skipif(not HAS_CUDA or SMOKE, reason="GPU comparison at (8192, 4096, 4096, 16): needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_side_by_side_gpu(benchmark, backend):
    """treelora on one backend vs the base linear (forward, forward+backward) and vs PEFT (forward+backward)."""
    p = make_problem(*GPU_COMPARE_SHAPE)
    provider = f"treelora-{backend}"
    fwd = _side_by_side([provider, "torch-base", "peft"], p, "forward", rounds=30)
    full = _side_by_side([provider, "torch-base", "peft"], p, "full", rounds=30)
    ratios = {
        "forward_over_base": fwd[provider] / fwd["torch-base"],
        "full_over_base": full[provider] / full["torch-base"],
        "peft_over_treelora_forward": fwd["peft"] / fwd[provider],
        "peft_over_treelora_full": full["peft"] / full[provider],
    }
    meets = {
        "forward_over_base": ratios["forward_over_base"] <= GPU_TARGETS["forward_over_base"],
        "full_over_base": ratios["full_over_base"] <= GPU_TARGETS["full_over_base"],
        "peft_over_treelora_full": ratios["peft_over_treelora_full"] >= GPU_TARGETS["peft_over_treelora_full"],
    }
    record(benchmark, op=OP, provider=provider, mode="full", dtype=DTYPE, **p.shape)
    benchmark.extra_info.update(
        forward_median_s={k: round(v, 7) for k, v in fwd.items()},
        full_median_s={k: round(v, 7) for k, v in full.items()},
        ratios={k: round(v, 4) for k, v in ratios.items()},
        targets=GPU_TARGETS if backend != "torch" else None,
        meets_target=meets if backend != "torch" else None,
    )
    print(f"\n{provider} at {p.shape}: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    forward, grads = make_forward(provider, p)
    benchmark.pedantic(synchronized(make_full(forward, grads, p.dy), DEVICE), rounds=5, warmup_rounds=1)
