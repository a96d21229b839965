"""Task selection: the LCB tree search on a synthetic stream with known distances, and the released code's softmax
sampler on hand-computed cases (PAPER.md §1.2(d))."""

from __future__ import annotations

import math

import pytest
import torch

from treelora import ops
from treelora.cl import GradientTree, LCBSearch, TaskBank
from treelora.cl.search import LastSearch, RandomSearch, SoftmaxSampler


def _stream(seed: int, steps: int, T: int = 8, L: int = 4, D: int = 64):
    """Bank of T random signatures; the current task's true signature is, per layer, a different stored task plus a
    small offset; each step observes a noisy sample. Returns (fraction of best pulls per step, cumulative regret)
    where the regret uses the true normalised distances."""
    gen = torch.Generator().manual_seed(seed)
    bank = TaskBank(L, D)
    for k in range(T):
        bank.add(torch.randn(L, D, generator=gen), k)
    best = torch.randperm(T, generator=gen)[:L]
    layers = torch.arange(L)
    target = bank.signatures[best, layers] + 0.3 * torch.randn(L, D, generator=gen)
    scale = bank.spread()
    true = ops.pairwise_similarity(target, bank.signatures, "l1") / scale  # (T, L)
    assert torch.equal(true.argmin(0), best)
    search = LCBSearch(GradientTree.from_signatures(bank.signatures), L, generator=torch.Generator().manual_seed(seed))
    mean = torch.zeros(L, D)
    hits, regret = [], []
    for t in range(steps):
        k = search.select()
        sample = target + torch.randn(L, D, generator=gen)
        distances = ops.accumulate_and_compare_(mean, sample, t + 1, bank.signatures, k, "l1")
        search.update(distances / scale)
        hits.append((k == best).float().mean())
        regret.append((true[k, layers] - true.amin(0)).sum())
    return torch.stack(hits), torch.stack(regret).cumsum(0)


def test_lcb_pulls_the_most_similar_task_and_regret_is_sublinear():
    hits, regret = _stream(seed=0, steps=600)
    after_warmup = hits[50:].mean().item()
    ratio = (regret[599] / regret[299]).item()
    print(f"best pulls after 50 warm-up steps: {after_warmup:.3f}; regret(600) / regret(300) = {ratio:.2f}")
    assert after_warmup >= 0.8
    assert ratio < 1.5  # linear regret would double


def _tree_3():
    """mean_dot tree over 3 tasks, L = 2, D = 1: module 0 values 3, 0, 2 (mean 5/3, scores 5, 0, 10/3, lower median
    10/3): root.left = [0, 2], root.right = [1] (a leaf). Module 1 values 0.5, 1 for [0, 2] (mean 0.75, scores
    0.375, 0.75, lower median 0.375, everything >= it, halved): root.left's threshold is 0.375."""
    G = torch.tensor([[[3.0], [0.5]], [[0.0], [5.0]], [[2.0], [1.0]]])
    tree = GradientTree.from_signatures(G, split="mean_dot")
    assert tree.root_split() == ([0, 2], [1])
    assert tree.nodes[tree.nodes[0].left].threshold == pytest.approx(0.375)
    return tree


