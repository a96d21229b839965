"""The constants both kernel languages share (treelora/kernels/constants.py): the committed C++ header is the one the
module generates, and every Python user takes the same objects rather than a copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from treelora import ops
from treelora.kernels import constants
from treelora.kernels.cuda import common as cuda_common
from treelora.ops import masked_update as ops_masked_update
from treelora.ops import similarity as ops_similarity

REPO = Path(__file__).resolve().parents[1]
HEADER = REPO / "csrc" / "kernel_constants.h"


def test_committed_header_is_the_generated_one():
    assert HEADER.read_text() == constants.c_header(), (
        "csrc/kernel_constants.h differs from treelora/kernels/constants.py; regenerate it with "
        "`python -m treelora.kernels.constants > csrc/kernel_constants.h` and rebuild the extension"
    )


def test_generator_command_prints_the_header():
    out = subprocess.run(
        [sys.executable, "-m", "treelora.kernels.constants"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out == HEADER.read_text()


def test_header_lists_every_code():
    text = HEADER.read_text()
    for code in constants.METRIC_CODES.values():
        assert f"= {code}" in text
    assert "kSimilarityEps = 1e-12f" in text
    assert set(constants.METRIC_CODES) == set(constants.METRICS) == set(constants.IS_DISTANCE)
    assert len(set(constants.METRIC_CODES.values())) == len(constants.METRICS)


def test_python_users_share_one_definition():
    assert ops.METRICS is ops_similarity.METRICS is constants.METRICS
    assert ops.IS_DISTANCE is constants.IS_DISTANCE
    assert ops_masked_update.topk_count is constants.topk_count
    assert cuda_common.DTYPE_CODES is constants.DTYPE_CODES


@pytest.mark.requires_triton
def test_triton_kernels_use_the_shared_metric_codes():
    from treelora.kernels.triton import similarity

    codes = {m: getattr(similarity, m.upper()).value for m in constants.METRICS}
    assert codes == constants.METRIC_CODES
    assert similarity.NORMS.value not in constants.METRIC_CODES.values()  # the extra pass of l1_normalized
    assert similarity.EPS.value == constants.SIMILARITY_EPS


@pytest.mark.parametrize(
    "numel, density, k", [(10, 0.3, 3), (10, 0.31, 4), (0, 0.5, 0), (7, 1.0, 7), (1000, 1e-4, 1), (3, 1e-9, 1)]
)
def test_topk_count_is_ceil_of_density_times_numel(numel, density, k):
    assert constants.topk_count(numel, density) == k
