"""Kernel report, no GPU needed: what every compiled kernel looks like on sm_80 and sm_90, and what LoRA designs move.

Per kernel and architecture: registers, spill / stack bytes, local-memory instructions, shared memory, and the kind
and count of tensor-core instructions.

* Triton kernels: every compile spec (``treelora/kernels/triton/compile_specs.py``) compiled with ``triton.compile``
  for its architectures; registers and stack from ``cuobjdump -res-usage`` of the cubin (``triton.compile`` leaves
  ``n_regs`` / ``n_spills`` unset until a driver loads the binary), shared memory from the compile metadata, SASS
  instruction counts (``HGMMA`` = wgmma, ``HMMA`` = mma.sync, ``STL`` / ``LDL`` = local memory) from ``cuobjdump
  -sass``, and the PTX's ``wgmma.mma_async`` / ``mma.sync`` count.
* CUDA C++ kernels: the same from the SASS and resource usage of the built ``treelora._C`` (one cubin per
  architecture in its fat binary).
* the LoRA designs at the benchmark shapes: HBM bytes, launches and modelled time against the base linear's own
  (``treelora/kernels/lora_model.py``).

The cuobjdump used is ``$TREELORA_CUOBJDUMP``, else the one triton's NVIDIA backend ships
(``triton/backends/nvidia/bin``), else the first on ``PATH``.

``--check triton|cuda|all`` exits 1 when, for that backend, a LoRA kernel for sm_90 has no tensor-core instruction
(IEEE fp32 products excepted: they run on FMA units by contract, as torch's own fp32 matmul does), any LoRA kernel
for sm_80 or sm_90 has spill / stack bytes or local-memory instructions, or the chosen design's critical-path extra
bytes exceed the budget its speed target leaves (:func:`treelora.kernels.lora_model.check_design`);
``--open-budget BACKEND`` prints that backend's budget gap as an open target instead of failing. CUDA LoRA kernels
are those of ``treelora._C`` named ``lora_*`` (the tensor-core rule skips their fp32-only instantiations); Triton LoRA
kernels those of ``treelora/kernels/triton/lora.py`` (the tensor-core rule applies to those with a 16-bit or TF32
matrix product).

Run: ``python -m treelora.kernels.report`` (all Triton specs compile in a few minutes on 2 cores; ``--jobs``
processes compile in parallel). By default the Triton LoRA kernels of the benchmark configuration (bf16, r = 16) are
listed one by one and the other kernels grouped by name (the largest numbers of their instantiations); ``--all`` lists
every kernel; the check always covers all of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from treelora.kernels import lora_model

BACKENDS = ("triton", "cuda")
# The architectures the report covers: Ampere (mma.sync) and Hopper (wgmma). The CUDA extension builds sm_90a.
ARCHS = (80, 90)
# Tensor-core SASS instructions: Hopper's warpgroup MMA and the warp-level MMA of Ampere and later.
TENSOR_CORE_SASS = ("HGMMA", "HMMA")


# --- parsing cuobjdump and PTX text --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceUsage:
    """One function's line of ``cuobjdump -res-usage``: registers per thread, stack frame (where spills go) and
    local memory per thread, static shared memory per block, bytes."""

    registers: int
    stack: int
    shared: int
    local: int


@dataclass
class SassCounts:
    """Instruction counts of one function's SASS (static counts: instructions in the code, not executed)."""

    instructions: int = 0
    opcodes: dict[str, int] = field(default_factory=dict)

    def count(self, opcode: str) -> int:
        return self.opcodes.get(opcode, 0)


