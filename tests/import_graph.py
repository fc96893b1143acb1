"""The import graph of a package read from its sources (ast, nothing imported): modules, their imports, cycles."""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterable, Iterator, List, Set


def modules(package: pathlib.Path) -> Dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every ``.py`` file below the package folder ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: pathlib.Path, *, in_functions: bool = True, type_only: bool = False) -> Iterator[str]:
    """The modules the file of module ``name`` imports (``from a import b`` yields a and a.b).

    ``in_functions``: also imports inside functions (they run later, but they run); ``type_only``: also those under
    ``if TYPE_CHECKING`` (they never run; a layering rule may still forbid them).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(nodes: List[ast.stmt]) -> Iterator[ast.stmt]:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_functions:
                continue
            if isinstance(node, ast.If) and not type_only and "TYPE_CHECKING" in ast.dump(node.test):
                yield from walk(node.orelse)
                continue
            yield node
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from walk([c for c in children if isinstance(c, ast.stmt)] +
                                    [s for h in children if isinstance(h, ast.ExceptHandler) for s in h.body])

    for node in walk(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def under(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` (its modules in order, the first repeated at the end), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []
