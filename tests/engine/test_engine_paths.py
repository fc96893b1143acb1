"""The engine's planner, routing, write grants, stale views and layer-wise tasks, seen through recording
transports (in-process fakes that copy for real and record every plan) instead of through the bytes only."""
from __future__ import annotations

import json

import numpy as np
import pytest
from ports import free_port as _port

import fakes_transport as rec
from llm_datadist._transport.base import TransportClosed
from llm_datadist import (BlocksCacheKey, CacheDesc, DataType, LayerSynchronizer, LLMClusterInfo, LLMConfig,
                          LLMDataDist, LLMException, LLMRole, LLMStatusCode, Placement, TransferWithCacheKeyConfig)

S = LLMStatusCode
BB, NB = 4096, 8
POOL = json.dumps({"memory_size": 1 << 20, "page_shift": 16})


@pytest.fixture(autouse=True)
def _fakes():
    rec.install()
    rec.LOG.clear()
    rec.ON_WRITE.clear()
    yield
    rec.ON_WRITE.clear()
    rec.uninstall()


@pytest.fixture
def make_pair(monkeypatch):
    made = []

    def factory(transports: str, ra: bool = False):
        monkeypatch.setenv("LLM_DATADIST_TRANSPORT", transports)
        port = _port()
        pair = []
        for role, cluster, listen in ((LLMRole.PROMPT, 1, True), (LLMRole.DECODER, 2, False)):
            cfg = LLMConfig()
            cfg.enable_cache_manager = True
            cfg.enable_remote_cache_accessible = ra
            cfg.host_mem_pool_cfg = POOL
            if listen:
                cfg.listen_ip_info = f"127.0.0.1:{port}"
            dd = LLMDataDist(role, cluster)
            dd.init(cfg.generate_options())
            made.append(dd)
            pair.append(dd)
        info = LLMClusterInfo()
        info.remote_cluster_id = 1
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info("127.0.0.1", port)
        assert pair[1].link_clusters([info], 3000)[0] == S.LLM_SUCCESS
        return pair

    yield factory
    for dd in reversed(made):
        dd.finalize()


def _blocks(dd, nt=2, seed=None, model_id=0, remote_accessible=None):
    arrays = [np.zeros((NB, BB), np.uint8) if seed is None else
              np.random.default_rng(seed + t).integers(0, 256, (NB, BB), dtype=np.uint8) for t in range(nt)]
    desc = CacheDesc(nt, [NB, BB], DataType.DT_UINT8, Placement.DEVICE)
    cache = dd.cache_manager.register_blocks_cache(desc, arrays, BlocksCacheKey(dd.cluster_id, model_id),
                                                   remote_accessible)
    return cache, arrays


def test_a_pull_is_planned_once_merged_and_carries_the_owners_guard(make_pair):
    p, d = make_pair("recording")
    _src_cache, src = _blocks(p, seed=1)
    cache, dst = _blocks(d)
    d.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, [2, 3, 4], [5, 6, 7])
    (plan,) = rec.plans("read")
    assert len(plan) == 2  # three neighbouring blocks per tensor became one op each
    assert list(plan.sizes) == [3 * BB, 3 * BB] and plan.local_kind == plan.remote_kind == "host"
    assert len(plan.guards) == 1
    entry = p._engine.registry.lookup_blocks(0)
    assert (plan.guards[0].slot, plan.guards[0].value) == (entry.guard.slot, entry.guard.value)
    for t in range(2):
        assert np.array_equal(dst[t][5:8], src[t][2:5]) and not dst[t][:5].any()


def test_a_partial_route_takes_what_it_covers_and_the_general_one_the_rest(make_pair):
    p, d = make_pair("recording_partial,recording")
    pooled = p.cache_manager.allocate_blocks_cache(CacheDesc(2, [NB, BB], DataType.DT_UINT8, Placement.HOST),
                                                   BlocksCacheKey(1, 7))
    _reg, _src = _blocks(p, seed=2)
    cache, _dst = _blocks(d)
    d.cache_manager.pull_blocks(BlocksCacheKey(1, 7), cache, [0], [0])
    d.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, [1], [1])
    assert len(rec.plans("read", "recording_partial")) == 1 and len(rec.plans("read", "recording")) == 1
    assert d._engine.route(1, every=True) == "recording_partial>recording"
    connects = [e for e in rec.LOG if e[1] == "connect"]
    assert [e[0] for e in connects] == ["recording_partial", "recording"]  # both, once, in priority order
    assert pooled.cache_id > 0


def test_no_route_for_the_memory_kind_is_link_failed(make_pair):
    p, d = make_pair("recording_cuda")
    _blocks(p, seed=3)
    cache, _dst = _blocks(d)
    with pytest.raises(LLMException) as exc:
        d.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, [0], [0])
    assert exc.value.status_code == S.LLM_LINK_FAILED and "host <-> host" in str(exc.value)
    assert not rec.plans("read")


