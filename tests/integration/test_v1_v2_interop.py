"""V1 (LlmDataDist) and V2 (LLMDataDist, remote-cache-accessible mode) instances in two processes, linked either
way, pulling from and pushing to each other, byte for byte."""
from __future__ import annotations

import multiprocessing
import traceback

import numpy as np
import pytest
from ports import free_port as _port

from llm_datadist import (BlocksCacheKey, CacheDesc, CacheKeyByIdAndIndex, DataType, LLMClusterInfo, LLMConfig,
                          LLMDataDist, LLMException, LLMRole, Placement)
from llm_datadist.v1 import (OPTION_DEVICE_ID, OPTION_LISTEN_IP_INFO, OPTION_SYNC_CACHE_WAIT_TIME, Cache,
                             CacheDesc as V1CacheDesc, CacheIndex, CachePlacement, ClusterInfo, IpInfo,
                             KvCacheExtParam, LlmDataDist, LlmRole, LLMStatusCode)
from waiting import wait_until

S = LLMStatusCode
V1_ID, V2_ID = 41, 42
TENSORS, ROWS, ROW = 4, 6, 1024
WAIT_S = 30.0


def pattern(seed: int, tensor: int) -> np.ndarray:
    return np.random.default_rng(seed * 1000 + tensor).integers(0, 256, (ROWS, ROW), dtype=np.uint8)


# ---- the V2 process ------------------------------------------------------------------------------
class V2Peer:
    """Commands from the test, executed on a V2 instance in remote-cache-accessible mode."""

    def __init__(self) -> None:
        self.dd = None
        self.caches = {}

    def init(self, listen_port=None):
        config = LLMConfig()
        config.enable_cache_manager = True
        config.enable_remote_cache_accessible = True
        config.device_id = 0
        config.sync_kv_timeout = 5000
        if listen_port is not None:
            config.listen_ip_info = f"127.0.0.1:{listen_port}"
        self.dd = LLMDataDist(LLMRole.PROMPT, V2_ID)
        self.dd.init(config.generate_options())

    def register(self, name, seed=None, blocks=False, model_id=None):
        arrays = [pattern(seed, t) if seed is not None else np.zeros((ROWS, ROW), np.uint8) for t in range(TENSORS)]
        desc = CacheDesc(TENSORS, [ROWS, ROW], DataType.DT_UINT8, Placement.DEVICE)
        addrs = [int(a.ctypes.data) for a in arrays]
        cm = self.dd.cache_manager
        if blocks:
            key = None if model_id is None else BlocksCacheKey(V2_ID, model_id)
            cache = cm.register_blocks_cache(desc, addrs, key)
        else:
            cache = cm.register_cache(desc, addrs)
        self.caches[name] = (cache, arrays)
        return cache.cache_id

    def tensors(self, name):
        return [a.copy() for a in self.caches[name][1]]

    def link(self, port):
        info = LLMClusterInfo()
        info.remote_cluster_id = V1_ID
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info("127.0.0.1", port)
        code, codes = self.dd.link_clusters([info], 5000)
        return int(code)

    def wait_link(self, timeout=10.0):
        """Until this (server) side has registered its end of the link (it lags the client a moment)."""
        def linked() -> bool:
            try:
                self.dd._engine.links.get(V1_ID)
                return True
            except Exception:  # noqa: BLE001 - not yet
                return False

        return wait_until(linked, timeout)

    def pull_cache(self, name, cache_id, batch_index, dst_index):
        cache = self.caches[name][0]
        self.dd.cache_manager.pull_cache(CacheKeyByIdAndIndex(V1_ID, cache_id, batch_index), cache, dst_index)

    def push_cache(self, name, cache_id, batch_index, src_index):
        cache = self.caches[name][0]
        self.dd.cache_manager.push_cache(CacheKeyByIdAndIndex(V1_ID, cache_id, batch_index), cache, src_index)

    def pull_slot_into_blocks(self, name, cache_id, batch_index, dst_blocks):
        cache = self.caches[name][0]
        self.dd.cache_manager.pull_blocks(CacheKeyByIdAndIndex(V1_ID, cache_id, batch_index), cache, [], dst_blocks)

    def finalize(self):
        self.dd.finalize()


