"""The v2 data classes: enums, CacheDesc, keys, transfer configs, Cache and CacheTask."""
from __future__ import annotations

import threading

import pytest

from llm_datadist import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    CacheTask,
    DataType,
    KvCache,
    LayerSynchronizer,
    LLMException,
    LLMStatusCode,
    MemInfo,
    Memtype,
    Placement,
    RegisterMemStatus,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
UINT64_MAX = 2**64 - 1


def _param_invalid(func, match=None):
    with pytest.raises(LLMException, match=match) as info:
        func()
    assert info.value.status_code == PARAM_INVALID
    return info.value


# ---- enums --------------------------------------------------------------------------------------
def test_placement():
    assert Placement.HOST == 0 and Placement.DEVICE == 1
    assert str(Placement.DEVICE) == "Placement.DEVICE"
    assert f"{Placement.HOST}" == "Placement.HOST"


def test_memtype():
    assert Memtype.MEM_TYPE_DEVICE.value == 0
    assert Memtype.MEM_TYPE_HOST.value == 1
    assert Memtype.MEM_TYPE_DEVICE != 0  # plain Enum


def test_register_mem_status():
    assert [RegisterMemStatus.OK.value, RegisterMemStatus.PREPARING.value, RegisterMemStatus.FAILED.value] == [0, 1, 2]


# ---- CacheDesc ----------------------------------------------------------------------------------
def test_negative_num_tensors():
    with pytest.raises(ValueError):
        CacheDesc(-1, [2, 4], DataType.DT_INT8, Placement.DEVICE)


def test_seq_len_dim_index_range():
    with pytest.raises(ValueError):
        CacheDesc(1, [2, 4], DataType.DT_INT8, seq_len_dim_index=2**64 - 1)


def test_num_tensors_range():
    with pytest.raises(ValueError):
        CacheDesc(2**32, [2, 4], DataType.DT_INT8)
    assert CacheDesc(0, [2, 4], DataType.DT_INT8).num_tensors == 0


def test_empty_shape():
    _param_invalid(lambda: CacheDesc(1, [], DataType.DT_INT8))


def test_shape_types():
    with pytest.raises(TypeError):
        CacheDesc(1, "ab", DataType.DT_INT8)
    with pytest.raises(TypeError):
        CacheDesc(1, [2.0, 4], DataType.DT_INT8)
    with pytest.raises(TypeError):
        CacheDesc(1, None, DataType.DT_INT8)


def test_data_type_and_placement_types():
    with pytest.raises(TypeError):
        CacheDesc(1, [2, 4], 1)
    with pytest.raises(TypeError):
        CacheDesc(1, [2, 4], DataType.DT_INT8, 1)
    with pytest.raises(TypeError):
        CacheDesc(1, [2, 4], DataType.DT_INT8, batch_dim_index=None)


def test_batch_dim_index_range():
    for bad in (2, -1):
        _param_invalid(lambda: CacheDesc(1, [2, 4], DataType.DT_INT8, batch_dim_index=bad))


def test_seq_len_dim_index_values():
    for bad in (-2, 2):
        _param_invalid(lambda: CacheDesc(1, [2, 4], DataType.DT_INT8, seq_len_dim_index=bad))
    for ok in (-1, 0, 1):
        assert CacheDesc(1, [2, 4], DataType.DT_INT8, seq_len_dim_index=ok).seq_len_dim_index == ok


def test_shape_element_int64():
    with pytest.raises(ValueError):
        CacheDesc(1, [2, 2**63], DataType.DT_INT8)


def test_size_of_one_tensor():
    assert CacheDesc(80, [4, 2048, 1, 128], DataType.DT_FLOAT16).size == 2097152
    assert CacheDesc(1, [3], DataType.DT_STRING).size == 48


def test_non_positive_dim_size_fails():
    desc = CacheDesc(1, [2, -4], DataType.DT_INT8)
    with pytest.raises(LLMException):
        desc.size  # noqa: B018
    zero = CacheDesc(1, [0, 4], DataType.DT_INT8)
    with pytest.raises(LLMException):
        zero.size  # noqa: B018


