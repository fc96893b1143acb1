"""Raw wire clients: a control link made by hand (to forge, fuzz and inspect frames) and a tcp data connection.

These speak the library's wire formats directly (the frame layouts of ``_engine.protocol`` and
``_transport.tcp_wire``), so tests can send what a well-behaved client never would.
"""
from __future__ import annotations

import itertools
import selectors
import socket
import struct
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from llm_datadist._engine import protocol as proto
from llm_datadist._transport import tcp_wire as dwire

TCP_DESC = struct.Struct("<4sH")  # the tcp transport's descriptor in HelloAck.transports: magic, data port


def hello(cluster_id: int, ra: bool = False, target: Optional[int] = None, nonce: bytes = b"",
          host_id: str = "raw-client-host", **fields) -> proto.Hello:
    """A Hello from a client that offers no transport of its own (nothing can be routed back to it)."""
    return proto.Hello(protocol_version=proto.PROTOCOL_VERSION, cluster_id=cluster_id, role=2, host_id=host_id,
                       pid=1, remote_cache_accessible=ra, transports={}, target_cluster_id=target,
                       client_nonce=nonce, **fields)


def frame(msg, request_id: int = 0, reply: bool = False) -> bytes:
    return proto.encode(msg, request_id, is_reply=reply)


def recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    """Blocking read of ``nbytes`` (the socket's timeout bounds it); ConnectionError on EOF."""
    chunks = []
    while nbytes:
        chunk = sock.recv(nbytes)
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        nbytes -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> Tuple[proto.FrameHeader, object, bytes]:
    """(header, message, raw frame bytes) of the next control frame on a blocking socket."""
    head = recv_exactly(sock, proto.HEADER_SIZE)
    header = proto.parse_header(head)
    body = recv_exactly(sock, header.length) if header.length else b""
    return header, proto.decode_body(header, body), head + body


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes ``sock`` within ``timeout`` (bytes it sends meanwhile are read and dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except OSError:  # reset
            return True


class Refused(Exception):
    """The server refused the handshake; ``ack`` is its HelloAck or AuthResult, ``raw`` the frames received."""

    def __init__(self, ack, raw: bytes) -> None:
        super().__init__(f"handshake refused: {ack}")
        self.ack = ack
        self.raw = raw


class RawLink:
    """A control link made by hand: Hello [-> auth] -> HelloAck, then the Credentials request.

    A reader thread completes calls and answers the server's requests (Ping, notices) with Ack and
    ``ConfirmDial`` with whether the nonce is in ``vouch_for``, unless ``answer=False`` (then the link looks
    dead to a ping). ``received`` keeps every raw handshake byte.
    """

    def __init__(self, port: int, cluster_id: int, *, ra: bool = False, secret: Optional[bytes] = None,
                 target: Optional[int] = None, answer: bool = True, host: str = "127.0.0.1",
                 timeout: float = 5.0, dial_nonce: Optional[bytes] = None) -> None:
        self.dial_nonce = proto.make_nonce() if dial_nonce is None else dial_nonce
        self.vouch_for: set = set()  # dial nonces this client says it is making when the server asks
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cluster_id = cluster_id
        self.answer = answer
        self.received = b""
        self._ids = itertools.count(1)
        self._waiters: Dict[int, list] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.closed = threading.Event()
        try:
            self.ack = self._handshake(ra, secret, target)
        except BaseException:
            self.sock.close()
            raise
        self.token: bytes = self.ack.credentials.get("tcp", b"")
        self.data_port = 0
        if "tcp" in self.ack.transports:
            magic, self.data_port = TCP_DESC.unpack(self.ack.transports["tcp"])
            assert magic == b"TCP2", magic
        self.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read, name="raw-link-reader", daemon=True)
        self._reader.start()
        self.call(proto.Credentials(credentials={}))

    def _handshake(self, ra: bool, secret: Optional[bytes], target: Optional[int]) -> proto.HelloAck:
        nonce = proto.make_nonce() if secret else b""
        self.sock.sendall(frame(hello(self.cluster_id, ra, target, nonce, dial_nonce=self.dial_nonce)))
        _h, msg, raw = read_frame(self.sock)
        self.received += raw
        server_nonce = b""
        if isinstance(msg, proto.AuthChallenge):  # we prove first; the server's proof comes in its HelloAck
            server_nonce = msg.server_nonce
            proof = proto.client_proof(secret, server_nonce, nonce)
            self.sock.sendall(frame(proto.AuthProof(client_proof=proof)))
            _h, msg, raw = read_frame(self.sock)
            self.received += raw
        if not isinstance(msg, proto.HelloAck) or msg.code != 0:
            raise Refused(msg, self.received)
        if secret:
            assert msg.server_proof == proto.server_proof(secret, nonce, server_nonce), "server proof"
        return msg

    def _read(self) -> None:
        self.sock.settimeout(None)
        try:
            while True:
                header, msg, _raw = read_frame(self.sock)
                if header.is_reply:
                    with self._lock:
                        waiter = self._waiters.pop(header.request_id, None)
                    if waiter is not None:
                        waiter.append(msg)
                        waiter[0].set()
                elif header.request_id and self.answer:
                    reply = (proto.DialConfirmed(dialing=msg.dial_nonce in self.vouch_for)
                             if isinstance(msg, proto.ConfirmDial) else proto.Ack())
                    self.send(frame(reply, header.request_id, reply=True))
        except (OSError, ConnectionError, proto.ProtocolError):
            pass
        finally:
            self.closed.set()
            with self._lock:
                waiters, self._waiters = self._waiters, {}
            for waiter in waiters.values():
                waiter[0].set()

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def call(self, msg, timeout: float = 5.0):
        """Send a request and return the reply message (an Error reply is returned, not raised)."""
        request_id = next(self._ids)
        waiter: list = [threading.Event()]
        with self._lock:
            self._waiters[request_id] = waiter
        self.send(frame(msg, request_id))
        if not waiter[0].wait(timeout):
            raise TimeoutError(f"no reply to {type(msg).__name__}")
        if len(waiter) < 2:
            raise ConnectionError("link closed before the reply")
        return waiter[1]

    def blocks_view(self, server_cluster: int, model_id: int = 0) -> proto.CacheView:
        view = self.call(proto.Resolve(kind="blocks", cluster_id=server_cluster, model_id=model_id))
        assert isinstance(view, proto.CacheView), view
        return view

    def unlink(self) -> None:
        """The orderly unlink: Unlink -> Ack, then close (what LinkManager.unlink does)."""
        reply = self.call(proto.Unlink(cluster_id=self.cluster_id))
        assert isinstance(reply, proto.Ack), reply
        self.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.closed.wait(5)
        self._reader.join(5)


