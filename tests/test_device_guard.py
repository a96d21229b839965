"""Every Triton and CUDA launch runs inside :func:`treelora.kernels.env.device_guard` entered with its tensors'
device, so that on a multi-GPU machine a kernel launches on the GPU that holds its tensors.

Runs in the CPU lane without executing a kernel: the guard is replaced by a recorder, each ``@triton.jit`` kernel of
the Triton modules and the compiled extension by fakes that record whether a guard is open (and for which device)
when they are launched. The launchers' own host code (shapes, workspaces, tables) runs for real.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch

from treelora import _cpp_lib
from treelora.kernels import env
from treelora.kernels.cuda import common as cuda_common
from treelora.kernels.cuda import lora as cuda_lora
from treelora.kernels.cuda import masked_update as cuda_masked_update
from treelora.kernels.cuda import similarity as cuda_similarity

DEVICE = torch.device("cpu")


class Recorder:
    """Stands in for ``env.device_guard`` and records every launch with the device of the innermost open guard."""

    def __init__(self) -> None:
        self.open: list[torch.device] = []
        self.entered: list[torch.device] = []
        self.launches: list[tuple[str, torch.device | None]] = []

    @contextlib.contextmanager
    def guard(self, device: torch.device) -> Iterator[None]:
        self.entered.append(device)
        self.open.append(device)
        try:
            yield
        finally:
            self.open.pop()

    def launch(self, name: str) -> None:
        self.launches.append((name, self.open[-1] if self.open else None))

    def check(self, expected_launches: set[str]) -> None:
        names = {name for name, _ in self.launches}
        assert names == expected_launches, f"launched {sorted(names)}, expected {sorted(expected_launches)}"
        outside = [name for name, device in self.launches if device != DEVICE]
        assert not outside, f"launched outside a guard of the tensors' device {DEVICE}: {outside}"
        assert self.entered and all(d == DEVICE for d in self.entered), self.entered


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(env, "device_guard", rec.guard)
    return rec


def test_guard_makes_the_tensors_gpu_current(monkeypatch):
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with env.device_guard(torch.device("cuda", 1)):
        pass
    with env.device_guard(torch.device("cpu")):  # CPU tensors (interpreter, emulator): nothing to switch
        pass
    assert entered == [torch.device("cuda", 1)]


# --- Triton launchers ---------------------------------------------------------------------------------------------


class FakeKernel:
    """A ``@triton.jit`` kernel as the launchers use it: ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, name: str, rec: Recorder) -> None:
        self.name, self.rec = name, rec

    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: self.rec.launch(self.name)


def _fake_kernels(module: Any, rec: Recorder, monkeypatch) -> None:
    import triton

    for name, value in vars(module).copy().items():
        if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel"):
            monkeypatch.setattr(module, name, FakeKernel(name, rec))


@pytest.mark.requires_triton
def test_triton_lora_launches_run_inside_the_guard(recorder, monkeypatch):
    from treelora.kernels.triton import lora

    _fake_kernels(lora, recorder, monkeypatch)
    x, w, b = torch.randn(33, 40), torch.randn(24, 40), torch.randn(24)
    a, bb = torch.randn(6, 40), torch.randn(24, 6)
    y, saved, state = lora.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.25, 2, True)
    lora.lora_linear_bwd(torch.randn(33, 24), saved, state, True, True, True)
    lora.lora_linear_dropout_mask(saved, state)
    recorder.check({"_lora_shrink_kernel", "_lora_gemm_kernel", "_lora_dudb_kernel", "_lora_grad_a_kernel",
                    "_dropout_keep_kernel"})  # fmt: skip


@pytest.mark.requires_triton
def test_triton_tma_gemm_launch_runs_inside_the_guard(recorder, monkeypatch):
    """The persistent TMA GEMM (sm_90) is chosen only on a GPU; its launcher is called directly here."""
    from treelora.kernels.triton import lora

    _fake_kernels(lora, recorder, monkeypatch)
    tiles = lora.GemmTiles(block_m=64, block_n=64, block_k=32, block_r=16, group_m=8, num_warps=4, num_stages=3)
    out, a, b = (
        torch.empty(64, 64, dtype=torch.bfloat16),
        torch.randn(64, 32).bfloat16(),
        torch.randn(64, 32).bfloat16(),
    )
    lora.lora_gemm_tma(out, a, b, True, torch.randn(64, 8), torch.randn(8, 64), None, tiles, programs=4)
    recorder.check({"_lora_gemm_tma_kernel"})


