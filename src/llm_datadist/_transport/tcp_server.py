"""The tcp data server: per-link tokens, a poller for unauthenticated sockets, a thread per authenticated one.

Connections first send a HELLO with a token; a poller thread reads those (idle or slow sockets cost no thread
and the oldest is dropped when too many wait), and hands an authenticated connection to a serving thread.
Every request is admitted (counted), then its token, generation guards and ranges are checked against the
owner's truth, then served; ``fence`` waits for requests admitted before it. Revoking a link's token closes its
connections at once.

Serving threads are bounded three ways: MAX_SERVING in all, MAX_PER_LINK for the connections of one link (one
link cannot take the slots every other link needs), and IDLE_TIMEOUT_S for each request frame to arrive (a
connection idle between frames, or stalled in the middle of a request's header or ranges, is closed) and, while a
request's data moves, for some byte to move (a peer that stops reading a READ's data, or sending a WRITE's, is
closed too). The HELLO
reply's ``count`` field tells the client the idle limit in milliseconds, so it stops reusing a pooled connection
well before the server may close it (0 would mean no limit; clients that ignore the field lose nothing but
that).
"""
from __future__ import annotations

import collections
import hmac
import logging
import os
import selectors
import socket
import ssl
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from llm_datadist._transport import ranges, tls
from llm_datadist._transport import tcp_wire as wire
from llm_datadist._transport.base import CopyPlan, GuardTable, TransportError

logger = logging.getLogger(__name__)

POLL_S = 0.25
HELLO_TIMEOUT_S = 2.0  # an unauthenticated connection must send its HELLO within this
MAX_PENDING = 512  # unauthenticated connections waiting for their HELLO (the oldest is dropped beyond)
MAX_SERVING = 256  # authenticated connections at once
# Authenticated connections of one link at once. A well-behaved link holds one tcp channel, whose pool opens at
# most tcp.MAX_CONNS_PER_CHANNEL (8) connections (a large transfer's streams, STREAMS_PER_TRANSFER <= 8, come from
# that pool too); twice that leaves room for a channel opened anew while the old one's connections still close.
MAX_PER_LINK = 16


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, "") or default)
    except ValueError:
        return default
    return value if 0 < value < 86400 else default


# A request frame (its header, then its guards and ranges) must arrive within this many seconds of the connection
# becoming ready for it; an authenticated connection idle between frames for longer is closed (the client
# reconnects on its next transfer). LLM_DATADIST_TCP_IDLE_S overrides it.
IDLE_TIMEOUT_S = _env_seconds("LLM_DATADIST_TCP_IDLE_S", 30.0)
SERVE_POLL_S = 0.5


_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_INFO_BYTES = 136  # struct tcp_info through tcpi_bytes_acked (offset 120) and tcpi_bytes_received (128)


def _bytes_moved(sock: socket.socket) -> Optional[int]:
    """Bytes the peer acknowledged plus bytes received on the connection (None where the kernel does not say)."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)
    except OSError:
        return None
    if len(info) < _TCP_INFO_BYTES:
        return None
    acked, received = struct.unpack_from("<QQ", info, 120)
    return int(acked + received)


class _Stop(Exception):
    """Internal: the server is stopping or the connection's link was revoked."""


class _Idle(_Stop):
    """Internal: no whole request frame arrived, or no byte of a request's data moved, within IDLE_TIMEOUT_S."""


