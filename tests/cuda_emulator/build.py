"""Builds the emulated extension: csrc/ compiled with g++ against the stand-in CUDA headers in ``include/``.

Steps: copy csrc/ into a fresh build folder while rewriting (1) every launch ``kernel<<<grid, block, smem,
stream>>>(args)`` into ``::emu::launch("kernel", "file:line", kernel, grid, block, smem, stream, args)``, (2) every
``__shared__`` declaration into itself followed by ``::emu::poison_shared(&name, sizeof(name));`` and (3) the module
name ``_C`` into ``_treelora_cuda_emulated`` (whose init also binds the emulator's controls); then compile in
parallel and link one shared library. Each .cu is its own translation unit (-O2: the lane's run time depends on it);
the pybind11 glue (csrc/*.cpp and bind_emulator.cpp) is one unity translation unit at -O1, which parses pybind11
once: 7 s of compile time instead of 27 s (g++ 12, one core). ``#line`` directives keep compiler messages and
sanitizer reports pointing at csrc/.

The result is cached under ``build/cuda-emulator/<key>/``, the key a hash of csrc/, the emulator's sources, the flags,
the compiler and the Python ABI, so a rerun with nothing changed skips the build. Environment (read here):

  CXX                              the C++20 compiler, default g++.
  TREELORA_CUDA_EMULATOR_SANITIZE  "1" (default): kernels run under UBSan's alignment and array-bounds checks; a
                                   misaligned vector access (a fault on a GPU) or an out-of-range index into a
                                   fixed-size (shared-memory) array stops the launch with a RuntimeError that quotes
                                   UBSan's report (csrc file and line); "0": without them.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "cuda-emulator"
MODULE_NAME = "_treelora_cuda_emulated"
# Builds kept in the cache: the current one and the one before (another checkout state being compared).
KEEP_BUILDS = 2

_COMMON_FLAGS = ["-std=c++20", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
_KERNEL_OPT, _GLUE_OPT = "-O2", "-O1"
# nvcc defines __CUDA_ARCH__ in device compilation; csrc/ uses it to pick __umulhi, which the stand-in provides.
# TREELORA_CUDA_EMULATOR makes csrc/lora_mma.cuh call the emulator's ldmatrix / mma.sync / st.shared instead of PTX.
_KERNEL_DEFINES = ["-D__CUDA_ARCH__=800", "-DTREELORA_CUDA_EMULATOR"]
# Recoverable, so that runtime.cc can turn a report into an error of the launch instead of an abort whose message
# pytest's output capture would swallow. The link keeps only the first flag, which pulls in UBSan's runtime.
_SANITIZE_FLAGS = ["-fsanitize=alignment,bounds", "-fsanitize-recover=alignment,bounds", "-DTREELORA_EMULATOR_UBSAN"]
_DEFINES = ['-DTREELORA_CUDA_ARCHS="emulated"', '-DTREELORA_CUDA_VERSION="emulated"']

_MODULE_INIT = re.compile(r"PYBIND11_MODULE\(\s*_C\s*,\s*(\w+)\s*\)\s*\{")
_SHARED = re.compile(
    r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?[A-Za-z_][\w:]*(?:<[^;<>]*>)?\s+(?P<name>[A-Za-z_]\w*)\s*"
    r"(?:\[[^;\]]*\]\s*)*;"
)


class EmulatorBuildError(RuntimeError):
    """The emulated module could not be built (the message holds the compiler's output)."""


def _matching_back(text: str, close: int, opening: str, closing: str) -> int:
    """Index of the bracket that opens the one closed at ``close``."""
    depth = 0
    for i in range(close, -1, -1):
        if text[i] == closing:
            depth += 1
        elif text[i] == opening:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opening}{closing}")


def _matching_forward(text: str, open_: int, opening: str, closing: str) -> int:
    depth = 0
    for i in range(open_, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opening}{closing}")


