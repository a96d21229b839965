"""Build script for treelora.

`pip install .` always succeeds. The optional CUDA C++ extension `treelora._C` (CMake + pybind11, not linked
against torch, CUDA runtime linked statically) is built when nvcc is available. Environment variables read here:

  TREELORA_BUILD_CUDA   unset (default): build `_C` when nvcc is found, warn and install pure Python otherwise
                        or when the build fails; "1": build it and fail the install if that fails; "0": skip it.
  TREELORA_CUDA_ARCHS   CMake CUDA architectures, default "80;90a" (A100 and H100/H200 with wgmma).
  TREELORA_BUILD_JOBS   parallel compile jobs, default: the number of CPUs.
  TREELORA_BUILD_TYPE   CMake build type, default "Release".
  CUDA_HOME             where to look for bin/nvcc when nvcc is not on PATH (also /usr/local/cuda).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_INFO = "_build_info.json"


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if "release" in line:
            return line.split("release")[-1].split(",")[0].strip()
    return "unknown"


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Builds `treelora._C` with CMake, or records why it was not built (read by `python -m treelora info`)."""

    def run(self) -> None:
        for ext in self.extensions:
            self.build_extension(ext)

    def _write_build_info(self, ext: Extension, info: dict) -> None:
        ext_path = Path(self.get_ext_fullpath(ext.name))
        ext_path.parent.mkdir(parents=True, exist_ok=True)
        if not info["built"] and ext_path.exists():
            ext_path.unlink()  # an editable install must not keep importing a stale extension from an earlier build
        (ext_path.parent / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")

    def build_extension(self, ext: Extension) -> None:
        mode = os.environ.get("TREELORA_BUILD_CUDA", "").strip()
        archs = os.environ.get("TREELORA_CUDA_ARCHS", "80;90a").strip()
        if mode not in ("", "0", "1"):
            raise SystemExit(f"TREELORA_BUILD_CUDA must be unset, '0' or '1', got {mode!r}")
        info = {"built": False, "archs": [], "nvcc": None, "reason": ""}
        if mode == "0":
            info["reason"] = "skipped: TREELORA_BUILD_CUDA=0"
            self._write_build_info(ext, info)
            return
        nvcc = _find_nvcc()
        if nvcc is None:
            msg = "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): installing treelora without its CUDA extension"
            if mode == "1":
                raise SystemExit("TREELORA_BUILD_CUDA=1 but " + msg)
            warnings.warn(msg, stacklevel=1)
            info["reason"] = "nvcc not found at build time"
            self._write_build_info(ext, info)
            return
        info["nvcc"] = _nvcc_version(nvcc)
        try:
            self._cmake_build(ext, nvcc, archs)
        except (OSError, subprocess.CalledProcessError) as err:
            if mode == "1":
                raise
            warnings.warn(f"building treelora._C failed ({err}); installing without the CUDA extension", stacklevel=1)
            info["reason"] = f"build failed: {err}"
            self._write_build_info(ext, info)
            return
        info.update(built=True, archs=archs.split(";"), reason="")
        self._write_build_info(ext, info)

    def _cmake_build(self, ext: CMakeExtension, nvcc: str, archs: str) -> None:
        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or "cmake"
        config = [
            cmake,
            "-S",
            str(ext.source_dir),
            "-B",
            str(build_dir),
            f"-DCMAKE_BUILD_TYPE={os.environ.get('TREELORA_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DTREELORA_CUDA_ARCHS={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTREELORA_OUTPUT_DIR={ext_path.parent}",
            f"-DTREELORA_OUTPUT_NAME={ext_path.name}",
        ]
        jobs = os.environ.get("TREELORA_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(config, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        if not ext_path.is_file():
            raise OSError(f"CMake finished but {ext_path} was not produced")


setup(
    ext_modules=[CMakeExtension("treelora._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
