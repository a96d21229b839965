"""Continual-learning metrics on hand-computed accuracy matrices, one test per convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from treelora.cl import metrics

NAN = float("nan")
# R[i, j]: accuracy on task j after training task i; the entries above the diagonal are the next-task evaluations
# that forward transfer needs, R[0, 2] was not measured.
R = np.array(
    [
        [0.90, 0.30, NAN],
        [0.70, 0.80, 0.40],
        [0.60, 0.85, 0.50],
    ]
)
ZERO_SHOT = [0.25, 0.20, 0.35]


def test_average_accuracy_is_the_mean_of_the_last_row():
    assert metrics.average_accuracy(R) == pytest.approx((0.60 + 0.85 + 0.50) / 3)


def test_average_incremental_accuracy_averages_each_stage_over_its_seen_tasks():
    stages = [0.90, (0.70 + 0.80) / 2, (0.60 + 0.85 + 0.50) / 3]
    assert metrics.average_incremental_accuracy(R) == pytest.approx(sum(stages) / 3)


def test_bwt_paper_convention_positive_means_forgetting_and_divides_by_n():
    # task 0 lost 0.30, task 1 gained 0.05, the last task contributes 0; the paper divides by N = 3
    assert metrics.bwt(R, "paper") == pytest.approx((0.30 - 0.05 + 0.0) / 3)
    assert metrics.bwt(R) == metrics.bwt(R, "paper")


def test_bwt_gem_convention_negative_means_forgetting_and_divides_by_n_minus_1():
    assert metrics.bwt(R, "gem") == pytest.approx(((0.60 - 0.90) + (0.85 - 0.80)) / 2)


def test_bwt_official_convention_clips_positive_transfer_to_zero():
    # the gain on task 1 is clipped, the loss on task 0 kept with the code's negative sign, divided by N = 3
    assert metrics.bwt(R, "official") == pytest.approx((-0.30 + 0.0 + 0.0) / 3)


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 0: best 0.90 (after task 0) -> 0.60; task 1: best before the end 0.80 -> 0.85 (negative forgetting)
    assert metrics.forgetting(R) == pytest.approx(((0.90 - 0.60) + (0.80 - 0.85)) / 2)
    peak_later = np.array([[0.5, NAN, NAN], [0.9, 0.7, NAN], [0.4, 0.7, 0.6]])
    assert metrics.forgetting(peak_later) == pytest.approx(((0.9 - 0.4) + (0.7 - 0.7)) / 2)


def test_fwt_compares_the_next_task_accuracy_with_the_zero_shot_baseline():
    assert metrics.fwt(R, ZERO_SHOT) == pytest.approx(((0.30 - 0.20) + (0.40 - 0.35)) / 2)


def test_metrics_are_unit_agnostic_and_accept_tensors():
    pct = torch.tensor(R * 100)
    assert metrics.average_accuracy(pct) == pytest.approx(100 * metrics.average_accuracy(R))
    assert metrics.bwt(pct, "gem") == pytest.approx(100 * metrics.bwt(R, "gem"))
    assert metrics.fwt(pct, torch.tensor(ZERO_SHOT) * 100) == pytest.approx(100 * metrics.fwt(R, ZERO_SHOT))


def test_single_task_stream():
    one = [[0.7]]
    assert metrics.average_accuracy(one) == pytest.approx(0.7)
    assert metrics.bwt(one, "paper") == 0.0 and metrics.bwt(one, "gem") == 0.0 and metrics.bwt(one, "official") == 0.0
    assert metrics.forgetting(one) == 0.0 and metrics.fwt(one, [0.1]) == 0.0


def test_summarize_collects_every_metric():
    s = metrics.summarize(R, ZERO_SHOT)
    assert s["acc"] == pytest.approx(metrics.average_accuracy(R))
    assert s["bwt"] == pytest.approx(metrics.bwt(R, "paper"))
    assert s["bwt_gem"] == pytest.approx(metrics.bwt(R, "gem"))
    assert s["bwt_official"] == pytest.approx(metrics.bwt(R, "official"))
    assert s["forgetting"] == pytest.approx(metrics.forgetting(R))
    assert s["fwt"] == pytest.approx(metrics.fwt(R, ZERO_SHOT))
    without_next = np.tril(np.nan_to_num(R, nan=0.0)) + np.triu(np.full_like(R, NAN), 1)
    assert "fwt" not in metrics.summarize(without_next, ZERO_SHOT)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[0.5, 0.2]], "square"),
        ([[0.5, NAN], [NAN, 0.4]], "NaN entries on or below the diagonal"),
        (np.zeros((0, 0)), "non-empty"),
    ],
)
def test_bad_matrices_are_rejected_with_the_reason(bad, match):
    with pytest.raises(ValueError, match=match):
        metrics.average_accuracy(bad)


def test_bad_convention_and_baseline_are_rejected():
    with pytest.raises(ValueError, match="convention must be one of"):
        metrics.bwt(R, "mammoth")
    with pytest.raises(ValueError, match="one entry per task"):
        metrics.fwt(R, [0.1, 0.2])
    lower = np.where(np.triu(np.ones_like(R), 1) > 0, NAN, R)
    with pytest.raises(ValueError, match=r"R\[j-1, j\]"):
        metrics.fwt(lower, ZERO_SHOT)
    assert math.isfinite(metrics.bwt(lower, "gem"))
