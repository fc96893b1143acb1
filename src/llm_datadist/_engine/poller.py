"""One thread that reads every link connection of an engine (a selector), instead of a reader thread per link."""
from __future__ import annotations

import collections
import logging
import selectors
import socket
import threading
from typing import Any, Deque, Optional, Tuple

_log = logging.getLogger(__name__)

SELECT_S = 1.0
REMOVE_WAIT_S = 5.0


class Poller:
    """Watches registered connections for input and calls ``conn.on_readable()`` in its thread.

    ``on_readable`` must not block (it reads what is there, completes replies, hands requests to workers).
    Registration changes are queued and applied by the poller thread, which a socketpair wakes; ``remove``
    returns once the poller no longer watches the connection, so its socket can be closed safely.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._ops: Deque[Tuple[str, Any, Optional[threading.Event]]] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._count = 0

    @property
    def connections(self) -> int:
        return self._count

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or we are closing)

    def add(self, conn) -> None:
        """Watch ``conn`` (its ``sock`` attribute); starts the thread on first use."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            self._ops.append(("add", conn, None))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._wake()

    def remove(self, conn) -> None:
        """Stop watching ``conn``; returns once the poller thread has let go of its socket."""
        if threading.current_thread() is self._thread:
            self._unregister(conn)
            return
        done = threading.Event()
        with self._lock:
            if self._closed or self._thread is None:
                return
            self._ops.append(("remove", conn, done))
        self._wake()
        if not done.wait(REMOVE_WAIT_S):
            _log.warning("%s: connection %r was not released in time", self._name, conn)

    def _unregister(self, conn) -> None:
        try:
            self._selector.unregister(conn.sock)
            self._count -= 1
        except (KeyError, ValueError, OSError):
            pass

    def _apply_ops(self) -> None:
        with self._lock:
            ops, self._ops = list(self._ops), collections.deque()
        for op, conn, done in ops:
            if op == "add":
                try:
                    self._selector.register(conn.sock, selectors.EVENT_READ, conn)
                    self._count += 1
                except (KeyError, ValueError, OSError) as exc:
                    conn.on_poll_error(f"cannot watch the connection: {exc}")
            else:
                self._unregister(conn)
            if done is not None:
                done.set()

    def _run(self) -> None:
        while True:
            self._apply_ops()
            with self._lock:
                if self._closed:
                    break
            try:
                events = self._selector.select(SELECT_S)
            except OSError as exc:  # a socket closed under us: drop that one at its next read
                _log.debug("%s: select failed: %s", self._name, exc)
                events = []
            for key, _mask in events:
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                try:
                    key.data.on_readable()
                except Exception:  # noqa: BLE001 - one connection's failure never stops the others
                    _log.error("%s: reading a connection failed", self._name, exc_info=True)
                    self._unregister(key.data)
                    key.data.on_poll_error("reader failed")
        self._apply_ops()

    def close(self) -> None:
        """Stop the thread (connections must have been closed first); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(REMOVE_WAIT_S)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
