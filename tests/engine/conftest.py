"""Shared fixtures of the engine tests."""
from __future__ import annotations

import threading
import time

import pytest


@pytest.fixture(autouse=True)
def no_thread_leak():
    """Every test leaves no thread behind (a short grace period lets closing threads finish)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    extra = []
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            break
        time.sleep(0.02)
    assert not extra, extra
