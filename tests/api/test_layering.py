"""The import rule of docs/architecture.md: facade -> ``_engine.api`` only; the engine and the transports import
nothing of the facade; no import cycle among the engine's modules at import time."""
from __future__ import annotations

import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import import_graph
from import_graph import under as _under

import llm_datadist

PACKAGE = pathlib.Path(llm_datadist.__file__).parent
PRIVATE = ("llm_datadist._engine", "llm_datadist._transport")
FACADE_ONLY = ("llm_datadist.v1", "llm_datadist.v2", "llm_datadist.cli", "llm_datadist.configs")


def _imports(name: str, path: pathlib.Path, top_level_only: bool) -> Iterator[str]:
    """With ``top_level_only`` only the imports that run at import time (not in functions, not under
    ``if TYPE_CHECKING``); else every import, type-only ones included."""
    return import_graph.imports(name, path, in_functions=not top_level_only, type_only=not top_level_only)


def _files() -> List[Tuple[str, pathlib.Path]]:
    return list(import_graph.modules(PACKAGE).items())


def test_facade_imports_only_the_engine_api():
    wrong = []
    for name, path in _files():
        if _under(name, PRIVATE):
            continue
        for imported in _imports(name, path, top_level_only=False):
            if _under(imported, PRIVATE) and not _under(imported, ("llm_datadist._engine.api",)) \
                    and imported != "llm_datadist._engine":
                wrong.append((name, imported))
    assert not wrong, f"facade modules import engine or transport internals: {wrong}"


def test_engine_and_transports_import_nothing_of_the_facade():
    wrong = [(name, imported) for name, path in _files() if _under(name, PRIVATE)
             for imported in _imports(name, path, top_level_only=False) if _under(imported, FACADE_ONLY)]
    assert not wrong, f"engine or transport modules import the facade: {wrong}"


def test_no_import_cycle_in_the_engine():
    modules = {name: path for name, path in _files() if _under(name, PRIVATE)}
    graph: Dict[str, Set[str]] = {
        name: {m for m in _imports(name, path, top_level_only=True) if m in modules and m != name}
        for name, path in modules.items()}
    found = import_graph.cycle(graph)
    assert not found, f"import cycle: {' -> '.join(found)}"


def test_no_import_cycle_in_the_package_counting_every_import():
    """Stricter than at import time: imports inside functions and type-only ones count too (a module's own parent
    packages do not: importing a module runs them first, they are not what it depends on)."""
    modules = dict(_files())
    graph = {name: {m for m in _imports(name, path, top_level_only=False)
                    if m in modules and m != name and not name.startswith(m + ".")}
             for name, path in modules.items()}
    found = import_graph.cycle(graph)
    assert not found, f"import cycle: {' -> '.join(found)}"
