"""TCP transport: a data server thread answers batched reads/writes of registered memory, zero-copy views."""
from __future__ import annotations

import collections
import hmac
import logging
import os
import socket
import struct
import threading
import time
from typing import Callable, List, Optional, Set

import numpy as np

from llm_datadist._transport import iov
from llm_datadist._transport import tcp_wire as wire
from llm_datadist._transport.base import (
    Channel,
    ConnectFailed,
    CopyPlan,
    PeerInfo,
    Region,
    RemoteRejected,
    TransferTimeout,
    Transport,
    TransportClosed,
    TransportContext,
    TransportError,
)

logger = logging.getLogger(__name__)

_DESC = struct.Struct("<4sH32s")  # magic, port, token
_DESC_MAGIC = b"TCP1"
SERVER_POLL_S = 0.5
HELLO_TIMEOUT_S = 5.0
MAX_CONNS_PER_CHANNEL = 8
MAX_SERVER_CONNS = 256


class _Stop(Exception):
    """Internal: the server is stopping."""


class _Server:
    """The data server: accepts token-authenticated connections, serves READ/WRITE frames."""

    def __init__(self, host: str, table: iov.RangeTable, token: bytes) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wire.set_buffers(self._listener)  # inherited by accepted connections
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.settimeout(SERVER_POLL_S)
        self.port = self._listener.getsockname()[1]
        self._table = table
        self._token = token
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._conns: Set[socket.socket] = set()
        self._threads: Set[threading.Thread] = set()
        self._version = 0
        self._active: collections.Counter = collections.Counter()
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"tcp-data-{self.port}",
                                               daemon=True)
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with self._lock:
                if self._stop.is_set() or len(self._conns) >= MAX_SERVER_CONNS:
                    sock.close()
                    continue
                thread = threading.Thread(target=self._serve, args=(sock,), name="tcp-data-conn", daemon=True)
                self._conns.add(sock)
                self._threads.add(thread)
            try:
                thread.start()
            except RuntimeError:  # cannot start a thread: drop this connection only
                with self._lock:
                    self._conns.discard(sock)
                    self._threads.discard(thread)
                sock.close()

    def _stall(self) -> None:
        if self._stop.is_set():
            raise _Stop()

    def _hello(self, sock: socket.socket) -> bool:
        deadline = time.monotonic() + HELLO_TIMEOUT_S

        def stall() -> None:
            self._stall()
            if time.monotonic() > deadline:
                raise _Stop()

        op, _, count, nbytes = wire.recv_header(sock, stall)
        if op != wire.OP_HELLO or nbytes != wire.TOKEN_BYTES:
            return False
        token = bytes(wire.recv_bytes(sock, wire.TOKEN_BYTES, stall))
        if not hmac.compare_digest(token, self._token):
            return False
        wire.send_bytes(sock, wire.header(wire.OP_REPLY), stall)
        return True

    def _serve(self, sock: socket.socket) -> None:
        try:
            wire.tune(sock)
            wire.set_timeouts(sock, SERVER_POLL_S)
            if not self._hello(sock):
                return
            while self._serve_one(sock):
                pass
        except (_Stop, TransportError, OSError, ValueError, struct.error):
            pass
        except Exception:  # noqa: BLE001 - a bad connection must never kill the server
            logger.debug("tcp data connection failed", exc_info=True)
        finally:
            with self._lock:
                self._conns.discard(sock)
                self._threads.discard(threading.current_thread())
            sock.close()

    def _serve_one(self, sock: socket.socket) -> bool:
        """Serve one request frame; False closes the connection."""
        op, _, count, nbytes = wire.recv_header(sock, self._stall)
        if op not in (wire.OP_READ, wire.OP_WRITE) or count > wire.MAX_OPS:
            wire.send_bytes(sock, wire.header(wire.OP_REPLY, wire.ST_BAD_FRAME), self._stall)
            return False
        ranges = np.empty((count, 2), dtype=np.uint64)
        if count:
            wire.recv(sock, *wire.one(ranges), self._stall)
        addrs, sizes = ranges[:, 0].copy(), ranges[:, 1].copy()
        version = self._begin()
        try:
            if not self._table.contains(addrs, sizes):
                wire.send_bytes(sock, wire.header(wire.OP_REPLY, wire.ST_REJECTED), self._stall)
                return True
            if int(sizes.sum()) != nbytes:
                wire.send_bytes(sock, wire.header(wire.OP_REPLY, wire.ST_BAD_FRAME), self._stall)
                return False
            if op == wire.OP_READ:
                wire.send_bytes(sock, wire.header(wire.OP_REPLY, wire.ST_OK, count, nbytes), self._stall)
                wire.send(sock, addrs, sizes, self._stall)
            else:
                wire.send_bytes(sock, wire.header(wire.OP_REPLY), self._stall)
                wire.recv(sock, addrs, sizes, self._stall)
                wire.send_bytes(sock, wire.header(wire.OP_REPLY), self._stall)
            return True
        finally:
            self._end(version)

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

    def quiesce(self, timeout: float = 30.0) -> None:
        """Wait until requests validated before now have finished (after a deregistration)."""
        with self._lock:
            self._version += 1
            barrier = self._version
            self._lock.wait_for(lambda: all(v >= barrier for v in self._active), timeout)

    def close(self) -> None:
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        except OSError:
            pass
        self._listener.close()
        self._accept_thread.join(5.0)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(5.0)


