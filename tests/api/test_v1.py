"""The V1 LlmDataDist API in Python, every status path and byte-verified transfers between in-process instances.

Status codes are returned, never raised; C++ output parameters are extra return values; a role is only a label;
any number of instances live in one process; local copies follow the legacy semantics."""
from __future__ import annotations

import ctypes
import socket
import time

import numpy as np
import pytest
from ports import free_port as _port

from llm_datadist import (CacheDesc as V2CacheDesc, CacheKeyByIdAndIndex, DataType, LLMConfig, LLMDataDist,
                          LLMRole, Placement)
from llm_datadist import v1
from llm_datadist._engine import protocol as proto
from llm_datadist.v1 import (OPTION_BUF_POOL_CFG, OPTION_DEVICE_ID, OPTION_GLOBAL_RESOURCE_CONFIG,
                             OPTION_LISTEN_IP_INFO, OPTION_SYNC_CACHE_WAIT_TIME, OPTION_TRANSFER_BACKEND, Cache,
                             CacheDesc, CacheIndex, CachePlacement, ClusterInfo, IpInfo, KvCacheExtParam,
                             LlmDataDist, LlmRole, LLMStatusCode, RegisterCfg)
from waiting import wait_until

S = LLMStatusCode
A_ID, B_ID = 21, 22
ROW = 32  # bytes per slot / block
POOL = '{"memory_size": 65536, "page_shift": 10}'


def _desc(num_tensors=4, dim0=4, placement=CachePlacement.kDevice, dtype=DataType.DT_UINT8, row=ROW):
    return CacheDesc(placement, num_tensors, dtype, [dim0, row])


class Node:
    """A V1 instance plus the numpy memory of its registered caches."""

    def __init__(self, cluster_id: int, role=LlmRole.kPrompt, listen: bool = False, **extra) -> None:
        self.dd = LlmDataDist(cluster_id, role)
        self.port = _port() if listen else None
        options = {OPTION_DEVICE_ID: "0", OPTION_SYNC_CACHE_WAIT_TIME: "3000", OPTION_BUF_POOL_CFG: POOL}
        if listen:
            options[OPTION_LISTEN_IP_INFO] = f"127.0.0.1:{self.port}"
        options.update(extra)
        assert self.dd.Initialize(options) == S.LLM_SUCCESS
        self.keep = []

    def register(self, num_tensors=4, dim0=4, fill=None, seed=0):
        if fill is None:
            arrays = [np.random.default_rng(seed * 100 + t).integers(1, 255, (dim0, ROW), dtype=np.uint8)
                      for t in range(num_tensors)]
        else:
            arrays = [np.full((dim0, ROW), fill, np.uint8) for _ in range(num_tensors)]
        self.keep.append(arrays)
        status, cache_id = self.dd.RegisterKvCache(_desc(num_tensors, dim0), [int(a.ctypes.data) for a in arrays])
        assert status == S.LLM_SUCCESS and cache_id > 0
        return Cache(cache_id, [int(a.ctypes.data) for a in arrays], _desc(num_tensors, dim0)), arrays


def _info(cluster_id, port, local=True):
    return ClusterInfo(cluster_id, 0, [IpInfo("127.0.0.1", 0)] if local else [], [IpInfo("127.0.0.1", port)])


def _wait_server_link(node: Node, peer: int, client: Node) -> None:
    """Until the server side serves the link: a Ping from the client is answered by the server's reader."""

    def serving() -> bool:
        try:
            node.dd._dd._engine.links.get(peer)
            client.dd._dd._engine.links.get(node.dd.cluster_id).call(proto.Ping(), time.monotonic() + 2)
            return True
        except Exception:  # noqa: BLE001 - the server side may register the link a moment after the client
            return False

    assert wait_until(serving), "the server side never served the link"


def _linked_nodes():
    a, b = Node(A_ID, LlmRole.kPrompt, listen=True), Node(B_ID, LlmRole.kDecoder)
    assert b.dd.LinkLlmClusters([_info(A_ID, a.port)], 2000) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
    _wait_server_link(a, B_ID, b)
    yield a, b
    b.dd.Finalize()
    a.dd.Finalize()


@pytest.fixture(scope="module")
def _shared_nodes():
    yield from _linked_nodes()


@pytest.fixture
def nodes(_shared_nodes):
    """A (cluster 21, listening) and B (cluster 22) linked by B, both with a buffer pool (shared by the
    module; every cache is dropped after each test)."""
    yield _shared_nodes
    for node in _shared_nodes:
        engine = node.dd._dd._engine
        for entry in engine.registry.entries():
            assert node.dd.UnregisterKvCache(entry.cache_id) == S.LLM_SUCCESS
        node.keep.clear()


@pytest.fixture
def fresh_nodes():
    """A linked pair of its own, for tests that change the links."""
    yield from _linked_nodes()


@pytest.fixture
def single():
    node = Node(A_ID)
    yield node
    node.dd.Finalize()


