"""Every Triton kernel compiles for sm_80 and sm_90 (no GPU needed): catches what the interpreter forgives."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from tests.conftest import INTERPRET


def _specs():
    if INTERPRET or importlib.util.find_spec("triton") is None:
        return []
    return importlib.import_module("treelora.kernels.triton.compile_specs").all_specs()


@pytest.mark.requires_triton
# sm_80 compiles the generic variant, sm_90 the 16-byte-aligned one (what contiguous tensors get at run time), so
# both code paths of every kernel are compiled without doubling the time this test takes.
@pytest.mark.parametrize("capability, aligned", [(80, False), (90, True)], ids=["sm_80", "sm_90-aligned"])
@pytest.mark.parametrize("spec", _specs(), ids=lambda s: s.name)
def test_kernel_compiles(spec, capability, aligned):
    from treelora.kernels.triton.compile_specs import compile_for_target

    compiled = compile_for_target(spec, capability, aligned=aligned)
    assert compiled.asm.get("cubin"), f"{spec.name}: no cubin produced for sm_{capability}"
    assert f"sm_{capability}" in compiled.asm["ptx"] or f".target sm_{capability}" in compiled.asm["ptx"]