def _split_top_level(text: str) -> list[str]:
    """Split at the commas that are outside parentheses, brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def convert_launches(text: str, filename: str) -> str:
    """Rewrite every ``kernel<<<config>>>(args)`` of ``text`` into an ``::emu::launch`` call on the same lines."""
    out, pos = [], 0
    while (start := text.find("<<<", pos)) >= 0:
        try:
            name_end = start
            while text[name_end - 1].isspace():
                name_end -= 1
            name_start = name_end
            if text[name_start - 1] == ">":
                name_start = _matching_back(text, name_start - 1, "<", ">")
            while name_start > 0 and (text[name_start - 1].isalnum() or text[name_start - 1] in "_:"):
                name_start -= 1
            name = " ".join(text[name_start:name_end].split())
            config_end = text.index(">>>", start)
            config = _split_top_level(text[start + 3 : config_end])
            paren = config_end + 3
            while text[paren].isspace():
                paren += 1
            if text[paren] != "(" or not name or len(config) < 2 or len(config) > 4:
                raise ValueError("expected `kernel<<<grid, block[, smem[, stream]]>>>(args)`")
            close = _matching_forward(text, paren, "(", ")")
        except (ValueError, IndexError) as err:
            line = text.count("\n", 0, start) + 1
            raise EmulatorBuildError(f"{filename}:{line}: cannot convert this kernel launch ({err})") from None
        config += ["0", "nullptr"][len(config) - 2 :]
        line = text.count("\n", 0, start) + 1
        args = text[paren + 1 : close]
        # the original text between the name and the arguments may span lines: keep its newlines
        newlines = "\n" * text.count("\n", name_end, paren)
        out.append(text[pos:name_start])
        out.append(f'::emu::launch("{name}", "{filename}:{line}", {name}, {", ".join(config)}{newlines}')
        out.append(f", {args})" if args.strip() else ")")
        pos = close + 1
    out.append(text[pos:])
    return "".join(out)


def poison_shared_declarations(text: str, filename: str) -> str:
    """Follow every ``__shared__`` declaration with the call that poisons it once per block."""
    found = len(_SHARED.findall(text))
    if found != text.count("__shared__"):
        raise EmulatorBuildError(
            f"{filename}: {text.count('__shared__')} __shared__ declarations but only {found} in the form "
            "`__shared__ [__align__(n)] type name[dims]...;` that the emulator can instrument"
        )
    return _SHARED.sub(lambda m: f"{m.group(0)} ::emu::poison_shared(&{m['name']}, sizeof({m['name']}));", text)


def rename_module(text: str) -> str:
    """``PYBIND11_MODULE(_C, m) {`` -> the emulated module's name, binding the emulator's controls first."""
    rewritten, count = _MODULE_INIT.subn(
        lambda m: (
            "namespace treelora_emulator { void bind_emulator(pybind11::module_&); } "
            f"PYBIND11_MODULE({MODULE_NAME}, {m.group(1)}) {{ treelora_emulator::bind_emulator({m.group(1)});"
        ),
        text,
    )
    if count != 1:
        raise EmulatorBuildError("csrc/module.cpp: expected exactly one `PYBIND11_MODULE(_C, m) {`")
    return rewritten


def _emulator_sources() -> list[Path]:
    return sorted(
        [
            *HERE.glob("include/*.h"),
            *HERE.glob("*.h"),
            *HERE.glob("*.cc"),
            *HERE.glob("*.cu"),
            *HERE.glob("*.cpp"),
            Path(__file__).resolve(),
        ]
    )


def _csrc_files() -> list[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def sanitize_enabled() -> bool:
    """Whether kernels are built with UBSan's alignment and bounds checks (TREELORA_CUDA_EMULATOR_SANITIZE)."""
    value = os.environ.get("TREELORA_CUDA_EMULATOR_SANITIZE", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"TREELORA_CUDA_EMULATOR_SANITIZE must be 0 or 1, got {value!r}")
    return value == "1"


def _python_includes() -> list[str]:
    try:
        import pybind11
    except ImportError:
        raise EmulatorBuildError("the CUDA emulator needs pybind11's headers: pip install pybind11") from None
    return [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise EmulatorBuildError(f"the CUDA emulator needs a C++20 compiler; `{cxx} --version` failed: {err}") from None


def cache_key(flags: list[str], compiler_version: str) -> str:
    """Hash of everything the built module depends on."""
    digest = hashlib.sha256()
    for path in _csrc_files() + _emulator_sources():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\0".join(flags).encode())
    digest.update(compiler_version.encode())
    digest.update(f"{sys.version}{sysconfig.get_config_var('EXT_SUFFIX')}".encode())
    return digest.hexdigest()[:16]


def _write_sources(folder: Path) -> tuple[list[Path], Path]:
    """Converted copies of csrc/ and selftest.cu in ``folder``: the kernel translation units and the glue's one."""
    kernels, glue = [], []
    for path in _csrc_files() + [HERE / "selftest.cu"]:
        text = path.read_text()
        shown = path.relative_to(ROOT).as_posix()
        if path.suffix in (".cu", ".cuh", ".h"):
            text = poison_shared_declarations(convert_launches(text, path.name), shown)
        if path.name == "module.cpp" and path.parent == CSRC:
            text = rename_module(text)
        # a .cu becomes a C++ file; headers keep their names so that the #includes find the converted copies
        target = folder / (path.name + ".cc" if path.suffix == ".cu" else path.name)
        target.write_text(f'#line 1 "{path}"\n{text}')
        if path.suffix == ".cu":
            kernels.append(target)
        elif path.suffix == ".cpp":
            glue.append(target)
    unity = folder / "glue.cc"
    unity.write_text("".join(f'#include "{p}"\n' for p in [*glue, HERE / "bind_emulator.cpp"]))
    return [*kernels, HERE / "runtime.cc"], unity


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise EmulatorBuildError(f"{' '.join(command)}\n{result.stdout}{result.stderr}")


def _prune(keep: Path) -> None:
    """Drop all but the newest KEEP_BUILDS builds, and unfinished ones older than an hour (an interrupted build)."""
    for unfinished in (p for p in CACHE.iterdir() if "-" in p.name and time.time() - p.stat().st_mtime > 3600):
        shutil.rmtree(unfinished, ignore_errors=True)
    builds = sorted(
        (p for p in CACHE.iterdir() if p.is_dir() and p != keep and "-" not in p.name),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in builds[KEEP_BUILDS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def build() -> Path:
    """Path of the emulated module's shared library, building it first unless the cache holds it."""
    cxx = _compiler()
    sanitize = _SANITIZE_FLAGS if sanitize_enabled() else []
    includes = _python_includes()
    kernel_flags = [_KERNEL_OPT, *_KERNEL_DEFINES, *sanitize]
    key = cache_key([cxx, *_COMMON_FLAGS, *_DEFINES, *kernel_flags, _GLUE_OPT], _compiler_version(cxx))
    final = CACHE / key
    library = final / f"{MODULE_NAME}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if library.is_file():
        return library
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=CACHE))  # the "-" keeps unfinished builds out of _prune
    try:
        kernels, glue = _write_sources(work)
        include = [f"-I{work}", f"-I{HERE / 'include'}", f"-I{HERE}", *includes]
        objects, commands = [], []
        # the glue first: it is the slowest unit, and the kernels fill the other workers meanwhile
        for source in [glue, *kernels]:
            flags = [_GLUE_OPT] if source == glue else kernel_flags
            objects.append(str(work / (source.name + ".o")))
            commands.append([cxx, *_COMMON_FLAGS, *_DEFINES, *flags, *include, "-c", str(source), "-o", objects[-1]])
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(_run, commands))
        _run([cxx, "-shared", *sanitize[:1], *objects, "-o", str(work / library.name)])
        for path in work.iterdir():
            if path.name != library.name:
                path.unlink()
        try:
            work.rename(final)
        except OSError:
            if not library.is_file():  # not another process finishing the same build first
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    _prune(final)
    return library


@functools.lru_cache(maxsize=1)
def load() -> ModuleType:
    """The emulated module, built if needed. Loaded from its file under its own name and kept out of sys.modules,
    so that nothing imports it by accident (``treelora._C`` stays whatever it was)."""
    library = build()
    spec = importlib.util.spec_from_file_location(MODULE_NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
