"""The gradient-similarity K-D tree over task signatures (SPEC 7.3).

A node at depth d holding task set S splits on module ``l = d mod L`` (shallow modules decide the top of the tree):
every task in S gets a scalar score from its layer-l signature, and S is cut in two at the median score, until a node
holds at most ``leaf_size`` tasks. Three split rules:

``principal`` (default)
    Centre the layer-l signatures of S and project them on their top principal direction; the tasks with the larger
    half of the projections go left. The median is the true one (midway between the two middle scores for an even
    count) so the halves have equal size; the direction's sign is fixed so that the lowest-numbered task with a
    nonzero projection projects positively, which makes trees reproducible. This is a PCA-tree split: two
    well-separated groups of similar tasks land on different sides.
``mean_distance`` (the paper's text)
    Score = distance (the configured metric) to the group mean; the closer half goes left. Tasks of two separated
    groups are all about equally far from the mean between them, so this rule mixes them (kept for ablation).
``mean_dot`` (the released code, exactly)
    Score = dot product with the group mean; threshold = the lower median (``torch.median``); tasks with score >= it
    go left (in list order), the others right; if a side is empty the ordered list is cut in half instead
    (``tasks[:n // 2]``, ``tasks[n // 2:]``); a node at depth >= L is a leaf.

The tree is rebuilt from scratch after each task (exact, and cheap next to a task's training). It is kept twice: as
host lists for printing and serialisation, and as flat device tensors (``left``, ``right``, ``depth``, ``module``,
``threshold``, ``start``, ``end``, ``order``: node i holds the tasks ``order[start[i]:end[i]]``) that the per-step
search reads without host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from treelora import ops
from treelora.cl._checks import check_choice, check_int
from treelora.ops.similarity import METRICS

SPLITS = ("principal", "mean_distance", "mean_dot")


@dataclass
class TreeNode:
    """One node (host side). ``module`` and ``threshold`` are -1 / NaN for a leaf; ``left`` / ``right`` are node
    indices (-1 for a leaf)."""

    tasks: list[int]
    depth: int
    module: int = -1
    threshold: float = math.nan
    left: int = -1
    right: int = -1

    @property
    def is_leaf(self) -> bool:
        return self.left < 0


# --- split rules ----------------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _split_principal(X: torch.Tensor, tasks: list[int], metric: str) -> tuple[list[int], list[int], float]:
    """Top-principal-direction split. The n x n Gram matrix of the centred signatures (n = tasks in the node, at
    most the bank size) is decomposed exactly: cheaper and more precise than power iterations on D-long vectors,
    and it runs once per node per task."""
    Xc = X.double() - X.double().mean(0, keepdim=True)
    gram = (Xc @ Xc.T).cpu()
    evals, evecs = torch.linalg.eigh(gram)
    # Projections on the top direction v = Xcᵀu / sqrt(λ) are Xc v = u sqrt(λ).
    scores = (evecs[:, -1] * evals[-1].clamp_min(0).sqrt()).tolist()
    biggest = max(abs(s) for s in scores)
    for i in sorted(range(len(tasks)), key=lambda i: tasks[i]):
        if abs(scores[i]) > 1e-9 * biggest:
            if scores[i] < 0:
                scores = [-s for s in scores]
            break
    ranked = sorted(range(len(tasks)), key=lambda i: (-scores[i], tasks[i]))
    half = (len(tasks) + 1) // 2
    left = sorted(tasks[i] for i in ranked[:half])
    right = sorted(tasks[i] for i in ranked[half:])
    return left, right, _median(scores)


def _split_mean_distance(X: torch.Tensor, tasks: list[int], metric: str) -> tuple[list[int], list[int], float]:
    mean = X.float().mean(0, keepdim=True)  # (1, D): one "layer"
    scores = ops.pairwise_similarity(mean, X.unsqueeze(1), metric)[:, 0].tolist()
    ranked = sorted(range(len(tasks)), key=lambda i: (scores[i], tasks[i]))
    half = (len(tasks) + 1) // 2
    left = sorted(tasks[i] for i in ranked[:half])
    right = sorted(tasks[i] for i in ranked[half:])
    return left, right, _median(scores)


def _split_mean_dot(X: torch.Tensor, tasks: list[int], metric: str) -> tuple[list[int], list[int], float]:
    Xf = X.float()
    scores = (Xf @ Xf.mean(0)).tolist()
    tau = sorted(scores)[(len(scores) - 1) // 2]  # torch.median's lower median
    left = [t for t, s in zip(tasks, scores) if s >= tau]
    right = [t for t, s in zip(tasks, scores) if s < tau]
    if not left or not right:
        half = len(tasks) // 2
        left, right = tasks[:half], tasks[half:]
    return left, right, tau


_SPLITTERS = {"principal": _split_principal, "mean_distance": _split_mean_distance, "mean_dot": _split_mean_dot}


def consecutive_differences(G: torch.Tensor) -> torch.Tensor:
    """D_0 = G_0, D_k = G_k - G_{k-1}, in fp32. G: (T, L, D) -> (T, L, D)."""
    G = G.float()
    return torch.cat([G[:1], G[1:] - G[:-1]], dim=0)


# --- the tree -------------------------------------------------------------------------------------------------------


class GradientTree:
    """A K-D tree over task signatures; build it with :meth:`from_signatures`.

    Attributes (device tensors, one entry per node, preorder, root = 0):
        left, right: child indices (int64, -1 for a leaf); depth, module (int64, module -1 for a leaf);
        threshold (fp32, the split's median score, NaN for a leaf); start, end (int64): node i holds the tasks
        ``order[start[i]:end[i]]``; order (int64, T): task ids, leaves' tasks concatenated in preorder.
    """

    def __init__(
        self,
        nodes: list[TreeNode],
        num_tasks: int,
        num_layers: int,
        *,
        split: str,
        metric: str,
        leaf_size: int,
        use_differences: bool,
        device: torch.device | str = "cpu",
    ) -> None:
        self.nodes = nodes
        self.num_tasks = num_tasks
        self.num_layers = num_layers
        self.split = split
        self.metric = metric
        self.leaf_size = leaf_size
        self.use_differences = use_differences
        self.device = torch.device(device)
        order: list[int] = []
        start = [0] * len(nodes)
        end = [0] * len(nodes)

        def visit(i: int) -> None:
            start[i] = len(order)
            node = nodes[i]
            if node.is_leaf:
                order.extend(node.tasks)
            else:
                visit(node.left)
                visit(node.right)
            end[i] = len(order)

        visit(0)

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        self.left = tensor([n.left for n in nodes], torch.int64)
        self.right = tensor([n.right for n in nodes], torch.int64)
        self.depth = tensor([n.depth for n in nodes], torch.int64)
        self.module = tensor([n.module for n in nodes], torch.int64)
        self.threshold = tensor([n.threshold for n in nodes], torch.float32)
        self.start = tensor(start, torch.int64)
        self.end = tensor(end, torch.int64)
        self.order = tensor(order, torch.int64)

    # --- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_signatures(
        cls,
        G: torch.Tensor,
        split: str = "principal",
        metric: str = "l1",
        leaf_size: int = 1,
        use_differences: bool = False,
        max_depth: int | None = None,
    ) -> GradientTree:
        """Build the tree over task signatures.

        Args:
            G: (T, L, D) signatures of T tasks (float; any storage dtype), L modules of width D.
            split: ``principal``, ``mean_distance`` or ``mean_dot`` (see the module docstring).
            metric: the distance ``mean_distance`` scores with (one of :data:`treelora.ops.METRICS`).
            leaf_size: a node with at most this many tasks is a leaf.
            use_differences: split on consecutive differences D_k = G_k - G_{k-1} (D_0 = G_0) instead of G.
            max_depth: nodes at this depth are leaves whatever they hold (None: split down to ``leaf_size``; the
                search handles leaves with several tasks).
        """
        if not isinstance(G, torch.Tensor):
            raise TypeError(f"G must be a (T, L, D) torch.Tensor of task signatures, got {type(G).__name__}")
        if G.dim() != 3:
            raise ValueError(f"G must have shape (T, L, D) (tasks, modules, width), got shape {tuple(G.shape)}")
        if not G.is_floating_point():
            raise TypeError(f"G must be a floating-point tensor, got dtype {G.dtype}")
        T, L, D = G.shape
        if T == 0 or L == 0 or D == 0:
            raise ValueError(f"G must hold at least one task, module and element, got shape {tuple(G.shape)}")
        check_choice("split", split, SPLITS)
        check_choice("metric", metric, METRICS)
        check_int("leaf_size", leaf_size, low=1)
        if max_depth is not None:
            check_int("max_depth", max_depth, low=0)
        if not bool(torch.isfinite(G).all()):
            raise ValueError("G holds NaN or inf values: a signature was accumulated from non-finite gradients")
        X = consecutive_differences(G) if use_differences else G
        splitter = _SPLITTERS[split]
        nodes: list[TreeNode] = []

        def build(tasks: list[int], depth: int) -> int:
            index = len(nodes)
            node = TreeNode(tasks=tasks, depth=depth)
            nodes.append(node)
            if len(tasks) <= leaf_size or (split == "mean_dot" and depth >= L) or depth == max_depth:
                return index
            module = depth % L
            rows = torch.tensor(tasks, dtype=torch.int64, device=G.device)
            left, right, threshold = splitter(X[rows, module], tasks, metric)
            node.module, node.threshold = module, float(threshold)
            node.left = build(left, depth + 1)
            node.right = build(right, depth + 1)
            return index

        build(list(range(T)), 0)
        return cls(
            nodes,
            T,
            L,
            split=split,
            metric=metric,
            leaf_size=leaf_size,
            use_differences=use_differences,
            device=G.device,
        )

    # --- queries --------------------------------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def height(self) -> int:
        """Largest node depth (0 for a single leaf)."""
        return max(n.depth for n in self.nodes)

    def node_tasks(self, index: int) -> list[int]:
        return list(self.nodes[index].tasks)

    def root_split(self) -> tuple[list[int], list[int]]:
        """Task ids of the root's left and right subtrees (all tasks and [] when the root is a leaf)."""
        root = self.nodes[0]
        if root.is_leaf:
            return list(root.tasks), []
        return list(self.nodes[root.left].tasks), list(self.nodes[root.right].tasks)

    def to_nested(self) -> dict[str, Any]:
        """``{"tasks": [...], "left": {...}, "right": {...}}``; a leaf has only ``tasks``."""

        def nest(i: int) -> dict[str, Any]:
            node = self.nodes[i]
            if node.is_leaf:
                return {"tasks": list(node.tasks)}
            return {"tasks": list(node.tasks), "left": nest(node.left), "right": nest(node.right)}

        return nest(0)

    def _label(self, tasks: list[int], labels: Sequence[str] | None) -> str:
        return ", ".join(str(t) if labels is None else str(labels[t]) for t in tasks)

    def format(self, labels: Sequence[str] | None = None) -> str:
        """Readable multi-line drawing; ``labels[k]`` names task k (default: its index)."""
        head = (
            f"GradientTree: {self.num_tasks} tasks, {self.num_nodes} nodes, height {self.height}, "
            f"split={self.split}"
            + (" on differences" if self.use_differences else "")
            + (f", metric={self.metric}" if self.split == "mean_distance" else "")
        )
        lines = [head]

        def walk(i: int, prefix: str, branch: str) -> None:
            node = self.nodes[i]
            text = f"tasks [{self._label(node.tasks, labels)}]"
            if not node.is_leaf:
                text += f"  split on module {node.module} at {node.threshold:.4g}"
            lines.append(prefix + branch + text)
            if node.is_leaf:
                return
            inner = prefix + {"": "", "├─ ": "│  ", "└─ ": "   "}[branch]
            walk(node.left, inner, "├─ ")
            walk(node.right, inner, "└─ ")

        walk(0, "", "")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return (
            f"GradientTree(num_tasks={self.num_tasks}, num_layers={self.num_layers}, num_nodes={self.num_nodes}, "
            f"split={self.split!r}, use_differences={self.use_differences})"
        )

    def to_dot(self, labels: Sequence[str] | None = None) -> str:
        """Graphviz DOT source: internal nodes show their tasks, split module and threshold; edges are labelled
        L / R."""
        out = ["digraph GradientTree {", '  node [shape=box, fontname="Helvetica"];']
        for i, node in enumerate(self.nodes):
            text = f"tasks: {self._label(node.tasks, labels)}"
            if not node.is_leaf:
                text += f"\\nmodule {node.module}, threshold {node.threshold:.4g}"
            style = ", style=rounded" if node.is_leaf else ""
            out.append(f'  n{i} [label="{text}"{style}];')
        for i, node in enumerate(self.nodes):
            if not node.is_leaf:
                out.append(f'  n{i} -> n{node.left} [label="L"];')
                out.append(f'  n{i} -> n{node.right} [label="R"];')
        out.append("}")
        return "\n".join(out)

    # --- serialisation --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "nodes": [asdict(n) for n in self.nodes],
            "num_tasks": self.num_tasks,
            "num_layers": self.num_layers,
            "split": self.split,
            "metric": self.metric,
            "leaf_size": self.leaf_size,
            "use_differences": self.use_differences,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> GradientTree:
        nodes = [TreeNode(**n) for n in state["nodes"]]
        return cls(
            nodes,
            state["num_tasks"],
            state["num_layers"],
            split=state["split"],
            metric=state["metric"],
            leaf_size=state["leaf_size"],
            use_differences=state["use_differences"],
            device=device,
        )
