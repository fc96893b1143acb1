"""Waiting in tests without wall-clock guesses: poll a condition until it holds or a generous deadline passes."""
from __future__ import annotations

import time
from typing import Callable

#: How long a test waits for something that normally takes milliseconds: a bound that only a hang reaches.
NEVER_HANGS_S = 10.0


def wait_until(condition: Callable[[], bool], timeout_s: float = NEVER_HANGS_S, interval_s: float = 0.005) -> bool:
    """Poll ``condition`` until it is true or ``timeout_s`` has passed.

    Args:
        condition: checked at once, then every ``interval_s``.
        timeout_s: the deadline, generous: reaching it means the awaited event never came.
        interval_s: the pause between two checks.

    Returns:
        Whether ``condition`` held before the deadline (checked one last time at the deadline).
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(interval_s)
    return True
