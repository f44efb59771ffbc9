"""The package's import layers, read from the source with ``ast`` (nothing is imported):
the kernels (``kernels/``, shipped as ``tritondeconv.kernels``) never import the op layer
(the rest of ``tritondeconv``), and no module imports, directly or through others, a
module that imports it back.  Imports inside functions count: they run too, and a cycle
through one works only as long as the first import is finished before the function runs.
Importing ``a.b.c`` runs ``a.b``'s ``__init__`` too, which counts for a module outside
``a.b`` (one inside has it running already)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "tritondeconv.kernels"
# Package name -> the folder it is shipped from (pyproject.toml's package-dir).
TREES = {"tritondeconv": ROOT / "tritondeconv", KERNELS: ROOT / "kernels"}


def _in_kernels(name: str) -> bool:
    return name == KERNELS or name.startswith(f"{KERNELS}.")


def _modules() -> dict[str, Path]:
    """Every module of the package, by its dotted name (a package by its own name)."""
    modules = {}
    for package, folder in TREES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports_of(name: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules in ``known`` that the module ``name`` (a package's ``__init__`` when
    ``is_package``) with the code ``source`` imports, anywhere in it (inside functions
    too): relative imports resolved, ``from a import b`` taken as the module ``a.b``
    where that is one, and an import of something that is not a module as the nearest
    module above it (a name defined in a package's ``__init__`` as that package); with
    the packages above an imported module that ``name`` is not in.  The module itself
    is left out."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
        parts = target.split(".")
        for above in (".".join(parts[:n]) for n in range(1, len(parts))):
            if above in known and above != name and not name.startswith(f"{above}."):
                found.add(above)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports."""
    modules = _modules()
    return {name: imports_of(name, path.read_text(), path.name == "__init__.py", set(modules))
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as the path ``[a, b, ..., a]``, or None when it has none."""
    done, path = set(), []
    on_path: dict[str, int] = {}

    def visit(node: str) -> list[str] | None:
        on_path[node] = len(path)
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if successor in on_path:
                return [*path[on_path[successor]:], successor]
            if successor not in done and (cycle := visit(successor)) is not None:
                return cycle
        path.pop()
        del on_path[node]
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)) is not None:
            return cycle
    return None


# ---------------------------------------------------------------- the helpers


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"d": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_a_function_level_import_back_is_a_cycle():
    """The shape of the cycle this test was written against: ``convert`` imports ``nn``
    at the top, ``nn`` imports ``convert`` inside a method."""
    known = {"pkg", "pkg.nn", "pkg.convert", "pkg.fusing"}
    convert = "from . import fusing, nn\n"
    nn = "import torch\n\nclass M:\n    def f(self):\n        from .convert import _rule\n        return _rule\n"
    graph = {"pkg.convert": imports_of("pkg.convert", convert, False, known),
             "pkg.nn": imports_of("pkg.nn", nn, False, known)}
    assert graph == {"pkg.convert": {"pkg.fusing", "pkg.nn"}, "pkg.nn": {"pkg.convert"}}
    assert find_cycle(graph) == ["pkg.convert", "pkg.nn", "pkg.convert"]


def test_imports_are_resolved_to_modules():
    known = {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c"}
    source = "import os\nimport pkg.a\nfrom .. import a\nfrom . import c, helper\nfrom ..sub.b import name\n"
    assert imports_of("pkg.sub.b", source, False, known) == {"pkg.a", "pkg.sub.c", "pkg.sub"}
    assert imports_of("pkg.sub", "from . import b\nfrom .c import x\n", True, known) == {"pkg.sub.b", "pkg.sub.c"}
    # (from outside pkg.sub, importing one of its modules runs pkg.sub's __init__ too)
    assert imports_of("pkg.a", "from .sub.b import name\n", False, known) == {"pkg.sub", "pkg.sub.b"}


# ---------------------------------------------------------------- the package


def test_the_graph_covers_both_trees():
    graph = import_graph()
    assert {"tritondeconv", "tritondeconv.nn", KERNELS, f"{KERNELS}.phase_gemm"} <= set(graph)
    assert f"{KERNELS}.launcher" in graph[f"{KERNELS}.phase_gemm"]


def test_kernels_never_import_the_op_layer():
    upward = {(module, target) for module, targets in import_graph().items() if _in_kernels(module)
              for target in targets if not _in_kernels(target)}
    assert upward == set(), "kernel modules importing the op layer"


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())
