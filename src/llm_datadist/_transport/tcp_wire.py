"""TCP wire format: struct-packed frame headers, deadlines via socket timeouts, scatter send/recv."""
from __future__ import annotations

import ctypes
import socket
import ssl
import struct
from typing import Callable, List, Tuple

from llm_datadist._transport import scatter, tls
from llm_datadist._transport.base import RemoteRejected, TransportClosed

PROTOCOL_VERSION = 3
# Changelog: 1 - HELLO/READ/WRITE/REPLY frames, (addr, len) uint64 pairs, two-phase writes.
#            2 - per-link tokens in HELLO; READ/WRITE carry generation guards ((slot, value) uint64 pairs)
#                before their ranges, checked by the server after it admitted the request.
#            3 - the HELLO reply's count is the server's idle limit in ms (0: none): each request frame, and
#                progress of its data, must come within it or the connection closes; a link's connections
#                beyond the server's per-link cap get ST_REJECTED to their HELLO.
_MAGIC = b"LDT1"
HDR = struct.Struct("<4sBBHIIQ")  # magic, version, op, status, count, guard count, nbytes
OP_HELLO, OP_READ, OP_WRITE, OP_REPLY = 1, 2, 3, 4
ST_OK, ST_REJECTED, ST_BAD_FRAME, ST_STALE = 0, 1, 2, 3
TOKEN_BYTES = 32
MAX_OPS = 1 << 20  # ranges per request frame (16 MiB of descriptors)
MAX_GUARDS = 1024
SOCK_BUF_BYTES = 4 << 20
IO_CHUNK_BYTES = 1 << 20


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO and SO_SNDTIMEO: a blocked call returns EAGAIN after ``seconds``."""
    seconds = min(max(seconds, 0.001), 86400.0)
    tv = struct.pack("ll", int(seconds), int((seconds % 1.0) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def set_buffers(sock: socket.socket) -> None:
    """Large SO_SNDBUF/SO_RCVBUF; call before connect/listen so the window scale matches."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        if SOCK_BUF_BYTES:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF_BYTES)
            except OSError:
                pass


def tune(sock: socket.socket) -> None:
    """Blocking mode (deadlines come from set_timeouts) and TCP_NODELAY."""
    sock.settimeout(None)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(address: Tuple[str, int], timeout: float) -> socket.socket:
    """A connected, tuned socket (buffers sized before the handshake). Raises OSError."""
    error: OSError = OSError(f"no address for {address}")
    for family, kind, proto, _, addr in socket.getaddrinfo(address[0], address[1], 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            set_buffers(sock)
            sock.settimeout(timeout)
            sock.connect(addr)
            tune(sock)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def header(op: int, status: int = ST_OK, count: int = 0, nbytes: int = 0, guards: int = 0) -> bytes:
    """One frame header."""
    return HDR.pack(_MAGIC, PROTOCOL_VERSION, op, status, count, guards, nbytes)


def send(sock: socket.socket, addrs: List[int], sizes: List[int], stall: Callable[[], None]) -> None:
    """Send raw ranges (Python ints) with sendmsg batches (a TLS socket: one record write per range)."""
    op = _tls_send(sock) if isinstance(sock, ssl.SSLSocket) else sock.sendmsg
    scatter.scatter_io(op, addrs, sizes, stall, IO_CHUNK_BYTES)


def recv(sock: socket.socket, addrs: List[int], sizes: List[int], stall: Callable[[], None]) -> None:
    """Receive straight into raw ranges (Python ints) with recvmsg_into(MSG_WAITALL) batches (TLS: recv_into
    per range)."""
    if isinstance(sock, ssl.SSLSocket):
        scatter.scatter_io(_tls_recv(sock), addrs, sizes, stall, IO_CHUNK_BYTES)
        return

    def op(chunk: List[memoryview]) -> int:
        return sock.recvmsg_into(chunk, 0, socket.MSG_WAITALL)[0]

    scatter.scatter_io(op, addrs, sizes, stall, IO_CHUNK_BYTES)


def _tls_send(sock: ssl.SSLSocket) -> Callable[[List[memoryview]], int]:
    """A scatter op for TLS (no sendmsg): the ranges in turn, stopping at the first partial write."""
    def op(chunk: List[memoryview]) -> int:
        total = 0
        for view in chunk:
            n = sock.send(view)
            total += n
            if n < len(view):
                break
        return total

    return op


def _tls_recv(sock: ssl.SSLSocket) -> Callable[[List[memoryview]], int]:
    def op(chunk: List[memoryview]) -> int:
        total = 0
        for view in chunk:
            n = sock.recv_into(view)
            total += n
            if n < len(view):
                break
        return total

    return op


def address_of(buf: bytearray) -> int:
    """The address of a non-empty bytearray's bytes, for the scatter calls (valid while ``buf`` lives)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def send_bytes(sock: socket.socket, data: bytes, stall: Callable[[], None]) -> None:
    """Send a small bytes object (no numpy: the request frames of small transfers go this way)."""
    _move_exact(sock.send, memoryview(data), stall)


def recv_bytes(sock: socket.socket, nbytes: int, stall: Callable[[], None]) -> bytes:
    """Receive exactly ``nbytes`` (no numpy)."""
    return bytes(recv_buffer(sock, nbytes, stall))


def recv_buffer(sock: socket.socket, nbytes: int, stall: Callable[[], None]) -> bytearray:
    """Receive exactly ``nbytes`` into a new bytearray (returned as it is, no copy)."""
    buf = bytearray(nbytes)
    if isinstance(sock, ssl.SSLSocket):
        _move_exact(sock.recv_into, memoryview(buf), stall)
    else:
        _move_exact(lambda view: sock.recv_into(view, len(view), socket.MSG_WAITALL), memoryview(buf), stall)
    return buf


def _move_exact(move: Callable[[memoryview], int], view: memoryview, stall: Callable[[], None]) -> None:
    """Call ``move`` on what is left of ``view`` until all of it moved: the loop of the one-buffer helpers,
    with :func:`scatter.scatter_io`'s rules (a timeout or a partial move calls ``stall``, 0 bytes is a closed
    peer); a plain loop, several µs cheaper per call than a one-range scatter."""
    done = 0
    while done < len(view):
        try:
            n = move(view[done:])
        except tls.WOULD_BLOCK:
            stall()
            continue
        except OSError as exc:
            raise TransportClosed(f"connection lost: {exc}") from exc
        if n <= 0:
            raise TransportClosed("connection closed by peer")
        done += n
        if done < len(view):
            stall()


def parse_header(data: bytes) -> tuple:
    """``(op, status, count, guards, nbytes)`` of a frame header; RemoteRejected on bad magic or version."""
    magic, version, op, status, count, guards, nbytes = HDR.unpack(data)
    if magic != _MAGIC or version != PROTOCOL_VERSION:
        raise RemoteRejected(f"bad frame (magic {magic!r}, version {version})")
    return op, status, count, guards, nbytes


def recv_header(sock: socket.socket, stall: Callable[[], None]) -> tuple:
    """``(op, status, count, guards, nbytes)`` of the next frame."""
    return parse_header(recv_bytes(sock, HDR.size, stall))
