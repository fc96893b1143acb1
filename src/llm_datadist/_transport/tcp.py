"""TCP transport: batched reads/writes of registered memory through the peer's data server, per-link tokens."""
from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Set

from llm_datadist._transport import parallel, ranges
from llm_datadist._transport import tcp_wire as wire
from llm_datadist._transport.base import (
    HOST,
    NETWORK,
    Capabilities,
    Channel,
    ConnectFailed,
    CopyPlan,
    PeerInfo,
    Region,
    RemoteRejected,
    StaleMemory,
    TransferTimeout,
    Transport,
    TransportClosed,
    TransportContext,
    TransportError,
    same_machine,
)
from llm_datadist._transport.tcp_server import DataServer

logger = logging.getLogger(__name__)

_DESC = struct.Struct("<4sH")  # magic, data server port (no secret: tokens are granted per link)
_DESC_MAGIC = b"TCP2"


def data_port_of(descriptor: bytes) -> Optional[int]:
    """The data server port a peer's tcp descriptor advertises, or None for anything else."""
    if len(descriptor) != _DESC.size or descriptor[:4] != _DESC_MAGIC:
        return None
    return int(_DESC.unpack(descriptor)[1])
MAX_CONNS_PER_CHANNEL = 8  # the data server serves a link at most tcp_server.MAX_PER_LINK (twice this) at once
# A pooled connection is reused while it has been idle for less than this share of the idle limit the server
# announced in its HELLO reply (the server closes connections idle that long): the margin keeps a request from
# meeting the server's close on its way.
REUSE_SHARE = 0.5