_ARCH_LINE = re.compile(r"^\s*arch = (sm_\w+)")
_CODE_FOR = re.compile(r"^\s*code for (sm_[0-9a-z]+)")
_FUNCTION_USAGE = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
# "/*0a30*/   @!P0 HGMMA.64x256x16.F32.BF16 R24, ..." -> HGMMA (a predicate guard may precede the opcode)
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def parse_resource_usage(text: str) -> dict[tuple[str | None, str], ResourceUsage]:
    """``cuobjdump -res-usage`` output -> {(arch or None for a bare cubin, function): usage}.

    A fat binary lists one "Fatbin elf code" section per architecture, each with an ``arch = sm_XX`` line before its
    "Resource usage" block; a bare cubin has no arch line.
    """
    out: dict[tuple[str | None, str], ResourceUsage] = {}
    arch = None
    function = None
    for line in text.splitlines():
        if m := _ARCH_LINE.match(line):
            arch = m.group(1)
        elif m := _FUNCTION_USAGE.match(line):
            function = m.group(1)
        elif function is not None and (m := _USAGE.search(line)):
            out[(arch, function)] = ResourceUsage(*(int(v) for v in m.groups()))
            function = None
    return out


def parse_sass(text: str) -> dict[tuple[str, str], SassCounts]:
    """``cuobjdump -sass`` output -> {(arch, function): opcode counts}; the opcode is the mnemonic before the first
    dot (``HGMMA.64x256x16.F32.BF16`` counts as ``HGMMA``)."""
    out: dict[tuple[str, str], SassCounts] = {}
    arch = "sm_?"
    current = None
    for line in text.splitlines():
        if m := _CODE_FOR.match(line):
            arch = m.group(1)
        elif m := _SASS_FUNCTION.match(line):
            current = out.setdefault((arch, m.group(1)), SassCounts())
        elif current is not None and (m := _SASS_INSTRUCTION.match(line)):
            op = m.group(1)
            current.instructions += 1
            current.opcodes[op] = current.opcodes.get(op, 0) + 1
    return out


def count_ptx_mma(ptx: str) -> dict[str, int]:
    """Tensor-core instructions in PTX: ``wgmma.mma_async`` (Hopper warpgroup MMA) and ``mma.sync`` (warp MMA)."""
    return {
        "wgmma": len(re.findall(r"^\s*wgmma\.mma_async\b", ptx, flags=re.M)),
        "mma.sync": len(re.findall(r"^\s*mma\.sync\b", ptx, flags=re.M)),
    }


def _parse_nested_name(mangled: str) -> str:
    """The function name of an Itanium-mangled symbol, template arguments left mangled: ``_ZN3foo3barIfEEvv`` ->
    ``bar<IfE>``. Used when c++filt is not installed."""
    if not mangled.startswith("_Z"):
        return mangled
    i = 3 if mangled.startswith("_ZN") else 2
    name = mangled
    while i < len(mangled) and mangled[i].isdigit():
        j = i
        while mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        name = mangled[j : j + n]
        i = j + n
    if i < len(mangled) and mangled[i] == "I":
        depth, j = 0, i
        while j < len(mangled):
            depth += {"I": 1, "E": -1}.get(mangled[j], 0)
            j += 1
            if depth == 0:
                break
        name += f"<{mangled[i:j]}>"
    return name


def short_name(mangled: str, demangled: str | None = None) -> str:
    """A readable kernel name: the demangled name without namespaces and parameter list
    (``void ns::(anonymous namespace)::lora_panel_kernel<16, float>(ns::Args)`` -> ``lora_panel_kernel<16, float>``),
    or :func:`_parse_nested_name` of the mangled one."""
    if not demangled or demangled == mangled:
        return _parse_nested_name(mangled)
    text = demangled
    if text.startswith("void "):
        text = text[len("void ") :]
    depth = 0
    for i, ch in enumerate(text):  # cut the parameter list: the first "(" outside template brackets
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0 and not text[i:].startswith("(anonymous namespace)"):
            text = text[:i]
            break
    text = text.replace("(anonymous namespace)::", "")
    head, sep, rest = text.partition("<")
    return head.rsplit("::", 1)[-1] + sep + rest


def _demangle(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: short_name(n) for n in names}
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != len(names):
        return {n: short_name(n) for n in names}
    return {n: short_name(n, d) for n, d in zip(names, lines)}