class _Watch:
    """The stall of one authenticated connection: the server stopping ends it, and so does the idle limit.

    ``frame()`` starts the wait for (the rest of) a request frame: it must be whole within IDLE_TIMEOUT_S.
    ``data()`` starts the request's data: some byte must move, one way or the other, every IDLE_TIMEOUT_S
    (measured from the first stall on: a small transfer never stalls). A TLS socket gets the limit as its own
    timeout too: the ssl module retries a blocking read or write that SO_RCVTIMEO/SO_SNDTIMEO cut short without
    ever returning, so only its timeout (an error: the connection closes) ends a wait for bytes that never move.
    """

    __slots__ = ("_stop", "_sock", "_tls", "_timeout", "_deadline", "_data", "_moved", "_since")

    def __init__(self, stop: threading.Event, sock: socket.socket) -> None:
        self._stop = stop
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._timeout: Optional[float] = None  # the TLS socket's own timeout
        self._deadline = 0.0
        self._data = False
        self._moved: Optional[int] = None
        self._since: Optional[float] = None

    def frame(self) -> None:
        self._deadline = time.monotonic() + IDLE_TIMEOUT_S
        self._data = False
        if self._tls and self._timeout != IDLE_TIMEOUT_S:
            self._timeout = IDLE_TIMEOUT_S
            self._sock.settimeout(IDLE_TIMEOUT_S)

    def data(self) -> None:
        self._data = True
        self._since = None

    def __call__(self) -> None:
        if self._stop.is_set():
            raise _Stop()
        now = time.monotonic()
        if not self._data:
            if now >= self._deadline:
                raise _Idle()
            return
        moved = _bytes_moved(self._sock)
        if self._since is None or moved is None or moved != self._moved:
            self._moved, self._since = moved, now
        elif now - self._since >= IDLE_TIMEOUT_S:
            raise _Idle()


class _Pending:
    __slots__ = ("sock", "buf", "since", "secured")

    def __init__(self, sock: socket.socket, secured: bool) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.since = time.monotonic()
        self.secured = secured  # TLS handshake done (always, without TLS)


