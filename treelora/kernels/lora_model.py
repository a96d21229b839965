"""Byte, launch and time model of one LoRA linear forward + backward, per design, against the base linear's own.

Why a model: no GPU is at hand where the kernels are written, yet the design must be chosen and guarded. Every
design is a list of launches (:class:`Launch`), each with the HBM bytes it moves (each operand read or written once:
re-reads that L2 serves are not counted, for the base GEMMs and the LoRA kernels alike) and its FLOPs. A launch on the
main stream costs ``max(FLOPs / peak, bytes / bandwidth)`` plus :data:`LAUNCH_GAP_S`; a launch on the side stream
runs beside the GEMM launched just before it and costs only what does not fit into the SM-time that GEMM's last wave
of tiles leaves idle (:func:`side_visible_time`). The base linear is ``F.linear`` with a frozen weight: the forward
GEMM x Wᵀ + b and the backward GEMM dy W, two launches. Ratios are modelled time over the base linear's modelled
time, so both are at the roofline: the model assumes the fused Triton GEMM matches cuBLAS on the base product, which
only a GPU can confirm (bench/bench_lora.py measures it).

Designs (:data:`DESIGNS`; the budget of each backend is its speed target, :data:`TARGETS`):

* ``triton-cublas-expand``: the Triton backend's sm_90 plan before the fused GEMM: cuBLAS base GEMMs, then in-place
  expand kernels that read and rewrite y and dx, split-K atomics with their zero fills and casts (12 launches).
* ``triton-fused`` (chosen, ``LoRAConfig(forward_base="fused", tma=True, side_stream=True)``): the shrink, then the
  persistent GEMM with u Bᵀ as an extra K-slice; du/dB in one pass over dy, the dx GEMM with du A folded in, dA on the
  side stream beside it; dA and dB accumulate in one zeroed fp32 buffer, one fill and one cast.
* ``triton-fused-serial``: the same with dA after the dx GEMM on the main stream (``side_stream=False``).
* ``triton-cublas-side``: cuBLAS base GEMMs with the shrink and du/dB beside them on the side stream; the in-place
  expands of y and dx stay on the critical path (``forward_base = grad_base = "cublas"``).
* ``cuda-beta1``: the CUDA C++ backend's plan, read from its own byte model
  (:func:`treelora.kernels.cuda.lora.traffic_model`): the expand kernel writes b + u Bᵀ and cuBLAS adds x Wᵀ onto it
  with beta = 1 (reading it back in its epilogue); du/dB in one pass over dy; one pass over x writes the dx term
  (read back by the dx GEMM with beta = 1) and reduces dA.

``python -m treelora.kernels.report`` prints the table at the benchmark shapes; its ``--check`` fails when the chosen
design's critical-path extra bytes exceed the budget its target leaves on the reference device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from treelora.kernels.cuda.lora import traffic_model


@dataclass(frozen=True)
class Device:
    """Peak numbers of a GPU: dense bf16 tensor-core FLOP/s, HBM bytes/s, SM count, and where they come from."""

    name: str
    bf16_flops: float
    hbm_bytes_per_s: float
    sms: int
    source: str


H100_SXM = Device(
    "H100 SXM5",
    989.4e12,
    3.35e12,
    132,
    "NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: BF16 Tensor Core 1,979 TFLOPS with sparsity (half of it "
    "dense), GPU memory bandwidth 3.35 TB/s; 132 SMs (NVIDIA H100 Tensor Core GPU Architecture whitepaper)",
)
H200_SXM = Device(
    "H200 SXM",
    989.4e12,
    4.8e12,
    132,
    "NVIDIA H200 Tensor Core GPU datasheet, SXM column: BF16 Tensor Core 1,979 TFLOPS with sparsity (half of it "
    "dense), GPU memory bandwidth 4.8 TB/s; the same GH100 die with 132 SMs",
)
DEVICES = (H100_SXM, H200_SXM)
# The budgets are checked on the device where the LoRA kernels' extra bytes cost the most time next to the base
# GEMMs: the lowest bandwidth per FLOP among the GPUs the project's benchmarks run on (H100: 295 FLOP per byte,
# H200: 206).
REFERENCE_DEVICE = H100_SXM
# An assumption, not a measurement: the GPU-side gap between two back-to-back kernels of one stream (launch latency
# that the previous kernel does not hide), about a microsecond on Hopper with a busy launch queue.
LAUNCH_GAP_S = 1.0e-6

# Speed targets, modelled time of LoRA forward + backward over the base linear's (issue targets; bench/bench_lora.py
# measures the same ratios on a GPU).
TARGETS = {"triton": 1.10, "cuda": 1.15}
# The design each backend runs at the benchmark shape (what ``--check`` holds to its target).
CHOSEN = {"triton": "triton-fused", "cuda": "cuda-beta1"}
# The benchmark shapes (bench/bench_lora.py GPU_COMPARE_SHAPE first): M, K, N, r, bf16 activations and adapters.
BENCH_SHAPES = ((8192, 4096, 4096, 16), (8192, 4096, 11008, 16), (8192, 11008, 4096, 16), (8192, 4096, 4096, 64))
# Output tile of the GEMMs (the sm_90 fused GEMM's; cuBLAS is assumed to tile alike): only the count of tiles in the
# last wave matters, for the idle SMs that side-stream work can use.
GEMM_TILE = (128, 256)
MIN_BLOCK_R = 16  # r is padded to a multiple of 16 in the fused GEMM's extra K-slice (tl.dot's minimum)


@dataclass(frozen=True)
class Shape:
    """One LoRA linear call: x (M, K), W (N, K), rank r; bytes per activation / adapter element."""

    M: int
    K: int
    N: int
    r: int
    elem: int = 2
    adapter_elem: int = 2

    @property
    def label(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r}"


@dataclass(frozen=True)
class Launch:
    """One kernel launch: HBM bytes moved, FLOPs, and, for a GEMM, its (M, N) output (for its tiles)."""

    name: str
    bytes: float
    flops: float = 0.0
    side: bool = False
    gemm_out: tuple[int, int] | None = None


def _sizes(s: Shape) -> dict[str, float]:
    """Bytes of every tensor a plan touches."""
    return {
        "x": s.M * s.K * s.elem,
        "W": s.N * s.K * s.elem,
        "y": s.M * s.N * s.elem,
        "bias": s.N * s.elem,
        "u": s.M * s.r * 4,  # u and du are fp32
        "A": s.r * s.K * s.adapter_elem,
        "B": s.N * s.r * s.adapter_elem,
        "acc": (s.r * s.K + s.N * s.r) * 4,  # dA and dB fp32 accumulators
        "grads": (s.r * s.K + s.N * s.r) * s.adapter_elem,
    }


def base_linear(s: Shape) -> list[Launch]:
    """``F.linear`` with a frozen weight: y = x Wᵀ + b, and in backward dx = dy W."""
    b = _sizes(s)
    flops = 2.0 * s.M * s.N * s.K
    return [
        Launch("addmm y = x Wᵀ + b", b["x"] + b["W"] + b["y"] + b["bias"], flops, gemm_out=(s.M, s.N)),
        Launch("mm dx = dy W", b["y"] + b["W"] + b["x"], flops, gemm_out=(s.M, s.K)),
    ]


def _triton_cublas_expand(s: Shape) -> list[Launch]:
    b = _sizes(s)
    base = base_linear(s)
    # split-K shrink and split-M dA (128 and 64 programs < 132 SMs): atomics into zero-filled fp32 outputs.
    return [
        Launch("zero-fill u", b["u"]),
        Launch("shrink u = s drop(x) Aᵀ", b["x"] + b["A"] + 2 * b["u"], 2.0 * s.M * s.K * s.r),
        base[0],
        Launch("expand y += u Bᵀ (read + write y)", 2 * b["y"] + b["u"] + b["B"], 2.0 * s.M * s.N * s.r),
        Launch("zero-fill dB", s.N * s.r * 4),
        Launch("du/dB one pass over dy", b["y"] + b["B"] + 2 * b["u"] + 2 * s.N * s.r * 4, 4.0 * s.M * s.N * s.r),
        Launch("cast dB", s.N * s.r * (4 + s.adapter_elem)),
        base[1],
        Launch("expand dx += drop(du A) (read + write dx)", 2 * b["x"] + b["u"] + b["A"], 2.0 * s.M * s.K * s.r),
        Launch("zero-fill dA", s.r * s.K * 4),
        Launch("dA = duᵀ drop(x)", b["x"] + b["u"] + 2 * s.r * s.K * 4, 2.0 * s.M * s.K * s.r),
        Launch("cast dA", s.r * s.K * (4 + s.adapter_elem)),
    ]


def _triton_fused(s: Shape, side: bool = True) -> list[Launch]:
    b = _sizes(s)
    base = base_linear(s)
    r_pad = MIN_BLOCK_R * math.ceil(s.r / MIN_BLOCK_R)
    return [
        Launch("shrink u = s drop(x) Aᵀ", b["x"] + b["A"] + b["u"], 2.0 * s.M * s.K * s.r),
        Launch(
            "fused GEMM y = x Wᵀ + u Bᵀ + b",
            base[0].bytes + b["u"] + b["B"],
            2.0 * s.M * s.N * (s.K + r_pad),
            gemm_out=(s.M, s.N),
        ),  # fmt: skip
        Launch("zero-fill dA/dB accumulator", b["acc"]),
        Launch("du/dB one pass over dy", b["y"] + b["B"] + 2 * b["u"] + 2 * s.N * s.r * 4, 4.0 * s.M * s.N * s.r),
        Launch(
            "fused GEMM dx = dy W + drop(du A)",
            base[1].bytes + b["u"] + b["A"],
            2.0 * s.M * s.K * (s.N + r_pad),
            gemm_out=(s.M, s.K),
        ),  # fmt: skip
        Launch(
            "dA = duᵀ drop(x)" + (" (side stream)" if side else ""),
            b["x"] + b["u"] + 2 * s.r * s.K * 4,
            2.0 * s.M * s.K * s.r,
            side=side,
        ),  # fmt: skip
        Launch("cast dA, dB", b["acc"] + b["grads"]),
    ]


def _triton_cublas_side(s: Shape) -> list[Launch]:
    b = _sizes(s)
    base = base_linear(s)
    return [
        base[0],
        Launch("shrink u (side stream)", b["x"] + b["A"] + b["u"], 2.0 * s.M * s.K * s.r, side=True),
        Launch("expand y += u Bᵀ (read + write y)", 2 * b["y"] + b["u"] + b["B"], 2.0 * s.M * s.N * s.r),
        Launch("zero-fill dA/dB accumulator", b["acc"]),
        base[1],
        Launch(
            "du/dB (side stream)", b["y"] + b["B"] + 2 * b["u"] + 2 * s.N * s.r * 4, 4.0 * s.M * s.N * s.r, side=True
        ),  # fmt: skip
        Launch("expand dx += drop(du A) (read + write dx)", 2 * b["x"] + b["u"] + b["A"], 2.0 * s.M * s.K * s.r),
        Launch("dA = duᵀ drop(x)", b["x"] + b["u"] + 2 * s.r * s.K * 4, 2.0 * s.M * s.K * s.r),
        Launch("cast dA, dB", b["acc"] + b["grads"]),
    ]


def _cuda_beta1(s: Shape) -> list[Launch]:
    # The launches and bytes come from the CUDA backend's own plan (treelora.kernels.cuda.lora.traffic_model), so a
    # change of that plan shows up here; the GEMMs are cuBLAS with beta = 1 reading the LoRA term back.
    dtypes = {2: torch.bfloat16, 4: torch.float32}
    plan = traffic_model(s.M, s.K, s.N, s.r, dtype=dtypes[s.elem], adapter_dtype=dtypes[s.adapter_elem])
    flops = {
        "lora_shrink": 2.0 * s.M * s.K * s.r,
        "lora_expand": 2.0 * s.M * s.N * s.r,
        "lora_bwd_dy": 4.0 * s.M * s.N * s.r,
        "lora_bwd_x": 4.0 * s.M * s.K * s.r,
    }
    base = base_linear(s)
    (M, N, K) = (s.M, s.N, s.K)
    launches = []
    for k in plan["kernels"]:
        launches.append(Launch(k.name, k.read + k.write, flops.get(k.name, 0.0)))
        if k.name == "lora_expand":
            launches.append(
                Launch("addmm y += x Wᵀ, beta = 1", base[0].bytes + k.epilogue_read, base[0].flops, gemm_out=(M, N))
            )
        elif k.name == "lora_bwd_x":
            launches.append(
                Launch("addmm dx += dy W, beta = 1", base[1].bytes + k.epilogue_read, base[1].flops, gemm_out=(M, K))
            )
    return launches


DESIGNS: dict[str, Callable[[Shape], list[Launch]]] = {
    "triton-cublas-expand": _triton_cublas_expand,
    "triton-fused": _triton_fused,
    "triton-fused-serial": lambda s: _triton_fused(s, side=False),
    "triton-cublas-side": _triton_cublas_side,
    "cuda-beta1": _cuda_beta1,
}


def launch_time(launch: Launch, device: Device) -> float:
    """Roofline time of one launch on the whole device, seconds (no launch gap)."""
    return max(launch.flops / device.bf16_flops, launch.bytes / device.hbm_bytes_per_s)


def last_wave_idle_time(gemm: Launch, device: Device) -> float:
    """Whole-device seconds that the SMs left idle by ``gemm``'s last, partial wave of output tiles add up to.

    Tiles of :data:`GEMM_TILE`; a tile takes ``sms`` times its share of the roofline time on one SM.
    """
    if gemm.gemm_out is None:
        return 0.0
    M, N = gemm.gemm_out
    tiles = math.ceil(M / GEMM_TILE[0]) * math.ceil(N / GEMM_TILE[1])
    waves = math.ceil(tiles / device.sms)
    tile_time = launch_time(gemm, device) * device.sms / tiles
    return (waves * device.sms - tiles) * tile_time / device.sms


def side_visible_time(side: Launch, beside: Launch, device: Device) -> float:
    """What a side-stream launch adds to the critical path: the part of it (at the device's full bandwidth, a
    pessimistic bound: a few SMs can draw more than their share) that does not fit in the idle SM-time of the
    last wave of the GEMM it runs beside."""
    return max(0.0, launch_time(side, device) - last_wave_idle_time(beside, device))


@dataclass(frozen=True)
class Estimate:
    """The model's numbers for one design at one shape on one device."""

    design: str
    shape: Shape
    device: Device
    launches: int
    bytes: float
    critical_bytes: float
    time_s: float
    base_launches: int
    base_bytes: float
    base_time_s: float

    @property
    def ratio(self) -> float:
        return self.time_s / self.base_time_s

    @property
    def extra_bytes(self) -> float:
        return self.bytes - self.base_bytes

    @property
    def critical_extra_bytes(self) -> float:
        """Extra bytes on the critical path: side-stream bytes hidden in a GEMM's last wave do not count."""
        return self.critical_bytes - self.base_bytes


