"""The tcp data server's serving slots: one link cannot take them all, idle connections give theirs back.

The attacks go over raw sockets with a real per-link token (a hand-made link); the positive controls are real
clients: a decode instance in this process pulling over tcp, and a tcp transport pair whose pooled connections
the server closed while they sat idle.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import List, Optional

import numpy as np
import pytest

from llm_datadist import BlocksCacheKey, LLMRole
from llm_datadist._transport import tcp, tcp_server, tls
from llm_datadist._transport.ranges import RangeTable
from llm_datadist._transport import tcp_wire as dwire
from llm_datadist._transport.base import CopyPlan, PeerInfo, Region, TransportContext
from tests.reliability import kv, local, wire
from tests.reliability.procs import accepted_on, server, wait_for

P = 73
NT, NB, BB = 2, 16, 4096
FLOOD = 300  # data connections one link opens with its token, far beyond its cap
PULLS = 10
IDLE_S = 2.0  # the lowered idle limit of the server processes below


def _tcp_data_threads(peer) -> int:
    return sum(1 for name in peer.call("threads")["names"] if name == "tcp-data-conn")


def _hello_status(conn: wire.DataConn) -> Optional[int]:
    """The status of the server's reply to a HELLO already sent; None when it closed without one."""
    try:
        op, status, _c, _g, _n = dwire.parse_header(wire.recv_exactly(conn.sock, dwire.HDR.size))
    except (ConnectionError, OSError):
        return None
    assert op == dwire.OP_REPLY, op
    return status


def _gone(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (without waiting; nothing else ever arrives on an idle one)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def _expected(tensor: int, block: int) -> bytes:
    return kv.content(1, tensor, NB, BB)[block].tobytes()


def _pull(dd, cache, arrays, k: int) -> bool:
    """One pull of four blocks chosen by ``k``; True when every pulled byte is the owner's."""
    src = [(k + 3 * j) % NB for j in range(4)]
    dst = [0, 1, 2, 3]
    local.mark(arrays)
    dd.cache_manager.pull_blocks(BlocksCacheKey(P, 0), cache, src, dst)
    return kv.one_generation(arrays, dst, src) == 1


CAP_TEST_IDLE_S = 120.0  # the cap test's server: no connection it served may be closed as idle meanwhile


def _owner(spawn, idle_s: float):
    """A prefill process (its idle limit set to ``idle_s``) owning a blocks cache; (peer, port, data port)."""
    peer, port = server(spawn, P, env={"LLM_DATADIST_TCP_IDLE_S": str(idle_s)})
    peer.call("blocks", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB)
    probe = wire.RawLink(port, 739)  # learns the data port
    data_port = probe.data_port
    probe.close()
    assert wait_for(lambda: accepted_on(peer.pid, data_port) == 0, 10.0)
    return peer, port, data_port


@pytest.fixture
def owner(spawn):
    """The owner with its idle limit lowered to IDLE_S."""
    return _owner(spawn, IDLE_S)


@pytest.fixture
def patient_owner(spawn):
    """The owner with a long idle limit: on a loaded host the burst below may take longer than IDLE_S, and a
    served connection closed as idle would free a slot of the cap that the test counts as still held."""
    return _owner(spawn, CAP_TEST_IDLE_S)


def test_one_link_gets_at_most_its_cap_and_another_link_still_pulls(patient_owner, make_dd, transport_env,
                                                                     figures):
    peer, port, data_port = patient_owner
    cap = tcp_server.MAX_PER_LINK
    transport_env("tcp")
    attacker = wire.RawLink(port, 731)
    conns: List[wire.DataConn] = []
    dd = None
    try:
        for _ in range(FLOOD):  # every HELLO goes out before any reply is read: one burst at the poller
            conn = wire.DataConn(data_port)
            conns.append(conn)
            conn.sock.sendall(wire.data_header(dwire.OP_HELLO, nbytes=len(attacker.token)) + attacker.token)
        statuses = [_hello_status(conn) for conn in conns]
        served = [conn for conn, status in zip(conns, statuses) if status == dwire.ST_OK]
        refused = [status for status in statuses if status != dwire.ST_OK]
        assert len(served) == cap, f"{len(served)} of {FLOOD} connections of one link were served (cap {cap})"
        assert set(refused) <= {dwire.ST_REJECTED, None}, set(refused)
        assert wait_for(lambda: accepted_on(peer.pid, data_port) == cap, 10.0), accepted_on(peer.pid, data_port)
        assert _tcp_data_threads(peer) == cap  # the refused ones never had a serving thread

        # the positive control: another link pulls over tcp while the attacker holds its cap's worth
        dd = make_dd(LLMRole.DECODER, 732)
        local.link(dd, P, port)
        cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB)
        ok = 0
        for k in range(PULLS):
            ok += _pull(dd, cache, arrays, k)
        assert dd._engine.route(P) == "tcp"  # test-only probe: the pulls went through the data server
        assert ok == PULLS, f"{ok}/{PULLS} pulls of the other link succeeded"

        # the attacker's served connections are still there and still serve (the cap refused only the rest)
        assert not any(_gone(conn.sock) for conn in served)
        view = attacker.blocks_view(P)
        status, data = served[0].read([(view.tensor_addrs[1] + 5 * BB, BB)], wire.guard_of(view))
        assert status == dwire.ST_OK and data == _expected(1, 5)
    finally:
        for conn in conns:
            conn.close()
        attacker.close()
    local.unlink(dd, P, port)
    figures.add(f"data slots: one link opened {FLOOD} data connections", f"{cap} served, {len(refused)} refused")
    figures.add("data slots: another link's tcp pulls meanwhile", f"{ok}/{PULLS}")


