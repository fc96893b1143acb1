"""Symmetric request/reply connections of the control plane, and the link handshake that opens them."""
from __future__ import annotations

import hmac
import itertools
import logging
import queue
import socket
import ssl
import threading
import time
from typing import Callable, Dict, Optional, Tuple, Union

import msgspec

from llm_datadist._engine import errors, protocol
from llm_datadist._engine.poller import Poller
from llm_datadist._transport import tls
from llm_datadist._engine.protocol import (Ack, AuthChallenge, AuthProof, AuthResult, Error, Hello, HelloAck,
                                           Message)
from llm_datadist.status import LLMStatusCode

_log = logging.getLogger(__name__)

Handler = Callable[["Connection", Message], Optional[Message]]
JOIN_TIMEOUT_S = 5.0
RECV_CHUNK = 256 * 1024
HELLO_WAIT_S = 3.0  # a connection must say Hello this soon (idle sockets do not hold a handshake slot long)
_LINK_FAILED = int(LLMStatusCode.LLM_LINK_FAILED)
_MIN_NONCE_BYTES = protocol.NONCE_BYTES // 2


class _Waiter:
    """One outstanding call: the reader thread fills ``reply`` or ``close()`` fills ``error``."""

    __slots__ = ("event", "reply", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: Optional[Message] = None
        self.error: Optional[errors.EngineError] = None


class _Workers:
    """A few daemon threads that run handler calls, so a slow handler never blocks replies."""

    def __init__(self, count: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-handler-{i}", daemon=True)
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()  # woken by the None sentinel that close() queues
            if item is None:
                return
            fn, args = item
            fn(*args)

    def owns(self, thread: threading.Thread) -> bool:
        return thread in self._threads

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join(JOIN_TIMEOUT_S)


class Connection:
    """One TCP connection carrying requests in both directions (links are symmetric).

    Either side may ``call()`` the other (or ``notify()`` it: no reply). Reply frames complete the caller
    waiting on their request id; other frames go to ``handler(conn, msg)``, whose return value (None means
    ``Ack()``) is the reply. A handler failure becomes an ``Error`` reply: an EngineError (or anything with an
    LLMStatusCode ``code``) keeps its code, anything else is LLM_FAILED and logged at ERROR.

    Input is read by a ``Poller``: the engine's shared one (one thread for every link), or a private one made
    for this connection. Frames are assembled as their bytes arrive (memory grows with what was received, not
    with what a header announced). Handlers run on ``executor`` (or own ``handler_workers`` threads), never in
    the poller; with a private poller and neither, inline. ``close()`` shuts the socket down, fails every waiter
    with LinkFailed, waits until the poller let go of the socket, closes it, then calls ``on_close(conn)`` once
    (off the poller thread).
    """

    def __init__(self, sock: socket.socket, handler: Optional[Handler] = None, *, name: str = "link",
                 on_close: Optional[Callable[[Connection], None]] = None, handler_workers: int = 0,
                 executor=None, reply_timeout_s: float = 10.0, start: bool = True,
                 poller: Optional[Poller] = None) -> None:
        """Wrap a connected socket (after the handshake).

        Args:
            sock: Connected stream socket; it is switched to non-blocking mode and owned from now on.
            handler: Serves the peer's requests; None answers every request with FEATURE_NOT_ENABLED.
            name: Used in thread names and log lines.
            on_close: Called once, after the connection closed (never in the poller thread).
            handler_workers: Number of own daemon handler threads (0: use ``executor`` or run inline).
            executor: Shared executor (``submit(fn, *args)``) for handler calls and ``on_close``.
            reply_timeout_s: Deadline for sending one reply.
            start: Start reading now; otherwise call ``start()``.
            poller: The shared poller that reads this connection; None makes a private one.
        """
        sock.setblocking(False)
        self.sock = sock
        self._handler = handler
        self.name = name
        self._on_close = on_close
        self._executor = executor
        self._workers = _Workers(handler_workers, name) if handler_workers > 0 and executor is None else None
        self._own_poller = poller is None
        self._poller = poller if poller is not None else Poller(f"{name}-reader")
        self._reply_timeout_s = reply_timeout_s
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._waiters: Dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._close_reason = ""
        self._stop = threading.Event()
        self._started = False
        self._buf = bytearray()
        self._header: Optional[protocol.FrameHeader] = None
        self._io_lock: Optional[threading.Lock] = threading.Lock() if isinstance(sock, ssl.SSLSocket) else None
        self.peer = protocol.peer_name(sock)
        if start:
            self.start()

    def __repr__(self) -> str:
        state = f"closed: {self._close_reason}" if self._closed else "open"
        return f"<Connection {self.name} peer={self.peer} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def close_reason(self) -> str:
        return self._close_reason

    def start(self) -> None:
        """Start reading (idempotent)."""
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            self._poller.add(self)  # under the lock: close() never misses a registration

    def call(self, msg: Message, deadline: float) -> Message:
        """Send a request and return its reply (an ``Error`` reply is raised instead).

        Args:
            msg: Request message.
            deadline: time.monotonic() value after which the call gives up.

        Raises:
            errors.Timeout: No reply before the deadline (a partly sent request also closes the link).
            errors.LinkFailed: The connection is or gets closed, or the peer died.
            errors.EngineError: The peer answered ``Error``: ``error_for_code(code, message)``.
            protocol.ProtocolError: ``msg`` cannot be encoded.
        """
        waiter = _Waiter()
        with self._lock:
            if self._closed:
                raise self._closed_error()
            request_id = next(self._ids)
            self._waiters[request_id] = waiter
        try:
            self._send(protocol.encode(msg, request_id), deadline)
            remaining = deadline - time.monotonic()
            if not waiter.event.wait(max(remaining, 0.0)):
                raise errors.Timeout(f"{self.name}: no reply to {type(msg).__name__} from {self.peer} "
                                     f"before the deadline")
        finally:
            with self._lock:
                self._waiters.pop(request_id, None)
        if waiter.error is not None:
            raise waiter.error
        reply = waiter.reply
        if isinstance(reply, Error):
            raise errors.error_for_code(reply.code, reply.message)
        assert reply is not None
        return reply

    def notify(self, msg: Message, deadline: float) -> None:
        """Send a request that wants no reply (request id 0); the peer's handler runs, nothing comes back.

        Raises:
            errors.Timeout / errors.LinkFailed: the frame could not be sent.
        """
        if self._closed:
            raise self._closed_error()
        self._send(protocol.encode(msg, 0), deadline)

    def close(self, reason: str = "closed locally") -> None:
        """Close the connection (idempotent); waiters fail at once with LinkFailed."""
        with self._lock:
            first = not self._closed
            if first:
                self._closed = True
                self._close_reason = reason
                waiters, self._waiters = self._waiters, {}
            started = self._started
        if not first:
            return
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for waiter in waiters.values():
            waiter.error = self._closed_error()
            waiter.event.set()
        _log.debug("%s: connection to %s closed: %s", self.name, self.peer, reason)
        if started:
            self._poller.remove(self)  # never close an fd the poller may still watch (fd reuse)
        self._close_socket()
        self._run_off_poller(self._notify_closed)
        if self._workers is not None:
            self._workers.close()
        if self._own_poller:
            self._poller.close()

    # Poller callbacks -----------------------------------------------------------------------------
    def on_readable(self) -> None:
        """Read what arrived and act on every complete frame (poller thread; never blocks)."""
        while True:
            try:
                if self._io_lock is None:
                    data = self.sock.recv(RECV_CHUNK)
                else:
                    with self._io_lock:
                        data = self.sock.recv(RECV_CHUNK)
            except tls.WOULD_BLOCK:
                break
            except OSError as exc:
                self.close(f"connection lost: {exc}")
                return
            if not data:
                self.close("peer closed the connection")
                return
            self._buf += data
            if not tls.pending(self.sock):
                break
        try:
            self._frames()
        except protocol.ProtocolError as exc:
            _log.warning("%s: dropping connection to %s: protocol error: %s", self.name, self.peer, exc)
            self.close(f"protocol error: {exc}")

    def on_poll_error(self, reason: str) -> None:
        self.close(reason)

    def _frames(self) -> None:
        buf = self._buf
        while not self._closed:
            if self._header is None:
                if len(buf) < protocol.HEADER_SIZE:
                    return
                self._header = protocol.parse_header(bytes(buf[:protocol.HEADER_SIZE]))
                del buf[:protocol.HEADER_SIZE]
            header = self._header
            if len(buf) < header.length:
                return
            body = bytes(buf[:header.length])
            del buf[:header.length]
            self._header = None
            msg = protocol.decode_body(header, body)
            if header.is_reply:
                self._complete(header.request_id, msg)
            else:
                self._dispatch(header.request_id, msg)

    # Internals ------------------------------------------------------------------------------------
    def _closed_error(self) -> errors.LinkFailed:
        return errors.LinkFailed(f"{self.name}: connection to {self.peer} is closed ({self._close_reason})")

    def _run_off_poller(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` now, unless this is the shared poller's thread: then on the executor (or a thread)."""
        if self._own_poller or not self._poller_thread():
            fn()
            return
        if self._executor is not None:
            try:
                self._executor.submit(fn)
                return
            except RuntimeError:
                pass
        threading.Thread(target=fn, name=f"{self.name}-closed", daemon=True).start()

    def _poller_thread(self) -> bool:
        return threading.current_thread() is getattr(self._poller, "_thread", None)

    def _notify_closed(self) -> None:
        if self._on_close is None:
            return
        try:
            self._on_close(self)
        except Exception:  # noqa: BLE001 - a callback must not break close()
            _log.error("%s: on_close callback failed", self.name, exc_info=True)

    def _close_socket(self) -> None:
        if not self._send_lock.acquire(timeout=JOIN_TIMEOUT_S):  # a sender notices _stop within a poll step
            _log.warning("%s: sender still busy; socket left to the garbage collector", self.name)
            return
        try:
            self.sock.close()
        finally:
            self._send_lock.release()

    def _send(self, data: bytes, deadline: float) -> None:
        """Send one frame under the send lock; a broken stream closes the connection."""
        if self._closed:
            raise self._closed_error()
        if not self._send_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise errors.Timeout(f"{self.name}: send to {self.peer} still busy at the deadline")
        broken: Optional[errors.EngineError] = None
        try:
            if self._closed:
                raise self._closed_error()
            protocol.send_all(self.sock, data, deadline, self._stop, self._io_lock)
        except protocol.PartialWrite as exc:
            broken = exc
        except errors.Timeout:
            raise
        except errors.LinkFailed as exc:
            broken = exc
        finally:
            self._send_lock.release()
        if broken is not None:
            if self._closed:
                raise self._closed_error() from broken
            self.close(f"send failed: {broken}")
            if isinstance(broken, errors.Timeout):
                raise errors.Timeout(f"{self.name}: {broken}; connection closed") from broken
            raise errors.LinkFailed(f"{self.name}: send to {self.peer} failed: {broken}") from broken

    def _complete(self, request_id: int, msg: Message) -> None:
        with self._lock:
            waiter = self._waiters.pop(request_id, None)
        if waiter is None:
            _log.debug("%s: late or unknown reply %d (%s) dropped", self.name, request_id, type(msg).__name__)
            return
        waiter.reply = msg
        waiter.event.set()

    def _dispatch(self, request_id: int, msg: Message) -> None:
        if self._executor is not None:
            try:
                self._executor.submit(self._handle, request_id, msg)
                return
            except RuntimeError:  # executor shut down: answer inline rather than never
                pass
        if self._workers is not None:
            self._workers.submit(self._handle, request_id, msg)
        else:
            self._handle(request_id, msg)

    def _handle(self, request_id: int, msg: Message) -> None:
        reply = self._run_handler(msg)
        if request_id == 0:  # a notification: nobody waits for an answer
            if isinstance(reply, Error):
                _log.debug("%s: notification %s failed: %s", self.name, type(msg).__name__, reply.message)
            return
        try:
            data = protocol.encode(reply, request_id, is_reply=True)
        except protocol.ProtocolError as exc:
            _log.error("%s: reply to %s cannot be encoded: %s", self.name, type(msg).__name__, exc)
            error = Error(code=int(LLMStatusCode.LLM_FAILED), message=protocol.clip_message(str(exc)))
            data = protocol.encode(error, request_id, is_reply=True)
        try:
            self._send(data, time.monotonic() + self._reply_timeout_s)
        except errors.EngineError as exc:
            _log.debug("%s: reply to %s dropped: %s", self.name, type(msg).__name__, exc)

    def _run_handler(self, msg: Message) -> Message:
        if self._handler is None:
            return Error(code=int(LLMStatusCode.LLM_FEATURE_NOT_ENABLED),
                         message=f"{self.name}: this side serves no requests")
        try:
            reply = self._handler(self, msg)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an Error reply
            code = getattr(exc, "code", None)
            if isinstance(exc, errors.EngineError) or isinstance(code, LLMStatusCode):
                _log.debug("%s: %s refused: %s", self.name, type(msg).__name__, exc)
                return Error(code=int(code), message=protocol.clip_message(str(exc)))  # type: ignore[arg-type]
            _log.error("%s: handler failed on %s", self.name, type(msg).__name__, exc_info=True)
            return Error(code=int(LLMStatusCode.LLM_FAILED),
                         message=protocol.clip_message(f"{type(exc).__name__}: {exc}"))
        return Ack() if reply is None else reply


# Handshake ---------------------------------------------------------------------------------------
def _send_best_effort(sock: socket.socket, msg: Message, deadline: float) -> None:
    try:
        protocol.send_all(sock, protocol.encode(msg, 0, is_reply=True), min(deadline, time.monotonic() + 1.0))
    except errors.EngineError:
        pass


class ConnectionRefused(errors.LinkFailed):
    """Nothing listens at the address (yet)."""


# Why a handshake's authentication failed (``AuthFailed.reason``): what the client can tell from the handshake
# alone, so a diagnosis (``diagnostics.link_failure``) never depends on the wording of a message.
AUTH_TLS = "tls"  # the TLS handshake failed (the chained ssl or socket error says how)
AUTH_SECRET_REQUIRED = "secret-required"  # the server requires a shared secret; none is configured here
AUTH_SECRET_WRONG = "secret-wrong"  # the server refused our proof of the secret: the two secrets differ
AUTH_SECRET_UNEXPECTED = "secret-unexpected"  # a secret is configured here; the server authenticates nothing
AUTH_SERVER_PROOF = "server-proof"  # the server did not prove the secret (a bad nonce or proof)
AUTH_CLIENT = "client"  # (server side) the client did not prove the secret


class AuthFailed(errors.LinkFailed):
    """The link's authentication (shared secret or TLS) failed; ``reason`` is one of the AUTH_* values."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _auth_failed(text: str, reason: str) -> AuthFailed:
    _log.warning("%s", text)
    return AuthFailed(text, reason)


def _secret_bytes(secret: Union[bytes, str, None]) -> Optional[bytes]:
    """An empty or missing secret means no authentication (the official library's behaviour)."""
    if not secret:
        return None
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def open_connection(host: str, port: int, hello: Hello, deadline: float,
                    secret: Union[bytes, str, None] = None, tls_config: Optional[tls.Tls] = None
                    ) -> Tuple[socket.socket, HelloAck]:
    """Connect and run the client side of the handshake, before any Connection exists.

    Args:
        host: Server address.
        port: Server port.
        hello: Our identity; ``protocol_version`` and ``client_nonce`` are filled in here.
        deadline: time.monotonic() deadline for connect and handshake.
        secret: Shared secret (str is UTF-8 encoded), None or empty for none. With a secret we prove it
            first and the server's HMAC proof in its HelloAck is checked before the link is used; a server
            without one is refused.
        tls_config: Mutual TLS around the whole connection (handshake first), or None.

    Returns:
        The connected non-blocking socket (give it to ``Connection``) and the server's HelloAck.

    Raises:
        errors.Timeout: The deadline passed.
        errors.LinkFailed: Unreachable, authentication failed, protocol mismatch (ProtocolError).
        errors.EngineError: The server refused the link (``error_for_code(ack.code, ack.message)``).
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise errors.Timeout(f"no time left to connect to {host}:{port}")
    try:
        sock = socket.create_connection((host, port), timeout=remaining)
    except socket.timeout as exc:
        raise errors.Timeout(f"connect to {host}:{port} timed out") from exc
    except ConnectionRefusedError as exc:
        raise ConnectionRefused(f"cannot connect to {host}:{port}: {exc}") from exc
    except OSError as exc:
        raise errors.LinkFailed(f"cannot connect to {host}:{port}: {exc}") from exc
    try:
        if tls_config is not None:
            sock = _tls_wrap(lambda: tls_config.wrap_client(sock, deadline - time.monotonic()), f"{host}:{port}")
        protocol.prepare_socket(sock)
        return sock, _client_handshake(sock, hello, deadline, _secret_bytes(secret), f"{host}:{port}")
    except BaseException:
        sock.close()
        raise


def _tls_wrap(wrap: Callable[[], socket.socket], peer: str) -> socket.socket:
    try:
        return wrap()
    except socket.timeout as exc:
        raise errors.Timeout(f"TLS handshake with {peer} timed out") from exc
    except (ssl.SSLError, OSError) as exc:
        raise _auth_failed(f"TLS handshake with {peer} failed: {exc}", AUTH_TLS) from exc


def _client_handshake(sock: socket.socket, hello: Hello, deadline: float, secret: Optional[bytes],
                      peer: str) -> HelloAck:
    nonce = protocol.make_nonce() if secret is not None else b""
    hello = msgspec.structs.replace(hello, protocol_version=protocol.PROTOCOL_VERSION, client_nonce=nonce)
    protocol.send_all(sock, protocol.encode(hello, 0), deadline)
    msg = protocol.read_frame(sock, deadline, max_length=protocol.HANDSHAKE_FRAME_BYTES)[1]
    server_nonce = b""
    if secret is not None:
        msg, server_nonce = _client_auth(sock, msg, secret, nonce, deadline, peer)
    if isinstance(msg, AuthResult):
        raise _auth_failed(f"link authentication failed with {peer}: {msg.message}",
                           AUTH_SECRET_REQUIRED if secret is None else AUTH_SECRET_WRONG)
    if isinstance(msg, Error):
        raise errors.error_for_code(msg.code, msg.message)
    if not isinstance(msg, HelloAck):
        raise protocol.ProtocolError(f"expected HelloAck from {peer}, got {type(msg).__name__}")
    if msg.code != 0:
        raise errors.error_for_code(msg.code, msg.message or f"link refused by {peer}")
    if secret is not None:
        expected = protocol.server_proof(secret, nonce, server_nonce)
        if not hmac.compare_digest(expected, msg.server_proof):
            raise _auth_failed(f"link authentication failed with {peer}: the server did not prove the "
                               f"shared secret", AUTH_SERVER_PROOF)
    return msg


def _client_auth(sock: socket.socket, msg: Message, secret: bytes, nonce: bytes, deadline: float,
                 peer: str) -> Tuple[Message, bytes]:
    """Prove the secret over both nonces; return the server's next message and its nonce.

    The client proves first, so a stranger who connects to a listener learns no HMAC of the secret; the
    server's proof comes in its HelloAck and is checked before the link is used.
    """
    if not isinstance(msg, AuthChallenge):
        if isinstance(msg, HelloAck) and msg.code == 0:
            raise _auth_failed(f"link authentication failed with {peer}: the server does not "
                               f"authenticate links but a shared secret is configured here", AUTH_SECRET_UNEXPECTED)
        return msg, b""
    if len(msg.server_nonce) < _MIN_NONCE_BYTES:
        raise _auth_failed(f"link authentication failed with {peer}: the server's nonce is too short",
                           AUTH_SERVER_PROOF)
    proof = protocol.client_proof(secret, msg.server_nonce, nonce)
    protocol.send_all(sock, protocol.encode(AuthProof(client_proof=proof), 0), deadline)
    return protocol.read_frame(sock, deadline, max_length=protocol.HANDSHAKE_FRAME_BYTES)[1], msg.server_nonce


def accept_handshake(sock: socket.socket, deadline: float, secret: Union[bytes, str, None],
                     decide: Callable[[Hello], HelloAck], tls_config: Optional[tls.Tls] = None,
                     secured: Optional[Callable[[socket.socket], None]] = None
                     ) -> Tuple[socket.socket, Hello, HelloAck]:
    """Run the server side of the handshake on an accepted socket.

    Reads Hello and checks the protocol version (a mismatch is answered with HelloAck code
    LLM_LINK_FAILED), authenticates the client when a ``secret`` is configured (a missing or wrong
    proof is answered with AuthResult LLM_LINK_FAILED and logged at WARNING), and only then calls
    ``decide(hello)`` (which may refuse with a non-zero ``code`` or by raising EngineError).

    Returns:
        (socket, hello, ack) as sent; the socket is the TLS socket when ``tls_config`` is given. With
        ``ack.code == 0`` it is non-blocking and ready for ``Connection``; otherwise the link was refused and
        the socket is already closed.

    Raises:
        errors.EngineError: The handshake failed (Timeout, LinkFailed, ProtocolError); socket closed.
    """
    peer = protocol.peer_name(sock)
    secret = _secret_bytes(secret)
    try:
        if tls_config is not None:
            sock = _tls_wrap(lambda: tls_config.wrap_server(sock, HELLO_WAIT_S), peer)
            if secured is not None:
                secured(sock)  # decide() must build its link on the TLS socket
        protocol.prepare_socket(sock)
        hello = _read_hello(sock, min(deadline, time.monotonic() + HELLO_WAIT_S), peer)
        server_nonce = _server_auth(sock, hello, secret, deadline, peer) if secret is not None else b""
        ack = _decide(decide, hello)
        if secret is not None and ack.code == 0:  # the client proved the secret: now we prove it
            ack = msgspec.structs.replace(ack, server_proof=protocol.server_proof(secret, hello.client_nonce,
                                                                                   server_nonce))
        protocol.send_all(sock, protocol.encode(ack, 0, is_reply=True), deadline)
    except BaseException:
        sock.close()
        raise
    if ack.code != 0:
        _log.info("link from %s (cluster %d) refused: %s", peer, hello.cluster_id, ack.message)
        sock.close()
    return sock, hello, ack


def _read_hello(sock: socket.socket, deadline: float, peer: str) -> Hello:
    try:
        msg = protocol.read_frame(sock, deadline, max_length=protocol.HANDSHAKE_FRAME_BYTES)[1]
        if isinstance(msg, Hello) and msg.protocol_version != protocol.PROTOCOL_VERSION:
            raise protocol.VersionMismatch(msg.protocol_version)
    except protocol.VersionMismatch as exc:
        _send_best_effort(sock, HelloAck(code=_LINK_FAILED, message=str(exc)), deadline)
        _log.warning("link from %s refused: %s", peer, exc)
        raise
    if not isinstance(msg, Hello):
        raise protocol.ProtocolError(f"expected Hello from {peer}, got {type(msg).__name__}")
    return msg


def _server_auth(sock: socket.socket, hello: Hello, secret: bytes, deadline: float, peer: str) -> bytes:
    """Check the client's proof of the secret (it proves first); return our nonce for the proof we owe."""
    if len(hello.client_nonce) < _MIN_NONCE_BYTES:
        _send_best_effort(sock, AuthResult(code=_LINK_FAILED, message="this server requires link "
                                           "authentication: configure the same shared secret"), deadline)
        raise _auth_failed(f"link authentication failed from {peer}: no shared secret configured there",
                           AUTH_CLIENT)
    nonce = protocol.make_nonce()
    protocol.send_all(sock, protocol.encode(AuthChallenge(server_nonce=nonce), 0, is_reply=True), deadline)
    try:
        msg = protocol.read_frame(sock, deadline, max_length=protocol.HANDSHAKE_FRAME_BYTES)[1]
    except errors.LinkFailed as exc:  # the client hung up before proving anything
        raise _auth_failed(f"link authentication failed from {peer}: no proof ({exc})", AUTH_CLIENT) from exc
    expected = protocol.client_proof(secret, nonce, hello.client_nonce)
    if not isinstance(msg, AuthProof) or not hmac.compare_digest(expected, msg.client_proof):
        _send_best_effort(sock, AuthResult(code=_LINK_FAILED, message="link authentication failed"), deadline)
        raise _auth_failed(f"link authentication failed from {peer}", AUTH_CLIENT)
    return nonce


def _decide(decide: Callable[[Hello], HelloAck], hello: Hello) -> HelloAck:
    try:
        return decide(hello)
    except errors.EngineError as exc:
        return HelloAck(code=int(exc.code), message=protocol.clip_message(str(exc)))
    except Exception as exc:  # noqa: BLE001 - refuse the link instead of dropping it silently
        _log.error("link decision for cluster %d failed", hello.cluster_id, exc_info=True)
        return HelloAck(code=int(LLMStatusCode.LLM_FAILED), message=protocol.clip_message(repr(exc)))

