"""``python -m treelora demo``: each op once on small CPU tensors, with its error against a float64 reference."""

from __future__ import annotations

import torch

from treelora import backends, ops


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def main(seed: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    M, K, N, r = 64, 96, 80, 8
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W, bias = torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    A = (torch.randn(r, K, generator=g) / K**0.5).requires_grad_()
    B = (torch.randn(N, r, generator=g) / r**0.5).requires_grad_()
    backend = backends.select("lora_linear", x, W, bias, A, B, 2.0, 0.0, 0).name
    y = ops.lora_linear(x, W, bias, A, B, scaling=2.0)
    y.square().mean().backward()
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = ops.lora_linear_ref(x64, W.double(), bias.double(), A64, B64, 2.0)
    y64.square().mean().backward()
    print(
        f"lora_linear [{backend}] (M, K, N, r) = ({M}, {K}, {N}, {r}): max |error| vs fp64 "
        f"y {_err(y, y64):.1e}, dx {_err(x.grad, x64.grad):.1e}, dA {_err(A.grad, A64.grad):.1e}, "
        f"dB {_err(B.grad, B64.grad):.1e}"
    )

    T, L, D = 5, 4, 256
    q, bank = torch.randn(L, D, generator=g), torch.randn(T, L, D, generator=g)
    index = torch.tensor([3, 0, 4, 1])
    for metric in ops.METRICS:
        full = ops.pairwise_similarity(q, bank, metric)
        gathered = ops.pairwise_similarity(q, bank, metric, index=index)
        ref = ops.pairwise_similarity_ref(q.double(), bank.double(), metric)
        print(
            f"pairwise_similarity {metric:<13} (T, L, D) = ({T}, {L}, {D}): row of layer 0 {full[:, 0].tolist()}"
            f"\n    gathered {[round(v, 4) for v in gathered.tolist()]}  max |error| vs fp64 {_err(full, ref):.1e}"
        )

    p = torch.randn(10, generator=g)
    grad = torch.randn(10, generator=g)
    m, v = torch.zeros(10), torch.zeros(10)
    before = p.clone()
    ops.masked_adamw_([p], [grad], [m], [v], 1, lr=0.1, density=0.3)
    moved = (p != before).nonzero().flatten().tolist()
    top = grad.abs().topk(3).indices.sort().values.tolist()
    print(f"masked_adamw_ density=0.3 on 10 entries: moved entries {moved} (the 3 largest |grad|: {top})")
    return 0
