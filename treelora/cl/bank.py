"""The task bank: one signature per finished task, kept on the device (SPEC 7.2).

Storage is a (capacity, L, D) tensor grown by doubling, so adding a task copies the bank only O(log T) times over a
stream; ``signatures`` is the (T, L, D) view of the filled part that the similarity ops read in place. Layers narrower
than the widest one are zero-padded to D (zeros add nothing to any of the metrics, so distances are exact). Optional
adapter snapshots (the A matrices at each task's end, same layout) serve the ``l1`` regularizer and per-task export.

With a budget ``max_tasks``, adding a task beyond it merges the two closest entries (by the configured metric summed
over layers) into their mean weighted by how many tasks each already holds; ``members[i]`` lists the original task
ids that entry i stands for.
"""

from __future__ import annotations

from typing import Any

import torch

from treelora import ops
from treelora.cl._checks import check_choice, check_int
from treelora.ops.similarity import IS_DISTANCE, METRICS

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TaskBank:
    """Signatures of the finished tasks, (T, L, D) on ``device``.

    Args:
        num_layers: L, the number of LoRA modules.
        width: D, the (padded) length of one module's signature, r * in_features.
        device: where the bank lives (the adapters' device).
        dtype: storage dtype, ``torch.float32`` or ``torch.bfloat16`` (distances accumulate in fp32 either way).
        keep_snapshots: also store each task's adapter A, (L, D), beside its signature.
        max_tasks: merge the two closest entries when more than this many would be stored (None: no budget).
        metric: the distance that decides which entries are closest (one of :data:`treelora.ops.METRICS`).
        initial_capacity: first allocation, in tasks.
    """

    def __init__(
        self,
        num_layers: int,
        width: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        keep_snapshots: bool = False,
        max_tasks: int | None = None,
        metric: str = "l1",
        initial_capacity: int = 4,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("width", width), ("initial_capacity", initial_capacity)):
            check_int(name, value, low=1)
        if dtype not in STORAGE_DTYPES.values():
            raise TypeError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if max_tasks is not None:
            check_int("max_tasks", max_tasks, low=1)
        check_choice("metric", metric, METRICS)
        self.num_layers, self.width = num_layers, width
        self.device, self.dtype = torch.device(device), dtype
        self.keep_snapshots, self.max_tasks, self.metric = keep_snapshots, max_tasks, metric
        self._signatures = torch.zeros(initial_capacity, num_layers, width, dtype=dtype, device=self.device)
        self._snapshots = torch.zeros_like(self._signatures) if keep_snapshots else None
        self.members: list[list[int]] = []

    # --- views ----------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.members)

    @property
    def capacity(self) -> int:
        return self._signatures.shape[0]

    @property
    def signatures(self) -> torch.Tensor:
        """(T, L, D) view of the stored signatures."""
        return self._signatures[: len(self)]

    @property
    def snapshots(self) -> torch.Tensor | None:
        """(T, L, D) view of the stored adapter snapshots, or None without ``keep_snapshots``."""
        return None if self._snapshots is None else self._snapshots[: len(self)]

    def gather(self, selected: torch.Tensor, snapshots: bool = False) -> torch.Tensor:
        """(L, D) rows ``G[selected[l], l]`` (or of the snapshots) for an (L,) int64 device tensor of entries.

        One ``index_select`` on the flattened (capacity·L, D) storage: on CPU several times faster than advanced
        indexing with two index tensors (12 us vs 85 us at T = 50, L = 12, D = 6144), and no host synchronisation.
        """
        store = self._snapshots if snapshots else self._signatures
        if store is None:
            raise ValueError("this bank keeps no adapter snapshots (keep_snapshots=False)")
        rows = selected * self.num_layers + torch.arange(self.num_layers, device=selected.device)
        return store.view(-1, self.width).index_select(0, rows)

    @property
    def weights(self) -> list[int]:
        """Number of original tasks each entry holds."""
        return [len(m) for m in self.members]

    def labels(self) -> list[str]:
        """Entry names for printing: the task id, or ids joined by '+' for merged entries."""
        return ["+".join(str(t) for t in m) for m in self.members]

    # --- adding and merging ---------------------------------------------------------------------------------------

    def _check_row(self, name: str, row: torch.Tensor) -> torch.Tensor:
        if not isinstance(row, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(row).__name__}")
        if tuple(row.shape) != (self.num_layers, self.width):
            raise ValueError(
                f"{name} must have shape (L, D) = ({self.num_layers}, {self.width}), got {tuple(row.shape)}"
            )
        if not row.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {row.dtype}")
        if not bool(torch.isfinite(row).all()):
            raise ValueError(f"{name} holds NaN or inf values (did training diverge?)")
        return row

    def _grow(self) -> None:
        def doubled(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
            out[: t.shape[0]] = t
            return out

        self._signatures = doubled(self._signatures)
        if self._snapshots is not None:
            self._snapshots = doubled(self._snapshots)

    def add(self, signature: torch.Tensor, task_id: int, snapshot: torch.Tensor | None = None) -> int:
        """Store a finished task's signature (L, D) (and its adapter snapshot (L, D) when the bank keeps them),
        merging the two closest entries if the budget is exceeded. Returns the new entry's index (after a merge,
        the index of the entry that holds ``task_id``)."""
        self._check_row("signature", signature)
        if self._snapshots is not None:
            if snapshot is None:
                raise ValueError("snapshot is required: this bank keeps adapter snapshots")
            self._check_row("snapshot", snapshot)
        if len(self) == self.capacity:
            self._grow()
        index = len(self)
        self._signatures[index] = signature.to(device=self.device, dtype=self.dtype)
        if self._snapshots is not None:
            self._snapshots[index] = snapshot.to(device=self.device, dtype=self.dtype)
        self.members.append([int(task_id)])
        if self.max_tasks is not None and len(self) > self.max_tasks:
            i, j = self.closest_pair()
            self.merge(i, j)
            index = next(k for k, m in enumerate(self.members) if int(task_id) in m)
        return index

    def pairwise_costs(self) -> torch.Tensor:
        """(T, T) fp32 cost between entries: the metric summed over layers (negated for similarity metrics)."""
        G = self.signatures
        sign = 1.0 if IS_DISTANCE[self.metric] else -1.0
        rows = [ops.pairwise_similarity(G[i].float(), G, self.metric).sum(1) for i in range(len(self))]
        return sign * torch.stack(rows)

    def closest_pair(self) -> tuple[int, int]:
        """Indices i < j of the two closest entries (ties: the lowest pair)."""
        if len(self) < 2:
            raise ValueError(f"closest_pair needs at least two entries, the bank holds {len(self)}")
        cost = self.pairwise_costs().cpu()
        T = len(self)
        upper = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        flat = torch.where(upper, cost, torch.full_like(cost, float("inf"))).reshape(-1)
        k = int(torch.argmin(flat))
        return k // T, k % T

    def merge(self, i: int, j: int) -> None:
        """Replace entries i and j by their task-count-weighted mean (kept at min(i, j))."""
        T = len(self)
        if not (0 <= i < T and 0 <= j < T) or i == j:
            raise ValueError(f"merge needs two distinct entries in [0, {T}), got {i} and {j}")
        i, j = min(i, j), max(i, j)
        wi, wj = len(self.members[i]), len(self.members[j])
        for store in (self._signatures, self._snapshots):
            if store is None:
                continue
            merged = (wi * store[i].float() + wj * store[j].float()) / (wi + wj)
            store[i] = merged.to(store.dtype)
            store[j : T - 1] = store[j + 1 : T].clone()
            store[T - 1].zero_()
        self.members[i] = sorted(self.members[i] + self.members[j])
        del self.members[j]

    # --- statistics -----------------------------------------------------------------------------------------------

    def spread(self, metric: str | None = None) -> torch.Tensor:
        """(L,) fp32 per-layer mean distance of the stored signatures to their mean (absolute value for similarity
        metrics); 1 where it is zero (a single entry, or identical ones). The unit the search measures distances in."""
        metric = metric or self.metric
        if len(self) == 0:
            return torch.ones(self.num_layers, device=self.device)
        G = self.signatures
        values = ops.pairwise_similarity(G.float().mean(0), G, metric).abs().mean(0)
        return torch.where(values > 0, values, torch.ones_like(values))

    # --- serialisation --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "signatures": self.signatures.clone(),
            "snapshots": None if self._snapshots is None else self.snapshots.clone(),
            "members": [list(m) for m in self.members],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        signatures, snapshots, members = state["signatures"], state["snapshots"], state["members"]
        if tuple(signatures.shape[1:]) != (self.num_layers, self.width) or signatures.shape[0] != len(members):
            raise ValueError(
                f"state holds signatures of shape {tuple(signatures.shape)} for {len(members)} tasks; "
                f"this bank stores (T, {self.num_layers}, {self.width})"
            )
        if (snapshots is None) != (self._snapshots is None):
            raise ValueError("state and bank disagree on whether adapter snapshots are kept")
        capacity = max(self.capacity, signatures.shape[0])
        self._signatures = torch.zeros(capacity, self.num_layers, self.width, dtype=self.dtype, device=self.device)
        self._signatures[: signatures.shape[0]] = signatures.to(device=self.device, dtype=self.dtype)
        if snapshots is not None:
            self._snapshots = torch.zeros_like(self._signatures)
            self._snapshots[: snapshots.shape[0]] = snapshots.to(device=self.device, dtype=self.dtype)
        self.members = [list(m) for m in members]
