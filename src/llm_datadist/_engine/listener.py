"""TCP listener of the control plane: an accept loop in a daemon thread with a stop event."""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from typing import Any, Callable, Set

from llm_datadist._engine import errors

_log = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 0.2
JOIN_TIMEOUT_S = 5.0
MAX_PENDING_HANDSHAKES = 64

AcceptCallback = Callable[[socket.socket, Any], None]


class Listener:
    """Accept connections on ``host:port`` and hand each to ``on_accept(sock, addr)`` in its own thread.

    The accept loop runs in a daemon thread, wakes every ACCEPT_TIMEOUT_S to check a stop event, and
    starts one short-lived daemon thread per connection, so a slow handshake never delays other
    accepts. ``on_accept`` owns the socket (a blocking socket); if it raises, the error is logged and
    the socket closed. At most MAX_PENDING_HANDSHAKES connections are in ``on_accept`` at once: beyond,
    the one waiting longest is cut (its socket shut down), so idle or slow sockets can neither exhaust
    threads nor keep a real peer out while they sit there.
    """

    def __init__(self, host: str, port: int, on_accept: AcceptCallback, name: str = "llm-dd-listener",
                 backlog: int = 128) -> None:
        """Bind and start listening.

        Args:
            host: Address to bind ("" or "0.0.0.0" for every IPv4 interface; IPv6 literals work too).
            port: Port to bind; 0 picks an ephemeral port (see ``port``).
            on_accept: Called with (socket, address) for every accepted connection.
            name: Thread name prefix, also used in log lines.
            backlog: listen() backlog.

        Raises:
            errors.ParamInvalid: The address cannot be bound (port in use, address not local or not
                resolvable); the OSError is chained. Its code is LLM_PARAM_INVALID.
        """
        self._on_accept = on_accept
        self._name = name
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict[threading.Thread, socket.socket] = collections.OrderedDict()
        self._cut: Set[threading.Thread] = set()  # threads of cut handshakes still ending: close() joins them too
        self._closed = False
        self._sock = _bind(host, port, backlog)
        self._sock.settimeout(ACCEPT_TIMEOUT_S)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._thread.start()
        _log.debug("%s: listening on %s:%d", name, host, self.port)

    def __repr__(self) -> str:
        return f"<Listener {self._name} {self.host}:{self.port}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop accepting, join the accept thread and (bounded) the running on_accept threads; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() at once on Linux
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT_S)
        self._sock.close()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        with self._lock:
            pending = list(self._pending) + list(self._cut)
        for thread in pending:
            if thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))
        _log.debug("%s: closed", self._name)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                _log.warning("%s: accept failed: %s", self._name, exc)
                self._stop.wait(ACCEPT_TIMEOUT_S)  # e.g. EMFILE: back off instead of spinning
                continue
            self._spawn(conn, addr)

    def _spawn(self, conn: socket.socket, addr: Any) -> None:
        conn.settimeout(None)
        with self._lock:
            victim = None
            if len(self._pending) >= MAX_PENDING_HANDSHAKES:
                # the oldest handshake, most likely idle; it leaves the count at once (its thread ends when the
                # shut-down socket wakes it), so a burst of connections cuts one old handshake per new one
                cut_thread, victim = self._pending.popitem(last=False)
                self._cut.add(cut_thread)
            thread = threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                                      name=f"{self._name}-conn")
            self._pending[thread] = conn
        if victim is not None:
            _log.info("%s: %d handshakes in progress; the oldest is cut for %s", self._name,
                      MAX_PENDING_HANDSHAKES, addr)
            try:
                victim.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        thread.start()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        try:
            if self._stop.is_set():
                conn.close()
                return
            self._on_accept(conn, addr)
        except Exception:  # noqa: BLE001 - one bad connection never stops the listener
            _log.error("%s: handling connection from %s failed", self._name, addr, exc_info=True)
            conn.close()
        finally:
            with self._lock:
                self._pending.pop(threading.current_thread(), None)
                self._cut.discard(threading.current_thread())


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    """Create, bind and listen; every failure becomes ParamInvalid."""
    if not 0 <= port <= 65535:
        raise errors.ParamInvalid(f"cannot listen on {host}:{port}: port out of range 0-65535")
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:  # gaierror, undecodable host name
        raise errors.ParamInvalid(f"cannot listen on {host}:{port}: bad address ({exc})") from exc
    family, socktype, proto, _, sockaddr = _prefer_ipv4(infos)
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise errors.ParamInvalid(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


def _prefer_ipv4(infos: list) -> tuple:
    """With host "" getaddrinfo may list :: first; keep IPv4 the default like the official library."""
    for info in infos:
        if info[0] == socket.AF_INET:
            return info
    return infos[0]