# ---- types and constants ------------------------------------------------------------------------
def test_types_defaults_and_option_keys():
    assert (LlmRole.kPrompt, LlmRole.kDecoder, LlmRole.kMix, LlmRole.kEnd) == (1, 2, 3, 4)
    assert (CachePlacement.kHost, CachePlacement.kDevice) == (0, 1)
    desc = CacheDesc()
    assert (desc.placement, desc.num_tensors, desc.data_type, desc.shape) == (CachePlacement.kDevice, 0, None, [])
    assert Cache().cache_id == -1 and Cache().tensor_addrs == []
    assert (CacheIndex(1, 2, 3).cluster_id, CacheIndex(1, 2, 3).cache_id, CacheIndex(1, 2, 3).batch_index) == (1, 2, 3)
    assert (IpInfo().ip, IpInfo().port) == ("", 0)
    info = ClusterInfo()
    assert (info.remote_cluster_id, info.remote_role_type, info.local_ip_infos, info.remote_ip_infos) == (0, 0, [], [])
    ext = KvCacheExtParam()
    assert (ext.src_layer_range, ext.dst_layer_range, ext.tensor_num_per_layer) == ((-1, -1), (-1, -1), 2)
    RegisterCfg()
    assert v1.OPTION_LISTEN_IP_INFO == "llm.ListenIpInfo" and v1.OPTION_DEVICE_ID == "llm.DeviceId"
    assert v1.OPTION_SYNC_CACHE_WAIT_TIME == "llm.SyncKvCacheWaitTime" and v1.OPTION_BUF_POOL_CFG == "llm.BufPoolCfg"
    assert v1.OPTION_ENABLE_SET_ROLE == "llm.EnableSwitchRole" and v1.OPTION_LOCAL_COMM_RES == "llm.LocalCommRes"
    assert v1.OPTION_TRANSFER_BACKEND == "llm.TransferBackend"
    assert v1.OPTION_GLOBAL_RESOURCE_CONFIG == "llm.GlobalResourceConfig"
    assert v1.LLM_WAIT_PROC_TIMEOUT == S.LLM_WAIT_PROCESS_TIMEOUT and v1.LLM_FAILED == 0xFFFFFFFF


def test_seed_names_and_python_aliases_exist():
    for name in ("Initialize", "Finalize", "SetRole", "LinkLlmClusters", "UnlinkLlmClusters", "PullKvCache",
                 "PullKvBlocks", "PushKvCache", "PushKvBlocks", "CopyKvCache", "CopyKvBlocks", "AllocateCache",
                 "DeallocateCache", "RegisterKvCache", "UnregisterKvCache"):
        assert callable(getattr(LlmDataDist, name))
    assert LlmDataDist.pull_kv_blocks is LlmDataDist.PullKvBlocks
    assert LlmDataDist.register_kv_cache is LlmDataDist.RegisterKvCache


# ---- Initialize / Finalize (244-248) -------------------------------------------------------------
def test_initialize_twice_and_finalize_twice():
    dd = LlmDataDist(A_ID, LlmRole.kMix)
    assert dd.Initialize({OPTION_DEVICE_ID: "0"}) == S.LLM_SUCCESS
    assert dd.Initialize({OPTION_DEVICE_ID: "0"}) == S.LLM_SUCCESS
    assert dd.Finalize() is None
    assert dd.Finalize() is None
    assert dd.Initialize({OPTION_DEVICE_ID: "0;1"}) == S.LLM_SUCCESS  # re-initialize after Finalize
    dd.Finalize()


@pytest.mark.parametrize("options", [{}, {OPTION_DEVICE_ID: ""}, {OPTION_DEVICE_ID: "-1"}, {OPTION_DEVICE_ID: "a"},
                                     {OPTION_DEVICE_ID: "0;x"}, {OPTION_DEVICE_ID: 0}, "not a dict"])
def test_device_id_required_and_non_negative(options):
    dd = LlmDataDist(A_ID, LlmRole.kPrompt)
    assert dd.Initialize(options) == S.LLM_PARAM_INVALID
    assert dd.RegisterKvCache(_desc(), [1, 2, 3, 4])[0] == S.LLM_FAILED  # still not initialized


@pytest.mark.parametrize("listen", ["1.1.1.1", "300.1.1.1:26000", "abc:26000", "127.0.0.1:70000", "127.0.0.1:x",
                                    "[::1]", "::1:26000", "[1.2.3.4]:26000", ""])
def test_invalid_listen_ip_info(listen):
    dd = LlmDataDist(A_ID, LlmRole.kPrompt)
    assert dd.Initialize({OPTION_DEVICE_ID: "0", OPTION_LISTEN_IP_INFO: listen}) == S.LLM_PARAM_INVALID


def test_ipv6_listen_ip_info():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
            port = sock.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    dd = LlmDataDist(A_ID, LlmRole.kPrompt)
    assert dd.Initialize({OPTION_DEVICE_ID: "0", OPTION_LISTEN_IP_INFO: f"[::1]:{port}"}) == S.LLM_SUCCESS
    dd.Finalize()


def test_initialize_invalid_role_cluster_and_options():
    assert LlmDataDist(A_ID, LlmRole.kEnd).Initialize({OPTION_DEVICE_ID: "0"}) == S.LLM_PARAM_INVALID
    assert LlmDataDist(-1, LlmRole.kPrompt).Initialize({OPTION_DEVICE_ID: "0"}) == S.LLM_PARAM_INVALID
    bad = [{OPTION_SYNC_CACHE_WAIT_TIME: "0"}, {OPTION_SYNC_CACHE_WAIT_TIME: "abc"}, {OPTION_BUF_POOL_CFG: "{"},
           {OPTION_BUF_POOL_CFG: '{"page_shift": 12}'}]
    for extra in bad:
        assert LlmDataDist(A_ID, LlmRole.kPrompt).Initialize({OPTION_DEVICE_ID: "0", **extra}) == S.LLM_PARAM_INVALID


