"""Pulls and pushes between two linked instances: keys, remote access, layer ranges, timeouts, key consumption.

P (PROMPT, cluster 1, listening) and D (DECODER, cluster 2) live in this process and are linked by
``D.link_clusters``. Every data test fills the destination with a sentinel and checks the bytes written and the
bytes that must stay untouched.
"""
from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

from fakes import Delayed
from waiting import NEVER_HANGS_S, wait_until
from llm_datadist import (BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType, LLMException, LLMRole,
                          LLMStatusCode, Placement, RegisterMemStatus)

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
NOT_YET_LINK = LLMStatusCode.LLM_NOT_YET_LINK
UINT64_MAX = 2**64 - 1
P, D = 1, 2  # cluster ids of the pair (conftest P_ID, D_ID)


def _status(call) -> LLMStatusCode:
    with pytest.raises(LLMException) as exc:
        call()
    return exc.value.status_code


def _alloc(cm, tools, num_tensors, shape, keys=(), blocks=False, blocks_key=None, placement=Placement.DEVICE):
    """A pool-allocated cache filled with a pattern; returns (cache, [rows view per tensor])."""
    desc = CacheDesc(num_tensors, list(shape), DataType.DT_UINT8, placement)
    cache = cm.allocate_blocks_cache(desc, blocks_key) if blocks else cm.allocate_cache(desc, list(keys))
    views = []
    for i, addr in enumerate(cache.tensor_addrs):
        view = tools.mem_view(addr, desc.size)
        view[:] = (np.arange(desc.size) * 13 + i * 17 + 3) % 229  # never the sentinel (0xEE = 238)
        views.append(view.reshape(shape[0], -1))
    return cache, views


def _untouched(arrays, tools, written):
    """Every row of every tensor not in ``written`` still holds the sentinel."""
    for array in arrays:
        rows = tools.rows(array)
        keep = [r for r in range(rows.shape[0]) if r not in written]
        assert (rows[keep] == tools.SENTINEL).all()


# -- allocation and keys, seen by a peer -----------------------------------------------------------
def test_placeholder_slot_is_unbound(pd, new_cache, tools):
    src, views = _alloc(pd.p_cm, tools, 2, (3, 32), keys=[CacheKey(P, 10), CacheKey(P, UINT64_MAX), CacheKey(P, 12)])
    dst, arrays = new_cache(pd.d_cm, 2, (3, 32), fill="sentinel")
    pd.d_cm.pull_cache(CacheKey(P, 12), dst, 0)
    assert all((a[0] == v[2]).all() for a, v in zip(arrays, views))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, UINT64_MAX), dst, 1)) == PARAM_INVALID
    pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 1), dst, 1)  # the slot itself is pullable by id
    assert all((a[1] == v[1]).all() for a, v in zip(arrays, views))
    _untouched(arrays, tools, {0, 1})
    pd.d_cm.pull_cache(CacheKey(P, 10), dst, 2)


def test_deallocate_defers_free_until_keys_pulled(pd, new_cache, tools):
    src, views = _alloc(pd.p_cm, tools, 2, (2, 32), keys=[CacheKey(P, 1), CacheKey(P, 2)])
    expected = [v.copy() for v in views]
    pd.p_cm.deallocate_cache(src)
    assert src.tensor_addrs == []
    dst, arrays = new_cache(pd.d_cm, 2, (2, 32), fill="sentinel")
    pd.d_cm.pull_cache(CacheKey(P, 2), dst, 0)
    pd.d_cm.pull_cache(CacheKey(P, 1), dst, 1)
    for a, e in zip(arrays, expected):
        assert (a[0] == e[1]).all() and (a[1] == e[0]).all()
    # both keys consumed and the id reference gone: the cache is freed
    assert _status(lambda: pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 0), dst, 0)) == NOT_EXIST


def test_deallocated_cache_freed_by_remove_key(pd, new_cache, tools):
    src, _ = _alloc(pd.p_cm, tools, 1, (2, 32), keys=[CacheKey(P, 1)])
    pd.p_cm.deallocate_cache(src)
    pd.p_cm.remove_cache_key(CacheKey(P, 1))
    dst, _ = new_cache(pd.d_cm, 1, (2, 32))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 0), dst)) == NOT_EXIST


# -- registration, seen by a peer ------------------------------------------------------------------
def test_default_remote_accessible_by_placement(pd_ra, new_cache, tools):
    src, src_arrays = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.DEVICE)
    host_dst, host_arrays = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.HOST, fill="sentinel")
    dev_dst, dev_arrays = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE, fill="sentinel")
    key = CacheKeyByIdAndIndex(P, src.cache_id, 1)
    assert _status(lambda: pd_ra.d_cm.pull_cache(key, host_dst)) == PARAM_INVALID  # HOST: not remote accessible
    pd_ra.d_cm.pull_cache(key, dev_dst)  # DEVICE: remote accessible by default
    assert all((d[0] == s[1]).all() for s, d in zip(src_arrays, dev_arrays))
    assert all((h == tools.SENTINEL).all() for h in host_arrays)


def test_remote_host_cache_not_accessible_by_default(pd_ra, new_cache):
    src, _ = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.HOST)  # default: not remote accessible
    dst, _ = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE)
    assert _status(lambda: pd_ra.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 0), dst)) \
        == PARAM_INVALID


def test_host_memory_remote_accessible(pd_ra, new_cache, tools):
    src, src_arrays = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.HOST, remote_accessible=True)
    dst, dst_arrays = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.HOST, remote_accessible=True,
                                fill="sentinel")
    pd_ra.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 0), dst, 1)
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[1] == s[0]).all() and (d[0] == tools.SENTINEL).all()


def test_unregistered_cache_is_not_pullable(pd, new_cache):
    src, _ = new_cache(pd.p_cm, 1, (2, 16), keys=[CacheKey(P, 3)])
    dst, _ = new_cache(pd.d_cm, 1, (2, 16))
    pd.d_cm.pull_cache(CacheKey(P, 3), dst)
    pd.p_cm.unregister_cache(src.cache_id)
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 3), dst)) == NOT_EXIST
    assert _status(lambda: pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id), dst)) == NOT_EXIST


# -- pull_cache ------------------------------------------------------------------------------------
def test_pull_cache_4_bytes(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 2, (2, 16), keys=[CacheKey(P, 0, 0)])
    dst, dst_arrays = new_cache(pd.d_cm, 2, (2, 16), fill="sentinel")
    pd.d_cm.pull_cache(CacheKey(P, 0, 0), dst, 0, 4)
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[0, :4] == s[0, :4]).all()
        assert (d[0, 4:] == tools.SENTINEL).all() and (d[1] == tools.SENTINEL).all()


