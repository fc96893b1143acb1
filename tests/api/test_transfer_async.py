"""CacheManager.transfer_cache_async: checks, results per config, layer mapping and access to peer memory."""
from __future__ import annotations

import threading
import time
from typing import List, Optional

import numpy as np
import pytest
from ports import free_port as _port

from llm_datadist import (BlocksCacheKey, CacheDesc, CacheKeyByIdAndIndex, CacheTask, DataType, LayerSynchronizer,
                          LLMClusterInfo, LLMConfig, LLMDataDist, LLMException, LLMRole, LLMStatusCode, Placement,
                          TransferConfig, TransferWithCacheKeyConfig)
from llm_datadist._engine.engine import TASK_WORKERS
from waiting import NEVER_HANGS_S, wait_until

S = LLMStatusCode
P_CLUSTER, D_CLUSTER = 11, 12
SLOT = 64  # bytes of one batch slot / block of every test tensor


# ---- fixtures (own ones: this file does not depend on tests/conftest.py) -------------------------
class Side:
    """One instance and the numpy arrays behind its caches (kept alive until the instance is finalized)."""

    def __init__(self, dd: LLMDataDist, push_target: bool = False) -> None:
        self.dd = dd
        self.cm = dd.cache_manager
        self.keep: List[np.ndarray] = []
        self.push_target = push_target  # normal mode: destinations say remote_accessible=True to accept writes

    def cache(self, num_tensors: int = 8, dim0: int = 4, fill: Optional[int] = None, blocks: bool = False,
              placement: Placement = Placement.DEVICE, model_id: Optional[int] = None,
              remote_accessible: Optional[bool] = None, arrays: Optional[List[np.ndarray]] = None):
        if arrays is not None:
            num_tensors, dim0 = len(arrays), arrays[0].shape[0]
        elif fill is None:
            arrays = [np.random.default_rng(100 + t).integers(1, 255, (dim0, SLOT), dtype=np.uint8)
                      for t in range(num_tensors)]
        else:
            arrays = [np.full((dim0, SLOT), fill, dtype=np.uint8) for _ in range(num_tensors)]
        self.keep.extend(arrays)
        desc = CacheDesc(num_tensors, [dim0, SLOT], DataType.DT_UINT8, placement)
        addrs = [int(a.ctypes.data) for a in arrays]
        if remote_accessible is None and self.push_target:
            remote_accessible = True
        if blocks:
            key = None if model_id is None else BlocksCacheKey(self.dd.cluster_id, model_id)
            cache = self.cm.register_blocks_cache(desc, addrs, key, remote_accessible)
        else:
            cache = self.cm.register_cache(desc, addrs, (), remote_accessible)
        return cache, arrays


def _make_pair(ra: bool):
    port = _port()
    made = []
    for role, cluster, listen in ((LLMRole.PROMPT, P_CLUSTER, True), (LLMRole.DECODER, D_CLUSTER, False)):
        config = LLMConfig()
        config.enable_cache_manager = True
        config.device_id = 0
        config.sync_kv_timeout = 3000
        if ra:
            config.enable_remote_cache_accessible = True
        if listen:
            config.listen_ip_info = f"127.0.0.1:{port}"
        dd = LLMDataDist(role, cluster)
        dd.init(config.generate_options())
        made.append(dd)
    p, d = made
    info = LLMClusterInfo()
    info.remote_cluster_id = P_CLUSTER
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info("127.0.0.1", port)
    assert d.link_clusters([info], 3000) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
    assert wait_until(lambda: p._engine.links.has_link_to(D_CLUSTER))  # the server side's end comes a moment later
    return Side(p), Side(d, push_target=not ra)


def _shared(ra: bool):
    p, d = _make_pair(ra)
    yield p, d
    d.dd.finalize()
    p.dd.finalize()


def _clean(sides):
    yield sides
    for side in sides:
        if side.dd._engine is not None:
            for entry in side.dd._engine.registry.entries():
                side.cm.unregister_cache(entry.cache_id)
        side.keep.clear()


@pytest.fixture(scope="module")
def _pair_module():
    yield from _shared(ra=False)


@pytest.fixture(scope="module")
def _ra_pair_module():
    yield from _shared(ra=True)


@pytest.fixture
def pair(_pair_module):
    """Normal mode (TransferConfig): P (source) and D (destination), linked; caches dropped after each test."""
    yield from _clean(_pair_module)


@pytest.fixture
def ra_pair(_ra_pair_module):
    """Remote-cache-accessible mode (TransferWithCacheKeyConfig)."""
    yield from _clean(_ra_pair_module)


