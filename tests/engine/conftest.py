"""Shared fixtures of the engine tests."""
from __future__ import annotations

import threading

import pytest

from waiting import wait_until


@pytest.fixture(autouse=True)
def no_thread_leak():
    """Every test leaves no thread behind (closing threads get a generous deadline to finish)."""
    before = set(threading.enumerate())
    yield

    def extra():
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    assert wait_until(lambda: not extra()), extra()