def test_hixl_backend_with_invalid_global_resource_config():
    listen = f"127.0.0.1:{_port()}"
    dd = LlmDataDist(A_ID, LlmRole.kPrompt)
    options = {OPTION_DEVICE_ID: "0", OPTION_LISTEN_IP_INFO: listen, OPTION_TRANSFER_BACKEND: "hixl",
               OPTION_GLOBAL_RESOURCE_CONFIG: "{not json"}
    assert dd.Initialize(options) == S.LLM_PARAM_INVALID  # an option value the caller got wrong
    options[OPTION_GLOBAL_RESOURCE_CONFIG] = "{}"
    assert dd.Initialize(options) == S.LLM_SUCCESS
    dd.Finalize()
    # a transfer backend needs a listen address (a parameter error) and must name a backend this library has
    assert LlmDataDist(A_ID, 1).Initialize({OPTION_DEVICE_ID: "0", OPTION_TRANSFER_BACKEND: "nope"}) \
        == S.LLM_PARAM_INVALID
    unknown = LlmDataDist(A_ID, 1)
    assert unknown.Initialize({OPTION_DEVICE_ID: "0", OPTION_LISTEN_IP_INFO: f"127.0.0.1:{_port()}",
                               OPTION_TRANSFER_BACKEND: "nope"}) == S.LLM_FEATURE_NOT_ENABLED
    assert unknown.SetRole(LlmRole.kDecoder, {}) == S.LLM_FAILED  # it never started


def _every_call(dd: LlmDataDist, cache: Cache):
    index, ext = CacheIndex(B_ID, 1, 0), KvCacheExtParam()
    return {
        "SetRole": dd.SetRole(LlmRole.kDecoder, {}),
        "LinkLlmClusters": dd.LinkLlmClusters([_info(B_ID, 1)], 1000),
        "UnlinkLlmClusters": dd.UnlinkLlmClusters([_info(B_ID, 1)], 1000, False),
        "PullKvCache": dd.PullKvCache(index, cache, 0, -1, ext),
        "PullKvBlocks": dd.PullKvBlocks(index, cache, [0], [0], ext),
        "PushKvCache": dd.PushKvCache(cache, index, 0, -1, ext),
        "PushKvBlocks": dd.PushKvBlocks(cache, index, [0], [0], ext),
        "CopyKvCache": dd.CopyKvCache(cache, cache, 0, 1, 0, -1),
        "CopyKvBlocks": dd.CopyKvBlocks(cache, cache, [0], [[1]]),
        "AllocateCache": dd.AllocateCache(_desc()),
        "DeallocateCache": dd.DeallocateCache(1),
        "RegisterKvCache": dd.RegisterKvCache(_desc(), [1, 2, 3, 4], RegisterCfg()),
        "UnregisterKvCache": dd.UnregisterKvCache(1),
    }


def test_every_api_fails_before_initialize_and_after_finalize():
    dd = LlmDataDist(A_ID, LlmRole.kPrompt)
    expected = {name: S.LLM_FAILED for name in _every_call(dd, Cache(1))}
    expected.update({"LinkLlmClusters": (S.LLM_FAILED, []), "UnlinkLlmClusters": (S.LLM_FAILED, []),
                     "AllocateCache": (S.LLM_FAILED, None), "RegisterKvCache": (S.LLM_FAILED, -1)})
    assert _every_call(dd, Cache(1)) == expected
    assert dd.Initialize({OPTION_DEVICE_ID: "0"}) == S.LLM_SUCCESS
    dd.Finalize()
    assert _every_call(dd, Cache(1)) == expected


def test_garbage_arguments_return_codes_and_never_raise(single):
    dd = single.dd
    for call in (lambda: dd.PullKvCache("x", "y"), lambda: dd.PullKvBlocks(None, None, None, None),
                 lambda: dd.PushKvCache(1, 2), lambda: dd.PushKvBlocks(Cache(), CacheIndex(), "a", "b"),
                 lambda: dd.CopyKvCache(None, None), lambda: dd.CopyKvBlocks(Cache(), Cache(), [1], "x"),
                 lambda: dd.SetRole("Prompt"), lambda: dd.DeallocateCache("1"), lambda: dd.UnregisterKvCache(1.5),
                 lambda: dd.PullKvCache(CacheIndex(B_ID, 1), Cache(1), -1),
                 lambda: dd.PullKvCache(CacheIndex(B_ID, 1), Cache(1), 0, -1, KvCacheExtParam((0,), (0, 1), 2))):
        assert call() == S.LLM_PARAM_INVALID
    assert dd.LinkLlmClusters("x") == (S.LLM_PARAM_INVALID, [])
    assert dd.AllocateCache(None) == (S.LLM_PARAM_INVALID, None)
    assert dd.RegisterKvCache(None, [1]) == (S.LLM_PARAM_INVALID, -1)


def test_unexpected_internal_exception_becomes_llm_failed(single, monkeypatch):
    engine = single.dd._dd._engine

    def boom(*_args, **_kwargs):
        raise RuntimeError("internal bug")

    monkeypatch.setattr(engine, "unregister", boom)
    assert single.dd.UnregisterKvCache(3) == S.LLM_FAILED