class TcpChannel(Channel):
    """A pool of authenticated connections to one peer's data server; safe for concurrent use."""

    def __init__(self, peer: PeerInfo, port: int, token: bytes, max_conns: int = MAX_CONNS_PER_CHANNEL,
                 tls_config=None, streams: int = 1) -> None:
        super().__init__(peer)
        self.streams = streams  # data connections one large transfer spreads over
        self._tls = tls_config
        self.address = (peer.address or "127.0.0.1", port)
        self._token = token
        self._max = max_conns
        self._cond = threading.Condition()
        self._idle: List[socket.socket] = []
        self._idle_since: Dict[socket.socket, float] = {}
        self._reuse_s = 0.0  # reuse an idle connection for at most this long (0: the server sets no limit)
        self._all: Set[socket.socket] = set()
        self._opening = 0
        self.closed = False

    def open_connection(self, deadline: float) -> socket.socket:
        """Open and authenticate one connection. Raises ConnectFailed or TransferTimeout."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferTimeout("deadline passed before connecting")
        try:
            sock = wire.connect(self.address, remaining)
            if self._tls is not None:
                sock = self._tls.wrap_client(sock, deadline - time.monotonic())
                wire.tune(sock)
        except socket.timeout as exc:
            raise TransferTimeout(f"connect to {self.address} timed out") from exc
        except OSError as exc:  # ssl.SSLError included: a peer without our CA's certificate
            raise ConnectFailed(f"cannot connect to {self.address}: {exc}") from exc
        try:
            stall = _client_stall(sock, deadline)
            stall()
            wire.send_bytes(sock, wire.header(wire.OP_HELLO, nbytes=wire.TOKEN_BYTES) + self._token, stall)
            op, status, idle_ms, _, _ = wire.recv_header(sock, stall)
            if op != wire.OP_REPLY or status != wire.ST_OK:
                raise ConnectFailed("peer refused the connection (token revoked, or the link's connections "
                                    "at the server's cap)")
            self._reuse_s = idle_ms / 1000.0 * REUSE_SHARE
        except TransferTimeout:
            sock.close()
            raise
        except (TransportError, OSError) as exc:
            sock.close()
            if _timed_out(exc):
                raise TransferTimeout(f"the data handshake with {self.address} timed out") from exc
            raise ConnectFailed(f"handshake with {self.address} failed: {exc}") from exc
        return sock

    def acquire(self, deadline: float) -> socket.socket:
        """An idle connection, a new one (up to the pool size), or wait for one to be released."""
        with self._cond:
            while True:
                if self.closed:
                    raise TransportClosed("tcp channel is closed")
                idle = self._take_idle()
                if idle is not None:
                    return idle
                if len(self._all) + self._opening < self._max:
                    self._opening += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransferTimeout("no free connection before the deadline")
                self._cond.wait(remaining)
        sock = None
        try:
            sock = self.open_connection(deadline)
        except ConnectFailed as exc:
            raise TransportClosed(str(exc)) from exc
        finally:
            with self._cond:
                self._opening -= 1
                if sock is not None and not self.closed:
                    self._all.add(sock)
                self._cond.notify_all()
        if self.closed:
            sock.close()
            raise TransportClosed("tcp channel is closed")
        return sock

    def try_acquire(self, deadline: float) -> Optional[socket.socket]:
        """An idle connection, or a new one when the pool has room; None at once when neither (no waiting:
        a transfer that already holds a connection must never wait for a second one)."""
        with self._cond:
            if self.closed:
                return None
            idle = self._take_idle()
            if idle is not None:
                return idle
            if len(self._all) + self._opening >= self._max:
                return None
            self._opening += 1
        sock = None
        try:
            sock = self.open_connection(deadline)
        except (ConnectFailed, TransferTimeout):
            return None
        finally:
            with self._cond:
                self._opening -= 1
                if sock is not None and not self.closed:
                    self._all.add(sock)
                self._cond.notify_all()
        return sock

    def _take_idle(self) -> Optional[socket.socket]:
        """(Holding the lock) the most recently used idle connection still good for a request, or None.

        Idle connections held longer than the reuse limit are closed (the server may close them any moment),
        and so is one with something to read: between frames the server sends nothing, so that is its close
        (idle limit reached, or the server went away) and the request would fail on it.
        """
        if not self._idle:
            return None
        if self._reuse_s:
            oldest = time.monotonic() - self._reuse_s
            for sock in [s for s in self._idle if self._idle_since.get(s, 0.0) <= oldest]:
                self._drop_idle(sock)
        while self._idle:
            sock = self._idle.pop()
            self._idle_since.pop(sock, None)
            if not _has_input(sock):
                return sock
            self._all.discard(sock)
            sock.close()
        return None

    def _drop_idle(self, sock: socket.socket) -> None:
        self._idle.remove(sock)
        self._idle_since.pop(sock, None)
        self._all.discard(sock)
        sock.close()

    def release(self, sock: socket.socket, reusable: bool) -> None:
        """Return a connection to the pool, or close it when its stream state is unknown."""
        with self._cond:
            if reusable and not self.closed and sock in self._all:
                self._idle.append(sock)
                self._idle_since[sock] = time.monotonic()
            else:
                self._all.discard(sock)
                sock.close()
            self._cond.notify_all()

    def close(self) -> None:
        """Close idle connections; wake threads blocked on busy ones (they close them) (idempotent)."""
        with self._cond:
            self.closed = True
            idle, busy = self._idle, self._all.difference(self._idle)
            self._idle, self._all = [], set()
            self._idle_since.clear()
            self._cond.notify_all()
        for sock in idle:
            sock.close()
        for sock in busy:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _has_input(sock: socket.socket) -> bool:
    """Whether the socket is readable, hung up or in error now (no waiting)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _client_stall(sock: socket.socket, deadline: float) -> Callable[[], None]:
    """The stall hook of a client connection: TransferTimeout once ``deadline`` passed, else re-arm the timeouts.

    A TLS socket also gets its own timeout: the ssl module retries a read or write that SO_RCVTIMEO/SO_SNDTIMEO
    cut short and never returns, so only that timeout (then TransferTimeout, see ``_timed_out``) bounds it.
    """
    tls_socket = isinstance(sock, ssl.SSLSocket)

    def stall() -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferTimeout("tcp transfer deadline passed")
        wire.set_timeouts(sock, remaining)
        if tls_socket:
            sock.settimeout(remaining)

    return stall


