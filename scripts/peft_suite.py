"""Run a selection of PEFT's own LoRA tests with treelora registered (the PEFT-suite lane of ``make test``).

Usage::

    python scripts/peft_suite.py [--cache DIR] [--fetch-only] [pytest arguments ...]

The tests come from the source distribution of the PEFT version that is installed (``pip download
peft==<version> --no-binary :all: --no-deps``), unpacked once into ``<cache>/peft-<version>/tests`` (default
cache: ``build/peft-suite`` in this checkout, git-ignored; ``TREELORA_PEFT_SUITE_CACHE`` overrides it). Nothing is
downloaded when that folder is complete. They run offline under the plugin ``tests/peft_suite/treelora_peft_suite.py``,
which registers treelora, applies the selection (documented there, with every deselection and its reason) and fails
the run if treelora never ran. Extra arguments go to pytest (``-x``, ``-k ...``). Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / "build" / "peft-suite"
FILES = ["test_custom_models.py", "test_initialization.py", "test_lora_variants.py", "test_low_level_api.py"]
PACKAGE = "tests"  # the name PEFT's tests have in PEFT (one of them checks a message that contains it)
PLUGIN = ROOT / "tests" / "peft_suite"  # treelora_peft_suite.py, imported as a top-level module
COMPLETE = ".complete"
# Imported at module level by the selected PEFT test files (scipy by test_initialization.py), beyond peft's own needs.
NEEDED = {"scipy": "scipy", "pytest": "pytest"}


def installed_peft() -> str:
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("peft_suite: peft is not installed (pip install 'treelora[peft]')") from None


def check_needed() -> None:
    missing = [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"peft_suite: PEFT's test files need {', '.join(missing)}: pip install {' '.join(missing)}")


def fetch(cache: Path, version: str) -> Path:
    """``<cache>/peft-<version>``, holding PEFT's ``tests/`` folder as a package."""
    home = cache / f"peft-{version}"
    tests = home / PACKAGE
    if (tests / COMPLETE).is_file():
        return home
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        command = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-binary", ":all:", "--no-deps"]
        print(f"peft_suite: fetching the PEFT {version} source distribution", flush=True)
        subprocess.run([*command, "--dest", scratch, "--quiet"], check=True)
        archives = [p for p in Path(scratch).iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        if len(archives) != 1:
            raise SystemExit(f"peft_suite: expected one source archive from pip download, got {archives}")
        unpacked = Path(scratch) / "unpacked"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                top, _, inner = member.name.partition("/")  # peft-<version>/tests/...
                if not (member.isfile() and inner.startswith("tests/")):
                    continue
                relative = Path(inner[len("tests/") :])
                if relative.is_absolute() or ".." in relative.parts:
                    raise SystemExit(f"peft_suite: unexpected path in the archive: {member.name}")
                target = unpacked / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        missing = [name for name in FILES if not (unpacked / name).is_file()]
        if missing:
            raise SystemExit(f"peft_suite: the PEFT {version} source distribution has no tests/{missing}")
        (unpacked / "__init__.py").touch()  # the test modules import each other relatively
        (unpacked / COMPLETE).write_text(f"peft {version} tests from its source distribution\n")
        if tests.exists():
            shutil.rmtree(tests)
        home.mkdir(parents=True, exist_ok=True)
        unpacked.rename(tests)
    return home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TREELORA_PEFT_SUITE_CACHE", DEFAULT_CACHE)))
    parser.add_argument("--fetch-only", action="store_true", help="download and unpack the tests, run nothing")
    args, pytest_args = parser.parse_known_args(argv)
    version = installed_peft()
    check_needed()
    home = fetch(args.cache.resolve(), version)
    if args.fetch_only:
        print(home / PACKAGE)
        return 0
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(ROOT / "tests" / "peft_suite" / "pytest.ini"),
        "--rootdir",
        str(home),
        "-p",
        "treelora_peft_suite",
        *[str(home / PACKAGE / name) for name in FILES],
        *pytest_args,
    ]
    # PLUGIN for the plugin, ROOT for this checkout's treelora. PEFT's `tests` package wins over this checkout's own:
    # pytest puts its folder first on sys.path when it imports the first test module, and nothing imports ours.
    path = [str(PLUGIN), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(path))
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