class Recorder(LayerSynchronizer):
    """Records every call; ``fail_at`` returns False there, ``raise_at`` raises, ``gates`` block until set."""

    def __init__(self, fail_at=None, raise_at=None, gates=None) -> None:
        self.calls: List[tuple] = []
        self.fail_at, self.raise_at, self.gates = fail_at, raise_at, gates or {}

    def synchronize_layer(self, layer_index, timeout_in_millis):
        self.calls.append((layer_index, timeout_in_millis))
        gate = self.gates.get(layer_index)
        if gate is not None:
            assert gate.wait(20), "test gate never opened"
        if layer_index == self.raise_at:
            raise RuntimeError("model failed")
        return layer_index != self.fail_at


def _addrs(arrays, layers, batch=0):
    """dst_addrs for TransferConfig: K, V of each layer, pre-offset to ``batch``."""
    return [int(arrays[t].ctypes.data) + batch * SLOT for layer in layers for t in (2 * layer, 2 * layer + 1)]


def _param_invalid(fn, match=None):
    with pytest.raises(LLMException, match=match) as info:
        fn()
    assert info.value.status_code == S.LLM_PARAM_INVALID


def _run(task: CacheTask):
    assert task.synchronize(20000) != S.LLM_TIMEOUT
    return task.get_results(20000)


# ---- synchronous checks, in the official order ---------------------------------------------------
def test_type_errors_for_cache_and_synchronizer(pair):
    p, d = pair
    src, _ = p.cache()
    cfgs = [TransferConfig(D_CLUSTER, [1] * 8)]
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(None, None, cfgs)
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async("cache", None, cfgs)
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(src, None, cfgs)
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(src, object(), cfgs)


def test_host_source_rejected_before_synchronizer_check(pair):
    p, _ = pair
    src, _ = p.cache(placement=Placement.HOST, remote_accessible=True)
    _param_invalid(lambda: p.cm.transfer_cache_async(src, None, [TransferConfig(D_CLUSTER, [1] * 8)]))


def test_block_argument_types(pair):
    p, _ = pair
    src, _ = p.cache()
    sync, cfgs = Recorder(), [TransferConfig(D_CLUSTER, [1] * 8)]
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(src, sync, cfgs, dst_block_indices="12")
    with pytest.raises(ValueError):
        p.cm.transfer_cache_async(src, sync, cfgs, dst_block_indices=[-1])
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(src, sync, cfgs, src_block_indices=[1.0], dst_block_indices=[1])
    with pytest.raises(ValueError):
        p.cm.transfer_cache_async(src, sync, cfgs, dst_block_indices=[1], dst_block_memory_size=-1)
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(src, sync, cfgs, dst_block_indices=[1], dst_block_memory_size="64")
    # the block arguments are checked before the synchronizer: the bad indices win over its absence
    with pytest.raises(ValueError):
        p.cm.transfer_cache_async(src, None, cfgs, dst_block_indices=[-1])


def test_blocks_source_needs_equal_dst_blocks(pair):
    p, _ = pair
    src, _ = p.cache(blocks=True)
    sync, cfgs = Recorder(), [TransferConfig(D_CLUSTER, [1] * 8)]
    _param_invalid(lambda: p.cm.transfer_cache_async(src, sync, cfgs, src_block_indices=[0, 1]),
                   match="blocks to cache")
    _param_invalid(lambda: p.cm.transfer_cache_async(src, sync, cfgs, src_block_indices=[0, 1],
                                                     dst_block_indices=[0]))
    # so is their combination (the synchronizer is None here)
    _param_invalid(lambda: p.cm.transfer_cache_async(src, None, cfgs, src_block_indices=[0]))


def test_dst_block_memory_size_rules(pair):
    p, _ = pair
    src, _ = p.cache()
    sync, cfgs = Recorder(), [TransferConfig(D_CLUSTER, [1] * 8)]
    _param_invalid(lambda: p.cm.transfer_cache_async(src, sync, cfgs, dst_block_indices=[0, 1]))
    _param_invalid(lambda: p.cm.transfer_cache_async(src, sync, cfgs, dst_block_memory_size=16),
                   match="dst_block_memory_size")
    # 0 without blocks is accepted (the task then fails on its destination addresses, not synchronously)
    task = p.cm.transfer_cache_async(src, sync, cfgs, dst_block_memory_size=0)
    assert _run(task) == [S.LLM_PARAM_INVALID]


