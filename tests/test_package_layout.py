"""The package's layout (docs/design.md#layout): module paths from before the sub-packages still import, as the same
module objects, and nothing in the repository uses them any more."""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import llamagen_core2

REPO = Path(__file__).resolve().parents[1]
PKG = "llamagen_core2"
MOVED = llamagen_core2._MOVED


def module_name(path: Path) -> str:
    """The dotted name a file of llamagen_core2/ or kernels/ is imported as (kernels/ is llamagen_core2.kernels)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, PKG)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path):
    """(line, absolute name, is_member) of every import in a file, module- and function-level, relative imports
    resolved: `import a.b` and `from a.b import c` give a.b; the latter also gives a.b.c with is_member=True (a
    module when c is one, else a name of a.b)."""
    tree = ast.parse(path.read_text(), str(path))
    inside = path.is_relative_to(REPO / PKG) or path.is_relative_to(REPO / "kernels")
    here = module_name(path) if inside else ""
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, False
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module, False
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}", True


def sources():
    for folder in (PKG, "kernels", "benchmarks", "tests"):
        yield from sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module(old):
    new = importlib.import_module(f"{PKG}.{MOVED[old]}")
    alias = importlib.import_module(f"{PKG}.{old}")
    assert alias is new and sys.modules[f"{PKG}.{old}"] is new
    assert new.__spec__.name == f"{PKG}.{MOVED[old]}" and new.__name__ == f"{PKG}.{MOVED[old]}"


def test_old_paths_keep_the_package_exports_and_monkeypatching(monkeypatch):
    import llamagen_core2.generate  # noqa: F401 -- the old path of llamagen_core2.decode.generate
    from llamagen_core2.decode import engine
    from llamagen_core2.generate import generate

    assert llamagen_core2.generate is generate and callable(llamagen_core2.generate)  # still the function
    monkeypatch.setattr(importlib.import_module(f"{PKG}.engine"), "BUCKET", 7)
    assert engine.BUCKET == 7  # one module: patching the old name patches what the new one runs


def test_nothing_imports_an_old_module_path():
    old_paths = {f"{PKG}.{old}" for old in MOVED}
    exported = {f"{PKG}.{name}" for name in llamagen_core2._EXPORTS}  # `from llamagen_core2 import generate`
    hits = [f"{path.relative_to(REPO)}:{line} {name}" for path in sources() if path.name != "test_package_layout.py"
            for line, name, member in imported_names(path) if name in old_paths and not (member and name in exported)]
    assert hits == []


def test_every_package_is_in_the_wheel():
    text = (REPO / "pyproject.toml").read_text()
    packages = {module_name(init) for init in (REPO / PKG).rglob("__init__.py")} | {f"{PKG}.kernels"}
    assert [p for p in sorted(packages) if f'"{p}"' not in text] == []
