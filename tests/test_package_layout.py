"""The package's layout (docs/design.md#layout): module paths from before the sub-packages still import, as the same
module objects, and nothing in the repository uses them any more; every module sits on an import floor and imports
nothing above it, and no two modules import each other (module- and function-level imports alike)."""
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


# ---------------------------------------------------------------------- floors
# The one table of import floors (docs/design.md#floors shows it): a module may import modules on its own floor or
# below, never above; the longest prefix names a module's floor. A package's __init__ sits on the lowest floor of
# its modules (importing any of them runs it first), so an __init__ imports nothing above that.
FLOORS = {
    "errors": 0, "optional": 0, "device": 0, "config": 0,
    "io": 1,
    "guidance": 2, "decode.op_checks": 2,
    "kernels": 3,
    "guidance.sampling": 4,
    "decode": 5, "encoders": 5,
    "core2.weak_model": 6,
    "pipeline": 7,
    "core2": 8, "world": 8, "diffusion": 8,
    "cli": 9,
}


def floor_of(module: str) -> int:
    rel = module[len(PKG) + 1:]
    if (REPO / PKG / rel.replace(".", "/") / "__init__.py").is_file():  # a package: its lowest module's floor
        return min(floor_of(module_name(p)) for p in (REPO / PKG / rel.replace(".", "/")).rglob("*.py")
                   if p.name != "__init__.py")
    best = max((prefix for prefix in FLOORS if rel == prefix or rel.startswith(prefix + ".")), key=len)
    return FLOORS[best]


def package_modules() -> dict:
    """module name -> file, for llamagen_core2/ and kernels/ (kernels are llamagen_core2.kernels.*)."""
    files = sorted((REPO / PKG).rglob("*.py")) + sorted((REPO / "kernels").glob("*.py"))
    return {module_name(p): p for p in files}


def import_graph() -> dict:
    """module -> the package modules it imports (module- and function-level), plus the packages whose __init__
    importing it runs (a.b.c runs a and a.b first)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for _, target, _ in imported_names(path):
            while target and target not in modules:  # `from a.b import name`: the module is a.b
                target = target.rpartition(".")[0]
            if not target.startswith(PKG):
                continue
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)
        own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = edges - {name} - own_parents
    return graph


def test_every_module_has_a_floor():
    assert [m for m in package_modules() if m != PKG and floor_of(m) is None] == []


def test_no_module_imports_from_a_higher_floor():
    graph = import_graph()
    up = [f"{m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})" for m, targets in sorted(graph.items())
          for t in sorted(targets) if m != PKG and t != PKG and floor_of(t) > floor_of(m)]
    assert up == []


def test_no_import_cycles():
    graph = import_graph()
    cycles, done, path = [], set(), []

    def visit(module):
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        path.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert cycles == []