def test_layer_range_on_one_tensor_cache(pd, new_cache, tools):
    _, src_arrays = new_cache(pd.p_cm, 1, (2, 16), keys=[CacheKey(P, 1)])
    dst, arrays = new_cache(pd.d_cm, 1, (2, 16), fill="sentinel")
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst, 0, src_layer_range=range(1),
                                              dst_layer_range=range(1))) == PARAM_INVALID
    assert (arrays[0] == tools.SENTINEL).all()
    pd.d_cm.pull_cache(CacheKey(P, 1), dst, 0, src_layer_range=range(1), dst_layer_range=range(1),
                       tensor_num_per_layer=1)
    assert (arrays[0][0] == src_arrays[0][0]).all() and (arrays[0][1] == tools.SENTINEL).all()


def test_pull_one_layer_of_ten_tensors(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 10, (2, 16), keys=[CacheKey(P, 1)])
    dst, dst_arrays = new_cache(pd.d_cm, 10, (2, 16), fill="sentinel")
    pd.d_cm.pull_cache(CacheKey(P, 1), dst, 1, src_layer_range=range(0, 1), dst_layer_range=range(0, 1),
                       tensor_num_per_layer=2)
    for t in range(10):
        if t < 2:
            assert (dst_arrays[t][1] == src_arrays[t][0]).all() and (dst_arrays[t][0] == tools.SENTINEL).all()
        else:
            assert (dst_arrays[t] == tools.SENTINEL).all()


def test_pull_layer_ranges_map_tensors(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 8, (2, 16))
    dst, dst_arrays = new_cache(pd.d_cm, 8, (2, 16), fill="sentinel")
    key = CacheKeyByIdAndIndex(P, src.cache_id, 1)
    pd.d_cm.pull_cache(key, dst, 0, src_layer_range=range(1, 2), dst_layer_range=range(3, 4))
    for t in range(8):
        if t in (6, 7):
            assert (dst_arrays[t][0] == src_arrays[t - 4][1]).all()
            assert (dst_arrays[t][1] == tools.SENTINEL).all()
        else:
            assert (dst_arrays[t] == tools.SENTINEL).all()
    # tensor_num_per_layer=4: layer 1 is tensors 4..7
    pd.d_cm.pull_cache(key, dst, 1, src_layer_range=range(0, 1), dst_layer_range=range(1, 2),
                       tensor_num_per_layer=4)
    for t in range(4, 8):
        assert (dst_arrays[t][1] == src_arrays[t - 4][1]).all()
    # only a src range: its tensors must match all destination tensors
    small, small_arrays = new_cache(pd.d_cm, 2, (2, 16), fill="sentinel")
    pd.d_cm.pull_cache(key, small, 0, src_layer_range=range(3, 4))
    assert all((small_arrays[t][0] == src_arrays[6 + t][1]).all() for t in range(2))
    assert _status(lambda: pd.d_cm.pull_cache(key, small, 0, src_layer_range=range(0, 2))) == PARAM_INVALID
    # only a dst range: all source tensors must fit it
    assert _status(lambda: pd.d_cm.pull_cache(key, dst, 0, dst_layer_range=range(0, 1))) == PARAM_INVALID
    # a range beyond the cache
    assert _status(lambda: pd.d_cm.pull_cache(key, dst, 0, src_layer_range=range(3, 5),
                                              dst_layer_range=range(0, 2))) == PARAM_INVALID


def test_tensor_num_per_layer_checks(pd, new_cache):
    new_cache(pd.p_cm, 2, (2, 16), keys=[CacheKey(P, 1)])
    src_blocks, _ = new_cache(pd.p_cm, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, _ = new_cache(pd.d_cm, 2, (2, 16))
    dst_blocks, _ = new_cache(pd.d_cm, 2, (4, 16), blocks=True)
    pulls = [lambda **kw: pd.d_cm.pull_cache(CacheKey(P, 1), dst, 0, **kw),
             lambda **kw: pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst_blocks, [0], [0], **kw)]
    for pull in pulls:
        with pytest.raises(ValueError):
            pull(tensor_num_per_layer=-1)
        assert _status(lambda: pull(tensor_num_per_layer=0)) == PARAM_INVALID
        with pytest.raises(TypeError):
            pull(tensor_num_per_layer=1.0)
        with pytest.raises(TypeError):
            pull(tensor_num_per_layer="x")
        pull(tensor_num_per_layer=1)  # still usable


def test_pull_size_zero_or_negative(pd, new_cache, tools):
    new_cache(pd.p_cm, 1, (2, 16), keys=[CacheKey(P, 1)])
    dst, arrays = new_cache(pd.d_cm, 1, (2, 16), fill="sentinel")
    for size in (0, -2):
        assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst, 0, size)) == PARAM_INVALID
    with pytest.raises(TypeError):
        pd.d_cm.pull_cache(CacheKey(P, 1), dst, 0, 4.0)
    assert (arrays[0] == tools.SENTINEL).all()
    pd.d_cm.pull_cache(CacheKey(P, 1), dst, 0, 16)


def test_pull_batch_index_negative(pd, new_cache):
    dst, _ = new_cache(pd.d_cm, 1, (2, 16))
    with pytest.raises(ValueError):
        pd.d_cm.pull_cache(CacheKey(P, 1), dst, -1)
    with pytest.raises(TypeError):
        pd.d_cm.pull_cache(CacheKey(P, 1), dst, "0")


def test_pull_cache_into_blocks_cache(pd, new_cache):
    new_cache(pd.p_cm, 1, (2, 16), keys=[CacheKey(P, 1)])
    blocks, _ = new_cache(pd.d_cm, 1, (2, 16), blocks=True)
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), blocks)) == PARAM_INVALID


def test_pull_cache_from_blocks_cache(pd, new_cache):
    src, _ = new_cache(pd.p_cm, 1, (2, 16), blocks=True)
    dst, _ = new_cache(pd.d_cm, 1, (2, 16))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id), dst)) == PARAM_INVALID


def test_pull_cache_key_type(pd, new_cache):
    dst, _ = new_cache(pd.d_cm, 1, (2, 16))
    for key in (BlocksCacheKey(P), None, "key", (P, 1)):
        with pytest.raises(TypeError):
            pd.d_cm.pull_cache(key, dst)
    with pytest.raises(TypeError):
        pd.d_cm.pull_cache(CacheKey(P, 1), "cache")
    with pytest.raises(TypeError):
        pd.d_cm.pull_cache(CacheKey(P, 1), None)


