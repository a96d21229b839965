"""The build: treelora._C is built when nvcc is present (CI fails here if that build broke), imports on a machine
without a GPU, reports CUDA errors instead of crashing, and `info` says why it is missing when it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from treelora import _cpp_lib, ops, use_backend

REPO = Path(__file__).resolve().parents[1]
HAS_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").is_file()


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc on this machine: the extension is not expected")
def test_extension_was_built_for_the_default_architectures():
    assert _cpp_lib.build_info.get("built"), f"treelora._C was not built: {_cpp_lib.build_info.get('reason')}"
    assert _cpp_lib.available(), f"treelora._C was built but does not import: {_cpp_lib.import_error}"
    expected = os.environ.get("TREELORA_CUDA_ARCHS", "80;90a").split(";")
    assert _cpp_lib.module.compiled_archs() == [f"sm_{a}" for a in expected]


@pytest.mark.requires_cuda_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_extension_call_without_gpu_raises_a_clear_error():
    assert _cpp_lib.device_error(), "expected the extension to find no usable GPU here"
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        _cpp_lib.module.similarity(0, 0, 0, 0, 0, 0, 0, 1, 1, 8, 8, 1, 1, 0, 0, 0)
    assert _cpp_lib.environment_reasons()[0].startswith("treelora._C finds no usable GPU")


def test_missing_extension_never_breaks_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "treelora._C", None)  # makes `from treelora import _C` raise ImportError
    module, reason = _cpp_lib._import_extension()
    assert module is None and reason


def test_info_reports_the_extension_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "treelora", "info"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert "treelora._C:" in out and "lora_linear" in out and "masked_adamw_" in out
    if _cpp_lib.available():
        archs = ", ".join(_cpp_lib.module.compiled_archs())
        assert f"built for {archs}" in out
    else:
        assert "not built (" in out


def test_install_without_cuda_records_why(tmp_path):
    """TREELORA_BUILD_CUDA=0 gives a pure-Python install whose `info` says the extension was skipped."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "CMakeLists.txt"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "csrc", src / "csrc")
    shutil.copytree(
        REPO / "treelora", src / "treelora", ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json")
    )
    target = tmp_path / "site"
    env = dict(os.environ, TREELORA_BUILD_CUDA="0")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    assert not list((target / "treelora").glob("_C*.so"))
    env["PYTHONPATH"] = str(target)
    # An editable install of the checkout registers a meta-path finder that would still resolve treelora._C to the
    # checkout's build; drop it so the subprocess sees only the fresh install.
    script = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in repr(f)]; "
        "from treelora.cli import main; sys.exit(main(['info']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env, cwd=tmp_path
    ).stdout
    assert "treelora._C: not built (skipped: TREELORA_BUILD_CUDA=0)" in out
    assert "torch   available" in out


@pytest.mark.requires_cuda
@pytest.mark.requires_cuda_ext
@pytest.mark.parametrize("metric", ["dot", "l1", "sqeuclidean"])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_extension_gathered_similarity_matches_reference_on_gpu(metric, bank_dtype):
    T, L, D = 7, 5, 40_003  # D is odd: exercises the tails
    q = torch.randn(L, D, device="cuda")
    bank = torch.randn(T, L, D, device="cuda").to(bank_dtype)
    index = torch.tensor([6, 0, 3, 3, 1], device="cuda")
    with use_backend("cuda"):
        out = ops.pairwise_similarity(q, bank, metric, index=index)
    ref = ops.pairwise_similarity_ref(q.double().cpu(), bank.double().cpu(), metric, index.cpu())
    base = ops.pairwise_similarity_ref(q, bank, metric, index, upcast=False).cpu()  # fp32 torch, same inputs
    from tests.utils import assert_close_to_ref

    assert_close_to_ref(f"cuda gathered {metric}", out.cpu(), ref, base.float(), dtype=torch.float32)
