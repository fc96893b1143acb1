"""Fuzzing the control listener: thousands of hostile frames, then the server still links and serves exact bytes.

One server process holds two listening instances, one without and one with a link secret. Before a link
exists every frame goes on its own connection (random bytes, truncated, mutated and oversized Hellos, wrong
versions, types and flags, a wrong first message, broken fields, and for the secret instance broken
authentication); inside established links random requests of every type, stray replies and notifications
flow, and each link ends with a frame that must drop it. Afterwards the server's fds and threads come back to
their level before, and real links pull verified bytes from both instances.
"""
from __future__ import annotations

import socket

import numpy as np
import pytest

from llm_datadist import BlocksCacheKey, LLMRole
from llm_datadist._engine import protocol as proto
from tests.reliability import fuzz, kv, local, wire
from tests.reliability.procs import POOL_WORKERS_PER_INSTANCE, free_port, settle, thread_census

P, P_SECRET = 51, 52
SECRET = b"fuzz-secret-0a1b"
NT, NB, BB = 2, 8, 512
PRE_CONNECTIONS = 2400  # one frame each
AUTH_CONNECTIONS = 300  # broken authentication against the secret instance (2 frames each)
LINKS = 120  # established links, each fed requests and ended by a fatal frame
REQUESTS_PER_LINK = 12
BATCH = 48
FD_SLACK = 2  # after the warm-up round nothing may accumulate (2: a socket the kernel is still closing)


@pytest.fixture
def target(spawn):
    peer = spawn()
    ports = {}
    for cid, inst, extra in ((P, "main", {}), (P_SECRET, "sec", {"link_secret": SECRET.decode()})):
        ports[inst] = free_port()
        config = {"enable_cache_manager": True, "listen_ip_info": f"127.0.0.1:{ports[inst]}", **extra}
        peer.call("init", role=1, cluster_id=cid, config=config, inst=inst)
        peer.call("blocks", name=inst, num_tensors=NT, num_blocks=NB, block_bytes=BB, inst=inst)
    for inst, secret in (("main", None), ("sec", SECRET)):  # warm up: the first link starts the link poller
        wire.RawLink(ports[inst], 599, secret=secret).close()
    return peer, ports


