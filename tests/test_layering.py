"""No import circles between moepress's modules (issue 25).

The module import graph is read from the source with `ast` (nothing is imported): an edge A -> B for
every `import`/`from ... import` in A that names a moepress module B, plus B's enclosing packages
(importing `moepress.io.sizes` from outside `moepress.io` first runs `moepress/io/__init__.py`; the root
`moepress` package is left out, its `__init__` imports nothing up front). Two graphs:

- top level: the imports that run when the module is imported (`if TYPE_CHECKING:` blocks left out).
  A circle here is a layering error and fails `test_no_top_level_import_circle`, which prints it.
- all: also the imports inside functions and under `TYPE_CHECKING`. A function-level import that
  closes a circle only dodges it at import time, so a circle here fails too
  (`test_no_import_circle_through_lazy_imports`). There is no list of tolerated circles: the last one
  (io -> surgery -> io) was cut by moving `Size`/`size_of`/`size_by_component` below both, into
  `moepress.model_size`.

`python tests/test_layering.py` prints both graphs' circles.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moepress"

def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_package)
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the moepress modules (and their enclosing packages) it imports."""
    mods = _modules()

    def targets(name: str, importer: str) -> set[str]:
        # the module named and the packages it sits in, but not the importer's own packages (already
        # being imported when the importer runs) nor the root
        out = {name} if name in mods else set()
        name = name.rpartition(".")[0]
        while name and name != "moepress":
            if name in mods and not importer.startswith(name + "."):
                out.add(name)
            name = name.rpartition(".")[0]
        return out

    def _known(name: str) -> str:
        # the longest prefix of a dotted name that is a moepress module (`moepress.plan.X` -> `moepress.plan`)
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, (path, is_package) in mods.items():
        package = module if is_package else module.rpartition(".")[0]

        def visit(node: ast.AST, top: bool, module: str = module, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    if top_level_only:
                        continue
                    child_top = False
                else:
                    child_top = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                if isinstance(child, ast.Import) and (child_top or not top_level_only):
                    for alias in child.names:
                        graph[module] |= targets(_known(alias.name), module)
                elif isinstance(child, ast.ImportFrom) and (child_top or not top_level_only):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(parts + ([child.module] if child.module else []))
                    for alias in child.names:  # `from moepress.methods import cd_moe` imports a module
                        name = f"{base}.{alias.name}"
                        graph[module] |= targets(name if name in mods else _known(base), module)
                visit(child, child_top)

        visit(ast.parse(path.read_text()), True)
        graph[module].discard(module)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def cycle_in(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest import chain around a circle: its first module -> ... -> itself."""
    start, inside = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & inside):
            if w == start:
                chain = [v]
                while chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                return [start, *reversed(chain[:-1]), start] if v != start else [start, start]
            if w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def describe(graph: dict[str, set[str]], found: list[list[str]]) -> str:
    return "\n".join(f"  {' -> '.join(cycle_in(graph, c))}   (circle of: {', '.join(c)})" for c in found)


def test_no_top_level_import_circle():
    graph = import_graph(top_level_only=True)
    found = circles(graph)
    assert not found, (
        "import circle among moepress modules (move what both sides need to a lower module; see "
        "DESIGN.md's layering):\n" + describe(graph, found)
    )


def test_no_import_circle_through_lazy_imports():
    graph = import_graph(top_level_only=False)
    new = circles(graph)
    assert not new, (
        "import circle through a function-level (or TYPE_CHECKING) import: a lazy import that dodges a "
        "circle is still one; move what both sides need to a lower module:\n" + describe(graph, new)
    )


def test_registries_point_one_way():
    """The registries' base modules import none of their members (STYLE.md): each method or family
    file registers itself, and the package's `__init__` imports them."""
    graph = import_graph(top_level_only=False)
    methods = {m for m in graph if m.startswith("moepress.methods.")}
    assert not graph["moepress.methods.base"] & (methods - {"moepress.methods.base"})
    assert not graph["moepress.methods.search_registry"] & methods
    assert not {m for m in graph["moepress.models.base"] if m.startswith("moepress.models.")} - {
        "moepress.models.transformers_moe"
    }
    assert not {m for m in graph["moepress.plan"] if m.startswith("moepress.") and not m.startswith(
        ("moepress.models", "moepress.errors", "moepress.modules")
    )}
    assert "moepress.testing" not in set().union(*(graph[m] for m in graph if m.startswith("moepress.models")))


if __name__ == "__main__":
    for top in (True, False):
        graph = import_graph(top_level_only=top)
        print("top-level imports:" if top else "all imports (function-level and TYPE_CHECKING too):")
        print(describe(graph, circles(graph)) or "  no circle")
