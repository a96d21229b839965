"""Gradient-similarity benchmark: ``pairwise_similarity`` (full (T, L) and gathered (L,) forms) on each backend vs
the eager reference, with achieved bandwidth against the device-copy bandwidth measured in the same run.

Providers (SPEC section 11 names): ``treelora-torch`` / ``treelora-triton`` / ``treelora-cuda`` (the backend forced
by ``treelora.use_backend``; one that cannot run the input is skipped with its reasons) and ``eager-reference``
(``pairwise_similarity_ref``, the tests' oracle: a Python loop over layers with one set of launches per layer, the
full (T, L) matrix even for the gathered form, and a host read of the index, as in the released code).

Shapes (T, L, D): on GPU the TreeLoRA signature bank of r = 16 adapters at (16, 64, 32768) and of a 7B model at
(10, 32, 1.25M); on CPU reduced versions (16, 64, 2048) and (10, 32, 16384). Bank fp32; metrics ``l1`` (TreeLoRA's
default, one pass) and ``l1_normalized`` (two passes in the kernels).

Every treelora benchmark stores in ``extra_info``: ``bytes`` (one read of the query and of the bank rows the form
needs), ``achieved_gbps``, ``copy_gbps`` (a large ``copy_`` timed in the same run: read + write bytes over time),
``fraction_of_copy_bandwidth``, and ``speedup_vs_eager_reference`` (the two alternated in one loop, medians
compared). Targets (GPU, large shapes): fraction >= 0.8 and speedup >= 5.

Run: ``python -m pytest bench/bench_similarity.py --benchmark-only -q`` (about half a minute on a 2-core CPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import alternating_medians, record, synchronized

import treelora
from treelora import backends, ops
from treelora.ops.similarity import OP

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ROUNDS = 20 if HAS_CUDA else 5
PROVIDERS = ("treelora-torch", "treelora-triton", "treelora-cuda", "eager-reference")
METRICS = ("l1", "l1_normalized")
FORMS = ("full", "gathered")
TARGETS = {"fraction_of_copy_bandwidth": 0.8, "speedup_vs_eager_reference": 5.0}

_skip_gpu = pytest.mark.skipif(not HAS_CUDA, reason="GPU shape: needs a CUDA GPU")
_skip_cpu = pytest.mark.skipif(HAS_CUDA, reason="reduced CPU shape: run on a machine without a GPU")
SHAPES = [
    pytest.param((16, 64, 32768), marks=_skip_gpu, id="gpu-T16-L64-D32768"),
    pytest.param((10, 32, 1_250_000), marks=_skip_gpu, id="gpu-T10-L32-D1250000"),
    pytest.param((16, 64, 2048), marks=_skip_cpu, id="cpu-T16-L64-D2048"),
    pytest.param((10, 32, 16384), marks=_skip_cpu, id="cpu-T10-L32-D16384"),
]


def _problem(T: int, L: int, D: int):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    query = torch.randn(L, D, device=DEVICE, generator=gen)
    bank = torch.randn(T, L, D, device=DEVICE, generator=gen)
    index = torch.randint(0, T, (L,), device=DEVICE, generator=gen)
    return query, bank, index


def _call(provider: str, query, bank, metric: str, index):
    """A zero-argument call of ``provider``, or a skip with the backend's reasons."""
    if provider == "eager-reference":
        return lambda: ops.pairwise_similarity_ref(query, bank, metric, index)
    backend = provider.removeprefix("treelora-")
    table = backends.backends_for(OP)
    try:
        why = table[backend].reasons(query, bank, metric, index, None) if backend in table else ["not registered"]
    except Exception as err:  # a kernel module that fails to import is a reason too
        why = [f"{type(err).__name__}: {err}"]
    if why:
        pytest.skip(f"{provider} cannot run this input: " + "; ".join(why))

    def run():
        with treelora.use_backend(backend):
            return ops.pairwise_similarity(query, bank, metric, index)

    return run


def _bytes(query, bank, form: str) -> int:
    rows = bank.shape[0] if form == "full" else 1
    return query.numel() * query.element_size() + rows * query.numel() * bank.element_size()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_similarity(benchmark, copy_gbps, shape, form, metric, provider):
    T, L, D = shape
    query, bank, index = _problem(T, L, D)
    idx = index if form == "gathered" else None
    fn = _call(provider, query, bank, metric, idx)
    record(
        benchmark, op=OP, provider=provider, mode="forward", dtype=bank.dtype, form=form, metric=metric, T=T, L=L, D=D
    )
    info = benchmark.extra_info
    info.update(bytes=_bytes(query, bank, form), copy_gbps=round(copy_gbps, 1))
    if provider != "eager-reference":
        eager = _call("eager-reference", query, bank, metric, idx)
        medians = alternating_medians({"provider": fn, "eager": eager}, rounds=7 if HAS_CUDA else 3, device=DEVICE)
        achieved = info["bytes"] / medians["provider"] / 1e9
        info.update(
            achieved_gbps=round(achieved, 1),
            fraction_of_copy_bandwidth=round(achieved / copy_gbps, 4),
            speedup_vs_eager_reference=round(medians["eager"] / medians["provider"], 2),
            targets=TARGETS if HAS_CUDA and provider != "treelora-torch" else None,
        )
        print(
            f"\n{provider} {form} {metric} {shape}: {achieved:.1f} GB/s = {info['fraction_of_copy_bandwidth']:.2f}"
            f" of copy ({copy_gbps:.1f} GB/s), {info['speedup_vs_eager_reference']}x eager"
        )
    benchmark.pedantic(synchronized(fn, DEVICE), rounds=ROUNDS, warmup_rounds=1)
