"""Resource caps: idle and oversized strangers on both ports never block a real link; the link cap holds."""
from __future__ import annotations

import selectors
import socket
import time
from typing import List

import pytest

from llm_datadist import BlocksCacheKey, LLMRole, LLMStatusCode
from llm_datadist._engine import protocol as proto
from llm_datadist._engine.listener import MAX_PENDING_HANDSHAKES
from tests.reliability import fuzz, kv, local, wire
from waiting import wait_until
from tests.reliability.procs import accepted_on, server, wait_for

P = 71
NT, NB, BB = 2, 16, 4096
IDLE_CONTROL, IDLE_DATA = 200, 300
OVERSIZED = 100


def _open(port: int, count: int, first: bytes = b"") -> List[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first:
            sock.sendall(first)
        socks.append(sock)
    return socks


def _held(socks: List[socket.socket]) -> int:
    """How many of our connections the server still holds open."""
    count = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            count += sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


def _steady(peer, timeout: float = 5.0):
    """The server's usage once its fd count stopped changing (two readings 0.1 s apart agree)."""
    seen = [None]  # the previous reading: the first check only takes one

    def steady() -> bool:
        now = peer.usage()
        same = seen[0] is not None and now.fds == seen[0].fds
        seen[0] = now
        return same

    wait_until(steady, timeout, 0.1)
    return seen[0]


def _close(socks: List[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def _pull_and_check(dd, cache, arrays) -> None:
    src, dst = [15, 2, 9, 4], [0, 1, 2, 3]
    local.mark(arrays)
    dd.cache_manager.pull_blocks(BlocksCacheKey(P, 0), cache, src, dst)
    assert kv.one_generation(arrays, dst, src) == 1


@pytest.fixture
def owner(spawn):
    peer, port = server(spawn, P)
    peer.call("blocks", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB)
    probe = wire.RawLink(port, 799)  # learns the data port; also starts the link poller (a lazy thread)
    data_port = probe.data_port
    probe.close()
    # the tests count what the server holds on its ports: the probe's link must be gone there first
    assert wait_for(lambda: accepted_on(peer.pid, port) + accepted_on(peer.pid, data_port) == 0, 10.0)
    return peer, port, data_port


def test_idle_sockets_on_both_ports_do_not_block_a_new_link_and_its_pulls(owner, make_dd, figures, transport_env):
    """The idle sockets sit there while a new link is made and pulls run over tcp; what each one costs the server
    (RSS per connection it accepted) is reported."""
    peer, port, data_port = owner
    transport_env("tcp")  # the pulls go through the data port the idle sockets sit on
    # The listener's sockets first: it gives a handshake 10 s, the data port gives a HELLO only 2 s, so the data
    # port's idle sockets are opened last, right before the link, and are still there while it is made.
    before = peer.usage()
    # as many as the listener holds, none cut yet: their cost is read while every one of them is open
    control = _open(port, MAX_PENDING_HANDSHAKES)
    assert wait_for(lambda: accepted_on(peer.pid, port) == MAX_PENDING_HANDSHAKES, 10.0)
    with_control, n_control = peer.usage(), accepted_on(peer.pid, port)
    # beyond the cap the listener cuts the oldest: count the data port's sockets only once the cut ones are
    # closed, so that the listener's fds no longer fall while the data port's rise
    control += _open(port, IDLE_CONTROL - MAX_PENDING_HANDSHAKES)
    assert wait_for(lambda: _held(control) <= MAX_PENDING_HANDSHAKES, 10.0)
    settled = _steady(peer)
    data = _open(data_port, IDLE_DATA)
    assert wait_for(lambda: accepted_on(peer.pid, data_port) >= IDLE_DATA // 2, 10.0)  # accepted, before HELLO
    with_data, n_data = peer.usage(), accepted_on(peer.pid, data_port)
    held = (_held(control), _held(data))
    try:
        dd = make_dd(LLMRole.DECODER, 702)
        local.link(dd, P, port)
        cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB)
        _pull_and_check(dd, cache, arrays)
        still = (_held(control), _held(data))
        assert dd._engine.route(P) == "tcp"  # test-only probe
    finally:
        _close(control + data)
    local.unlink(dd, P, port)
    per_control = (with_control.rss_kib - before.rss_kib) / max(n_control, 1)
    per_data = (with_data.rss_kib - settled.rss_kib) / max(n_data, 1)
    figures.add(f"idle sockets: {IDLE_CONTROL} on the listener, still open while linking", f"{held[0]} -> {still[0]}")
    figures.add(f"idle sockets: {IDLE_DATA} on the data port, still open while linking", f"{held[1]} -> {still[1]}")
    figures.add("idle sockets: server threads before -> with them", f"{before.threads} -> {with_data.threads}")
    figures.add("idle sockets: RSS per accepted listener connection", per_control, "KiB")
    figures.add("idle sockets: RSS per accepted data-port connection", per_data, "KiB")


def _close_times(socks: List[socket.socket], timeout: float) -> List[float]:
    """Seconds until the server closed each socket (inf where it did not within ``timeout``)."""
    start = time.monotonic()
    times = [float("inf")] * len(socks)
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
    while sel.get_map() and time.monotonic() - start < timeout:
        for key, _ in sel.select(0.05):
            try:
                gone = key.fileobj.recv(4096) == b""
            except BlockingIOError:
                continue
            except OSError:
                gone = True
            if gone:
                times[key.data] = time.monotonic() - start
                sel.unregister(key.fileobj)
    sel.close()
    return times


def test_strangers_that_never_say_hello_are_cut_the_oldest_first(owner, figures):
    """Beyond 64 waiting handshakes the oldest is cut at once; the rest go at the Hello deadline (3 s on the
    listener, 2 s on the data port). None is held longer."""
    _peer, port, data_port = owner
    control = _open(port, 100)
    data = _open(data_port, 50)
    try:
        control_times = _close_times(control + data, 8.0)
    finally:
        _close(control + data)
    control_times, data_times = control_times[:100], control_times[100:]
    assert max(control_times + data_times) < 8.0, "a stranger was held past its Hello deadline"
    oldest, newest = sorted(control_times[:30]), sorted(control_times[-30:])
    assert oldest[15] < newest[15], (oldest, newest)  # the oldest were cut first
    figures.add("strangers: listener cuts the oldest 30 / newest 30 after (median)",
                f"{oldest[15]:.2f} s / {newest[15]:.2f} s")
    figures.add("strangers: the data port drops idle ones after (slowest)", f"{max(data_times):.2f} s")


def test_oversized_frames_before_authentication_are_dropped_at_their_header(owner, figures):
    peer, port, data_port = owner
    before = peer.usage()
    control = [(fuzz.control_header(1, 2**32 - 1) + b"x" * 1024, False) for _ in range(OVERSIZED)]
    control += [(fuzz.control_header(1, proto.HANDSHAKE_FRAME_BYTES + 1), False) for _ in range(OVERSIZED)]
    assert all(wire.one_shot(port, control))
    data = [(wire.data_header(1, nbytes=2**63) + b"t" * 32, False) for _ in range(OVERSIZED)]
    assert all(wire.one_shot(data_port, data))
    assert wait_for(lambda: accepted_on(peer.pid, port) + accepted_on(peer.pid, data_port) == 0, 10.0)
    after = peer.usage()
    # the largest frame a stranger may announce (64 KiB), its body withheld: what one held connection costs
    withheld = _open(port, 32, fuzz.control_header(1, proto.HANDSHAKE_FRAME_BYTES))
    assert wait_for(lambda: accepted_on(peer.pid, port) == len(withheld), 10.0)
    with_withheld = peer.usage()
    _close(withheld)
    assert peer.alive()
    figures.add("oversized headers before authentication, dropped", f"{len(control)} control, {len(data)} data")
    figures.add("oversized headers: server RSS change", after.rss_kib - before.rss_kib, "KiB")
    figures.add("64 KiB frame announced, body withheld: RSS per connection",
                (with_withheld.rss_kib - after.rss_kib) / len(withheld), "KiB")


def test_the_link_cap_refuses_the_link_beyond_it(spawn, make_dd, figures):
    cap = 3
    peer, port = server(spawn, P, env={"LLM_DATADIST_MAX_LINKS": str(cap)})
    peer.call("blocks", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB)
    raw = [wire.RawLink(port, 710 + i) for i in range(cap)]
    with pytest.raises(wire.Refused) as refused:
        wire.RawLink(port, 720)
    assert refused.value.ack.code == LLMStatusCode.LLM_LINK_FAILED and refused.value.ack.credentials == {}
    assert "LLM_DATADIST_MAX_LINKS" in refused.value.ack.message
    dd = make_dd(LLMRole.DECODER, 721)
    code, codes = dd.link_clusters([local.cluster(P, port)], 3000)
    assert (code, codes) == (LLMStatusCode.LLM_LINK_FAILED, [LLMStatusCode.LLM_LINK_FAILED])
    for link in raw:  # the links held are untouched by the refusals
        assert isinstance(link.call(proto.Ping()), proto.Ack)
    raw.pop().close()
    assert wait_for(lambda: dd.link_clusters([local.cluster(P, port)], 3000)[0] == LLMStatusCode.LLM_SUCCESS,
                    10.0, 0.05)
    cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB)
    _pull_and_check(dd, cache, arrays)
    local.unlink(dd, P, port)
    for link in raw:
        link.close()
    figures.add("link cap (LLM_DATADIST_MAX_LINKS)", f"{cap} held, the next refused with LLM_LINK_FAILED")