# ---- RegisterKvCache / UnregisterKvCache (249-250) -----------------------------------------------
def test_register_checks_and_positive_ids(single):
    dd = single.dd
    arrays = [np.zeros((4, ROW), np.uint8) for _ in range(4)]
    addrs = [int(a.ctypes.data) for a in arrays]
    assert dd.RegisterKvCache(_desc(), []) == (S.LLM_PARAM_INVALID, -1)
    assert dd.RegisterKvCache(_desc(), addrs[:3]) == (S.LLM_PARAM_INVALID, -1)
    assert dd.RegisterKvCache(_desc(), addrs[:3] + [0]) == (S.LLM_PARAM_INVALID, -1)
    assert dd.RegisterKvCache(CacheDesc(CachePlacement.kDevice, 4, DataType.DT_UINT8, []), addrs)[0] == \
        S.LLM_PARAM_INVALID
    assert dd.RegisterKvCache(CacheDesc(CachePlacement.kDevice, 4, DataType.DT_UINT8, [0, ROW]), addrs)[0] == \
        S.LLM_PARAM_INVALID
    assert dd.RegisterKvCache(CacheDesc(CachePlacement.kDevice, 4, None, [4, ROW]), addrs)[0] == S.LLM_PARAM_INVALID
    assert dd.RegisterKvCache(CacheDesc(7, 4, DataType.DT_UINT8, [4, ROW]), addrs)[0] == S.LLM_PARAM_INVALID
    assert dd.RegisterKvCache(_desc(), [8, 16, 24, 32])[0] == S.LLM_PARAM_INVALID  # unmapped memory
    status, first = dd.RegisterKvCache(_desc(), addrs, RegisterCfg())
    status2, second = dd.RegisterKvCache(_desc(placement=CachePlacement.kHost), addrs)
    assert (status, status2) == (S.LLM_SUCCESS, S.LLM_SUCCESS) and 0 < first < second
    assert dd.UnregisterKvCache(first) == S.LLM_SUCCESS
    assert dd.UnregisterKvCache(second) == S.LLM_SUCCESS


def test_unregister_unknown_id_is_success(single):
    assert single.dd.UnregisterKvCache(0) == S.LLM_SUCCESS
    assert single.dd.UnregisterKvCache(12345) == S.LLM_SUCCESS


# ---- links (251, 252, 262, 263) ------------------------------------------------------------------
def test_link_argument_checks(single):
    dd = single.dd
    good = _info(B_ID, _port())
    assert dd.LinkLlmClusters([good], 0) == (S.LLM_PARAM_INVALID, [])
    assert dd.LinkLlmClusters([good], -5) == (S.LLM_PARAM_INVALID, [])
    assert dd.LinkLlmClusters([], 1000) == (S.LLM_PARAM_INVALID, [])
    for ip in ("", "1.2.3", "300.1.1.1", "::1", "host"):
        bad = ClusterInfo(B_ID, 0, [IpInfo("127.0.0.1", 0)], [IpInfo(ip, 26000)])
        assert dd.LinkLlmClusters([bad], 1000) == (S.LLM_PARAM_INVALID, [])
    bad_local = ClusterInfo(B_ID, 0, [IpInfo("nope", 0)], [IpInfo("127.0.0.1", 1)])
    assert dd.LinkLlmClusters([bad_local], 1000) == (S.LLM_PARAM_INVALID, [])
    two_remotes = ClusterInfo(B_ID, 0, [], [IpInfo("127.0.0.1", 1), IpInfo("127.0.0.1", 2)])
    assert dd.LinkLlmClusters([two_remotes], 1000) == (S.LLM_PARAM_INVALID, [S.LLM_PARAM_INVALID])
    assert dd.UnlinkLlmClusters([good], 0) == (S.LLM_PARAM_INVALID, [])
    assert dd.UnlinkLlmClusters([], 1000) == (S.LLM_PARAM_INVALID, [])


def test_link_failures_are_returned_per_cluster(single):
    closed_port = _port()
    status, rets = single.dd.LinkLlmClusters([_info(B_ID, closed_port)], 500)
    assert status == S.LLM_LINK_FAILED and rets == [S.LLM_LINK_FAILED]
    assert single.dd.UnlinkLlmClusters([_info(B_ID, closed_port)], 500) == (S.LLM_NOT_YET_LINK,
                                                                             [S.LLM_NOT_YET_LINK])


def test_relink_returns_already_link_and_wrong_cluster_id(fresh_nodes):
    a, b = fresh_nodes
    status, rets = b.dd.LinkLlmClusters([_info(A_ID, a.port)], 1000)
    assert status == S.LLM_ALREADY_LINK and rets == [S.LLM_ALREADY_LINK]
    wrong_id = b.dd.LinkLlmClusters([_info(A_ID + 100, a.port, local=False)], 1000)
    assert wrong_id == (S.LLM_LINK_FAILED, [S.LLM_LINK_FAILED])


def test_set_role_with_links_is_exist_link_then_unlink(fresh_nodes):
    a, b = fresh_nodes
    dst, _ = b.register(fill=0)
    assert b.dd.SetRole(LlmRole.kPrompt, {}) == S.LLM_EXIST_LINK
    assert a.dd.SetRole(LlmRole.kDecoder) == S.LLM_EXIST_LINK  # the server side holds the link too
    assert b.dd.UnlinkLlmClusters([_info(A_ID, a.port)], 1000) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
    assert wait_until(lambda: a.dd.SetRole(LlmRole.kMix, {OPTION_LISTEN_IP_INFO: f"127.0.0.1:{a.port}"})
                      == S.LLM_SUCCESS)  # once the server side has dropped its end of the link
    assert b.dd.SetRole(LlmRole.kPrompt, {}) == S.LLM_SUCCESS
    assert b.dd.PullKvCache(CacheIndex(A_ID, 1, 0), dst) == S.LLM_NOT_YET_LINK