def test_batch_size_from_batch_dim():
    desc = CacheDesc(1, [2, 4], DataType.DT_INT8, batch_dim_index=1)
    assert desc.batch_size == 4
    assert desc.batch_dim == 1


def test_cache_desc_repr():
    desc = CacheDesc(80, [4, 2048, 1, 128], DataType.DT_FLOAT16)
    expected = (
        "CacheDesc(num_tensors=80, shape=[4, 2048, 1, 128], data_type=DataType.DT_FLOAT16, "
        "placement=Placement.DEVICE, batch_dim_index=0, seq_len_dim_index=-1,kv_tensor_format=None)"
    )
    assert repr(desc) == expected
    assert str(desc) == expected


def test_identity_equality():
    first = CacheDesc(1, [2, 4], DataType.DT_INT8)
    second = CacheDesc(1, [2, 4], DataType.DT_INT8)
    assert first != second
    assert first == first


def test_cache_desc_properties_shape_by_reference_and_update_dim():
    shape = [4, 8]
    desc = CacheDesc(2, shape, DataType.DT_FLOAT, Placement.HOST, kv_tensor_format="ND")
    assert desc.shape is shape
    assert desc.placement is Placement.HOST
    assert desc.data_type is DataType.DT_FLOAT
    assert desc.kv_tensor_format == "ND"
    assert desc.size == 128
    desc.update_dim(1, 16)
    assert shape == [4, 16]
    assert desc.size == 256  # cache invalidated
    desc.update_dim(0, 10)
    assert desc.batch_size == 4  # computed once at construction
    _param_invalid(lambda: desc.update_dim(2, 1))
    with pytest.raises(TypeError):
        desc.update_dim(0, 1.0)
    assert desc._is_blocks is False


def test_cache_desc_tuple_shape_and_keywords():
    desc = CacheDesc(num_tensors=56, shape=(1000, 128, 2, 128), data_type=DataType.DT_BF16,
                     placement=Placement.DEVICE, batch_dim_index=0, seq_len_dim_index=-1, kv_tensor_format=None)
    assert desc.num_tensors == 56
    assert desc.size == 1000 * 128 * 2 * 128 * 2
    assert desc.size // desc.shape[0] == 128 * 2 * 128 * 2  # block bytes
    desc.update_dim(0, 10)
    assert desc.shape == (10, 128, 2, 128)
    positional = CacheDesc(2, (4, 4), DataType.DT_FLOAT16, Placement.HOST)
    assert positional.size == 32


# ---- CacheKey -----------------------------------------------------------------------------------
def test_cache_key_forms():
    for key in (CacheKey(1, 1, 1, 1), CacheKey(cluster_id=1, req_id=1, model_id=1, prefix_id=1)):
        assert (key.cluster_id, key.req_id, key.model_id, key.prefix_id) == (1, 1, 1, 1)


def test_cache_key_requires_cluster_id():
    _param_invalid(lambda: CacheKey(req_id=1, model_id=1, prefix_id=1), match="cluster_id is required")


def test_cache_key_requires_req_id():
    _param_invalid(lambda: CacheKey(cluster_id=1, model_id=1, prefix_id=1), match="req_id is required")


def test_cache_key_unsupported_keyword():
    _param_invalid(lambda: CacheKey(cluster_id=1, req_id=1, prefix_id1=1), match="Unsupported")


def test_cache_key_negative_cluster():
    with pytest.raises(ValueError):
        CacheKey(cluster_id=-1, req_id=1, model_id=1, prefix_id=1)


def test_prompt_cluster_id_alias():
    key = CacheKey(prompt_cluster_id=1, req_id=1, model_id=1, prefix_id=1)
    assert key.cluster_id == 1 and key.prompt_cluster_id == 1
    assert CacheKey(cluster_id=5, prompt_cluster_id=6, req_id=1).cluster_id == 5


def test_cache_key_too_many_params():
    _param_invalid(lambda: CacheKey(1, 2, 3, 4, 5), match="Param num is over limit")


def test_cache_key_defaults_and_repr():
    key = CacheKey(1, 2)
    assert key.model_id == 0
    assert key.prefix_id == UINT64_MAX
    assert repr(key) == "CacheKey(cluster_id=1, req_id=2, prefix_id=18446744073709551615, model_id=0)"