def test_config_class_depends_on_mode(pair, ra_pair):
    p, _ = pair
    src, _ = p.cache()
    key_cfg = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(D_CLUSTER, 1), range(0, 1), range(0, 1))
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(src, Recorder(), [key_cfg])
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(src, Recorder(), None)
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(src, Recorder(), TransferConfig(D_CLUSTER, [1] * 8))
    rp, _ = ra_pair
    rsrc, _ = rp.cache()
    with pytest.raises(TypeError, match="While enable_remote_cache_accessible is True"):
        rp.cm.transfer_cache_async(rsrc, Recorder(), [TransferConfig(D_CLUSTER, [1] * 8)])


def test_config_types_and_block_size_are_checked_before_the_tensor_count(pair):
    p, _ = pair
    odd, _ = p.cache(num_tensors=3)
    with pytest.raises(TypeError):
        p.cm.transfer_cache_async(odd, Recorder(), ["not a config"])
    _param_invalid(lambda: p.cm.transfer_cache_async(odd, Recorder(), [TransferConfig(D_CLUSTER, [1] * 2)],
                                                     dst_block_memory_size=8), match="dst_block_memory_size")


def test_odd_num_tensors(pair):
    p, _ = pair
    odd, _ = p.cache(num_tensors=3)
    _param_invalid(lambda: p.cm.transfer_cache_async(odd, Recorder(), [TransferConfig(D_CLUSTER, [1] * 2)]),
                   match="even")


def test_dst_addrs_count_and_layer_range(pair):
    p, _ = pair
    src, _ = p.cache()  # 8 tensors = 4 layers
    _param_invalid(lambda: p.cm.transfer_cache_async(src, Recorder(), [TransferConfig(D_CLUSTER, [1] * 6)]))
    _param_invalid(lambda: p.cm.transfer_cache_async(src, Recorder(),
                                                     [TransferConfig(D_CLUSTER, [1] * 2, range(0, 1)),
                                                      TransferConfig(D_CLUSTER, [1] * 10, range(0, 5))]))
    _param_invalid(lambda: p.cm.transfer_cache_async(src, Recorder(),
                                                     [TransferConfig(D_CLUSTER, [1] * 2, range(4, 5))]))


def test_blocks_source_needs_batch_index_0(pair):
    p, _ = pair
    src, _ = p.cache(blocks=True)
    cfg = TransferConfig(D_CLUSTER, [1] * 8, None, 1)
    _param_invalid(lambda: p.cm.transfer_cache_async(src, Recorder(), [cfg], [0], [0]))


def test_src_block_indices_need_a_blocks_source(pair):
    p, _ = pair
    cont, _ = p.cache()
    cfg = TransferConfig(D_CLUSTER, [1] * 8)
    _param_invalid(lambda: p.cm.transfer_cache_async(cont, Recorder(), [cfg], [0], [0]), match="blocks")


def test_blocks_source_without_indices_sends_block_0_to_raw_addresses(pair):
    """Only src_block_indices select blocks-to-blocks; without them block 0 of each tensor is one slot."""
    p, d = pair
    src, sarr = p.cache(dim0=4, blocks=True)
    _dst, darr = d.cache(dim0=2, fill=0)
    cfg = TransferConfig(D_CLUSTER, _addrs(darr, range(0, 2), batch=1), range(0, 2))
    assert _run(p.cm.transfer_cache_async(src, Recorder(), [cfg])) == [S.LLM_SUCCESS]
    for t in range(4):
        assert (darr[t][1] == sarr[t][0]).all() and not darr[t][0].any()
    assert not any(darr[t].any() for t in range(4, 8))