class TcpChannel(Channel):
    """A pool of authenticated connections to one peer's data server; safe for concurrent use."""

    def __init__(self, peer: PeerInfo, port: int, token: bytes, max_conns: int = MAX_CONNS_PER_CHANNEL) -> None:
        super().__init__(peer)
        self.address = (peer.address or "127.0.0.1", port)
        self._token = token
        self._max = max_conns
        self._cond = threading.Condition()
        self._idle: List[socket.socket] = []
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
        except socket.timeout as exc:
            raise TransferTimeout(f"connect to {self.address} timed out") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.address}: {exc}") from exc
        try:
            stall = _client_stall(sock, deadline)
            stall()
            wire.send_bytes(sock, wire.header(wire.OP_HELLO, nbytes=wire.TOKEN_BYTES) + self._token, stall)
            op, status, _, _ = wire.recv_header(sock, stall)
            if op != wire.OP_REPLY or status != wire.ST_OK:
                raise ConnectFailed("peer refused the connection")
        except TransferTimeout:
            sock.close()
            raise
        except (TransportError, OSError) as exc:
            sock.close()
            raise ConnectFailed(f"handshake with {self.address} failed: {exc}") from exc
        return sock

    def acquire(self, deadline: float) -> socket.socket:
        """An idle connection, a new one (up to the pool size), or wait for one to be released."""
        with self._cond:
            while True:
                if self.closed:
                    raise TransportClosed("tcp channel is closed")
                if self._idle:
                    return self._idle.pop()
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

    def release(self, sock: socket.socket, reusable: bool) -> None:
        """Return a connection to the pool, or close it when its stream state is unknown."""
        with self._cond:
            if reusable and not self.closed and sock in self._all:
                self._idle.append(sock)
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
            self._cond.notify_all()
        for sock in idle:
            sock.close()
        for sock in busy:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _client_stall(sock: socket.socket, deadline: float) -> Callable[[], None]:
    def stall() -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferTimeout("tcp transfer deadline passed")
        wire.set_timeouts(sock, remaining)

    return stall


def _request(sock: socket.socket, op: int, plan: CopyPlan, stall: Callable[[], None]) -> None:
    ranges = np.empty((len(plan), 2), dtype=np.uint64)
    ranges[:, 0] = plan.remote
    ranges[:, 1] = plan.sizes
    head = np.frombuffer(wire.header(op, wire.ST_OK, len(plan), plan.total_bytes), dtype=np.uint8)
    addrs = np.array([head.ctypes.data, ranges.ctypes.data], dtype=np.uint64)
    wire.send(sock, addrs, np.array([wire.HDR.size, ranges.nbytes], dtype=np.uint64), stall)


def _expect_ok(sock: socket.socket, stall: Callable[[], None]) -> None:
    op, status, _, _ = wire.recv_header(sock, stall)
    if op != wire.OP_REPLY:
        raise TransportClosed(f"unexpected frame op {op}")
    if status == wire.ST_REJECTED:
        raise RemoteRejected("range outside the peer's registered memory")
    if status != wire.ST_OK:
        raise _BadFrame(f"peer rejected the frame (status {status})")


class _BadFrame(RemoteRejected):
    """The peer rejected the frame and closes the connection."""