def test_cache_key_value_checks():
    with pytest.raises(TypeError):
        CacheKey(1, "1")
    with pytest.raises(ValueError):
        CacheKey(1, 2**64)
    assert CacheKey(1, UINT64_MAX).req_id == UINT64_MAX


# ---- BlocksCacheKey -----------------------------------------------------------------------------
def test_blocks_key_type():
    with pytest.raises(TypeError, match="only support"):
        BlocksCacheKey("aa")
    with pytest.raises(TypeError, match="model_id"):
        BlocksCacheKey(1, "0")


def test_blocks_key_requires_cluster():
    _param_invalid(lambda: BlocksCacheKey(model_id=1), match="cluster_id is required")


def test_blocks_key_forms():
    for key in (BlocksCacheKey(1, 1), BlocksCacheKey(prompt_cluster_id=1, model_id=1)):
        assert key.cluster_id == 1 and key.model_id == 1 and key.prompt_cluster_id == 1


def test_blocks_key_count_and_no_range_check():
    _param_invalid(lambda: BlocksCacheKey(1, 2, 3))
    _param_invalid(lambda: BlocksCacheKey(1, other=3), match="Unsupported")
    assert BlocksCacheKey(-1).cluster_id == -1


def test_blocks_key_repr_uses_keyword():
    assert repr(BlocksCacheKey(prompt_cluster_id=1, model_id=3)) == "BlocksCacheKey(prompt_cluster_id=1, model_id=3)"
    assert repr(BlocksCacheKey(1)) == "BlocksCacheKey(cluster_id=1, model_id=0)"


def test_blocks_cache_key_forms():
    forms = [
        (BlocksCacheKey(7), 0),
        (BlocksCacheKey(7, 2), 2),
        (BlocksCacheKey(7, model_id=2), 2),
        (BlocksCacheKey(cluster_id=7), 0),
        (BlocksCacheKey(cluster_id=7, model_id=2), 2),
        (BlocksCacheKey(prompt_cluster_id=7, model_id=2), 2),
    ]
    for key, model_id in forms:
        assert key.cluster_id == 7
        assert key.model_id == model_id
    big = (0x0A000001 << 16) | 26000  # ip<<16|port cluster ids of the SGLang-style clients
    assert BlocksCacheKey(big, 0).cluster_id == big


# ---- CacheKeyByIdAndIndex, MemInfo --------------------------------------------------------------
def test_cache_key_by_id_and_index():
    key = CacheKeyByIdAndIndex(1, -2)
    assert (key.cluster_id, key.cache_id, key.batch_index) == (1, -2, 0)
    with pytest.raises(ValueError):
        CacheKeyByIdAndIndex(-1, 2)
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            CacheKeyByIdAndIndex(1, 2, bad)
    assert repr(CacheKeyByIdAndIndex(1, 2)) == "CacheKeyByIdAndIndex(cluster_id=1, cache_id=2, batch_index=0)"


def test_mem_info():
    with pytest.raises(TypeError):
        MemInfo(0, 1234, 10)
    info = MemInfo(Memtype.MEM_TYPE_DEVICE, 1234, 10)
    assert str(info) == "MemInfo(mem_type=Memtype.MEM_TYPE_DEVICE, addr=1234, size=10)"
    assert (info.mem_type, info.addr, info.size) == (Memtype.MEM_TYPE_DEVICE, 1234, 10)
    assert MemInfo(Memtype.MEM_TYPE_HOST, None, -1).addr is None
    with pytest.raises(TypeError):
        MemInfo(Memtype.MEM_TYPE_HOST, "1", 1)


# ---- TransferConfig / TransferWithCacheKeyConfig ------------------------------------------------
def test_transfer_config_bad_ranges():
    _param_invalid(lambda: TransferConfig(1, [1, 2], range(0, 2, 2)))
    _param_invalid(lambda: TransferConfig(1, [1, 2], range(1, 1)))
    with pytest.raises(TypeError):
        TransferConfig(1, [1, 2], [0, 1])


