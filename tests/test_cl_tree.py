"""GradientTree: planted structure, the released code's split rules on hand-computed cases, layout and output."""

from __future__ import annotations

import math

import pytest
import torch

from treelora.cl import GradientTree
from treelora.cl.tree import consecutive_differences


def _families_intact(tree: GradientTree, family: torch.Tensor) -> bool:
    left, right = tree.root_split()
    return len(set(family[left].tolist())) == 1 and len(set(family[right].tolist())) == 1


def test_planted_families_stay_on_one_side_of_the_root():
    """Two well-separated families of 4 tasks (centres N(0, I) in 256 dims, tasks = centre + N(0, 0.25 I), family
    order shuffled), 200 trials. Measured on this data:

    * ``principal`` (default) keeps both families intact at the root in 200/200 trials;
    * ``mean_distance`` (the paper's text) in 0/200: every task is about equally far from the mean between the two
      centres, so the distance median cuts through both families;
    * ``mean_dot`` (the released code) in 0/200, with or without consecutive differences: the lower median with
      ``>=`` sends 5 of 8 distinct scores left, so a family of 4 is always cut.
    """
    gen = torch.Generator().manual_seed(1234)
    trials = 200
    intact = {"principal": 0, "mean_distance": 0, "mean_dot": 0}
    for _ in range(trials):
        centres = torch.randn(2, 1, 256, generator=gen)
        family = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])[torch.randperm(8, generator=gen)]
        G = centres[family] + 0.5 * torch.randn(8, 1, 256, generator=gen)
        for split in intact:
            tree = GradientTree.from_signatures(G, split=split, max_depth=1, use_differences=split == "mean_dot")
            intact[split] += _families_intact(tree, family)
    rates = {k: v / trials for k, v in intact.items()}
    print("families intact at the root:", rates)
    assert rates["principal"] >= 0.98
    assert rates["mean_distance"] <= 0.05
    assert rates["mean_dot"] <= 0.05


def test_principal_split_hand_case():
    """Four points symmetric about the origin: the top direction is close to the x axis; task 0 (lowest index)
    projects positively, so {0, 2} (x > 0) go left at the median 0. In {0, 2} the centred points are ±(0.5, 0.5):
    task 0 projects positively and goes left."""
    G = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [3.0, 1.0], [-3.0, -1.0]]).view(4, 1, 2)
    tree = GradientTree.from_signatures(G)
    assert tree.to_nested() == {
        "tasks": [0, 1, 2, 3],
        "left": {"tasks": [0, 2], "left": {"tasks": [0]}, "right": {"tasks": [2]}},
        "right": {"tasks": [1, 3], "left": {"tasks": [1]}, "right": {"tasks": [3]}},
    }
    assert abs(tree.nodes[0].threshold) < 1e-9
    # The sign rule makes the tree invariant under G -> -G.
    assert GradientTree.from_signatures(-G).to_nested() == tree.to_nested()


@pytest.mark.parametrize("split", ["principal", "mean_distance"])
@pytest.mark.parametrize("T", [5, 8, 11])
def test_true_median_gives_equal_halves(split, T):
    G = torch.randn(T, 3, 32)
    tree = GradientTree.from_signatures(G, split=split)
    for node in tree.nodes:
        if not node.is_leaf:
            left, right = tree.nodes[node.left], tree.nodes[node.right]
            assert len(left.tasks) - len(right.tasks) in (0, 1)
            assert node.module == node.depth % 3
        else:
            assert len(node.tasks) == 1


def test_mean_dot_reproduces_figure_5_split():
    """Eight tasks, one module, scalar signatures v = [5, 1, 6, 7, 2, 8, 3, 4]: mean 4.5, scores 4.5 v; the lower
    median is 4.5 * 4 = 18; scores >= 18 go left in list order: tasks [0, 2, 3, 5, 7] (v = 5, 6, 7, 8, 4) vs
    [1, 4, 6] (v = 1, 2, 3), the paper's Fig. 5 root split. Depth 1 >= L = 1: both children are leaves."""
    v = torch.tensor([5.0, 1.0, 6.0, 7.0, 2.0, 8.0, 3.0, 4.0])
    tree = GradientTree.from_signatures(v.view(8, 1, 1), split="mean_dot")
    assert tree.to_nested() == {
        "tasks": list(range(8)),
        "left": {"tasks": [0, 2, 3, 5, 7]},
        "right": {"tasks": [1, 4, 6]},
    }
    assert tree.nodes[0].threshold == pytest.approx(18.0)


def test_mean_dot_depth_limit_and_list_order():
    """L = 1: G0 = [3, 0], G1 = [0, 1], G2 = [2, 2]. Mean [5/3, 1]; scores 5, 1, 16/3; lower median 5 -> left
    [0, 2], right [1]; depth 1 >= L makes [0, 2] a leaf with two tasks."""
    G = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 2.0]]).view(3, 1, 2)
    tree = GradientTree.from_signatures(G, split="mean_dot")
    assert tree.to_nested() == {"tasks": [0, 1, 2], "left": {"tasks": [0, 2]}, "right": {"tasks": [1]}}
    assert tree.nodes[0].threshold == pytest.approx(5.0)


