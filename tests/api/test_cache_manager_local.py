"""Allocate, register, deallocate, keys, copy, swap, remap.

Everything here runs inside one instance (no link). Data tests fill destinations with a sentinel first and check
both the bytes written and the bytes that must stay untouched.
"""
from __future__ import annotations

import numpy as np
import pytest

from llm_datadist import (BlocksCacheKey, Cache, CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType, LLMException,
                          LLMRole, LLMStatusCode, MemInfo, Memtype, Placement, RegisterMemStatus)

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
UINT64_MAX = 2**64 - 1


@pytest.fixture
def cm(make_dd, tools):
    """A fresh instance with a 1 MiB device pool and a 1 MiB host pool."""
    return make_dd(LLMRole.PROMPT, 1, mem_pool_cfg=tools.POOL_CFG, host_mem_pool_cfg=tools.POOL_CFG).cache_manager


def _fill_allocated(cache: Cache, tools, value=None) -> list:
    """Views of an allocated cache's tensors, filled with a pattern (or ``value``)."""
    nbytes = cache.cache_desc.size
    views = []
    for i, addr in enumerate(cache.tensor_addrs):
        view = tools.mem_view(addr, nbytes)
        view[:] = (np.arange(nbytes) * 7 + i * 31 + 1) % 251 if value is None else value
        views.append(view.reshape(cache.cache_desc.shape[0], -1))
    return views


def _status(call) -> LLMStatusCode:
    with pytest.raises(LLMException) as exc:
        call()
    return exc.value.status_code


# -- allocate / deallocate / keys -----------------------------------------------------------------
def test_allocate_host_without_host_pool(make_dd, tools):
    cm = make_dd(LLMRole.PROMPT, 1, mem_pool_cfg=tools.POOL_CFG).cache_manager
    host = CacheDesc(1, [2, 8], DataType.DT_UINT8, Placement.HOST)
    assert _status(lambda: cm.allocate_cache(host)) == PARAM_INVALID
    assert _status(lambda: cm.allocate_blocks_cache(host)) == PARAM_INVALID
    cache = cm.allocate_cache(CacheDesc(1, [2, 8], DataType.DT_UINT8, Placement.DEVICE))
    assert len(cache.tensor_addrs) == 1


def test_allocate_without_any_pool(make_dd):
    cm = make_dd(LLMRole.PROMPT, 1).cache_manager
    desc = CacheDesc(1, [2, 8], DataType.DT_UINT8, Placement.DEVICE)
    assert _status(lambda: cm.allocate_cache(desc)) == PARAM_INVALID


def test_allocate_zero_tensors(cm):
    assert _status(lambda: cm.allocate_cache(CacheDesc(0, [2, 8], DataType.DT_UINT8))) == PARAM_INVALID
    assert _status(lambda: cm.allocate_blocks_cache(CacheDesc(0, [2, 8], DataType.DT_UINT8))) == PARAM_INVALID


def test_allocate_bad_shape(cm):
    for shape in ([2, 0], [2, -4], [1] * 32):
        assert _status(lambda: cm.allocate_cache(CacheDesc(1, shape, DataType.DT_UINT8))) == PARAM_INVALID


def test_allocate_keys_must_be_list_of_cache_key(cm):
    desc = CacheDesc(1, [2, 8], DataType.DT_UINT8)
    with pytest.raises(TypeError):
        cm.allocate_cache(desc, CacheKey(1, 1))
    with pytest.raises(TypeError):
        cm.allocate_cache(desc, [1])
    with pytest.raises(TypeError):
        cm.allocate_cache(desc, [BlocksCacheKey(1)])
    with pytest.raises(TypeError):
        cm.allocate_cache(desc, None)
    with pytest.raises(TypeError):
        cm.allocate_cache("desc")
    cache = cm.allocate_cache(desc, (CacheKey(1, 1),))  # a tuple is fine; nothing was allocated before
    assert cache.cache_id == 1


def test_first_cache_ids(cm, new_cache):
    first = cm.allocate_cache(CacheDesc(1, [2, 8], DataType.DT_UINT8))
    second, _ = new_cache(cm, 1, (2, 8))
    third = cm.allocate_blocks_cache(CacheDesc(1, [2, 8], DataType.DT_UINT8))
    assert (first.cache_id, second.cache_id, third.cache_id) == (1, 2, 3)


def test_allocate_cache_result(cm, tools):
    desc = CacheDesc(3, [4, 2, 8], DataType.DT_FLOAT16)
    cache = cm.allocate_cache(desc)
    assert cache.is_blocks_cache is False
    assert len(cache.tensor_addrs) == 3 and len(set(cache.tensor_addrs)) == 3
    assert cache.cache_desc is desc
    views = _fill_allocated(cache, tools)  # the memory is real and writable
    assert [v.nbytes for v in views] == [desc.size] * 3 == [128] * 3