def test_blocks_source_without_indices_cut_into_destination_blocks(pair):
    p, d = pair
    src, sarr = p.cache(dim0=4, blocks=True)
    _dst, darr = d.cache(dim0=4, fill=0)
    cfg = TransferConfig(D_CLUSTER, _addrs(darr, range(0, 1)), range(0, 1))
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg], None, [3, 1], SLOT // 2)
    assert _run(task) == [S.LLM_SUCCESS]
    for t in range(2):
        flat = darr[t].reshape(-1)
        assert (flat[3 * SLOT // 2:4 * SLOT // 2] == sarr[t][0][:SLOT // 2]).all()
        assert (flat[SLOT // 2:SLOT] == sarr[t][0][SLOT // 2:]).all()
        assert not flat[:SLOT // 2].any() and not flat[2 * SLOT:3 * SLOT // 2].any()


def test_none_src_layer_range_filled_in_place(pair):
    p, d = pair
    src, _ = p.cache()
    _dst, darr = d.cache(fill=0)
    cfg = TransferConfig(D_CLUSTER, _addrs(darr, range(4)))
    assert cfg.src_layer_range is None
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg])
    assert cfg.src_layer_range == range(0, 4)
    assert _run(task) == [S.LLM_SUCCESS]


def test_after_finalize_raises_llm_failed():
    p, d = _make_pair(ra=False)
    src, _ = p.cache()
    cm = p.cm
    d.dd.finalize()
    p.dd.finalize()
    with pytest.raises(LLMException) as info:
        cm.transfer_cache_async(src, Recorder(), [TransferConfig(D_CLUSTER, [1] * 8)])
    assert info.value.status_code == S.LLM_FAILED


# ---- behaviour, normal mode (raw destination addresses) ------------------------------------------
def test_layers_synchronized_once_in_order_and_bytes_land(pair):
    p, d = pair
    src, sarr = p.cache()  # 4 layers
    _d1, d1 = d.cache(fill=0)
    _d2, d2 = d.cache(num_tensors=4, fill=0)
    sync = Recorder()
    cfg1 = TransferConfig(D_CLUSTER, _addrs(d1, range(0, 3), batch=2), range(0, 3), 2)
    cfg2 = TransferConfig(D_CLUSTER, _addrs(d2, range(0, 2), batch=1), range(2, 4), 2)
    task = p.cm.transfer_cache_async(src, sync, [cfg1, cfg2])
    assert isinstance(task, CacheTask)
    assert task.synchronize() == S.LLM_SUCCESS
    assert task.get_results() == [S.LLM_SUCCESS, S.LLM_SUCCESS]
    assert sync.calls == [(0, None), (1, None), (2, None), (3, None)]
    for t in range(6):  # config 1: layers 0-2 into slot 2 of d1, nothing else written
        assert (d1[t][2] == sarr[t][2]).all() and not d1[t][[0, 1, 3]].any()
    assert not d1[6].any() and not d1[7].any()
    for k in range(4):  # config 2: layer 2 -> d2 tensors 0,1; layer 3 -> d2 tensors 2,3 (slot 1)
        assert (d2[k][1] == sarr[4 + k][2]).all() and not d2[k][[0, 2, 3]].any()


def test_false_at_layer_0_stops_everything(pair):
    p, d = pair
    src, _ = p.cache()
    _dst, darr = d.cache(fill=0)
    sync = Recorder(fail_at=0)
    cfg1 = TransferConfig(D_CLUSTER, _addrs(darr, range(0, 2)), range(0, 2))
    cfg2 = TransferConfig(D_CLUSTER, _addrs(darr, range(2, 4)), range(2, 4))
    task = p.cm.transfer_cache_async(src, sync, [cfg1, cfg2])
    assert task.synchronize() == S.LLM_PARAM_INVALID
    # the config that never ran reports LLM_FAILED (not None)
    assert task.get_results() == [S.LLM_PARAM_INVALID, S.LLM_FAILED]
    assert sync.calls == [(0, None)]
    assert not any(a.any() for a in darr)


def test_false_at_a_later_layer_keeps_finished_configs(pair):
    p, d = pair
    src, sarr = p.cache()
    _dst, darr = d.cache(fill=0)
    cfg1 = TransferConfig(D_CLUSTER, _addrs(darr, range(0, 2)), range(0, 2))
    cfg2 = TransferConfig(D_CLUSTER, _addrs(darr, range(2, 4)), range(2, 4))
    task = p.cm.transfer_cache_async(src, Recorder(fail_at=2), [cfg2, cfg1])
    assert task.get_results() == [S.LLM_PARAM_INVALID, S.LLM_SUCCESS]
    assert task.synchronize() == S.LLM_PARAM_INVALID
    assert all((darr[t][0] == sarr[t][0]).all() for t in range(4))
    assert not any(darr[t].any() for t in range(4, 8))


def test_synchronizer_exception_is_recorded_not_lost(pair, caplog):
    p, d = pair
    src, _ = p.cache()
    _dst, darr = d.cache(fill=0)
    task = p.cm.transfer_cache_async(src, Recorder(raise_at=1), [TransferConfig(D_CLUSTER, _addrs(darr, range(4)))])
    assert _run(task) == [S.LLM_PARAM_INVALID]
    assert "model failed" in caplog.text


def test_timeouts_while_running_then_complete(pair):
    p, d = pair
    src, sarr = p.cache()
    _dst, darr = d.cache(fill=0)
    gate = threading.Event()
    sync = Recorder(gates={1: gate})
    cfgs = [TransferConfig(D_CLUSTER, _addrs(darr, range(4)))] * 2
    task = p.cm.transfer_cache_async(src, sync, cfgs)
    try:
        assert task.synchronize(0) == S.LLM_TIMEOUT
        assert task.get_results(0) == [S.LLM_TIMEOUT, S.LLM_TIMEOUT]
        assert task.synchronize(50) == S.LLM_TIMEOUT
    finally:
        gate.set()
    assert task.synchronize() == S.LLM_SUCCESS  # no timeout: blocks until every layer is processed
    assert task.get_results() == [S.LLM_SUCCESS, S.LLM_SUCCESS]
    assert all((darr[t][0] == sarr[t][0]).all() for t in range(8))


def test_timeout_argument_checks(pair):
    p, d = pair
    src, _ = p.cache()
    _dst, darr = d.cache(fill=0)
    task = p.cm.transfer_cache_async(src, Recorder(), [TransferConfig(D_CLUSTER, _addrs(darr, range(4)))])
    with pytest.raises(ValueError):
        task.synchronize(-1)
    with pytest.raises(TypeError):
        task.synchronize(1.5)
    with pytest.raises(ValueError):
        task.get_results(-1)
    with pytest.raises(TypeError):
        task.get_results("1")
    assert task.synchronize() == S.LLM_SUCCESS


def test_tasks_run_on_a_bounded_pool_of_daemon_threads(pair):
    """More tasks than workers queue up; every one completes; the pool never grows past its bound."""
    p, d = pair
    src, sarr = p.cache()
    gate = threading.Event()
    started, results = [], []
    for _ in range(TASK_WORKERS + 4):
        _dst, darr = d.cache(fill=0)
        started.append((p.cm.transfer_cache_async(src, Recorder(gates={0: gate}),
                                                  [TransferConfig(D_CLUSTER, _addrs(darr, range(4)))]), darr))
    workers = [t for t in threading.enumerate() if t.name.startswith(f"llm-dd-tasks-{P_CLUSTER}")]
    assert 0 < len(workers) <= TASK_WORKERS and all(t.daemon for t in workers)
    assert len(p.dd._engine.tasks.running()) == TASK_WORKERS + 4
    gate.set()
    for task, darr in started:
        results.append(task.synchronize())
        assert all((darr[t][0] == sarr[t][0]).all() and not darr[t][1:].any() for t in range(8))
    assert results == [S.LLM_SUCCESS] * (TASK_WORKERS + 4)
    assert p.dd._engine.tasks.running() == []


def test_continuous_to_blocks_with_partial_last_chunk(pair):
    p, d = pair
    src, sarr = p.cache(dim0=2)  # slot = 64 bytes
    _dst, darr = d.cache(dim0=8, blocks=True, fill=0)
    chunk = 24  # 64 bytes -> chunks of 24, 24, 16
    cfg = TransferConfig(D_CLUSTER, _addrs(darr, range(4)), None, 1)
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg], None, [5, 1, 6], chunk)
    assert _run(task) == [S.LLM_SUCCESS]
    for t in range(8):
        flat = darr[t].reshape(-1)
        assert (flat[5 * chunk:6 * chunk] == sarr[t][1][0:24]).all()
        assert (flat[1 * chunk:2 * chunk] == sarr[t][1][24:48]).all()
        assert (flat[6 * chunk:6 * chunk + 16] == sarr[t][1][48:64]).all()
        written = np.zeros(flat.size, bool)
        for b, n in ((5, 24), (1, 24), (6, 16)):
            written[b * chunk:b * chunk + n] = True
        assert not flat[~written].any()


def test_continuous_to_blocks_too_many_blocks_fails_in_worker(pair):
    p, d = pair
    src, _ = p.cache(dim0=2)
    _dst, darr = d.cache(dim0=8, blocks=True, fill=0)
    cfg = TransferConfig(D_CLUSTER, _addrs(darr, range(4)))
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg], None, [0, 1, 2], 32)  # 64 B slot = 2 chunks
    assert _run(task) == [S.LLM_PARAM_INVALID]
    assert not any(a.any() for a in darr)