def test_transfer_config_value_checks():
    with pytest.raises(TypeError):
        TransferConfig(1, None)
    with pytest.raises(ValueError):
        TransferConfig(1, [-1])
    with pytest.raises(ValueError):
        TransferConfig(-1, [1])
    with pytest.raises(ValueError):
        TransferConfig(1, [1], src_batch_index=-1)


def test_transfer_config_repr_and_setters():
    cfg = TransferConfig(1, [1, 2], range(0, 1), 1)
    assert str(cfg) == ("TransferConfig(dst_cluster_id=1, dst_addrs=[1, 2], src_layer_range=range(0, 1), "
                        "src_batch_index=1)")
    assert cfg.dst_layer_range is None
    cfg.src_layer_range = None
    assert cfg.src_layer_range is None
    cfg.src_layer_range = range(0, 3)
    with pytest.raises(ValueError):
        cfg.dst_cluster_id = -1
    with pytest.raises(TypeError):
        cfg.dst_addrs = None
    _param_invalid(lambda: setattr(cfg, "src_layer_range", range(3, 2)))
    assert TransferConfig(1, (5, 6)).dst_addrs == (5, 6)


def test_twck_requires_ranges():
    with pytest.raises(TypeError):
        TransferWithCacheKeyConfig(BlocksCacheKey(1))
    with pytest.raises(TypeError):
        TransferWithCacheKeyConfig(None, range(0, 1), range(0, 1))


def test_twck_range_length_mismatch():
    _param_invalid(lambda: TransferWithCacheKeyConfig(BlocksCacheKey(1), range(0, 2), range(0, 1)))


def test_twck_blocks_requires_batch_zero():
    _param_invalid(lambda: TransferWithCacheKeyConfig(BlocksCacheKey(1), range(0, 1), range(0, 1), 1))
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(1), range(0, 1), range(0, 1))
    _param_invalid(lambda: setattr(cfg, "src_batch_index", 1))


def test_twck_rejects_cache_key():
    with pytest.raises(TypeError):
        TransferWithCacheKeyConfig(CacheKey(1, 1), range(0, 1), range(0, 1))


def test_twck_dst_cluster_id_and_repr():
    cfg = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(7, 2, 3), range(0, 1), range(5, 6), 2)
    assert cfg.dst_cluster_id == 7
    assert cfg.src_batch_index == 2
    other = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(1, 2, 3), range(0, 1), range(5, 6), 2)
    assert repr(other) == (
        "TransferWithCacheKeyConfig(cache_key=CacheKeyByIdAndIndex(cluster_id=1, cache_id=2, batch_index=3), "
        "src_layer_range=range(0, 1), dst_layer_range=range(5, 6), src_batch_index=2)"
    )
    _param_invalid(lambda: TransferWithCacheKeyConfig(BlocksCacheKey(1), range(0, 2, 2), range(0, 1)))


def test_twck_setters_accept_none():
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(1), range(0, 1), range(0, 1))
    cfg.src_layer_range = None
    cfg.dst_layer_range = None
    assert cfg.src_layer_range is None and cfg.dst_layer_range is None
    cfg.cache_key = CacheKeyByIdAndIndex(9, 1)
    assert cfg.dst_cluster_id == 9
    with pytest.raises(TypeError):
        cfg.cache_key = CacheKey(1, 1)


def test_layer_synchronizer_is_abstract():
    class Incomplete(LayerSynchronizer):
        pass

    class Complete(LayerSynchronizer):
        def synchronize_layer(self, layer_index, timeout_in_millis):
            return True

    with pytest.raises(TypeError):
        Incomplete()
    assert Complete().synchronize_layer(0, None) is True


# ---- Cache / KvCache ----------------------------------------------------------------------------
def test_cache_internal_constructor_and_repr():
    desc = CacheDesc(2, [4, 8], DataType.DT_FLOAT16)
    addrs = [0x1000, 0x2000]
    cache = Cache(1, desc, addrs, is_registered=True)
    assert cache.cache_id == 1
    assert cache.cache_desc is desc
    assert cache.tensor_addrs == addrs
    assert cache.is_blocks_cache is False
    assert repr(cache) == "Cache(cache_id = 1, device_tensor_addrs = 2, is_blocks_cache = False)"
    assert str(cache) == repr(cache)
    cache._invalidate()
    assert cache.tensor_addrs == []
    assert cache._valid is False
    with pytest.raises(ValueError):
        Cache(2**63, desc, addrs)


