"""The compatibility check at first contact: fingerprints compared field by field, over real llm_datadist links."""
from __future__ import annotations

import msgspec
import pytest

from llm_datadist import LLMConfig, LLMDataDist, LLMRole, notifications
from llm_datadist.integrations.vllm import messages as msg
from llm_datadist.integrations.vllm.compat import COMPARED, IncompatiblePeer, config_hash, describe, mismatches
from llm_datadist.integrations.vllm.control import Control
from llm_datadist.integrations.vllm.datadist import link_prefill
from llm_datadist.integrations.vllm.holds import HoldTable

from waiting import wait_until

GEOMETRY = msg.Geometry(2, 8192, 32, 2, 2)
FINGERPRINT = msg.Fingerprint(model="tiny-llama", model_config="0123456789abcdef", dtype="float32",
                              kv_cache_dtype="float32", block_size=32, layers=2, kv_heads=2, head_size=32,
                              kv_cache_layout="LBHNC", kv_cache_groups="FullAttentionSpec(layers=2)",
                              vllm_version="0.32", protocol=msg.SCHEMA_VERSION, tp_size=1)
# one other value per compared field
OTHER = {"model": "other-model", "model_config": "fedcba9876543210", "dtype": "bfloat16",
         "kv_cache_dtype": "fp8_e5m2", "block_size": 64, "layers": 4, "kv_heads": 8, "head_size": 128,
         "kv_cache_layout": "LBNHC", "kv_cache_groups": "FullAttentionSpec(layers=1) + "
                                                        "SlidingWindowSpec(sliding_window=4096, "
                                                        "layers=1)",
         "vllm_version": "0.33", "protocol": msg.SCHEMA_VERSION + 1}


def test_every_field_but_tp_size_is_compared():
    assert set(COMPARED) == set(OTHER) and "tp_size" not in COMPARED
    assert mismatches(FINGERPRINT, FINGERPRINT) == []
    other_tp = msgspec.structs.replace(FINGERPRINT, tp_size=4)  # heterogeneous TP is legitimate
    assert mismatches(FINGERPRINT, other_tp) == []


@pytest.mark.parametrize("field", sorted(OTHER))
def test_a_mismatch_names_the_field_and_both_values(field):
    prefill = msgspec.structs.replace(FINGERPRINT, **{field: OTHER[field]}, tp_size=2)
    differences = mismatches(FINGERPRINT, prefill)
    assert differences == [f"{field}: prefill {OTHER[field]!r}, decode {getattr(FINGERPRINT, field)!r}"]
    text = describe(differences, FINGERPRINT, prefill)
    assert text.startswith("the KV caches of the prefill (TP 2) and the decode (TP 1) are not compatible: ")
    assert differences[0] in text


def test_several_mismatches_are_all_named_and_a_renamed_model_gets_a_hint():
    prefill = msgspec.structs.replace(FINGERPRINT, model="/models/llama", block_size=64, dtype="float16")
    differences = mismatches(FINGERPRINT, prefill)
    assert [d.split(":")[0] for d in differences] == ["model", "dtype", "block_size"]
    assert "--served-model-name" in describe(differences, FINGERPRINT, prefill)


def test_config_hash_ignores_paths_and_versions():
    class Config:
        def __init__(self, **content):
            self.content = content

        def to_dict(self):
            return dict(self.content)

    one = Config(hidden_size=64, num_key_value_heads=2, _name_or_path="/a/llama", transformers_version="4.1")
    two = Config(hidden_size=64, num_key_value_heads=2, _name_or_path="/b/llama", transformers_version="4.2")
    three = Config(hidden_size=64, num_key_value_heads=4, _name_or_path="/a/llama")
    assert config_hash(one) == config_hash(two) != config_hash(three)
    assert len(config_hash(one)) == 16


def test_messages_of_protocol_2_round_trip():
    for message in (msg.Hello(3, FINGERPRINT), msg.HelloReply(3, FINGERPRINT, 1.5, "why"),
                    msg.HelloReply(4, None, 30.0), msg.Renew(["a"], ["t"])):
        assert msg.decode(msg.encode(message)) == message
    refusal = msg.decode(msg.encode_refusal("protocol: prefill 2, decode 9"))
    assert refusal == msg.Refusal(msg.SCHEMA_VERSION, "protocol: prefill 2, decode 9")