def test_blocks_to_blocks_and_block_size_mismatch(pair):
    p, d = pair
    src, sarr = p.cache(dim0=6, blocks=True)
    _dst, darr = d.cache(dim0=6, blocks=True, fill=0)
    cfg = TransferConfig(D_CLUSTER, _addrs(darr, range(1, 3)), range(1, 3))
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg], [0, 1, 5], [3, 4, 0], SLOT)
    assert _run(task) == [S.LLM_SUCCESS]
    for t in range(2, 6):
        assert (darr[t][[3, 4, 0]] == sarr[t][[0, 1, 5]]).all() and not darr[t][[1, 2, 5]].any()
    for t in (0, 1, 6, 7):
        assert not darr[t].any()
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg], [0], [3], SLOT // 2)
    assert _run(task) == [S.LLM_PARAM_INVALID]


def test_normal_mode_destination_must_opt_in_to_writes(pair):
    """A cache registered with the default remote_accessible is pulled from, never written by a peer."""
    p, d = pair
    src, _ = p.cache()
    d.push_target = False
    try:
        _dst, darr = d.cache(fill=0)
    finally:
        d.push_target = True
    task = p.cm.transfer_cache_async(src, Recorder(), [TransferConfig(D_CLUSTER, _addrs(darr, range(4)))])
    assert _run(task) == [S.LLM_PARAM_INVALID]
    assert not any(a.any() for a in darr)