def _released_distribution(n, dist_sum, t, T, in_left, factor_left, factor_right, first):
    """PAPER.md §1.2(d) steps 1-8 written out on Python lists: n[k][l] pulls, dist_sum[k][l] summed L1 distances."""
    k_count, L = len(n), len(n[0])
    log_term = math.sqrt(math.log(2 * T * (t + 1) * (t + 2)))
    score = [[0.0] * L for _ in range(k_count)]
    for k in range(k_count):
        for l in range(L):
            mu = -dist_sum[k][l] / n[k][l] if n[k][l] > 0 else 0.0  # mean of -dist
            radius = (2 * n[k][l] + 1e-5) ** -0.5 * log_term
            score[k][l] = -(mu - radius)
    shift = min(min(row) for row in score)
    score = [[s + shift for s in row] for row in score]
    totals = [sum(row) for row in score]
    top = max(totals)
    weights = [math.exp(x - top) for x in totals]
    root_probs = [w / sum(weights) for w in weights]
    factor = factor_left if in_left[first] else factor_right
    score = [[s * factor if in_left[k] == in_left[first] else s for s in row] for k, row in enumerate(score)]
    flat = [s for row in score for s in row]
    spread = max(flat) - min(flat) + 1e-5
    score = [[s / spread for s in row] for row in score]
    layer_probs = []
    for l in range(L):
        col = [score[k][l] for k in range(k_count)]
        e = [math.exp(x - max(col)) for x in col]
        layer_probs.append([x / sum(e) for x in e])
    return root_probs, [[layer_probs[l][k] for l in range(L)] for k in range(k_count)]