# --- rows ---------------------------------------------------------------------------------------------------------


@dataclass
class KernelRow:
    """One kernel on one architecture."""

    backend: str
    name: str
    arch: str
    registers: int
    spill_bytes: int  # stack frame + local memory per thread (spills land there)
    local_ops: int  # STL + LDL instructions
    shared_bytes: int
    mma_kind: str  # "HGMMA", "HMMA", "HGMMA+HMMA" or "-"
    mma_count: int
    lora: bool  # a LoRA kernel that must use tensor cores on sm_90 (see the module docstring)
    needs_mma: bool
    ptx_mma: dict[str, int] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What ``--check`` holds against this row (LoRA kernels only)."""
        if not self.lora:
            return []
        why = []
        if self.needs_mma and self.arch.startswith("sm_90") and self.mma_count == 0:
            why.append("no tensor-core instruction")
        if self.spill_bytes or self.local_ops:
            why.append(f"{self.spill_bytes} bytes of stack/local memory, {self.local_ops} STL/LDL")
        return why


def _mma(counts: SassCounts) -> tuple[str, int]:
    kinds = [op for op in TENSOR_CORE_SASS if counts.count(op)]
    return ("+".join(kinds) or "-"), sum(counts.count(op) for op in TENSOR_CORE_SASS)


def row_from_binary(
    backend: str,
    name: str,
    arch: str,
    usage: ResourceUsage,
    sass: SassCounts,
    shared_bytes: int,
    lora: bool,
    needs_mma: bool,
    ptx_mma: dict[str, int] | None = None,
) -> KernelRow:
    kind, count = _mma(sass)
    return KernelRow(
        backend, name, arch, usage.registers, usage.stack + usage.local, sass.count("STL") + sass.count("LDL"),
        shared_bytes, kind, count, lora, needs_mma, ptx_mma or {},
    )  # fmt: skip


def find_cuobjdump() -> str | None:
    """``$TREELORA_CUOBJDUMP``, else the cuobjdump in triton's NVIDIA backend, else the first on ``PATH``."""
    override = os.environ.get("TREELORA_CUOBJDUMP")
    if override:
        return override
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        shipped = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if shipped.exists():
            return str(shipped)
    return shutil.which("cuobjdump")


def _cuobjdump(tool: str, *args: str) -> str:
    result = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def _triton_spec_row(index: int, capability: int, tool: str) -> dict:
    """Compile spec ``index`` of :func:`_all_specs` for ``sm_<capability>``; a row as a dict (runs in a worker
    process)."""
    from treelora.kernels.triton import compile_specs, lora

    spec = _all_specs()[index]
    compiled = compile_specs.compile_for_target(spec, capability, aligned=True)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = parse_resource_usage(_cuobjdump(tool, "-res-usage", str(cubin)))
        sass = parse_sass(_cuobjdump(tool, "-sass", str(cubin)))
    (_, function), resources = next(iter(usage.items()))
    (arch, _), counts = next(iter(sass.items()))
    is_lora = spec.kernel.fn.__module__ == lora.__name__
    needs_mma = is_lora and spec.constexprs.get("DOT_PRECISION", "ieee") != "ieee"
    row = row_from_binary(
        "triton", spec.name, arch, resources, counts, compiled.metadata.shared, is_lora, needs_mma,
        count_ptx_mma(compiled.asm["ptx"]),
    )  # fmt: skip
    return asdict(row)


_SPECS: list = []


def _all_specs() -> list:
    """Every Triton compile spec, the LoRA kernels of every configuration (the same list in every process)."""
    if not _SPECS:
        from treelora.kernels.triton import compile_specs

        _SPECS.extend(compile_specs.all_specs(exhaustive=True))
    return _SPECS