def test_pull_key_without_valid_id(pd, new_cache):
    dst, _ = new_cache(pd.d_cm, 1, (2, 16))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, UINT64_MAX), dst)) == PARAM_INVALID


def test_pull_key_with_both_ids(pd, new_cache):
    dst, _ = new_cache(pd.d_cm, 1, (2, 16))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1, 0, 5), dst)) == PARAM_INVALID


def test_layer_range_step_and_type(pd, new_cache):
    new_cache(pd.p_cm, 4, (2, 16), keys=[CacheKey(P, 1)])
    dst, _ = new_cache(pd.d_cm, 4, (2, 16))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst, src_layer_range=range(0, 4, 2))) \
        == PARAM_INVALID
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst, dst_layer_range=range(0, 4, 2))) \
        == PARAM_INVALID
    with pytest.raises(TypeError):
        pd.d_cm.pull_cache(CacheKey(P, 1), dst, src_layer_range=[0, 1])
    with pytest.raises(TypeError):
        pd.d_cm.pull_cache(CacheKey(P, 1), dst, dst_layer_range=(0, 1))


def test_empty_layer_range_rejected(pd, new_cache, tools):
    new_cache(pd.p_cm, 4, (2, 16), keys=[CacheKey(P, 1)])
    new_cache(pd.p_cm, 4, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, arrays = new_cache(pd.d_cm, 4, (2, 16), fill="sentinel")
    dst_blocks, block_arrays = new_cache(pd.d_cm, 4, (4, 16), blocks=True, fill="sentinel")
    empty = range(2, 1)
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst, src_layer_range=empty)) == PARAM_INVALID
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst, dst_layer_range=range(1, 1))) == PARAM_INVALID
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst_blocks, [0], [0],
                                               src_layer_range=empty)) == PARAM_INVALID
    assert all((a == tools.SENTINEL).all() for a in arrays + block_arrays)


def test_layer_range_negative_start(pd, new_cache):
    new_cache(pd.p_cm, 4, (2, 16), keys=[CacheKey(P, 1)])
    dst, _ = new_cache(pd.d_cm, 4, (2, 16))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst, src_layer_range=range(-1, 1))) == PARAM_INVALID
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst, dst_layer_range=range(-1, 1))) == PARAM_INVALID


def test_pull_from_unlinked_cluster(make_pair, new_cache):
    pd = make_pair(sync_kv_timeout=60000)  # waiting for this timeout would take minutes
    dst, _ = new_cache(pd.d_cm, 1, (2, 16))
    blocks, _ = new_cache(pd.d_cm, 1, (2, 16), blocks=True)
    started = time.monotonic()
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(99, 1), dst)) == NOT_YET_LINK
    assert _status(lambda: pd.d_cm.pull_cache(CacheKeyByIdAndIndex(99, 1), dst)) == NOT_YET_LINK
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(99), blocks, [0], [0])) == NOT_YET_LINK
    assert time.monotonic() - started < NEVER_HANGS_S  # fails fast, long before the timeout


def test_pull_before_comm_domain_ready(make_dd, new_cache):
    p = make_dd(LLMRole.PROMPT, P)
    d = make_dd(LLMRole.DECODER, D)
    devices = [{"device_id": str(i), "device_ip": "127.0.0.1", "rank_id": str(i)} for i in range(3)]
    table = json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                        "server_list": [{"server_id": "127.0.0.1", "device": devices}]})
    name, members = "not-ready-" + uuid.uuid4().hex[:8], {P: 0, D: 1, 99: 2}  # cluster 99 never comes
    p_comm, d_comm = p.link(name, members, table), d.link(name, members, table)
    assert wait_until(d._engine.links.has_links)  # P and D found each other
    assert d.query_register_mem_status(d_comm) is RegisterMemStatus.PREPARING
    src, _ = new_cache(p.cache_manager, 1, (2, 16), keys=[CacheKey(P, 1)])
    dst, _ = new_cache(d.cache_manager, 1, (2, 16))
    assert _status(lambda: d.cache_manager.pull_cache(CacheKey(P, 1), dst)) == NOT_YET_LINK
    assert _status(lambda: p.cache_manager.pull_cache(CacheKeyByIdAndIndex(D, dst.cache_id), src)) == NOT_YET_LINK
    d.unlink(d_comm)
    p.unlink(p_comm)


def test_pull_unknown_removed_or_consumed_key(pd, new_cache, tools):
    dst, arrays = new_cache(pd.d_cm, 1, (2, 32), fill="sentinel")
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 404), dst)) == NOT_EXIST
    _alloc(pd.p_cm, tools, 1, (2, 32), keys=[CacheKey(P, 1), CacheKey(P, 2)])
    pd.p_cm.remove_cache_key(CacheKey(P, 1))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst)) == NOT_EXIST
    pd.d_cm.pull_cache(CacheKey(P, 2), dst)
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 2), dst)) == NOT_EXIST
    assert _status(lambda: pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, 999), dst)) == NOT_EXIST
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 2, 1), dst)) == NOT_EXIST  # other model id


def test_pull_consumes_allocated_key(pd, new_cache, tools):
    src, views = _alloc(pd.p_cm, tools, 2, (2, 32), keys=[CacheKey(P, 7)])
    dst, arrays = new_cache(pd.d_cm, 2, (2, 32), fill="sentinel")
    pd.d_cm.pull_cache(CacheKey(P, 7), dst, 1)
    assert all((a[1] == v[0]).all() for a, v in zip(arrays, views))
    _untouched(arrays, tools, {1})
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 7), dst, 0)) == NOT_EXIST
    pd.p_cm.remove_cache_key(CacheKey(P, 7))  # no-op
    pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 0), dst, 0)  # the id reference keeps the cache
    pd.p_cm.deallocate_cache(src)


def test_registered_keys_are_not_consumed(pd, new_cache, tools):
    _, src_arrays = new_cache(pd.p_cm, 2, (2, 32), keys=[CacheKey(P, 7)])
    dst, arrays = new_cache(pd.d_cm, 2, (2, 32), fill="sentinel")
    for n, slot in enumerate((0, 1, 0)):
        for i, src in enumerate(src_arrays):  # new content in the owner's memory before each pull
            src[:] = (np.arange(src.size, dtype=np.int64).reshape(src.shape) * (n + 3) + i * 7 + n) % 229
        for array in arrays:
            array[:] = tools.SENTINEL
        pd.d_cm.pull_cache(CacheKey(P, 7), dst, slot)
        for i, array in enumerate(arrays):
            want = np.full((2, 32), tools.SENTINEL, np.uint8)
            want[slot] = (np.arange(32) * (n + 3) + i * 7 + n) % 229  # slot 0 of the source, computed afresh
            assert np.array_equal(array, want), (n, i)