# -- over real links --------------------------------------------------------------------------------
class _Prefill:
    def __init__(self) -> None:
        self.holds = HoldTable()
        self.ready = []
        self.renewed = []

    def on_claim(self, owner, message):
        hold, reason = self.holds.claim(message.request_id, owner)
        return msg.ClaimReply(message.seq, hold is not None, hold.block_ids if hold else [], reason)

    def on_release(self, owner, message):
        for rid in message.request_ids:
            self.holds.release(rid, "released", owner=owner)

    def on_renew(self, owner, message):
        self.renewed.append(message)

    def on_push_ready(self, owner, message):
        self.ready.append(message)

    def on_decode_gone(self, owner):
        self.holds.release_owner(owner, "decode disconnected")


def _datadist(cluster_id: int, listen: bool) -> LLMDataDist:
    options = LLMConfig()
    options.enable_cache_manager = True
    options.enable_remote_cache_accessible = True
    if listen:
        options.listen_ip_info = "127.0.0.1:0"
    datadist = LLMDataDist(LLMRole.PROMPT if listen else LLMRole.DECODER, cluster_id)
    datadist.init(options.generate_options())
    return datadist


@pytest.fixture
def prefill():
    datadist = _datadist(91, listen=True)
    handler = _Prefill()
    control = Control(datadist, GEOMETRY, 5000, server=handler, fingerprint=FINGERPRINT, lease_s=2.5)
    yield datadist, handler
    control.close()
    datadist.finalize()


def _decode(prefill_datadist, cluster_id, fingerprint):
    decode = _datadist(cluster_id, listen=False)
    client = Control(decode, GEOMETRY, 5000, fingerprint=fingerprint)
    link_prefill(decode, 91, "127.0.0.1", notifications.listen_address(prefill_datadist)[1], 5000)
    return decode, client


def test_matching_sides_say_hello_and_learn_the_lease(prefill):
    datadist, handler = prefill
    handler.holds.hold("r", [4, 2], lease_s=30)
    decode, client = _decode(datadist, 21, msgspec.structs.replace(FINGERPRINT, tp_size=2))
    try:
        reply = client.hello(91)
        assert reply is not None and reply.lease_s == 2.5 and reply.fingerprint == FINGERPRINT
        assert client.claim(91, "r").block_ids == [4, 2]
        client.renew(91, ["r"], ["t"])
        assert wait_until(lambda: handler.renewed == [msg.Renew(["r"], ["t"])])
    finally:
        client.close()
        decode.finalize()


def test_a_mismatch_fails_the_decode_and_the_prefill_refuses_that_link(prefill):
    datadist, handler = prefill
    handler.holds.hold("r", [1], lease_s=30)
    decode, client = _decode(datadist, 22, msgspec.structs.replace(FINGERPRINT, kv_cache_dtype="fp8_e5m2"))
    try:
        with pytest.raises(IncompatiblePeer, match="kv_cache_dtype: prefill 'float32', decode 'fp8_e5m2'"):
            client.hello(91)
        reply = client.claim(91, "r")  # a decode that claims anyway is refused with the same reason
        assert not reply.ok and "kv_cache_dtype: prefill 'float32', decode 'fp8_e5m2'" in reply.reason
        assert handler.holds.held_ids() == ["r"]
        client.push_ready(91, "t", [1], 10, 0)  # and so is its push hand-off
        client.release(91, ["r"])  # a release is still taken: the blocks are freed at once
        assert wait_until(lambda: handler.holds.held_ids() == [])
        assert handler.ready == []  # handled in arrival order: the hand-off before the release
    finally:
        client.close()
        decode.finalize()


def test_another_protocol_version_is_refused_with_both_versions(prefill):
    datadist, _ = prefill
    decode = _datadist(23, listen=False)
    refusals = []

    def on_note(note):
        refusals.append(msg.decode(note.payload))

    try:
        link_prefill(decode, 91, "127.0.0.1", notifications.listen_address(datadist)[1], 5000)
        notifications.set_callback(decode, on_note)
        notifications.send(decode, 91, bytes([msg.SCHEMA_VERSION + 7]) + b"a message of the future", 5000)
        assert wait_until(lambda: refusals)
        assert refusals[0].protocol == msg.SCHEMA_VERSION
        assert f"protocol: prefill {msg.SCHEMA_VERSION}, decode {msg.SCHEMA_VERSION + 7}" in refusals[0].reason
    finally:
        decode.finalize()
