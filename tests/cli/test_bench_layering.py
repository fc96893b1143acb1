"""The benchmark is not the product: it lives in its own distribution (``benchmarks/``, ``llm_datadist_bench``), the
core holds and imports none of it, it uses only the public API, the CLI helpers and ``_engine.diagnostics`` of the
core, and neither the core nor the bench has an import cycle (imports inside functions included)."""
from __future__ import annotations

import pathlib
import re
from typing import Dict, Iterator, Set

import import_graph

import llm_datadist
import llm_datadist_bench

CORE = pathlib.Path(llm_datadist.__file__).parent
BENCH = pathlib.Path(str(llm_datadist_bench.__file__)).parent
# what the bench may import of the core besides its public modules (the facade)
CORE_HELPERS = ("llm_datadist.cli.progress", "llm_datadist.cli.ipc", "llm_datadist.cli.instance",
                "llm_datadist.cli.netns", "llm_datadist._engine.diagnostics")
CORE_PRIVATE = ("llm_datadist._engine", "llm_datadist._transport", "llm_datadist.cli")


_modules = import_graph.modules
_under = import_graph.under
_cycle = import_graph.cycle


def _imports(name: str, path: pathlib.Path) -> Iterator[str]:
    """Every module a file imports, inside functions too; not those under ``if TYPE_CHECKING``, which never run."""
    return import_graph.imports(name, path)


def test_the_core_holds_and_imports_nothing_of_the_bench():
    core = _modules(CORE)
    assert not [m for m in core if m.rpartition(".")[2].startswith("bench")]
    wrong = [(m, i) for m, path in core.items() for i in _imports(m, path) if _under(i, ("llm_datadist_bench",))]
    assert not wrong, f"core modules import the bench: {wrong}"
    compiles = [m for m, path in core.items()  # a compiler's "-shared" flag (its own string, not inside a word)
                if re.search(r"""["']-shared["']""", path.read_text(encoding="utf-8"))]
    assert not compiles, f"core modules build C code at run time: {compiles}"


def test_the_bench_uses_the_public_api_the_cli_helpers_and_diagnostics_only():
    wrong = [(m, i) for m, path in _modules(BENCH).items() for i in _imports(m, path)
             if _under(i, CORE_PRIVATE) and not _under(i, CORE_HELPERS)]
    assert not wrong, f"bench modules import core internals: {wrong}"


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