def test_prefix_key_pulled_repeatedly(pd, new_cache, tools):
    prefix = CacheKey(P, UINT64_MAX, 0, 5)
    src, views = _alloc(pd.p_cm, tools, 2, (2, 32), keys=[CacheKey(P, 1), prefix])
    dst, arrays = new_cache(pd.d_cm, 2, (2, 32), fill="sentinel")
    for slot in (0, 1, 0):
        pd.d_cm.pull_cache(prefix, dst, slot)
    assert all((a[0] == v[1]).all() and (a[1] == v[1]).all() for a, v in zip(arrays, views))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, UINT64_MAX, 0, 6), dst)) == NOT_EXIST
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 5), dst)) == NOT_EXIST  # not a req id


def test_pull_by_id_beyond_remote_batch(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 1, (2, 16))
    dst, dst_arrays = new_cache(pd.d_cm, 1, (4, 16), fill="sentinel")
    assert _status(lambda: pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 2), dst)) == NOT_EXIST
    assert (dst_arrays[0] == tools.SENTINEL).all()
    pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 1), dst, 3)
    assert (dst_arrays[0][3] == src_arrays[0][1]).all()
    _untouched(dst_arrays, tools, {3})


def test_pull_from_own_cluster(pd, new_cache):
    own, _ = new_cache(pd.d_cm, 1, (2, 16), keys=[CacheKey(D, 1)])
    dst, _ = new_cache(pd.d_cm, 1, (2, 16))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(D, 1), dst)) == PARAM_INVALID
    assert _status(lambda: pd.d_cm.pull_cache(CacheKeyByIdAndIndex(D, own.cache_id), dst)) == PARAM_INVALID


def test_pull_batch_index_beyond_local(pd, new_cache, tools):
    new_cache(pd.p_cm, 1, (2, 16), keys=[CacheKey(P, 1)])
    dst, arrays = new_cache(pd.d_cm, 1, (2, 16), fill="sentinel")
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst, 2)) == PARAM_INVALID
    assert (arrays[0] == tools.SENTINEL).all()
    pd.d_cm.pull_cache(CacheKey(P, 1), dst, 1)


def test_pull_size_beyond_stride(pd, new_cache, tools):
    _, src_arrays = new_cache(pd.p_cm, 1, (2, 16), keys=[CacheKey(P, 1)])  # remote stride 16
    wide, wide_arrays = new_cache(pd.d_cm, 1, (2, 32), fill="sentinel")  # local stride 32
    narrow, narrow_arrays = new_cache(pd.d_cm, 1, (2, 8), fill="sentinel")  # local stride 8
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), wide, 0, 17)) == PARAM_INVALID  # > remote
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), narrow, 0, 9)) == PARAM_INVALID  # > local
    assert all((a == tools.SENTINEL).all() for a in wide_arrays + narrow_arrays)
    pd.d_cm.pull_cache(CacheKey(P, 1), wide, 0, 16)
    pd.d_cm.pull_cache(CacheKey(P, 1), narrow, 1, 8)
    assert (wide_arrays[0][0, :16] == src_arrays[0][0]).all() and (wide_arrays[0][0, 16:] == tools.SENTINEL).all()
    assert (narrow_arrays[0][1] == src_arrays[0][0, :8]).all() and (narrow_arrays[0][0] == tools.SENTINEL).all()
    _untouched(wide_arrays, tools, {0})


def test_pull_default_size_is_local_stride(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 2, (3, 32), keys=[CacheKey(P, 1), CacheKey(P, 2)])
    dst, dst_arrays = new_cache(pd.d_cm, 2, (4, 16), fill="sentinel")  # local stride 16 < remote 32
    pd.d_cm.pull_cache(CacheKey(P, 2), dst, 2)
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[2] == s[1, :16]).all()
    _untouched(dst_arrays, tools, {2})
    wide, wide_arrays = new_cache(pd.d_cm, 2, (2, 64), fill="sentinel")  # local stride 64 > remote 32
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), wide, 1)) == PARAM_INVALID
    assert all((a == tools.SENTINEL).all() for a in wide_arrays)


def test_pull_typed_data(pd, new_cache):
    src, src_arrays = new_cache(pd.p_cm, 4, (2, 3, 5), dtype=DataType.DT_FLOAT16, keys=[CacheKey(P, 1)])
    for i, a in enumerate(src_arrays):
        a[:] = np.arange(30, dtype=np.float16).reshape(2, 3, 5) + i
    dst, dst_arrays = new_cache(pd.d_cm, 4, (3, 3, 5), dtype=DataType.DT_FLOAT16, fill=0)
    pd.d_cm.pull_cache(CacheKey(P, 1), dst, 2)
    for s, d in zip(src_arrays, dst_arrays):
        assert np.array_equal(d[2], s[0]) and not d[:2].any()


def test_pull_tensor_count_mismatch(pd, new_cache, tools):
    new_cache(pd.p_cm, 2, (2, 16), keys=[CacheKey(P, 1)])
    dst, arrays = new_cache(pd.d_cm, 4, (2, 16), fill="sentinel")
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 1), dst)) == PARAM_INVALID
    assert all((a == tools.SENTINEL).all() for a in arrays)


def test_remote_accessible_pull_cache_key_types(pd_ra, new_cache, tools):
    src, src_arrays = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.DEVICE, keys=[CacheKey(P, 1)])
    dst, dst_arrays = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE, fill="sentinel")
    with pytest.raises(TypeError):
        pd_ra.d_cm.pull_cache(CacheKey(P, 1), dst)
    pd_ra.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 1), dst, 0)
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[0] == s[1]).all() and (d[1] == tools.SENTINEL).all()


def test_pull_timeout(make_pair, new_cache, tools):
    pair = make_pair(sync_kv_timeout=100)
    new_cache(pair.p_cm, 1, (2, 16), keys=[CacheKey(P, 1)])
    dst, arrays = new_cache(pair.d_cm, 1, (2, 16), fill="sentinel")
    with Delayed(pair.p._engine.registry, "lookup_key", None) as slow:  # P answers only when released
        started = time.monotonic()
        assert _status(lambda: pair.d_cm.pull_cache(CacheKey(P, 1), dst)) == LLMStatusCode.LLM_TIMEOUT
        elapsed = time.monotonic() - started
        assert slow.entered.wait(NEVER_HANGS_S)  # the request reached P, which is still holding its answer
    assert slow.calls == 1
    assert 0.08 < elapsed < NEVER_HANGS_S  # not before the 100 ms timeout, and it never hangs
    assert (arrays[0] == tools.SENTINEL).all()