def test_idle_and_stalled_connections_are_closed_while_an_active_one_keeps_working(owner, figures):
    peer, port, data_port = owner
    link = wire.RawLink(port, 733)
    view = link.blocks_view(P)
    guard = wire.guard_of(view)
    idle, active, stalled = (wire.DataConn(data_port) for _ in range(3))
    try:
        idle.sock.sendall(wire.data_header(dwire.OP_HELLO, nbytes=len(link.token)) + link.token)
        op, status, idle_ms, _g, _n = dwire.parse_header(wire.recv_exactly(idle.sock, dwire.HDR.size))
        assert (op, status, idle_ms) == (dwire.OP_REPLY, dwire.ST_OK, int(IDLE_S * 1000))  # the announced limit
        assert active.hello(link.token) and stalled.hello(link.token)
        stalled.sock.sendall(wire.data_header(dwire.OP_READ, count=1, nbytes=BB, guards=1))  # its ranges withheld
        start = time.monotonic()
        reads = 0
        deadline = start + 10 * IDLE_S
        while not (_gone(idle.sock) and _gone(stalled.sock)) and time.monotonic() < deadline:
            block = reads % NB
            status, data = active.read([(view.tensor_addrs[0] + block * BB, BB)], guard)
            assert status == dwire.ST_OK and data == _expected(0, block), f"read {reads} failed: {status}"
            reads += 1
            time.sleep(0.05)
        waited = time.monotonic() - start
        assert _gone(idle.sock), f"an idle connection was still open after {waited:.1f} s"
        assert _gone(stalled.sock), f"a connection stalled inside a request was still open after {waited:.1f} s"
        assert not _gone(active.sock)
        assert wait_for(lambda: accepted_on(peer.pid, data_port) == 1, 10.0)  # the active one only
        status, data = active.read([(view.tensor_addrs[1] + 2 * BB, 3 * BB)], guard)
        assert status == dwire.ST_OK and data == b"".join(_expected(1, b) for b in (2, 3, 4))
    finally:
        for conn in (idle, active, stalled):
            conn.close()
        link.close()
    figures.add(f"data slots: idle and stalled connections closed (limit {IDLE_S:.0f} s) after", waited, "s")
    figures.add("data slots: reads of the active connection meanwhile", reads)


def test_a_decode_pulls_again_after_the_server_closed_its_idle_connections(owner, make_dd, transport_env):
    peer, port, data_port = owner
    transport_env("tcp")
    dd = make_dd(LLMRole.DECODER, 734)
    local.link(dd, P, port)
    cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB)
    for k in range(3):
        assert _pull(dd, cache, arrays, k), f"pull {k}"
        assert dd._engine.route(P) == "tcp"  # test-only probe
        # the server closes the pooled connections once they sat idle for IDLE_S; the next pull must not notice
        assert wait_for(lambda: accepted_on(peer.pid, data_port) == 0, 10 * IDLE_S)
    assert _pull(dd, cache, arrays, 7)
    local.unlink(dd, P, port)