def _timed_out(exc: BaseException) -> bool:
    """Whether a transport error came from a TLS socket's own timeout (the client's deadline)."""
    while exc is not None:
        if isinstance(exc, socket.timeout):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def _request(sock: socket.socket, op: int, plan: CopyPlan, stall: Callable[[], None]) -> None:
    """The request frame of a plan in one send: the header, the guards' (slot, value) pairs, the remote ranges."""
    g = len(plan.guards)
    words: List[int] = []
    for guard in plan.guards:
        words += (guard.slot, guard.value)
    frame = (wire.header(op, wire.ST_OK, len(plan), plan.total_bytes, g) + struct.pack(f"<{2 * g}Q", *words)
             + plan.pairs())
    wire.send_bytes(sock, frame, stall)


def _expect_ok(sock: socket.socket, stall: Callable[[], None]) -> None:
    op, status, _, _, _ = wire.recv_header(sock, stall)
    if op != wire.OP_REPLY:
        raise TransportClosed(f"unexpected frame op {op}")
    if status == wire.ST_REJECTED:
        raise RemoteRejected("range outside the peer's registered memory")
    if status == wire.ST_STALE:
        raise StaleMemory("the peer released that cache")
    if status != wire.ST_OK:
        raise _BadFrame(f"peer rejected the frame (status {status})")


class _BadFrame(RemoteRejected):
    """The peer rejected the frame and closes the connection."""


class _Op:
    """One request frame on one connection, in two phases: ``begin`` (request, the server's verdict) and
    ``finish`` (the data). Every part of a transfer is begun before any is finished, so a refused part means
    no byte of the transfer moved."""

    def __init__(self, write: bool) -> None:
        self.write = write

    def begin(self, sock: socket.socket, plan: CopyPlan, deadline: float) -> None:
        stall = _client_stall(sock, deadline)
        stall()
        _request(sock, wire.OP_WRITE if self.write else wire.OP_READ, plan, stall)
        _expect_ok(sock, stall)

    def finish(self, sock: socket.socket, plan: CopyPlan, deadline: float) -> None:
        stall = _client_stall(sock, deadline)
        addrs, sizes = plan.ranges()
        if self.write:
            wire.send(sock, addrs, sizes, stall)
            _expect_ok(sock, stall)
        else:
            wire.recv(sock, addrs, sizes, stall)


READ, WRITE = _Op(write=False), _Op(write=True)


