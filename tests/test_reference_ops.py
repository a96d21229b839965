"""The reference ops (the CPU fallback and the oracle of every kernel) against independent float64 computations
written with NumPy, entry by entry, plus input validation that names the bad argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.utils import assert_close_to_ref
from treelora import ops, use_backend
from treelora.kernels.constants import topk_count
from treelora.kernels.torch import lora as torch_lora

# --- lora_linear --------------------------------------------------------------------------------------------------


def _lora_numpy(x, W, b, A, B, s, keep=None, p=0.0):
    """y and the gradients of sum(y * dy) w.r.t. x, A, B, by the chain rule written out in NumPy float64."""
    xd = x if keep is None else x * keep / (1 - p)
    v = xd @ A.T  # (M, r)
    y = x @ W.T + (0 if b is None else b) + s * v @ B.T
    return y, xd, v


@pytest.mark.parametrize("dropout", [False, True], ids=["p0", "dropout"])
@pytest.mark.parametrize("frozen_rank", [0, 2])
def test_lora_linear_ref_matches_numpy(dropout, frozen_rank):
    rng = np.random.default_rng(0)
    M, K, N, r, s, p = 7, 5, 6, 4, 1.5, 0.25
    x, W, b = rng.normal(size=(M, K)), rng.normal(size=(N, K)), rng.normal(size=N)
    A, B, dy = rng.normal(size=(r, K)), rng.normal(size=(N, r)), rng.normal(size=(M, N))
    keep = (rng.random((M, K)) > p).astype(np.float64) if dropout else None
    y, xd, v = _lora_numpy(x, W, b, A, B, s, keep, p)
    du = s * dy @ B  # (M, r)
    dx = dy @ W + (du @ A) * (1 if keep is None else keep / (1 - p))
    dA, dB = du.T @ xd, s * dy.T @ v
    dA[:frozen_rank] = 0
    dB[:, :frozen_rank] = 0

    t = {k: torch.tensor(v_, requires_grad=k in ("x", "A", "B")) for k, v_ in dict(x=x, A=A, B=B).items()}
    mask = None if keep is None else torch.tensor(keep, dtype=torch.bool)
    out = ops.lora_linear_ref(t["x"], torch.tensor(W), torch.tensor(b), t["A"], t["B"], s, p, mask, frozen_rank)
    out.backward(torch.tensor(dy))
    np.testing.assert_allclose(out.detach().numpy(), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(t["x"].grad.numpy(), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(t["A"].grad.numpy(), dA, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(t["B"].grad.numpy(), dB, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("frozen_rank", [0, 3])
@pytest.mark.parametrize("M", [0, 1, 37])
def test_torch_backend_matches_reference(M, frozen_rank):
    K, N, r, s = 24, 20, 5, 0.75
    x = torch.randn(2, M, K)  # 3-D input: the op flattens leading dimensions
    W, b = torch.randn(N, K), torch.randn(N)
    A, B = torch.randn(r, K), torch.randn(N, r)
    dy = torch.randn(2, M, N)
    xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
    with use_backend("torch"):
        y = ops.lora_linear(xs, W, b, As, Bs, s, frozen_rank=frozen_rank)
    y.backward(dy)
    x64, A64, B64 = (t.double().requires_grad_() for t in (x, A, B))
    y64 = ops.lora_linear_ref(x64, W.double(), b.double(), A64, B64, s, frozen_rank=frozen_rank)
    y64.backward(dy.double())
    yb = ops.lora_linear_ref(x, W, b, A, B, s)  # plain fp32 torch: the baseline of the tolerance rule
    assert_close_to_ref("y", y, y64, yb)
    for name, got, ref in (("dx", xs.grad, x64.grad), ("dA", As.grad, A64.grad), ("dB", Bs.grad, B64.grad)):
        # fp32 gradient error of plain torch at these sizes is ~1e-6; the floor covers it.
        assert_close_to_ref(name, got, ref)
    assert torch.count_nonzero(As.grad[:frozen_rank]) == 0 and torch.count_nonzero(Bs.grad[:, :frozen_rank]) == 0


def test_torch_backend_dropout_mask_is_shared_by_forward_and_backward():
    torch.manual_seed(3)
    M, K, N, r, p = 64, 32, 16, 4, 0.5
    x, W = torch.randn(M, K, requires_grad=True), torch.randn(N, K)
    A, B = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    with use_backend("torch"):
        y2d, saved, state = torch_lora.lora_linear_fwd(x.detach(), W, None, A.detach(), B.detach(), 2.0, p, 0, True)
        mask = torch_lora.lora_linear_dropout_mask(saved, state)
    assert mask.dtype == torch.bool and mask.shape == (M, K)
    keep_rate = mask.float().mean().item()
    assert abs(keep_rate - (1 - p)) < 0.05, keep_rate  # 2048 Bernoulli(0.5) draws: sd ~ 0.011
    ref = ops.lora_linear_ref(
        x.detach().double(), W.double(), None, A.detach().double(), B.detach().double(), 2.0, p, mask
    )
    assert_close_to_ref("y with regenerated mask", y2d, ref, dtype=torch.float32)


def test_scale_zero_is_bitwise_the_base_op():
    x, W, b = torch.randn(9, 16), torch.randn(12, 16), torch.randn(12)
    A, B = torch.randn(4, 16), torch.randn(12, 4)
    with use_backend("torch"):
        y = ops.lora_linear(x, W, b, A, B, 0.0)
    assert torch.equal(y, torch.addmm(b, x, W.t()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), "rank 0"),
        (dict(weight=torch.randn(6, 7)), "weight"),
        (dict(bias=torch.randn(5)), "bias"),
        (dict(lora_A=torch.randn(2, 9)), "lora_A"),
        (dict(lora_B=torch.randn(6, 3)), "lora_B"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(scaling=float("nan")), "scaling"),
        (dict(frozen_rank=3), "frozen_rank"),
        (dict(x=torch.randn(4, 8, dtype=torch.float64).long()), "x"),
    ],
)
def test_lora_linear_validation_names_the_argument(kwargs, match):
    args = dict(
        x=torch.randn(4, 8),
        weight=torch.randn(6, 8),
        bias=None,
        lora_A=torch.randn(2, 8),
        lora_B=torch.randn(6, 2),
        scaling=1.0,
    )
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.lora_linear(**args)


def test_trainable_weight_falls_back_to_reference_and_warns_once():
    import treelora.ops.lora_linear as mod

    mod._warned_trainable_weight = False
    x, W = torch.randn(3, 4), torch.randn(5, 4, requires_grad=True)
    A, B = torch.randn(2, 4), torch.randn(5, 2)
    with pytest.warns(UserWarning, match="requires grad"):
        y = ops.lora_linear(x, W, None, A, B, 1.0)
    y.sum().backward()
    assert W.grad is not None  # the reference path gives the weight its gradient


# --- pairwise_similarity ------------------------------------------------------------------------------------------


def _metric_numpy(q, g, metric):
    if metric == "dot":
        return float(np.dot(q, g))
    if metric == "l1":
        return float(np.abs(q - g).sum())
    if metric == "sqeuclidean":
        return float(((q - g) ** 2).sum())
    if metric == "cosine":
        return float(np.dot(q, g) / max(np.linalg.norm(q) * np.linalg.norm(g), 1e-12))
    qn, gn = q / max(np.abs(q).sum(), 1e-12), g / max(np.abs(g).sum(), 1e-12)
    return float(np.abs(qn - gn).sum())


@pytest.mark.parametrize("metric", ops.METRICS)
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
def test_similarity_torch_backend_and_reference_match_numpy(metric, ragged):
    rng = np.random.default_rng(1)
    T = 4
    widths = [5, 9, 1, 7] if ragged else [6, 6, 6, 6]
    offsets = np.concatenate([[0], np.cumsum(widths)]).tolist()
    q = rng.normal(size=offsets[-1])
    bank = rng.normal(size=(T, offsets[-1]))
    bank[2, offsets[1] : offsets[2]] = 0.0  # a zero layer: cosine / l1_normalized take their eps branch
    expected = np.array(
        [
            [
                _metric_numpy(q[offsets[l] : offsets[l + 1]], bank[t, offsets[l] : offsets[l + 1]], metric)
                for l in range(len(widths))
            ]
            for t in range(T)
        ]
    )
    index = torch.tensor([3, 2, 0, 1])
    if ragged:
        args = (torch.tensor(q), torch.tensor(bank))
        kw = dict(offsets=offsets)
    else:
        args = (torch.tensor(q).view(4, 6), torch.tensor(bank).view(T, 4, 6))
        kw = {}
    with use_backend("torch"):
        full = ops.pairwise_similarity(*args, metric=metric, **kw)
        gathered = ops.pairwise_similarity(*args, metric=metric, index=index, **kw)
    ref = ops.pairwise_similarity_ref(*args, metric=metric, **kw)
    np.testing.assert_allclose(full.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gathered.numpy(), expected[index.numpy(), np.arange(4)], rtol=1e-12, atol=1e-12)


def test_similarity_bf16_bank_accumulates_in_fp32():
    q = torch.randn(3, 4096)
    bank = torch.randn(5, 3, 4096).bfloat16()
    out = ops.pairwise_similarity(q, bank, "l1")
    assert out.dtype == torch.float32
    ref = ops.pairwise_similarity_ref(q.double(), bank.double(), "l1")
    assert_close_to_ref("l1 bf16 bank", out, ref, dtype=torch.float32)


def test_accumulate_and_compare_is_running_mean_then_gathered():
    samples = [torch.randn(2, 8) for _ in range(5)]
    bank = torch.randn(3, 2, 8)
    index = torch.tensor([2, 0])
    mean = torch.zeros(2, 8)
    for n, s in enumerate(samples, start=1):
        out = ops.accumulate_and_compare_(mean, s, n, bank, index, "sqeuclidean")
    expected_mean = torch.stack(samples).double().mean(0)
    assert_close_to_ref("running mean", mean, expected_mean)
    assert_close_to_ref(
        "gathered", out, ops.pairwise_similarity_ref(expected_mean, bank.double(), "sqeuclidean", index)
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, b: ops.pairwise_similarity(q, b, "manhattan"), "metric"),
        (lambda q, b: ops.pairwise_similarity(q, b[:, :1]), "bank"),
        (lambda q, b: ops.pairwise_similarity(q[0], b), "query"),
        (lambda q, b: ops.pairwise_similarity(q, b, index=torch.tensor([0])), "index"),
        (lambda q, b: ops.pairwise_similarity(q, b, index=torch.tensor([0, 5])), "index"),
        (lambda q, b: ops.pairwise_similarity(q.flatten(), b.flatten(1), offsets=[0, 3, 9]), "offsets"),
        (lambda q, b: ops.pairwise_similarity(q.flatten(), b.flatten(1), offsets=[0, 4, 4, 8]), "offsets"),
        (lambda q, b: ops.pairwise_similarity(q, b[:0], index=torch.tensor([0, 0])), "bank"),
    ],
)
def test_similarity_validation_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError, IndexError), match=match):
        call(torch.randn(2, 4), torch.randn(3, 2, 4))


# --- masked updates -----------------------------------------------------------------------------------------------


def _adamw_numpy(p, g, m, v, step, sel, lr, b1, b2, eps, wd):
    p, m, v = p.copy(), m.copy(), v.copy()
    for i in np.flatnonzero(sel):
        m[i] = b1 * m[i] + (1 - b1) * g[i]
        v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
        mhat, vhat = m[i] / (1 - b1**step), v[i] / (1 - b2**step)
        p[i] = p[i] * (1 - lr * wd) - lr * mhat / (math.sqrt(vhat) + eps)
    return p, m, v


def _selection(kind, g):
    """(the mask argument for a parameter shaped like g, the flat boolean selection it denotes)"""
    n = g.size
    if kind == "all":
        return None, np.ones(n, bool)
    if kind == "bool":
        sel = np.arange(n) % 3 == 0
        return torch.tensor(sel).view(g.shape), sel
    if kind == "uint8":
        sel = np.arange(n) % 2 == 1
        return torch.tensor(sel.astype(np.uint8)).view(g.shape), sel
    if kind == "index":
        idx = np.array([0, n - 1, 2, 2], dtype=np.int64)  # a duplicate counts once
        sel = np.zeros(n, bool)
        sel[idx] = True
        return torch.tensor(idx), sel
    if kind == "empty":
        return torch.zeros(g.shape, dtype=torch.bool), np.zeros(n, bool)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["all", "bool", "uint8", "index", "empty"])
def test_masked_adamw_matches_numpy_and_leaves_unselected_bits(kind):
    rng = np.random.default_rng(2)
    shapes = [(5, 3), (7,)]
    ps = [rng.normal(size=s) for s in shapes]
    gs = [rng.normal(size=s) for s in shapes]
    ms = [rng.normal(size=s) * 0.1 for s in shapes]
    vs = [rng.random(size=s) * 0.1 for s in shapes]
    step, lr, b1, b2, eps, wd = 4, 0.05, 0.8, 0.95, 1e-6, 0.1
    masks, sels = zip(*(_selection(kind, g) for g in gs))
    tp = [torch.tensor(a, dtype=torch.float32) for a in ps]
    tm = [torch.tensor(a, dtype=torch.float32) for a in ms]
    tv = [torch.tensor(a, dtype=torch.float32) for a in vs]
    before = [(a.clone(), b.clone(), c.clone()) for a, b, c in zip(tp, tm, tv)]
    ops.masked_adamw_(
        tp,
        [torch.tensor(g, dtype=torch.float32) for g in gs],
        tm,
        tv,
        step,
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=wd,
        masks=None if kind == "all" else [m for m in masks],
    )
    for i in range(len(shapes)):
        want = _adamw_numpy(
            ps[i].reshape(-1),
            gs[i].reshape(-1),
            ms[i].reshape(-1),
            vs[i].reshape(-1),
            step,
            sels[i],
            lr,
            b1,
            b2,
            eps,
            wd,
        )
        for got, ref, old in zip((tp[i], tm[i], tv[i]), want, before[i]):
            np.testing.assert_allclose(got.reshape(-1).numpy(), ref, rtol=2e-6, atol=1e-7)
            unselected = torch.tensor(~sels[i])
            assert torch.equal(got.reshape(-1)[unselected], old.reshape(-1)[unselected])


def test_masked_adamw_dense_equals_torch_adamw_over_steps():
    torch.manual_seed(0)
    params = [torch.randn(6, 4), torch.randn(9)]
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step in range(1, 6):
        grads = [torch.randn_like(p) for p in params]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        ops.masked_adamw_(params, grads, ms, vs, step, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    for p, r in zip(params, ref):
        assert_close_to_ref("AdamW after 5 steps", p, r.detach().double())


def test_masked_sgd_dense_equals_torch_sgd_and_masked_is_untouched():
    torch.manual_seed(0)
    params = [torch.randn(10)]
    ref = [params[0].clone().requires_grad_()]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=0.01)
    bufs = [torch.zeros(10)]
    for _ in range(4):
        g = torch.randn(10)
        ref[0].grad = g.clone()
        opt.step()
        ops.masked_sgd_(params, [g], bufs, lr=0.1, momentum=0.9, weight_decay=0.01)
    assert_close_to_ref("SGD momentum after 4 steps", params[0], ref[0].detach().double())
    p, b = params[0].clone(), bufs[0].clone()
    mask = torch.arange(10) < 4
    ops.masked_sgd_(params, [torch.randn(10)], bufs, lr=0.1, momentum=0.9, masks=[mask])
    assert torch.equal(params[0][~mask], p[~mask]) and torch.equal(bufs[0][~mask], b[~mask])
    assert not torch.equal(params[0][mask], p[mask])


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 1.0])
def test_density_selects_top_ceil_rho_n_by_magnitude(density):
    g = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.1, 0.0, 4.0, -2.5, 0.2, 1.5])
    # p = 1 with weight decay: every selected entry moves, even the one whose gradient is 0.
    p, m, v = torch.ones(10), torch.zeros(10), torch.zeros(10)
    ops.masked_adamw_([p], [g], [m], [v], 1, lr=1.0, weight_decay=0.1, density=density)
    k = topk_count(10, density)
    assert k == math.ceil(density * 10)
    expected = set(np.argsort(-np.abs(g.numpy()), kind="stable")[:k].tolist())
    assert set(torch.nonzero(p != 1).flatten().tolist()) == expected


def test_density_ties_at_threshold_are_all_selected():
    g = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    p, m, v = torch.zeros(5), torch.zeros(5), torch.zeros(5)
    ops.masked_adamw_([p], [g], [m], [v], 1, lr=1.0, density=0.4)  # k = 2, but three entries tie at |g| = 2
    assert torch.nonzero(p).flatten().tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(params=[]), "params is empty"),
        (dict(grads=[torch.zeros(3)]), "grads"),
        (dict(exp_avgs=[torch.zeros(4), torch.zeros(4)]), "exp_avgs"),
        (dict(step=0), "step"),
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(masks=[torch.zeros(3, dtype=torch.bool)]), "masks"),
        (dict(masks=[torch.tensor([0, 4])]), "masks"),
        (dict(masks=[None], density=0.5), "either masks or density"),
    ],
)
def test_masked_adamw_validation_names_the_argument(kwargs, match):
    args = dict(
        params=[torch.zeros(4)],
        grads=[torch.ones(4)],
        exp_avgs=[torch.zeros(4)],
        exp_avg_sqs=[torch.zeros(4)],
        step=1,
        lr=0.1,
    )
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError, IndexError), match=match):
        ops.masked_adamw_(**args)


def test_masked_sgd_requires_buffers_with_momentum():
    with pytest.raises(ValueError, match="momentum_buffers"):
        ops.masked_sgd_([torch.zeros(3)], [torch.ones(3)], None, lr=0.1, momentum=0.9)
