"""Network faults between simulated hosts: a link pulled mid-transfer, a rate-limited link, delay and loss.

A failed transfer must end within ``sync_kv_timeout`` + 1 s with LLM_TIMEOUT or LLM_LINK_FAILED, leave every
destination block outside the request untouched, and the hosts must link again and move exact bytes once
the network is back.
"""
from __future__ import annotations

import numpy as np
import pytest

from llm_datadist import LLMStatusCode
from llm_datadist.cli.netns import netem_unavailable_reason
from subsystems import skip
from tests.multihost.peers import DECODER, OK, PROMPT, Expected, cluster, link, source, wait_until

P_ID, D_ID = 41, 42
NT, NB, BB = 2, 128, 64 << 10  # 16 MiB per full pull
DST_NB = 160  # the destination has blocks the pull never touches
FAILED = (int(LLMStatusCode.LLM_TIMEOUT), int(LLMStatusCode.LLM_LINK_FAILED))


def _pair(make_cluster, transport, timeout_ms: int, **cfg):
    cluster_ = make_cluster(2, transport)
    prefill = cluster_.instance(0, PROMPT, P_ID, sync_kv_timeout=timeout_ms, **cfg)
    decode = cluster_.instance(1, DECODER, D_ID, sync_kv_timeout=timeout_ms, **cfg)
    prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=3, model_id=0)
    link(decode, prefill, P_ID)
    return cluster_, prefill, decode


def _mapping(seed: int, count: int):
    rng = np.random.default_rng(seed)
    return rng.permutation(NB)[:count].tolist(), rng.permutation(DST_NB)[:count].tolist()


def _pull(decode, name, src, dst, **bg):
    return decode.request("pull_blocks", name=name, src={"kind": "blocks", "cluster_id": P_ID, "model_id": 0},
                          src_blocks=src, dst_blocks=dst, **bg)


@pytest.mark.parametrize("down", ["puller", "owner"])
def test_link_down_mid_pull_fails_in_time_then_relinks_and_moves_exact_bytes(make_cluster, transport, down):
    timeout_ms = 2500
    cluster_, prefill, decode = _pair(make_cluster, transport, timeout_ms)
    hosts = cluster_.hosts
    src, dst = _mapping(7, NB)
    expected = Expected(NT, DST_NB, BB).put(source(3, NT, NB, BB), zip(src, dst))
    for name in ("control", "kv"):
        decode.call("register", name=name, num_tensors=NT, num_blocks=DST_NB, block_bytes=BB, model_id=None)
    hosts.rate_limit(hosts[1], "100mbit")  # 16 MiB take ~1.4 s: the pull is still running when the link goes
    assert _pull(decode, "control", src, dst)["ok"], "the pull must fit in sync_kv_timeout on the limited link"
    expected.check(decode, "control")

    received = hosts.counters(hosts[1])["rx_bytes"]
    assert decode.call("pull_blocks", bg="pull", name="kv", src={"kind": "blocks", "cluster_id": P_ID},
                       src_blocks=src, dst_blocks=dst)["started"]
    wait_until(lambda: hosts.counters(hosts[1])["rx_bytes"] - received > 2 << 20, 10.0, "the pull to be under way")
    hosts.link_down(hosts[1] if down == "puller" else hosts[0])
    reply = decode.join("pull", timeout=timeout_ms / 1000 + 10)
    assert not reply["ok"] and reply["code"] in FAILED, reply
    assert reply["elapsed"] <= timeout_ms / 1000 + 1.0, reply
    expected.check(decode, "kv", skip_rows=dst)  # outside the request: untouched

    hosts.link_up(hosts[1] if down == "puller" else hosts[0])
    hosts.clear_traffic_control(hosts[1])
    assert _pull(decode, "kv", src, dst)["ok"]  # the link survived the outage (its TCP connections did)
    expected.check(decode, "kv")
    unlinked = decode.call("unlink_clusters", clusters=[cluster(hosts[0], P_ID, hosts[1])], force=True)
    assert unlinked["code"] == OK, unlinked
    link(decode, prefill, P_ID)  # and a new link works as well
    decode.call("register", name="relinked", num_tensors=NT, num_blocks=DST_NB, block_bytes=BB, model_id=None)
    assert _pull(decode, "relinked", src, dst)["ok"]
    expected.check(decode, "relinked")


