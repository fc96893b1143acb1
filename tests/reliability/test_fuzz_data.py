"""Fuzzing the tcp data port: hostile openings without a valid HELLO, hostile requests with a real token.

Before authentication each frame goes on its own connection: random bytes, truncated HELLOs, wrong tokens,
wrong lengths, magic, versions and ops. Authenticated connections (a token from a hand-made link) carry random
refused requests (ranges outside registered memory, stale guards, writes into a read-only cache), a valid read
now and then (its bytes checked), and end with a frame that must close them. Afterwards the server's fds and
threads are back at their level before, and a real link pulls verified bytes over tcp.
"""
from __future__ import annotations

import numpy as np
import pytest

from llm_datadist import BlocksCacheKey, LLMRole
from llm_datadist._transport import tcp_wire as dwire
from tests.reliability import fuzz, kv, local, wire
from tests.reliability.procs import POOL_WORKERS_PER_INSTANCE, server, settle, thread_census

P = 61
NT, NB, BB = 2, 16, 512
PRE_CONNECTIONS = 2400
SESSIONS = 150  # authenticated connections
REQUESTS_PER_SESSION = 20
BATCH = 48
FD_SLACK = 2


@pytest.fixture
def target(spawn):
    peer, port = server(spawn, P)
    peer.call("blocks", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB)
    link = wire.RawLink(port, 801)
    yield peer, port, link
    link.close()


def _session(rng: np.random.Generator, link: wire.RawLink, view) -> tuple[int, int]:
    """One authenticated connection: refused requests, valid reads, then a fatal frame. (frames, bytes checked)"""
    conn = wire.DataConn(link.data_port)
    assert conn.hello(link.token)
    valid = (view.tensor_addrs[1], view.tensor_nbytes)
    others = [(addr, view.tensor_nbytes) for addr in view.tensor_addrs[:1]]  # served too: a miss may land there
    guard = wire.guard_of(view)[0]
    frames, checked = 1, 0
    try:
        for i in range(REQUESTS_PER_SESSION):
            if i % 7 == 3:  # a valid read among the refusals: the exact bytes must come back
                block = int(rng.integers(0, NB))
                status, data = conn.read([(valid[0] + block * BB, BB)], [guard])
                assert status == dwire.ST_OK and data == kv.content(1, 1, NB, BB)[block].tobytes()
                checked += len(data)
            else:
                op, ranges, guards = fuzz.soft_data_request(rng, valid, guard, others)
                if op == dwire.OP_WRITE:  # the cache is pull-only: refused before any payload is taken
                    status = conn.write(ranges, b"", guards)
                else:
                    status, data = conn.read(ranges, guards)
                    assert data == b""
                assert status in (dwire.ST_REJECTED, dwire.ST_STALE), status
            frames += 1
        fatal, answered = fuzz.fatal_data_frame(rng, (valid[0], BB), guard)
        conn.sock.sendall(fatal)
        frames += 1
        if answered:
            assert conn.reply()[0] == dwire.ST_BAD_FRAME
        assert wire.closed_by_peer(conn.sock, 5.0), f"a fatal frame left the connection open: {fatal[:24].hex()}"
    finally:
        conn.close()
    return frames, checked


def _round(rng: np.random.Generator, link: wire.RawLink, view, pre: int, sessions: int) -> tuple[int, int]:
    frames = checked = 0
    for _ in range(0, pre, BATCH):
        made = [fuzz.data_pre_auth_case(rng, link.token) for _ in range(BATCH)]
        closed = wire.one_shot(link.data_port, [case for case, _must in made])
        for (case, must), gone in zip(made, closed):
            assert gone or not must, f"a refused opening left its connection open: {case[0][:40].hex()}"
        frames += len(made)
    for _ in range(sessions):
        f, c = _session(rng, link, view)
        frames += f
        checked += c
    return frames, checked


def test_the_data_port_survives_thousands_of_hostile_frames(target, make_dd, figures, transport_env):
    peer, port, link = target
    view = link.blocks_view(P)
    rng = np.random.default_rng(20240602)
    cold = peer.usage()
    warm_frames, warm_checked = _round(rng, link, view, BATCH * 4, 10)
    warm, warm_threads = peer.usage(), thread_census(peer)[1]
    frames, checked = _round(rng, link, view, PRE_CONNECTIONS, SESSIONS)
    assert peer.alive()
    fds = settle(lambda: peer.usage().fds, warm.fds + FD_SLACK, 10.0)
    threads = settle(lambda: thread_census(peer)[1], warm_threads, 10.0)
    assert fds <= warm.fds + FD_SLACK, (warm, fds)
    assert threads <= warm_threads, (warm_threads, peer.call("threads")["names"])
    assert thread_census(peer)[0] <= POOL_WORKERS_PER_INSTANCE

    transport_env("tcp")  # the real pull afterwards goes through the fuzzed data server
    dd = make_dd(LLMRole.DECODER, 802)
    local.link(dd, P, port)
    cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB)
    src, dst = list(range(NB))[::-1], list(range(NB))
    dd.cache_manager.pull_blocks(BlocksCacheKey(P, 0), cache, src, dst)
    assert kv.one_generation(arrays, dst, src) == 1
    assert dd._engine.route(P) == "tcp"  # test-only probe: the pull really used the tcp data server
    local.unlink(dd, P, port)
    figures.add("data port: hostile frames survived", warm_frames + frames, "frames")
    figures.add("data port: bytes checked from valid reads among them", warm_checked + checked, "B")
    figures.add("data port: fds cold -> warm -> after the long round", f"{cold.fds} -> {warm.fds} -> {fds}")
    figures.add("data port: threads (not pool workers) warm -> after", f"{warm_threads} -> {threads}")
