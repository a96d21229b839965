"""The cuda backend of pairwise_similarity and accumulate_and_compare_ against the float64 reference and the torch
backend: every metric, full and gathered forms, dense and ragged layouts, fp32/fp16/bf16 query and bank, awkward
sizes (D not a multiple of the vector width, L = 1, T = 1, misaligned and strided inputs, views never read or
written past their ends). Needs a GPU.

Each test's body is a ``check_*`` function taking the device, which tests/test_cuda_emulated.py also runs on CPU
tensors through the CUDA emulator (smaller shapes, same references and tolerances)."""

from __future__ import annotations

import pytest
import torch

from tests.utils import assert_close_to_ref
from treelora import use_backend
from treelora.ops.similarity import METRICS, accumulate_and_compare_, pairwise_similarity, pairwise_similarity_ref

pytestmark = [pytest.mark.requires_cuda, pytest.mark.requires_cuda_ext]
DEVICE = "cuda"

# (T, L, D): one typical shape, then the awkward ones.
SHAPES = [(4, 3, 1024), (1, 1, 1), (2, 3, 7), (3, 2, 4099), (1, 2, 8195), (5, 1, 33)]
# Ragged layer boundaries: widths 5, 4096, 1, 98, 8300 (one chunk, exactly one chunk, one element, three chunks).
RAGGED_OFFSETS = (0, 5, 4101, 4102, 4200, 12500)
RAGGED_INDEX = (2, 0, 1, 1, 0)  # the gathered row of each layer: every row of the T = 3 bank, out of order
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float16),
]


def _ids(dt):
    return f"{str(dt[0])[6:]}-{str(dt[1])[6:]}"


def _check(name, out, ref64, baseline):
    assert out.dtype == torch.float32
    assert_close_to_ref(name, out, ref64, baseline, dtype=torch.float32)


def _inputs(T, L, D, q_dtype, b_dtype, device=DEVICE):
    q = torch.randn(L, D, device=device).to(q_dtype)
    bank = torch.randn(T, L, D, device=device).to(b_dtype)
    index = torch.randint(0, T, (L,), device=device)
    return q, bank, index


def check_dense(metric, shape, dtypes, device=DEVICE):
    q, bank, index = _inputs(*shape, *dtypes, device=device)
    ref_full = pairwise_similarity_ref(q.double(), bank.double(), metric)
    ref_gathered = pairwise_similarity_ref(q.double(), bank.double(), metric, index.cpu())
    with use_backend("torch"):
        base_full = pairwise_similarity(q, bank, metric)
        base_gathered = pairwise_similarity(q, bank, metric, index)
    with use_backend("cuda"):
        full = pairwise_similarity(q, bank, metric)
        gathered = pairwise_similarity(q, bank, metric, index)
    _check(f"{metric} full", full, ref_full, base_full)
    _check(f"{metric} gathered", gathered, ref_gathered, base_gathered)