def test_forced_unlink_is_local_and_the_peer_unlinks_itself(fresh_nodes):
    a, b = fresh_nodes
    assert b.dd.UnlinkLlmClusters([_info(A_ID, a.port)], 1000, True) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
    assert a.dd.UnlinkLlmClusters([ClusterInfo(B_ID)], 1000, True) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
    assert a.dd.UnlinkLlmClusters([ClusterInfo(B_ID)], 1000, True) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
    assert b.dd.LinkLlmClusters([_info(A_ID, a.port)], 2000) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])


def test_set_role_sequence_without_links(single):
    dd = single.dd
    port = _port()
    assert dd.SetRole(LlmRole.kDecoder, {}) == S.LLM_SUCCESS
    assert dd.SetRole(LlmRole.kPrompt, {OPTION_LISTEN_IP_INFO: f"127.0.0.1:{port}"}) == S.LLM_SUCCESS
    assert dd.SetRole(LlmRole.kDecoder, {OPTION_LISTEN_IP_INFO: f"127.0.0.1:{port}"}) == S.LLM_SUCCESS
    assert dd.SetRole(LlmRole.kMix, {}) == S.LLM_SUCCESS
    assert dd.SetRole(LlmRole.kPrompt) == S.LLM_SUCCESS
    assert dd.role == LlmRole.kPrompt
    assert dd.SetRole(LlmRole.kEnd) == S.LLM_PARAM_INVALID
    assert dd.SetRole(LlmRole.kPrompt, {OPTION_LISTEN_IP_INFO: "127.0.0.1"}) == S.LLM_PARAM_INVALID


def test_set_role_listen_moves_the_server(single):
    other = Node(B_ID)
    try:
        port = _port()
        assert single.dd.SetRole(LlmRole.kPrompt, {OPTION_LISTEN_IP_INFO: f"127.0.0.1:{port}"}) == S.LLM_SUCCESS
        assert other.dd.LinkLlmClusters([_info(A_ID, port)], 2000) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
    finally:
        other.dd.Finalize()


# ---- pulls (253-256) ----------------------------------------------------------------------------
def test_pull_kv_cache_bytes_and_size(nodes):
    a, b = nodes
    src, sarr = a.register(seed=1)
    dst, darr = b.register(fill=0)
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 2), dst, 1) == S.LLM_SUCCESS
    for t in range(4):
        assert (darr[t][1] == sarr[t][2]).all() and not darr[t][[0, 2, 3]].any()
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 3), dst, 0, 8) == S.LLM_SUCCESS
    assert (darr[0][0][:8] == sarr[0][3][:8]).all() and not darr[0][0][8:].any()
    # the server pulls from the client over the same link (symmetric link)
    assert a.dd.PullKvCache(CacheIndex(B_ID, dst.cache_id, 1), src, 0) == S.LLM_SUCCESS
    assert (sarr[3][0] == sarr[3][2]).all()


def test_pull_size_checks(nodes):
    a, b = nodes
    src, _ = a.register()
    dst, _ = b.register(fill=0)
    for size in (0, -2):
        assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 0), dst, 0, size) == S.LLM_PARAM_INVALID
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 0), dst, 0, ROW + 1) == S.LLM_PARAM_INVALID


def test_pull_status_paths(nodes):
    a, b = nodes
    src, _ = a.register()
    dst, _ = b.register(fill=0)
    assert b.dd.PullKvCache(CacheIndex(A_ID, 999, 0), dst) == S.LLM_KV_CACHE_NOT_EXIST
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 4), dst) == S.LLM_KV_CACHE_NOT_EXIST
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 0), Cache(999)) == S.LLM_KV_CACHE_NOT_EXIST
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 0), dst, 4) == S.LLM_PARAM_INVALID
    assert b.dd.PullKvCache(CacheIndex(77, src.cache_id, 0), dst) == S.LLM_NOT_YET_LINK
    assert b.dd.PullKvCache(CacheIndex(B_ID, dst.cache_id, 0), dst) == S.LLM_PARAM_INVALID  # own cluster
    assert b.dd.PullKvBlocks(CacheIndex(77, src.cache_id), dst, [0], [0]) == S.LLM_NOT_YET_LINK
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, 999), dst, [0], [0]) == S.LLM_KV_CACHE_NOT_EXIST
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, src.cache_id), dst, [4], [0]) == S.LLM_PARAM_INVALID
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, src.cache_id), dst, [0], [4]) == S.LLM_PARAM_INVALID


@pytest.mark.parametrize("ext, ok", [
    (KvCacheExtParam(), True),
    (KvCacheExtParam((0, 1), (0, 1), 2), True),
    (KvCacheExtParam((0, 1), (0, 1), 1), True),
    (KvCacheExtParam((-2, 1), (0, 1), 2), False),
    (KvCacheExtParam((1, 0), (0, 1), 2), False),
    (KvCacheExtParam((0, 1), (0, 1), 3), False),
    (KvCacheExtParam((0, 1), (0, 1), 0), False),
    (KvCacheExtParam((0, 4), (0, 4), 2), True),
    (KvCacheExtParam((0, 5), (0, 5), 2), False),
])
def test_pull_ext_param(nodes, ext, ok):
    a, b = nodes
    src, _ = a.register(num_tensors=10)
    dst, _ = b.register(num_tensors=10, fill=0)
    expected = S.LLM_SUCCESS if ok else S.LLM_PARAM_INVALID
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 0), dst, 0, -1, ext) == expected