def test_raw_addresses_outside_accessible_caches_are_refused(pair):
    p, d = pair
    src, _ = p.cache()
    _dst, darr = d.cache(fill=0)
    _host, harr = d.cache(fill=0, placement=Placement.HOST, remote_accessible=False)
    stranger = np.zeros((4, SLOT), np.uint8)
    cases = [
        [int(stranger.ctypes.data)] + _addrs(darr, range(4))[1:],  # memory the peer never registered
        _addrs(harr, range(4)),  # a registered but not remote-accessible cache
        _addrs(darr, range(4), batch=3)[:-1] + [int(darr[7].ctypes.data) + 3 * SLOT + 1],  # one byte past the end
    ]
    for addrs in cases:
        task = p.cm.transfer_cache_async(src, Recorder(), [TransferConfig(D_CLUSTER, addrs)])
        assert _run(task) == [S.LLM_PARAM_INVALID]
    assert not stranger.any() and not any(a.any() for a in harr)


def test_table_refreshed_for_a_cache_registered_later(pair):
    p, d = pair
    src, sarr = p.cache()
    _a, aarr = d.cache(fill=0)
    late = [np.zeros((4, SLOT), np.uint8) for _ in range(8)]  # registered only while layer 1 is synchronized

    class LateSync(Recorder):
        def synchronize_layer(self, layer_index, timeout_in_millis):
            if layer_index == 1:
                d.cache(arrays=late)
            return super().synchronize_layer(layer_index, timeout_in_millis)

    cfg1 = TransferConfig(D_CLUSTER, _addrs(aarr, range(0, 1)), range(0, 1))
    cfg2 = TransferConfig(D_CLUSTER, _addrs(late, range(1, 2)), range(1, 2))
    task = p.cm.transfer_cache_async(src, LateSync(), [cfg1, cfg2])
    assert _run(task) == [S.LLM_SUCCESS, S.LLM_SUCCESS]
    assert (late[2][0] == sarr[2][0]).all() and (late[3][0] == sarr[3][0]).all()
    assert (aarr[0][0] == sarr[0][0]).all()


def test_not_linked_destination(pair):
    p, _ = pair
    src, _ = p.cache()
    task = p.cm.transfer_cache_async(src, Recorder(), [TransferConfig(99, [1] * 8)])
    assert _run(task) == [S.LLM_NOT_YET_LINK]


def test_batch_index_out_of_range_fails_in_worker(pair):
    p, d = pair
    src, _ = p.cache(dim0=2)
    _dst, darr = d.cache(fill=0)
    task = p.cm.transfer_cache_async(src, Recorder(), [TransferConfig(D_CLUSTER, _addrs(darr, range(4)), None, 2)])
    assert _run(task) == [S.LLM_PARAM_INVALID]


def test_source_unregistered_during_task(pair):
    p, d = pair
    src, _ = p.cache()
    _dst, darr = d.cache(fill=0)
    gate = threading.Event()
    task = p.cm.transfer_cache_async(src, Recorder(gates={0: gate}),
                                     [TransferConfig(D_CLUSTER, _addrs(darr, range(4)))])
    p.cm.unregister_cache(src.cache_id)
    gate.set()
    assert _run(task) == [S.LLM_KV_CACHE_NOT_EXIST]
    assert not any(a.any() for a in darr)


