"""Notifications when a peer dies or strangers talk to a listener: a SIGKILLed peer's link-down event comes after
its notifications and within a bounded wait; a raw socket cannot queue a notification without linking, nor, with a
link secret, without the secret."""
from __future__ import annotations

import os
import signal
import socket
import threading
from typing import List

import pytest

from llm_datadist import LLMConfig, LLMDataDist, LLMException, LLMRole, LLMStatusCode, notifications
from llm_datadist._engine import protocol as proto
from tests.api.notify_peer import PeerClient
from tests.reliability import wire

SECRET = "notify-tests-secret-long-enough-0123456789"
SERVER = 11
EVENT_WAIT_MS = 10_000  # a bound only a hang reaches


def _server(secret: str = "") -> LLMDataDist:
    options = LLMConfig()
    options.enable_cache_manager = True
    options.enable_remote_cache_accessible = True
    options.listen_ip_info = "127.0.0.1:0"
    if secret:
        options.link_secret = secret
    datadist = LLMDataDist(LLMRole.PROMPT, SERVER)
    datadist.init(options.generate_options())
    return datadist


@pytest.fixture
def server():
    datadist = _server()
    yield datadist
    datadist.finalize()


@pytest.fixture
def secret_server():
    datadist = _server(SECRET)
    yield datadist
    datadist.finalize()


def _port(datadist: LLMDataDist) -> int:
    address = notifications.listen_address(datadist)
    assert address is not None
    return address[1]


def test_sigkilled_peer_is_reported_after_its_notifications(server):
    events: List[object] = []
    down = threading.Event()

    def on_down(event):
        events.append(event)
        down.set()

    notifications.set_callback(server, events.append)
    notifications.on_link_down(server, on_down)
    peer = PeerClient()
    try:
        peer.call("init", cluster_id=42)
        assert peer.call("link", cluster_id=SERVER, port=_port(server))["code"] == "LLM_SUCCESS"
        assert peer.call("send", cluster_id=SERVER, payloads=[b"one".hex(), b"two".hex()])["sent"] == 2
        os.kill(peer.proc.pid, signal.SIGKILL)
    finally:
        peer.kill()
    assert down.wait(EVENT_WAIT_MS / 1000)
    assert [e.payload for e in events[:2]] == [b"one", b"two"]
    assert len(events) == 3
    event = events[2]
    assert isinstance(event, notifications.LinkDown)
    assert (event.cluster_id, event.cause, event.linked) == (42, "lost", False)
    assert event.link_id == events[0].link_id  # the link the notifications came over
    with pytest.raises(LLMException) as info:
        notifications.send(server, 42, b"to the dead")
    assert info.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK


def test_sigkilled_peer_is_a_polled_event_too(server):
    peer = PeerClient()
    try:
        peer.call("init", cluster_id=43)
        assert peer.call("link", cluster_id=SERVER, port=_port(server))["code"] == "LLM_SUCCESS"
        os.kill(peer.proc.pid, signal.SIGKILL)
    finally:
        peer.kill()
    downs = notifications.poll_link_down(server, timeout_ms=EVENT_WAIT_MS)
    assert [(d.cluster_id, d.cause) for d in downs] == [(43, "lost")]


def _notify_frame(text: bytes) -> bytes:
    return wire.frame(proto.Notify(payload=text), request_id=1)


def _legit_notification_only(datadist: LLMDataDist, secret: str = "") -> None:
    """A linked peer's notification is the one and only queued: nothing a stranger sent before was."""
    peer = PeerClient()
    try:
        peer.call("init", cluster_id=44, secret=secret)
        assert peer.call("link", cluster_id=SERVER, port=_port(datadist))["code"] == "LLM_SUCCESS"
        assert peer.call("send", cluster_id=SERVER, payloads=[b"legit".hex()])["code"] == "LLM_SUCCESS"
    finally:
        peer.close()
    assert [(n.cluster_id, n.payload) for n in notifications.poll(datadist, 100)] == [(44, b"legit")]


def test_stranger_cannot_notify_without_linking(server):
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as sock:
        sock.sendall(_notify_frame(b"injected"))  # a Notify where the handshake wants Hello
        assert wire.closed_by_peer(sock, EVENT_WAIT_MS / 1000)
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as sock:
        sock.sendall(_notify_frame(b"injected") * 4 + wire.frame(wire.hello(66, ra=True)))
        assert wire.closed_by_peer(sock, EVENT_WAIT_MS / 1000)
    _legit_notification_only(server)


def test_stranger_cannot_notify_without_the_secret(secret_server):
    port = _port(secret_server)
    # Hello without a proof, then a notification: refused before any link exists
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire.frame(wire.hello(66, ra=True)) + _notify_frame(b"injected"))
        _, reply, _ = wire.read_frame(sock)
        assert isinstance(reply, proto.AuthResult) and reply.code != 0
        assert wire.closed_by_peer(sock, EVENT_WAIT_MS / 1000)
    # a wrong proof, then a notification
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire.frame(wire.hello(67, ra=True, nonce=os.urandom(32))))
        _, challenge, _ = wire.read_frame(sock)
        assert isinstance(challenge, proto.AuthChallenge)
        sock.sendall(wire.frame(proto.AuthProof(client_proof=b"\0" * 32)) + _notify_frame(b"injected"))
        _, reply, _ = wire.read_frame(sock)
        assert isinstance(reply, proto.AuthResult) and reply.code != 0
        assert wire.closed_by_peer(sock, EVENT_WAIT_MS / 1000)
    # a real peer with another secret cannot link, so it has nobody to notify
    stranger = PeerClient()
    try:
        stranger.call("init", cluster_id=68, secret="another-secret-long-enough-0123456789")
        assert stranger.call("link", cluster_id=SERVER, port=port)["code"] == "LLM_LINK_FAILED"
        assert stranger.call("send", cluster_id=SERVER, payloads=[b"x".hex()])["code"] == "LLM_NOT_YET_LINK"
    finally:
        stranger.close()
    _legit_notification_only(secret_server, SECRET)
