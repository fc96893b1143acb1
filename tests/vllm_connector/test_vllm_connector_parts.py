"""The vLLM connector's parts that need no vLLM: options, control channel, holds, KV layout, import hygiene."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import List

import msgspec
import numpy as np
import pytest

from llm_datadist import LLMConfig, LLMDataDist, LLMRole, notifications
from llm_datadist.integrations.vllm import messages as msg
from llm_datadist.integrations.vllm.block_layout import block_pairs, blocks_for_tokens, layout_of
from llm_datadist.integrations.vllm.config import ConnectorConfig
from llm_datadist.integrations.vllm.control import Control
from llm_datadist.integrations.vllm.datadist import link_prefill, new_cluster_id, parse_endpoint, prefill_cluster_id
from llm_datadist.integrations.vllm.holds import HoldTable
from llm_datadist.notifications import MAX_PAYLOAD_BYTES

from vllm_harness import HERE, SRC
from waiting import wait_until
from fake_tensor import FakeTensor

GEOMETRY_LIST = [4, 16384, 32, 2]
GEOMETRY = msg.Geometry(*GEOMETRY_LIST)
FAKE_DECODE = os.path.join(HERE, "fake_decode.py")


# -- options -----------------------------------------------------------------------------------------
def test_config_defaults_and_string_numbers(monkeypatch):
    monkeypatch.delenv("LLM_DATADIST_LINK_SECRET", raising=False)
    config = ConnectorConfig.from_extra(None)
    assert (config.mode, config.host, config.lease_s, config.link_secret, config.transport) == \
        ("pull", "127.0.0.1", 30.0, "", None)
    config = ConnectorConfig.from_extra({"mode": "push", "side_channel_port": "7100", "lease_s": "2.5",
                                         "transport": ""})
    assert (config.mode, config.side_channel_port, config.lease_s, config.transport) == ("push", 7100, 2.5, None)
    assert config.listen_port == 7100  # the former control-channel port is the llm_datadist port now
    assert ConnectorConfig.from_extra({"datadist_port": 7200}).listen_port == 7200
    with pytest.raises(ValueError, match="former name of 'datadist_port'"):
        ConnectorConfig.from_extra({"datadist_port": 7200, "side_channel_port": 7100})


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


# -- messages ----------------------------------------------------------------------------------------
def test_messages_round_trip():
    messages = [msg.Claim(1, "req-1", GEOMETRY), msg.ClaimReply(1, True, [3, 1, 2]), msg.Release(["a", "b"]),
                msg.PushReady("t", [4, 5], 40, GEOMETRY, 1), msg.PushDone("t", False, "why", 0)]
    for message in messages:
        payload = msg.encode(message)
        assert payload[0] == msg.SCHEMA_VERSION and len(payload) <= MAX_PAYLOAD_BYTES
        assert msg.decode(payload) == message


def test_messages_with_wrong_version_or_body_are_refused():
    body = msgspec.msgpack.encode(msg.Release(["x"]))
    with pytest.raises(msg.MessageError, match=f"schema version {msg.SCHEMA_VERSION + 1} is not {msg.SCHEMA_VERSION}"):
        msg.decode(bytes([msg.SCHEMA_VERSION + 1]) + body)
    with pytest.raises(msg.MessageError, match="schema version None"):
        msg.decode(b"")
    with pytest.raises(msg.MessageError, match="malformed"):
        msg.decode(bytes([msg.SCHEMA_VERSION]) + b"\xc1\xc1\xc1")
    with pytest.raises(msg.MessageError, match="malformed"):
        msg.decode(bytes([msg.SCHEMA_VERSION]) + msgspec.msgpack.encode({"type": "Claim", "seq": "x"}))


def test_fixed_port_implies_a_prefill_cluster_id():
    ids = {prefill_cluster_id("127.0.0.1", port) for port in range(7100, 7164)}
    assert len(ids) == 64 and all(cid % 2 == 0 and 0 < cid < 2**62 for cid in ids)
    assert prefill_cluster_id("10.0.0.1", 7100) != prefill_cluster_id("10.0.0.2", 7100)
    assert all(new_cluster_id() % 2 == 1 for _ in range(64))  # decodes' random ids never collide with them
    assert parse_endpoint(["10.0.0.1", 7100]) == ("10.0.0.1", 7100, prefill_cluster_id("10.0.0.1", 7100))
    assert parse_endpoint(("10.0.0.1", "7101", 99)) == ("10.0.0.1", 7101, 99)
    with pytest.raises(ValueError, match="remote_endpoints entry"):
        parse_endpoint(["10.0.0.1"])


# -- control messages over real llm_datadist links --------------------------------------------------
class _Prefill:
    """A prefill's PrefillHandler over a HoldTable, as the worker side is."""

    def __init__(self) -> None:
        self.holds = HoldTable()
        self.gone = threading.Event()
        self.ready: List[msg.PushReady] = []

    def on_claim(self, owner, message):
        hold, reason = self.holds.claim(message.request_id, owner)
        if hold is None:
            return msg.ClaimReply(message.seq, False, reason=reason)
        return msg.ClaimReply(message.seq, True, hold.block_ids)

    def on_release(self, owner, message):
        for rid in message.request_ids:
            self.holds.release(rid, "released", owner=owner)

    def on_push_ready(self, owner, message):
        self.ready.append(message)

    def on_decode_gone(self, owner):
        self.holds.release_owner(owner, "decode disconnected")
        self.gone.set()