def test_pull_layer_ranges_are_inclusive(nodes):
    a, b = nodes
    src, sarr = a.register(num_tensors=8, seed=3)
    dst, darr = b.register(num_tensors=8, fill=0)
    ext = KvCacheExtParam((1, 2), (0, 1), 2)  # src tensors 2..5 -> dst tensors 0..3
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 1), dst, 3, -1, ext) == S.LLM_SUCCESS
    for t in range(4):
        assert (darr[t][3] == sarr[t + 2][1]).all()
    assert not any(darr[t].any() for t in range(4, 8))


def test_same_registered_cache_is_pull_kv_cache_and_pull_kv_blocks_target(nodes):
    a, b = nodes
    src, sarr = a.register(num_tensors=10, seed=4)
    dst, darr = b.register(num_tensors=10, fill=0)
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 0), dst, 0) == S.LLM_SUCCESS
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, src.cache_id, 0), dst, [0, 1], [0, 1]) == S.LLM_SUCCESS
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, src.cache_id, 0), dst, [3, 1], [2, 3],
                             KvCacheExtParam((1, 1), (2, 2), 2)) == S.LLM_SUCCESS
    for t in range(10):
        assert (darr[t][:2] == sarr[t][:2]).all()
    for k in range(2):  # layer 1 (tensors 2,3) -> layer 2 (tensors 4,5), blocks 3,1 -> 2,3
        assert (darr[4 + k][[2, 3]] == sarr[2 + k][[3, 1]]).all()
    assert not darr[0][2:].any()


def test_pull_kv_blocks_checks(nodes):
    a, b = nodes
    src, _ = a.register()
    dst, _ = b.register(fill=0)
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, src.cache_id, 1), dst, [0], [0]) == S.LLM_PARAM_INVALID
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, src.cache_id, 0), dst, [], []) == S.LLM_PARAM_INVALID
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, src.cache_id, 0), dst, [0, 1], [0]) == S.LLM_PARAM_INVALID
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, src.cache_id, 0), dst, [0], [0],
                             KvCacheExtParam((0, 0), (0, 0), 0)) == S.LLM_PARAM_INVALID


def test_unregistered_cache_is_gone_for_peers(nodes):
    a, b = nodes
    src, _ = a.register()
    dst, _ = b.register(fill=0)
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 0), dst) == S.LLM_SUCCESS
    assert a.dd.UnregisterKvCache(src.cache_id) == S.LLM_SUCCESS
    assert b.dd.PullKvCache(CacheIndex(A_ID, src.cache_id, 0), dst) == S.LLM_KV_CACHE_NOT_EXIST  # after a refresh
    later, larr = a.register(seed=9)  # registered after the link: visible at once
    assert b.dd.PullKvBlocks(CacheIndex(A_ID, later.cache_id), dst, [1], [0]) == S.LLM_SUCCESS


# ---- pushes (257-259) ---------------------------------------------------------------------------
def test_push_kv_cache_bytes(nodes):
    a, b = nodes
    src, sarr = b.register(seed=5)
    dst, darr = a.register(fill=0)
    assert b.dd.PushKvCache(src, CacheIndex(A_ID, dst.cache_id, 3), 1) == S.LLM_SUCCESS
    for t in range(4):
        assert (darr[t][3] == sarr[t][1]).all() and not darr[t][:3].any()


def test_push_kv_cache_checks(nodes):
    a, b = nodes
    src, _ = b.register()
    dst, _ = a.register(fill=0)
    index = CacheIndex(A_ID, dst.cache_id, 0)
    assert b.dd.PushKvCache(src, index, 0, 16) == S.LLM_PARAM_INVALID
    host = Cache(src.cache_id, src.tensor_addrs, _desc(placement=CachePlacement.kHost))
    assert b.dd.PushKvCache(host, index) == S.LLM_PARAM_INVALID
    assert b.dd.PushKvCache(src, index, 0, -1, KvCacheExtParam((0, 1), (0, 0), 2)) == S.LLM_PARAM_INVALID
    no_desc = Cache(src.cache_id)  # num_tensors 0 in the desc: pushing "every layer" needs it
    assert b.dd.PushKvCache(no_desc, index) == S.LLM_PARAM_INVALID
    assert b.dd.PushKvCache(src, CacheIndex(A_ID, 999, 0)) == S.LLM_KV_CACHE_NOT_EXIST
    assert b.dd.PushKvCache(src, CacheIndex(77, dst.cache_id, 0)) == S.LLM_NOT_YET_LINK
    assert b.dd.PushKvCache(Cache(999, [], _desc()), index) == S.LLM_KV_CACHE_NOT_EXIST


@pytest.mark.parametrize("ext, ok", [
    (KvCacheExtParam(), True),
    (KvCacheExtParam((0, 1), (0, 1), 1), True),
    (KvCacheExtParam((0, 1), (0, 1), 2), True),
    (KvCacheExtParam((0, 1), (0, 1), 3), False),
    (KvCacheExtParam((-2, 0), (-2, 0), 2), False),
])
def test_push_ext_param(nodes, ext, ok):
    a, b = nodes
    src, _ = b.register(num_tensors=10)
    dst, _ = a.register(num_tensors=10, fill=0)
    expected = S.LLM_SUCCESS if ok else S.LLM_PARAM_INVALID
    cache = Cache(src.cache_id, src.tensor_addrs, _desc(num_tensors=10))
    assert b.dd.PushKvCache(cache, CacheIndex(A_ID, dst.cache_id, 0), 0, -1, ext) == expected
    assert b.dd.PushKvBlocks(cache, CacheIndex(A_ID, dst.cache_id, 0), [0], [1], ext) == expected