# One large transfer is spread over several data connections at once (byte-balanced parts of at least
# STREAM_MIN_BYTES), so the sending and receiving sides' kernel work overlaps on the cores the machine has. How
# many follows from the cores: a stream keeps one thread busy at each end, so between two hosts each host gives
# it one core (one stream per core), while with both ends on this machine (loopback, containers or namespaces of
# one host: the same boot id) every stream costs two of this machine's cores, and more streams than half the
# cores only make the four threads of two streams take turns on two cores (measured on 2-core hosts, alternating
# runs: one stream moved 1.2-1.35 x the bytes of two at 16 KiB-1 MiB). LLM_DATADIST_TCP_STREAMS overrides both.
_ENV_STREAMS = os.environ.get("LLM_DATADIST_TCP_STREAMS", "")
_STREAMS_OVERRIDE = int(_ENV_STREAMS) if _ENV_STREAMS.isdigit() and int(_ENV_STREAMS) > 0 else 0
STREAMS_PER_TRANSFER = _STREAMS_OVERRIDE or max(1, min(MAX_CONNS_PER_CHANNEL, parallel.COPY_THREADS))
STREAMS_SAME_MACHINE = _STREAMS_OVERRIDE or max(1, min(MAX_CONNS_PER_CHANNEL, parallel.COPY_THREADS // 2))
STREAM_MIN_BYTES = 2 << 20


def streams_per_transfer(same_machine: bool) -> int:
    """Data connections one large transfer uses, with the peer on this machine or on another host."""
    return STREAMS_SAME_MACHINE if same_machine else STREAMS_PER_TRANSFER


def _wanted_streams(plan: CopyPlan, streams: int) -> int:
    return max(1, min(streams, len(plan), plan.total_bytes // STREAM_MIN_BYTES))


def _streams(plan: CopyPlan, parts: int) -> List[List[CopyPlan]]:
    """The plan in ``parts`` byte-balanced parts, each cut into frames of at most MAX_OPS ops."""
    n = len(plan)
    edges = plan.cuts(parts)
    out: List[List[CopyPlan]] = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b - a <= wire.MAX_OPS and (a, b) == (0, n):
            out.append([plan])
        else:
            out.append([plan.part(c, min(c + wire.MAX_OPS, b)) for c in range(a, b, wire.MAX_OPS)])
    return out


def _transfer(channel: TcpChannel, plan: CopyPlan, deadline: float, op: _Op) -> None:
    """Spread the plan over the connections it can have at once, begin every frame, then move the data.

    Every frame is begun (the server admitted and checked it) before any data moves, so a refused frame means
    no byte of the transfer moved. A transfer waits for its first connection only; further streams come from
    what the pool has at once, so concurrent transfers never wait on each other for connections.
    """
    socks = [channel.acquire(deadline)]
    reusable = [False]
    try:
        for _ in range(_wanted_streams(plan, channel.streams) - 1):
            extra = channel.try_acquire(deadline)
            if extra is None:
                break
            socks.append(extra)
            reusable.append(False)
        streams = _streams(plan, len(socks))
        for sock, frames in zip(socks, streams):
            op.begin(sock, frames[0], deadline)
        jobs = [(lambda k=k: _finish(op, socks[k], streams[k], deadline, reusable, k)) for k in range(len(socks))]
        if len(jobs) == 1:
            jobs[0]()
        else:
            parallel.run_parallel(jobs)
    except _BadFrame:
        raise
    except RemoteRejected:
        if len(socks) == 1 and not any(reusable):
            reusable[0] = True  # refused before any data: the stream is still in step
        raise
    except TransportClosed as exc:
        if _timed_out(exc):
            raise TransferTimeout("tcp transfer deadline passed (TLS)") from exc
        raise
    except (OSError, ValueError, struct.error) as exc:
        if _timed_out(exc):
            raise TransferTimeout("tcp transfer deadline passed (TLS)") from exc
        raise TransportClosed(f"tcp transfer failed: {exc}") from exc
    finally:
        for sock, ok in zip(socks, reusable):
            channel.release(sock, ok)


def _finish(op: _Op, sock: socket.socket, frames: List[CopyPlan], deadline: float, reusable: List[bool],
            k: int) -> None:
    """The data of the first (begun) frame, then the later frames of this stream one after another."""
    try:
        op.finish(sock, frames[0], deadline)
        for frame in frames[1:]:
            op.begin(sock, frame, deadline)
            op.finish(sock, frame, deadline)
        reusable[k] = True
    except (OSError, ValueError, struct.error) as exc:
        raise TransportClosed(f"tcp transfer failed: {exc}") from exc


class TcpTransport(Transport):
    """Cross-host (and fallback) transport over TCP; the serving side checks every request.

    ``grant`` issues a fresh token per link (sent to the peer only over the authenticated control
    connection) and ``revoke`` withdraws it at unlink, closing its connections.
    """

    name = "tcp"
    priority = 10
    caps = Capabilities(memory_kinds=frozenset({HOST}), locality=NETWORK, one_sided=False)

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        parallel.acquire_helpers()  # the streams of one large transfer run on the helper threads
        self._readable = ranges.RangeTable()
        self._writable = ranges.RangeTable()
        self._lock = threading.Lock()
        self._channels: Set[TcpChannel] = set()
        self._server: Optional[DataServer] = DataServer(ctx.bind_host, self._readable, self._writable, ctx.guards,
                                                        ctx.tls)
        logger.debug("tcp data server on %s:%d", ctx.bind_host, self._server.port)

    @property
    def port(self) -> int:
        """The data server's port."""
        return self._server.port if self._server is not None else 0

    @property
    def server(self) -> Optional[DataServer]:
        return self._server

    def register(self, region: Region) -> bytes:
        """Let peers read (and, for writable regions, write) the region through our data server.

        Read-only regions that are not cache memory (the guard table) are never served.
        """
        if region.writable:
            self._writable.add(region.addr, region.nbytes)
            self._readable.add(region.addr, region.nbytes)
        elif region.segment is None or region.addr != getattr(self.ctx.guards, "addr", None):
            self._readable.add(region.addr, region.nbytes)
        return b""

    def deregister(self, region: Region) -> None:
        """Stop serving the region; waits for requests already admitted against it to finish."""
        removed = self._readable.remove(region.addr, region.nbytes)
        if region.writable:
            self._writable.remove(region.addr, region.nbytes)
        if removed and self._server is not None:
            self._server.fence(time.monotonic() + 30.0)

    def local_info(self) -> bytes:
        """Descriptor: ``<4sH`` = (b"TCP2", data server port)."""
        return _DESC.pack(_DESC_MAGIC, self.port)

    def grant(self, link_id: int) -> bytes:
        """A fresh 32-byte token for link ``link_id``: the peer's key to our data server."""
        if self._server is None:
            return b""
        token = os.urandom(wire.TOKEN_BYTES)
        self._server.add_token(token, link_id)
        return token

    def revoke(self, link_id: int) -> None:
        if self._server is not None:
            self._server.revoke(link_id)

    def fence(self, deadline: float) -> None:
        if self._server is not None:
            self._server.fence(deadline)

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Open a first authenticated connection to ``peer.address`` and the advertised port.

        Raises:
            ConnectFailed: bad descriptor, no credential for this link, unreachable peer, refused token.
        """
        if self._server is None:
            raise ConnectFailed("tcp transport is closed")
        port = data_port_of(peer.descriptor)
        if port is None:
            raise ConnectFailed("not a tcp descriptor")
        if len(peer.credential) != wire.TOKEN_BYTES:
            raise ConnectFailed("the peer granted no data-plane token for this link")
        streams = streams_per_transfer(same_machine(self.ctx.host_id, peer.host_id))
        channel = TcpChannel(peer, port, peer.credential, tls_config=self.ctx.tls, streams=streams)
        try:
            sock = channel.open_connection(deadline)
        except TransferTimeout as exc:
            raise ConnectFailed(str(exc)) from exc
        with channel._cond:
            channel._all.add(sock)
        channel.release(sock, True)
        with self._lock:
            self._channels.add(channel)
        return channel

    def _run(self, channel: Channel, plan: CopyPlan, deadline: float, op: _Op) -> None:
        if self._server is None:
            raise TransportClosed("tcp transport is closed")
        if not isinstance(channel, TcpChannel):
            raise ConnectFailed("not a tcp channel")
        if time.monotonic() > deadline:
            raise TransferTimeout("deadline passed before the transfer")
        _transfer(channel, plan.merged(), deadline, op)

    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Pull peer ``plan.remote[i]`` into local ``plan.local[i]``: one request frame per batch.

        Args:
            channel: From ``connect``; several threads may use it at once.
            plan: The copies; the peer's server re-validates every remote range.
            deadline: ``time.monotonic()`` value enforced with socket timeouts.

        Raises:
            RemoteRejected: the peer refused a range (outside its registered memory).
            TransferTimeout: the deadline passed (e.g. the peer is stopped).
            TransportClosed: the peer went away or the channel/transport was closed.
        """
        self._run(channel, plan, deadline, READ)

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Push local ``plan.local[i]`` to peer ``plan.remote[i]``; returns once the peer has the bytes.

        Args and errors as :meth:`read`.
        """
        self._run(channel, plan, deadline, WRITE)

    def disconnect(self, channel: Channel) -> None:
        """Close the channel's connections (idempotent)."""
        channel.close()
        with self._lock:
            self._channels.discard(channel)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop the data server, join its threads, close every channel (idempotent)."""
        with self._lock:
            server, self._server = self._server, None
            channels, self._channels = list(self._channels), set()
        for channel in channels:
            channel.close()
        if server is not None:
            server.close()
            self._readable.clear()
            self._writable.clear()
            parallel.release_helpers()