class DataServer:
    """Serves READ/WRITE requests of linked peers against registered memory."""

    def __init__(self, host: str, readable: ranges.RangeTable, writable: ranges.RangeTable,
                 guards: Optional[GuardTable], tls_config=None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wire.set_buffers(self._listener)  # inherited by accepted connections
        self._listener.bind((host, 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._readable = readable
        self._writable = writable
        self._guards = guards
        self._tls = tls_config
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._tokens: Dict[bytes, int] = {}  # token -> link id
        self._serving: Dict[socket.socket, int] = {}  # authenticated connection -> link id
        self._per_link: collections.Counter = collections.Counter()  # link id -> its connections in _serving
        self.refused_over_cap = 0  # authenticated connections closed at once: MAX_SERVING or MAX_PER_LINK reached
        self.closed_idle = 0  # authenticated connections closed after IDLE_TIMEOUT_S without a whole frame
        self._threads: Set[threading.Thread] = set()
        self._version = 0
        self._active: collections.Counter = collections.Counter()
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._poller = threading.Thread(target=self._poll_loop, name=f"tcp-data-{self.port}", daemon=True)
        self._poller.start()

    # -- tokens -----------------------------------------------------------------------------------
    def add_token(self, token: bytes, link_id: int) -> None:
        with self._lock:
            self._tokens[token] = link_id

    def revoke(self, link_id: int) -> None:
        """Forget the link's tokens and close its connections (requests in flight end with them)."""
        with self._lock:
            for token in [t for t, lid in self._tokens.items() if lid == link_id]:
                del self._tokens[token]
            victims = [sock for sock, lid in self._serving.items() if lid == link_id]
        for sock in victims:
            _shutdown(sock)

    def _link_of(self, token: bytes) -> Optional[int]:
        with self._lock:
            for known, link_id in self._tokens.items():
                if hmac.compare_digest(known, token):
                    return link_id
        return None

    # -- unauthenticated phase (one poller thread) ---------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._selector.select(POLL_S)
            except OSError:
                break
            for key, _mask in events:
                if key.fileobj is self._listener:
                    self._accept_all()
                else:
                    self._read_hello(key.data)
            self._expire()
        for pending in list(self._pending.values()):
            self._drop(pending)

    def _accept_all(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_server_nonblocking(sock)
                except (OSError, ValueError):
                    sock.close()
                    continue
            pending = _Pending(sock, secured=self._tls is None)
            if len(self._pending) >= MAX_PENDING:
                self._drop(next(iter(self._pending.values())))  # the oldest waits longest: it goes first
            self._pending[sock.fileno()] = pending
            self._selector.register(sock, selectors.EVENT_READ, pending)

    def _read_hello(self, pending: _Pending) -> None:
        if not pending.secured:  # drive the TLS handshake without blocking the poller
            try:
                pending.sock.do_handshake()  # type: ignore[attr-defined]
                pending.secured = True
            except tls.WOULD_BLOCK:
                return
            except OSError:
                self._drop(pending)
                return
        while len(pending.buf) < wire.HDR.size + wire.TOKEN_BYTES:
            try:
                data = pending.sock.recv(wire.HDR.size + wire.TOKEN_BYTES - len(pending.buf))
            except tls.WOULD_BLOCK:
                return
            except OSError:
                data = b""
            if not data:
                self._drop(pending)
                return
            pending.buf += data
            if not tls.pending(pending.sock):
                break
        if len(pending.buf) < wire.HDR.size + wire.TOKEN_BYTES:
            return
        self._forget_pending(pending)
        try:
            op, _, _, _, nbytes = wire.parse_header(bytes(pending.buf[:wire.HDR.size]))
        except (TransportError, struct.error):
            pending.sock.close()
            return
        link_id = self._link_of(bytes(pending.buf[wire.HDR.size:])) if op == wire.OP_HELLO and \
            nbytes == wire.TOKEN_BYTES else None
        if link_id is None:
            pending.sock.close()  # an unknown or revoked token learns nothing
            return
        self._start_serving(pending.sock, link_id)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if now - oldest.since < HELLO_TIMEOUT_S:
                return
            self._drop(oldest)

    def _forget_pending(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, pending: _Pending) -> None:
        self._forget_pending(pending)
        pending.sock.close()

    # -- authenticated connections ------------------------------------------------------------------
    def _start_serving(self, sock: socket.socket, link_id: int) -> None:
        with self._lock:
            full = len(self._serving) >= MAX_SERVING or self._per_link[link_id] >= MAX_PER_LINK
            if self._stop.is_set() or full:
                self.refused_over_cap += full
                thread = None
            else:
                thread = threading.Thread(target=self._serve, args=(sock, link_id), name="tcp-data-conn",
                                          daemon=True)
                self._serving[sock] = link_id
                self._per_link[link_id] += 1
                self._threads.add(thread)
        if thread is None:  # no thread for it: a refusal the (non-blocking) socket takes at once, then the close
            try:
                sock.send(wire.header(wire.OP_REPLY, wire.ST_REJECTED))
            except (OSError, ValueError):
                pass
            sock.close()
            return
        try:
            thread.start()
        except RuntimeError:  # cannot start a thread: drop this connection only
            self._forget(sock, thread)
            sock.close()

    def _forget(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            link_id = self._serving.pop(sock, None)
            if link_id is not None:
                self._per_link[link_id] -= 1
                if self._per_link[link_id] <= 0:
                    del self._per_link[link_id]
            self._threads.discard(thread)

    def _stall(self) -> None:
        if self._stop.is_set():
            raise _Stop()

    def _serve(self, sock: socket.socket, link_id: int) -> None:
        try:
            wire.tune(sock)
            wire.set_timeouts(sock, SERVE_POLL_S)
            idle_ms = min(int(IDLE_TIMEOUT_S * 1000), 0xFFFFFFFF)
            wire.send_bytes(sock, wire.header(wire.OP_REPLY, wire.ST_OK, idle_ms), self._stall)
            watch = _Watch(self._stop, sock)
            while self._serve_one(sock, link_id, watch):
                pass
        except (_Idle, TransportError) as exc:
            if isinstance(exc, _Idle) or isinstance(exc.__cause__, socket.timeout):  # TLS: its own timeout
                with self._lock:
                    self.closed_idle += 1
                logger.debug("tcp data connection of link %d closed: no request within %.1f s", link_id,
                             IDLE_TIMEOUT_S)
        except (_Stop, OSError, ValueError, struct.error):
            pass
        except Exception:  # noqa: BLE001 - a bad connection must never kill the server
            logger.debug("tcp data connection failed", exc_info=True)
        finally:
            self._forget(sock, threading.current_thread())
            sock.close()

    def _reply(self, sock: socket.socket, status: int, count: int = 0, nbytes: int = 0,
               stall: Optional[Callable[[], None]] = None) -> None:
        wire.send_bytes(sock, wire.header(wire.OP_REPLY, status, count, nbytes), stall or self._stall)

    def _serve_one(self, sock: socket.socket, link_id: int, stall: _Watch) -> bool:
        """Serve one request frame; False closes the connection."""
        stall.frame()
        op, _, count, nguards, nbytes = wire.recv_header(sock, stall)
        if op not in (wire.OP_READ, wire.OP_WRITE) or count > wire.MAX_OPS or nguards > wire.MAX_GUARDS:
            self._reply(sock, wire.ST_BAD_FRAME)
            return False
        stall.frame()  # the guards and ranges follow the header
        body = wire.recv_buffer(sock, 16 * (nguards + count), stall)
        words = struct.unpack_from(f"<{2 * nguards}Q", body)
        guards = list(zip(words[0::2], words[1::2]))
        plan = CopyPlan.from_pairs(body, 16 * nguards, count)  # the ranges, in this process
        stall.data()
        version = self._begin()
        try:
            status = self._check(link_id, op, guards, plan)
            if status != wire.ST_OK:
                self._reply(sock, status)
                return status != wire.ST_BAD_FRAME
            if plan.total_bytes != nbytes:
                self._reply(sock, wire.ST_BAD_FRAME)
                return False
            addrs, sizes = plan.ranges()
            if op == wire.OP_READ:  # the verdict and the data in one gather send
                head = bytearray(wire.header(wire.OP_REPLY, wire.ST_OK, count, nbytes))
                wire.send(sock, [wire.address_of(head)] + addrs, [len(head)] + sizes, stall)
            else:
                self._reply(sock, wire.ST_OK, stall=stall)
                wire.recv(sock, addrs, sizes, stall)
                self._reply(sock, wire.ST_OK, stall=stall)
            return True
        finally:
            self._end(version)

    def _check(self, link_id: int, op: int, guards: List[Tuple[int, int]], plan: CopyPlan) -> int:
        """After admission: the link still holds a token, the guards hold, the ranges are registered."""
        with self._lock:
            if link_id not in self._tokens.values():
                raise _Stop()  # revoked while the frame was on its way
        if self._guards is None and guards:
            return wire.ST_STALE
        for slot, value in guards:
            if not self._guards.valid(slot, value):  # type: ignore[union-attr]
                return wire.ST_STALE
        table = self._writable if op == wire.OP_WRITE else self._readable
        return wire.ST_OK if table.holds(plan, remote=False) else wire.ST_REJECTED

    def _begin(self) -> int:
        with self._lock:
            self._active[self._version] += 1
            return self._version

    def _end(self, version: int) -> None:
        with self._lock:
            self._active[version] -= 1
            if not self._active[version]:
                del self._active[version]
            self._lock.notify_all()

    def fence(self, deadline: float) -> None:
        """Wait until requests admitted before now have finished; past the deadline their connections close."""
        with self._lock:
            self._version += 1
            barrier = self._version
            done = self._lock.wait_for(lambda: all(v >= barrier for v in self._active),
                                       max(0.0, deadline - time.monotonic()))
            stuck = [] if done else list(self._serving)
        for sock in stuck:  # a stalled peer: cut its connections so nothing moves after the fence
            _shutdown(sock)
        if stuck:
            with self._lock:
                self._lock.wait_for(lambda: all(v >= barrier for v in self._active), 5.0)

    @property
    def connections(self) -> Tuple[int, int]:
        """(unauthenticated waiting, authenticated serving) connection counts."""
        with self._lock:
            return len(self._pending), len(self._serving)

    def close(self) -> None:
        self._stop.set()
        self._poller.join(5.0)
        try:
            self._selector.close()
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns, threads = list(self._serving), list(self._threads)
            self._tokens.clear()
        for sock in conns:
            _shutdown(sock)
        for thread in threads:
            thread.join(5.0)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