def test_rate_limited_link_moves_exact_bytes_both_ways(make_cluster, transport):
    cluster_, prefill, decode = _pair(make_cluster, transport, 10000, enable_remote_cache_accessible=True)
    hosts = cluster_.hosts
    for host in hosts.hosts:
        hosts.rate_limit(host, "400mbit")
    src, dst = _mapping(8, 48)
    decode.call("register", name="kv", num_tensors=NT, num_blocks=DST_NB, block_bytes=BB, model_id=0)
    assert _pull(decode, "kv", src, dst)["ok"]
    Expected(NT, DST_NB, BB).put(source(3, NT, NB, BB), zip(src, dst)).check(decode, "kv")
    decode.call("register", name="mine", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=9, model_id=1)
    prefill.call("register", name="in", num_tensors=NT, num_blocks=DST_NB, block_bytes=BB, model_id=2)
    pushed = decode.request("push_blocks", name="mine", dst={"kind": "blocks", "cluster_id": P_ID, "model_id": 2},
                            src_blocks=src, dst_blocks=dst)
    assert pushed["ok"], pushed
    Expected(NT, DST_NB, BB).put(source(9, NT, NB, BB), zip(src, dst)).check(prefill, "in")


def test_pull_slower_than_its_timeout_fails_in_time_and_the_link_still_works(make_cluster, transport):
    timeout_ms = 1000
    cluster_, _prefill, decode = _pair(make_cluster, transport, timeout_ms)
    hosts = cluster_.hosts
    hosts.rate_limit(hosts[0], "20mbit")  # 16 MiB would take ~7 s
    src, dst = _mapping(9, NB)
    decode.call("register", name="kv", num_tensors=NT, num_blocks=DST_NB, block_bytes=BB, model_id=0)
    reply = _pull(decode, "kv", src, dst)
    assert not reply["ok"] and reply["code"] == int(LLMStatusCode.LLM_TIMEOUT), reply
    assert reply["elapsed"] <= timeout_ms / 1000 + 1.0, reply
    expected = Expected(NT, DST_NB, BB)
    expected.check(decode, "kv", skip_rows=dst)
    hosts.clear_traffic_control(hosts[0])
    decode.call("register", name="after", num_tensors=NT, num_blocks=DST_NB, block_bytes=BB, model_id=1)
    assert _pull(decode, "after", src[:4], dst[:4])["ok"]  # the same link, no re-link
    Expected(NT, DST_NB, BB).put(source(3, NT, NB, BB), zip(src[:4], dst[:4])).check(decode, "after")


def test_delay_and_loss_with_netem(make_cluster, transport):
    reason = netem_unavailable_reason()
    if reason is not None:
        skip("netem", reason)
    cluster_, _prefill, decode = _pair(make_cluster, transport, 20000)
    hosts = cluster_.hosts
    hosts.netem(hosts[0], "delay", "20ms", "loss", "1%")
    hosts.netem(hosts[1], "delay", "20ms", "loss", "1%")
    src, dst = _mapping(10, 32)
    decode.call("register", name="kv", num_tensors=NT, num_blocks=DST_NB, block_bytes=BB, model_id=0)
    assert _pull(decode, "kv", src, dst)["ok"]
    Expected(NT, DST_NB, BB).put(source(3, NT, NB, BB), zip(src, dst)).check(decode, "kv")


def test_link_clusters_to_an_unreachable_host_fails_in_time(make_cluster, transport):
    cluster_ = make_cluster(2, transport)
    prefill = cluster_.instance(0, PROMPT, P_ID)
    decode = cluster_.instance(1, DECODER, D_ID)
    hosts = cluster_.hosts
    hosts.link_down(hosts[0])
    reply = decode.call("link_clusters", clusters=[cluster(hosts[0], P_ID, hosts[1])], timeout_ms=1000)
    assert reply["code"] in FAILED and reply["codes"][0] in FAILED, reply
    assert reply["elapsed"] <= 1.0 + 1.0, reply
    hosts.link_up(hosts[0])
    link(decode, prefill, P_ID)