def test_finalize_cancels_a_running_task_and_leaves_no_thread():
    p, d = _make_pair(ra=False)
    src, _ = p.cache()
    _dst, darr = d.cache(fill=0)
    gate = threading.Event()
    sync = Recorder(gates={1: gate})
    task = p.cm.transfer_cache_async(src, sync, [TransferConfig(D_CLUSTER, _addrs(darr, range(4)))])
    assert wait_until(lambda: sync.calls and sync.calls[-1][0] == 1), "layer 1 was never synchronized"
    engine_task, cancel = task._waiter, task._waiter.cancel

    def cancel_then_release() -> None:  # the model finishes layer 1 just after finalize cancelled the task
        cancel()
        gate.set()

    engine_task.cancel = cancel_then_release
    started = time.monotonic()
    workers = [t for t in threading.enumerate() if t.name.startswith(p.dd._engine.executor.name)]
    assert workers
    p.dd.finalize()
    assert gate.is_set() and time.monotonic() - started < NEVER_HANGS_S
    assert task.synchronize(10000) == S.LLM_FAILED
    assert task.get_results() == [S.LLM_FAILED]
    assert sync.calls == [(0, None), (1, None)]  # no layer after the cancellation
    d.dd.finalize()
    for worker in workers:
        worker.join(5)
        assert not worker.is_alive()


# ---- behaviour, remote-cache-accessible mode (TransferWithCacheKeyConfig) ------------------------
def test_blocks_keys_and_id_keys_to_blocks_caches(ra_pair):
    p, d = ra_pair
    src, sarr = p.cache(dim0=4, blocks=True)
    dst, darr = d.cache(dim0=4, blocks=True, model_id=7, fill=0)
    cfgs = [TransferWithCacheKeyConfig(BlocksCacheKey(D_CLUSTER, 7), range(0, 1), range(0, 1)),
            TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(D_CLUSTER, dst.cache_id), range(1, 2), range(1, 2))]
    task = p.cm.transfer_cache_async(src, Recorder(), cfgs, [0, 2], [3, 1])
    assert task.synchronize() == S.LLM_SUCCESS
    assert task.get_results() == [S.LLM_SUCCESS, S.LLM_SUCCESS]
    for t in range(4):
        assert (darr[t][[3, 1]] == sarr[t][[0, 2]]).all() and not darr[t][[0, 2]].any()
    assert not any(darr[t].any() for t in range(4, 8))


def test_official_sample_blocks_cache_to_blocks_key_without_indices(ra_pair):
    """The official transfer_cache_async sample: a 2-tensor blocks cache, BlocksCacheKey, no block indices."""
    p, d = ra_pair
    src, sarr = p.cache(num_tensors=2, dim0=4, blocks=True)
    dst, darr = d.cache(num_tensors=2, dim0=4, blocks=True, model_id=0, fill=0)
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(D_CLUSTER, 0), range(0, 1), range(0, 1))
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg])
    assert task.synchronize() == S.LLM_SUCCESS
    assert task.get_results() == [S.LLM_SUCCESS]
    for t in range(2):
        assert (darr[t][0] == sarr[t][0]).all() and not darr[t][1:].any()


def test_blocks_source_to_id_key_slot(ra_pair):
    p, d = ra_pair
    src, sarr = p.cache(num_tensors=4, dim0=4, blocks=True)
    dst, darr = d.cache(num_tensors=4, dim0=3, fill=0)
    cfg = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(D_CLUSTER, dst.cache_id, 2), range(0, 2), range(0, 2))
    assert _run(p.cm.transfer_cache_async(src, Recorder(), [cfg])) == [S.LLM_SUCCESS]
    for t in range(4):
        assert (darr[t][2] == sarr[t][0]).all() and not darr[t][:2].any()


def test_intended_layer_mapping_with_shifted_ranges(ra_pair):
    p, d = ra_pair
    src, sarr = p.cache(num_tensors=8, dim0=2)  # 4 layers
    dst, darr = d.cache(num_tensors=4, dim0=3, fill=0)  # 2 layers, 3 slots
    cfg = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(D_CLUSTER, dst.cache_id, 2), range(2, 4), range(0, 2), 1)
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg])
    assert _run(task) == [S.LLM_SUCCESS]
    for k in range(4):  # src layer 2 -> dst layer 0, src layer 3 -> dst layer 1
        assert (darr[k][2] == sarr[4 + k][1]).all() and not darr[k][:2].any()


