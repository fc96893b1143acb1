"""The benchmark is not the product: it lives in its own distribution (``benchmarks/``, ``llm_datadist_bench``), the
core holds and imports none of it, it uses only the public API, the CLI helpers and ``_engine.diagnostics`` of the
core, and neither the core nor the bench has an import cycle (imports inside functions included)."""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Set

import llm_datadist
import llm_datadist_bench

CORE = pathlib.Path(llm_datadist.__file__).parent
BENCH = pathlib.Path(str(llm_datadist_bench.__file__)).parent
# what the bench may import of the core besides its public modules (the facade)
CORE_HELPERS = ("llm_datadist.cli.progress", "llm_datadist.cli.ipc", "llm_datadist.cli.instance",
                "llm_datadist.cli.netns", "llm_datadist._engine.diagnostics")
CORE_PRIVATE = ("llm_datadist._engine", "llm_datadist._transport", "llm_datadist.cli")


def _modules(package: pathlib.Path) -> Dict[str, pathlib.Path]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path) -> Iterator[str]:
    """Every module a file imports, inside functions too (``from a import b`` yields a and a.b); not those under
    ``if TYPE_CHECKING``, which never run."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(nodes: List[ast.stmt]) -> Iterator[ast.stmt]:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
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


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_core_holds_and_imports_nothing_of_the_bench():
    core = _modules(CORE)
    assert not [m for m in core if m.rpartition(".")[2].startswith("bench")]
    wrong = [(m, i) for m, path in core.items() for i in _imports(m, path) if _under(i, ("llm_datadist_bench",))]
    assert not wrong, f"core modules import the bench: {wrong}"
    compiles = [m for m, path in core.items() if "-shared" in path.read_text(encoding="utf-8")]
    assert not compiles, f"core modules build C code at run time: {compiles}"


def test_the_bench_uses_the_public_api_the_cli_helpers_and_diagnostics_only():
    wrong = [(m, i) for m, path in _modules(BENCH).items() for i in _imports(m, path)
             if _under(i, CORE_PRIVATE) and not _under(i, CORE_HELPERS)]
    assert not wrong, f"bench modules import core internals: {wrong}"


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(name: str) -> List[str]:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[name] = 2
        return []

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return []


def _graph(modules: Dict[str, pathlib.Path]) -> Dict[str, Set[str]]:
    # a module's own packages are left out: importing a module runs them first, they are not its dependencies
    return {name: {m for m in _imports(name, path) if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def test_cycle_finder():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_the_core_or_the_bench():
    modules = {**_modules(CORE), **_modules(BENCH)}
    cycle = _cycle(_graph(modules))
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"
