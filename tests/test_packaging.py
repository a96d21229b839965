"""Packaging: the Apache-2.0 licence text is at the repository root, declared in the SPDX form, and shipped in the
wheel and the source distribution (which also holds the extension's sources)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
# sha256 of the Apache License 2.0 text as the Apache Software Foundation publishes it (LICENSE-2.0.txt).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def _setuptools_version() -> tuple[int, ...]:
    return tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2] if p.isdigit())


def _copy_checkout(src: Path) -> Path:
    """The files a build reads, copied without build outputs (compiled extension, build record)."""
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "CMakeLists.txt"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "csrc", src / "csrc")
    shutil.copytree(
        REPO / "treelora", src / "treelora", ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json")
    )
    return src


def test_license_file_is_the_apache_2_text():
    assert hashlib.sha256((REPO / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_metadata_declares_the_license_in_spdx_form():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])


@pytest.mark.slow
@pytest.mark.skipif(_setuptools_version() < (77,), reason="the SPDX license form needs setuptools >= 77 installed")
def test_wheel_ships_the_license(tmp_path):
    """`pip wheel` of a copy of the checkout (without the CUDA build) holds LICENSE and the SPDX expression."""
    src = _copy_checkout(tmp_path / "src")
    env = dict(os.environ, TREELORA_BUILD_CUDA="0")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", "dist"]
    subprocess.run([*command, str(src)], check=True, env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("treelora-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (license_path,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert hashlib.sha256(z.read(license_path)).hexdigest() == APACHE_2_SHA256
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = z.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers and "License-File: LICENSE" in headers
    assert "treelora/data/files/WORDNET_LICENSE.txt" in names and "treelora/data/files/DIGITS_NOTICE.txt" in names


@pytest.mark.slow
@pytest.mark.skipif(_setuptools_version() < (77,), reason="the SPDX license form needs setuptools >= 77 installed")
def test_sdist_holds_the_license_and_the_extension_sources(tmp_path):
    """The source distribution can build treelora._C (CMake project, csrc/) and carries the licence."""
    src = _copy_checkout(tmp_path / "src")
    env = dict(os.environ, TREELORA_BUILD_CUDA="0")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        check=True,
        env=env,
        cwd=src,
        capture_output=True,
    )
    (sdist,) = (tmp_path / "dist").glob("treelora-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {str(p.relative_to(REPO)) for p in (REPO / "csrc").rglob("*") if p.is_file()}
    assert {"LICENSE", "CMakeLists.txt", "setup.py", "pyproject.toml"} <= names and sources <= names
