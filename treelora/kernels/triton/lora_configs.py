"""Kernel configurations of the Triton fused LoRA linear (``lora.py`` beside this file), per GPU family and shape.

A :class:`LoRAConfig` fixes, for one call, which base-GEMM strategy runs and the tiles of every kernel:

* ``forward_base`` / ``grad_base``: ``"fused"`` runs the base GEMM (x Wᵀ for y, dy W for dx) in Triton with the LoRA
  product folded in as an extra K-slice (one write of the output); ``"cublas"`` runs the base GEMM with
  ``torch.addmm`` / ``torch.mm`` and then a Triton kernel adds the LoRA product into that output in place (one more
  read and write of it). ``tma`` picks the persistent TMA kernel for the fused GEMM on sm_90; ``side_stream`` runs
  the LoRA kernels that no following launch waits on beside the base GEMMs. The byte, launch and time model of the
  alternatives is ``treelora/kernels/lora_model.py``: on sm_90 it chose fused + TMA + side stream (``triton-fused``:
  207 MB beyond the base linear's traffic and 7 launches per forward + backward at M = 8192, K = N = 4096, r = 16 bf16,
  where cuBLAS + in-place expands moved 477 MB in 12); ``forward_base = grad_base = "cublas"`` with ``side_stream`` is
  its runner-up (``triton-cublas-side``, 476 MB), kept selectable for measurement.
* tiles (:class:`GemmTiles`, :class:`StreamTiles`) for the GEMM, the in-place expand, the shrink u = s·drop(x)Aᵀ, the
  one-pass du/dB kernel and the dA kernel.

The table :data:`CONFIGS` is keyed by family (``"sm90"``: Hopper and newer, ``"sm80"``: Ampere/Ada and older,
``"interpreter"``: the CPU interpreter) and by :class:`ShapeBucket`. The GPU entries are **untuned** defaults
(``tuned=False``): no GPU was available when they were written. They follow the block shapes that the Triton matmul
tutorial lists first for each architecture and the reasoning given next to each entry, and every kernel they launch
compiles for its architecture without spills or local memory (``python -m treelora.kernels.report --check triton``);
a GPU run of bench/bench_lora.py replaces them with measured choices and sets ``tuned=True``. Under the interpreter
one configuration serves every shape: autotuning needs a GPU driver, and small tiles (32, r-blocks of 16) make the
test shapes cross tile edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

BASE_STRATEGIES = ("fused", "cublas")


@dataclass(frozen=True)
class GemmTiles:
    """Tiles of the (M, N) output kernels: the fused GEMM and the in-place expand."""

    block_m: int = field(default=128, metadata={"help": "output rows per program"})
    block_n: int = field(default=128, metadata={"help": "output columns per program"})
    block_k: int = field(default=64, metadata={"help": "reduction depth per main-loop step (unused by the expand)"})
    group_m: int = field(default=8, metadata={"help": "row-tiles per group in the L2-friendly program order"})
    num_warps: int = 4
    num_stages: int = 3
    block_r: int = field(
        default=16,
        metadata={
            "help": "rank block of the LoRA slice; r up to it is one block, loaded before the main loop (and the "
            "persistent kernel's tile loop flattens); larger r loops in the epilogue. 16: a (128, 32)-block of fp32 u "
            "held through the main loop spills at 128x256 tiles (144 bytes of stack on sm_90)"
        },
    )


@dataclass(frozen=True)
class StreamTiles:
    """Tiles of the kernels that stream one large operand once: the shrink (x), du/dB (dy) and dA (x).

    ``block_m`` is rows of the streamed operand per step and ``block_k`` its columns per step (the shrink and dA read
    x (M, K); du/dB reads dy (M, N), ``block_k`` then spans N).
    """

    block_m: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class LoRAConfig:
    """Everything the launcher needs to run one call; see the module docstring."""

    forward_base: str = field(default="fused", metadata={"help": "'fused' Triton GEMM or 'cublas' + in-place expand"})
    grad_base: str = field(default="fused", metadata={"help": "the same choice for dx = dy W + du A"})
    gemm: GemmTiles = GemmTiles()
    gemm_dropout: GemmTiles = field(
        default=GemmTiles(),
        metadata={
            "help": "fused dx GEMM under dropout: a second fp32 accumulator holds du A until the mask is applied"
        },
    )
    expand: GemmTiles = GemmTiles(block_m=64, block_n=128, block_k=16, num_stages=2)
    shrink: StreamTiles = StreamTiles()
    dudb: StreamTiles = StreamTiles()
    grad_a: StreamTiles = StreamTiles(block_m=128, block_k=64)
    tma: bool = field(
        default=False,
        metadata={
            "help": "fused GEMM as the persistent kernel that loads through TMA descriptors (sm_90+); inputs TMA "
            "cannot address take the pointer kernel"
        },
    )
    max_programs: int | None = field(
        default=None, metadata={"help": "programs of the persistent GEMM; None: one per SM"}
    )
    side_stream: bool = field(
        default=False,
        metadata={
            "help": "run the LoRA kernels that the next launch does not wait on (fused: dA beside the dx GEMM; "
            "cublas: the shrink and du/dB beside the base GEMMs) on a second CUDA stream"
        },
    )
    max_block_r: int = field(
        default=64,
        metadata={
            "help": "widest r-block of the shrink, du/dB and dA kernels (a power of two >= 16); wider ranks take "
            "several r-blocks (programs)"
        },
    )
    split_k: int | None = field(
        default=None, metadata={"help": "shrink split over K; None: enough splits to fill the GPU (see lora.py)"}
    )
    split_m: int | None = field(default=None, metadata={"help": "dA split over M; None: chosen like split_k"})
    tuned: bool = field(default=False, metadata={"help": "True once measured on a GPU of the family"})

    def __post_init__(self) -> None:
        for name in ("forward_base", "grad_base"):
            if getattr(self, name) not in BASE_STRATEGIES:
                raise ValueError(f"LoRAConfig.{name} must be one of {BASE_STRATEGIES}, got {getattr(self, name)!r}")
        if self.max_block_r < 16 or self.max_block_r & (self.max_block_r - 1):
            raise ValueError(f"LoRAConfig.max_block_r must be a power of two >= 16, got {self.max_block_r}")
        for name in ("split_k", "split_m", "max_programs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"LoRAConfig.{name} must be None or >= 1, got {value}")
        for name in ("gemm", "gemm_dropout", "expand", "shrink", "dudb", "grad_a"):
            tiles = getattr(self, name)
            blocks = [tiles.block_m, tiles.block_k]
            if isinstance(tiles, GemmTiles):
                blocks += [tiles.block_n, tiles.block_r]
            if any(b < 16 or b & (b - 1) for b in blocks):
                raise ValueError(f"LoRAConfig.{name}: tile sizes must be powers of two >= 16 (tl.dot), got {tiles}")


@dataclass(frozen=True)
class ShapeBucket:
    """``rows``: "few" (M <= 1024: too few 128-row tiles to fill an H100's 132 SMs, so smaller tiles and splits pay)
    or "many"; ``rank``: "narrow" (r <= 32, one r-block) or "wide"."""

    rows: str
    rank: str


FEW_ROWS = 1024
NARROW_RANK = 32


def bucket(M: int, r: int) -> ShapeBucket:
    """The bucket of a call with M rows and total rank r (frozen + trainable)."""
    return ShapeBucket("few" if M <= FEW_ROWS else "many", "narrow" if r <= NARROW_RANK else "wide")


# Hopper: the fused GEMM, as the persistent TMA kernel, with dA beside the dx GEMM on the side stream; the byte,
# launch and time model that chose this over cuBLAS + side-stream LoRA kernels is treelora/kernels/lora_model.py
# (at M = 8192, K = N = 4096, r = 16 bf16 it moves 206 MB besides the base GEMMs' own traffic instead of 472 MB, and
# 7 launches per forward+backward instead of 12). The tiles, 128x256x64 with 8 warps over 3 stages, are the Triton
# tutorial's first Hopper matmul config (144 KB of pipelined operands plus 64 KB to stage the TMA store of a tile:
# 213 KB of the 227 KB an sm_90 block may use); under dropout the masked LoRA product needs a second (128, N-tile)
# fp32 accumulator, which at N-tile 256 spills (1048 bytes of stack), hence 128x128 there (no spill).
_SM90_MANY = LoRAConfig(
    forward_base="fused",
    grad_base="fused",
    gemm=GemmTiles(128, 256, 64, 8, num_warps=8, num_stages=3),
    gemm_dropout=GemmTiles(128, 128, 64, 8, num_warps=8, num_stages=3),
    expand=GemmTiles(64, 128, 16, 8, num_warps=4, num_stages=2),
    shrink=StreamTiles(64, 128, num_warps=4, num_stages=3),
    dudb=StreamTiles(64, 128, num_warps=4, num_stages=3),
    grad_a=StreamTiles(128, 64, num_warps=4, num_stages=3),
    tma=True,
    side_stream=True,
)
# Ampere/Ada: the tutorial's 128x128x32 tile with 4 stages is close to cuBLAS on A100 in the Triton matmul tutorial's
# fp16 benchmark, so fusing saves the expand's pass (48 KB of shared memory, within the 99 KB of sm86/sm89). 8 warps:
# with 4, the accumulator (128 registers a thread) and the mma.sync operand fragments spill (384 bytes of stack).
_SM80_MANY = LoRAConfig(
    forward_base="fused",
    grad_base="fused",
    gemm=GemmTiles(128, 128, 32, 8, num_warps=8, num_stages=4),
    gemm_dropout=GemmTiles(128, 64, 32, 8, num_warps=8, num_stages=4),
    expand=GemmTiles(64, 128, 16, 8, num_warps=8, num_stages=2),  # 4 warps: 8 bytes of spill under dropout
    shrink=StreamTiles(64, 64, num_warps=4, num_stages=3),
    dudb=StreamTiles(64, 64, num_warps=4, num_stages=3),
    grad_a=StreamTiles(64, 64, num_warps=4, num_stages=3),
    side_stream=True,
)


def _few_rows(config: LoRAConfig) -> LoRAConfig:
    """Few rows: 64-row GEMM tiles double the programs, 32-row streaming tiles too (splits do the rest)."""
    g, d = config.gemm, config.gemm_dropout
    return replace(
        config,
        gemm=replace(g, block_m=64, num_warps=4),
        gemm_dropout=replace(d, block_m=64, num_warps=4),
        shrink=replace(config.shrink, block_m=32),
        dudb=replace(config.dudb, block_m=32),
    )


def _wide_rank(config: LoRAConfig) -> LoRAConfig:
    """r > 32: r-blocks of 64 make the du/dB accumulators 64 wide, so halve the streamed column block; the dA
    accumulator becomes (64, block_k), spread over 8 warps (with 4, sm_80's 64x64 dA tile spills 8 bytes)."""
    return replace(
        config,
        dudb=replace(config.dudb, block_k=64),
        shrink=replace(config.shrink, block_k=64),
        grad_a=replace(config.grad_a, num_warps=8),
    )


def _family_table(many_narrow: LoRAConfig) -> dict[ShapeBucket, LoRAConfig]:
    return {
        ShapeBucket("many", "narrow"): many_narrow,
        ShapeBucket("many", "wide"): _wide_rank(many_narrow),
        ShapeBucket("few", "narrow"): _few_rows(many_narrow),
        ShapeBucket("few", "wide"): _wide_rank(_few_rows(many_narrow)),
    }


# One configuration for every shape under the interpreter: 32-wide tiles and 16-wide r-blocks make the small test
# shapes (M = 113, K = 40, r = 64) cross row, column, reduction and r-block edges.
INTERPRETER_CONFIG = LoRAConfig(
    forward_base="fused",
    grad_base="fused",
    gemm=GemmTiles(32, 32, 32, 4, num_warps=4, num_stages=1),
    gemm_dropout=GemmTiles(32, 32, 32, 4, num_warps=4, num_stages=1),
    expand=GemmTiles(32, 32, 16, 4, num_warps=4, num_stages=1),
    shrink=StreamTiles(32, 32, num_warps=4, num_stages=1),
    dudb=StreamTiles(32, 32, num_warps=4, num_stages=1),
    grad_a=StreamTiles(32, 32, num_warps=4, num_stages=1),
    max_block_r=16,
    tma=True,
)

CONFIGS: dict[str, dict[ShapeBucket, LoRAConfig]] = {
    "sm90": _family_table(_SM90_MANY),
    "sm80": _family_table(_SM80_MANY),
}


# Shared memory per block (bytes) that each family's tiles must fit: sm86/sm89 allow 99 KB, H100 227 KB (checked on
# the compiled kernels by tests/test_lora_triton.py).
SHARED_MEMORY_LIMIT = {"sm80": 101376, "sm90": 232448}


def family(capability: tuple[int, int] | None) -> str:
    """The table family of a CUDA compute capability, or ``"interpreter"`` for None (CPU interpreter)."""
    if capability is None:
        return "interpreter"
    return "sm90" if capability[0] >= 9 else "sm80"


def _four_byte_elements(config: LoRAConfig) -> LoRAConfig:
    """fp32 activations: the base GEMM goes to cuBLAS, which then follows torch's own fp32 setting (TF32 only when
    ``torch.backends.cuda.matmul.allow_tf32``) exactly as ``F.linear`` does; an IEEE fp32 ``tl.dot`` runs on FMA units,
    not tensor cores. The fused GEMM (still used when W's dtype differs from x's) gets 64x64x32 tiles: 128x256 fp32
    FMA tiles take 25 s to compile and hold 128 accumulators per thread. The streaming kernels get 32-row tiles and
    r-blocks of at most 32: an IEEE fp32 product is unrolled into FMAs, and the 16-bit tiles (64x128 with r-blocks
    of 64) spill up to 7.7 KB of stack per thread in du/dB (``python -m treelora.kernels.report --all``)."""
    small = GemmTiles(64, 64, 32, 8, num_warps=4, num_stages=3)
    return replace(
        config,
        forward_base="cublas",
        grad_base="cublas",
        gemm=small,
        gemm_dropout=small,
        # the in-place expand after cuBLAS: 64x128 IEEE fp32 tiles spill 4.7 KB of stack; 64x64 over 8 warps: none
        expand=GemmTiles(64, 64, 16, 8, num_warps=8, num_stages=2),
        shrink=StreamTiles(32, 64, num_warps=4, num_stages=3),
        dudb=StreamTiles(32, 32, num_warps=4, num_stages=3),
        grad_a=StreamTiles(32, 64, num_warps=4, num_stages=3),
        max_block_r=32,
    )


def select_config(family_name: str, M: int, r: int, element_size: int = 2) -> LoRAConfig:
    """The configuration of a call on a GPU family (or the interpreter).

    Args:
        family_name: "sm90", "sm80" or "interpreter" (see :func:`family`).
        M: rows of x (all leading dimensions flattened); r: total rank (frozen + trainable).
        element_size: bytes per activation element (4, fp32: see :func:`_four_byte_elements`).
    """
    if family_name == "interpreter":
        return INTERPRETER_CONFIG
    if family_name not in CONFIGS:
        raise ValueError(f"family must be 'interpreter' or one of {sorted(CONFIGS)}, got {family_name!r}")
    config = CONFIGS[family_name][bucket(M, r)]
    return _four_byte_elements(config) if element_size >= 4 else config