@pytest.mark.parametrize("first", [0, 1])
def test_softmax_sampler_reproduces_the_released_distribution(first):
    tree = _tree_3()
    sampler = SoftmaxSampler(tree, num_tasks=3, num_layers=2, steps_per_epoch=10)
    # Two observed steps: (task 0 at layer 0, cost 4; task 1 at layer 1, cost 6), then (task 0, 2; task 0, 3).
    sampler.update(torch.tensor([4.0, 6.0]), selected=torch.tensor([0, 1]))
    sampler.update(torch.tensor([2.0, 3.0]), selected=torch.tensor([0, 0]))
    n = [[2, 1], [0, 1], [0, 0]]
    dist_sum = [[6.0, 3.0], [0.0, 6.0], [0.0, 0.0]]
    in_left = [True, False, True]
    root, layers = _released_distribution(
        n, dist_sum, t=2, T=10, in_left=in_left, factor_left=0.375, factor_right=1.0, first=first
    )
    got_root, got_layers = sampler.distribution(first)
    torch.testing.assert_close(got_root.double(), torch.tensor(root, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_layers.double(), torch.tensor(layers, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_softmax_sampler_samples_its_distribution():
    tree = _tree_3()
    gen = torch.Generator().manual_seed(0)
    sampler = SoftmaxSampler(tree, 3, 2, steps_per_epoch=10, generator=gen)
    sampler.update(torch.tensor([1.0, 8.0]), selected=torch.tensor([2, 1]))
    root, _ = sampler.distribution(0)
    marginal = sum(root[f] * sampler.distribution(f)[1] for f in range(3))  # (k, L)
    draws = 4000
    counts = torch.zeros(3, 2)
    for _ in range(draws):
        counts[sampler.select(), torch.arange(2)] += 1
    torch.testing.assert_close(counts / draws, marginal, atol=0.03, rtol=0)


def test_softmax_sampler_favours_the_farthest_arm_like_the_released_code():
    """PAPER.md §1.2(d): three arms with distances 50 / 100 / 150, 1000 steps, no tree: the released rule pulls them
    about 20% / 30% / 50% of the time (its score is mean distance + radius)."""
    sampler = SoftmaxSampler(None, 3, 1, steps_per_epoch=1000, generator=torch.Generator().manual_seed(0))
    distance = torch.tensor([50.0, 100.0, 150.0])
    counts = torch.zeros(3)
    for _ in range(1000):
        k = sampler.select()
        sampler.update(distance[k])
        counts[k] += 1
    share = counts / 1000
    print("pull shares:", share.tolist())
    torch.testing.assert_close(share, torch.tensor([0.2, 0.3, 0.5]), atol=0.05, rtol=0)


def test_lcb_statistics_per_node_and_layer():
    """Hand-made tree over 4 tasks (principal on 1-D points): root -> {0, 1} | {2, 3}. Updating with explicit
    selections adds to every node on each layer's path."""
    G = torch.tensor([1.0, 2.0, -1.0, -2.0]).view(4, 1, 1).expand(4, 2, 1).contiguous()
    tree = GradientTree.from_signatures(G)
    assert tree.root_split() == ([0, 1], [2, 3])
    search = LCBSearch(tree, num_layers=2, tie_break="first")
    search.update(torch.tensor([0.5, 2.0]), selected=torch.tensor([0, 3]))
    search.update(torch.tensor([1.5, 1.0]), selected=torch.tensor([1, 3]))
    n, total = search.node_stats()[..., 0], search.node_stats()[..., 1]
    root, left, right = 0, tree.nodes[0].left, tree.nodes[0].right
    assert n[root].tolist() == [2, 2] and total[root].tolist() == [2.0, 3.0]
    assert n[left].tolist() == [2, 0] and total[left].tolist() == [2.0, 0.0]
    assert n[right].tolist() == [0, 2] and total[right].tolist() == [0.0, 3.0]
    assert search.task_pulls().tolist() == [[1, 0], [1, 0], [0, 0], [0, 2]]
    # Layer 0: the right subtree is unexplored (LCB -inf) so it is pulled next; layer 1: the left one.
    k = search.select().tolist()
    assert k[0] in (2, 3) and k[1] in (0, 1)


def test_lcb_explores_unvisited_subtrees_first_and_is_seeded():
    G = torch.randn(6, 3, 8)
    tree = GradientTree.from_signatures(G)
    left, right = tree.root_split()

    def run(seed, steps):
        search = LCBSearch(tree, 3, generator=torch.Generator().manual_seed(seed))
        picks = []
        for _ in range(steps):
            picks.append(search.select())
            search.update(torch.ones(3))
        return torch.stack(picks)

    picks = run(0, 30)
    for l in range(3):
        first_two = set(picks[:2, l].tolist())
        assert len(first_two & set(left)) == 1 and len(first_two & set(right)) == 1
        assert sorted(set(picks[:, l].tolist())) == list(range(6))
    assert torch.equal(run(0, 30), picks)
    assert any(not torch.equal(run(s, 30), picks) for s in (1, 2, 3))


def test_lcb_handles_multi_task_leaves_and_a_single_task():
    G = torch.randn(5, 1, 4)
    tree = GradientTree.from_signatures(G, split="mean_dot")  # leaves at depth >= L = 1 hold several tasks
    assert any(len(node.tasks) > 1 for node in tree.nodes if node.is_leaf)
    search = LCBSearch(tree, 1, tie_break="first")
    seen = set()
    for _ in range(5):
        seen.add(search.select().item())
        search.update(torch.zeros(1))
    assert seen == set(range(5))
    single = LCBSearch(GradientTree.from_signatures(torch.randn(1, 2, 3)), 2)
    assert single.select().tolist() == [0, 0]


def test_random_search_and_update_errors():
    search = RandomSearch(4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="must follow select"):
        search.update(torch.zeros(3))
    k = search.select()
    assert k.shape == (3,) and bool(((k >= 0) & (k < 4)).all())
    with pytest.raises(ValueError, match=r"costs must be an \(L,\) = \(3,\)"):
        search.update(torch.zeros(4))
    with pytest.raises(IndexError, match="selected must hold task indices"):
        search.update(torch.zeros(3), selected=torch.tensor([0, 1, 9]))


def test_last_search_always_returns_the_newest_entry_and_records_costs():
    search = LastSearch(5, 3)
    for _ in range(3):
        assert search.select().tolist() == [4, 4, 4]
        search.update(torch.tensor([1.0, 2.0, 3.0]))
    # Costs are recorded per (entry, layer) like RandomSearch's: 3 pulls of entry 4 at every layer.
    assert search.stats[4, :, 0].tolist() == [3.0, 3.0, 3.0]
    assert search.stats[4, :, 1].tolist() == [3.0, 6.0, 9.0]
    assert float(search.stats[:4].abs().sum()) == 0.0