def test_push_layers_move_in_lockstep(nodes):
    a, b = nodes
    src, sarr = b.register(num_tensors=8, seed=6)
    dst, darr = a.register(num_tensors=8, fill=0)
    cache = Cache(src.cache_id, src.tensor_addrs, _desc(num_tensors=8))
    ext = KvCacheExtParam((2, 3), (0, 1), 2)
    assert b.dd.PushKvCache(cache, CacheIndex(A_ID, dst.cache_id, 1), 2, -1, ext) == S.LLM_SUCCESS
    for t in range(4):
        assert (darr[t][1] == sarr[t + 4][2]).all()
    assert not any(darr[t].any() for t in range(4, 8))
    single = KvCacheExtParam((1, 1), (3, 3), 2)
    assert b.dd.PushKvBlocks(cache, CacheIndex(A_ID, dst.cache_id, 0), [0, 3], [2, 0], single) == S.LLM_SUCCESS
    assert (darr[6][[2, 0]] == sarr[2][[0, 3]]).all() and (darr[7][[2, 0]] == sarr[3][[0, 3]]).all()


def test_push_kv_blocks_checks(nodes):
    a, b = nodes
    src, _ = b.register()
    dst, _ = a.register(fill=0)
    assert b.dd.PushKvBlocks(src, CacheIndex(A_ID, dst.cache_id, 1), [0], [0]) == S.LLM_PARAM_INVALID
    assert b.dd.PushKvBlocks(src, CacheIndex(A_ID, dst.cache_id, 0), [], []) == S.LLM_PARAM_INVALID
    assert b.dd.PushKvBlocks(src, CacheIndex(A_ID, dst.cache_id, 0), [0, 1], [0]) == S.LLM_PARAM_INVALID
    host = Cache(src.cache_id, src.tensor_addrs, _desc(placement=CachePlacement.kHost))
    assert b.dd.PushKvBlocks(host, CacheIndex(A_ID, dst.cache_id, 0), [0], [0]) == S.LLM_PARAM_INVALID
    assert b.dd.PushKvBlocks(src, CacheIndex(A_ID, dst.cache_id, 0), [0], [9]) == S.LLM_PARAM_INVALID


def test_roles_do_not_restrict_push(nodes):
    a, b = nodes  # b is kDecoder (a role is only a label)
    src, sarr = b.register(seed=8)
    dst, darr = a.register(fill=0)
    assert b.dd.PushKvBlocks(src, CacheIndex(A_ID, dst.cache_id, 0), [1], [2]) == S.LLM_SUCCESS
    assert (darr[0][2] == sarr[0][1]).all()


# ---- legacy semantics: AllocateCache, DeallocateCache, CopyKvCache, CopyKvBlocks -----------------
def _view(cache: Cache, tensor: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(cache.tensor_addrs[tensor]))


def test_allocate_and_deallocate_from_buf_pool(single):
    dd = single.dd
    status, cache = dd.AllocateCache(_desc(num_tensors=2, dim0=4))
    assert status == S.LLM_SUCCESS and cache.cache_id > 0 and len(cache.tensor_addrs) == 2
    assert cache.cache_desc.num_tensors == 2 and cache.cache_desc.shape == [4, ROW]
    assert dd.AllocateCache(_desc(placement=CachePlacement.kHost)) == (S.LLM_PARAM_INVALID, None)
    assert dd.AllocateCache(_desc(num_tensors=0)) == (S.LLM_PARAM_INVALID, None)
    assert dd.AllocateCache(CacheDesc(CachePlacement.kDevice, 1, DataType.DT_UINT8, [1 << 20]))[0] == \
        S.LLM_DEVICE_OUT_OF_MEMORY
    assert dd.DeallocateCache(cache.cache_id) == S.LLM_SUCCESS
    assert dd.DeallocateCache(cache.cache_id) == S.LLM_SUCCESS  # already freed
    assert dd.DeallocateCache(4242) == S.LLM_SUCCESS
    # the pool has room again: 64 pages of 1 KiB are all free
    for _ in range(3):
        status, big = dd.AllocateCache(CacheDesc(CachePlacement.kDevice, 4, DataType.DT_UINT8, [16, 1024]))
        assert status == S.LLM_SUCCESS
        assert dd.DeallocateCache(big.cache_id) == S.LLM_SUCCESS


def test_allocate_without_pool_is_feature_not_enabled():
    dd = LlmDataDist(A_ID, LlmRole.kPrompt)
    assert dd.Initialize({OPTION_DEVICE_ID: "0"}) == S.LLM_SUCCESS
    try:
        assert dd.AllocateCache(_desc()) == (S.LLM_FEATURE_NOT_ENABLED, None)
        assert dd.DeallocateCache(1) == S.LLM_SUCCESS
    finally:
        dd.Finalize()


def test_copy_kv_cache_worked_example(single):
    dd = single.dd
    st1, src = dd.AllocateCache(CacheDesc(CachePlacement.kDevice, 1, DataType.DT_INT32, [4, 4]))
    st2, dst = dd.AllocateCache(CacheDesc(CachePlacement.kDevice, 1, DataType.DT_INT32, [4, 8]))
    assert st1 == st2 == S.LLM_SUCCESS
    s = _view(src, 0, 64).view(np.int32)
    d = _view(dst, 0, 128).view(np.int32)
    s[:] = np.arange(16)
    d[:] = -1
    assert dd.CopyKvCache(src, dst, 1, 2) == S.LLM_SUCCESS
    assert list(d[16:20]) == [4, 5, 6, 7]
    assert dd.CopyKvCache(src, dst, 0, 1, 0, 8) == S.LLM_SUCCESS
    assert list(d[8:10]) == [0, 1] and d[10] == -1
    assert dd.CopyKvCache(src, dst, 2, 0, 4, 8) == S.LLM_SUCCESS
    assert list(d[0:4]) == [-1, 9, 10, -1]
    assert dd.CopyKvCache(src, dst, 4, 0) == S.LLM_PARAM_INVALID
    assert dd.CopyKvCache(src, dst, 0, 0, 16) == S.LLM_PARAM_INVALID
    assert dd.CopyKvCache(src, dst, 0, 0, 0, 0) == S.LLM_PARAM_INVALID
    assert dd.CopyKvCache(src, Cache(999), 0, 0) == S.LLM_KV_CACHE_NOT_EXIST


