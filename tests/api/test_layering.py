"""The import rule of docs/architecture.md: facade -> ``_engine.api`` only; the engine and the transports import
nothing of the facade; no import cycle among the engine's modules at import time."""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import llm_datadist

PACKAGE = pathlib.Path(llm_datadist.__file__).parent
PRIVATE = ("llm_datadist._engine", "llm_datadist._transport")
FACADE_ONLY = ("llm_datadist.v1", "llm_datadist.v2", "llm_datadist.cli", "llm_datadist.configs")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path, top_level_only: bool) -> Iterator[str]:
    """Modules imported by a file (``from a import b`` yields a and a.b); with ``top_level_only`` only those
    run at import time (not in functions, not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]

    def walk(nodes: List[ast.stmt]) -> Iterator[ast.stmt]:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and top_level_only:
                continue
            if isinstance(node, ast.If) and top_level_only and "TYPE_CHECKING" in ast.dump(node.test):
                yield from walk(node.orelse)
                continue
            yield node
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from walk([c for c in children if isinstance(c, ast.stmt)] +
                                    [s for h in children if isinstance(h, ast.ExceptHandler) for s in h.body])

    for node in walk(tree.body):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _files() -> List[Tuple[str, pathlib.Path]]:
    return [(_module_name(path), path) for path in sorted(PACKAGE.rglob("*.py"))]


def _under(name: str, prefixes: Tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_facade_imports_only_the_engine_api():
    wrong = []
    for name, path in _files():
        if _under(name, PRIVATE):
            continue
        for imported in _imports(path, top_level_only=False):
            if _under(imported, PRIVATE) and not _under(imported, ("llm_datadist._engine.api",)) \
                    and imported != "llm_datadist._engine":
                wrong.append((name, imported))
    assert not wrong, f"facade modules import engine or transport internals: {wrong}"


def test_engine_and_transports_import_nothing_of_the_facade():
    wrong = [(name, imported) for name, path in _files() if _under(name, PRIVATE)
             for imported in _imports(path, top_level_only=False) if _under(imported, FACADE_ONLY)]
    assert not wrong, f"engine or transport modules import the facade: {wrong}"


def test_no_import_cycle_in_the_engine():
    modules = {name: path for name, path in _files() if _under(name, PRIVATE)}
    graph: Dict[str, Set[str]] = {
        name: {m for m in _imports(path, top_level_only=True) if m in modules and m != name}
        for name, path in modules.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(dep):] + [dep])}")
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