# -- a tcp transport pair in this process: the client's pool against a server that closes idle connections ----
class _Pair:
    """A serving tcp transport with a patterned region and a client transport connected to it."""

    def __init__(self, nbytes: int, tls_config=None) -> None:
        ctx = TransportContext(host_id="data-slots-host", pid=os.getpid(), bind_host="127.0.0.1", tls=tls_config)
        self.server = tcp.TcpTransport(ctx)
        self.client = tcp.TcpTransport(ctx)
        self.source = np.random.default_rng(7).integers(0, 256, nbytes, dtype=np.uint8)
        self.dest = np.zeros(nbytes, dtype=np.uint8)
        self.server.register(Region(self.source.ctypes.data, nbytes))
        self.client.register(Region(self.dest.ctypes.data, nbytes, writable=True))
        token = self.server.grant(1)
        peer = PeerInfo(cluster_id=1, host_id="data-slots-host", pid=os.getpid(), address="127.0.0.1",
                        descriptor=self.server.local_info(), credential=token, nonce=b"")
        self.channel = self.client.connect(peer, time.monotonic() + 10)

    def read_all(self) -> bool:
        """Read the region's two halves into the other halves of ours (two ranges that cannot merge: a transfer
        of several streams may spread them); True when every byte arrived where it belongs."""
        self.dest[:] = 0
        half = self.source.nbytes // 2
        dst, src = self.dest.ctypes.data, self.source.ctypes.data
        plan = CopyPlan(np.array([dst, dst + half], dtype=np.uint64), np.array([src + half, src], dtype=np.uint64),
                        np.array([half, half], dtype=np.uint64))
        self.client.read(self.channel, plan, time.monotonic() + 20)
        return bool(np.array_equal(self.dest[:half], self.source[half:])
                    and np.array_equal(self.dest[half:], self.source[:half]))

    def serving(self) -> int:
        return self.server.server.connections[1]  # type: ignore[union-attr]

    def close(self) -> None:
        self.client.disconnect(self.channel)
        self.client.close()
        self.server.close()


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tls.Tls:
    """One CA and one certificate it signed (both ends present it)."""
    cwd = str(tmp_path_factory.mktemp("pki"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=ca", cwd=cwd)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "end.key", "-out", "end.csr", "-subj", "/CN=end",
             cwd=cwd)
    _openssl("x509", "-req", "-in", "end.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "end.pem", "-days", "2", cwd=cwd)
    return tls.Tls(tls.TlsFiles(os.path.join(cwd, "end.pem"), os.path.join(cwd, "end.key"),
                                os.path.join(cwd, "ca.pem")))


NO_OPENSSL = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


@pytest.fixture(params=["plain", pytest.param("tls", marks=NO_OPENSSL)])
def pair(request):
    made: List[_Pair] = []
    tls_config = request.getfixturevalue("pki") if request.param == "tls" else None

    def make(nbytes: int) -> _Pair:
        made.append(_Pair(nbytes, tls_config))
        return made[-1]

    yield make
    for p in made:
        p.close()


def _count_opened(monkeypatch) -> List[int]:
    """[connections the client channels opened from now on]."""
    opened = [0]
    real = tcp.TcpChannel.open_connection

    def counting(self, deadline):
        opened[0] += 1
        return real(self, deadline)

    monkeypatch.setattr(tcp.TcpChannel, "open_connection", counting)
    return opened


def test_pooled_connections_the_server_closed_are_replaced_not_used(pair, monkeypatch):
    """The connections were made under a 30 s limit (the client would reuse them for 15 s); the limit then drops,
    the server closes them idle, and the client must see that on its own: the next transfers reconnect."""
    monkeypatch.setattr(tcp_server, "IDLE_TIMEOUT_S", 30.0)
    p = pair(4 * tcp.STREAM_MIN_BYTES)
    p.channel.streams = 2  # a transfer of two streams: two pooled connections to replace
    assert p.read_all()
    assert p.channel._reuse_s == 15.0  # half the announced limit
    opened = _count_opened(monkeypatch)
    for _ in range(3):  # healthy pooled connections are reused, not replaced
        assert p.read_all()
    assert opened[0] == 0, opened
    monkeypatch.setattr(tcp_server, "IDLE_TIMEOUT_S", 0.5)  # from the server's next wait for a frame on
    assert p.read_all()
    closed_before = p.server.server.closed_idle  # type: ignore[union-attr]
    assert wait_for(lambda: p.serving() == 0, 10.0), p.serving()
    assert p.server.server.closed_idle - closed_before >= 2  # type: ignore[union-attr]
    monkeypatch.setattr(tcp_server, "IDLE_TIMEOUT_S", 30.0)
    for _ in range(3):
        assert p.read_all()
    assert p.serving() >= 1
    assert opened[0] == 2, opened  # the two closed ones replaced once, the new ones reused since


def test_pooled_connections_are_not_reused_past_the_announced_limit(pair, monkeypatch):
    """Under a short announced limit the client retires an idle connection itself, before the server would."""
    monkeypatch.setattr(tcp_server, "IDLE_TIMEOUT_S", 4.0)
    p = pair(1 << 16)
    assert p.read_all()
    assert p.channel._reuse_s == 2.0
    first = list(p.channel._idle)
    assert len(first) == 1
    since = time.monotonic()
    wait_for(lambda: time.monotonic() - since > 2.0, 10.0, 0.05)  # past the reuse limit
    assert p.read_all()
    assert p.channel._idle and p.channel._idle[0] is not first[0]
    assert first[0].fileno() == -1  # the client closed the old one


# -- a data server in this process: peers that stop moving a request's data ------------------------------------
@pytest.fixture(params=["plain", pytest.param("tls", marks=NO_OPENSSL)])
def data_server(request, monkeypatch):
    """(server, memory, connect): a data server whose memory is readable and writable, the idle limit IDLE_S;
    ``connect()`` opens a raw (TLS where the server has it) connection with a small receive buffer."""
    monkeypatch.setattr(tcp_server, "IDLE_TIMEOUT_S", IDLE_S)
    tls_config = request.getfixturevalue("pki") if request.param == "tls" else None
    memory = np.random.default_rng(11).integers(0, 256, 64 << 20, dtype=np.uint8)
    readable, writable = RangeTable(), RangeTable()
    readable.add(memory.ctypes.data, memory.nbytes)
    writable.add(memory.ctypes.data, memory.nbytes)
    srv = tcp_server.DataServer("127.0.0.1", readable, writable, None, tls_config)
    token = os.urandom(dwire.TOKEN_BYTES)
    srv.add_token(token, 5)
    socks: List[socket.socket] = []

    def connect() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the server's sends fill it soon
        sock.settimeout(10)
        sock.connect(("127.0.0.1", srv.port))
        if tls_config is not None:
            sock = tls_config.client_context().wrap_socket(sock)
        socks.append(sock)
        sock.sendall(wire.data_header(dwire.OP_HELLO, nbytes=len(token)) + token)
        assert dwire.parse_header(wire.recv_exactly(sock, dwire.HDR.size))[:2] == (dwire.OP_REPLY, dwire.ST_OK)
        return sock

    yield srv, memory, connect
    for sock in socks:
        sock.close()
    srv.close()


def test_a_reader_that_stops_reading_its_data_is_closed_and_a_reader_that_reads_is_not(data_server):
    srv, memory, connect = data_server
    stuck, reader = connect(), connect()
    stuck.sendall(wire.request_frame(dwire.OP_READ, [(memory.ctypes.data, memory.nbytes)]))  # never read
    reader.sendall(wire.request_frame(dwire.OP_READ, [(memory.ctypes.data, memory.nbytes)]))
    head = dwire.parse_header(wire.recv_exactly(reader, dwire.HDR.size))
    assert head[:2] == (dwire.OP_REPLY, dwire.ST_OK) and head[4] == memory.nbytes
    got = bytearray(memory.nbytes)
    view, done = memoryview(got), 0
    while done < len(got):
        n = reader.recv_into(view[done:])
        assert n, "the server closed a connection whose reader was reading"
        done += n
    assert got == memory.tobytes()
    deadline = time.monotonic() + 10 * IDLE_S
    k = 0
    while srv.connections[1] > 1 and time.monotonic() < deadline:  # the reader keeps reading meanwhile
        reader.sendall(wire.request_frame(dwire.OP_READ, [(memory.ctypes.data + k, 100)]))
        assert dwire.parse_header(wire.recv_exactly(reader, dwire.HDR.size))[1] == dwire.ST_OK
        assert wire.recv_exactly(reader, 100) == memory[k:k + 100].tobytes()
        k += 1
        time.sleep(0.05)
    assert srv.connections[1] == 1 and srv.closed_idle == 1, (srv.connections, srv.closed_idle)  # the stuck one


def test_a_writer_that_stops_sending_its_data_is_closed(data_server):
    srv, memory, connect = data_server
    writer = connect()
    writer.sendall(wire.request_frame(dwire.OP_WRITE, [(memory.ctypes.data, 1 << 20)]))
    assert dwire.parse_header(wire.recv_exactly(writer, dwire.HDR.size))[1] == dwire.ST_OK
    writer.sendall(b"\0" * (1 << 19))  # half the data, then nothing
    assert wire.closed_by_peer(writer, 20.0), "a connection whose writer stopped sending stayed open"
    assert wait_for(lambda: srv.connections[1] == 0, 10.0), srv.connections
    assert srv.closed_idle == 1
