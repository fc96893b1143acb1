"""The vLLM connector's parts that need no vLLM: options, control channel, holds, KV layout, import hygiene."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import List

import msgspec
import numpy as np
import pytest

from llm_datadist.integrations.vllm import protocol as proto
from llm_datadist.integrations.vllm.block_layout import block_pairs, blocks_for_tokens, layout_of
from llm_datadist.integrations.vllm.config import ConnectorConfig
from llm_datadist.integrations.vllm.holds import HoldTable
from llm_datadist.integrations.vllm.side_channel import ControlClient, ControlServer, ServerHandler

from vllm_harness import SRC

GEOMETRY = proto.Geometry(num_regions=4, block_nbytes=16384, block_size=32, layers=2)


# -- options -----------------------------------------------------------------------------------------
def test_config_defaults_and_string_numbers(monkeypatch):
    monkeypatch.delenv("LLM_DATADIST_LINK_SECRET", raising=False)
    config = ConnectorConfig.from_extra(None)
    assert (config.mode, config.host, config.lease_s, config.link_secret, config.transport) == \
        ("pull", "127.0.0.1", 30.0, "", None)
    config = ConnectorConfig.from_extra({"mode": "push", "side_channel_port": "7100", "lease_s": "2.5",
                                         "transport": ""})
    assert (config.mode, config.side_channel_port, config.lease_s, config.transport) == ("push", 7100, 2.5, None)


def test_config_secret_from_environment(monkeypatch):
    monkeypatch.setenv("LLM_DATADIST_LINK_SECRET", "s3")
    assert ConnectorConfig.from_extra({}).link_secret == "s3"
    assert ConnectorConfig.from_extra({"link_secret": "other"}).link_secret == "other"


@pytest.mark.parametrize("extra, message", [
    ({"nope": 1}, "unknown kv_connector_extra_config keys ['nope']"),
    ({"mode": "both"}, "'mode' must be one of"),
    ({"placement": "gpu"}, "'placement' must be one of"),
    ({"side_channel_port": 70000}, "must be a port"),
    ({"lease_s": 0}, "'lease_s' must be > 0"),
    ({"load_threads": 1.5}, "an integer is required"),
    ({"lease_s": True}, "a number is required"),
    ({"host": 5}, "a string is required"),
    ({"host": ""}, "'host' can not be empty"),
])
def test_config_rejects_bad_values(extra, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ConnectorConfig.from_extra(extra)


# -- protocol ----------------------------------------------------------------------------------------
class _Pipe:
    """A FrameReader source over bytes, delivered in small pieces."""

    def __init__(self, data: bytes, piece: int = 3) -> None:
        self._data, self._piece = data, piece

    def recv(self, _nbytes: int) -> bytes:
        chunk, self._data = self._data[:self._piece], self._data[self._piece:]
        return chunk


def test_frames_round_trip_in_pieces():
    messages = [proto.Claim(1, "req-1"), proto.ClaimReply(1, True, [3, 1, 2]), proto.Release(["a", "b"]),
                proto.PushReady("t", 9, [4, 5], 40, 1), proto.PushDone("t", False, "why", 0)]
    reader = proto.FrameReader(_Pipe(b"".join(proto.encode(m) for m in messages)))
    assert [reader.read() for _ in messages] == messages
    with pytest.raises(ConnectionError, match="closed by peer"):
        reader.read()


def test_frames_with_wrong_version_size_or_body_are_refused():
    body = msgspec.msgpack.encode(proto.Release(["x"]))
    bad_version = bytes([proto.PROTOCOL_VERSION + 1]) + len(body).to_bytes(4, "big") + body
    with pytest.raises(proto.ProtocolError, match="protocol version"):
        proto.FrameReader(_Pipe(bad_version)).read()
    too_big = bytes([proto.PROTOCOL_VERSION]) + (proto.MAX_FRAME_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(proto.ProtocolError, match="exceeds"):
        proto.FrameReader(_Pipe(too_big)).read()
    garbage = bytes([proto.PROTOCOL_VERSION]) + (3).to_bytes(4, "big") + b"\xc1\xc1\xc1"
    with pytest.raises(proto.ProtocolError, match="malformed"):
        proto.FrameReader(_Pipe(garbage)).read()


def test_proofs():
    assert proto.check_proof(proto.client_proof("", b"n"), b"") == (True, "")
    good = proto.client_proof("k", b"nonce")
    assert proto.check_proof(good, good)[0]
    assert "no proof" in proto.check_proof(good, b"")[1]
    assert "wrong" in proto.check_proof(good, proto.client_proof("other", b"nonce"))[1]
    assert good != proto.server_proof("k", b"nonce")


# -- control channel over real sockets ---------------------------------------------------------------
class _Handler(ServerHandler):
    def __init__(self) -> None:
        self.holds = HoldTable()
        self.closed = threading.Event()
        self.ready: List[proto.PushReady] = []

    def welcome(self) -> proto.Welcome:
        return proto.Welcome(77, "127.0.0.1", 1234, GEOMETRY)

    def on_claim(self, conn, message):
        hold, reason = self.holds.claim(message.request_id, conn.conn_id)
        if hold is None:
            return proto.ClaimReply(message.seq, False, reason=reason)
        return proto.ClaimReply(message.seq, True, hold.block_ids)

    def on_release(self, conn, message):
        for rid in message.request_ids:
            self.holds.release(rid, "released", owner=conn.conn_id)

    def on_push_ready(self, conn, message):
        self.ready.append(message)
        conn.send(proto.PushDone(message.transfer_id, True, nbytes=len(message.dst_block_ids)))

    def on_closed(self, conn):
        self.holds.release_owner(conn.conn_id, "decode disconnected")
        self.closed.set()


@pytest.fixture
def server_factory():
    servers = []

    def make(secret: str = ""):
        handler = _Handler()
        server = ControlServer("127.0.0.1", 0, secret, handler, handshake_timeout_s=5.0)
        servers.append(server)
        return server, handler

    yield make
    for server in servers:
        server.close()
        server.close()


def _client(server, secret="", on_push_done=lambda m: None, on_lost=lambda c: None) -> ControlClient:
    return ControlClient("127.0.0.1", server.port, secret, 5, 5.0, on_push_done, on_lost)


def test_claim_release_and_push_round_trip(server_factory):
    server, handler = server_factory("secret")
    handler.holds.hold("r1", [5, 9], lease_s=30)
    done = []
    client = _client(server, "secret", on_push_done=done.append)
    try:
        welcome = client.connect()
        assert (welcome.cluster_id, welcome.datadist_port, welcome.geometry) == (77, 1234, GEOMETRY)
        reply = client.claim("r1")
        assert (reply.ok, reply.block_ids) == (True, [5, 9])
        other = client.claim("r-unknown")
        assert not other.ok and "not held" in other.reason
        client.release(["r1"])
        client.push_ready(proto.PushReady("t1", 5, [1, 2, 3], 70))
        deadline = time.monotonic() + 10
        while not (done and "r1" not in handler.holds.held_ids()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done == [proto.PushDone("t1", True, "", 3)]
        assert handler.holds.take_freeable({"r1"}) == {"r1"}
    finally:
        client.close()
        client.close()


@pytest.mark.parametrize("server_secret, client_secret, message", [
    ("right", "wrong", "refused the connection: the peer's proof of the link secret is wrong"),
    ("right", "", "refused the connection: the peer sent no proof"),
    ("", "right", "failed authentication: the peer sent no proof"),
])
def test_handshake_authenticates_both_ways(server_factory, server_secret, client_secret, message):
    server, _ = server_factory(server_secret)
    client = _client(server, client_secret)
    with pytest.raises(ConnectionError, match=message):
        client.connect()
    assert not client.alive


def test_closed_connection_frees_claimed_blocks_and_fails_waiters(server_factory):
    server, handler = server_factory()
    handler.holds.hold("a", [1], lease_s=30)
    handler.holds.hold("b", [2], lease_s=30)
    lost = threading.Event()
    client = _client(server, on_lost=lambda c: lost.set())
    client.connect()
    assert client.claim("a").ok
    client.close()
    assert handler.closed.wait(10)
    assert handler.holds.held_ids() == ["b"]  # only the claimed hold went with the connection
    assert [entry[:2] for entry in handler.holds.release_log] == [("a", "decode disconnected")]
    assert not lost.is_set()  # a deliberate close is not a loss

    client = _client(server, on_lost=lambda c: lost.set())
    client.connect()
    server.close()
    assert lost.wait(10)
    with pytest.raises(ConnectionError, match="closed"):
        client.claim("b")
    client.close()


def test_killed_client_process_frees_its_claims(server_factory):
    server, handler = server_factory()
    handler.holds.hold("x", [3, 4], lease_s=30)
    script = ("import sys; from llm_datadist.integrations.vllm.side_channel import ControlClient\n"
              f"c = ControlClient('127.0.0.1', {server.port}, '', 9, 5.0, print, print); c.connect()\n"
              "print(c.claim('x').ok, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={"PYTHONPATH": SRC})
    try:
        assert proc.stdout.readline().strip() == "True"
        proc.kill()
    finally:
        proc.wait(30)
    assert handler.closed.wait(10)
    assert handler.holds.held_ids() == []


# -- holds -------------------------------------------------------------------------------------------
def test_holds_lease_claim_and_freeable():
    table = HoldTable()
    table.hold("a", [1, 2], lease_s=5)
    table.hold("b", [3], lease_s=5)
    now = time.monotonic()
    assert table.claim("a", owner="c1")[0].block_ids == [1, 2]
    assert "claimed by another decode" in table.claim("a", owner="c2")[1]
    assert table.expire(now + 10) == ["b"]  # claimed holds do not expire
    assert "already released" in table.claim("b", owner="c1")[1]
    assert not table.release("a", "x", owner="c2")
    assert table.take_freeable(set()) == set()  # released but vLLM has not reported it finished
    assert table.take_freeable({"b", "unrelated"}) == {"b"}
    assert table.release_owner("c1", "gone") == ["a"]
    assert table.take_freeable({"a"}) == {"a"}
    assert len(table) == 0
    table.hold("d", [4], lease_s=5)
    table.drop("d")
    assert table.take_freeable({"d"}) == set() and len(table) == 0


# -- layout and block mapping ------------------------------------------------------------------------
class _Tensor:
    """A numpy array seen through the torch.Tensor attributes the layout reads."""

    class _Device:
        def __init__(self, kind: str) -> None:
            self.type, self.index = kind, None

    def __init__(self, array: np.ndarray, kind: str = "cpu") -> None:
        self.array, self.shape, self.dtype, self.device = array, array.shape, array.dtype, self._Device(kind)

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def element_size(self) -> int:
        return self.array.itemsize

    def data_ptr(self) -> int:
        return self.array.ctypes.data


def test_layout_of_cpu_layout_one_region_per_layer():
    base = np.zeros((2, 10, 2, 32, 64), np.float32)  # two layers of [num_blocks, kv_heads, block, 2*head]
    layout = layout_of({"l0": _Tensor(base[0]), "l1": _Tensor(base[1])}, num_blocks=10)
    assert (layout.regions_per_layer, layout.num_blocks, layout.block_nbytes) == (1, 10, 2 * 32 * 64 * 4)
    assert layout.region_addrs == (base[0].ctypes.data, base[1].ctypes.data)
    assert layout.layer_index("l1") == 1


def test_layout_of_kv_split_layout_two_regions_per_layer():
    kv = np.zeros((2, 6, 16, 4, 8), np.float16)  # [K/V, num_blocks, block, heads, head]
    layout = layout_of({"only": _Tensor(kv)}, num_blocks=6)
    assert layout.regions_per_layer == 2 and layout.block_nbytes == 16 * 4 * 8 * 2
    assert layout.region_addrs == (kv.ctypes.data, kv[1].ctypes.data)


def test_layout_of_refuses_unusable_tensors():
    with pytest.raises(ValueError, match="no KV tensors"):
        layout_of({}, 4)
    with pytest.raises(ValueError, match="no dimension of 5 blocks"):
        layout_of({"a": _Tensor(np.zeros((4, 8), np.float32))}, 5)
    with pytest.raises(ValueError, match="not contiguous"):
        layout_of({"a": _Tensor(np.zeros((8, 4), np.float32).T)}, 4)
    mixed = {"a": _Tensor(np.zeros((4, 8), np.float32)), "b": _Tensor(np.zeros((4, 16), np.float32))}
    with pytest.raises(ValueError, match="differs from the first layer"):
        layout_of(mixed, 4)


def test_block_pairs_partial_blocks_and_prefix_hits():
    assert [blocks_for_tokens(n, 32) for n in (0, 1, 31, 32, 33, 64)] == [0, 1, 1, 1, 2, 2]
    assert block_pairs([7, 3, 9], [0, 1, 2, 5], 70, 32) == ([7, 3, 9], [0, 1, 2])
    assert block_pairs([7, 3, 9], [0, 1, 2], 70, 32, first_block=2) == ([9], [2])
    assert block_pairs([4], [8], 5, 32) == ([4], [8])
    with pytest.raises(ValueError, match="need 3 blocks"):
        block_pairs([7, 3], [0, 1, 2], 70, 32)


def test_importing_the_integration_needs_neither_vllm_nor_torch():
    code = ("import sys, llm_datadist, llm_datadist.integrations, llm_datadist.integrations.vllm as v\n"
            "assert 'vllm' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
            "print(v.ConnectorConfig().mode)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC},
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "pull", out.stderr
