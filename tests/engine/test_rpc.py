"""Tests of symmetric RPC connections and of the link handshake (with and without authentication)."""
from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest

from llm_datadist._engine import errors
from llm_datadist._engine import protocol as p
from llm_datadist._engine import rpc
from llm_datadist.status import LLMStatusCode
from waiting import NEVER_HANGS_S, wait_until

SLOW = 600  # the cache id whose Resolve handler blocks until the test opens the gate


class _Gate:
    """Holds the slow handler: ``entered`` is set once it runs, it returns when ``release`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()


GATE = _Gate()


@pytest.fixture(autouse=True)
def gate():
    """A fresh gate per test; opened at the end, so a blocked handler never outlives its test."""
    global GATE
    GATE = _Gate()
    yield GATE
    GATE.release.set()


def _tcp_pair():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    server.close()
    return a, b


def _pair(kind):
    return socket.socketpair() if kind == "unix" else _tcp_pair()


def _soon(seconds=5.0):
    return time.monotonic() + seconds


def serve(conn, msg):
    """A small serving side: Resolve echoes ident as cache_id; errors on demand."""
    if isinstance(msg, p.Resolve):
        if msg.kind == "id" and msg.cache_id == 404:
            raise errors.CacheNotExist(f"cache {msg.cache_id} does not exist")
        if msg.kind == "id" and msg.cache_id == 500:
            raise ValueError("boom")
        if msg.kind == "id" and msg.cache_id == SLOW:
            GATE.entered.set()
            assert GATE.release.wait(NEVER_HANGS_S), "the test never opened the gate"
        return p.CacheView(cache_id=msg.ident, tensor_addrs=[], tensor_nbytes=0, stride=0, dim0=1, num_tensors=0,
                           placement=0, is_blocks=False, remote_accessible=True, owned=True)
    if isinstance(msg, p.TableRequest):
        return p.Table(version=3, caches=[])
    if isinstance(msg, p.Unlink):
        return None
    return p.Ack()


@pytest.fixture(params=["tcp", "unix"])
def conns(request):
    a_sock, b_sock = _pair(request.param)
    closed = []
    a = rpc.Connection(a_sock, serve, name="a", on_close=closed.append)
    b = rpc.Connection(b_sock, serve, name="b", on_close=closed.append, handler_workers=2)
    a.closed_log = closed
    yield a, b
    a.close()
    b.close()


def test_calls_in_both_directions(conns):
    a, b = conns
    assert a.call(p.Ping(), _soon()) == p.Ack()
    assert b.call(p.Ping(), _soon()) == p.Ack()
    assert a.call(p.TableRequest(), _soon()).version == 3
    assert b.call(p.Unlink(cluster_id=1), _soon()) == p.Ack()  # handler returned None


def test_concurrent_callers_from_16_threads(conns):
    a, b = conns
    failures = []

    def worker(conn, base):
        try:
            for i in range(50):
                ident = base * 1000 + i
                view = conn.call(p.Resolve(kind="req", cluster_id=1, ident=ident), _soon())
                assert view.cache_id == ident
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(a if i % 2 else b, i)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures


def test_engine_error_keeps_class_and_code(conns):
    a, b = conns
    for conn in (a, b):
        with pytest.raises(errors.CacheNotExist, match="cache 404") as info:
            conn.call(p.Resolve(kind="id", cluster_id=1, cache_id=404), _soon())
        assert info.value.code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


def test_unexpected_handler_error_is_llm_failed_and_logged(conns, caplog):
    a, _ = conns
    with caplog.at_level(logging.ERROR, logger="llm_datadist._engine.rpc"):
        with pytest.raises(errors.EngineError, match="ValueError: boom") as info:
            a.call(p.Resolve(kind="id", cluster_id=1, cache_id=500), _soon())
    assert info.value.code == LLMStatusCode.LLM_FAILED
    assert any("handler failed" in r.getMessage() for r in caplog.records)
    assert a.call(p.Ping(), _soon()) == p.Ack()  # the link survives


def test_deadline_raises_timeout_and_late_reply_is_dropped(conns, gate, caplog):
    a, _ = conns
    with pytest.raises(errors.Timeout):  # the handler is still blocked: only the deadline can end the call
        a.call(p.Resolve(kind="id", cluster_id=1, cache_id=SLOW), time.monotonic() + 0.1)
    assert gate.entered.wait(NEVER_HANGS_S)
    with caplog.at_level(logging.DEBUG, logger="llm_datadist._engine.rpc"):
        gate.release.set()  # now the reply comes, too late
        assert wait_until(lambda: any("late or unknown reply" in r.getMessage() for r in caplog.records))
    assert a.call(p.Resolve(kind="req", cluster_id=1, ident=9), _soon()).cache_id == 9
    assert not a.closed


def test_expired_deadline(conns):
    a, _ = conns
    with pytest.raises(errors.Timeout):
        a.call(p.Ping(), time.monotonic() - 1)


def test_slow_handler_does_not_block_replies_with_workers(conns, gate):
    a, _ = conns  # b (the serving side of a's calls) has 2 handler workers
    slow = threading.Thread(target=a.call, args=(p.Resolve(kind="id", cluster_id=1, cache_id=SLOW), _soon()))
    slow.start()
    assert gate.entered.wait(NEVER_HANGS_S)
    assert a.call(p.Ping(), _soon()) == p.Ack()  # answered while the slow handler is still blocked
    assert not gate.release.is_set() and slow.is_alive()
    gate.release.set()
    slow.join(NEVER_HANGS_S)
    assert not slow.is_alive()


def test_peer_death_fails_waiters_promptly():
    a_sock, raw = _tcp_pair()
    closed = threading.Event()
    a = rpc.Connection(a_sock, serve, name="a", on_close=lambda c: closed.set())
    result = {}

    def caller():
        try:
            a.call(p.Ping(), _soon(60))
        except errors.EngineError as exc:
            result["exc"] = exc

    thread = threading.Thread(target=caller)
    thread.start()
    raw.settimeout(NEVER_HANGS_S)
    raw.recv(p.HEADER_SIZE)  # the request arrived; now the peer dies without answering
    raw.close()
    thread.join(NEVER_HANGS_S)  # far before the call's own 60 s deadline: the death woke it
    assert not thread.is_alive() and isinstance(result["exc"], errors.LinkFailed)
    assert closed.wait(NEVER_HANGS_S) and a.closed
    with pytest.raises(errors.LinkFailed):
        a.call(p.Ping(), _soon())
    a.close()


def test_local_close_wakes_waiters_and_is_idempotent(conns, gate):
    a, b = conns
    result = {}

    def caller():
        try:
            a.call(p.Resolve(kind="id", cluster_id=1, cache_id=SLOW), _soon(60))
        except errors.EngineError as exc:
            result["exc"] = exc

    thread = threading.Thread(target=caller)
    thread.start()
    assert gate.entered.wait(NEVER_HANGS_S)  # the call is in flight, its handler blocked
    a.close()
    thread.join(NEVER_HANGS_S)  # far before the call's own 60 s deadline: the close woke it
    assert not thread.is_alive() and isinstance(result["exc"], errors.LinkFailed)
    gate.release.set()
    a.close()
    assert a.closed and a.closed_log.count(a) == 1
    with pytest.raises(errors.LinkFailed):
        a.call(p.Ping(), _soon())
    assert wait_until(lambda: b in a.closed_log)
    assert b.closed  # the peer noticed (EOF) and ran its on_close too
    assert a.closed_log.count(b) == 1


def test_garbage_from_peer_drops_only_that_connection(caplog):
    a_sock, raw = _tcp_pair()
    a = rpc.Connection(a_sock, serve, name="a")
    with caplog.at_level(logging.WARNING, logger="llm_datadist._engine.rpc"):
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_until(lambda: a.closed)
    assert a.closed and "protocol error" in a.close_reason
    assert any("dropping connection" in r.getMessage() for r in caplog.records)
    raw.close()
    a.close()


def test_nested_call_back_over_the_same_connection():
    a_sock, b_sock = _tcp_pair()

    def b_handler(conn, msg):
        if isinstance(msg, p.Ping):
            return conn.call(p.TableRequest(), _soon())  # ask the caller back
        return serve(conn, msg)

    a = rpc.Connection(a_sock, serve, name="a")
    b = rpc.Connection(b_sock, b_handler, name="b", handler_workers=1)
    try:
        assert a.call(p.Ping(), _soon()) == p.Table(version=3, caches=[])
    finally:
        a.close()
        b.close()


def test_shared_executor_and_no_handler():
    a_sock, b_sock = _tcp_pair()
    with ThreadPoolExecutor(2) as pool:
        a = rpc.Connection(a_sock, None, name="a")
        b = rpc.Connection(b_sock, serve, name="b", executor=pool)
        try:
            assert a.call(p.TableRequest(), _soon()).version == 3
            with pytest.raises(errors.FeatureNotEnabled):
                b.call(p.Ping(), _soon())
        finally:
            a.close()
            b.close()


def test_deferred_start_and_repr():
    a_sock, b_sock = _tcp_pair()
    a = rpc.Connection(a_sock, serve, name="a")
    b = rpc.Connection(b_sock, serve, name="b", start=False)
    assert "open" in repr(b)
    b.start()
    b.start()
    try:
        assert a.call(p.Ping(), _soon()) == p.Ack()
    finally:
        a.close()
        b.close()
    assert "closed" in repr(b)


def test_on_close_error_is_logged_not_raised(caplog):
    a_sock, b_sock = _tcp_pair()

    def bad(conn):
        raise RuntimeError("callback")

    a = rpc.Connection(a_sock, serve, name="a", on_close=bad)
    b = rpc.Connection(b_sock, serve, name="b")
    with caplog.at_level(logging.ERROR, logger="llm_datadist._engine.rpc"):
        a.close()
    b.close()
    assert any("on_close" in r.getMessage() for r in caplog.records)


# Handshake ---------------------------------------------------------------------------------------
def _hello(cluster_id=1):
    return p.Hello(protocol_version=p.PROTOCOL_VERSION, cluster_id=cluster_id, role=0, host_id="host-a", pid=1,
                   remote_cache_accessible=True, transports={"tcp": b"desc"})


def _ack(hello):
    return p.HelloAck(cluster_id=2, role=1, host_id="host-b", pid=2, remote_cache_accessible=True,
                      transports={"tcp": b"b"})


class _Server:
    """One accept_handshake on a background thread; result or exception kept."""

    def __init__(self, secret=None, decide=_ack):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.result = None
        self.error = None
        self.conn = None
        self._thread = threading.Thread(target=self._run, args=(secret, decide))
        self._thread.start()

    def _run(self, secret, decide):
        self.sock.settimeout(5)
        try:
            self.conn, _ = self.sock.accept()
            self.result = rpc.accept_handshake(self.conn, _soon(), secret, decide)
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc

    def join(self):
        self._thread.join(10)
        self.sock.close()
        return self


@pytest.mark.parametrize("secret", [None, b"s3cret", "text-secret"])
def test_handshake_succeeds_and_carries_a_link(secret):
    server = _Server(secret=secret)
    sock, ack = rpc.open_connection("127.0.0.1", server.port, _hello(), _soon(), secret=secret)
    server.join()
    assert server.error is None
    _sock, hello, sent = server.result
    assert hello.cluster_id == 1 and hello.transports == {"tcp": b"desc"}
    assert ack == sent and ack.host_id == "host-b"
    assert (len(hello.client_nonce) == p.NONCE_BYTES) == (secret is not None)
    a = rpc.Connection(sock, serve, name="client")
    b = rpc.Connection(server.conn, serve, name="server")
    try:
        assert a.call(p.Ping(), _soon()) == p.Ack() and b.call(p.Ping(), _soon()) == p.Ack()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("client_secret, server_secret", [
    (b"right", b"wrong"),
    (None, b"server-only"),
    (b"client-only", None),
])
def test_authentication_refused_on_both_sides(client_secret, server_secret, caplog):
    server = _Server(secret=server_secret)
    with caplog.at_level(logging.WARNING, logger="llm_datadist._engine.rpc"):
        with pytest.raises(errors.LinkFailed, match="authentication"):
            rpc.open_connection("127.0.0.1", server.port, _hello(), _soon(), secret=client_secret)
        server.join()
    if server_secret is not None:
        assert isinstance(server.error, errors.LinkFailed)  # the server refused too
        assert any("link authentication failed from 127.0.0.1" in r.getMessage() for r in caplog.records)
        assert server.conn.fileno() == -1  # closed by accept_handshake
    else:
        # A server without a secret accepted; the client refused it and closed the socket.
        assert server.error is None
        server.conn.close()


def _challenged(secret: bytes):
    """A server with ``secret`` and a raw client that sent its Hello: (server, socket, hello, the server's answer)."""
    server = _Server(secret=secret)
    raw = socket.create_connection(("127.0.0.1", server.port))
    hello = _hello()
    hello.client_nonce = p.make_nonce()
    raw.sendall(p.encode(hello, 0))
    raw.setblocking(False)
    return server, raw, hello, p.read_frame(raw, _soon())[1]


def test_wrong_client_proof_gets_auth_result(caplog):
    server, raw, _hello_sent, challenge = _challenged(b"k")
    # a stranger gets a nonce and nothing computed from the secret: the client proves first
    assert isinstance(challenge, p.AuthChallenge) and msgspec.structs.asdict(challenge) == {
        "server_nonce": challenge.server_nonce}
    p.send_all(raw, p.encode(p.AuthProof(client_proof=b"\x00" * 32), 0), _soon())
    result = p.read_frame(raw, _soon())[1]
    assert result == p.AuthResult(code=int(LLMStatusCode.LLM_LINK_FAILED), message="link authentication failed")
    server.join()
    raw.close()
    assert isinstance(server.error, errors.LinkFailed)


def test_server_proves_the_secret_only_after_the_client_did():
    server, raw, hello, challenge = _challenged(b"k")
    assert isinstance(challenge, p.AuthChallenge)
    proof = p.client_proof(b"k", challenge.server_nonce, hello.client_nonce)
    p.send_all(raw, p.encode(p.AuthProof(client_proof=proof), 0), _soon())
    ack = p.read_frame(raw, _soon())[1]
    assert isinstance(ack, p.HelloAck) and ack.code == 0
    assert ack.server_proof == p.server_proof(b"k", hello.client_nonce, challenge.server_nonce)
    assert ack.server_proof != p.server_proof(b"other", hello.client_nonce, challenge.server_nonce)
    server.join()
    raw.close()
    assert server.error is None


def test_client_refuses_a_server_whose_proof_is_wrong():
    """A listener that knows no secret but answers the client's proof with a made-up one is refused."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def fake_server():
        conn, _ = listener.accept()
        conn.setblocking(False)
        p.read_frame(conn, _soon())  # Hello
        p.send_all(conn, p.encode(p.AuthChallenge(server_nonce=p.make_nonce()), 0, is_reply=True), _soon())
        p.read_frame(conn, _soon())  # the client's proof
        p.send_all(conn, p.encode(p.HelloAck(cluster_id=1, server_proof=b"\x01" * 32), 0, is_reply=True), _soon())
        time.sleep(0.2)
        conn.close()

    thread = threading.Thread(target=fake_server, daemon=True)
    thread.start()
    try:
        with pytest.raises(errors.LinkFailed, match="did not prove"):
            rpc.open_connection("127.0.0.1", port, _hello(), _soon(), secret=b"k")
    finally:
        thread.join(5)
        listener.close()


def test_version_mismatch_answered_with_link_failed():
    server = _Server()
    raw = socket.create_connection(("127.0.0.1", server.port))
    frame = bytearray(p.encode(_hello(), 0))
    frame[4:6] = (p.PROTOCOL_VERSION + 1).to_bytes(2, "big")
    raw.sendall(bytes(frame))
    raw.setblocking(False)
    ack = p.read_frame(raw, _soon())[1]
    assert isinstance(ack, p.HelloAck) and ack.code == LLMStatusCode.LLM_LINK_FAILED
    assert "version" in ack.message
    server.join()
    raw.close()
    assert isinstance(server.error, p.VersionMismatch)


def test_hello_field_version_mismatch_refused_by_client_helper():
    server = _Server()
    raw = socket.create_connection(("127.0.0.1", server.port))
    hello = _hello()
    hello.protocol_version = p.PROTOCOL_VERSION + 7
    raw.sendall(p.encode(hello, 0))
    raw.setblocking(False)
    ack = p.read_frame(raw, _soon())[1]
    assert ack.code == LLMStatusCode.LLM_LINK_FAILED
    server.join()
    raw.close()


def test_decide_refusal_reaches_the_client():
    def refuse(hello):
        return p.HelloAck(code=int(LLMStatusCode.LLM_PARAM_INVALID), message="mode differs")

    server = _Server(decide=refuse)
    with pytest.raises(errors.ParamInvalid, match="mode differs"):
        rpc.open_connection("127.0.0.1", server.port, _hello(), _soon())
    server.join()
    _sock, hello, ack = server.result
    assert ack.code == LLMStatusCode.LLM_PARAM_INVALID and server.conn.fileno() == -1


def test_decide_raising_engine_error_reaches_the_client():
    def refuse(hello):
        raise errors.AlreadyLinked(f"cluster {hello.cluster_id} is already linked")

    server = _Server(decide=refuse)
    with pytest.raises(errors.AlreadyLinked, match="cluster 1"):
        rpc.open_connection("127.0.0.1", server.port, _hello(), _soon())
    server.join()


def test_connect_refused_and_deadlines():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(errors.LinkFailed, match="cannot connect"):
        rpc.open_connection("127.0.0.1", port, _hello(), _soon())
    with pytest.raises(errors.Timeout):
        rpc.open_connection("127.0.0.1", port, _hello(), time.monotonic() - 1)


def test_silent_server_times_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    start = time.monotonic()
    with pytest.raises(errors.Timeout):
        rpc.open_connection("127.0.0.1", silent.getsockname()[1], _hello(), time.monotonic() + 0.3)
    assert time.monotonic() - start < NEVER_HANGS_S  # it gives up at its deadline, never hangs
    silent.close()


def test_server_side_garbage_and_silence():
    server = _Server()
    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.sendall(b"\x00" * 40)
    server.join()
    raw.close()
    assert isinstance(server.error, p.ProtocolError)
