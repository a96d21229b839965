"""Per-step task selection, one previous task per layer (SPEC 7.4).

Every previous task is an arm; pulling task k at layer l costs ``ξ = metric(ĝ_t[l], G_k[l])`` (lower = more similar).
A search object is used as ``k = search.select()`` (an (L,) int64 device tensor of bank entries), then, once the step's
costs are observed with one gathered similarity call, ``search.update(costs)``. Everything runs on the device with a
fixed number of launches per step, whatever the number of layers or tasks, and without host synchronisation.

:class:`LCBSearch` (paper)
    Statistics (pulls n, summed cost) per (tree node, layer). For every layer independently, descend from the root,
    at each node moving to the child with the lower ``LCB = μ̂ − c·sqrt(log(t + 1) / n)`` (n = 0 → −∞: unexplored
    children first; ties by the seeded generator or to the left child), until a leaf; the leaf's task is pulled and
    the statistics of every node on its path are updated. Leaves holding several tasks get one virtual child per task.
:class:`SoftmaxSampler` (released code)
    Flat per-(task, layer) statistics, a score ``mean distance + radius`` (larger distance scores higher, as written in
    the released code), the tree used only to rescale one root child's rows, and per-layer sampling from a softmax
    over the range-normalised scores. Reproduces the released ``tree_search`` step by step.
:class:`RandomSearch`
    Uniform selection per layer (the "random search" ablation).
:class:`LastSearch`
    The most recent bank entry at every layer: the regularizer then anchors to the previous task's adapter with no
    tree and no search (the baseline that isolates what the tree's choice adds).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from treelora.cl._checks import check_choice, check_int, check_number
from treelora.cl.tree import GradientTree

TIE_BREAKS = ("random", "first")


def _check_layers(num_layers: int) -> int:
    return check_int("num_layers", num_layers, low=1)


def _gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise: argmax(logits + noise) is a sample of softmax(logits), drawn without a host sync."""
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log(-torch.log(u))