def _datadist(cluster_id: int, listen: bool, secret: str = "") -> LLMDataDist:
    options = LLMConfig()
    options.enable_cache_manager = True
    options.enable_remote_cache_accessible = True
    if listen:
        options.listen_ip_info = "127.0.0.1:0"
    if secret:
        options.link_secret = secret
    datadist = LLMDataDist(LLMRole.PROMPT if listen else LLMRole.DECODER, cluster_id)
    datadist.init(options.generate_options())
    return datadist


@pytest.fixture
def prefill():
    datadist = _datadist(77, listen=True, secret="a secret long enough for the tests")
    handler = _Prefill()
    control = Control(datadist, GEOMETRY, 5000, server=handler)
    yield datadist, handler, control
    control.close()
    datadist.finalize()


def test_claim_release_and_push_over_the_link(prefill):
    datadist, handler, server = prefill
    port = notifications.listen_address(datadist)[1]
    handler.holds.hold("r1", [5, 9], lease_s=30)
    decode = _datadist(5, listen=False, secret="a secret long enough for the tests")
    done: List = []
    lost: List[int] = []
    client = Control(decode, GEOMETRY, 5000, on_push_done=lambda cid, m: done.append((cid, m)),
                     on_prefill_lost=lost.append)
    try:
        link_prefill(decode, 77, "127.0.0.1", port, 5000)
        reply = client.claim(77, "r1")
        assert (reply.ok, reply.block_ids) == (True, [5, 9])
        other = client.claim(77, "r-unknown")
        assert not other.ok and "not held" in other.reason
        client.release(77, ["r1"])  # delivered (queued at the prefill) before release() returns
        assert wait_until(lambda: "r1" not in handler.holds.held_ids())
        assert handler.holds.take_freeable({"r1"}) == {"r1"}
        client.push_ready(77, "t1", [1, 2, 3], 70, 0)
        assert wait_until(lambda: handler.ready)
        assert handler.ready == [msg.PushReady("t1", [1, 2, 3], 70, GEOMETRY, 0)]
        server.push_done(5, msg.PushDone("t1", True, "", 3))
        assert wait_until(lambda: done)
        assert done == [(77, msg.PushDone("t1", True, "", 3))]
        assert not lost
    finally:
        client.close()
        decode.finalize()
    assert handler.gone.wait(10)  # the decode's finalize took its link down


def test_claim_with_another_geometry_is_refused(prefill):
    datadist, handler, _ = prefill
    handler.holds.hold("r1", [1], lease_s=30)
    decode = _datadist(6, listen=False, secret="a secret long enough for the tests")
    client = Control(decode, msgspec.structs.replace(GEOMETRY, block_size=16), 5000)
    try:
        link_prefill(decode, 77, "127.0.0.1", notifications.listen_address(datadist)[1], 5000)
        reply = client.claim(77, "r1")
        assert not reply.ok and "KV geometry" in reply.reason
        assert handler.holds.held_ids() == ["r1"]
    finally:
        client.close()
        decode.finalize()


