"""Every cross-host path between simulated hosts, per cross-host transport, with every byte checked.

Prefill and decode run on different hosts (network namespaces, own pid/mount/IPC/UTS namespaces and hostname),
so only the network between them can carry a link: ``link_clusters`` and rank-table ``link`` with a device IP
per host, pulls and pushes of every kind, the owner pulling from the linker, layer-wise
``transfer_cache_async``, and two prefills with two decodes.
"""
from __future__ import annotations

import json

import numpy as np

from llm_datadist import LLMStatusCode
from tests.multihost.peers import DECODER, OK, PROMPT, Expected, link, source, wait_until
from tests.multihost.peers import cluster as cluster_entry

NT, NB, BB = 4, 32, 4096  # tensors, blocks (or slots), bytes per block
P_ID, D_ID = 11, 12


def _pair(make_cluster, transport, **cfg):
    cluster = make_cluster(2, transport)
    prefill = cluster.instance(0, PROMPT, P_ID, **cfg)
    decode = cluster.instance(1, DECODER, D_ID, **cfg)
    return cluster, prefill, decode


def test_link_clusters_pull_blocks_scattered(make_cluster, transport):
    _cluster, prefill, decode = _pair(make_cluster, transport)
    prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=1, model_id=0)
    decode.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=0)
    link(decode, prefill, P_ID)
    rng = np.random.default_rng(5)
    src = rng.permutation(NB)[:20].tolist()
    dst = rng.permutation(NB)[:20].tolist()
    decode.call("pull_blocks", name="kv", src={"kind": "blocks", "cluster_id": P_ID, "model_id": 0},
                src_blocks=src, dst_blocks=dst)
    Expected(NT, NB, BB).put(source(1, NT, NB, BB), zip(src, dst)).check(decode, "kv")
    assert f"routes over {transport} (cross host" in decode.log()


def test_owner_pulls_from_the_linking_host(make_cluster, transport):
    """The listening prefill pulls from the decode that linked to it; the decode makes no call meanwhile."""
    _cluster, prefill, decode = _pair(make_cluster, transport)
    decode.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=2, model_id=3)
    prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=0)
    link(decode, prefill, P_ID)
    wait_until(lambda: prefill.request("pull_blocks", name="kv", src={"kind": "blocks", "cluster_id": D_ID,
                                                                      "model_id": 3},
                                       src_blocks=[0], dst_blocks=[0])["ok"], 5.0, "the prefill side of the link")
    prefill.call("pull_blocks", name="kv", src={"kind": "blocks", "cluster_id": D_ID, "model_id": 3},
                 src_blocks=[31, 7, 8], dst_blocks=[1, 2, 30])
    Expected(NT, NB, BB).put(source(2, NT, NB, BB), [(0, 0), (31, 1), (7, 2), (8, 30)]).check(prefill, "kv")


def test_pull_cache_by_key_and_by_id_and_index_and_into_blocks(make_cluster, transport):
    _cluster, prefill, decode = _pair(make_cluster, transport)
    reply = prefill.call("register", name="cont", num_tensors=NT, num_blocks=4, block_bytes=BB, seed=3, blocks=False,
                         keys=[[100, 0], [101, 0], [102, 0], [103, 0]])
    cont_id = reply["cache_id"]
    decode.call("register", name="cont", num_tensors=NT, num_blocks=4, block_bytes=BB, blocks=False)
    decode.call("register", name="blk", num_tensors=NT, num_blocks=8, block_bytes=BB, model_id=0)
    link(decode, prefill, P_ID)
    src = source(3, NT, 4, BB)
    decode.call("pull_cache", name="cont", src={"kind": "key", "cluster_id": P_ID, "req_id": 101}, batch_index=2)
    decode.call("pull_cache", name="cont", src={"kind": "idx", "cluster_id": P_ID, "cache_id": cont_id,
                                                "batch_index": 3}, batch_index=0)
    # layers 1..2 only (one tensor per layer) of slot 0 into slot 1
    decode.call("pull_cache", name="cont", src={"kind": "idx", "cluster_id": P_ID, "cache_id": cont_id,
                                                "batch_index": 0}, batch_index=1,
                src_layer_range=[1, 3], dst_layer_range=[1, 3], tensor_num_per_layer=1)
    want = Expected(NT, 4, BB).put(src, [(1, 2), (3, 0)]).put(src, [(0, 1)], tensors=[1, 2])
    want.check(decode, "cont")
    # a continuous slot (keyed) into a block: the slot is one block long here
    decode.call("pull_blocks", name="blk", src={"kind": "key", "cluster_id": P_ID, "req_id": 102}, dst_blocks=[6])
    Expected(NT, 8, BB).put(src, [(2, 6)]).check(decode, "blk")