class _Search:
    """Shared state: ``stats`` (fp32, last dimension (pulls, summed cost)) per (node or task, layer); ``t`` counts
    updates since the last reset."""

    stats: torch.Tensor

    def __init__(self, num_layers: int, device: torch.device, generator: torch.Generator | None) -> None:
        self.num_layers = _check_layers(num_layers)
        self.device = torch.device(device)
        self.generator = generator
        self.t = 0
        self._last: torch.Tensor | None = None
        self._layer_ids = torch.arange(num_layers, device=self.device)

    def reset(self) -> None:
        """Forget every observation (a new task or epoch)."""
        self.stats.zero_()
        self.t = 0
        self._last = None

    def _check_update(
        self, costs: torch.Tensor, selected: torch.Tensor | None, num_tasks: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        L = self.num_layers
        if not isinstance(costs, torch.Tensor) or tuple(costs.shape) != (L,):
            shape = tuple(costs.shape) if isinstance(costs, torch.Tensor) else type(costs).__name__
            raise ValueError(f"costs must be an (L,) = ({L},) tensor, got {shape}")
        if selected is None:
            if self._last is None:
                raise RuntimeError("update() without selected must follow select(): there is no pending selection")
            return costs.to(device=self.device, dtype=torch.float32), None
        if not isinstance(selected, torch.Tensor) or tuple(selected.shape) != (L,) or selected.is_floating_point():
            shape = tuple(selected.shape) if isinstance(selected, torch.Tensor) else type(selected).__name__
            raise ValueError(f"selected must be an (L,) = ({L},) integer tensor of task indices, got {shape}")
        if selected.device.type == "cpu" and bool(((selected < 0) | (selected >= num_tasks)).any()):
            raise IndexError(f"selected must hold task indices in [0, {num_tasks}), got {selected.tolist()}")
        return costs.to(device=self.device, dtype=torch.float32), selected.to(device=self.device, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.clone(), "t": self.t, "last": None if self._last is None else self._last.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["stats"].shape) != tuple(self.stats.shape):
            raise ValueError(
                f"search state holds statistics of shape {tuple(state['stats'].shape)}, "
                f"expected {tuple(self.stats.shape)}"
            )
        self.stats.copy_(state["stats"].to(self.device))
        self.t = int(state["t"])
        self._last = None if state["last"] is None else state["last"].to(self.device)


class LCBSearch(_Search):
    """Hierarchical lower-confidence-bound search over a :class:`GradientTree`, per layer.

    Args:
        tree: the tree over the bank's entries (its task ids are bank indices).
        num_layers: L.
        c: exploration weight (the paper's 2).
        tie_break: ``random`` (seeded ``generator``) or ``first`` (left child) when LCBs are equal.
        generator: a ``torch.Generator`` on the tree's device.
    """

    def __init__(
        self,
        tree: GradientTree,
        num_layers: int,
        c: float = 2.0,
        tie_break: str = "random",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_layers, tree.device, generator)
        self.c = check_number("c", c, low=0.0)
        self.tree, self.tie_break = tree, check_choice("tie_break", tie_break, TIE_BREAKS)
        # Search nodes: the tree's nodes, then one virtual single-task child per task of every multi-task leaf.
        children: list[list[int]] = []
        depth: list[int] = []
        parent: list[int] = []
        task: list[int] = []
        for node in tree.nodes:
            children.append([] if node.is_leaf else [node.left, node.right])
            depth.append(node.depth)
            parent.append(-1)
            task.append(node.tasks[0] if len(node.tasks) == 1 else -1)
        for i, node in enumerate(tree.nodes):
            if not node.is_leaf:
                parent[node.left] = parent[node.right] = i
        for i, node in enumerate(tree.nodes):
            if node.is_leaf and len(node.tasks) > 1:
                for k in node.tasks:
                    children[i].append(len(children))
                    children.append([])
                    depth.append(node.depth + 1)
                    parent.append(i)
                    task.append(k)
        M = len(children)
        dummy = M  # an extra statistics column with LCB +inf pads the tables below
        width = max(2, max(len(ch) for ch in children))
        # A leaf's only candidate is itself, so following "best child" pointers stays put once a leaf is reached.
        table = [
            ch + [dummy] * (width - len(ch)) if ch else [i] + [dummy] * (width - 1) for i, ch in enumerate(children)
        ]
        self.height = max(depth)
        paths = []
        for i in range(M):
            path = [i]
            while parent[path[-1]] >= 0:
                path.append(parent[path[-1]])
            paths.append(path[::-1] + [dummy] * (self.height + 1 - len(path)))
        leaf_of_task = [0] * tree.num_tasks
        for i, k in enumerate(task):
            if k >= 0 and not children[i]:
                leaf_of_task[k] = i
        self.num_search_nodes, self._width = M, width

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        # Root-to-leaf paths of the J single-task leaves, padded by repeating the leaf (a leaf chooses itself).
        leaves = [i for i in range(M) if not children[i]]
        leaf_paths = [[p if p != dummy else i for p in paths[i]] for i in leaves]
        self._children = tensor(table)  # (M, C)
        self._row_base = tensor([i * width for i in range(M)]).view(1, M)
        self._paths = tensor(paths)  # (M, height + 1)
        self._leaves = tensor(leaves)  # (J,)
        self._path_from = tensor([p[:-1] for p in leaf_paths]).view(-1)  # (J * height,)
        self._path_to = tensor([p[1:] for p in leaf_paths]).view(len(leaves), self.height)  # (J, height)
        self._task = tensor([max(k, 0) for k in task])  # (M,)
        self._leaf_of_task = tensor(leaf_of_task)  # (T,)
        self._is_dummy = torch.zeros(1, M + 1, dtype=torch.bool, device=self.device)
        self._is_dummy[0, dummy] = True
        self._layer_rows = (self._layer_ids * (M + 1)).view(-1, 1)
        # Layer-major (L, M + 1, 2): every reduction below runs over the innermost dimension, which is several
        # times faster on CPU than reducing a middle one (argmin over dim 1 of (M, 2, L): 120 us vs 12 us at M = 99).
        self.stats = torch.zeros(self.num_layers, M + 1, 2, device=self.device)

    def lcb(self) -> torch.Tensor:
        """(L, M + 1) lower confidence bounds of every search node per layer (−inf unexplored, +inf padding)."""
        return self._lcb(torch.full((), -math.inf, device=self.device))

    def _lcb(self, unexplored: torch.Tensor) -> torch.Tensor:
        n, total = self.stats[..., 0], self.stats[..., 1]
        safe_n = n.clamp_min(1.0)
        value = total / safe_n - (self.c * math.sqrt(math.log(self.t + 1))) * safe_n.rsqrt()
        value = torch.where(n > 0, value, unexplored)
        return torch.where(self._is_dummy, torch.full_like(value, math.inf), value)

    def select(self) -> torch.Tensor:
        """(L,) int64 bank entries chosen by descending the tree from the root, every layer at once."""
        L, M, C = self.num_layers, self.num_search_nodes, self._width
        if self.height == 0:  # a single task: the root is the only leaf
            self._last = torch.zeros(L, dtype=torch.int64, device=self.device)
            return self._task[self._last]
        if self.tie_break == "random":
            # Unexplored nodes get random values far below any real bound (-1e38 .. -2e38 in fp32), so they come
            # first and ties between them go to a seeded coin; ties between explored nodes (equal float costs) go
            # to the left child.
            coin = torch.rand(L, M + 1, generator=self.generator, device=self.device)
            unexplored = coin.add(1.0).mul_(-1e38)
        else:
            unexplored = torch.full((), -math.inf, device=self.device)
        candidates = self._lcb(unexplored).index_select(1, self._children.view(-1)).view(L, M, C)
        pick = candidates.argmin(-1)  # first minimum on ties
        choice = torch.take(self._children, self._row_base + pick)  # (L, M): the node each node moves to
        # The descent reaches the one leaf whose every path step agrees with its node's choice: a fixed number of
        # ops whatever the depth, instead of one gather per level.
        steps = choice.index_select(1, self._path_from).view(L, -1, self.height)  # (L, J, height)
        mismatches = (steps != self._path_to).sum(-1)  # (L, J), zero for exactly one leaf
        self._last = self._leaves[mismatches.argmin(-1)]
        return self._task[self._last]

    def update(self, costs: torch.Tensor, selected: torch.Tensor | None = None) -> None:
        """Add the observed (L,) costs to every node on each layer's path to its pulled task: the tasks of the last
        :meth:`select`, or ``selected`` ((L,) task indices) when given."""
        costs, selected = self._check_update(costs, selected, self.tree.num_tasks)
        leaf = self._last if selected is None else self._leaf_of_task[selected]
        rows = (self._paths[leaf] + self._layer_rows).reshape(-1)  # (L * (height + 1),)
        values = torch.stack([torch.ones_like(costs), costs], dim=-1)  # (L, 2)
        values = values[:, None, :].expand(self.num_layers, self.height + 1, 2).reshape(-1, 2)
        self.stats.view(-1, 2).index_add_(0, rows, values)
        self.t += 1

    def node_stats(self) -> torch.Tensor:
        """(M, L, 2) pulls and summed cost per (search node, layer); nodes numbered as in the tree."""
        return self.stats[:, :-1].transpose(0, 1)

    def task_pulls(self) -> torch.Tensor:
        """(T, L) pulls of each task per layer since the last reset (host-side inspection)."""
        return self.stats[:, self._leaf_of_task, 0].T


class SoftmaxSampler(_Search):
    """The released code's per-layer sampler, step for step (PAPER.md §1.2(d)).

    With S the summed L1 distances and N the pulls per (task, layer), at micro-batch t of an epoch of T:
    ``μ = −S/N`` (0 where N = 0); ``radius = (2N + 1e-5)^(-1/2) · sqrt(log(2T(t+1)(t+2)))``;
    ``score = −(μ − radius)``; ``score += min(score)``; a first task is sampled from ``softmax(Σ_l score)`` and the
    rows of the root child holding it are multiplied by ``min(child threshold, 1.5)`` (1 for a leaf child);
    ``score /= max(score) − min(score) + 1e-5``; and each layer samples its task from ``softmax(score[:, l])``.

    Args:
        tree: the tree over the k bank entries (None: no root rescaling).
        num_tasks: k.
        num_layers: L.
        steps_per_epoch: T, the micro-batches in an epoch.
        generator: a ``torch.Generator`` on ``device``.
        device: where the statistics live (the tree's device when a tree is given).
    """

    def __init__(
        self,
        tree: GradientTree | None,
        num_tasks: int,
        num_layers: int,
        steps_per_epoch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        device = torch.device(device) if device is not None else (tree.device if tree is not None else "cpu")
        super().__init__(num_layers, device, generator)
        check_int("num_tasks", num_tasks, low=1)
        check_int("steps_per_epoch", steps_per_epoch, low=1)
        if tree is not None and tree.num_tasks != num_tasks:
            raise ValueError(f"tree holds {tree.num_tasks} tasks but num_tasks is {num_tasks}")
        self.num_tasks, self.steps_per_epoch = num_tasks, steps_per_epoch
        in_left = [False] * num_tasks
        factor_left = factor_right = 1.0
        if tree is not None and not tree.nodes[0].is_leaf:
            left, right = tree.nodes[tree.nodes[0].left], tree.nodes[tree.nodes[0].right]
            for k in left.tasks:
                in_left[k] = True
            # A leaf child has no threshold: the released code treats it as 1.0 (no rescaling).
            factor_left = 1.0 if left.is_leaf else min(left.threshold, 1.5)
            factor_right = 1.0 if right.is_leaf else min(right.threshold, 1.5)
        self._in_left = torch.tensor(in_left, dtype=torch.bool, device=self.device)
        self._factors = (factor_left, factor_right)
        self.stats = torch.zeros(num_tasks, self.num_layers, 2, device=self.device)

    def scores(self) -> torch.Tensor:
        """(k, L) scores after the radius and the min-shift (steps 1-4)."""
        n, total = self.stats[..., 0], self.stats[..., 1]
        mean_neg = torch.where(n > 0, -total / n.clamp_min(1.0), torch.zeros_like(total))
        radius = (2 * n + 1e-5).rsqrt() * math.sqrt(math.log(2 * self.steps_per_epoch * (self.t + 1) * (self.t + 2)))
        score = -(mean_neg - radius)
        return score + score.min()

    def layer_logits(self, score: torch.Tensor, first: torch.Tensor | int) -> torch.Tensor:
        """(k, L) per-layer logits given the first-level sample ``first`` (steps 5-6)."""
        first = torch.as_tensor(first, device=self.device)
        left_chosen = self._in_left[first]
        one = torch.ones((), device=self.device)
        fl, fr = (torch.full((), f, device=self.device) for f in self._factors)
        factor = torch.where(self._in_left, torch.where(left_chosen, fl, one), torch.where(left_chosen, one, fr))
        score = score * factor[:, None]
        return score / (score.max() - score.min() + 1e-5)

    def distribution(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The current (k,) first-level probabilities and, given the first-level sample ``first``, the (k, L)
        per-layer probabilities (columns sum to 1). For inspection and tests; ``select`` samples the same."""
        score = self.scores()
        return torch.softmax(score.sum(1), 0), torch.softmax(self.layer_logits(score, first), 0)

    def select(self) -> torch.Tensor:
        score = self.scores()
        noise = _gumbel((self.num_tasks, self.num_layers + 1), self.generator, self.device)
        first = (score.sum(1) + noise[:, 0]).argmax()
        self._last = (self.layer_logits(score, first) + noise[:, 1:]).argmax(0)
        return self._last

    def update(self, costs: torch.Tensor, selected: torch.Tensor | None = None) -> None:
        """N[k_l, l] += 1 and S[k_l, l] −= cost_l (kept as the summed distance) for the last selection, or for
        ``selected`` ((L,) task indices) when given."""
        costs, selected = self._check_update(costs, selected, self.num_tasks)
        rows = (self._last if selected is None else selected) * self.num_layers + self._layer_ids
        values = torch.stack([torch.ones_like(costs), costs], dim=-1)
        self.stats.view(-1, 2).index_add_(0, rows, values)
        self.t += 1


class RandomSearch(_Search):
    """Uniform selection per layer among ``num_tasks`` entries (ablation)."""

    def __init__(
        self,
        num_tasks: int,
        num_layers: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(num_layers, torch.device(device), generator)
        self.num_tasks = check_int("num_tasks", num_tasks, low=1)
        self.stats = torch.zeros(num_tasks, self.num_layers, 2, device=self.device)

    def select(self) -> torch.Tensor:
        self._last = torch.randint(self.num_tasks, (self.num_layers,), generator=self.generator, device=self.device)
        return self._last

    def update(self, costs: torch.Tensor, selected: torch.Tensor | None = None) -> None:
        """Record the (L,) costs of the last selection (or of ``selected``); they do not steer the next draw."""
        costs, selected = self._check_update(costs, selected, self.num_tasks)
        rows = (self._last if selected is None else selected) * self.num_layers + self._layer_ids
        self.stats.view(-1, 2).index_add_(0, rows, torch.stack([torch.ones_like(costs), costs], dim=-1))
        self.t += 1


class LastSearch(RandomSearch):
    """Always the last of ``num_tasks`` entries, at every layer (the "anchor to the previous task" baseline); costs
    are recorded as by :class:`RandomSearch`."""

    def select(self) -> torch.Tensor:
        self._last = torch.full((self.num_layers,), self.num_tasks - 1, dtype=torch.int64, device=self.device)
        return self._last