def _time(launches: list[Launch], device: Device) -> tuple[float, float]:
    """(seconds, critical-path bytes) of a plan."""
    total = 0.0
    critical_bytes = 0.0
    previous_main = None
    for launch in launches:
        if launch.side and previous_main is not None:
            visible = side_visible_time(launch, previous_main, device)
            total += visible
            critical_bytes += launch.bytes * (visible / launch_time(launch, device) if visible else 0.0)
        else:
            total += launch_time(launch, device) + LAUNCH_GAP_S
            critical_bytes += launch.bytes
            previous_main = launch
    return total, critical_bytes


def estimate(design: str, shape: Shape, device: Device) -> Estimate:
    """The model's estimate of ``design`` (a key of :data:`DESIGNS`) at ``shape`` on ``device``."""
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {sorted(DESIGNS)}, got {design!r}")
    plan = DESIGNS[design](shape)
    base = base_linear(shape)
    time_s, critical = _time(plan, device)
    base_time, base_bytes = _time(base, device)
    return Estimate(
        design, shape, device, len(plan), sum(x.bytes for x in plan), critical, time_s, len(base), base_bytes,
        base_time,
    )  # fmt: skip


def byte_budget(target: float, shape: Shape, device: Device) -> float:
    """Extra critical-path bytes a design may move for modelled time <= ``target`` x the base linear's, before its
    extra launches: (target - 1) x base time x bandwidth."""
    base_time, _ = _time(base_linear(shape), device)
    return (target - 1.0) * base_time * device.hbm_bytes_per_s


def check_design(backend: str, shape: Shape | None = None, device: Device = REFERENCE_DEVICE) -> list[str]:
    """Failures of a backend's chosen design at the benchmark shape (empty when within its budget): critical-path
    extra bytes over :func:`byte_budget`. The modelled time ratio, which adds the launch gaps and the extra FLOPs, is
    reported beside it (:func:`estimate`), not checked: the gap is an assumption, the bytes are counted."""
    shape = shape or Shape(*BENCH_SHAPES[0])
    design, target = CHOSEN[backend], TARGETS[backend]
    e = estimate(design, shape, device)
    budget = byte_budget(target, shape, device)
    if e.critical_extra_bytes > budget:
        return [
            f"{backend}: design {design} moves {e.critical_extra_bytes / 1e6:.0f} MB on the critical path beyond the "
            f"base linear's at {shape.label} on {device.name}; the {target:.2f}x target leaves {budget / 1e6:.0f} MB"
        ]
    return []