def test_push_and_pull_every_kind_in_remote_accessible_mode(make_cluster, transport):
    _cluster, prefill, decode = _pair(make_cluster, transport, enable_remote_cache_accessible=True)
    prefill.call("register", name="blk", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=4, model_id=0)
    p_cont = prefill.call("register", name="cont", num_tensors=NT, num_blocks=4, block_bytes=BB, seed=5,
                          blocks=False)
    decode.call("register", name="blk", num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=7)
    d_cont = decode.call("register", name="cont", num_tensors=NT, num_blocks=4, block_bytes=BB, blocks=False)
    link(prefill, decode, D_ID)  # the prefill links and writes into the decode's caches
    blk, cont = source(4, NT, NB, BB), source(5, NT, 4, BB)
    blocks_key = {"kind": "blocks", "cluster_id": D_ID, "model_id": 7}
    prefill.call("push_blocks", name="blk", dst=blocks_key, src_blocks=[0, 5, 9], dst_blocks=[30, 1, 2])
    prefill.call("push_blocks", name="blk", dst=blocks_key, src_blocks=[17], dst_blocks=[20],
                 src_layer_range=[1, 2], dst_layer_range=[0, 1])  # layer 1 (tensors 2, 3) into layer 0
    want_blk = Expected(NT, NB, BB).put(blk, [(0, 30), (5, 1), (9, 2)]).put(blk, [(17, 20)], tensors=[0, 1],
                                                                            src_tensors=[2, 3])
    want_blk.check(decode, "blk")
    slot = {"kind": "idx", "cluster_id": D_ID, "cache_id": d_cont["cache_id"], "batch_index": 3}
    prefill.call("push_cache", name="cont", dst=slot, src_batch_index=1)
    Expected(NT, 4, BB).put(cont, [(1, 3)]).check(decode, "cont")
    # and the other way: the decode pulls by id and index and by blocks key, in this mode
    decode.call("pull_cache", name="cont", src={"kind": "idx", "cluster_id": P_ID, "cache_id": p_cont["cache_id"],
                                                "batch_index": 2}, batch_index=0)
    decode.call("pull_blocks", name="blk", src={"kind": "blocks", "cluster_id": P_ID, "model_id": 0},
                src_blocks=[3, 4], dst_blocks=[10, 11])
    Expected(NT, 4, BB).put(cont, [(1, 3), (2, 0)]).check(decode, "cont")
    want_blk.put(blk, [(3, 10), (4, 11)]).check(decode, "blk")


def _rank_table(prefill, decode) -> str:
    """Two servers, one device each, device_ip = the host's own address; prefill rank 0, decode rank 1."""
    servers = [{"server_id": f"server{rank}", "device": [{"device_id": "0", "device_ip": peer.host.ip,
                                                         "rank_id": str(rank)}]}
               for rank, peer in enumerate((prefill, decode))]
    return json.dumps({"version": "1.0", "server_count": "2", "status": "completed", "server_list": servers})