def v2_main(conn) -> None:
    peer = V2Peer()
    try:
        while conn.poll(60):
            op, args = conn.recv()
            if op == "exit":
                break
            try:
                conn.send(("ok", getattr(peer, op)(**args)))
            except LLMException as exc:
                conn.send(("llm", int(exc.status_code)))
            except Exception:  # noqa: BLE001 - report to the test
                conn.send(("error", traceback.format_exc()))
    finally:
        if peer.dd is not None:
            peer.dd.finalize()


class Remote:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=v2_main, args=(child,), daemon=True)
        self.proc.start()

    def call(self, op, **args):
        self.conn.send((op, args))
        assert self.conn.poll(WAIT_S), f"V2 process did not answer {op}"
        reply = self.conn.recv()
        assert reply[0] != "error", reply[1]
        return reply

    def ok(self, op, **args):
        reply = self.call(op, **args)
        assert reply[0] == "ok", (op, reply)
        return reply[1]

    def close(self):
        try:
            self.conn.send(("exit", {}))
        except OSError:
            pass
        self.proc.join(WAIT_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ---- the V1 side (this process) ------------------------------------------------------------------
class V1Side:
    def __init__(self, listen_port=None) -> None:
        self.dd = LlmDataDist(V1_ID, LlmRole.kDecoder)
        options = {OPTION_DEVICE_ID: "0", OPTION_SYNC_CACHE_WAIT_TIME: "5000"}
        if listen_port is not None:
            options[OPTION_LISTEN_IP_INFO] = f"127.0.0.1:{listen_port}"
        assert self.dd.Initialize(options) == S.LLM_SUCCESS
        self.keep = []

    def register(self, seed=None):
        arrays = [pattern(seed, t) if seed is not None else np.zeros((ROWS, ROW), np.uint8) for t in range(TENSORS)]
        self.keep.append(arrays)
        desc = V1CacheDesc(CachePlacement.kDevice, TENSORS, DataType.DT_UINT8, [ROWS, ROW])
        status, cache_id = self.dd.RegisterKvCache(desc, [int(a.ctypes.data) for a in arrays])
        assert status == S.LLM_SUCCESS
        return Cache(cache_id, [int(a.ctypes.data) for a in arrays], desc), arrays


@pytest.fixture
def v2_server():
    """A V2 process listening, and a V1 instance here that linked to it."""
    remote = Remote()
    port = _port()
    local = None
    try:
        remote.ok("init", listen_port=port)
        local = V1Side()
        info = ClusterInfo(V2_ID, 0, [IpInfo("127.0.0.1", 0)], [IpInfo("127.0.0.1", port)])
        assert local.dd.LinkLlmClusters([info], 3000) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
        assert remote.ok("wait_link")
        yield local, remote, info
    finally:
        if local is not None:
            local.dd.Finalize()
        remote.close()


@pytest.fixture
def v1_server():
    """A V1 instance here listening, and a V2 process that linked to it."""
    remote = Remote()
    port = _port()
    local = V1Side(listen_port=port)
    try:
        remote.ok("init")
        assert remote.ok("link", port=port) == S.LLM_SUCCESS
        # the server end of the link appears a moment after the client's
        assert wait_until(lambda: local.dd._dd._engine.links.has_link_to(V2_ID))
        yield local, remote
    finally:
        local.dd.Finalize()
        remote.close()


def test_v1_pulls_from_and_pushes_to_v2(v2_server):
    v1, v2, info = v2_server
    cont_id = v2.ok("register", name="cont", seed=1)
    blocks_id = v2.ok("register", name="blocks", seed=2, blocks=True, model_id=0)
    dst, darr = v1.register()
    # PullKvCache: V2 slot 4 -> V1 slot 1
    assert v1.dd.PullKvCache(CacheIndex(V2_ID, cont_id, 4), dst, 1) == S.LLM_SUCCESS
    # PullKvBlocks from the V2 blocks cache, layer 1 only (tensors 2, 3)
    ext = KvCacheExtParam((1, 1), (1, 1), 2)
    assert v1.dd.PullKvBlocks(CacheIndex(V2_ID, blocks_id), dst, [5, 0], [3, 4], ext) == S.LLM_SUCCESS
    for t in range(TENSORS):
        assert (darr[t][1] == pattern(1, t)[4]).all()
        if t in (2, 3):
            assert (darr[t][[3, 4]] == pattern(2, t)[[5, 0]]).all()
        else:
            assert not darr[t][[3, 4]].any()
        assert not darr[t][[0, 2, 5]].any()
    # PushKvCache / PushKvBlocks into V2 caches
    src, sarr = v1.register(seed=3)
    assert v1.dd.PushKvCache(src, CacheIndex(V2_ID, cont_id, 0), 5) == S.LLM_SUCCESS
    assert v1.dd.PushKvBlocks(src, CacheIndex(V2_ID, blocks_id, 0), [1, 2], [2, 1]) == S.LLM_SUCCESS
    cont, blocks = v2.ok("tensors", name="cont"), v2.ok("tensors", name="blocks")
    for t in range(TENSORS):
        assert (cont[t][0] == sarr[t][5]).all() and (cont[t][1:] == pattern(1, t)[1:]).all()
        assert (blocks[t][[2, 1]] == sarr[t][[1, 2]]).all()
        assert (blocks[t][[0, 3, 4, 5]] == pattern(2, t)[[0, 3, 4, 5]]).all()
    # status paths across the link
    assert v1.dd.PullKvCache(CacheIndex(V2_ID, 999, 0), dst) == S.LLM_KV_CACHE_NOT_EXIST
    assert v1.dd.PullKvCache(CacheIndex(V2_ID, cont_id, ROWS), dst) == S.LLM_KV_CACHE_NOT_EXIST
    assert v1.dd.PushKvBlocks(src, CacheIndex(V2_ID, blocks_id, 0), [0], [ROWS]) == S.LLM_PARAM_INVALID


def test_v2_pulls_from_and_pushes_to_v1_over_the_same_link(v2_server):
    v1, v2, info = v2_server
    src, sarr = v1.register(seed=4)
    cache_id = v2.ok("register", name="mine")
    blocks_id = v2.ok("register", name="blk", blocks=True)
    assert blocks_id > 0
    v2.ok("pull_cache", name="mine", cache_id=src.cache_id, batch_index=2, dst_index=0)
    v2.ok("pull_slot_into_blocks", name="blk", cache_id=src.cache_id, batch_index=3, dst_blocks=[4])
    mine, blk = v2.ok("tensors", name="mine"), v2.ok("tensors", name="blk")
    for t in range(TENSORS):
        assert (mine[t][0] == sarr[t][2]).all() and not mine[t][1:].any()
        assert (blk[t][4] == sarr[t][3][:ROW]).all()
    dst, darr = v1.register()
    v2.ok("register", name="seeded", seed=5)
    v2.ok("push_cache", name="seeded", cache_id=dst.cache_id, batch_index=3, src_index=1)
    for t in range(TENSORS):
        assert (darr[t][3] == pattern(5, t)[1]).all() and not darr[t][[0, 1, 2, 4, 5]].any()
    assert v2.call("pull_cache", name="mine", cache_id=999, batch_index=0, dst_index=0) == \
        ("llm", S.LLM_KV_CACHE_NOT_EXIST)
    assert cache_id > 0
    # a V1 unlink tears down both ends
    assert v1.dd.UnlinkLlmClusters([info], 3000) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
    assert wait_until(lambda: v2.call("pull_cache", name="mine", cache_id=src.cache_id, batch_index=0,
                                      dst_index=0)[0] != "ok"), "the V2 side still has the link"
    assert v2.call("pull_cache", name="mine", cache_id=src.cache_id, batch_index=0, dst_index=0) == \
        ("llm", S.LLM_NOT_YET_LINK)


def test_v2_links_to_a_listening_v1(v1_server):
    v1, v2 = v1_server
    src, sarr = v1.register(seed=6)
    v2.ok("register", name="mine")
    v2.ok("pull_cache", name="mine", cache_id=src.cache_id, batch_index=5, dst_index=2)
    mine = v2.ok("tensors", name="mine")
    assert all((mine[t][2] == sarr[t][5]).all() for t in range(TENSORS))
    # the V1 server pulls from and pushes to its client without any call on the client
    theirs = v2.ok("register", name="theirs", seed=7)
    dst, darr = v1.register()
    assert v1.dd.PullKvCache(CacheIndex(V2_ID, theirs, 0), dst, 5) == S.LLM_SUCCESS
    assert v1.dd.PushKvCache(src, CacheIndex(V2_ID, theirs, 1), 0) == S.LLM_SUCCESS
    theirs_now = v2.ok("tensors", name="theirs")
    for t in range(TENSORS):
        assert (darr[t][5] == pattern(7, t)[0]).all()
        assert (theirs_now[t][1] == sarr[t][0]).all()
    assert v1.dd.SetRole(LlmRole.kPrompt) == S.LLM_EXIST_LINK
