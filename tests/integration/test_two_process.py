"""Two real processes: both link styles, every transfer API and both directions, verified byte for byte."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from llm_datadist import (BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType, LLMClusterInfo,
                          LLMConfig, LLMDataDist, LLMException, LLMRole, LLMStatusCode, Placement)
from tests.integration.conftest import free_port
from tests.integration.peer_proc import pattern
from waiting import NEVER_HANGS_S, wait_until

SENTINEL = 0xA5
NT, NB, BB = 6, 16, 4096  # tensors, blocks, bytes per block


def local_dd(cluster_id, role=LLMRole.DECODER, **config):
    cfg = LLMConfig()
    cfg.enable_cache_manager = True
    for key, value in config.items():
        setattr(cfg, key, value)
    dd = LLMDataDist(role, cluster_id)
    dd.init(cfg.generate_options())
    return dd


def local_blocks(dd, model_id=0, nb=NB, nt=NT, ra=None):
    arrays = [np.full((nb, BB), SENTINEL, np.uint8) for _ in range(nt)]
    desc = CacheDesc(nt, [nb, BB], DataType.DT_UINT8, Placement.DEVICE)
    cache = dd.cache_manager.register_blocks_cache(desc, [a.ctypes.data for a in arrays],
                                                   BlocksCacheKey(dd.cluster_id, model_id), ra)
    return cache, arrays


def cluster(cluster_id, port):
    info = LLMClusterInfo()
    if cluster_id is not None:
        info.remote_cluster_id = cluster_id
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info("127.0.0.1", port)
    return info


def expected_blocks(seed, nt=NT, nb=NB):
    return [pattern(seed, t, nb * BB).reshape(nb, BB) for t in range(nt)]


def check_image(arrays, writes):
    """Every byte of every tensor: ``writes[t]`` is a list of (destination block, expected bytes of that block);
    every other block of tensor ``t`` still holds the sentinel."""
    for t, array in enumerate(arrays):
        want = np.full_like(array, SENTINEL)
        for d, block in writes.get(t, ()):
            want[d] = block
        for d in range(array.shape[0]):
            assert np.array_equal(array[d], want[d]), f"tensor {t} block {d}"


def check_blocks(arrays, expected, pairs, tensors=None):
    """Destination blocks hold the source blocks (of ``tensors``, default all); every other byte is the sentinel."""
    check_image(arrays, {t: [(d, expected[t][s]) for s, d in pairs]
                         for t in range(len(arrays)) if tensors is None or t in tensors})


def _digest_blocks(peer, name, nb):
    """Every tensor of the peer's cache ``name``, read back from the peer process."""
    tensors = peer.call("digest", name=name)["tensors"]
    return [np.frombuffer(bytes.fromhex(t), np.uint8).reshape(nb, BB) for t in tensors]


@pytest.fixture
def prefill(spawn_peer):
    """A prefill peer listening on a free port with a seeded blocks cache (model 0)."""
    port = free_port()
    peer = spawn_peer()
    peer.call("init", role=1, cluster_id=11, config={"enable_cache_manager": True,
                                                     "listen_ip_info": f"127.0.0.1:{port}"})
    peer.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=5, model_id=0)
    peer.port = port
    return peer


def test_link_clusters_pull_blocks_scattered(prefill):
    dd = local_dd(22)
    try:
        cache, arrays = local_blocks(dd)
        assert dd.link_clusters([cluster(11, prefill.port)], 5000) == (LLMStatusCode.LLM_SUCCESS,
                                                                        [LLMStatusCode.LLM_SUCCESS])
        pairs = [(15, 0), (3, 9), (4, 10), (5, 11), (0, 2)]
        dd.cache_manager.pull_blocks(BlocksCacheKey(11, 0), cache, [s for s, _ in pairs], [d for _, d in pairs])
        expected = expected_blocks(5)
        check_blocks(arrays, expected, pairs)
        # layer range: layer 1 only (tensors 2 and 3 of the K/V pairs) into block 13
        dd.cache_manager.pull_blocks(BlocksCacheKey(11, 0), cache, [7], [13],
                                     src_layer_range=range(1, 2), dst_layer_range=range(1, 2))
        check_image(arrays, {t: [(d, expected[t][s]) for s, d in pairs + ([(7, 13)] if t in (2, 3) else [])]
                             for t in range(NT)})
        with pytest.raises(LLMException) as err:
            dd.cache_manager.pull_blocks(BlocksCacheKey(11, 0), cache, [NB], [0])
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert dd.unlink_clusters([cluster(11, prefill.port)], 3000) == (LLMStatusCode.LLM_SUCCESS,
                                                                          [LLMStatusCode.LLM_SUCCESS])
        with pytest.raises(LLMException) as err:
            dd.cache_manager.pull_blocks(BlocksCacheKey(11, 0), cache, [0], [0])
        assert err.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    finally:
        dd.finalize()


