"""Every Triton kernel compiles for sm_80 and sm_90 (no GPU needed): catches what the interpreter forgives.

Each compile spec lists the architectures it runs on (``CompileSpec.capabilities``): the LoRA specs of a configuration
family compile for that family's architecture (sm80 tiles for sm_80, sm90 tiles for sm_90), the other kernels for
both. Registers, spills and tensor-core instructions of the same compiles are the kernel report's business
(``python -m treelora.kernels.report --check triton``, tests/test_kernel_report.py).
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from tests.conftest import INTERPRET


def _cases():
    if INTERPRET or importlib.util.find_spec("triton") is None:
        return []
    specs = importlib.import_module("treelora.kernels.triton.compile_specs").all_specs()
    return [pytest.param(spec, cap, id=f"{spec.name}-sm_{cap}") for spec in specs for cap in spec.capabilities]


@pytest.mark.requires_triton
# sm_80 compiles the generic variant, sm_90 the 16-byte-aligned one (what contiguous tensors get at run time), so
# both code paths of the kernels built for both are compiled without doubling the time this test takes.
@pytest.mark.parametrize("spec, capability", _cases())
def test_kernel_compiles(spec, capability):
    from treelora.kernels.triton.compile_specs import compile_for_target

    compiled = compile_for_target(spec, capability, aligned=capability >= 90)
    assert compiled.asm.get("cubin"), f"{spec.name}: no cubin produced for sm_{capability}"
    assert f"sm_{capability}" in compiled.asm["ptx"] or f".target sm_{capability}" in compiled.asm["ptx"]