def test_pull_blocks_timeout(make_pair, new_cache, tools):
    pair = make_pair(sync_kv_timeout=100)
    new_cache(pair.p_cm, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, arrays = new_cache(pair.d_cm, 1, (4, 16), blocks=True, fill="sentinel")
    with Delayed(pair.p._engine.registry, "lookup_blocks", None) as slow:  # P answers only when released
        started = time.monotonic()
        assert _status(lambda: pair.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [1])) \
            == LLMStatusCode.LLM_TIMEOUT
        assert time.monotonic() - started < NEVER_HANGS_S
        assert slow.entered.wait(NEVER_HANGS_S)  # the request reached P, which is still holding its answer
    assert (arrays[0] == tools.SENTINEL).all()


# -- pull_blocks -----------------------------------------------------------------------------------
def test_pull_blocks_one_block(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pd.d_cm, 2, (4, 16), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [0])
    assert all((d[0] == s[0]).all() for s, d in zip(src_arrays, dst_arrays))
    _untouched(dst_arrays, tools, {0})


def test_pull_continuous_slot_into_blocks(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 2, (2, 64), keys=[CacheKey(P, 0, 0)])
    dst, dst_arrays = new_cache(pd.d_cm, 2, (6, 16), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(CacheKey(P, 0, 0), dst, [], [0])
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[0] == s[0, :16]).all()
    _untouched(dst_arrays, tools, {0})
    pd.d_cm.pull_blocks(CacheKeyByIdAndIndex(P, src.cache_id, 1), dst, (), [5, 2, 3, 1])
    for s, d in zip(src_arrays, dst_arrays):
        for chunk, block in enumerate([5, 2, 3, 1]):
            assert (d[block] == s[1, chunk * 16:(chunk + 1) * 16]).all()
    _untouched(dst_arrays, tools, {0, 1, 2, 3, 5})
    # more blocks than the slot holds
    assert _status(lambda: pd.d_cm.pull_blocks(CacheKeyByIdAndIndex(P, src.cache_id, 0), dst, [],
                                               [0, 1, 2, 3, 4])) == PARAM_INVALID


def test_pull_slot_into_blocks_consumes_key(pd, new_cache, tools):
    _alloc(pd.p_cm, tools, 1, (2, 64), keys=[CacheKey(P, 3)])
    dst, _ = new_cache(pd.d_cm, 1, (4, 16), blocks=True)
    pd.d_cm.pull_blocks(CacheKey(P, 3), dst, [], [0, 1, 2, 3])
    assert _status(lambda: pd.d_cm.pull_blocks(CacheKey(P, 3), dst, [], [0])) == NOT_EXIST


def test_pull_blocks_empty_src_blocks(pd, new_cache):
    dst, _ = new_cache(pd.d_cm, 1, (4, 16), blocks=True)
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(P), dst, [], [2, 3])) == PARAM_INVALID


def test_pull_blocks_empty_dst_blocks(pd, new_cache):
    dst, _ = new_cache(pd.d_cm, 1, (4, 16), blocks=True)
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(P), dst, [0], [])) == PARAM_INVALID
    assert _status(lambda: pd.d_cm.pull_blocks(CacheKey(P, 1), dst, [], [])) == PARAM_INVALID


def test_pull_blocks_src_blocks_for_non_blocks_key(pd, new_cache):
    dst, _ = new_cache(pd.d_cm, 1, (4, 16), blocks=True)
    assert _status(lambda: pd.d_cm.pull_blocks(CacheKey(P, 1), dst, [1], [2, 3])) == PARAM_INVALID
    assert _status(lambda: pd.d_cm.pull_blocks(CacheKeyByIdAndIndex(P, 1), dst, [1], [2])) == PARAM_INVALID


def test_pull_blocks_argument_types(pd, new_cache):
    dst, _ = new_cache(pd.d_cm, 1, (4, 16), blocks=True)
    with pytest.raises(TypeError):
        pd.d_cm.pull_blocks(None, dst, [0], [0])
    with pytest.raises(TypeError):
        pd.d_cm.pull_blocks(BlocksCacheKey(P), dst, None, [0])
    with pytest.raises(TypeError):
        pd.d_cm.pull_blocks(BlocksCacheKey(P), dst, [0], ["0"])
    with pytest.raises(TypeError):
        pd.d_cm.pull_blocks(BlocksCacheKey(P), "dst", [0], [0])


def test_pull_blocks_into_continuous_cache(pd, new_cache):
    new_cache(pd.p_cm, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, _ = new_cache(pd.d_cm, 1, (4, 16))
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [0])) == PARAM_INVALID


def test_pull_blocks_length_mismatch(pd, new_cache, tools):
    new_cache(pd.p_cm, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, arrays = new_cache(pd.d_cm, 1, (4, 16), blocks=True, fill="sentinel")
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0, 1], [2])) == PARAM_INVALID
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [2, 3])) == PARAM_INVALID
    assert (arrays[0] == tools.SENTINEL).all()


def test_pull_blocks_index_out_of_range(pd, new_cache, tools):
    new_cache(pd.p_cm, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, arrays = new_cache(pd.d_cm, 1, (6, 16), blocks=True, fill="sentinel")
    key = BlocksCacheKey(P, 0)
    assert _status(lambda: pd.d_cm.pull_blocks(key, dst, [0, 1], [2, 6])) == PARAM_INVALID  # dst >= local 6
    assert _status(lambda: pd.d_cm.pull_blocks(key, dst, [4], [0])) == PARAM_INVALID  # src >= remote 4
    assert _status(lambda: pd.d_cm.pull_blocks(key, dst, [-1], [0])) == PARAM_INVALID
    assert (arrays[0] == tools.SENTINEL).all()
    pd.d_cm.pull_blocks(key, dst, [3], [5])  # different num_blocks on each side is fine


def test_pull_blocks_block_size_mismatch(pd, new_cache):
    new_cache(pd.p_cm, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, _ = new_cache(pd.d_cm, 1, (4, 32), blocks=True)
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [0])) == PARAM_INVALID


def test_pull_blocks_unknown_blocks_key(pd, new_cache):
    dst, _ = new_cache(pd.d_cm, 1, (4, 16), blocks=True)
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(P, 42), dst, [0], [0])) == NOT_EXIST