def test_server_pulls_from_client_without_any_call_on_client(prefill):
    """Links are symmetric; the listening prefill peer pulls from the decode side."""
    dd = local_dd(23)
    try:
        _cache, arrays = local_blocks(dd, model_id=0)
        for t, array in enumerate(arrays):
            array[:] = pattern(77, t, NB * BB).reshape(NB, BB)
        assert dd.link_clusters([cluster(11, prefill.port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        prefill.call("register", name="dst", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=None, model_id=9)
        prefill.call("pull_blocks", name="dst", cluster_id=23, model_id=0, src_blocks=[1, 2], dst_blocks=[5, 6])
        for t, got in enumerate(_digest_blocks(prefill, "dst", NB)):
            want = np.zeros((NB, BB), np.uint8)  # the peer's destination starts zeroed
            want[5:7] = pattern(77, t, NB * BB).reshape(NB, BB)[1:3]
            assert np.array_equal(got, want), f"tensor {t}"
    finally:
        dd.finalize()


def test_pull_cache_by_key_consumes_on_owner(spawn_peer):
    port = free_port()
    peer = spawn_peer()
    peer.call("init", role=1, cluster_id=31, config={"enable_cache_manager": True,
                                                     "listen_ip_info": f"127.0.0.1:{port}",
                                                     "mem_pool_cfg": json.dumps({"memory_size": 8 << 20})})
    peer.call("allocate", name="c", num_tensors=4, num_blocks=3, block_bytes=BB, seed=9, keys=[[100, 0], [101, 0]])
    dd = local_dd(32)
    try:
        arrays = [np.full((2, BB), SENTINEL, np.uint8) for _ in range(4)]
        cache = dd.cache_manager.register_cache(CacheDesc(4, [2, BB], DataType.DT_UINT8),
                                                [a.ctypes.data for a in arrays])
        assert dd.link_clusters([cluster(31, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        expected = expected_blocks(9, nt=4, nb=3)
        dd.cache_manager.pull_cache(CacheKey(31, 101, 0), cache, 1)
        check_image(arrays, {t: [(1, expected[t][1])] for t in range(4)})
        with pytest.raises(LLMException) as err:  # consumed by the successful pull
            dd.cache_manager.pull_cache(CacheKey(31, 101, 0), cache, 1)
        assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
        dd.cache_manager.pull_cache(CacheKey(31, 100, 0), cache, 0, size=100)
        partial = [np.concatenate([expected[t][0][:100], np.full(BB - 100, SENTINEL, np.uint8)]) for t in range(4)]
        check_image(arrays, {t: [(1, expected[t][1]), (0, partial[t])] for t in range(4)})
        # id + index still reaches the slot while the cache exists
        dd.cache_manager.pull_cache(CacheKeyByIdAndIndex(31, 1, 2), cache, 0)
        check_image(arrays, {t: [(1, expected[t][1]), (0, expected[t][2])] for t in range(4)})
    finally:
        dd.finalize()


def test_pull_blocks_from_continuous_slot(spawn_peer):
    port = free_port()
    peer = spawn_peer()
    peer.call("init", role=1, cluster_id=41, config={"enable_cache_manager": True,
                                                     "listen_ip_info": f"127.0.0.1:{port}"})
    # continuous cache: 2 slots of 4 blocks each (slot stride 4*BB)
    peer.call("register", name="c", num_tensors=2, num_blocks=2, block_bytes=4 * BB, seed=3, blocks=False,
              keys=[[7, 0]])
    dd = local_dd(42)
    try:
        cache, arrays = local_blocks(dd, nt=2)
        assert dd.link_clusters([cluster(41, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        dd.cache_manager.pull_blocks(CacheKey(41, 7, 0), cache, [], [9, 2, 14])
        source = [pattern(3, t, 2 * 4 * BB) for t in range(2)]
        for t in range(2):
            assert np.array_equal(arrays[t][9], source[t][0:BB])
            assert np.array_equal(arrays[t][2], source[t][BB:2 * BB])
            assert np.array_equal(arrays[t][14], source[t][2 * BB:3 * BB])
            assert (arrays[t][[0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15]] == SENTINEL).all()
    finally:
        dd.finalize()


def test_remote_accessible_mode_push_and_pull(spawn_peer):
    port = free_port()
    peer = spawn_peer()
    peer.call("init", role=2, cluster_id=51, config={"enable_cache_manager": True,
                                                     "listen_ip_info": f"127.0.0.1:{port}",
                                                     "enable_remote_cache_accessible": True})
    peer.call("register", name="blk", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=None, model_id=0)
    peer.call("register", name="cont", num_tensors=2, num_blocks=4, block_bytes=BB, seed=8, blocks=False)
    dd = local_dd(52, role=LLMRole.PROMPT, enable_remote_cache_accessible=True)
    try:
        cache, arrays = local_blocks(dd, model_id=0)
        for t, array in enumerate(arrays):
            array[:] = pattern(61, t, NB * BB).reshape(NB, BB)
        assert dd.link_clusters([cluster(51, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        dd.cache_manager.push_blocks(BlocksCacheKey(51, 0), cache, [0, 1, 2, 9], [4, 5, 6, 1])
        for t, got in enumerate(_digest_blocks(peer, "blk", NB)):
            want = np.zeros((NB, BB), np.uint8)  # the peer's destination starts zeroed
            want[[4, 5, 6, 1]] = pattern(61, t, NB * BB).reshape(NB, BB)[[0, 1, 2, 9]]
            assert np.array_equal(got, want), f"tensor {t}"
        # pull by id and index (the only key allowed in this mode) from the continuous cache (id 2)
        carrays = [np.full((4, BB), SENTINEL, np.uint8) for _ in range(2)]
        ccache = dd.cache_manager.register_cache(CacheDesc(2, [4, BB], DataType.DT_UINT8),
                                                 [a.ctypes.data for a in carrays], remote_accessible=True)
        dd.cache_manager.pull_cache(CacheKeyByIdAndIndex(51, 2, 3), ccache, 0)
        source = expected_blocks(8, nt=2, nb=4)
        check_image(carrays, {t: [(0, source[t][3])] for t in range(2)})
        carrays[0][2] = 1
        dd.cache_manager.push_cache(CacheKeyByIdAndIndex(51, 2, 0), ccache, 2, tensor_num_per_layer=1)
        for t, got in enumerate(_digest_blocks(peer, "cont", 4)):
            want = source[t].copy()
            want[0] = 1 if t == 0 else SENTINEL  # local slot 2 of each tensor
            assert np.array_equal(got, want), f"tensor {t}"
        with pytest.raises(LLMException) as err:
            dd.cache_manager.push_cache(CacheKeyByIdAndIndex(51, 99, 0), ccache, 0)
        assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    finally:
        dd.finalize()


def rank_table(ip="127.0.0.1"):
    return json.dumps({"version": "1.0", "server_count": "1", "status": "completed", "server_list": [
        {"server_id": ip, "device": [{"device_id": "0", "device_ip": ip, "rank_id": "0"},
                                     {"device_id": "0", "device_ip": ip, "rank_id": "1"}]}]})


@pytest.mark.parametrize("local_rank", [0, 1])
def test_rank_table_link_both_sides(spawn_peer, local_rank):
    """Both call link() about the same time with the same device ip/id (one host), then poll."""
    peer = spawn_peer()
    peer.call("init", role=1, cluster_id=61, config={"enable_cache_manager": True})
    peer.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=12, model_id=3)
    dd = local_dd(62)
    try:
        cache, arrays = local_blocks(dd, model_id=3)
        ranks = {61: 1 - local_rank, 62: local_rank}
        ordered = sorted(ranks.items(), key=lambda kv: kv[1])
        comm_id = dd.link("pd_comm_127.0.0.1_127.0.0.1", dict(ordered), rank_table())
        assert comm_id >= 1 and comm_id not in set(int(c) for c in LLMStatusCode)
        assert dd.query_register_mem_status(comm_id).value == 1  # PREPARING: we wait for the peer, which comes later
        peer_comm = peer.call("link", comm_name="pd_comm_127.0.0.1_127.0.0.1", ranks=ordered,
                              rank_table=rank_table())["comm_id"]
        assert wait_until(lambda: dd.query_register_mem_status(comm_id).value != 1, 2 * NEVER_HANGS_S)
        assert dd.query_register_mem_status(comm_id).value == 0
        assert peer.call("wait_comm", comm_id=peer_comm)["status"] == 0
        dd.cache_manager.pull_blocks(BlocksCacheKey(61, 3), cache, [1, 2], [3, 4])
        check_blocks(arrays, expected_blocks(12), [(1, 3), (2, 4)])
        dd.unlink(comm_id)
        with pytest.raises(LLMException) as err:
            dd.cache_manager.pull_blocks(BlocksCacheKey(61, 3), cache, [1], [3])
        assert err.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
        with pytest.raises(LLMException) as err:
            dd.unlink(comm_id)
        assert err.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    finally:
        dd.finalize()


def test_rank_table_link_fails_when_peer_never_comes():
    dd = local_dd(71, link_total_time=1)
    try:
        comm_id = dd.link("lonely", {71: 0, 72: 1}, rank_table())
        assert dd.query_register_mem_status(comm_id).value == 1
        assert wait_until(lambda: dd.query_register_mem_status(comm_id).value != 1)  # link_total_time is 1 s
        assert dd.query_register_mem_status(comm_id).value == 2
        with pytest.raises(LLMException) as err:
            dd.cache_manager.pull_blocks(BlocksCacheKey(72, 0), local_blocks(dd)[0], [0], [0])
        assert err.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    finally:
        dd.finalize()


def test_many_comm_domains_in_flight_before_polling(spawn_peer):
    """Omni/MindIE: several link() calls back to back, polled later; distinct peers on one host, same device ip/id."""
    peers = []
    for i in range(3):
        peer = spawn_peer()
        peer.call("init", role=1, cluster_id=100 + i, config={"enable_cache_manager": True})
        peer.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=20 + i, model_id=0)
        peers.append(peer)
    dd = local_dd(200)
    try:
        cache, arrays = local_blocks(dd)
        comms = [dd.link(f"pd_comm_{i}", {100 + i: 0, 200: 1}, rank_table()) for i in range(3)]
        assert comms == sorted(set(comms))
        for i, peer in enumerate(peers):
            peer.send("link", comm_name=f"pd_comm_{i}", ranks=[[100 + i, 0], [200, 1]], rank_table=rank_table())
        for peer in peers:
            assert peer.recv()["ok"]
        for comm_id in comms:
            assert wait_until(lambda: dd.query_register_mem_status(comm_id).value != 1, 2 * NEVER_HANGS_S)
            assert dd.query_register_mem_status(comm_id).value == 0
        for i in range(3):
            dd.cache_manager.pull_blocks(BlocksCacheKey(100 + i, 0), cache, [i], [i])
        check_image(arrays, {t: [(i, expected_blocks(20 + i)[t][i]) for i in range(3)] for t in range(NT)})
    finally:
        dd.finalize()


def test_concurrent_pulls_from_32_threads_two_peers(spawn_peer):
    peers = []
    for i in range(2):
        port = free_port()
        peer = spawn_peer()
        peer.call("init", role=1, cluster_id=300 + i, config={"enable_cache_manager": True,
                                                              "listen_ip_info": f"127.0.0.1:{port}"})
        peer.call("register", name="kv", num_tensors=NT, num_blocks=64, block_bytes=BB, seed=40 + i, model_id=0)
        peers.append((peer, port))
    dd = local_dd(400)
    try:
        cache, arrays = local_blocks(dd, nb=64)
        for i, (_, port) in enumerate(peers):
            assert dd.link_clusters([cluster(300 + i, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        errors = []

        def work(k):
            try:
                src = 300 + k % 2
                dd.cache_manager.pull_blocks(BlocksCacheKey(src, 0), cache, [k, k + 32], [2 * k, 2 * k + 1])
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors
        expected = [expected_blocks(40, nb=64), expected_blocks(41, nb=64)]
        for k in range(32):
            for t in range(NT):
                assert np.array_equal(arrays[t][2 * k], expected[k % 2][t][k])
                assert np.array_equal(arrays[t][2 * k + 1], expected[k % 2][t][k + 32])
    finally:
        dd.finalize()


def test_blocks_view_refreshes_when_owner_reregisters(prefill):
    """Normal mode caches blocks views per link; a re-registration on the owner is seen at once."""
    dd = local_dd(24)
    try:
        cache, arrays = local_blocks(dd)
        assert dd.link_clusters([cluster(11, prefill.port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        dd.cache_manager.pull_blocks(BlocksCacheKey(11, 0), cache, [1], [1])
        check_blocks(arrays, expected_blocks(5), [(1, 1)])
        prefill.call("register", name="kv2", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=6, model_id=0)
        dd.cache_manager.pull_blocks(BlocksCacheKey(11, 0), cache, [1], [2])
        check_image(arrays, {t: [(1, expected_blocks(5)[t][1]), (2, expected_blocks(6)[t][1])] for t in range(NT)})
    finally:
        dd.finalize()




def test_pull_after_the_owner_remaps_registered_memory_gets_the_new_bytes(prefill):
    """The owner puts new pages behind its registered tensors (new content) and calls remap_registered_memory:
    every later pull returns the new bytes, never the ones the old pages held."""
    prefill.call("register", name="remapped", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=31, model_id=4,
                 aligned=True)
    dd = local_dd(25)
    try:
        cache, arrays = local_blocks(dd)
        assert dd.link_clusters([cluster(11, prefill.port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        everything = [(b, b) for b in range(NB)]
        dd.cache_manager.pull_blocks(BlocksCacheKey(11, 4), cache, list(range(NB)), list(range(NB)))
        check_blocks(arrays, expected_blocks(31), everything)
        for seed in (32, 33):  # twice: the second remap follows a pull that used the first one's view
            assert prefill.call("remap", name="remapped", seed=seed)["spans"] == NT
            for got, want in zip(_digest_blocks(prefill, "remapped", NB), expected_blocks(seed)):
                assert np.array_equal(got, want)  # the owner itself reads the new bytes
            for array in arrays:
                array[:] = SENTINEL
            dd.cache_manager.pull_blocks(BlocksCacheKey(11, 4), cache, list(range(NB)), list(range(NB)))
            check_blocks(arrays, expected_blocks(seed), everything)
    finally:
        dd.finalize()


def test_pull_after_the_owner_remaps_pool_memory_gets_the_new_bytes(spawn_peer):
    """The same for a pool-allocated cache, which a same-host peer may read through the pool's shared segment."""
    port = free_port()
    peer = spawn_peer()
    peer.call("init", role=1, cluster_id=81, config={"enable_cache_manager": True,
                                                     "listen_ip_info": f"127.0.0.1:{port}",
                                                     "mem_pool_cfg": json.dumps({"memory_size": 8 << 20})})
    nt, nb = 4, 4
    cache_id = peer.call("allocate", name="c", num_tensors=nt, num_blocks=nb, block_bytes=BB, seed=41,
                         keys=[[1, 0]])["cache_id"]
    dd = local_dd(82)
    try:
        arrays = [np.full((nb, BB), SENTINEL, np.uint8) for _ in range(nt)]
        cache = dd.cache_manager.register_cache(CacheDesc(nt, [nb, BB], DataType.DT_UINT8),
                                                [a.ctypes.data for a in arrays])
        assert dd.link_clusters([cluster(81, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        everything = [(b, b) for b in range(nb)]

        def pull_all():
            for array in arrays:
                array[:] = SENTINEL
            for b in range(nb):
                dd.cache_manager.pull_cache(CacheKeyByIdAndIndex(81, cache_id, b), cache, b)

        pull_all()
        check_blocks(arrays, expected_blocks(41, nt=nt, nb=nb), everything)
        for seed in (42, 43):
            peer.call("remap", name="c", seed=seed)
            for got, want in zip(_digest_blocks(peer, "c", nb), expected_blocks(seed, nt=nt, nb=nb)):
                assert np.array_equal(got, want)
            pull_all()
            check_blocks(arrays, expected_blocks(seed, nt=nt, nb=nb), everything)
    finally:
        dd.finalize()