def test_out_of_memory_then_free(cm, tools):
    half = CacheDesc(2, [tools.POOL_BYTES // 2048, 1024], DataType.DT_UINT8)  # 2 x 512 KiB: the whole pool
    too_big = CacheDesc(3, [tools.POOL_BYTES // 2048, 1024], DataType.DT_UINT8)
    assert _status(lambda: cm.allocate_cache(too_big)) == LLMStatusCode.LLM_OUT_OF_MEMORY
    full = cm.allocate_cache(half)  # the failed request released what it took
    small = CacheDesc(1, [1, 1024], DataType.DT_UINT8)
    assert _status(lambda: cm.allocate_cache(small)) == LLMStatusCode.LLM_OUT_OF_MEMORY
    assert _status(lambda: cm.allocate_blocks_cache(small)) == LLMStatusCode.LLM_OUT_OF_MEMORY
    cm.deallocate_cache(full)
    again = cm.allocate_cache(half)
    assert len(again.tensor_addrs) == 2


def test_key_bound_to_another_allocation(cm):
    desc = CacheDesc(1, [2, 8], DataType.DT_UINT8)
    cm.allocate_cache(desc, [CacheKey(1, 10)])
    assert _status(lambda: cm.allocate_cache(desc, [CacheKey(1, 11), CacheKey(1, 10)])) == PARAM_INVALID
    assert _status(lambda: cm.allocate_cache(desc, [CacheKey(9, 10, 0)])) == PARAM_INVALID  # cluster id ignored
    cm.allocate_cache(desc, [CacheKey(1, 10, 1)])  # another model id is another key
    cm.allocate_cache(desc, [CacheKey(1, 11)])  # the failed request bound nothing


def test_duplicate_key_in_one_request_last_wins(cm):
    cache = cm.allocate_cache(CacheDesc(1, [3, 8], DataType.DT_UINT8), [CacheKey(1, 5), CacheKey(1, 6), CacheKey(1, 5)])
    # the key is bound once (to slot 2), so another allocation can not take it
    assert _status(lambda: cm.allocate_cache(CacheDesc(1, [1, 8], DataType.DT_UINT8), [CacheKey(1, 5)])) \
        == PARAM_INVALID
    assert cache.cache_id == 1


def test_several_placeholders(cm):
    placeholder = CacheKey(1, UINT64_MAX)
    desc = CacheDesc(1, [4, 8], DataType.DT_UINT8)
    cm.allocate_cache(desc, [placeholder, placeholder, CacheKey(1, 3)])
    cm.allocate_cache(desc, [placeholder, CacheKey(1, 4)])  # placeholders never collide
    cm.allocate_blocks_cache(CacheDesc(1, [4, 8], DataType.DT_UINT8), BlocksCacheKey(1, 0))


def test_more_keys_than_batch(cm):
    desc = CacheDesc(1, [2, 8], DataType.DT_UINT8)
    keys = [CacheKey(1, 1), CacheKey(1, 2), CacheKey(1, 3)]
    assert _status(lambda: cm.allocate_cache(desc, keys)) == PARAM_INVALID
    cm.allocate_cache(desc, keys[:2])
    cm.allocate_cache(desc, [CacheKey(1, 3)])  # fewer keys than slots is fine


def test_memory_returns_after_dealloc_and_key_removal(cm, tools):
    whole = CacheDesc(2, [tools.POOL_BYTES // 2048, 1024], DataType.DT_UINT8)
    cache = cm.allocate_cache(whole, [CacheKey(1, 1), CacheKey(1, 2, prefix_id=UINT64_MAX), CacheKey(1, 0, 0, 9)])
    cm.deallocate_cache(cache)
    small = CacheDesc(1, [1, 1024], DataType.DT_UINT8)
    assert _status(lambda: cm.allocate_cache(small)) == LLMStatusCode.LLM_OUT_OF_MEMORY  # keys hold it
    cm.remove_cache_key(CacheKey(1, 1))
    cm.remove_cache_key(CacheKey(1, 2))
    assert _status(lambda: cm.allocate_cache(small)) == LLMStatusCode.LLM_OUT_OF_MEMORY  # the prefix key holds it
    cm.remove_cache_key(CacheKey(1, 0, 0, 9))
    again = cm.allocate_cache(whole)
    assert len(again.tensor_addrs) == 2


def test_deallocate_twice_is_noop(cm):
    cache = cm.allocate_cache(CacheDesc(1, [2, 8], DataType.DT_UINT8))
    cm.deallocate_cache(cache)
    cm.deallocate_cache(cache)
    blocks = cm.allocate_blocks_cache(CacheDesc(1, [2, 8], DataType.DT_UINT8))
    cm.deallocate_blocks_cache(blocks)
    cm.deallocate_blocks_cache(blocks)


def test_deallocate_clears_tensor_addrs(cm, new_cache):
    cache = cm.allocate_cache(CacheDesc(2, [2, 8], DataType.DT_UINT8))
    assert len(cache.tensor_addrs) == 2
    cm.deallocate_cache(cache)
    assert cache.tensor_addrs == []
    registered, _ = new_cache(cm, 2, (2, 8))
    cm.deallocate_cache(registered)  # registered: a no-op natively, but the handle is cleared
    assert registered.tensor_addrs == []


def test_deallocate_kind_mismatch(cm):
    blocks = cm.allocate_blocks_cache(CacheDesc(1, [2, 8], DataType.DT_UINT8))
    cache = cm.allocate_cache(CacheDesc(1, [2, 8], DataType.DT_UINT8))
    assert _status(lambda: cm.deallocate_cache(blocks)) == PARAM_INVALID
    assert _status(lambda: cm.deallocate_blocks_cache(cache)) == PARAM_INVALID
    assert len(blocks.tensor_addrs) == 1 and len(cache.tensor_addrs) == 1  # untouched
    cm.deallocate_blocks_cache(blocks)
    cm.deallocate_cache(cache)


def test_deallocate_bad_types(cm):
    with pytest.raises(AttributeError):
        cm.deallocate_cache(None)
    with pytest.raises(TypeError):
        cm.deallocate_cache("x")
    with pytest.raises(AttributeError):
        cm.deallocate_blocks_cache(None)
    with pytest.raises(TypeError):
        cm.deallocate_blocks_cache(1)


def test_remove_unknown_key_is_noop(cm):
    cm.remove_cache_key(CacheKey(1, 12345))
    cache = cm.allocate_cache(CacheDesc(1, [2, 8], DataType.DT_UINT8), [CacheKey(1, 1)])
    cm.remove_cache_key(CacheKey(1, 1))
    cm.remove_cache_key(CacheKey(1, 1))  # already removed
    cm.remove_cache_key(CacheKey(1, UINT64_MAX))  # placeholder
    cm.deallocate_cache(cache)


def test_remove_key_without_pool(make_dd):
    cm = make_dd(LLMRole.PROMPT, 1).cache_manager
    assert _status(lambda: cm.remove_cache_key(CacheKey(1, 1))) == LLMStatusCode.LLM_FEATURE_NOT_ENABLED


def test_remove_cache_key_type(cm):
    with pytest.raises(TypeError):
        cm.remove_cache_key(BlocksCacheKey(1))
    with pytest.raises(TypeError):
        cm.remove_cache_key(CacheKeyByIdAndIndex(1, 1))
    with pytest.raises(AttributeError):
        cm.remove_cache_key(None)


def test_allocate_copy_deallocate_remove(cm, tools):
    desc = CacheDesc(2, [2, 16], DataType.DT_UINT8)
    src = cm.allocate_cache(desc, [CacheKey(1, 1), CacheKey(1, 2)])
    dst = cm.allocate_cache(desc)
    src_views = _fill_allocated(src, tools)
    dst_views = _fill_allocated(dst, tools, tools.SENTINEL)
    cm.copy_cache(dst, src, 1, 0)
    for s, d in zip(src_views, dst_views):
        assert (d[1] == s[0]).all() and (d[0] == tools.SENTINEL).all()
    cm.deallocate_cache(src)
    cm.deallocate_cache(dst)
    cm.remove_cache_key(CacheKey(1, 1))
    cm.remove_cache_key(CacheKey(1, 2))


def test_allocate_blocks_cache(cm):
    cache = cm.allocate_blocks_cache(CacheDesc(2, [8, 16], DataType.DT_UINT8), BlocksCacheKey(2, 0))
    assert cache.is_blocks_cache is True
    assert len(cache.tensor_addrs) == 2
    unkeyed = cm.allocate_blocks_cache(CacheDesc(2, [8, 16], DataType.DT_UINT8))
    assert unkeyed.is_blocks_cache is True


def test_allocate_blocks_cache_key_type(cm):
    desc = CacheDesc(1, [2, 8], DataType.DT_UINT8)
    with pytest.raises(TypeError):
        cm.allocate_blocks_cache(desc, [BlocksCacheKey(1)])
    with pytest.raises(TypeError):
        cm.allocate_blocks_cache(desc, CacheKey(1, 1))
    assert cm.allocate_blocks_cache(desc, BlocksCacheKey(1)).cache_id == 1


def test_blocks_model_id_bound_twice(cm):
    desc = CacheDesc(1, [2, 8], DataType.DT_UINT8)
    cm.allocate_blocks_cache(desc, BlocksCacheKey(2, 0))
    assert _status(lambda: cm.allocate_blocks_cache(desc, BlocksCacheKey(5, 0))) == PARAM_INVALID
    cm.allocate_blocks_cache(desc, BlocksCacheKey(2, 1))


def test_cache_ids_never_reused(cm, new_cache):
    desc = CacheDesc(1, [2, 8], DataType.DT_UINT8)
    first = cm.allocate_cache(desc)
    assert first.cache_id == 1
    cm.deallocate_cache(first)
    assert cm.allocate_cache(desc).cache_id == 2
    registered, _ = new_cache(cm, 1, (2, 8))
    cm.unregister_cache(registered.cache_id)
    assert cm.allocate_blocks_cache(desc).cache_id == 4


def test_deallocate_blocks_frees_key_at_once(cm, tools):
    whole = CacheDesc(2, [tools.POOL_BYTES // 2048, 1024], DataType.DT_UINT8)
    blocks = cm.allocate_blocks_cache(whole, BlocksCacheKey(1, 3))
    cm.deallocate_blocks_cache(blocks)
    again = cm.allocate_blocks_cache(whole, BlocksCacheKey(1, 3))  # memory and key both free again
    assert again.cache_id == blocks.cache_id + 1


# -- register / unregister ----------------------------------------------------------------------
def test_register_ids(cm, new_cache):
    arrays = new_cache.arrays(2, (2, 4), DataType.DT_INT8)
    cache = cm.register_cache(CacheDesc(1, [2, 4], DataType.DT_INT8, Placement.DEVICE), [arrays[0].ctypes.data])
    assert cache.cache_id == 1 and cache.is_blocks_cache is False
    assert cache.tensor_addrs == [arrays[0].ctypes.data]
    blocks = cm.register_blocks_cache(CacheDesc(1, [2, 4], DataType.DT_INT8, Placement.DEVICE),
                                      [arrays[1].ctypes.data], BlocksCacheKey(1, 100))
    assert blocks.cache_id == 2 and blocks.is_blocks_cache is True
    cm.unregister_cache(1)
    cm.unregister_cache(2)


def test_register_bad_addresses(cm, new_cache):
    arrays = new_cache.arrays(2, (2, 8))
    addrs = [a.ctypes.data for a in arrays]
    desc = CacheDesc(2, [2, 8], DataType.DT_UINT8)
    for bad in ([], addrs[:1], addrs + [addrs[0]], [addrs[0], 0]):
        assert _status(lambda: cm.register_cache(desc, bad)) == PARAM_INVALID
    for bad in ([], [addrs[0], 0]):
        assert _status(lambda: cm.register_blocks_cache(desc, bad)) == PARAM_INVALID
    # register_blocks_cache checks the count natively: still LLM_PARAM_INVALID
    assert _status(lambda: cm.register_blocks_cache(desc, addrs[:1])) == PARAM_INVALID
    assert cm.register_cache(desc, addrs).cache_id == 1  # the failures consumed no id


def test_register_unmapped_memory(cm, new_cache):
    # An address range that is not mapped in this process is rejected (fake addresses like 1)
    desc = CacheDesc(1, [2, 8], DataType.DT_UINT8)
    for fake in (1, 4096, 2**47 - 4096):
        assert _status(lambda: cm.register_cache(desc, [fake])) == PARAM_INVALID
        assert _status(lambda: cm.register_blocks_cache(desc, [fake])) == PARAM_INVALID
    # a range that runs past the end of a real allocation is caught too (the array has 16 bytes, the desc 1 MiB)
    small = new_cache.arrays(1, (2, 8))[0]
    huge = CacheDesc(1, [1 << 10, 1 << 20], DataType.DT_UINT8)
    assert _status(lambda: cm.register_cache(huge, [small.ctypes.data])) == PARAM_INVALID
    cache, _ = new_cache(cm, 1, (2, 8))  # the instance is still fine
    assert cache.cache_id >= 1


def test_register_argument_types(cm, new_cache):
    arrays = new_cache.arrays(2, (2, 8))
    addrs = [a.ctypes.data for a in arrays]
    desc = CacheDesc(2, [2, 8], DataType.DT_UINT8)
    with pytest.raises(TypeError):
        cm.register_cache(desc, tuple(addrs))
    with pytest.raises(TypeError):
        cm.register_cache(desc, addrs, remote_accessible=1)
    with pytest.raises(TypeError):
        cm.register_cache(desc, [float(addrs[0]), addrs[1]])
    with pytest.raises(TypeError):
        cm.register_cache(desc, addrs, CacheKey(1, 1))
    with pytest.raises(TypeError):
        cm.register_cache(desc, addrs, [BlocksCacheKey(1)])
    with pytest.raises(TypeError):
        cm.register_cache("desc", addrs)
    with pytest.raises(TypeError):
        cm.register_blocks_cache(desc, tuple(addrs))
    with pytest.raises(TypeError):
        cm.register_blocks_cache(desc, addrs, [BlocksCacheKey(1)])
    with pytest.raises(TypeError):
        cm.register_blocks_cache(desc, addrs, remote_accessible="yes")
    assert cm.register_cache(desc, addrs, remote_accessible=True).cache_id == 1


def test_register_does_not_mutate_desc(cm, new_cache):
    shape = [4, 8]
    desc = CacheDesc(2, shape, DataType.DT_UINT8)
    arrays = new_cache.arrays(2, (4, 8))
    blocks = cm.register_blocks_cache(desc, [a.ctypes.data for a in arrays])
    cache = cm.register_cache(desc, [a.ctypes.data for a in arrays])  # the same desc as a continuous cache
    assert blocks.is_blocks_cache and not cache.is_blocks_cache
    assert shape == [4, 8]
    with pytest.raises(LLMException):  # a continuous cache can not be used as blocks
        cm.copy_blocks(cache, {0: [1]})


def test_register_remote_accessible_after_link(make_dd, new_cache, tools):
    # Unlike the official library (see docs/compatibility.md), registration (remote accessible too) is allowed
    # at any time after a rank-table link, and the new cache is visible to the linked peer at once.
    import json
    import uuid

    from waiting import wait_until

    p = make_dd(LLMRole.PROMPT, 1, enable_remote_cache_accessible=True)
    d = make_dd(LLMRole.DECODER, 2, enable_remote_cache_accessible=True)
    devices = [{"device_id": str(i), "device_ip": "127.0.0.1", "rank_id": str(i)} for i in range(2)]
    table = json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                        "server_list": [{"server_id": "127.0.0.1", "device": devices}]})
    name = "reg-after-link-" + uuid.uuid4().hex[:8]
    p_comm, d_comm = p.link(name, {1: 0, 2: 1}, table), d.link(name, {1: 0, 2: 1}, table)
    assert wait_until(lambda: p.query_register_mem_status(p_comm) is RegisterMemStatus.OK
                      and d.query_register_mem_status(d_comm) is RegisterMemStatus.OK)
    src, src_arrays = new_cache(p.cache_manager, 2, (2, 8), placement=Placement.HOST, remote_accessible=True)
    dev, dev_arrays = new_cache(p.cache_manager, 2, (2, 8), placement=Placement.DEVICE)  # default after link
    dst, dst_arrays = new_cache(d.cache_manager, 2, (2, 8), remote_accessible=True, fill="sentinel")
    d.cache_manager.pull_cache(CacheKeyByIdAndIndex(1, src.cache_id, 1), dst, 0)
    d.cache_manager.pull_cache(CacheKeyByIdAndIndex(1, dev.cache_id, 0), dst, 1)
    for s, v, t in zip(src_arrays, dev_arrays, dst_arrays):
        assert (t[0] == s[1]).all() and (t[1] == v[0]).all()
    d.unlink(d_comm)
    p.unlink(p_comm)


def test_unregister_cache(cm, new_cache):
    cache, _ = new_cache(cm, 1, (2, 8))
    other, _ = new_cache(cm, 1, (2, 8))
    cm.unregister_cache(cache.cache_id)
    assert _status(lambda: cm.copy_cache(other, cache)) == NOT_EXIST  # really gone
    cm.unregister_cache(cache.cache_id)  # twice: no-op
    cm.unregister_cache(12345)  # unknown: no-op
    cm.unregister_cache(-3)  # negative ids are accepted (no-op)
    cm.copy_cache(other, other, 1, 0)  # the instance is still fine


def test_unregister_argument_types(cm):
    with pytest.raises(TypeError):
        cm.unregister_cache("5")
    with pytest.raises(TypeError):
        cm.unregister_cache(None)
    with pytest.raises(ValueError):
        cm.unregister_cache(2**63)
    cm.unregister_cache(1)


# -- copy / swap / remap ------------------------------------------------------------------------
def test_copy_cache_default_slot0(cm, new_cache, tools):
    src, src_arrays = new_cache(cm, 3, (4, 16))
    dst, dst_arrays = new_cache(cm, 3, (4, 16), fill="sentinel")
    cm.copy_cache(dst, src)
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[0] == s[0]).all()
        assert (d[1:] == tools.SENTINEL).all()
    assert all((s != tools.SENTINEL).all() for s in src_arrays)  # the source is unchanged


def test_copy_cache_slot_into_wider_slot(cm, new_cache, tools):
    src, src_arrays = new_cache(cm, 1, (4, 4), dtype=DataType.DT_INT32)
    src_arrays[0][:] = np.arange(16, dtype=np.int32).reshape(4, 4)
    dst, dst_arrays = new_cache(cm, 1, (4, 8), dtype=DataType.DT_INT32, fill="sentinel")
    cm.copy_cache(dst, src, 2, 1)
    flat = dst_arrays[0].reshape(-1)
    assert flat[16:20].tolist() == [4, 5, 6, 7]
    untouched = np.ones(32, dtype=bool)
    untouched[16:20] = False
    assert (flat[untouched].view(np.uint8) == tools.SENTINEL).all()


def test_copy_cache_size_and_offset(cm, new_cache, tools):
    src, src_arrays = new_cache(cm, 1, (4, 4), dtype=DataType.DT_INT32)
    src_arrays[0][:] = np.arange(16, dtype=np.int32).reshape(4, 4)
    dst, dst_arrays = new_cache(cm, 1, (4, 8), dtype=DataType.DT_INT32, fill="sentinel")
    flat = dst_arrays[0].reshape(-1)
    cm.copy_cache(dst, src, dst_batch_index=1, src_batch_index=0, size=8)
    assert flat[8:10].tolist() == [0, 1]
    cm.copy_cache(dst, src, dst_batch_index=0, src_batch_index=2, offset=4, size=8)
    assert flat[1:3].tolist() == [9, 10]
    untouched = np.ones(32, dtype=bool)
    untouched[[1, 2, 8, 9]] = False
    assert (flat[untouched].view(np.uint8) == tools.SENTINEL).all()


def test_copy_cache_req_id_is_accepted(cm, new_cache):
    src, src_arrays = new_cache(cm, 1, (2, 8))
    dst, dst_arrays = new_cache(cm, 1, (2, 8), fill="sentinel")
    cm.copy_cache(dst, src, 1, 1, 0, -1, 42)
    assert (dst_arrays[0][1] == src_arrays[0][1]).all()


def test_copy_cache_bad_size_offset_indices(cm, new_cache, tools):
    src, src_arrays = new_cache(cm, 1, (2, 8))
    dst, dst_arrays = new_cache(cm, 1, (2, 8), fill="sentinel")
    for size in (0, -2):
        assert _status(lambda: cm.copy_cache(dst, src, size=size)) == PARAM_INVALID
    with pytest.raises(ValueError):
        cm.copy_cache(dst, src, offset=-1)
    with pytest.raises(ValueError):
        cm.copy_cache(dst, src, dst_batch_index=-1)
    with pytest.raises(ValueError):
        cm.copy_cache(dst, src, src_batch_index=2**32)
    with pytest.raises(ValueError):
        cm.copy_cache(dst, src, req_id=-1)
    with pytest.raises(TypeError):
        cm.copy_cache(dst, src, size=1.0)
    assert (dst_arrays[0] == tools.SENTINEL).all()  # nothing was written by the failed calls
    cm.copy_cache(dst, src)
    assert (dst_arrays[0][0] == src_arrays[0][0]).all()


def test_copy_cache_rejects_blocks(cm, new_cache):
    cache, _ = new_cache(cm, 1, (2, 8))
    blocks, _ = new_cache(cm, 1, (2, 8), blocks=True)
    assert _status(lambda: cm.copy_cache(blocks, cache)) == PARAM_INVALID
    assert _status(lambda: cm.copy_cache(cache, blocks)) == PARAM_INVALID
    with pytest.raises(AttributeError):
        cm.copy_cache(None, cache)
    with pytest.raises(TypeError):
        cm.copy_cache(cache, "src")


def test_copy_cache_shape_checks(cm, new_cache, tools):
    two, _ = new_cache(cm, 2, (2, 8))
    three, _ = new_cache(cm, 3, (2, 8))
    dst, dst_arrays = new_cache(cm, 2, (2, 8), fill="sentinel")
    assert _status(lambda: cm.copy_cache(three, two)) == PARAM_INVALID
    assert _status(lambda: cm.copy_cache(dst, two, dst_batch_index=2)) == PARAM_INVALID
    assert _status(lambda: cm.copy_cache(dst, two, src_batch_index=2)) == PARAM_INVALID
    assert _status(lambda: cm.copy_cache(dst, two, offset=8)) == PARAM_INVALID
    assert _status(lambda: cm.copy_cache(dst, two, offset=4, size=5)) == PARAM_INVALID
    wide, _ = new_cache(cm, 2, (2, 16))
    assert _status(lambda: cm.copy_cache(dst, wide)) == PARAM_INVALID  # 16 bytes do not fit an 8-byte slot
    assert all((a == tools.SENTINEL).all() for a in dst_arrays)
    cm.copy_cache(dst, wide, size=8)  # the first 8 bytes do
    cm.copy_cache(dst, two, offset=4, size=4)


def test_copy_cache_data_type_must_match(cm, new_cache, tools):
    # num_tensors and data_type must match
    ints, _ = new_cache(cm, 1, (2, 8), dtype=DataType.DT_INT32)
    bytes_, arrays = new_cache(cm, 1, (2, 32), dtype=DataType.DT_UINT8, fill="sentinel")
    assert _status(lambda: cm.copy_cache(bytes_, ints)) == PARAM_INVALID
    assert (arrays[0] == tools.SENTINEL).all()


def test_copy_cache_freed_cache(cm, new_cache):
    live, _ = new_cache(cm, 1, (2, 8))
    freed = cm.allocate_cache(CacheDesc(1, [2, 8], DataType.DT_UINT8))
    cm.deallocate_cache(freed)
    assert _status(lambda: cm.copy_cache(live, freed)) == NOT_EXIST
    assert _status(lambda: cm.copy_cache(freed, live)) == NOT_EXIST
    gone, _ = new_cache(cm, 1, (2, 8))
    cm.unregister_cache(gone.cache_id)
    assert _status(lambda: cm.copy_cache(live, gone)) == NOT_EXIST


def test_copy_blocks(cm, new_cache, tools):
    blocks, arrays = new_cache(cm, 2, (6, 8), blocks=True)
    before = [a.copy() for a in arrays]
    cm.copy_blocks(blocks, {0: [1], 2: [4, 5]})
    for a, b in zip(arrays, before):
        assert (a[1] == b[0]).all() and (a[4] == b[2]).all() and (a[5] == b[2]).all()
        assert (a[[0, 2, 3]] == b[[0, 2, 3]]).all()
    cache, _ = new_cache(cm, 2, (6, 8))
    assert _status(lambda: cm.copy_blocks(cache, {0: [1]})) == PARAM_INVALID
    cm.copy_blocks(blocks, {})


def test_copy_blocks_allocated(cm, tools):
    blocks = cm.allocate_blocks_cache(CacheDesc(1, [4, 32], DataType.DT_UINT8))
    views = _fill_allocated(blocks, tools)
    before = views[0].copy()
    cm.copy_blocks(blocks, {3: [0]})
    assert (views[0][0] == before[3]).all() and (views[0][1:] == before[1:]).all()


def test_copy_blocks_types(cm, new_cache):
    blocks, _ = new_cache(cm, 1, (4, 8), blocks=True)
    with pytest.raises(TypeError):
        cm.copy_blocks(blocks, {0: 1})
    with pytest.raises(TypeError):
        cm.copy_blocks(blocks, {0: ["1"]})
    with pytest.raises(TypeError):
        cm.copy_blocks(blocks, {"0": [1]})
    with pytest.raises(TypeError):
        cm.copy_blocks(blocks, [(0, [1])])


def test_copy_blocks_index_out_of_range(cm, new_cache):
    blocks, arrays = new_cache(cm, 2, (4, 8), blocks=True)
    before = [a.copy() for a in arrays]
    for mapping in ({0: [4]}, {4: [0]}, {-1: [0]}, {0: [1, -2]}):
        assert _status(lambda: cm.copy_blocks(blocks, mapping)) == PARAM_INVALID
    assert all((a == b).all() for a, b in zip(arrays, before))  # a failing request writes nothing
    cm.copy_blocks(blocks, {0: [3]})


SWAP_MAP = {3: 4, 0: 0, 1: 1, 2: 2, 5: 6, 6: 7, 7: 8, 9: 9}


def _cpu_cache(new_cache, num_tensors: int, shape, fill="sentinel"):
    arrays = new_cache.arrays(num_tensors, shape, fill=fill)
    desc = CacheDesc(num_tensors, list(shape), DataType.DT_UINT8, Placement.HOST)
    return Cache.create_cpu_cache(desc, [a.ctypes.data for a in arrays]), arrays


def test_swap_out_and_in(cm, new_cache, tools):
    npu, npu_arrays = new_cache(cm, 2, (10, 32), placement=Placement.DEVICE, blocks=True)
    cpu, cpu_arrays = _cpu_cache(new_cache, 2, (10, 32))
    cm.swap_blocks(npu, cpu, SWAP_MAP)  # swap out
    for n, c in zip(npu_arrays, cpu_arrays):
        for s, d in SWAP_MAP.items():
            assert (c[d] == n[s]).all()
        assert (c[[3, 5]] == tools.SENTINEL).all()  # blocks no mapping writes
    back, back_arrays = new_cache(cm, 2, (10, 32), placement=Placement.DEVICE, blocks=True, fill="sentinel")
    cm.swap_blocks(cpu, back, {d: s for s, d in SWAP_MAP.items()})  # swap in
    for n, b in zip(npu_arrays, back_arrays):
        for s in SWAP_MAP:
            assert (b[s] == n[s]).all()
        assert (b[[4, 8]] == tools.SENTINEL).all()


def test_swap_with_allocated_device_cache(cm, new_cache, tools):
    npu = cm.allocate_blocks_cache(CacheDesc(1, [10, 32], DataType.DT_UINT8, Placement.DEVICE))
    views = _fill_allocated(npu, tools)
    cpu, cpu_arrays = _cpu_cache(new_cache, 1, (10, 32))
    cm.swap_blocks(npu, cpu, {9: 0})
    assert (cpu_arrays[0][0] == views[0][9]).all() and (cpu_arrays[0][1:] == tools.SENTINEL).all()


def test_swap_device_to_device(cm, new_cache):
    a, _ = new_cache(cm, 1, (4, 8), placement=Placement.DEVICE, blocks=True)
    b, _ = new_cache(cm, 1, (4, 8), placement=Placement.DEVICE, blocks=True)
    assert _status(lambda: cm.swap_blocks(a, b, {0: 0})) == PARAM_INVALID
    cpu, _ = _cpu_cache(new_cache, 1, (4, 8))
    cpu2, _ = _cpu_cache(new_cache, 1, (4, 8))
    assert _status(lambda: cm.swap_blocks(cpu, cpu2, {0: 0})) == PARAM_INVALID


def test_swap_continuous_or_none(cm, new_cache):
    npu, _ = new_cache(cm, 1, (4, 8), placement=Placement.DEVICE, blocks=True)
    cont, _ = new_cache(cm, 1, (4, 8), placement=Placement.HOST)
    assert _status(lambda: cm.swap_blocks(npu, cont, {0: 0})) == PARAM_INVALID
    with pytest.raises(AttributeError):
        cm.swap_blocks(None, npu, {0: 0})
    with pytest.raises(AttributeError):
        cm.swap_blocks(npu, None, {0: 0})
    with pytest.raises(TypeError):
        cm.swap_blocks("npu", npu, {0: 0})


def test_swap_geometry_mismatch(cm, new_cache):
    npu, _ = new_cache(cm, 2, (4, 8), placement=Placement.DEVICE, blocks=True)
    wide, _ = _cpu_cache(new_cache, 2, (4, 16))
    fewer, _ = _cpu_cache(new_cache, 1, (4, 8))
    assert _status(lambda: cm.swap_blocks(npu, wide, {0: 0})) == PARAM_INVALID
    assert _status(lambda: cm.swap_blocks(npu, fewer, {0: 0})) == PARAM_INVALID
    more_blocks, _ = _cpu_cache(new_cache, 2, (8, 8))  # only the block size and tensor count must match
    cm.swap_blocks(npu, more_blocks, {3: 7})


def test_swap_index_out_of_range(cm, new_cache, tools):
    npu, _ = new_cache(cm, 1, (4, 8), placement=Placement.DEVICE, blocks=True)
    cpu, cpu_arrays = _cpu_cache(new_cache, 1, (6, 8))
    assert _status(lambda: cm.swap_blocks(npu, cpu, {0: 6})) == PARAM_INVALID
    assert _status(lambda: cm.swap_blocks(npu, cpu, {4: 0})) == PARAM_INVALID
    assert _status(lambda: cm.swap_blocks(npu, cpu, {0: 1, -1: 2})) == PARAM_INVALID
    assert (cpu_arrays[0] == tools.SENTINEL).all()
    cm.swap_blocks(npu, cpu, {0: 5})


def test_swap_mapping_types(cm, new_cache):
    npu, _ = new_cache(cm, 1, (4, 8), placement=Placement.DEVICE, blocks=True)
    cpu, _ = _cpu_cache(new_cache, 1, (4, 8))
    with pytest.raises(TypeError):
        cm.swap_blocks(npu, cpu, {"0": 1})
    with pytest.raises(TypeError):
        cm.swap_blocks(npu, cpu, [(0, 1)])
    with pytest.raises(TypeError):
        cm.swap_blocks(npu, cpu, {0: 1.0})


def test_swap_unmapped_cpu_cache(cm, new_cache):
    npu, _ = new_cache(cm, 1, (4, 8), placement=Placement.DEVICE, blocks=True)
    fake = Cache.create_cpu_cache(CacheDesc(1, [4, 8], DataType.DT_UINT8, Placement.HOST), [4096])
    assert _status(lambda: cm.swap_blocks(npu, fake, {0: 0})) == PARAM_INVALID


def test_create_cpu_cache(new_cache):
    arrays = new_cache.arrays(2, (4, 8))
    addrs = [a.ctypes.data for a in arrays]
    device = CacheDesc(2, [4, 8], DataType.DT_UINT8, Placement.DEVICE)
    host = CacheDesc(2, [4, 8], DataType.DT_UINT8, Placement.HOST)
    assert _status(lambda: Cache.create_cpu_cache(device, addrs)) == PARAM_INVALID
    assert _status(lambda: Cache.create_cpu_cache(host, addrs[:1])) == PARAM_INVALID
    with pytest.raises(TypeError):
        Cache.create_cpu_cache(host, tuple(addrs))
    cache = Cache.create_cpu_cache(host, addrs)
    assert cache.cache_id == -1 and cache.is_blocks_cache is True
    assert cache.tensor_addrs == addrs and cache.cache_desc is host


def test_remap_registered_memory(cm, new_cache, tools):
    cache, arrays = new_cache(cm, 2, (4, 8), placement=Placement.DEVICE)
    before = [a.copy() for a in arrays]
    # ranges that hold no registered memory are accepted and change nothing
    cm.remap_registered_memory(MemInfo(Memtype.MEM_TYPE_DEVICE, 1234, 1))
    cm.remap_registered_memory([MemInfo(Memtype.MEM_TYPE_DEVICE, 1234, 1)])
    cm.remap_registered_memory([])
    cm.remap_registered_memory([MemInfo(Memtype.MEM_TYPE_DEVICE, arrays[0].ctypes.data + 8, 8),
                                MemInfo(Memtype.MEM_TYPE_DEVICE, arrays[1].ctypes.data, arrays[1].nbytes)])
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before))  # re-exposing never touches the bytes
    arrays[0][0] = 77  # the application restores (here: rewrites) the memory after the remap
    cm.copy_cache(cache, cache, 1, 0)  # the cache is still registered, at the same addresses
    want = [b.copy() for b in before]
    want[0][0] = want[0][1] = 77
    want[1][1] = before[1][0]
    assert all(np.array_equal(a, w) for a, w in zip(arrays, want))
    other, other_arrays = new_cache(cm, 2, (4, 8), placement=Placement.DEVICE, fill="sentinel")
    cm.copy_cache(other, cache, 3, 1)  # and still a source
    for got, w in zip(other_arrays, want):
        assert np.array_equal(got[3], w[1]) and (got[:3] == tools.SENTINEL).all()


def test_remap_bad_arguments(cm):
    for bad in ("some val", (MemInfo(Memtype.MEM_TYPE_DEVICE, 1234, 1),), None, [1]):
        assert _status(lambda: cm.remap_registered_memory(bad)) == PARAM_INVALID
    for info in (MemInfo(Memtype.MEM_TYPE_HOST, 1234, 1), MemInfo(Memtype.MEM_TYPE_DEVICE, 0, 1),
                 MemInfo(Memtype.MEM_TYPE_DEVICE, 1234, 0), MemInfo(Memtype.MEM_TYPE_DEVICE, 1234, -1)):
        assert _status(lambda: cm.remap_registered_memory(info)) == PARAM_INVALID
        assert _status(lambda: cm.remap_registered_memory([MemInfo(Memtype.MEM_TYPE_DEVICE, 1, 1), info])) \
            == PARAM_INVALID
    cm.remap_registered_memory(MemInfo(Memtype.MEM_TYPE_DEVICE, 1234, 1))