def test_rank_table_link_with_a_device_ip_per_host(make_cluster, transport):
    cluster = make_cluster(2, transport)
    prefill = cluster.instance(0, PROMPT, P_ID, listen=False)
    decode = cluster.instance(1, DECODER, D_ID, listen=False)
    prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=6, model_id=0)
    decode.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=7, model_id=0)
    table = _rank_table(prefill, decode)
    ranks = [[P_ID, 0], [D_ID, 1]]
    comm_p = prefill.call("link", comm_name="pd-netns", ranks=ranks, rank_table=table)["comm_id"]
    comm_d = decode.call("link", comm_name="pd-netns", ranks=ranks, rank_table=table)["comm_id"]
    assert decode.call("wait_comm", comm_id=comm_d)["status"] == 0
    assert prefill.call("wait_comm", comm_id=comm_p)["status"] == 0
    decode.call("pull_blocks", name="kv", src={"kind": "blocks", "cluster_id": P_ID, "model_id": 0},
                src_blocks=[1, 2], dst_blocks=[3, 4])
    prefill.call("pull_blocks", name="kv", src={"kind": "blocks", "cluster_id": D_ID, "model_id": 0},
                 src_blocks=[9], dst_blocks=[10])
    p_src, d_src = source(6, NT, NB, BB), source(7, NT, NB, BB)
    Expected(NT, NB, BB, initial=d_src).put(p_src, [(1, 3), (2, 4)]).check(decode, "kv")
    Expected(NT, NB, BB, initial=p_src).put(d_src, [(9, 10)]).check(prefill, "kv")
    assert f"routes over {transport} (cross host" in decode.log()


LAYERS, ROWS = 4, 4
TENSORS = 2 * LAYERS  # transfer_cache_async moves 2 tensors (K and V) per layer


def _layerwise(make_cluster, transport, mode: str, fail_at=None):
    """Prefill pushes layer by layer; layer k may arrive only after the test released it, byte for byte."""
    ra = mode == "key"
    cluster = make_cluster(2, transport)
    prefill = cluster.instance(0, PROMPT, P_ID, enable_remote_cache_accessible=ra)
    decode = cluster.instance(1, DECODER, D_ID, enable_remote_cache_accessible=ra)
    src = source(8, TENSORS, ROWS, BB)
    prefill.call("register", name="kv", num_tensors=TENSORS, num_blocks=ROWS, block_bytes=BB, seed=8, blocks=ra)
    dst = decode.call("register", name="kv", num_tensors=TENSORS, num_blocks=ROWS, block_bytes=BB, blocks=ra,
                      model_id=5 if ra else None, remote_accessible=True)  # it receives pushes
    link(prefill, decode, D_ID)
    if ra:  # source block i -> destination block 3 - i
        pairs = [(0, 3), (1, 2), (2, 1), (3, 0)]
        configs = [{"key": {"kind": "blocks", "cluster_id": D_ID, "model_id": 5}, "src_layers": [0, LAYERS],
                    "dst_layers": [0, LAYERS]}]
        prefill.call("transfer_async", name="kv", configs=configs, src_blocks=[0, 1, 2, 3], dst_blocks=[3, 2, 1, 0])
    else:  # source slot 1 -> destination slot 2, addresses pre-offset by the caller
        pairs = [(1, 2)]
        configs = [{"dst_cluster_id": D_ID, "dst_addrs": [a + 2 * BB for a in dst["addrs"]],
                    "src_layers": [0, LAYERS], "src_batch_index": 1}]
        prefill.call("transfer_async", name="kv", configs=configs)
    for layer in range(LAYERS):
        wait_until(lambda: prefill.call("asked_layers")["asked"] == list(range(layer + 1)), 20.0,
                   f"the library to ask for layer {layer}")
        # the task waits in synchronize_layer(layer): exactly the layers before it have arrived
        arrived = [t for t in range(TENSORS) if t // 2 < layer]
        Expected(TENSORS, ROWS, BB).put(src, pairs, tensors=arrived).check(decode, "kv")
        prefill.call("release_layer", layer=layer, ok=layer != fail_at)
        if layer == fail_at:
            break
    done = prefill.call("task_wait", timeout_ms=20000)
    return decode, src, pairs, done


def test_layerwise_async_push_by_cache_key(make_cluster, transport):
    decode, src, pairs, done = _layerwise(make_cluster, transport, "key")
    assert (done["code"], done["results"]) == (OK, [OK])
    Expected(TENSORS, ROWS, BB).put(src, pairs).check(decode, "kv")


def test_layerwise_async_push_by_address_and_a_failing_layer(make_cluster, transport):
    decode, src, pairs, done = _layerwise(make_cluster, transport, "raw", fail_at=2)
    failed = int(LLMStatusCode.LLM_PARAM_INVALID)  # a synchronizer that returns False stops the task so
    assert (done["code"], done["results"]) == (failed, [failed])
    Expected(TENSORS, ROWS, BB).put(src, pairs, tensors=range(4)).check(decode, "kv")  # layers 0 and 1 only


def test_two_prefills_two_decodes_pull_concurrently(make_cluster, transport):
    cluster = make_cluster(4, transport)
    prefills = [cluster.instance(i, PROMPT, 21 + i) for i in range(2)]
    decodes = [cluster.instance(2 + i, DECODER, 31 + i) for i in range(2)]
    for i, prefill in enumerate(prefills):
        prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=40 + i, model_id=0)
    for decode in decodes:
        decode.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=0)
        reply = decode.call("link_clusters", clusters=[cluster_entry(p.host, 21 + i, decode.host)
                                                       for i, p in enumerate(prefills)])
        assert (reply["code"], reply["codes"]) == (OK, [OK, OK])
    plan = {}  # (decode, prefill) -> (src blocks, dst blocks): each decode fills disjoint halves from each prefill
    for d in range(2):
        for p in range(2):
            src = [(7 * d + 3 * p + k) % NB for k in range(8)]
            plan[d, p] = (src, [16 * p + 2 * k + d for k in range(8)])
            decodes[d].call("pull_blocks", bg=f"p{p}", name="kv", src={"kind": "blocks", "cluster_id": 21 + p},
                            src_blocks=src, dst_blocks=plan[d, p][1])
    for d, decode in enumerate(decodes):
        want = Expected(NT, NB, BB)
        for p in range(2):
            reply = decode.join(f"p{p}")
            assert reply["ok"], reply
            want.put(source(40 + p, NT, NB, BB), zip(*plan[d, p]))
        want.check(decode, "kv")