def test_a_one_sided_write_runs_under_the_owners_write_grant(make_pair):
    p, d = make_pair("recording", ra=True)
    _dst_cache, dst = _blocks(d, model_id=4)
    src_cache, src = _blocks(p, seed=5)
    entry = d._engine.registry.lookup_blocks(4)
    pins_during_write = []
    rec.ON_WRITE.append(lambda plan: pins_during_write.append(entry.pins))
    p.cache_manager.push_blocks(BlocksCacheKey(2, 4), src_cache, [1, 5], [0, 3])
    p.cache_manager.push_blocks(BlocksCacheKey(2, 4), src_cache, [2], [6])
    assert pins_during_write == [1, 1]  # the owner held the destination while the bytes moved, under one grant
    for t in range(2):
        assert np.array_equal(dst[t][0], src[t][1]) and np.array_equal(dst[t][3], src[t][5])
        assert np.array_equal(dst[t][6], src[t][2])
    assert entry.pins == 1  # the writer keeps the grant for later writes to this generation
    d.cache_manager.unregister_cache(_dst_cache.cache_id)  # the owner asks for it back and frees the cache
    assert entry.pins == 0 and entry.freed.is_set()


def test_a_stale_blocks_view_fails_its_guard_and_is_retried_once_on_a_fresh_view(make_pair):
    p, d = make_pair("recording")
    first, _ = _blocks(p, seed=6)
    cache, dst = _blocks(d)
    d.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, [0], [0])  # caches the blocks view
    p.cache_manager.unregister_cache(first.cache_id)
    _second, src2 = _blocks(p, seed=60)  # the same key, another cache (its table notice may lag)
    d.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, [2], [2])
    assert np.array_equal(dst[0][2], src2[0][2]) and np.array_equal(dst[1][2], src2[1][2])


class _Ready(LayerSynchronizer):
    def synchronize_layer(self, layer_index, timeout_in_millis):
        return True


def test_a_layerwise_task_makes_one_guarded_write_per_layer_and_destination(make_pair):
    p, d = make_pair("recording", ra=True)
    _dst_cache, dst = _blocks(d, nt=6, model_id=9)
    src_cache, src = _blocks(p, nt=6, seed=7)
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(2, 9), range(0, 3), range(0, 3))
    task = p.cache_manager.transfer_cache_async(src_cache, _Ready(), [cfg], [1, 2], [6, 7])
    assert task.synchronize(10000) == S.LLM_SUCCESS
    writes = rec.plans("write")
    assert len(writes) == 3
    bases = d._engine.registry.lookup_blocks(9).tensor_addrs
    tensor_of = {t: range(base, base + NB * BB) for t, base in enumerate(bases)}
    remote_tensors = [sorted({t for a in plan.remote.tolist() for t, span in tensor_of.items() if a in span})
                      for plan in writes]
    assert remote_tensors == [[0, 1], [2, 3], [4, 5]]  # layer by layer, K and V of each
    assert all(len(plan.guards) == 1 for plan in writes)
    for t in range(6):
        assert np.array_equal(dst[t][6:8], src[t][1:3])


def _server_info(dd, cluster_id: int) -> LLMClusterInfo:
    host, port = dd._engine.links.listen_address
    info = LLMClusterInfo()
    info.remote_cluster_id = cluster_id
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info(host, port)
    return info


def test_a_route_that_breaks_with_its_peer_gone_drops_the_link_before_the_error_is_reported(make_pair):
    """The peer's forced unlink broke the data route: the failed push is LINK_FAILED, the next call NOT_YET_LINK
    at once (not LINK_FAILED again while the closed control connection is still on its way)."""
    p, d = make_pair("recording", ra=True)
    _dst_cache, _dst = _blocks(d, model_id=4)
    src_cache, _src = _blocks(p, seed=8)

    def peer_forces_unlink(plan):
        rec.ON_WRITE.clear()
        assert d.unlink_clusters([_server_info(p, 1)], 2000, force=True)[0] == S.LLM_SUCCESS
        raise TransportClosed("the peer closed the data route")

    rec.ON_WRITE.append(peer_forces_unlink)
    with pytest.raises(LLMException) as exc:
        p.cache_manager.push_blocks(BlocksCacheKey(2, 4), src_cache, [0], [0])
    assert exc.value.status_code == S.LLM_LINK_FAILED
    with pytest.raises(LLMException) as exc:
        p.cache_manager.push_blocks(BlocksCacheKey(2, 4), src_cache, [0], [0])
    assert exc.value.status_code == S.LLM_NOT_YET_LINK


def test_a_route_that_breaks_while_its_peer_answers_keeps_the_link(make_pair):
    p, d = make_pair("recording", ra=True)
    _dst_cache, dst = _blocks(d, model_id=4)
    src_cache, src = _blocks(p, seed=9)

    def route_breaks(plan):
        rec.ON_WRITE.clear()
        raise TransportClosed("one data connection was cut")

    rec.ON_WRITE.append(route_breaks)
    with pytest.raises(LLMException) as exc:
        p.cache_manager.push_blocks(BlocksCacheKey(2, 4), src_cache, [1], [2])
    assert exc.value.status_code == S.LLM_LINK_FAILED
    p.cache_manager.push_blocks(BlocksCacheKey(2, 4), src_cache, [1], [2])  # the peer answered its ping
    for t in range(2):
        assert np.array_equal(dst[t][2], src[t][1])
