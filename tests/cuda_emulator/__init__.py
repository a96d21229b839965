"""A CPU emulator for treelora's CUDA C++ kernels (csrc/), so that every CI run executes their logic.

Lane: ``TREELORA_CUDA_EMULATOR=1 python -m pytest -m cuda_emulated -q``. The first run builds the emulated module
with g++ (about 20 s on 2 cores; cached under build/cuda-emulator/, keyed by a hash of csrc/ and of this
package, so later runs load it at once); tests/test_cuda_emulated.py then runs the CUDA tests' checks on CPU tensors
through the real launchers (treelora/kernels/cuda/*.py) and the real ops. Without the variable those tests skip.

How it works
  * build.py rewrites csrc/ (launches into calls of the emulator, ``__shared__`` declarations into poisoned statics,
    the module name ``_C`` into ``_treelora_cuda_emulated``) and compiles it against the stand-in headers in
    include/ (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h). The result is loaded from its file, never put in
    sys.modules and never importable as ``treelora._C``.
  * runtime.cc runs a launch's blocks one after another on the calling thread; the threads of a block are fibers.
    The scheduler always resumes the lowest-index thread that can run (the highest in reverse order), which runs
    until it waits at ``__syncthreads()`` or a warp-collective instruction (a shuffle, ldmatrix, mma.sync, a 16-byte
    shared store of csrc/lora_mma.cuh), or ends: one end of the block runs as far ahead of the
    rest as the barriers allow, the largest skew between threads a GPU could produce.
  * harness.py routes the ``cuda`` backend of every op to that module for CPU tensors, inside a ``with`` block.

What it shows
  * The kernels' arithmetic, indexing, tiling, vector paths with their scalar heads and tails, grid-stride loops
    (the emulated device has 1 SM by default, so grids are small), multi-block partial sums and their fixed-order
    reductions, the radix select, Philox dropout, the host-side planning and error paths, and the Python launchers,
    all against the same float64 references and tolerances as the GPU tests.
  * Synchronisation bugs inside a block: because of that skew, a missing ``__syncthreads()`` before a read of what
    other threads write, or before other threads overwrite what a thread has still to read, gives a wrong result
    (each kind shows in at least one of the two orders, and the lane runs both). A barrier or shuffle in divergent
    code, a shuffle whose mask names an exited lane, and a deadlock raise RuntimeError naming the kernel, the launch
    site, block and thread.
  * Reads of memory nobody wrote: shared memory is filled with 0xff bytes (NaN as a float) when a block first
    reaches it, and ``torch.empty`` in the launchers returns 0xff-filled memory.
  * Misaligned vector accesses and out-of-range indices into fixed-size (shared) arrays, through UBSan's alignment
    and bounds checks (on by default; TREELORA_CUDA_EMULATOR_SANITIZE=0 turns them off): the launch stops with a
    RuntimeError quoting UBSan's report (csrc file and line) and the offending block and thread.
  * Invalid launch configurations come back from ``cudaGetLastError()`` as on a device.
  * Tensor-core code: ldmatrix.x4[.trans], mma.sync.m16n8k16 (bf16, fp16) and st.shared.v4 gather the operands of
    all 32 lanes and hand each lane its part with the PTX ISA's per-thread fragment layouts (checked against those
    layouts, written out independently, by the emulator's self-tests), so a wrong fragment index gives a wrong
    result; executing one with lanes of the warp ended is an error, as the .aligned instructions require.
  * Shared-memory bank conflicts of those ldmatrix and 16-byte stores: each access phase's distinct 16-byte bank
    groups are counted (``emulator_counters()["bank_conflicts"]``, extra wavefronts), and the LoRA tests require 0.

What it cannot show
  * Timing, occupancy, coalescing, and bank conflicts of shared accesses other than ldmatrix and 16-byte stores:
    nothing here measures speed (bench/ does, on a GPU).
  * Memory ordering between concurrently running blocks: blocks run one after another, so a race between blocks
    (two blocks writing one location, a block reading what another writes) is invisible; only the fixed-order
    designs the kernels use are exercised. Reversed block order changes which block goes first, nothing more.
  * Warp divergence and lockstep effects: threads are scheduled one at a time, not as 32-wide SIMT groups, so
    divergence costs nothing and warp-synchronous code without ``__syncwarp`` is not checked beyond the shuffles.
  * Real alignment faults when the sanitizer is off, out-of-bounds accesses through raw pointers into global
    memory (CPU heap reads do not fault), and anything about device memory (caching, L2, the real allocator).
  * The device's floating-point details: no fused multiply-add contraction (nvcc fuses by default), and host
    libm instead of the device's sqrtf/pow, and an mma.sync that sums its products in double and rounds once
    (the tensor cores' fp32 accumulation order and truncation are unspecified), so results differ in the last bits;
    the tests compare against float64
    references with the same tolerance rule as on a GPU, and bitwise checks only compare the emulator with itself.
  * cuBLAS: the base GEMMs of the LoRA launcher run as torch CPU matmuls.

Environment: TREELORA_CUDA_EMULATOR=1 enables the lane (read by tests/conftest.py); CXX and
TREELORA_CUDA_EMULATOR_SANITIZE are read by build.py.
"""

from __future__ import annotations

from tests.cuda_emulator.build import EmulatorBuildError, load, sanitize_enabled
from tests.cuda_emulator.harness import emulated_cuda

__all__ = ["EmulatorBuildError", "emulated_cuda", "load", "sanitize_enabled"]
