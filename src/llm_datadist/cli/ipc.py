"""The CLI's own process-to-process messages: receive with a deadline and clear failures."""
from __future__ import annotations

import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess
from typing import Callable, Dict, Iterator, Optional, Set, Tuple, Type


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


def exit_text(code: Optional[int]) -> str:
    """How a child process ended, for error messages."""
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def child_messages(conns: Dict[str, Connection], procs: Dict[str, BaseProcess], deadline: float,
                   done: Set[str], error: Type[Exception],
                   timeout_text: Callable[[], str]) -> Iterator[Tuple[str, tuple]]:
    """Yield ``(role, message)`` from child processes until every role is in ``done`` (the caller adds them).

    Raises ``error`` when the deadline passes or a process goes away before it is done.
    """
    live = dict(conns)
    while len(done) < len(conns):
        if time.monotonic() > deadline:
            raise error(timeout_text())
        for conn in wait_any(list(live.values()), timeout=0.5):
            role = next(r for r, c in live.items() if c is conn)
            try:
                msg = live[role].recv()
            except (EOFError, OSError):
                del live[role]
                if role not in done:
                    procs[role].join(2.0)
                    raise error(f"the {role} process exited unexpectedly ({exit_text(procs[role].exitcode)})") \
                        from None
                continue
            yield role, msg
