"""Data-plane token scope and revocation, and what the handshake frames carry (inspected byte by byte)."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from llm_datadist import LLMRole, LLMStatusCode
from llm_datadist._engine import protocol as proto
from tests.reliability import wire
from tests.reliability.local import cluster
from tests.reliability.procs import server, wait_for

P = 41
SECRET = b"reliability-secret-7f3a"


@pytest.fixture
def owner(spawn):
    peer, port = server(spawn, P)
    peer.call("blocks", name="kv", num_tensors=2, num_blocks=8, block_bytes=256)
    return peer, port


def _serves(link: wire.RawLink, token: bytes) -> bool:
    """Whether a new data connection with ``token`` is accepted and serves a read of the owner's cache."""
    conn = wire.DataConn(link.data_port)
    try:
        if not conn.hello(token):
            return False
        view = link.blocks_view(P)
        status, data = conn.read([(view.tensor_addrs[0], 64)], wire.guard_of(view))
        return status == 0 and len(data) == 64
    finally:
        conn.close()


def _refused(port: int, token: bytes) -> bool:
    conn = wire.DataConn(port)
    try:
        return not conn.hello(token)
    finally:
        conn.close()


def test_a_token_stops_working_at_unlink(owner):
    _peer, port = owner
    link = wire.RawLink(port, 401)
    assert _serves(link, link.token)
    open_conn = wire.DataConn(link.data_port)
    assert open_conn.hello(link.token)
    reply = link.call(proto.Unlink(cluster_id=401))  # the peer's half of an orderly unlink; we keep the socket
    assert isinstance(reply, proto.Ack)
    assert _refused(link.data_port, link.token), "the token still opens data connections after Unlink"
    assert wire.closed_by_peer(open_conn.sock, 5.0), "a data connection of the unlinked link stayed open"
    open_conn.close()
    link.close()


def test_a_token_stops_working_when_its_link_connection_closes(owner):
    _peer, port = owner
    link = wire.RawLink(port, 402)
    open_conn = wire.DataConn(link.data_port)
    assert open_conn.hello(link.token)
    link.close()  # no Unlink: the connection just goes away (a crashed client)
    assert wire.closed_by_peer(open_conn.sock, 5.0)
    assert _refused(link.data_port, link.token)
    open_conn.close()


def test_tokens_are_per_link(owner):
    _peer, port = owner
    a, b = wire.RawLink(port, 403), wire.RawLink(port, 404)
    assert len(a.token) == len(b.token) == 32 and a.token != b.token
    b_conn = wire.DataConn(b.data_port)
    assert b_conn.hello(b.token)
    a.unlink()
    assert _refused(a.data_port, a.token)
    assert _serves(b, b.token), "revoking one link's token hurt another link"
    view = b.blocks_view(P)
    assert b_conn.read([(view.tensor_addrs[1], 32)], wire.guard_of(view))[0] == 0  # b's open connection too
    b_conn.close()
    b.close()


def test_refused_handshakes_carry_no_token_and_no_identity(owner):
    _peer, port = owner
    good = wire.RawLink(port, 405)
    for kwargs, code in (({"ra": True}, LLMStatusCode.LLM_PARAM_INVALID),  # the other transfer mode
                         ({"target": P + 1}, LLMStatusCode.LLM_LINK_FAILED)):  # it wanted another cluster
        with pytest.raises(wire.Refused) as refused:
            wire.RawLink(port, 406, **kwargs)
        ack = refused.value.ack
        assert isinstance(ack, proto.HelloAck) and ack.code == code
        assert (ack.credentials, ack.transports, ack.cluster_id, ack.host_id, ack.pid, ack.nonce) == \
            ({}, {}, 0, "", 0, b"")
        assert good.token not in refused.value.raw
    assert _serves(good, good.token)
    good.close()


def test_a_live_link_is_not_replaced_by_a_claim_without_the_secret(owner):
    """Same cluster id again: refused while the first link answers pings; replaced (old token revoked) once it
    does not."""
    _peer, port = owner
    first = wire.RawLink(port, 407)
    with pytest.raises(wire.Refused) as refused:
        wire.RawLink(port, 407)
    assert refused.value.ack.code == LLMStatusCode.LLM_ALREADY_LINK and refused.value.ack.credentials == {}
    assert first.token not in refused.value.raw
    assert _serves(first, first.token)
    first.answer = False  # now it looks dead to the owner's ping
    second = wire.RawLink(port, 407)
    assert second.token != first.token
    assert wire.closed_by_peer(first.sock, 5.0)
    assert _refused(first.data_port, first.token)
    assert _serves(second, second.token)
    first.close()
    second.close()


