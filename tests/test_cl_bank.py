"""TaskBank: growth by doubling, storage dtypes, snapshots, merging under a budget, validation."""

from __future__ import annotations

import pytest
import torch

from treelora.cl import TaskBank


def test_grows_by_doubling_and_keeps_rows():
    bank = TaskBank(3, 5, initial_capacity=2)
    rows = [torch.randn(3, 5) for _ in range(5)]
    capacities = []
    for k, row in enumerate(rows):
        bank.add(row, k)
        capacities.append(bank.capacity)
    assert capacities == [2, 2, 4, 4, 8]
    assert torch.equal(bank.signatures, torch.stack(rows))
    assert bank.signatures.data_ptr() == bank._signatures.data_ptr()  # a view, no copy per read


def test_bfloat16_storage_and_snapshots():
    bank = TaskBank(2, 4, dtype=torch.bfloat16, keep_snapshots=True)
    sig, snap = torch.randn(2, 4), torch.randn(2, 4)
    bank.add(sig, 0, snapshot=snap)
    assert bank.signatures.dtype == torch.bfloat16
    assert torch.equal(bank.signatures[0], sig.to(torch.bfloat16))
    assert torch.equal(bank.snapshots[0], snap.to(torch.bfloat16))
    with pytest.raises(ValueError, match="snapshot is required"):
        bank.add(sig, 1)


def test_merges_the_two_closest_entries_weighted_by_task_count():
    """Entries 0 = [0, 0], 1 = [10, 10], 2 = [1, 0] (L = 1, D = 2): L1 distances 20, 1, 19 -> 0 and 2 merge into
    [0.5, 0]. A fourth task [0.5, 1] is then closest (L1 1) to the merged entry holding 2 tasks: (2 * [0.5, 0] +
    [0.5, 1]) / 3 = [0.5, 1/3]."""
    bank = TaskBank(1, 2, max_tasks=2, keep_snapshots=True)
    for k, v in enumerate(([0.0, 0.0], [10.0, 10.0], [1.0, 0.0])):
        bank.add(torch.tensor([v]), k, snapshot=torch.tensor([v]) * 2)
    assert bank.members == [[0, 2], [1]]
    assert torch.allclose(bank.signatures, torch.tensor([[[0.5, 0.0]], [[10.0, 10.0]]]))
    assert torch.allclose(bank.snapshots[0], torch.tensor([[1.0, 0.0]]))
    index = bank.add(torch.tensor([[0.5, 1.0]]), 3, snapshot=torch.zeros(1, 2))
    assert index == 0 and bank.members == [[0, 2, 3], [1]] and bank.labels() == ["0+2+3", "1"]
    assert torch.allclose(bank.signatures[0], torch.tensor([[0.5, 1.0 / 3.0]]))


def test_spread_is_the_mean_distance_to_the_bank_mean():
    bank = TaskBank(2, 2)
    bank.add(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 0)
    assert bank.spread().tolist() == [1.0, 1.0]  # a single entry (or identical ones): unit scale
    bank.add(torch.tensor([[3.0, 2.0], [0.0, 0.0]]), 1)
    # Layer 0: mean [2, 1], each entry at L1 distance 2; layer 1: all zeros -> 1.
    assert bank.spread().tolist() == [2.0, 1.0]


def test_state_round_trip():
    bank = TaskBank(2, 3, keep_snapshots=True)
    for k in range(3):
        bank.add(torch.randn(2, 3), k, snapshot=torch.randn(2, 3))
    other = TaskBank(2, 3, keep_snapshots=True)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.signatures, bank.signatures) and torch.equal(other.snapshots, bank.snapshots)
    assert other.members == bank.members
    with pytest.raises(ValueError, match="this bank stores"):
        TaskBank(2, 4, keep_snapshots=True).load_state_dict(bank.state_dict())


@pytest.mark.parametrize(
    "row, error, match",
    [
        (torch.randn(3, 4), ValueError, r"signature must have shape \(L, D\) = \(2, 4\), got \(3, 4\)"),
        (torch.randn(8), ValueError, r"signature must have shape \(L, D\)"),
        (torch.ones(2, 4, dtype=torch.int64), TypeError, "floating-point"),
        (torch.full((2, 4), float("inf")), ValueError, "NaN or inf"),
        ([[0.0] * 4] * 2, TypeError, "signature must be a torch.Tensor"),
    ],
)
def test_bad_signatures(row, error, match):
    with pytest.raises(error, match=match):
        TaskBank(2, 4).add(row, 0)


def test_bad_construction():
    with pytest.raises(ValueError, match="width"):
        TaskBank(2, 0)
    with pytest.raises(TypeError, match="dtype"):
        TaskBank(2, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="max_tasks"):
        TaskBank(2, 3, max_tasks=0)
    with pytest.raises(ValueError, match="metric"):
        TaskBank(2, 3, metric="hamming")