def read_once(sock: socket.socket, plan: CopyPlan, deadline: float) -> None:
    """One READ request on one connection: request, status, then data into local memory."""
    stall = _client_stall(sock, deadline)
    stall()
    _request(sock, wire.OP_READ, plan, stall)
    _expect_ok(sock, stall)
    wire.recv(sock, plan.local, plan.sizes, stall)


def write_once(sock: socket.socket, plan: CopyPlan, deadline: float) -> None:
    """One WRITE request: request, go-ahead, data from local memory, completion."""
    stall = _client_stall(sock, deadline)
    stall()
    _request(sock, wire.OP_WRITE, plan, stall)
    _expect_ok(sock, stall)
    wire.send(sock, plan.local, plan.sizes, stall)
    _expect_ok(sock, stall)


class TcpTransport(Transport):
    """Cross-host (and fallback) transport over TCP with a per-instance data server thread."""

    name = "tcp"
    priority = 10

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        self._token = os.urandom(wire.TOKEN_BYTES)
        self._table = iov.RangeTable()
        self._lock = threading.Lock()
        self._channels: Set[TcpChannel] = set()
        self._server: Optional[_Server] = _Server(ctx.bind_host, self._table, self._token)
        logger.debug("tcp data server on %s:%d", ctx.bind_host, self._server.port)

    @property
    def port(self) -> int:
        """The data server's port."""
        return self._server.port if self._server is not None else 0

    def register(self, region: Region) -> None:
        """Let peers read and write the region through our data server.

        Args:
            region: Host memory range.
        """
        self._table.add(region.addr, region.nbytes)

    def deregister(self, region: Region) -> None:
        """Stop serving the region; waits for requests already validated against it to finish.

        Args:
            region: A region passed to ``register`` before; unknown regions are ignored.
        """
        if self._table.remove(region.addr, region.nbytes) and self._server is not None:
            self._server.quiesce()

    def local_info(self) -> bytes:
        """Descriptor: ``<4sH32s`` = (b"TCP1", data server port, 32-byte connection token)."""
        return _DESC.pack(_DESC_MAGIC, self.port, self._token)

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Open a first authenticated connection to ``peer.address`` and the advertised port.

        Args:
            peer: Handshake information; ``peer.descriptor`` is the peer's ``local_info()``.
            deadline: ``time.monotonic()`` value for the TCP connect and token exchange.

        Returns:
            A TcpChannel (a pool of up to 8 connections, opened on demand).

        Raises:
            ConnectFailed: bad descriptor, unreachable peer, refused token, or deadline passed.
        """
        if self._server is None:
            raise ConnectFailed("tcp transport is closed")
        desc = peer.descriptor
        if len(desc) != _DESC.size or desc[:4] != _DESC_MAGIC:
            raise ConnectFailed("not a tcp descriptor")
        _, port, token = _DESC.unpack(desc)
        channel = TcpChannel(peer, port, token)
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

    def _run(self, channel: Channel, plan: CopyPlan, deadline: float,
             once: Callable[[socket.socket, CopyPlan, float], None]) -> None:
        if self._server is None:
            raise TransportClosed("tcp transport is closed")
        if not isinstance(channel, TcpChannel):
            raise ConnectFailed("not a tcp channel")
        if time.monotonic() > deadline:
            raise TransferTimeout("deadline passed before the transfer")
        plan = plan.merged()
        for start in range(0, len(plan), wire.MAX_OPS):
            part = plan if len(plan) <= wire.MAX_OPS else CopyPlan(
                plan.local[start:start + wire.MAX_OPS], plan.remote[start:start + wire.MAX_OPS],
                plan.sizes[start:start + wire.MAX_OPS])
            sock = channel.acquire(deadline)
            reusable = False
            try:
                once(sock, part, deadline)
                reusable = True
            except _BadFrame:
                raise
            except RemoteRejected:
                reusable = True
                raise
            except (OSError, ValueError, struct.error) as exc:
                raise TransportClosed(f"tcp transfer failed: {exc}") from exc
            finally:
                channel.release(sock, reusable)

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
        self._run(channel, plan, deadline, read_once)

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Push local ``plan.local[i]`` to peer ``plan.remote[i]``; returns once the peer has the bytes.

        Args and errors as :meth:`read`.
        """
        self._run(channel, plan, deadline, write_once)

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
            self._table.clear()