def one_shot(port: int, cases: Sequence[Tuple[bytes, bool]], timeout: float = 5.0) -> List[bool]:
    """Send each case's bytes on its own new connection, all at once; which ones the server closed in time.

    A case is (bytes, half_close): with ``half_close`` our side shuts its write half after sending (the server
    sees the end of the stream at once); without it the server must drop the connection on its own.
    """
    socks: List[socket.socket] = []
    try:
        for data, half_close in cases:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            socks.append(sock)
            try:
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:  # already reset by the server: it dropped the frame, which is fine
                pass
        deadline = time.monotonic() + timeout
        closed = [False] * len(socks)
        sel = selectors.DefaultSelector()
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, i)
        while not all(closed) and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                try:
                    gone = not key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    gone = True
                if gone:
                    closed[key.data] = True
                    sel.unregister(key.fileobj)
        sel.close()
        return closed
    finally:
        for sock in socks:
            sock.close()


# -- tcp data plane --------------------------------------------------------------------------------------
def data_header(op: int, count: int = 0, nbytes: int = 0, guards: int = 0, status: int = 0,
                version: int = dwire.PROTOCOL_VERSION, magic: bytes = b"LDT1") -> bytes:
    return dwire.HDR.pack(magic, version, op, status, count, guards, nbytes)


def request_frame(op: int, ranges: Sequence[Tuple[int, int]], guards: Sequence[Tuple[int, int]] = (),
                  nbytes: Optional[int] = None) -> bytes:
    pairs = np.array(list(guards) + list(ranges), dtype=np.uint64).reshape(-1, 2)
    total = sum(int(size) for _a, size in ranges) % (1 << 64) if nbytes is None else nbytes
    return data_header(op, len(ranges), total, len(guards)) + pairs.tobytes()


class DataConn:
    """One tcp data-plane connection; ``hello()`` authenticates it with a token."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def hello(self, token: bytes) -> bool:
        """Send HELLO with ``token``; True when the server answers OK, False when it closes the connection."""
        self.sock.sendall(data_header(dwire.OP_HELLO, nbytes=len(token)) + token)
        try:
            op, status, _c, _g, _n = dwire.parse_header(recv_exactly(self.sock, dwire.HDR.size))
        except (ConnectionError, OSError):
            return False
        return op == dwire.OP_REPLY and status == dwire.ST_OK

    def reply(self) -> Tuple[int, int]:
        op, status, _c, _g, nbytes = dwire.parse_header(recv_exactly(self.sock, dwire.HDR.size))
        assert op == dwire.OP_REPLY, op
        return status, nbytes

    def read(self, ranges: Sequence[Tuple[int, int]], guards: Sequence[Tuple[int, int]] = (),
             nbytes: Optional[int] = None) -> Tuple[int, bytes]:
        """A READ request: (status, the bytes that came back: all of them when OK, none otherwise)."""
        self.sock.sendall(request_frame(dwire.OP_READ, ranges, guards, nbytes))
        status, size = self.reply()
        data = recv_exactly(self.sock, size) if status == dwire.ST_OK and size else b""
        return status, data

    def write(self, ranges: Sequence[Tuple[int, int]], payload: bytes,
              guards: Sequence[Tuple[int, int]] = ()) -> int:
        """A WRITE request; the payload goes out only after the server's go-ahead. Returns the final status."""
        self.sock.sendall(request_frame(dwire.OP_WRITE, ranges, guards))
        status, _ = self.reply()
        if status != dwire.ST_OK:
            return status
        self.sock.sendall(payload)
        return self.reply()[0]

    def close(self) -> None:
        self.sock.close()


def guard_of(view: proto.CacheView) -> List[Tuple[int, int]]:
    """The (slot, value) guard pair a request about ``view``'s cache carries."""
    slot, value, _addr = view.guard
    return [(slot, value)]