@pytest.mark.parametrize("dtypes", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("metric", METRICS)
def test_dense_matches_reference(metric, shape, dtypes):
    check_dense(metric, shape, dtypes)


def check_ragged(metric, dtypes, offsets=RAGGED_OFFSETS, index=RAGGED_INDEX, device=DEVICE):
    offsets = list(offsets)
    S, T = offsets[-1], 3
    q = torch.randn(S, device=device).to(dtypes[0])
    bank = torch.randn(T, S, device=device).to(dtypes[1])
    index = torch.tensor(index, device=device)
    ref_full = pairwise_similarity_ref(q.double(), bank.double(), metric, offsets=offsets)
    ref_gathered = pairwise_similarity_ref(q.double(), bank.double(), metric, index.cpu(), offsets=offsets)
    with use_backend("torch"):
        base_full = pairwise_similarity(q, bank, metric, offsets=offsets)
        base_gathered = pairwise_similarity(q, bank, metric, index, offsets=offsets)
    with use_backend("cuda"):
        full = pairwise_similarity(q, bank, metric, offsets=offsets)
        gathered = pairwise_similarity(q, bank, metric, index, offsets=offsets)
    _check(f"ragged {metric} full", full, ref_full, base_full)
    _check(f"ragged {metric} gathered", gathered, ref_gathered, base_gathered)


@pytest.mark.parametrize("dtypes", DTYPES[:3], ids=_ids)
@pytest.mark.parametrize("metric", METRICS)
def test_ragged_matches_reference(metric, dtypes):
    check_ragged(metric, dtypes)


def check_strided_and_misaligned(metric, device=DEVICE):
    """A bank that is a slice of a larger (capacity-doubled) buffer with an odd row length, and a query that starts
    one element into its storage: the kernels fall back from 16-byte vectors where alignment is lost. Everything of
    the storage outside the views is NaN, so a read past a view would show."""
    L, D, T = 3, 331, 4
    storage = torch.full((2 * T, L * D + 5), float("nan"), device=device)
    storage[:T, : L * D] = torch.randn(T, L * D, device=device)
    storage = storage.to(torch.bfloat16)
    bank = storage[:T, : L * D]  # rows 2 * (L * D + 5) bytes apart: not a multiple of 16
    q = torch.cat([torch.full((1,), float("nan"), device=device), torch.randn(L * D, device=device)])[1:]
    offsets = [0, D, 2 * D, 3 * D]
    index = torch.tensor([3, 0, 2], device=device)
    ref = pairwise_similarity_ref(q.double(), bank.double(), metric, offsets=offsets)
    ref_g = pairwise_similarity_ref(q.double(), bank.double(), metric, index.cpu(), offsets=offsets)
    with use_backend("torch"):
        base = pairwise_similarity(q, bank, metric, offsets=offsets)
        base_g = pairwise_similarity(q, bank, metric, index, offsets=offsets)
    with use_backend("cuda"):
        out = pairwise_similarity(q, bank, metric, offsets=offsets)
        out_g = pairwise_similarity(q, bank, metric, index, offsets=offsets)
    _check(f"strided {metric}", out, ref, base)
    _check(f"strided {metric} gathered", out_g, ref_g, base_g)


@pytest.mark.parametrize("metric", ["l1", "cosine", "l1_normalized"])
def test_strided_and_misaligned_inputs(metric):
    check_strided_and_misaligned(metric)


def check_padding_outside_the_views_is_never_read(metric, bank_dtype, device=DEVICE):
    """Query, bank rows, running mean and sample are views into wider buffers with NaN after their ends, rows 16-byte
    aligned so that the vector path runs up to layer ends that are not multiples of 8: a read past a view shows as
    NaN, and the running mean's tail must keep its NaN (nothing written past the view)."""
    offsets, T = list(RAGGED_OFFSETS), 3
    S, width = offsets[-1], RAGGED_OFFSETS[-1] + 12  # 12512 entries per buffer row: a multiple of 8

    def padded(rows, dtype, scale=1.0):
        buf = torch.full((rows, width), float("nan"), device=device)
        buf[:, :S] = torch.randn(rows, S, device=device) * scale
        return buf.to(dtype)

    q, bank_buf, mean_buf = padded(1, torch.float32)[0, :S], padded(T, bank_dtype), padded(1, torch.float32)[0]
    bank, mean, sample = bank_buf[:, :S], mean_buf[:S], padded(1, bank_dtype)[0, :S]
    index = torch.tensor(RAGGED_INDEX, device=device)
    mean64 = mean.double() + (sample.double() - mean.double()) / 3
    refs = [
        pairwise_similarity_ref(q.double(), bank.double(), metric, offsets=offsets),
        pairwise_similarity_ref(q.double(), bank.double(), metric, index.cpu(), offsets=offsets),
        pairwise_similarity_ref(mean64, bank.double(), metric, index.cpu(), offsets=offsets),
    ]
    with use_backend("torch"):
        base = [
            pairwise_similarity(q, bank, metric, offsets=offsets),
            pairwise_similarity(q, bank, metric, index, offsets=offsets),
            accumulate_and_compare_(mean.clone(), sample, 3, bank, index, metric, offsets=offsets),
        ]
    with use_backend("cuda"):
        outs = [
            pairwise_similarity(q, bank, metric, offsets=offsets),
            pairwise_similarity(q, bank, metric, index, offsets=offsets),
            accumulate_and_compare_(mean, sample, 3, bank, index, metric, offsets=offsets),
        ]
    for name, out, ref, b in zip(("full", "gathered", "accumulate"), outs, refs, base):
        _check(f"padded {metric} {name}", out, ref, b)
    assert torch.isnan(mean_buf[S:]).all(), "the running mean was written past its end"


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("metric", METRICS)
def test_padding_outside_the_views_is_never_read(metric, bank_dtype):
    check_padding_outside_the_views_is_never_read(metric, bank_dtype)


def check_accumulate(metric, count_on_device, sample_dtype, shape=(3, 4, 2053), index=(1, 2, 0, 1), device=DEVICE):
    T, L, D = shape
    mean = torch.randn(L, D, device=device)
    sample = torch.randn(L, D, device=device).to(sample_dtype)
    bank = torch.randn(T, L, D, device=device).to(torch.bfloat16)
    index = torch.tensor(index, device=device)
    count = torch.tensor(7.0, device=device) if count_on_device else 7
    mean64 = mean.double() + (sample.double() - mean.double()) / 7
    ref = pairwise_similarity_ref(mean64, bank.double(), metric, index.cpu())
    base_mean = mean.clone()
    with use_backend("torch"):
        base = accumulate_and_compare_(base_mean, sample, count, bank, index, metric)
    with use_backend("cuda"):
        out = accumulate_and_compare_(mean, sample, count, bank, index, metric)
    assert_close_to_ref("running mean", mean, mean64, base_mean, dtype=torch.float32)
    _check(f"accumulate {metric}", out, ref, base)


@pytest.mark.parametrize("sample_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count_on_device", [False, True], ids=["count-number", "count-tensor"])
@pytest.mark.parametrize("metric", METRICS)
def test_accumulate_and_compare(metric, count_on_device, sample_dtype):
    check_accumulate(metric, count_on_device, sample_dtype)


def check_reproducible(shape=(6, 5, 70001), device=DEVICE, between=None):
    """Two runs of every metric give the same bits; ``between()``, when given, runs between them (the emulated lane
    reverses the order of blocks and threads there)."""
    q, bank, _ = _inputs(*shape, torch.float32, torch.bfloat16, device=device)
    with use_backend("cuda"):
        first = [pairwise_similarity(q, bank, m) for m in METRICS]
    if between is not None:
        between()
    with use_backend("cuda"):
        again = [pairwise_similarity(q, bank, m) for m in METRICS]
    for m, a, b in zip(METRICS, first, again):
        assert torch.equal(a, b), f"{m}: two runs differ (the reduction must have a fixed order)"


def test_results_are_bitwise_reproducible():
    check_reproducible()


def check_out_of_range_index(device=DEVICE):
    q, bank, _ = _inputs(3, 2, 64, torch.float32, torch.float32, device=device)
    index = torch.tensor([1, 3], device=device)  # 3 is outside the bank; a device index cannot be checked on the host
    with use_backend("cuda"):
        out = pairwise_similarity(q, bank, "l1", index)
    ref = pairwise_similarity_ref(q.double(), bank.double(), "l1", torch.tensor([1, 0]))
    assert torch.isnan(out[1]) and not torch.isnan(out[0])
    assert_close_to_ref("valid layer", out[:1], ref[:1], dtype=torch.float32)


def test_out_of_range_index_gives_nan_not_a_fault():
    check_out_of_range_index()