def triton_rows(tool: str, jobs: int = 1, archs: Sequence[int] = ARCHS) -> list[KernelRow]:
    """Every Triton compile spec compiled for each of its architectures in ``archs``."""
    work = [(i, cap) for i, spec in enumerate(_all_specs()) for cap in spec.capabilities if cap in archs]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_triton_spec_row, *zip(*work), [tool] * len(work)))
    else:
        rows = [_triton_spec_row(i, cap, tool) for i, cap in work]
    return [KernelRow(**r) for r in rows]


def extension_path() -> Path | None:
    """The built ``treelora._C`` shared library, or None when the extension was not built."""
    spec = importlib.util.find_spec("treelora._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def cuda_rows(tool: str, library: Path, archs: Sequence[int] = ARCHS) -> list[KernelRow]:
    """One row per kernel and architecture of the fat binary ``library`` (the CUDA extension)."""
    usage = parse_resource_usage(_cuobjdump(tool, "-res-usage", str(library)))
    sass = parse_sass(_cuobjdump(tool, "-sass", str(library)))
    names = _demangle({function for _, function in sass})
    rows = []
    for (arch, function), counts in sorted(sass.items()):
        if int(re.sub(r"\D", "", arch) or 0) // 10 * 10 not in archs:
            continue
        resources = usage.get((arch, function)) or ResourceUsage(0, 0, 0, 0)
        name = names.get(function, function)
        is_lora = name.startswith("lora_")
        rows.append(
            row_from_binary("cuda", name, arch, resources, counts, resources.shared, is_lora, _cuda_needs_mma(name))
        )
    return rows


def _cuda_needs_mma(name: str) -> bool:
    """Whether a CUDA kernel must use tensor cores: the ``lora_*`` kernels, except an instantiation for fp32 data
    only (template arguments naming ``float`` and no 16-bit type), which may run IEEE fp32 on FMA units as torch's
    own fp32 matmul does (the same exception as for Triton's IEEE fp32 products)."""
    if not name.startswith("lora_"):
        return False
    _, _, args = name.partition("<")
    fp32_only = "float" in args and "__half" not in args and "bfloat16" not in args
    return not fp32_only


def group_instantiations(rows: Sequence[KernelRow]) -> list[KernelRow]:
    """Non-LoRA rows folded into one per (backend, architecture, kernel name without template arguments), with the
    largest registers, spills, local-memory instructions and shared memory of the instantiations; LoRA rows as they
    are."""
    out: list[KernelRow] = []
    groups: dict[tuple[str, str, str], list[KernelRow]] = {}
    for r in rows:
        if r.lora:
            out.append(r)
        else:
            groups.setdefault((r.backend, r.arch, r.name.partition("<")[0]), []).append(r)
    for (backend, arch, base), members in groups.items():
        if len(members) == 1:
            out.append(members[0])
            continue
        kinds = sorted({m.mma_kind for m in members if m.mma_count})
        out.append(
            KernelRow(
                backend, f"{base} (max of {len(members)} instantiations)", arch,
                max(m.registers for m in members), max(m.spill_bytes for m in members),
                max(m.local_ops for m in members), max(m.shared_bytes for m in members),
                "+".join(kinds) or "-", max(m.mma_count for m in members), False, False,
            )
        )  # fmt: skip
    return out


# --- printing -----------------------------------------------------------------------------------------------------


def format_rows(rows: Sequence[KernelRow]) -> str:
    """A fixed-width table of kernel rows."""
    width = max([len(r.name) for r in rows] + [6])
    head = f"{'arch':<7} {'kernel':<{width}} {'regs':>4} {'spill B':>7} {'STL/LDL':>7} {'smem KB':>7}  MMA (SASS)"
    lines = [head, "-" * len(head)]
    for r in rows:
        mma = f"{r.mma_kind} x{r.mma_count}" if r.mma_count else "-"
        flag = "  <- " + "; ".join(r.problems()) if r.problems() else ""
        lines.append(
            f"{r.arch:<7} {r.name:<{width}} {r.registers:>4} {r.spill_bytes:>7} {r.local_ops:>7} "
            f"{r.shared_bytes / 1024:>7.1f}  {mma:<14}{flag}"
        )
    return "\n".join(lines)


def summarize(rows: Sequence[KernelRow]) -> str:
    """One line per (backend, architecture): kernels, LoRA kernels, and how many break a check rule."""
    lines = []
    for backend in BACKENDS:
        for arch in sorted({r.arch for r in rows if r.backend == backend}):
            mine = [r for r in rows if r.backend == backend and r.arch == arch]
            lora = [r for r in mine if r.lora]
            spilled = sum(1 for r in mine if r.spill_bytes or r.local_ops)
            no_mma = sum(1 for r in lora if r.needs_mma and not r.mma_count)
            lines.append(
                f"{backend} {arch}: {len(mine)} kernels ({len(lora)} LoRA), {spilled} with stack/local memory, "
                f"{no_mma} LoRA kernels that should use tensor cores without a tensor-core instruction, max "
                f"{max((r.registers for r in mine), default=0)} registers"
            )
    return "\n".join(lines)


def format_model(shapes: Sequence[tuple[int, int, int, int]] = lora_model.BENCH_SHAPES) -> str:
    """The LoRA design table: bytes, launches and modelled time per design, shape and device."""
    lines = [
        "Time model: roofline per launch, max(FLOPs / peak bf16 dense, bytes / HBM bandwidth) + "
        f"{lora_model.LAUNCH_GAP_S * 1e6:.1f} us launch gap; side-stream launches count only beyond the idle SMs of "
        "the last wave of the GEMM they run beside.",
    ]
    for device in lora_model.DEVICES:
        lines.append(
            f"  {device.name}: {device.bf16_flops / 1e12:.1f} TFLOP/s bf16 dense, "
            f"{device.hbm_bytes_per_s / 1e12:.2f} TB/s, {device.sms} SMs ({device.source})"
        )
    head = (
        f"{'device':<10} {'shape':<28} {'design':<21} {'launches':>8} {'HBM MB':>7} {'extra MB':>8} "
        f"{'critical':>8} {'budget':>6} {'time us':>7} {'ratio':>6}"
    )
    lines += ["", head, "-" * len(head)]
    for device in lora_model.DEVICES:
        for dims in shapes:
            shape = lora_model.Shape(*dims)
            base = lora_model.estimate(lora_model.CHOSEN["triton"], shape, device)
            lines.append(
                f"{device.name:<10} {shape.label:<28} {'base linear':<21} {base.base_launches:>8} "
                f"{base.base_bytes / 1e6:>7.0f} {'':>8} {'':>8} {'':>6} {base.base_time_s * 1e6:>7.1f} {1.0:>6.3f}"
            )
            for design in lora_model.DESIGNS:
                e = lora_model.estimate(design, shape, device)
                backend = design.split("-")[0]
                budget = lora_model.byte_budget(lora_model.TARGETS[backend], shape, device)
                chosen = " *" if lora_model.CHOSEN[backend] == design else ""
                lines.append(
                    f"{'':<10} {'':<28} {design + chosen:<21} {e.launches:>8} {e.bytes / 1e6:>7.0f} "
                    f"{e.extra_bytes / 1e6:>8.0f} {e.critical_extra_bytes / 1e6:>8.0f} {budget / 1e6:>6.0f} "
                    f"{e.time_s * 1e6:>7.1f} {e.ratio:>6.3f}"
                )
    lines.append(
        "* chosen design. extra = HBM bytes beyond the base linear's; critical = extra bytes on the critical path; "
        f"budget = (target - 1) x base time x bandwidth, targets {lora_model.TARGETS}; checked on "
        f"{lora_model.REFERENCE_DEVICE.name} at {lora_model.Shape(*lora_model.BENCH_SHAPES[0]).label}."
    )
    return "\n".join(lines)


def _bench_rows(rows: Sequence[KernelRow]) -> list[KernelRow]:
    """The rows the report lists by default: of the Triton LoRA kernels those of the benchmark configuration (bf16,
    r = 16, the many-rows tiles) and the dropout-mask kernel; every other kernel."""
    from treelora.kernels.triton import compile_specs

    names = {s.name for s in compile_specs.bench_lora_specs()} | {"dropout-keep"}
    return [r for r in rows if r.backend != "triton" or not r.lora or r.name in names]


# --- entry point --------------------------------------------------------------------------------------------------


def check(rows: Sequence[KernelRow], backends: Sequence[str], open_budgets: Sequence[str] = ()) -> list[str]:
    """Every failure of the ``--check`` rules for ``backends`` (empty when they all hold); the byte budget of the
    backends in ``open_budgets`` is not held (their instruction, spill and local-memory rules still are)."""
    failures = []
    for backend in backends:
        mine = [r for r in rows if r.backend == backend and r.lora]
        if not mine:
            failures.append(f"{backend}: no LoRA kernels found to check")
        for r in mine:
            failures += [f"{backend} {r.arch} {r.name}: {why}" for why in r.problems()]
        if backend not in open_budgets:
            failures += lora_model.check_design(backend)
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; with ``--check``, return 1 when a rule fails for the checked backends."""
    parser = argparse.ArgumentParser(prog="python -m treelora.kernels.report", description=__doc__.split("\n")[0])
    parser.add_argument("--check", choices=("triton", "cuda", "all"), help="fail when a rule breaks for this backend")
    parser.add_argument("--backend", choices=("triton", "cuda", "all"), default=None,
                        help="kernels to report (default: the checked backend, else all)")  # fmt: skip
    parser.add_argument("--all", action="store_true", help="list every Triton spec, not the benchmark configuration's")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes compiling Triton specs")
    parser.add_argument("--open-budget", choices=BACKENDS, action="append", default=[],
                        help="report this byte budget as an open target, not a failure")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every row and the model's estimates to this file")
    args = parser.parse_args(argv)
    chosen = args.backend or args.check or "all"
    backends = BACKENDS if chosen == "all" else (chosen,)
    checked = () if args.check is None else (BACKENDS if args.check == "all" else (args.check,))

    tool = find_cuobjdump()
    if tool is None:
        print("cuobjdump not found (install triton, or set TREELORA_CUOBJDUMP)", file=sys.stderr)
        return 2
    rows: list[KernelRow] = []
    notes = []
    if "triton" in backends:
        if importlib.util.find_spec("triton") is None:
            notes.append("triton: not installed, no Triton kernels to report")
        else:
            rows += triton_rows(tool, max(1, args.jobs))
    if "cuda" in backends:
        library = extension_path()
        if library is None:
            notes.append("cuda: treelora._C was not built (no nvcc at install time), no CUDA kernels to report")
        else:
            rows += cuda_rows(tool, library)

    shown = rows if args.all else group_instantiations(_bench_rows(rows))
    for backend in backends:
        mine = [r for r in shown if r.backend == backend]
        if mine:
            what = "every kernel" if args.all else "LoRA kernels of the benchmark configuration and the others grouped"
            print(f"\n{backend} kernels, {what}:")
            print(format_rows(mine))
    print("\nAll kernels:\n" + summarize(rows))
    print("\nLoRA forward + backward, per design:\n" + format_model())
    for note in notes:
        print(note)
    if args.json:
        model = [
            asdict(lora_model.estimate(d, lora_model.Shape(*s), dev))
            for dev in lora_model.DEVICES
            for s in lora_model.BENCH_SHAPES
            for d in lora_model.DESIGNS
        ]
        args.json.write_text(json.dumps({"kernels": [asdict(r) for r in rows], "model": model}, indent=1, default=str))
    if not checked:
        return 0
    failures = check(rows, checked, args.open_budget)
    for backend in args.open_budget:
        for gap in lora_model.check_design(backend):
            print(f"\nopen target (not failing the check): {gap}")
    print(f"\ncheck {args.check}: " + ("passed" if not failures else f"{len(failures)} failures"))
    for failure in failures:
        print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