def test_with_a_secret_a_proven_claim_replaces_the_link_and_a_wrong_proof_learns_nothing(spawn):
    peer, port = server(spawn, P, config={"link_secret": SECRET.decode()})
    peer.call("blocks", name="kv", num_tensors=2, num_blocks=8, block_bytes=256)
    first = wire.RawLink(port, 408, secret=SECRET)
    with pytest.raises(wire.Refused) as refused:
        wire.RawLink(port, 408, secret=b"not-the-secret")
    assert isinstance(refused.value.ack, proto.AuthResult) and refused.value.ack.code == LLMStatusCode.LLM_LINK_FAILED
    assert first.token not in refused.value.raw and SECRET not in refused.value.raw
    with pytest.raises(wire.Refused) as unproven:
        wire.RawLink(port, 408)  # no secret at all
    assert isinstance(unproven.value.ack, proto.AuthResult)
    assert _serves(first, first.token)
    second = wire.RawLink(port, 408, secret=SECRET)  # first still answers pings: the proof is enough
    assert wire.closed_by_peer(first.sock, 5.0)
    assert _refused(first.data_port, first.token)
    assert _serves(second, second.token)
    first.close()
    second.close()


class FakeServer:
    """A listening socket that plays the server side of one handshake and records every frame it receives."""

    def __init__(self, secret=None) -> None:
        self.secret = secret
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frames = []  # (message, raw bytes), in arrival order
        self.sent_ack = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._serve, name="fake-server", daemon=True)
        self.thread.start()

    def _next(self, sock):
        header, msg, raw = wire.read_frame(sock)
        self.frames.append((msg, raw))
        return header, msg

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
            sock.settimeout(5.0)
            with sock:
                _h, hello = self._next(sock)
                proof = b""
                if self.secret is not None:  # the client proves first, the server's proof rides in HelloAck
                    nonce = os.urandom(32)
                    sock.sendall(wire.frame(proto.AuthChallenge(server_nonce=nonce), reply=True))
                    _h, msg = self._next(sock)
                    assert isinstance(msg, proto.AuthProof), msg
                    assert msg.client_proof == proto.client_proof(self.secret, nonce, hello.client_nonce)
                    proof = proto.server_proof(self.secret, hello.client_nonce, nonce)
                ack = proto.HelloAck(cluster_id=77, role=1, host_id="fake-host", pid=1, transports={},
                                     nonce=os.urandom(16), credentials={"tcp": b"F" * 32}, server_proof=proof)
                sock.sendall(wire.frame(ack, reply=True))
                self.sent_ack.set()
                header, _msg = self._next(sock)  # the client's Credentials request
                sock.sendall(wire.frame(proto.Ack(), header.request_id, reply=True))
                wire.closed_by_peer(sock, 5.0)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.listener.close()


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
def test_a_clients_first_frames_carry_no_token_and_no_secret(make_dd, secret):
    fake = FakeServer(secret)
    attrs = {"link_secret": secret.decode()} if secret else {}
    dd = make_dd(LLMRole.DECODER, 409, **attrs)
    code, _codes = dd.link_clusters([cluster(77, fake.port)], 5000)
    assert code == LLMStatusCode.LLM_SUCCESS
    dd.unlink_clusters([cluster(77, fake.port)], 1000, force=True)
    fake.thread.join(10)
    assert fake.error is None, fake.error
    kinds = [type(msg).__name__ for msg, _raw in fake.frames]
    assert kinds == (["Hello", "AuthProof", "Credentials"] if secret else ["Hello", "Credentials"])
    credentials = fake.frames[-1][0].credentials
    assert len(credentials.get("tcp", b"")) == 32  # what the client grants this server, only after HelloAck
    before_ack = b"".join(raw for _msg, raw in fake.frames[:-1])
    for token in credentials.values():
        assert token not in before_ack
    hello = fake.frames[0][0]
    assert not hasattr(hello, "credentials")
    if secret:
        assert SECRET not in before_ack and len(hello.client_nonce) == 32
    else:
        assert hello.client_nonce == b""
    assert wait_for(lambda: not fake.thread.is_alive(), 5.0)
