"""The compiled extension treelora._C on a machine without a GPU: it exposes every kernel entry point, reports its
architectures, raises a clear RuntimeError (never crashes) when a kernel is called, `info` lists it, and the cuda
backends explain why they cannot run CPU tensors. The launchers' host-side arithmetic is checked against hand-computed
values. GPU correctness lives in tests/test_cuda_{similarity,masked_update,lora}.py."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests import test_cuda_lora as lora_checks
from treelora import _cpp_lib, backends, info
from treelora.kernels.cuda import lora as cuda_lora
from treelora.kernels.cuda import masked_update as cuda_masked_update
from treelora.kernels.cuda import similarity as cuda_similarity

# Entry points that launch kernels (each calls require_device first), with arguments of the right types.
LAUNCHING_ENTRY_POINTS = {
    "similarity": (0, 0, 0, 0, 0, 0, 0, 1, 1, 8, 8, 1, 1, 0, 0, 0),
    "similarity_accumulate": (0, 0, 0, 0, 1.0, 0, 0, 0, 0, 0, 1, 1, 8, 8, 1, 1, 0, 0, 0),
    "masked_adamw": (0, 1, 1, 4096, False, False, 0, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, 0, 0),
    "masked_sgd": (0, 1, 1, 4096, False, False, 0, 0, 1e-3, 0.9, 0.0, 0),
    "masked_density_thresholds": (0, 1, 1, 4096, 0, 0, 0),
    "lora_forward": (0, 2, 8, 4, 8, 8, 2, 0, 0, 8, 1, 0, 0, 2, 1, 0, 0, 1.0, 0, 1 << 24, 0, 0, 8, 0, 1, 0),
    "lora_backward": (
        0,
        8,
        0,
        8,
        2,
        4,
        8,
        8,
        2,
        0,
        0,
        0,
        8,
        1,
        0,
        0,
        2,
        1,
        0,
        1.0,
        0,
        1 << 24,
        1.0,
        0,
        8,
        0,
        0,
        0,
        0,
        0,
        1,
        0,
    ),
    "lora_dropout_mask": (0, 1 << 23, 4, 8, 0, 0),
}
# Host-only helpers (no kernel): they must answer without a device.
SIZE_HELPERS = (
    "similarity_workspace_size",
    "masked_update_workspace_size",
    "lora_forward_workspace_size",
    "lora_backward_workspace_size",
    "lora_plan",
)

requires_ext = pytest.mark.requires_cuda_ext


@requires_ext
def test_module_exposes_every_entry_point():
    names = set(dir(_cpp_lib.module))
    missing = (set(LAUNCHING_ENTRY_POINTS) | set(SIZE_HELPERS)) - names
    assert not missing, f"treelora._C lacks {sorted(missing)}"


@requires_ext
def test_module_reports_its_architectures():
    expected = os.environ.get("TREELORA_CUDA_ARCHS", "80;90a").split(";")
    assert _cpp_lib.module.compiled_archs() == [f"sm_{a}" for a in expected]


@requires_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("entry", sorted(LAUNCHING_ENTRY_POINTS))
def test_entry_point_without_gpu_raises_a_clear_error(entry):
    with pytest.raises(RuntimeError, match=f"treelora._C.{entry}: no usable CUDA device"):
        getattr(_cpp_lib.module, entry)(*LAUNCHING_ENTRY_POINTS[entry])


@requires_ext
def test_size_helpers_need_no_device():
    C = _cpp_lib.module
    # similarity: 3 partial sums per (row, chunk) plus 2 norms per (row, layer)
    assert C.similarity_workspace_size(4, 3, 10, False) == 4 * 10 * 3 + 2 * 4 * 3
    assert C.similarity_workspace_size(4, 3, 10, True) == 10 * 3 + 2 * 3
    # masked update: 16 bytes of select state and 512 4-byte bins per tensor (each part 256-aligned), then scratch
    assert C.masked_update_workspace_size(1, 0) == 256 + 2048
    assert C.masked_update_workspace_size(3, 100) == 256 + 3 * 2048 + 256
    # LoRA (bf16 = code 2), 132 SMs: nothing for an empty batch; 16 rows x 640 columns are one m tile, which the
    # shrink splits into all 10 K tiles of 64 (it wants 4 x 132 blocks): 10 slabs of 16 x 4 partial sums of u
    assert C.lora_forward_workspace_size(0, 64, 64, 4, 2, 132) == 0
    assert C.lora_forward_workspace_size(16, 640, 64, 4, 2, 132) == 10 * 16 * 4
    # backward of one 64 x 64 tile each way: du (16 x 4) only, no partial slabs and no counters
    assert C.lora_backward_workspace_size(16, 64, 64, 4, 0, 2, True, True, True, 132) == 16 * 4
    assert C.lora_plan(16, 640, 64, 4, 0, 2, 132, True, True, True)["shrink_k_panels"] == 10


def test_info_lists_the_entry_points():
    report = info.format_report(info.collect())
    if _cpp_lib.available():
        for entry in LAUNCHING_ENTRY_POINTS:
            assert entry in report, f"`python -m treelora info` does not list {entry}"
    else:
        assert "treelora._C: not built" in report


def _cpu_inputs() -> dict[str, tuple[tuple, dict]]:
    x, w = torch.zeros(4, 32), torch.zeros(16, 32)
    a, b = torch.zeros(8, 32), torch.zeros(16, 8)
    q, bank, index = torch.zeros(2, 16), torch.zeros(3, 2, 16), torch.zeros(2, dtype=torch.int64)
    p = [torch.zeros(8)]
    adam = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, masks=None, density=None)
    return {
        "lora_linear": ((x, w, None, a, b, 1.0, 0.0, 0), {}),
        "pairwise_similarity": ((q, bank, "l1", index, None), {}),
        "accumulate_and_compare_": ((q, q, 1.0, bank, index, "l1", None), {}),
        "masked_adamw_": ((p, p, p, p, 1), adam),
        "masked_sgd_": ((p, p, p), dict(lr=1e-3, momentum=0.9, weight_decay=0.0, masks=None, density=None)),
    }


@pytest.mark.parametrize("op", sorted(_cpu_inputs()))
def test_cuda_backend_explains_why_it_cannot_run_cpu_tensors(op):
    import treelora.ops  # noqa: F401  (registers the backends)

    args, kwargs = _cpu_inputs()[op]
    reasons = backends.explain(op, *args, **kwargs)["cuda"]
    assert reasons, f"{op}: the cuda backend claims it can run CPU tensors"
    text = "; ".join(reasons)
    if not _cpp_lib.available():
        assert "treelora._C is not available" in text
    elif torch.cuda.is_available():
        assert "cpu" in text
    else:
        assert "no usable GPU" in text
    with backends.use_backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="cuda"):
        backends.select(op, *args, **kwargs)


def test_launchers_reject_bad_layouts_before_the_extension():
    if not _cpp_lib.available():
        pytest.skip("the launchers need treelora._C to be importable")
    bank = torch.zeros(3, 24)
    with pytest.raises(ValueError, match="query must be a contiguous"):
        cuda_similarity.similarity_flat(torch.zeros(24, 2)[:, 0], bank, (0, 24), "l1", None)
    with pytest.raises(ValueError, match="offsets must run from 0 to 24"):
        cuda_similarity.similarity_flat(torch.zeros(24), bank, (0, 20), "l1", None)
    with pytest.raises(TypeError, match="index must be a contiguous"):
        cuda_similarity.similarity_flat(torch.zeros(24), bank, (0, 12, 24), "l1", torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="metric must be one of"):
        cuda_similarity.similarity_flat(torch.zeros(24), bank, (0, 24), "hamming", None)
    with pytest.raises(TypeError, match="mean must be fp32"):
        cuda_similarity.accumulate_and_compare_flat(
            torch.zeros(24, dtype=torch.float16),
            torch.zeros(24),
            1.0,
            bank,
            torch.zeros(1, dtype=torch.int64),
            (0, 24),
            "l1",
        )


def test_chunk_layout_counts_chunks_per_layer():
    # layers of 1, 4096, 4097 and 10000 elements -> 1, 1, 2 and 3 chunks of 4096
    prefix, total = cuda_similarity.chunk_layout((0, 1, 4097, 8194, 18194), 4096)
    assert prefix == (0, 1, 2, 4, 7) and total == 7


@requires_ext
def test_lora_plan_mirror_matches_the_extension():
    lora_checks.check_plan_mirror(_cpp_lib.module)


def test_dropout_keep_threshold():
    assert cuda_lora.keep_threshold(0.0) == 1 << 24
    assert cuda_lora.keep_threshold(0.5) == 1 << 23
    assert cuda_lora.keep_threshold(0.25) == 3 << 22
    assert cuda_lora.keep_threshold(1.0 - 1e-12) == 1  # p < 1 always keeps something


def test_masked_update_table_rows():
    """The table row layout of csrc/masked_update.h (MaskedTensorEntry), built from CPU tensors (no launch)."""
    p = [torch.zeros(5000), torch.zeros(3, 3), torch.zeros(0), torch.zeros(10)]
    masks = [torch.ones(5000, dtype=torch.bool), torch.tensor([1, 1, 7]), None, None]
    table, meta = cuda_masked_update._build_table(p, p, p, p, masks, None, True)
    rows = table.tolist()
    assert table.shape == (4, cuda_masked_update.TABLE_WORDS)
    assert [r[7] for r in rows] == [0, 2, 3, 3]  # chunk_begin: 5000 -> 2 chunks of 4096, 9 -> 1, 0 -> 0
    assert [r[14] for r in rows] == [1, 2, 0, 0]  # byte mask, index list, all, all
    assert rows[1][6] == 3 and rows[1][9] == 0  # index list length and its scratch offset
    assert meta == dict(num_tensors=4, total_chunks=4, scratch_bytes=16, has_index_lists=True, has_density=False)
    _, dense = cuda_masked_update._build_table(p, p, p, p, None, [2500, 9, 0, 1], True)
    assert dense["has_density"]  # k = numel selects the whole tensor without a radix select; k < numel needs one
    rows = cuda_masked_update._build_table(p, p, p, p, None, [2500, 9, 0, 1], True)[0].tolist()
    assert [(r[14], r[8]) for r in rows] == [(3, 2500), (0, 0), (0, 0), (3, 1)]


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the copy triton (a test dependency) ships for its own use."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(candidate) if candidate.is_file() else None


@requires_ext
def test_binary_holds_an_image_per_architecture_for_every_kernel_file():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump is not installed")
    listing = subprocess.run(
        [tool, "--list-elf", _cpp_lib.module.__file__], capture_output=True, text=True, check=True
    ).stdout
    for family in ("similarity", "masked_update", "lora"):
        for arch in _cpp_lib.module.compiled_archs():
            assert f"{family}.{arch}.cubin" in listing, f"no {arch} image of {family}.cu in treelora._C:\n{listing}"
