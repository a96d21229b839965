"""Each layer of treelora imports only the layers below it (SPEC section 2, README "Layering and adding an op family").

Every module under treelora/ is parsed (nothing is imported) and every import in it is checked: module-level and
function-local ones alike, ``from treelora import ops`` read as an import of ``treelora.ops``, and
``importlib.import_module("treelora....")`` with a literal name counted as an import too. A module may import its own
layer and the layers below; an import of a higher layer fails the test with the file and line. A module that no
layer in the table claims fails too: a new top-level module or package has to be placed in the table first.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "treelora"

# The layers, lowest first. A name covers the module of that name and everything under it. Within a row the modules
# may import each other: the kernel layer is the package version, the atomic-write helper (stdlib only), the compiled
# extension and its loader, the backend registry and the kernels (torch, triton and CUDA backends, their shared
# constants and environment checks). ``info`` sits with the CLI: it reports on every op. The package's own
# ``treelora/__init__.py`` is the front door above every layer: it re-exports ``treelora.ops`` and the backend switch
# and imports every other subpackage lazily, on first attribute access.
LAYERS: list[tuple[str, ...]] = [
    ("treelora._version", "treelora._io", "treelora._C", "treelora._cpp_lib", "treelora.backends", "treelora.kernels"),
    ("treelora.ops",),
    ("treelora.nn",),
    ("treelora.peft",),
    ("treelora.data",),
    ("treelora.models",),
    ("treelora.cl",),
    ("treelora.integrations",),
    ("treelora.cli", "treelora.__main__", "treelora.info", "treelora.demo"),
]
FRONT_DOOR = "treelora"


def layer_of(module: str) -> int | None:
    """The row of ``module`` in :data:`LAYERS` (its longest matching name), or None when no row claims it."""
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (index, len(name))
    return None if best is None else best[0]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, package: Path) -> bool:
    where = package.parent / Path(*name.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def imported_modules(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, treelora module) for every import in the file, at any depth of the syntax tree."""
    name = module_name(path, package)
    parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = parent.split(".")[: len(parent.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((node.lineno, target if _is_module(target, package) else base))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, target) for line, target in found if target == FRONT_DOOR or target.startswith(FRONT_DOOR + ".")]


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in _modules() if module_name(p) != FRONT_DOOR and layer_of(module_name(p)) is None]
    assert not unplaced, f"modules that no row of LAYERS claims (add them to the table): {unplaced}"


def test_each_layer_imports_only_the_layers_below_it():
    violations = []
    for path in _modules():
        source = module_name(path)
        if source == FRONT_DOOR:
            continue
        mine = layer_of(source)
        for line, target in imported_modules(path):
            theirs = len(LAYERS) if target == FRONT_DOOR else layer_of(target)
            if theirs is None or mine is None or theirs > mine:
                shown = "the package front door (treelora/__init__.py)" if target == FRONT_DOOR else target
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports {shown}")
    assert not violations, "imports of a higher layer:\n" + "\n".join(violations)


def test_the_scan_sees_function_local_and_dynamic_imports(tmp_path):
    """The scanner itself: a nested import, a relative one and an import_module call are all found."""
    fake = tmp_path / "treelora"
    (fake / "kernels").mkdir(parents=True)
    (fake / "ops").mkdir()
    for folder in (fake, fake / "kernels", fake / "ops"):
        (folder / "__init__.py").write_text("")
    (fake / "ops" / "lora.py").write_text("")
    source = fake / "kernels" / "bad.py"
    source.write_text(
        "import importlib\n"
        "def f():\n"
        "    from treelora.ops import lora\n"
        "    from ..ops import lora as again\n"
        "    return importlib.import_module('treelora.ops')\n"
    )
    found = imported_modules(source, package=fake)
    assert found == [(3, "treelora.ops.lora"), (4, "treelora.ops.lora"), (5, "treelora.ops")]
    assert all(layer_of(target) > layer_of("treelora.kernels.bad") for _, target in found)
