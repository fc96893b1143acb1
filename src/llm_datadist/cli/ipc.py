"""The CLI's own process-to-process messages: receive with a deadline and clear failures."""
from __future__ import annotations

import time
from typing import Tuple, Type


def recv_message(conn, deadline: float, who: str, error: Type[Exception],
                 failure_kinds: Tuple[str, ...] = ("abort",)):
    """The next message from ``who`` over a multiprocessing connection.

    Raises ``error`` on timeout, when the other process went away, or when the message's first field
    is one of ``failure_kinds`` (its second field, if any, is the reason).
    """
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise error(f"timed out waiting for the {who} process")
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        raise error(f"the {who} process went away") from None
    if msg[0] in failure_kinds:
        reason = msg[1] if len(msg) > 1 else "aborted"
        raise error(f"the {who} process failed: {reason}")
    return msg
