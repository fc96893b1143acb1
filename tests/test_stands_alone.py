"""The repository stands alone: no text in it points to notes kept outside it (team files, their numbering)."""
from __future__ import annotations

import os
import re
from typing import Iterator, List, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("README.md", "docs", "src", "tests", "examples", "benchmarks")
SKIPPED_DIRS = {"__pycache__", ".pytest_cache"}

# Each alternative is written so that it does not match its own source text.
OUTSIDE_REFERENCE = re.compile("|".join([
    r"\.\./shared",            # a relative path out of the repository
    r"/work/share[d]",         # an absolute path to the team's files
    r"DECISION[S]",            # the team's decision list and its numbers
    r"API-SPE[C]",             # the team's behavioural spec
    r"CLIENTS\.m[d]",          # the team's notes on real clients
    "\u00a7",                  # section numbers of those notes
    r"[Ii]ssue [0-9]",         # tracker numbers
    r"\bD[0-9]{1,2}\b",        # decision numbers
    r"[Cc]hecklist",           # a numbered list of requirements
    r"\bQ[0-9]{1,2}\b",        # numbered open questions
]))


def _text_files() -> Iterator[str]:
    for entry in SCANNED:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            for name in files:
                yield os.path.join(folder, name)


def _hits(path: str) -> List[Tuple[int, str]]:
    with open(path, "rb") as handle:
        data = handle.read()
    if b"\0" in data:
        return []  # a binary file (the plot)
    text = data.decode("utf-8")
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if OUTSIDE_REFERENCE.search(line)]


def test_the_scan_finds_what_it_looks_for():
    # "|" splits each sample so that this file does not hold the text it looks for
    for sample in ("see ..|/shared/spec", "DECI|SIONS", "API-|SPEC", "CLIENTS.|md", "iss|ue 5", "(D|21)",
                   "Check|list item 3", "Q|33", "section \u00a7|9"):
        assert OUTSIDE_REFERENCE.search(sample.replace("|", "")), sample
    for sample in ("D2H copies", "a 2D layout", "the official library", "issues a token", "Q"):
        assert not OUTSIDE_REFERENCE.search(sample), sample


@pytest.mark.parametrize("entry", SCANNED)
def test_no_text_points_outside_the_repository(entry):
    files = [p for p in _text_files() if os.path.relpath(p, ROOT).split(os.sep)[0] == entry]
    assert files, f"nothing found under {entry}"
    found = {os.path.relpath(p, ROOT): hits for p in files for hits in [_hits(p)] if hits}
    assert not found, found
