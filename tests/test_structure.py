"""
The package's import structure, read with C{ast} (nothing is imported):
no import cycle between its modules and no module importing another's
C{_private} name.  Imports under C{if TYPE_CHECKING:} do not run, so they
are left out; imports inside functions run, so they count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "opensandbox_ingress"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _runtime_imports_of(other)
            continue
        yield from _runtime_imports_of(child)


def _runtime_imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _runtime_imports(node)


def _bound(module: str) -> set[str]:
    """The names C{module} binds at its top level."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _edges(module: str) -> Iterator[tuple[str, str | None]]:
    """(imported module, name taken from it or None) for C{module}'s runtime imports."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, None
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] != PACKAGE:
            continue
        for alias in node.names:
            submodule = f"{target}.{alias.name}"
            if submodule in MODULES:
                yield submodule, None
            elif MODULES.get(target, ROOT).name == "__init__.py" and alias.name not in _bound(target):
                # A submodule written at build time (buildinfo's _build_info),
                # not in the checkout: a module, not a name.
                continue
            else:
                yield target, alias.name


def _graph() -> dict[str, set[str]]:
    return {
        module: {target for target, _name in _edges(module) if target in MODULES and target != module}
        for module in MODULES
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_the_package() -> None:
    """The walk finds the modules and an import known to exist (a broken walker passes nothing)."""
    assert f"{PACKAGE}.web.forwarding" in MODULES
    assert f"{PACKAGE}.web.forwarding" in _graph()[f"{PACKAGE}.web.proxy"]


def test_cycle_finder_finds_a_cycle() -> None:
    """The cycle finder reports a two-module and a three-module loop, and not a chain."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_no_import_cycle_in_web_and_service() -> None:
    """The web layer and the service that wires it import each other in one direction only."""
    graph = _graph()
    ours = {m for m in graph if m.startswith(f"{PACKAGE}.web") or m == f"{PACKAGE}.service"}
    cycles = [c for c in _cycles(graph) if set(c) & ours]
    assert cycles == []


def test_no_import_cycle_in_the_package() -> None:
    """No two modules of the package import each other, directly or around a loop."""
    assert _cycles(_graph()) == []


def test_no_private_name_imported_from_another_module() -> None:
    """No module imports a C{_private} name of another module of the package."""
    private = [
        f"{module} imports {name} from {target}"
        for module in sorted(MODULES)
        for target, name in _edges(module)
        if name is not None and name.startswith("_") and not name.startswith("__")
        and target != module
    ]
    assert private == []
