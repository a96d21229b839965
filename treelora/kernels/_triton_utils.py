"""Helpers shared by the Triton kernel modules.

* ``INTERPRET``: whether kernels are defined for the CPU interpreter (read once, as triton does when ``@triton.jit``
  runs). The interpreter computes bf16/fp16 arithmetic on raw bits, so kernels upcast after every load and downcast
  before every store (pass ``UPCAST=INTERPRET`` or always upcast).
* ``CompileSpec`` + :func:`compile_for_target`: ahead-of-time compilation of a kernel for a GPU architecture with no
  GPU present. Each Triton module lists its kernels' typical specialisations in ``COMPILE_SPECS``; the CPU test lane
  compiles every one for sm_80 and sm_90 (this catches what the interpreter forgives: layout, shape and type errors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class CompileSpec:
    """One specialisation of a ``@triton.jit`` kernel: argument types (``"*bf16"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``, ...) by name, and the values of its constexpr arguments."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


def compile_for_target(spec: CompileSpec, capability: int, warp_size: int = 32, aligned: bool = False):
    """Compile ``spec`` to a cubin for ``sm_<capability>`` without a GPU; returns triton's compiled kernel.

    ``aligned`` adds the divisibility-by-16 hints triton attaches at run time to pointers of contiguous tensors and
    to integer sizes / strides that are multiples of 16, so the vectorised, pipelined variant that aligned shapes get
    is compiled (without it, the generic variant is)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("kernels defined under TRITON_INTERPRET=1 cannot be compiled; unset it")
    signature = dict(spec.signature)
    for name in spec.constexprs:
        signature.setdefault(name, "constexpr")
    attrs = {}
    if aligned:
        names = spec.kernel.arg_names
        hinted = [n for n, t in signature.items() if t.startswith("*") or t in ("i32", "i64")]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    src = ASTSource(fn=spec.kernel, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", capability, warp_size), options=options)