def test_pull_blocks_0_1_into_2_3(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 4, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P))
    dst, dst_arrays = new_cache(pd.d_cm, 4, (5, 16), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(BlocksCacheKey(P), dst, [0, 1], [2, 3])
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[2] == s[0]).all() and (d[3] == s[1]).all()
    _untouched(dst_arrays, tools, {2, 3})


def test_pull_blocks_layer_ranges(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 6, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 1))
    dst, dst_arrays = new_cache(pd.d_cm, 6, (4, 16), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 1), dst, [3, 0], [1, 2], src_layer_range=range(2, 3),
                        dst_layer_range=range(0, 1))
    for t in range(6):
        if t < 2:
            assert (dst_arrays[t][1] == src_arrays[t + 4][3]).all() and (dst_arrays[t][2] == src_arrays[t + 4][0]).all()
            assert (dst_arrays[t][[0, 3]] == tools.SENTINEL).all()
        else:
            assert (dst_arrays[t] == tools.SENTINEL).all()


def test_pull_blocks_from_allocated_blocks(pd, new_cache, tools):
    _, views = _alloc(pd.p_cm, tools, 2, (8, 32), blocks=True, blocks_key=BlocksCacheKey(P, 5))
    dst, arrays = new_cache(pd.d_cm, 2, (3, 32), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 5), dst, [7, 6], [0, 2])
    for v, a in zip(views, arrays):
        assert (a[0] == v[7]).all() and (a[2] == v[6]).all() and (a[1] == tools.SENTINEL).all()
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 5), dst, [7], [1])  # blocks keys are never consumed


# -- push ------------------------------------------------------------------------------------------
def test_push_needs_remote_accessible_mode(pd, new_cache):
    src, _ = new_cache(pd.d_cm, 2, (2, 16))
    blocks, _ = new_cache(pd.d_cm, 2, (4, 16), blocks=True)
    assert _status(lambda: pd.d_cm.push_cache(CacheKeyByIdAndIndex(P, 1), src)) == PARAM_INVALID
    assert _status(lambda: pd.d_cm.push_blocks(BlocksCacheKey(P), blocks, [0], [0])) == PARAM_INVALID


def test_push_cache_default_ranges(pd_ra, new_cache, tools):
    dst, dst_arrays = new_cache(pd_ra.p_cm, 4, (3, 16), placement=Placement.DEVICE, fill="sentinel")
    src, src_arrays = new_cache(pd_ra.d_cm, 4, (2, 16), placement=Placement.DEVICE)
    pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, dst.cache_id, 2), src)
    pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, dst.cache_id, 0), src, 1)
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[2] == s[0]).all() and (d[0] == s[1]).all()
    _untouched(dst_arrays, tools, {0, 2})


def test_push_cache_layer_ranges(pd_ra, new_cache, tools):
    dst, dst_arrays = new_cache(pd_ra.p_cm, 6, (2, 16), placement=Placement.DEVICE, fill="sentinel")
    src, src_arrays = new_cache(pd_ra.d_cm, 6, (2, 16), placement=Placement.DEVICE)
    pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, dst.cache_id, 1), src, 0, range(0, 1), range(2, 3))
    for t in range(6):
        if t >= 4:
            assert (dst_arrays[t][1] == src_arrays[t - 4][0]).all() and (dst_arrays[t][0] == tools.SENTINEL).all()
        else:
            assert (dst_arrays[t] == tools.SENTINEL).all()


def test_push_cache_tensor_num_per_layer(pd_ra, new_cache, tools):
    dst, dst_arrays = new_cache(pd_ra.p_cm, 10, (2, 16), placement=Placement.DEVICE, fill="sentinel")
    src, _ = new_cache(pd_ra.d_cm, 10, (2, 16), placement=Placement.DEVICE)
    key = CacheKeyByIdAndIndex(P, dst.cache_id, 0)
    with pytest.raises(ValueError):
        pd_ra.d_cm.push_cache(key, src, tensor_num_per_layer=-1)
    assert _status(lambda: pd_ra.d_cm.push_cache(key, src, tensor_num_per_layer=0)) == PARAM_INVALID
    assert _status(lambda: pd_ra.d_cm.push_cache(key, src, tensor_num_per_layer=3)) == PARAM_INVALID
    for bad in (2.0, "x"):
        with pytest.raises(TypeError):
            pd_ra.d_cm.push_cache(key, src, tensor_num_per_layer=bad)
    assert all((a == tools.SENTINEL).all() for a in dst_arrays)
    pd_ra.d_cm.push_cache(key, src, tensor_num_per_layer=5)


def test_push_cache_size_must_be_minus_one(pd_ra, new_cache):
    dst, _ = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.DEVICE)
    src, _ = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE)
    assert _status(lambda: pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, dst.cache_id), src, size=16)) \
        == PARAM_INVALID
    pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, dst.cache_id), src, size=-1)


def test_push_cache_key_type(pd_ra, new_cache):
    src, _ = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE)
    for key in (BlocksCacheKey(P), None, CacheKey(P, 1)):
        with pytest.raises(TypeError):
            pd_ra.d_cm.push_cache(key, src)
    with pytest.raises(TypeError):
        pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, 1), None)
    with pytest.raises(ValueError):
        pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, 1), src, -1)


def test_push_cache_blocks_source(pd_ra, new_cache):
    dst, _ = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.DEVICE)
    src, _ = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE, blocks=True)
    assert _status(lambda: pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, dst.cache_id), src)) == PARAM_INVALID


def test_push_cache_range_lengths(pd_ra, new_cache, tools):
    dst, dst_arrays = new_cache(pd_ra.p_cm, 6, (2, 16), placement=Placement.DEVICE, fill="sentinel")
    src, _ = new_cache(pd_ra.d_cm, 6, (2, 16), placement=Placement.DEVICE)
    key = CacheKeyByIdAndIndex(P, dst.cache_id)
    assert _status(lambda: pd_ra.d_cm.push_cache(key, src, src_layer_range=range(1, 3),
                                                 dst_layer_range=range(0, 1))) == PARAM_INVALID
    for bad in (range(0, 2, 2), range(2, 1), range(-1, 1)):
        assert _status(lambda: pd_ra.d_cm.push_cache(key, src, src_layer_range=bad)) == PARAM_INVALID
    with pytest.raises(TypeError):
        pd_ra.d_cm.push_cache(key, src, src_layer_range=[0, 1])
    assert _status(lambda: pd_ra.d_cm.push_cache(key, src, src_layer_range=range(2, 4),
                                                 dst_layer_range=range(0, 2))) == PARAM_INVALID  # beyond 3 layers
    assert all((a == tools.SENTINEL).all() for a in dst_arrays)