def _auth_case(rng: np.random.Generator, port: int) -> int:
    """Hello with a nonce, then a broken answer to the challenge; returns the frames sent (the server must close)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    with sock:
        nonce = proto.make_nonce()
        pick = int(rng.integers(0, 6))
        if pick == 0:  # no nonce, or a short one: refused before any challenge
            sock.sendall(wire.frame(wire.hello(int(rng.integers(1, 1000)), nonce=nonce[:int(rng.integers(0, 16))])))
            assert isinstance(wire.read_frame(sock)[1], proto.AuthResult)
            return 1
        sock.sendall(wire.frame(wire.hello(int(rng.integers(1, 1000)), nonce=nonce)))
        _h, challenge, _raw = wire.read_frame(sock)
        assert isinstance(challenge, proto.AuthChallenge)
        proof = proto.client_proof(SECRET, challenge.server_nonce, nonce)
        bad = [wire.frame(proto.AuthProof(client_proof=fuzz.flip(rng, proof, 3))),
               wire.frame(proto.AuthProof(client_proof=b"")),
               wire.frame(proto.AuthProof(client_proof=proof))[:-int(rng.integers(1, 20))],
               wire.frame(wire.hello(7, nonce=nonce)),
               fuzz.control_header(4, 2**31)][pick - 1]
        sock.sendall(bad)
        if pick == 3:
            sock.shutdown(socket.SHUT_WR)
        assert wire.closed_by_peer(sock, 5.0), f"auth case {pick} left the connection open"
        return 2


def _feed_link(rng: np.random.Generator, link: wire.RawLink) -> int:
    """Random requests (each answered), notifications and stray replies on a live link; returns frames sent."""
    sent = 0
    for _ in range(REQUESTS_PER_LINK):
        msg = fuzz.random_message(rng)
        kind = int(rng.integers(0, 5))
        if kind == 0:
            link.send(wire.frame(msg, 0))  # a notification: nobody answers it
        elif kind == 1:
            link.send(wire.frame(msg, int(rng.integers(1, 2**40)), reply=True))  # a reply nobody asked for
        else:
            reply = link.call(msg)
            assert isinstance(reply, (proto.Error, proto.Ack, proto.CacheView, proto.Table, proto.Granted,
                                  proto.DialConfirmed)), reply
        sent += 1
    assert isinstance(link.call(proto.Ping()), proto.Ack)
    return sent + 1


def _verify_pulls(make_dd, port: int, cluster_id: int, secret=None) -> None:
    attrs = {"link_secret": secret.decode()} if secret else {}
    dd = make_dd(LLMRole.DECODER, 590 + cluster_id, **attrs)
    local.link(dd, cluster_id, port)
    cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB)
    src, dst = [3, 0, 7, 5], [1, 6, 2, 4]
    dd.cache_manager.pull_blocks(BlocksCacheKey(cluster_id, 0), cache, src, dst)
    assert kv.one_generation(arrays, dst, src) == 1
    local.unlink(dd, cluster_id, port)


def _round(rng: np.random.Generator, ports: dict, pre: int, auth: int, links: int) -> tuple[int, int]:
    """One fuzzing round; returns (frames sent, connections the server had to drop on its own)."""
    frames = must_close = 0
    for start in range(0, pre, BATCH):
        port = ports["main"] if (start // BATCH) % 4 else ports["sec"]  # the secret instance gets every 4th batch
        made = [fuzz.pre_handshake_case(rng, 600 + i) for i in range(BATCH)]
        closed = wire.one_shot(port, [case for case, _must in made])
        for (_case, must), gone in zip(made, closed):
            must_close += must
            assert gone or not must, "a frame that must be dropped left its connection open"
        frames += len(made)
    for _ in range(auth):
        frames += _auth_case(rng, ports["sec"])
    for i in range(links):
        secret = SECRET if i % 5 == 0 else None
        link = wire.RawLink(ports["sec" if secret else "main"], 700 + i, secret=secret)
        frames += _feed_link(rng, link)
        fatal = fuzz.fatal_control_frame(rng)
        link.send(fatal)
        frames += 1
        assert link.closed.wait(5.0), f"the link survived a fatal frame {fatal[:24].hex()}"
        link.close()
    return frames, must_close


def test_the_control_listener_survives_thousands_of_hostile_frames(target, make_dd, figures):
    """A short warm-up round fills the bounded pools (link handlers start on demand); the long round after it
    must leave no fd or thread behind."""
    peer, ports = target
    rng = np.random.default_rng(20240601)
    cold = peer.usage()
    warm_frames, _ = _round(rng, ports, BATCH * 4, 20, 10)
    warm, warm_threads = peer.usage(), thread_census(peer)[1]
    frames, must_close = _round(rng, ports, PRE_CONNECTIONS, AUTH_CONNECTIONS, LINKS)
    assert peer.alive()
    fds = settle(lambda: peer.usage().fds, warm.fds + FD_SLACK, 10.0)
    threads = settle(lambda: thread_census(peer)[1], warm_threads, 10.0)
    assert fds <= warm.fds + FD_SLACK, (warm, fds)
    assert threads <= warm_threads, (warm_threads, peer.call("threads")["names"])
    assert thread_census(peer)[0] <= 2 * POOL_WORKERS_PER_INSTANCE
    _verify_pulls(make_dd, ports["main"], P)
    _verify_pulls(make_dd, ports["sec"], P_SECRET, SECRET)
    figures.add("control port: hostile frames survived", warm_frames + frames, "frames")
    figures.add("control port: frames the server had to drop at once, dropped", must_close, "connections")
    figures.add("control port: fds cold -> warm -> after the long round", f"{cold.fds} -> {warm.fds} -> {fds}")
    figures.add("control port: threads (not pool workers) warm -> after", f"{warm_threads} -> {threads}")