def test_auto_routes_over_the_network_between_hosts(make_cluster):
    """Without a forced transport the library sees two hosts and picks a cross-host transport by itself."""
    from llm_datadist.cli.netns import CROSS_HOST_TRANSPORTS

    _cluster, prefill, decode = _pair(make_cluster, None)
    prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=12, model_id=0)
    decode.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=0)
    link(decode, prefill, P_ID)
    decode.call("pull_blocks", name="kv", src={"kind": "blocks", "cluster_id": P_ID}, src_blocks=[4, 5],
                dst_blocks=[6, 7])
    Expected(NT, NB, BB).put(source(12, NT, NB, BB), [(4, 6), (5, 7)]).check(decode, "kv")
    log = decode.log()
    assert any(f"routes over {name} (cross host" in log for name in CROSS_HOST_TRANSPORTS), log


def test_link_secret_authenticates_links_between_hosts(make_cluster, transport):
    cluster = make_cluster(3, transport)
    prefill = cluster.instance(0, PROMPT, P_ID, link_secret="s3cret-between-hosts")
    good = cluster.instance(1, DECODER, D_ID, env={"LLM_DATADIST_LINK_SECRET": "s3cret-between-hosts"})
    bad = cluster.instance(2, DECODER, D_ID + 1, link_secret="wrong")
    prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=13, model_id=0)
    refused = bad.call("link_clusters", clusters=[cluster_entry(prefill.host, P_ID, bad.host)])
    assert refused["code"] == int(LLMStatusCode.LLM_LINK_FAILED), refused
    link(good, prefill, P_ID)
    good.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=0)
    good.call("pull_blocks", name="kv", src={"kind": "blocks", "cluster_id": P_ID}, src_blocks=[1], dst_blocks=[2])
    Expected(NT, NB, BB).put(source(13, NT, NB, BB), [(1, 2)]).check(good, "kv")
