"""The docs say what the code has: the documented transports are the registry's, the documented extras pyproject's."""
from __future__ import annotations

import os
import re
import sys

from llm_datadist._transport import transport_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10: read the one table this test needs by hand
    tomllib = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/architecture.md", "docs/compatibility.md", "docs/transports.md", "docs/multi-host.md",
        "docs/security.md")


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def _documented_transports() -> list:
    """The names in the first column of the built-in transports table of docs/transports.md."""
    text = _read("docs/transports.md")
    section = text.split("## The built-in transports", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)


def test_the_transports_page_lists_exactly_the_registered_transports():
    documented = _documented_transports()
    assert len(documented) == len(set(documented)), documented
    assert set(documented) == set(transport_names())


def test_transfer_backend_names_in_the_docs_exist():
    """Every name the docs give for transfer_backend is a transport, or the official alias "hixl"."""
    text = _read("docs/compatibility.md")
    line = text.split("**`transfer_backend` names our transports**", 1)[1].split("\n* ", 1)[0]
    named = set(re.findall(r'`"([a-z_]+)"`', line))
    assert named, "no backend names found"
    assert named == set(transport_names()) | {"hixl"}


def test_no_doc_names_a_transport_that_does_not_exist():
    """A backticked name followed by the word transport(s) must be a registered transport."""
    known = set(transport_names())
    for path in DOCS:
        for name in re.findall(r"`([a-z_]+)` transports?\b", _read(path)):
            assert name in known, f"{path} names a `{name}` transport"


def _pyproject_extras() -> set:
    text = _read("pyproject.toml")
    if tomllib is not None:
        return set(tomllib.loads(text)["project"]["optional-dependencies"])
    table = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([a-z0-9_-]+)\s*=", table, flags=re.M))


def test_documented_extras_are_pyprojects():
    extras = _pyproject_extras()
    assert extras, "pyproject.toml declares no extras"
    documented = set()
    for path in DOCS:
        documented |= set(re.findall(r"llm-datadist\[([a-z0-9_-]+)\]", _read(path)))
        documented |= set(re.findall(r"'\.\[([a-z0-9_-]+)\]'", _read(path)))
    assert documented <= extras, f"documented but not in pyproject.toml: {sorted(documented - extras)}"
    assert extras <= documented, f"in pyproject.toml but documented nowhere: {sorted(extras - documented)}"