def test_key_mode_continuous_to_blocks(ra_pair):
    p, d = ra_pair
    src, sarr = p.cache(num_tensors=2, dim0=1)  # one slot of 64 bytes
    dst = d.cache(num_tensors=2, dim0=4, blocks=True, model_id=1, fill=0)[1]
    _bigger, _ = d.cache(num_tensors=2, dim0=2, blocks=True, model_id=2, fill=0)
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(D_CLUSTER, 1), range(0, 1), range(0, 1))
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg], None, [2], SLOT)
    assert _run(task) == [S.LLM_SUCCESS]
    assert (dst[0][2] == sarr[0][0]).all() and (dst[1][2] == sarr[1][0]).all()
    bad = TransferWithCacheKeyConfig(BlocksCacheKey(D_CLUSTER, 1), range(0, 1), range(0, 1))
    task = p.cm.transfer_cache_async(src, Recorder(), [bad], None, [2], SLOT // 2)  # not the peer's block size
    assert _run(task) == [S.LLM_PARAM_INVALID]


def test_key_mode_destination_checks(ra_pair):
    p, d = ra_pair
    src, _ = p.cache(num_tensors=8, dim0=2)
    cont, _ = d.cache(num_tensors=4, dim0=2, fill=0)
    _blk, _ = d.cache(num_tensors=8, dim0=2, blocks=True, model_id=3, fill=0)
    cases = [
        (CacheKeyByIdAndIndex(D_CLUSTER, cont.cache_id), range(0, 3), range(0, 3), S.LLM_PARAM_INVALID),  # dst layer
        (CacheKeyByIdAndIndex(D_CLUSTER, cont.cache_id, 2), range(0, 1), range(0, 1), S.LLM_KV_CACHE_NOT_EXIST),
        (CacheKeyByIdAndIndex(D_CLUSTER, 999), range(0, 1), range(0, 1), S.LLM_KV_CACHE_NOT_EXIST),
        (BlocksCacheKey(D_CLUSTER, 42), range(0, 1), range(0, 1), S.LLM_KV_CACHE_NOT_EXIST),
        (BlocksCacheKey(D_CLUSTER, 3), range(0, 1), range(0, 1), S.LLM_PARAM_INVALID),  # blocks dst, no indices
    ]
    for key, src_range, dst_range, expected in cases:
        cfg = TransferWithCacheKeyConfig(key, src_range, dst_range)
        task = p.cm.transfer_cache_async(src, Recorder(), [cfg])
        assert _run(task) == [expected], key
    bsrc, _ = p.cache(num_tensors=8, dim0=4, blocks=True)
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(D_CLUSTER, 3), range(0, 1), range(0, 1))
    task = p.cm.transfer_cache_async(bsrc, Recorder(), [cfg], [0], [2])  # dst block 2 >= peer num_blocks 2
    assert _run(task) == [S.LLM_PARAM_INVALID]


def test_setter_none_ranges_are_filled(ra_pair):
    p, d = ra_pair
    src, sarr = p.cache(num_tensors=4, dim0=1)
    dst, darr = d.cache(num_tensors=4, dim0=1, fill=0)
    cfg = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(D_CLUSTER, dst.cache_id), range(0, 1), range(0, 1))
    cfg.src_layer_range = None
    cfg.dst_layer_range = None
    task = p.cm.transfer_cache_async(src, Recorder(), [cfg])
    assert cfg.src_layer_range == range(0, 2)
    assert _run(task) == [S.LLM_SUCCESS]
    assert all((darr[t] == sarr[t]).all() for t in range(4))


def test_key_config_length_mismatch_via_setter(ra_pair):
    p, d = ra_pair
    src, _ = p.cache()
    cfg = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(D_CLUSTER, 1), range(0, 1), range(0, 1))
    cfg.src_layer_range = range(0, 2)
    _param_invalid(lambda: p.cm.transfer_cache_async(src, Recorder(), [cfg]), match="differ in length")


def test_key_mode_follows_a_re_registered_destination(ra_pair):
    p, d = ra_pair
    src, sarr = p.cache(num_tensors=2, dim0=2, blocks=True)
    first, farr = d.cache(num_tensors=2, dim0=2, blocks=True, model_id=7, fill=0)
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(D_CLUSTER, 7), range(0, 1), range(0, 1))
    assert _run(p.cm.transfer_cache_async(src, Recorder(), [cfg], [0], [1])) == [S.LLM_SUCCESS]
    assert (farr[0][1] == sarr[0][0]).all()
    d.cm.unregister_cache(first.cache_id)
    for array in farr:
        array[:] = 0
    _second, sec = d.cache(num_tensors=2, dim0=2, blocks=True, model_id=7, fill=0)  # a new registration after the link
    assert _run(p.cm.transfer_cache_async(src, Recorder(), [cfg], [1], [0])) == [S.LLM_SUCCESS]
    assert (sec[0][0] == sarr[0][1]).all() and (sec[1][0] == sarr[1][1]).all()
    assert not any(a.any() for a in farr)