def test_create_cpu_cache():
    host = CacheDesc(2, [4, 8], DataType.DT_FLOAT16, Placement.HOST)
    device = CacheDesc(2, [4, 8], DataType.DT_FLOAT16, Placement.DEVICE)
    _param_invalid(lambda: Cache.create_cpu_cache(device, [1, 2]))
    _param_invalid(lambda: Cache.create_cpu_cache(host, [1]))
    with pytest.raises(TypeError):
        Cache.create_cpu_cache(host, (1, 2))
    with pytest.raises(TypeError):
        Cache.create_cpu_cache("desc", [1, 2])
    with pytest.raises(AttributeError):
        Cache.create_cpu_cache(None, [1, 2])
    cache = Cache.create_cpu_cache(host, [1, 2])
    assert cache.cache_id == -1
    assert cache.is_blocks_cache is True
    assert cache.tensor_addrs == [1, 2]
    assert cache._cache_manager is None and cache._is_registered is False
    assert host._is_blocks is False  # the caller's desc is never mutated


def test_kv_cache_legacy():
    host = CacheDesc(2, [4, 8], DataType.DT_FLOAT16, Placement.HOST)
    flat = KvCache.create_cpu_cache(host, [1, 2])
    assert flat.cache_id == -1
    assert flat.per_device_tensor_addrs == [[1, 2]]
    multi = KvCache.create_cpu_cache(host, [[1, 2], [3, 4]])
    assert multi.per_device_tensor_addrs[1] == [3, 4]
    _param_invalid(lambda: KvCache.create_cpu_cache(host, [1]))

    released = []

    class Manager:
        def deallocate_cache(self, cache):
            released.append(cache.cache_id)

    owned = KvCache(5, host, [1, 2], Manager())
    del owned
    assert released == [5]


# ---- CacheTask: one result per config, never-ran is LLM_FAILED -----------------------------------
class FakeWaiter:
    def __init__(self, results, finished=True):
        self._results = results
        self._event = threading.Event()
        if finished:
            self._event.set()
        self.timeouts = []

    def finish(self):
        self._event.set()

    def join(self, timeout_s):
        self.timeouts.append(timeout_s)
        return self._event.wait(timeout_s)

    def results(self):
        return self._results


def test_cache_task_success():
    ok = LLMStatusCode.LLM_SUCCESS
    task = CacheTask(FakeWaiter([ok, ok]), 2)
    assert task.synchronize() == ok
    assert task.get_results() == [ok, ok]


def test_cache_task_first_failure_and_never_ran_is_failed():
    task = CacheTask(FakeWaiter([PARAM_INVALID, None]), 2)
    assert task.synchronize() == PARAM_INVALID
    assert task.get_results() == [PARAM_INVALID, LLMStatusCode.LLM_FAILED]
    short = CacheTask(FakeWaiter([LLMStatusCode.LLM_SUCCESS]), 2)
    assert short.synchronize() == LLMStatusCode.LLM_FAILED


def test_cache_task_timeout():
    waiter = FakeWaiter([LLMStatusCode.LLM_SUCCESS] * 3, finished=False)
    task = CacheTask(waiter, 3)
    assert task.synchronize(0) == LLMStatusCode.LLM_TIMEOUT
    assert task.get_results(0) == [LLMStatusCode.LLM_TIMEOUT] * 3
    assert task.synchronize(10) == LLMStatusCode.LLM_TIMEOUT
    assert waiter.timeouts[-1] == pytest.approx(0.01)
    waiter.finish()
    assert task.synchronize() == LLMStatusCode.LLM_SUCCESS
    assert waiter.timeouts[-1] is None


def test_cache_task_timeout_checks():
    task = CacheTask(FakeWaiter([]), 0)
    with pytest.raises(ValueError):
        task.synchronize(-1)
    with pytest.raises(TypeError):
        task.synchronize(1.5)
    with pytest.raises(ValueError):
        task.get_results(2**32)
    assert task.get_results() == []
