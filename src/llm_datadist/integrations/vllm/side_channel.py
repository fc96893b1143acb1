"""The connector's control channel: a TCP server in each prefill worker and a client per (decode, prefill) pair.

A closed connection means the peer is gone: the server hands that to its handler at once (the prefill then
frees every block the dead decode had claimed), the client fails its waiting calls.
"""
from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from typing import Callable, Dict, List, Optional

from llm_datadist.integrations.vllm import protocol as proto
from llm_datadist.integrations.vllm.config import connector_logger

__all__ = ["ServerHandler", "ServerConnection", "ControlServer", "ControlClient", "POLL_S"]

_log = connector_logger(__name__)
POLL_S = 0.2  # socket timeout of every blocking receive: how fast a stop request is noticed
_JOIN_S = 2.0


class ServerConnection:
    """One accepted decode connection; ``send`` may be called from any thread."""

    _ids = itertools.count(1)

    def __init__(self, sock: socket.socket, address) -> None:
        self.conn_id = next(self._ids)
        self.sock = sock
        self.address = address
        self.peer_cluster_id = 0
        self._send_lock = threading.Lock()

    def send(self, message: proto.Message) -> bool:
        """Send one message; False when the connection is already gone."""
        data = proto.encode(message)
        with self._send_lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def close(self) -> None:
        """Shut the socket down (the reader thread then ends)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"ServerConnection(#{self.conn_id} from {self.address}, cluster {self.peer_cluster_id})"


class ServerHandler:
    """What a prefill worker does with decode messages (every method runs on that connection's thread)."""

    def welcome(self) -> proto.Welcome:  # pragma: no cover - interface
        """The identity to send to a new client (its proof is filled in by the server)."""
        raise NotImplementedError

    def on_claim(self, conn: ServerConnection, message: proto.Claim) -> proto.ClaimReply:  # pragma: no cover
        """Bind a hold to the connection and answer with its blocks, or say why not."""
        raise NotImplementedError

    def on_release(self, conn: ServerConnection, message: proto.Release) -> None:  # pragma: no cover
        """The decode is done with these requests."""
        raise NotImplementedError

    def on_push_ready(self, conn: ServerConnection, message: proto.PushReady) -> None:  # pragma: no cover
        """A decode's destination blocks for a push."""
        raise NotImplementedError

    def on_closed(self, conn: ServerConnection) -> None:  # pragma: no cover
        """The connection is gone (the decode died or shut down)."""
        raise NotImplementedError


class ControlServer:
    """Accepts decode connections on ``host:port`` (0 = a free port) and runs each on its own daemon thread."""

    def __init__(self, host: str, port: int, secret: str, handler: ServerHandler, handshake_timeout_s: float) -> None:
        self._secret = secret
        self._handler = handler
        self._handshake_timeout_s = handshake_timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: Dict[int, ServerConnection] = {}
        self._threads: List[threading.Thread] = []
        self._sock = socket.create_server((host, port), reuse_port=False)
        self._sock.settimeout(POLL_S)
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        self._accepter = threading.Thread(target=self._accept_loop, name=f"llm-dd-vllm-accept-{self.port}",
                                          daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, address = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(POLL_S)
            conn = ServerConnection(sock, address)
            thread = threading.Thread(target=self._serve, args=(conn,), name=f"llm-dd-vllm-conn-{conn.conn_id}",
                                      daemon=True)
            with self._lock:
                if self._stop.is_set():
                    sock.close()
                    break
                self._conns[conn.conn_id] = conn
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _handshake(self, conn: ServerConnection, reader: proto.FrameReader) -> bool:
        nonce = os.urandom(16)
        conn.send(proto.Challenge(proto.PROTOCOL_VERSION, nonce))
        deadline = time.monotonic() + self._handshake_timeout_s
        hello = None
        while hello is None:
            if self._stop.is_set() or time.monotonic() > deadline:
                return False
            hello = reader.read()
        if not isinstance(hello, proto.Hello):
            raise proto.ProtocolError(f"expected Hello, got {type(hello).__name__}")
        ok, reason = proto.check_proof(proto.client_proof(self._secret, nonce), hello.proof)
        if ok and hello.version != proto.PROTOCOL_VERSION:
            ok, reason = False, f"protocol version {hello.version} is not {proto.PROTOCOL_VERSION}"
        if not ok:
            _log.warning("control channel: refused %s: %s", conn.address, reason)
            conn.send(proto.Refused(reason))
            return False
        conn.peer_cluster_id = hello.cluster_id
        welcome = self._handler.welcome()
        conn.send(proto.Welcome(welcome.cluster_id, welcome.datadist_host, welcome.datadist_port, welcome.geometry,
                                proto.server_proof(self._secret, hello.nonce)))
        return True

    def _serve(self, conn: ServerConnection) -> None:
        reader = proto.FrameReader(conn.sock)
        accepted = False
        try:
            accepted = self._handshake(conn, reader)
            while accepted and not self._stop.is_set():
                message = reader.read()
                if message is None:
                    continue
                self._dispatch(conn, message)
        except (ConnectionError, OSError) as exc:
            if accepted:
                _log.info("control channel: %r closed (%s)", conn, exc)
            else:
                _log.warning("control channel: handshake with %s failed: %s", conn.address, exc)
        finally:
            with self._lock:
                self._conns.pop(conn.conn_id, None)
            conn.close()
            try:
                conn.sock.close()
            except OSError:
                pass
            if accepted:
                self._handler.on_closed(conn)

    def _dispatch(self, conn: ServerConnection, message: proto.Message) -> None:
        if isinstance(message, proto.Claim):
            conn.send(self._handler.on_claim(conn, message))
        elif isinstance(message, proto.Release):
            self._handler.on_release(conn, message)
        elif isinstance(message, proto.PushReady):
            self._handler.on_push_ready(conn, message)
        else:
            raise proto.ProtocolError(f"unexpected {type(message).__name__} from a client")

    def close(self) -> None:
        """Stop accepting, close every connection and join the threads; idempotent."""
        self._stop.set()
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns.values())
            threads = list(self._threads)
        for conn in conns:
            conn.close()
        deadline = time.monotonic() + _JOIN_S
        for thread in [self._accepter] + threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


class ControlClient:
    """A decode worker's connection to one prefill worker.

    ``on_push_done`` and ``on_lost`` run on the reader thread. After a loss every waiting ``claim`` fails and
    the client stays dead (``alive`` is False): make a new one.
    """

    def __init__(self, host: str, port: int, secret: str, cluster_id: int, timeout_s: float,
                 on_push_done: Callable[[proto.PushDone], None],
                 on_lost: Callable[[ControlClient], None]) -> None:
        self.host = host
        self.port = port
        self._secret = secret
        self._cluster_id = cluster_id
        self._timeout_s = timeout_s
        self._on_push_done = on_push_done
        self._on_lost = on_lost
        self._sock: Optional[socket.socket] = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._waiting: Dict[int, List] = {}  # seq -> [event, reply or None]
        self._stop = threading.Event()
        self._reader: Optional[threading.Thread] = None
        self.alive = False
        self.welcome: Optional[proto.Welcome] = None

    def connect(self) -> proto.Welcome:
        """Connect and authenticate; returns the prefill's Welcome.

        Raises:
            ConnectionError: the prefill is unreachable, refused the handshake, or failed to prove the secret.
        """
        sock = socket.create_connection((self.host, self.port), timeout=self._timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = proto.FrameReader(sock)
            challenge = self._expect(reader, proto.Challenge)
            nonce = os.urandom(16)
            sock.sendall(proto.encode(proto.Hello(proto.PROTOCOL_VERSION, self._cluster_id, nonce,
                                                  proto.client_proof(self._secret, challenge.nonce))))
            welcome = self._expect(reader, proto.Welcome)
            ok, reason = proto.check_proof(proto.server_proof(self._secret, nonce), welcome.proof)
            if not ok:
                raise ConnectionError(f"prefill {self.host}:{self.port} failed authentication: {reason}")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(POLL_S)
        self._sock = sock
        self.welcome = welcome
        self.alive = True
        self._reader = threading.Thread(target=self._read_loop, args=(reader,),
                                        name=f"llm-dd-vllm-client-{self.port}", daemon=True)
        self._reader.start()
        return welcome

    def _expect(self, reader: proto.FrameReader, kind):
        message = reader.read()  # the socket still has the connect timeout: None means it expired
        if message is None:
            raise ConnectionError(f"prefill {self.host}:{self.port} did not answer within {self._timeout_s} s")
        if isinstance(message, proto.Refused):
            raise ConnectionError(f"prefill {self.host}:{self.port} refused the connection: {message.reason}")
        if not isinstance(message, kind):
            raise proto.ProtocolError(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    def _read_loop(self, reader: proto.FrameReader) -> None:
        reason = "closed"
        try:
            while not self._stop.is_set():
                message = reader.read()
                if message is None:
                    continue
                if isinstance(message, proto.ClaimReply):
                    with self._lock:
                        slot = self._waiting.get(message.seq)
                    if slot is not None:
                        slot[1] = message
                        slot[0].set()
                elif isinstance(message, proto.PushDone):
                    self._on_push_done(message)
                else:
                    raise proto.ProtocolError(f"unexpected {type(message).__name__} from a prefill")
        except (ConnectionError, OSError) as exc:
            reason = str(exc)
        finally:
            self.alive = False
            with self._lock:
                waiting = list(self._waiting.values())
            for slot in waiting:
                slot[0].set()
            if not self._stop.is_set():
                _log.info("control channel to %s:%s lost (%s)", self.host, self.port, reason)
                self._on_lost(self)

    def _send(self, message: proto.Message) -> None:
        if not self.alive or self._sock is None:
            raise ConnectionError(f"control channel to {self.host}:{self.port} is closed")
        with self._send_lock:
            self._sock.sendall(proto.encode(message))

    def claim(self, request_id: str) -> proto.ClaimReply:
        """Bind ``request_id``'s held blocks to this connection; waits at most the client timeout.

        Raises:
            ConnectionError: the connection is gone or the prefill did not answer in time.
        """
        seq = next(self._seq)
        slot: List = [threading.Event(), None]
        with self._lock:
            self._waiting[seq] = slot
        try:
            self._send(proto.Claim(seq, request_id))
            if not slot[0].wait(self._timeout_s) or slot[1] is None:
                raise ConnectionError(f"prefill {self.host}:{self.port} gave no claim reply for {request_id}"
                                      f" ({'connection lost' if not self.alive else 'timed out'})")
            return slot[1]
        finally:
            with self._lock:
                self._waiting.pop(seq, None)

    def release(self, request_ids: List[str]) -> None:
        """Tell the prefill it may free these requests' blocks (best effort: a lost connection frees them too)."""
        try:
            self._send(proto.Release(list(request_ids)))
        except (ConnectionError, OSError):
            pass

    def push_ready(self, message: proto.PushReady) -> None:
        """Hand the prefill the destination blocks of a push.

        Raises:
            ConnectionError: the connection is gone.
        """
        self._send(message)

    def close(self) -> None:
        """Close the connection (the prefill frees what this client still held) and join the reader; idempotent."""
        self._stop.set()
        self.alive = False
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(_JOIN_S)