def test_push_blocks(pd_ra, new_cache, tools):
    dst, dst_arrays = new_cache(pd_ra.p_cm, 4, (6, 16), placement=Placement.DEVICE, blocks=True,
                                blocks_key=BlocksCacheKey(P, 0), fill="sentinel")
    src, src_arrays = new_cache(pd_ra.d_cm, 4, (4, 16), placement=Placement.DEVICE, blocks=True)
    pd_ra.d_cm.push_blocks(BlocksCacheKey(P, 0), src, [0], [0])
    assert all((d[0] == s[0]).all() for s, d in zip(src_arrays, dst_arrays))
    _untouched(dst_arrays, tools, {0})
    pd_ra.d_cm.push_blocks(BlocksCacheKey(P, 0), src, [3, 1], [5, 2], src_layer_range=range(0, 1),
                           dst_layer_range=range(0, 1))
    for t in range(4):
        if t < 2:
            assert (dst_arrays[t][5] == src_arrays[t][3]).all() and (dst_arrays[t][2] == src_arrays[t][1]).all()
        else:
            assert (dst_arrays[t][[1, 2, 3, 4, 5]] == tools.SENTINEL).all()


def test_push_blocks_bad_arguments(pd_ra, new_cache, tools):
    dst, dst_arrays = new_cache(pd_ra.p_cm, 2, (4, 16), placement=Placement.DEVICE, blocks=True,
                                blocks_key=BlocksCacheKey(P, 0), fill="sentinel")
    cont, _ = new_cache(pd_ra.d_cm, 2, (4, 16), placement=Placement.DEVICE)
    src, _ = new_cache(pd_ra.d_cm, 2, (4, 16), placement=Placement.DEVICE, blocks=True)
    assert _status(lambda: pd_ra.d_cm.push_blocks(BlocksCacheKey(P, 0), cont, [0], [0])) == PARAM_INVALID
    assert _status(lambda: pd_ra.d_cm.push_blocks(BlocksCacheKey(P, 0), src, [0], [])) == PARAM_INVALID
    with pytest.raises(TypeError):
        pd_ra.d_cm.push_blocks(CacheKeyByIdAndIndex(P, dst.cache_id), src, [0], [0])
    assert _status(lambda: pd_ra.d_cm.push_blocks(BlocksCacheKey(P, 0), src, [0, 1], [0])) == PARAM_INVALID
    assert _status(lambda: pd_ra.d_cm.push_blocks(BlocksCacheKey(P, 0), src, [0], [4])) == PARAM_INVALID
    assert _status(lambda: pd_ra.d_cm.push_blocks(BlocksCacheKey(P, 0), src, [4], [0])) == PARAM_INVALID
    assert _status(lambda: pd_ra.d_cm.push_blocks(BlocksCacheKey(P, 9), src, [0], [0])) == NOT_EXIST
    assert all((a == tools.SENTINEL).all() for a in dst_arrays)


def test_push_blocks_tensor_num_per_layer(pd_ra, new_cache):
    new_cache(pd_ra.p_cm, 10, (4, 16), placement=Placement.DEVICE, blocks=True, blocks_key=BlocksCacheKey(P, 0))
    src, _ = new_cache(pd_ra.d_cm, 10, (4, 16), placement=Placement.DEVICE, blocks=True)
    push = lambda tpl: pd_ra.d_cm.push_blocks(BlocksCacheKey(P, 0), src, [0], [0], tensor_num_per_layer=tpl)  # noqa
    assert _status(lambda: push(0)) == PARAM_INVALID
    assert _status(lambda: push(3)) == PARAM_INVALID
    with pytest.raises(ValueError):
        push(-1)
    with pytest.raises(TypeError):
        push(2.0)
    push(2)


def test_push_cache_negative_positional(pd_ra, new_cache):
    dst, _ = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.DEVICE)
    src, _ = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE)
    key = CacheKeyByIdAndIndex(P, dst.cache_id)
    with pytest.raises(ValueError):
        pd_ra.d_cm.push_cache(key, src, -1, -1)
    with pytest.raises(ValueError):
        pd_ra.d_cm.push_cache(key, src, 0, None, None, -1, -1)
    pd_ra.d_cm.push_cache(key, src, 0, None, None, -1, 2)


def test_push_to_unknown_cache_id(pd_ra, new_cache):
    src, _ = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE)
    assert _status(lambda: pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, 4242), src)) == NOT_EXIST
    dst, _ = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.DEVICE)
    assert _status(lambda: pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, dst.cache_id, 2), src)) == NOT_EXIST
    assert _status(lambda: pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(99, dst.cache_id), src)) == NOT_YET_LINK


def test_push_to_cache_unregistered_after_snapshot(pd_ra, new_cache):
    dst, _ = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.DEVICE)
    src, _ = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE)
    pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, dst.cache_id), src)  # D now holds P's table
    pd_ra.p_cm.unregister_cache(dst.cache_id)
    assert _status(lambda: pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, dst.cache_id), src)) == NOT_EXIST


def test_new_registration_after_snapshot_is_found(pd_ra, new_cache, tools):
    first, _ = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.DEVICE)
    src, src_arrays = new_cache(pd_ra.d_cm, 2, (2, 16), placement=Placement.DEVICE)
    pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, first.cache_id), src)  # snapshot taken
    later, later_arrays = new_cache(pd_ra.p_cm, 2, (2, 16), placement=Placement.DEVICE, fill="sentinel")
    pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, later.cache_id, 1), src)  # a miss refreshes the table
    assert all((d[1] == s[0]).all() and (d[0] == tools.SENTINEL).all() for s, d in zip(src_arrays, later_arrays))


# -- symmetric links, key consumption, finalize --------------------------------------------------
def test_both_sides_pull_after_one_link(pd, new_cache, tools):
    p_src, p_arrays = new_cache(pd.p_cm, 2, (2, 16), keys=[CacheKey(P, 1)])
    d_src, d_arrays = new_cache(pd.d_cm, 2, (2, 16), keys=[CacheKey(D, 1)])
    p_dst, p_dst_arrays = new_cache(pd.p_cm, 2, (2, 16), fill="sentinel")
    d_dst, d_dst_arrays = new_cache(pd.d_cm, 2, (2, 16), fill="sentinel")
    pd.d_cm.pull_cache(CacheKey(P, 1), d_dst, 0)
    pd.p_cm.pull_cache(CacheKey(D, 1), p_dst, 1)  # the server pulls from its client
    for s, d in zip(p_arrays, d_dst_arrays):
        assert (d[0] == s[0]).all() and (d[1] == tools.SENTINEL).all()
    for s, d in zip(d_arrays, p_dst_arrays):
        assert (d[1] == s[0]).all() and (d[0] == tools.SENTINEL).all()