@pytest.mark.requires_triton
def test_triton_similarity_launches_run_inside_the_guard(recorder, monkeypatch):
    from treelora.kernels.triton import similarity

    _fake_kernels(similarity, recorder, monkeypatch)
    query, bank, index = torch.randn(3, 50), torch.randn(4, 3, 50), torch.tensor([0, 3, 1])
    similarity.pairwise_similarity(query, bank, "l1_normalized")
    similarity.pairwise_similarity(query, bank, "cosine", index)
    similarity.accumulate_and_compare_(query.clone(), torch.randn(3, 50), 2.0, bank, index, "l1")
    recorder.check({"_similarity_kernel"})
    assert len(recorder.launches) == 4  # l1_normalized takes two passes


@pytest.mark.requires_triton
def test_triton_masked_update_launches_run_inside_the_guard(recorder, monkeypatch):
    from treelora.kernels.triton import masked_update

    _fake_kernels(masked_update, recorder, monkeypatch)
    params = [torch.randn(100), torch.randn(7, 3)]
    grads = [torch.randn_like(p) for p in params]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    masked_update.masked_adamw_(params, grads, *moments, 1, lr=0.1, density=0.3)
    masked_update.masked_sgd_(params, grads, moments[0], lr=0.1, momentum=0.9, masks=[torch.tensor([1, 5]), None])
    masked_update.density_thresholds(grads, 0.5)
    recorder.check(
        {
            "_radix_pass_kernel",
            "_masked_adamw_kernel",
            "_index_mask_kernel",
            "_masked_sgd_kernel",
            "_candidate_pass_kernel",
            "_candidate_update_kernel",
            "_digit_compaction_kernel",
        }
    )


# --- CUDA launchers -----------------------------------------------------------------------------------------------


class FakeExtension:
    """``treelora._C`` as the launchers use it: size helpers answer, launching entry points record."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def __getattr__(self, name: str):
        if name.endswith("_workspace_size"):
            return lambda *args: 0
        return lambda *args: self.rec.launch(name)


@pytest.fixture
def fake_extension(recorder, monkeypatch) -> Recorder:
    monkeypatch.setattr(_cpp_lib, "module", FakeExtension(recorder))
    monkeypatch.setattr(cuda_common, "stream_handle", lambda device: 0)
    monkeypatch.setattr(cuda_common, "num_sms", lambda device: 1)
    cuda_masked_update._tables.clear()  # tables hold addresses of tensors
    yield recorder
    cuda_masked_update._tables.clear()


def test_cuda_lora_launches_run_inside_the_guard(fake_extension):
    x, w, b = torch.randn(33, 40), torch.randn(24, 40), torch.randn(24)
    a, bb = torch.randn(6, 40), torch.randn(24, 6)
    y, saved, state = cuda_lora.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.25, 2, True)
    cuda_lora.lora_linear_bwd(torch.randn(33, 24), saved, state, True, True, True)
    cuda_lora.lora_linear_dropout_mask(saved, state)
    fake_extension.check({"lora_forward", "lora_backward", "lora_dropout_mask"})


def test_cuda_similarity_launches_run_inside_the_guard(fake_extension):
    query, bank, index = torch.randn(3, 50), torch.randn(4, 3, 50), torch.tensor([0, 3, 1])
    cuda_similarity.pairwise_similarity(query, bank, "l1", index)
    cuda_similarity.accumulate_and_compare_(query.clone(), torch.randn(3, 50), 2.0, bank, index, "l1")
    fake_extension.check({"similarity", "similarity_accumulate"})


def test_cuda_masked_update_launches_run_inside_the_guard(fake_extension):
    params = [torch.randn(100), torch.randn(7, 3)]
    grads = [torch.randn_like(p) for p in params]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    cuda_masked_update.masked_adamw_(params, grads, *moments, 1, lr=0.1, density=0.3)
    cuda_masked_update.masked_sgd_(params, grads, moments[0], lr=0.1, momentum=0.9)
    cuda_masked_update.density_thresholds(grads, 0.5)
    fake_extension.check({"masked_adamw", "masked_sgd", "masked_density_thresholds"})
