"""Many links across simulated hosts: one decode pulling from 4 prefills at once, one prefill serving 4 decodes
at once, every byte checked, and ``finalize`` releasing every thread, descriptor and shared-memory segment.

(The 16-link figures, set-up time, memory and threads per link, come from ``llm-datadist bench --hosts netns
--scale 16``; this test checks correctness and cleanliness with fewer peers.)
"""
from __future__ import annotations

from tests.multihost.peers import DECODER, OK, PROMPT, Expected, cluster, finalize_leaves_nothing, link, source

PEERS = 4
NT, NB, BB = 2, 64, 16 << 10
HUB_ID, FIRST_ID = 70, 71


def _plan(i: int):
    """Peer i moves 8 scattered blocks into its own 8 destination blocks."""
    return [(5 * i + 3 * k) % NB for k in range(8)], [8 * i + k for k in range(8)]


def test_one_decode_pulls_from_four_prefills_at_once(make_cluster, transport):
    cluster_ = make_cluster(PEERS + 1, transport)
    prefills = [cluster_.instance(i, PROMPT, FIRST_ID + i) for i in range(PEERS)]
    decode = cluster_.instance(PEERS, DECODER, HUB_ID)
    for i, prefill in enumerate(prefills):
        prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=60 + i, model_id=0)
    decode.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=0)
    reply = decode.call("link_clusters", clusters=[cluster(p.host, FIRST_ID + i, decode.host)
                                                   for i, p in enumerate(prefills)])
    assert (reply["code"], reply["codes"]) == (OK, [OK] * PEERS)
    for i in range(PEERS):
        src, dst = _plan(i)
        decode.call("pull_blocks", bg=f"p{i}", name="kv", src={"kind": "blocks", "cluster_id": FIRST_ID + i},
                    src_blocks=src, dst_blocks=dst)
    want = Expected(NT, NB, BB)
    for i in range(PEERS):
        pulled = decode.join(f"p{i}")
        assert pulled["ok"], pulled
        want.put(source(60 + i, NT, NB, BB), zip(*_plan(i)))
    want.check(decode, "kv")
    finalize_leaves_nothing(decode)
    for prefill in prefills:
        finalize_leaves_nothing(prefill)


def test_one_prefill_serves_four_decodes_at_once(make_cluster, transport):
    cluster_ = make_cluster(PEERS + 1, transport)
    prefill = cluster_.instance(0, PROMPT, HUB_ID)
    decodes = [cluster_.instance(1 + i, DECODER, FIRST_ID + i) for i in range(PEERS)]
    prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=66, model_id=0)
    for decode in decodes:
        decode.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=0)
        link(decode, prefill, HUB_ID)
    for i, decode in enumerate(decodes):
        src, dst = _plan(i)
        decode.call("pull_blocks", bg="pull", name="kv", src={"kind": "blocks", "cluster_id": HUB_ID},
                    src_blocks=src, dst_blocks=dst)
    for i, decode in enumerate(decodes):
        pulled = decode.join("pull")
        assert pulled["ok"], pulled
        Expected(NT, NB, BB).put(source(66, NT, NB, BB), zip(*_plan(i))).check(decode, "kv")
    finalize_leaves_nothing(prefill)
    for decode in decodes:
        finalize_leaves_nothing(decode)