def test_server_pulls_right_after_link_returns(make_dd, new_cache, tools):
    p = make_dd(LLMRole.PROMPT, P, listen=True)
    d = make_dd(LLMRole.DECODER, D)
    d_src, d_arrays = new_cache(d.cache_manager, 1, (2, 16), keys=[CacheKey(D, 1)])
    p_dst, p_arrays = new_cache(p.cache_manager, 1, (2, 16), fill="sentinel")
    with Delayed(p._engine.links, "add", 0.2):
        assert d.link_clusters([tools.cluster_info(P, make_dd.port(p))], 3000)[0] == LLMStatusCode.LLM_SUCCESS
        p.cache_manager.pull_cache(CacheKey(D, 1), p_dst)
    assert (p_arrays[0][0] == d_arrays[0][0]).all()


def test_server_pushes_to_client(pd_ra, new_cache, tools):
    d_dst, d_arrays = new_cache(pd_ra.d_cm, 2, (4, 16), placement=Placement.DEVICE, blocks=True,
                                blocks_key=BlocksCacheKey(D, 3), fill="sentinel")
    p_src, p_arrays = new_cache(pd_ra.p_cm, 2, (4, 16), placement=Placement.DEVICE, blocks=True)
    pd_ra.p_cm.push_blocks(BlocksCacheKey(D, 3), p_src, [1], [2])
    assert all((d[2] == s[1]).all() for s, d in zip(p_arrays, d_arrays))
    _untouched(d_arrays, tools, {2})


def test_pull_by_id_consumes_bound_key(pd, new_cache, tools):
    src, views = _alloc(pd.p_cm, tools, 2, (2, 32), keys=[CacheKey(P, 1), CacheKey(P, 2)])
    dst, arrays = new_cache(pd.d_cm, 2, (2, 32), fill="sentinel")
    pd.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 1), dst, 0)
    assert all((a[0] == v[1]).all() for a, v in zip(arrays, views))
    assert _status(lambda: pd.d_cm.pull_cache(CacheKey(P, 2), dst)) == NOT_EXIST
    pd.d_cm.pull_cache(CacheKey(P, 1), dst, 1)  # the other slot's key is untouched


def test_partial_layer_pull_keeps_key(pd, new_cache, tools):
    src, views = _alloc(pd.p_cm, tools, 4, (2, 32), keys=[CacheKey(P, 1)])
    dst, arrays = new_cache(pd.d_cm, 4, (2, 32), fill="sentinel")
    key = CacheKey(P, 1)
    pd.d_cm.pull_cache(key, dst, 0, src_layer_range=range(0, 1), dst_layer_range=range(0, 1))
    pd.d_cm.pull_cache(key, dst, 0, src_layer_range=range(0, 1), dst_layer_range=range(0, 1))  # still bound
    assert (arrays[0][0] == views[0][0]).all() and (arrays[2] == tools.SENTINEL).all()
    pd.d_cm.pull_cache(key, dst, 1, src_layer_range=range(1, 2), dst_layer_range=range(1, 2))
    assert (arrays[3][1] == views[3][0]).all() and (arrays[3][0] == tools.SENTINEL).all()
    assert _status(lambda: pd.d_cm.pull_cache(key, dst, 0)) == NOT_EXIST  # every tensor pulled: consumed


def test_remote_accessible_mode_never_consumes(pd_ra, new_cache, tools):
    src, views = _alloc(pd_ra.p_cm, tools, 2, (2, 64), keys=[CacheKey(P, 1)])  # pool caches are remote accessible
    dst, arrays = new_cache(pd_ra.d_cm, 2, (2, 64), placement=Placement.DEVICE, fill="sentinel")
    blocks, block_arrays = new_cache(pd_ra.d_cm, 2, (4, 16), placement=Placement.DEVICE, blocks=True,
                                     fill="sentinel")
    for _ in range(2):
        pd_ra.d_cm.pull_cache(CacheKeyByIdAndIndex(P, src.cache_id, 0), dst, 1)
        pd_ra.d_cm.pull_blocks(CacheKey(P, 1), blocks, [], [3, 0])
    pd_ra.d_cm.push_cache(CacheKeyByIdAndIndex(P, src.cache_id, 1), dst)
    pd_ra.d_cm.pull_blocks(CacheKey(P, 1), blocks, [], [1])
    for v, a, b in zip(views, arrays, block_arrays):
        assert (a[1] == v[0]).all() and (a[0] == tools.SENTINEL).all()
        assert (b[3] == v[0, :16]).all() and (b[0] == v[0, 16:32]).all() and (b[1] == v[0, :16]).all()
        assert (v[1] == tools.SENTINEL).all()  # the push wrote D's untouched slot 0


def test_remove_key_of_registered_cache_keeps_it(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 1, (2, 16), keys=[CacheKey(P, 1)])
    pd.p_cm.remove_cache_key(CacheKey(P, 1))
    dst, dst_arrays = new_cache(pd.d_cm, 1, (2, 16), fill="sentinel")
    pd.d_cm.pull_cache(CacheKey(P, 1), dst)
    pd.d_cm.pull_cache(CacheKey(P, 1), dst)  # and it stays bound
    assert (dst_arrays[0][0] == src_arrays[0][0]).all() and (dst_arrays[0][1] == tools.SENTINEL).all()


def test_finalize_drops_links(make_pair, new_cache):
    pair = make_pair()
    src, _ = new_cache(pair.p_cm, 1, (2, 16), keys=[CacheKey(P, 1)])
    dst, _ = new_cache(pair.d_cm, 1, (2, 16))
    pair.d_cm.pull_cache(CacheKey(P, 1), dst)
    pair.p.finalize()
    started = time.monotonic()
    failed = {LLMStatusCode.LLM_NOT_YET_LINK, LLMStatusCode.LLM_LINK_FAILED, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
              LLMStatusCode.LLM_TIMEOUT, LLMStatusCode.LLM_FAILED}
    assert _status(lambda: pair.d_cm.pull_cache(CacheKey(P, 1), dst)) in failed
    assert time.monotonic() - started < NEVER_HANGS_S  # at most the 1 s sync_kv_timeout: no hang
    assert wait_until(lambda: _status(lambda: pair.d_cm.pull_cache(CacheKey(P, 1), dst)) == NOT_YET_LINK)
    pair.d.finalize()
    pair.d.finalize()  # twice is fine
