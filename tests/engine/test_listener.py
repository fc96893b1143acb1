"""Tests of the control-plane listener: accept, per-connection threads, close, bind errors."""
from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from llm_datadist._engine import errors, rpc
from llm_datadist._engine import protocol as p
from llm_datadist._engine.listener import MAX_PENDING_HANDSHAKES, Listener
from llm_datadist.status import LLMStatusCode
from waiting import NEVER_HANGS_S, wait_until


def test_accepts_on_an_ephemeral_port_and_closes_twice():
    got = []
    done = threading.Event()

    def on_accept(sock, addr):
        got.append((sock.recv(5), addr[0], threading.current_thread().name))
        sock.close()
        done.set()

    listener = Listener("127.0.0.1", 0, on_accept, name="t-listen")
    try:
        assert listener.port > 0
        with socket.create_connection(("127.0.0.1", listener.port)) as client:
            client.sendall(b"hello")
            assert done.wait(5)
    finally:
        listener.close()
    listener.close()
    assert listener.closed
    assert got[0][:2] == (b"hello", "127.0.0.1")
    assert got[0][2].startswith("t-listen")
    assert "closed" in repr(listener)


def test_slow_handshake_does_not_block_other_accepts():
    release = threading.Event()
    seen = []
    first, second = threading.Event(), threading.Event()

    def on_accept(sock, addr):
        seen.append(addr)
        if len(seen) == 1:
            first.set()
            release.wait(NEVER_HANGS_S)  # the first connection is stuck in its "handshake"
        else:
            second.set()
        sock.close()

    listener = Listener("127.0.0.1", 0, on_accept)
    clients = []
    try:
        clients.append(socket.create_connection(("127.0.0.1", listener.port)))
        assert first.wait(NEVER_HANGS_S)
        clients.append(socket.create_connection(("127.0.0.1", listener.port)))
        assert second.wait(NEVER_HANGS_S), "second connection was not served while the first one hung"
        assert not release.is_set()
    finally:
        release.set()
        listener.close()
        for client in clients:
            client.close()


def test_close_stops_the_accept_loop():
    listener = Listener("127.0.0.1", 0, lambda s, a: s.close(), name="t-close")
    port = listener.port
    listener.close()
    # the accept loop ended (close did not give up on joining it): nothing accepts on the port any more
    assert not [t for t in threading.enumerate() if t.name == "t-close-accept"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_port_in_use_is_param_invalid():
    first = Listener("127.0.0.1", 0, lambda s, a: s.close())
    try:
        with pytest.raises(errors.ParamInvalid, match="cannot listen") as info:
            Listener("127.0.0.1", first.port, lambda s, a: s.close())
        assert info.value.code == LLMStatusCode.LLM_PARAM_INVALID
        assert isinstance(info.value.__cause__, OSError)
    finally:
        first.close()


@pytest.mark.parametrize("host, port", [("192.0.2.1", 0), ("127.0.0.1", 70000), ("127.0.0.1", -1)])
def test_bad_address_is_param_invalid(host, port):
    with pytest.raises(errors.ParamInvalid):
        Listener(host, port, lambda s, a: s.close())


def test_failing_callback_is_logged_and_listener_survives(caplog):
    calls = []
    ok = threading.Event()

    def on_accept(sock, addr):
        calls.append(addr)
        if len(calls) == 1:
            raise RuntimeError("bad handshake code")
        sock.close()
        ok.set()

    listener = Listener("127.0.0.1", 0, on_accept)
    try:
        with caplog.at_level(logging.ERROR, logger="llm_datadist._engine.listener"):
            first = socket.create_connection(("127.0.0.1", listener.port))
            first.settimeout(5)
            assert first.recv(1) == b""  # the listener closed the socket after the failure
            first.close()
            socket.create_connection(("127.0.0.1", listener.port)).close()
            assert ok.wait(5)
        assert any("failed" in r.getMessage() for r in caplog.records)
    finally:
        listener.close()


def test_listener_handshake_and_rpc_end_to_end():
    links = []
    ready = threading.Event()

    def decide(hello):
        return p.HelloAck(cluster_id=2, role=1, host_id="srv", pid=2, remote_cache_accessible=True,
                          transports={})

    def on_accept(sock, addr):
        sock, hello, ack = rpc.accept_handshake(sock, time.monotonic() + 5, b"k", decide)
        links.append(rpc.Connection(sock, lambda c, m: p.Ack(code=hello.cluster_id), name="srv"))
        ready.set()

    listener = Listener("127.0.0.1", 0, on_accept)
    hello = p.Hello(protocol_version=p.PROTOCOL_VERSION, cluster_id=7, role=0, host_id="cli", pid=1,
                    remote_cache_accessible=True, transports={})
    try:
        sock, ack = rpc.open_connection("127.0.0.1", listener.port, hello, time.monotonic() + 5, b"k")
        assert ack.cluster_id == 2
        client = rpc.Connection(sock, None, name="cli")
        assert ready.wait(5)
        assert client.call(p.Ping(), time.monotonic() + 5) == p.Ack(code=7)
        client.close()
    finally:
        listener.close()
        for link in links:
            link.close()


def test_a_burst_beyond_the_cap_cuts_one_old_handshake_per_new_one():
    """Handshakes that never end (their callback waits for the client to close) arrive while the cut ones' threads
    are slow to leave: each new connection beyond MAX_PENDING_HANDSHAKES still cuts one more of the oldest (cutting
    the same oldest one again and again until its thread has left would leave many more waiting), and once the
    burst is in, exactly MAX_PENDING_HANDSHAKES wait, the newest ones."""
    extra = 40
    burst = MAX_PENDING_HANDSHAKES + extra
    waiting, cut = [0], [0]
    lock = threading.Lock()
    leave = threading.Event()  # holds the threads of cut handshakes until the whole burst is in

    def on_accept(sock, addr):
        with lock:
            waiting[0] += 1
        try:
            sock.recv(1)  # returns only when the listener cuts this socket or the client closes it
            with lock:
                cut[0] += 1
            leave.wait(NEVER_HANGS_S)
        finally:
            with lock:
                waiting[0] -= 1
            sock.close()

    listener = Listener("127.0.0.1", 0, on_accept, name="t-burst")
    clients = []
    try:
        for _ in range(burst):
            clients.append(socket.create_connection(("127.0.0.1", listener.port), timeout=NEVER_HANGS_S))
        assert wait_until(lambda: cut[0] == extra), cut[0]
        leave.set()
        assert wait_until(lambda: waiting[0] == MAX_PENDING_HANDSHAKES), waiting[0]
        assert _closed_by_peer(clients[:extra]) == extra, "the oldest were not the ones cut"
        assert not any(_is_closed(c) for c in clients[extra:]), "a newer handshake was cut"
    finally:
        leave.set()
        for client in clients:
            client.close()
        listener.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("t-burst")]


def _is_closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _closed_by_peer(socks) -> int:
    return sum(_is_closed(s) for s in socks)