def test_copy_kv_blocks_one_to_many(single):
    dd = single.dd
    reg, arrays = single.register(num_tensors=2, dim0=6, seed=2)
    status, alloc = dd.AllocateCache(_desc(num_tensors=2, dim0=6))
    assert status == S.LLM_SUCCESS
    views = [_view(alloc, t, 6 * ROW).reshape(6, ROW) for t in range(2)]
    for v in views:
        v[:] = 0
    assert dd.CopyKvBlocks(reg, alloc, [0, 5], [[1, 2], [4]]) == S.LLM_SUCCESS
    for t in range(2):
        assert (views[t][1] == arrays[t][0]).all() and (views[t][2] == arrays[t][0]).all()
        assert (views[t][4] == arrays[t][5]).all() and not views[t][[0, 3, 5]].any()
    assert dd.CopyKvBlocks(reg, alloc, [6], [[0]]) == S.LLM_PARAM_INVALID
    assert dd.CopyKvBlocks(reg, alloc, [0], [[6]]) == S.LLM_PARAM_INVALID
    assert dd.CopyKvBlocks(reg, alloc, [0, 1], [[1]]) == S.LLM_PARAM_INVALID
    other, _ = single.register(num_tensors=3, dim0=6)
    assert dd.CopyKvBlocks(reg, other, [0], [[1]]) == S.LLM_PARAM_INVALID


def test_allocated_cache_is_reachable_by_peers(nodes):
    a, b = nodes
    status, alloc = a.dd.AllocateCache(_desc(num_tensors=2, dim0=4))
    assert status == S.LLM_SUCCESS
    _view(alloc, 0, 4 * ROW)[:] = 7
    _view(alloc, 1, 4 * ROW)[:] = 9
    dst, darr = b.register(num_tensors=2, fill=0)
    assert b.dd.PullKvCache(CacheIndex(A_ID, alloc.cache_id, 1), dst, 0) == S.LLM_SUCCESS
    assert (darr[0][0] == 7).all() and (darr[1][0] == 9).all()
    assert a.dd.DeallocateCache(alloc.cache_id) == S.LLM_SUCCESS
    assert b.dd.PullKvCache(CacheIndex(A_ID, alloc.cache_id, 1), dst, 0) == S.LLM_KV_CACHE_NOT_EXIST
    status, again = a.dd.AllocateCache(_desc(num_tensors=2, dim0=4))
    assert status == S.LLM_SUCCESS and again.cache_id > alloc.cache_id  # ids are never reused
    assert a.dd.DeallocateCache(again.cache_id) == S.LLM_SUCCESS


# ---- V1 with V2 in one process (the two-process version is in tests/integration) --------------
def test_v1_and_v2_in_one_process():
    port = _port()
    config = LLMConfig()
    config.enable_cache_manager = True
    config.enable_remote_cache_accessible = True
    config.device_id = 0
    config.listen_ip_info = f"127.0.0.1:{port}"
    v2 = LLMDataDist(LLMRole.PROMPT, A_ID)
    v2.init(config.generate_options())
    node = Node(B_ID)
    try:
        arrays = [np.random.default_rng(t).integers(1, 255, (4, ROW), dtype=np.uint8) for t in range(4)]
        v2_cache = v2.cache_manager.register_cache(V2CacheDesc(4, [4, ROW], DataType.DT_UINT8, Placement.DEVICE),
                                                   [int(x.ctypes.data) for x in arrays])
        assert node.dd.LinkLlmClusters([_info(A_ID, port)]) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
        dst, darr = node.register(fill=0)
        assert node.dd.PullKvCache(CacheIndex(A_ID, v2_cache.cache_id, 3), dst, 0) == S.LLM_SUCCESS
        assert all((darr[t][0] == arrays[t][3]).all() for t in range(4))

        def pulled() -> bool:
            try:
                v2.cache_manager.pull_cache(CacheKeyByIdAndIndex(B_ID, dst.cache_id, 0), v2_cache, 1)
                return True
            except Exception:  # noqa: BLE001 - the server end of the link appears a moment later
                return False

        assert wait_until(pulled)
        assert all((arrays[t][1] == arrays[t][3]).all() for t in range(4))
    finally:
        node.dd.Finalize()
        v2.finalize()


def test_v1_cannot_link_a_normal_mode_v2():
    port = _port()
    config = LLMConfig()
    config.enable_cache_manager = True
    config.device_id = 0
    config.listen_ip_info = f"127.0.0.1:{port}"
    v2 = LLMDataDist(LLMRole.PROMPT, A_ID)
    v2.init(config.generate_options())
    node = Node(B_ID)
    try:
        assert node.dd.LinkLlmClusters([_info(A_ID, port)]) == (S.LLM_PARAM_INVALID, [S.LLM_PARAM_INVALID])
    finally:
        node.dd.Finalize()
        v2.finalize()
