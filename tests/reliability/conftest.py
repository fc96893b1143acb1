"""Fixtures of the reliability suite: peer processes, and a table of the figures the tests measured.

Every test may record figures (``figures.add(name, value, unit)``); ``pytest_terminal_summary`` prints them as
one short table at the end of the run, also with ``-q``.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import pytest

from tests.reliability.procs import PeerProcess, behaviour_env

_FIGURES: List[Tuple[str, str, str]] = []


class Figures:
    """What a test measured, for the summary table."""

    def add(self, name: str, value, unit: str = "") -> None:
        text = f"{value:,.1f}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) else str(value))
        _FIGURES.append((name, text, unit))


@pytest.fixture
def figures() -> Figures:
    return Figures()


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.write_sep("-", "reliability figures")
    width = max(len(name) for name, _v, _u in _FIGURES)
    for name, value, unit in _FIGURES:
        terminalreporter.write_line(f"{name:<{width}}  {value} {unit}".rstrip())


@pytest.fixture
def spawn():
    """``spawn(env=None) -> PeerProcess``; every peer is closed (finalized, else killed) after the test."""
    peers: List[PeerProcess] = []

    def make(env=None) -> PeerProcess:
        peer = PeerProcess(env)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch):
    """The tests choose transports, secrets and caps themselves: none comes from the caller's environment
    (peer processes drop those variables too, see PeerProcess)."""
    for name in behaviour_env(os.environ):
        monkeypatch.delenv(name)


@pytest.fixture
def transport_env(monkeypatch):
    """``transport_env(name)``: force that transport in this process; returns the env for peer processes."""

    def force(name: str) -> dict:
        monkeypatch.setenv("LLM_DATADIST_TRANSPORT", name)
        return {"LLM_DATADIST_TRANSPORT": name}

    return force