def test_claim_of_an_unlinked_prefill_fails_at_once():
    decode = _datadist(8, listen=False)
    client = Control(decode, GEOMETRY, 5000)
    try:
        with pytest.raises(ConnectionError, match="LLM_NOT_YET_LINK"):
            client.claim(12345, "r")
    finally:
        client.close()
        decode.finalize()


def test_killed_decode_process_frees_its_claims(prefill):
    datadist, handler, _ = prefill
    handler.holds.hold("x", [3, 4], lease_s=30)
    handler.holds.hold("y", [5], lease_s=30)
    port = notifications.listen_address(datadist)[1]
    env = {"PYTHONPATH": SRC, "LLM_DATADIST_LINK_SECRET": "a secret long enough for the tests"}
    proc = subprocess.Popen([sys.executable, FAKE_DECODE, "127.0.0.1", str(port), "77", json.dumps(GEOMETRY_LIST),
                             "x"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert json.loads(proc.stdout.readline()) == {"claimed": {"x": [3, 4]}}
        proc.kill()
    finally:
        proc.wait(30)
    assert handler.gone.wait(10)  # the link-down event, as soon as the connection broke
    assert handler.holds.held_ids() == ["y"]  # only the claimed hold went with the link
    assert [entry[:2] for entry in handler.holds.release_log] == [("x", "decode disconnected")]


# -- holds -------------------------------------------------------------------------------------------
def test_holds_lease_claim_and_freeable():
    table = HoldTable()
    table.hold("a", [1, 2], lease_s=5)
    table.hold("b", [3], lease_s=5)
    now = time.monotonic()
    assert table.claim("a", owner="c1")[0].block_ids == [1, 2]
    assert "claimed by another decode" in table.claim("a", owner="c2")[1]
    assert table.expire(now + 4) == []
    assert table.expire(now + 10) == ["a", "b"]  # a claimed hold expires too when its decode stops renewing
    table.hold("a", [1, 2], lease_s=5)
    assert table.claim("a", owner="c1")[0].block_ids == [1, 2]
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
def test_layout_of_cpu_layout_one_region_per_layer():
    base = np.zeros((2, 10, 2, 32, 64), np.float32)  # two layers of [num_blocks, kv_heads, block, 2*head]
    layout = layout_of({"l0": FakeTensor(base[0]), "l1": FakeTensor(base[1])}, num_blocks=10)
    assert (layout.regions_per_layer, layout.num_blocks, layout.block_nbytes) == (1, 10, 2 * 32 * 64 * 4)
    assert layout.region_addrs == (base[0].ctypes.data, base[1].ctypes.data)
    assert layout.layer_index("l1") == 1


def test_layout_of_kv_split_layout_two_regions_per_layer():
    kv = np.zeros((2, 6, 16, 4, 8), np.float16)  # [K/V, num_blocks, block, heads, head]
    layout = layout_of({"only": FakeTensor(kv)}, num_blocks=6)
    assert layout.regions_per_layer == 2 and layout.block_nbytes == 16 * 4 * 8 * 2
    assert layout.region_addrs == (kv.ctypes.data, kv[1].ctypes.data)


def test_layout_of_refuses_unusable_tensors():
    with pytest.raises(ValueError, match="no KV tensors"):
        layout_of({}, 4)
    with pytest.raises(ValueError, match="no dimension of 5 blocks"):
        layout_of({"a": FakeTensor(np.zeros((4, 8), np.float32))}, 5)
    with pytest.raises(ValueError, match="not contiguous"):
        layout_of({"a": FakeTensor(np.zeros((8, 4), np.float32).T)}, 4)
    mixed = {"a": FakeTensor(np.zeros((4, 8), np.float32)), "b": FakeTensor(np.zeros((4, 16), np.float32))}
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