def test_mean_dot_on_differences_with_halving():
    """L = 2, D = 2, use_differences. Differences (module 0 | module 1):
    D0 = [1, 0] | [0, 1];  D1 = [1, 1] | [1, 0];  D2 = [0, 2] | [0, -1];  D3 = [-2, 0] | [1, 2].
    Root, module 0: mean [0, 0.75]; scores 0, 0.75, 1.5, 0; lower median 0; every score >= 0 so the right side is
    empty and the list is halved: [0, 1] | [2, 3]. Depth 1, module 1: [0, 1] has scores 0.5, 0.5 (median 0.5) and
    [2, 3] has scores -0.5, 1.5 (median -0.5): both put everything left and are halved. Depth 2 = L: leaves."""
    G0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    D = torch.stack(
        [
            G0,
            torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
            torch.tensor([[0.0, 2.0], [0.0, -1.0]]),
            torch.tensor([[-2.0, 0.0], [1.0, 2.0]]),
        ]
    )
    G = D.cumsum(0)  # signatures whose consecutive differences are D
    tree = GradientTree.from_signatures(G, split="mean_dot", use_differences=True)
    assert tree.to_nested() == {
        "tasks": [0, 1, 2, 3],
        "left": {"tasks": [0, 1], "left": {"tasks": [0]}, "right": {"tasks": [1]}},
        "right": {"tasks": [2, 3], "left": {"tasks": [2]}, "right": {"tasks": [3]}},
    }
    assert [n.threshold for n in tree.nodes if not n.is_leaf] == pytest.approx([0.0, 0.5, -0.5])
    assert [n.module for n in tree.nodes if not n.is_leaf] == [0, 1, 1]
    assert torch.equal(consecutive_differences(G), D)


def test_flat_device_layout_matches_nodes():
    tree = GradientTree.from_signatures(torch.randn(9, 2, 16), leaf_size=2)
    order = tree.order.tolist()
    assert sorted(order) == list(range(9))
    for i, node in enumerate(tree.nodes):
        assert sorted(order[tree.start[i] : tree.end[i]]) == sorted(node.tasks)
        assert tree.left[i].item() == node.left and tree.right[i].item() == node.right
        assert tree.depth[i].item() == node.depth and tree.module[i].item() == node.module
        assert math.isnan(tree.threshold[i].item()) == node.is_leaf
        if node.is_leaf:
            assert len(node.tasks) <= 2


def test_outputs_and_round_trip():
    tree = GradientTree.from_signatures(torch.randn(5, 2, 8))
    text = str(tree)
    assert text.startswith("GradientTree: 5 tasks") and "split on module 0" in text
    assert all(f"tasks [{k}]" in text for k in range(5))
    dot = tree.to_dot(labels=["a", "b", "c", "d", "e"])
    assert dot.startswith("digraph GradientTree {") and dot.count("->") == tree.num_nodes - 1
    assert 'label="tasks: a, b, c, d, e' in dot

    def leaves_only_tasks(node):
        if "left" not in node:
            assert set(node) == {"tasks"}
            return
        leaves_only_tasks(node["left"])
        leaves_only_tasks(node["right"])

    leaves_only_tasks(tree.to_nested())
    again = GradientTree.from_state_dict(tree.state_dict())
    assert again.to_nested() == tree.to_nested()
    assert torch.equal(again.left, tree.left) and torch.equal(again.order, tree.order)


def test_use_differences_equals_tree_on_differences():
    G = torch.randn(6, 2, 8)
    a = GradientTree.from_signatures(G, use_differences=True)
    b = GradientTree.from_signatures(consecutive_differences(G))
    assert a.to_nested() == b.to_nested()


def test_single_task_is_a_leaf():
    tree = GradientTree.from_signatures(torch.randn(1, 3, 4))
    assert tree.num_nodes == 1 and tree.root_split() == ([0], [])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(G=torch.randn(4, 8)), ValueError, r"G must have shape \(T, L, D\)"),
        (dict(G=torch.zeros(0, 2, 3)), ValueError, "at least one task"),
        (dict(G=torch.ones(3, 2, 2, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(G=torch.randn(3, 2, 2), split="kd"), ValueError, "split must be one of"),
        (dict(G=torch.randn(3, 2, 2), metric="manhattan"), ValueError, "metric must be one of"),
        (dict(G=torch.randn(3, 2, 2), leaf_size=0), ValueError, "leaf_size"),
        (dict(G=torch.full((3, 2, 2), math.nan)), ValueError, "NaN"),
    ],
)
def test_bad_signatures_and_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientTree.from_signatures(**kwargs)
