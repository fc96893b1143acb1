"""How real serving engines (vllm-ascend, Omni-Infer, MindIE-LLM, SGLang forks) call the API, run in one process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fakes import Delayed
from waiting import NEVER_HANGS_S
from llm_datadist import (BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType, LLMClusterInfo,
                          LLMDataDist, LLMException, LLMRole, LLMStatusCode, Placement)
from llm_datadist.v2.llm_types import BlocksCacheKey as TypesBlocksCacheKey
from llm_datadist.v2.llm_types import Cache as TypesCache
from llm_datadist.v2.llm_types import CacheDesc as TypesCacheDesc

SUCCESS = LLMStatusCode.LLM_SUCCESS
P, D = 1, 2
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def _status(call) -> LLMStatusCode:
    with pytest.raises(LLMException) as exc:
        call()
    return exc.value.status_code


def _register_blocks(cm, arrays, key=None, **kwargs):
    desc = CacheDesc(len(arrays), list(arrays[0].shape), DataType.DT_UINT8, Placement.DEVICE)
    return cm.register_blocks_cache(desc, [a.ctypes.data for a in arrays], key, **kwargs)


# -- init options ----------------------------------------------------------------------------------
def test_unknown_option_keys_are_ignored(make_dd):
    dd = make_dd(LLMRole.PROMPT, 1, init=False)
    dd.init({"llm.EnableCacheManager": "1", "llm.RdmaServiceLevel": "100", "llm.RdmaTrafficClass": "132",
             "ge.exec.deviceId": "0", "ge.graphRunMode": "0", "some.unknown.key": "x", "llm.Unknown": ""})
    assert dd.cache_manager is not None


def test_local_comm_res_alone_turns_on_both_modes(make_dd, new_cache):
    dd = make_dd(LLMRole.DECODER, 2, init=False)
    dd.init({"llm.LocalCommRes": ""})  # no EnableCacheManager, no device id
    cm = dd.cache_manager
    dst, _ = new_cache(cm, 2, (2, 8), placement=Placement.DEVICE)
    with pytest.raises(TypeError):  # remote-cache-accessible: CacheKey pulls are rejected
        cm.pull_cache(CacheKey(1, 1), dst)


def test_device_id_may_be_missing(make_pair, new_cache, tools):
    pair = make_pair(device_id=None)
    src, src_arrays = new_cache(pair.p_cm, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pair.d_cm, 2, (4, 16), blocks=True, fill="sentinel")
    pair.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [1], [2])
    assert all((d[2] == s[1]).all() for s, d in zip(src_arrays, dst_arrays))
    _rows_untouched(dst_arrays, tools, {2})


# -- lifecycle -------------------------------------------------------------------------------------
def test_large_cluster_ids_and_cache_manager_right_after_init(make_dd, new_cache, tools):
    p_id = (0x7F000001 << 16) | 26000  # ip << 16 | port, 48 bits
    d_id = (0x7F000002 << 16) | 26001
    p = make_dd(LLMRole.PROMPT, p_id, listen=True)
    cache, src_arrays = new_cache(p.cache_manager, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(p_id, 0))
    d = make_dd(LLMRole.DECODER, d_id)
    dst, dst_arrays = new_cache(d.cache_manager, 2, (4, 16), blocks=True, fill="sentinel")
    assert d.link_clusters([tools.cluster_info(p_id, make_dd.port(p))], 3000) == (SUCCESS, [SUCCESS])
    d.cache_manager.pull_blocks(BlocksCacheKey(p_id, 0), dst, [3], [0])
    assert all((t[0] == s[3]).all() for s, t in zip(src_arrays, dst_arrays))
    _rows_untouched(dst_arrays, tools, {0})


def test_finalize_optional_and_idempotent(make_dd):
    dd = make_dd(LLMRole.PROMPT, 1, listen=True)
    dd.finalize()
    dd.finalize()


def test_process_exits_without_finalize(free_port):
    port = free_port()
    script = textwrap.dedent(f"""
        import numpy as np
        from llm_datadist import *
        def make(role, cid, listen=None):
            config = LLMConfig()
            config.enable_cache_manager = True
            if listen:
                config.listen_ip_info = listen
            dd = LLMDataDist(role, cid)
            dd.init(config.generate_options())
            return dd
        p = make(LLMRole.PROMPT, 1, "127.0.0.1:{port}")
        d = make(LLMRole.DECODER, 2)
        src = [np.full((4, 16), 7, np.uint8) for _ in range(2)]
        dst = [np.zeros((4, 16), np.uint8) for _ in range(2)]
        desc = CacheDesc(2, [4, 16], DataType.DT_UINT8, Placement.HOST)
        p.cache_manager.register_blocks_cache(desc, [a.ctypes.data for a in src], BlocksCacheKey(1, 0))
        cache = d.cache_manager.register_blocks_cache(desc, [a.ctypes.data for a in dst])
        info = LLMClusterInfo()
        info.remote_cluster_id = 1
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info("127.0.0.1", {port})
        assert d.link_clusters([info], 3000)[0] == LLMStatusCode.LLM_SUCCESS
        d.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, [1], [2])
        assert (dst[1][2] == 7).all()
        print("pulled", flush=True)
        # no unlink, no finalize: the interpreter must still exit
    """)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "pulled" in proc.stdout
    assert time.monotonic() - started < 20  # never hangs at exit (a normal run takes about 2 s)


# -- registration ----------------------------------------------------------------------------------
def test_register_blocks_positional_and_keyword(make_dd, new_cache):
    cm = make_dd(LLMRole.PROMPT, 1).cache_manager
    arrays = new_cache.arrays(4, (4, 16))
    desc = CacheDesc(1, [4, 16], DataType.DT_UINT8, Placement.DEVICE)
    a = cm.register_blocks_cache(desc, [arrays[0].ctypes.data], BlocksCacheKey(1, 0), True)
    b = cm.register_blocks_cache(cache_desc=desc, addrs=[arrays[1].ctypes.data], blocks_cache_key=BlocksCacheKey(1, 1),
                                 remote_accessible=True)
    c = cm.register_blocks_cache(desc, [arrays[2].ctypes.data])
    d = cm.register_blocks_cache(desc, [arrays[3].ctypes.data], blocks_cache_key=None)
    assert [x.cache_id for x in (a, b, c, d)] == [1, 2, 3, 4]
    assert all(x.is_blocks_cache for x in (a, b, c, d))


def test_interior_pointers_and_zero_copy(pd, new_cache, tools):
    big = new_cache.arrays(1, (3 * 4096,))[0]  # one allocation holding three tensors at odd offsets
    offsets = [24, 4096 + 8, 2 * 4096 + 1000]
    desc = CacheDesc(3, [4, 64], DataType.DT_UINT8, Placement.HOST)
    base = big.ctypes.data
    pd.p_cm.register_blocks_cache(desc, [base + o for o in offsets], BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pd.d_cm, 3, (4, 64), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [2], [0])
    for o, a in zip(offsets, dst_arrays):
        assert (a[0] == big[o + 128:o + 192]).all()
    # the model keeps writing the registered buffer: the next pull sees the new bytes (no copy at register)
    big[offsets[1] + 64:offsets[1] + 128] = 0x42
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [1], [3])
    assert (dst_arrays[1][3] == 0x42).all()
    assert (dst_arrays[0][3] == big[offsets[0] + 64:offsets[0] + 128]).all()
    assert all((a[[1, 2]] == tools.SENTINEL).all() for a in dst_arrays)


# -- CacheDesc and geometry ------------------------------------------------------------------------
def test_cache_desc_forms_and_num_blocks_differ(pd, new_cache, tools):
    assert TypesCacheDesc is CacheDesc and TypesCache is not None and TypesBlocksCacheKey is BlocksCacheKey
    layers, block_len, heads, head_dim = 3, 4, 2, 8
    p_desc = CacheDesc(2 * layers, (10, block_len, heads, head_dim), DataType.DT_BF16, Placement.DEVICE)
    d_desc = CacheDesc(num_tensors=2 * layers, shape=[6, block_len, heads, head_dim], data_type=DataType.DT_BF16,
                       placement=Placement.DEVICE, batch_dim_index=0, seq_len_dim_index=-1, kv_tensor_format=None)
    assert p_desc.size // 10 == block_len * heads * head_dim * 2 == d_desc.size // 6
    p_arrays = new_cache.arrays(2 * layers, (10, block_len, heads, head_dim), DataType.DT_BF16)
    d_arrays = new_cache.arrays(2 * layers, (6, block_len, heads, head_dim), DataType.DT_BF16, fill="sentinel")
    pd.p_cm.register_blocks_cache(p_desc, [a.ctypes.data for a in p_arrays], BlocksCacheKey(P, 0))
    dst = pd.d_cm.register_blocks_cache(d_desc, [a.ctypes.data for a in d_arrays], BlocksCacheKey(D, 0))
    assert dst.cache_desc.num_tensors == 6 and isinstance(dst.cache_id, int)
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [9, 0, 4], [5, 1, 0])
    for s, d in zip(p_arrays, d_arrays):
        assert np.array_equal(d[5], s[9]) and np.array_equal(d[1], s[0]) and np.array_equal(d[0], s[4])
        assert (tools.rows(d)[[2, 3, 4]] == tools.SENTINEL).all()


# -- BlocksCacheKey forms and addressing -----------------------------------------------------------
def test_blocks_cache_key_forms():
    forms = [BlocksCacheKey(5), BlocksCacheKey(5, 3), BlocksCacheKey(5, model_id=3), BlocksCacheKey(cluster_id=5),
             BlocksCacheKey(cluster_id=5, model_id=3), BlocksCacheKey(prompt_cluster_id=5, model_id=3)]
    assert [(k.cluster_id, k.model_id) for k in forms] == [(5, 0), (5, 3), (5, 3), (5, 0), (5, 3), (5, 3)]


def test_keys_addressed_by_owner_cluster(pd, new_cache):
    # P and D both register keyed caches with the same model ids; D also registers an unkeyed one
    p0, p0_arrays = new_cache(pd.p_cm, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    p1, p1_arrays = new_cache(pd.p_cm, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(prompt_cluster_id=P,
                                                                                           model_id=1))
    d0, d0_arrays = new_cache(pd.d_cm, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(D, 0))
    unkeyed, u_arrays = new_cache(pd.d_cm, 2, (4, 16), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(BlocksCacheKey(prompt_cluster_id=P, model_id=1), unkeyed, [0], [0])
    pd.d_cm.pull_blocks(BlocksCacheKey(P), unkeyed, [1], [1])
    for a, b, u in zip(p0_arrays, p1_arrays, u_arrays):
        assert (u[0] == b[0]).all() and (u[1] == a[1]).all()
    pd.p_cm.pull_blocks(BlocksCacheKey(D, 0), p0, [3], [2])  # P addresses D's cache by D's cluster id
    assert all((a[2] == d[3]).all() for a, d in zip(p0_arrays, d0_arrays))


def test_duplicate_blocks_key_last_wins(pd, new_cache):
    old, old_arrays = new_cache(pd.p_cm, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pd.d_cm, 1, (4, 16), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [0])
    new, new_arrays = new_cache(pd.p_cm, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [1], [1])
    assert (dst_arrays[0][0] == old_arrays[0][0]).all()
    assert (dst_arrays[0][1] == new_arrays[0][1]).all()  # never a mix: the newest registration wins


def test_duplicate_blocks_key_last_wins_remote_accessible(pd_ra, new_cache):
    old, old_arrays = new_cache(pd_ra.p_cm, 1, (4, 16), placement=Placement.DEVICE, blocks=True,
                                blocks_key=BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pd_ra.d_cm, 1, (4, 16), placement=Placement.DEVICE, blocks=True, fill="sentinel")
    pd_ra.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [0])  # D takes P's table
    new, new_arrays = new_cache(pd_ra.p_cm, 1, (4, 16), placement=Placement.DEVICE, blocks=True,
                                blocks_key=BlocksCacheKey(P, 0))
    pd_ra.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [1], [1])
    assert (dst_arrays[0][1] == new_arrays[0][1]).all()


# -- register before link, link later --------------------------------------------------------------
@pytest.mark.parametrize("ra", [False, True], ids=["normal", "remote_accessible"])
def test_register_before_late_link(make_dd, new_cache, tools, ra):
    attrs = {"enable_remote_cache_accessible": True} if ra else {}
    p = make_dd(LLMRole.PROMPT, P, listen=True, **attrs)
    src, src_arrays = new_cache(p.cache_manager, 4, (8, 32), placement=Placement.DEVICE, blocks=True,
                                blocks_key=BlocksCacheKey(P, 0))
    d = make_dd(LLMRole.DECODER, D, **attrs)  # the peer exists only after the registration
    dst, dst_arrays = new_cache(d.cache_manager, 4, (8, 32), placement=Placement.DEVICE, blocks=True,
                                blocks_key=BlocksCacheKey(D, 0), fill="sentinel")
    assert d.link_clusters([tools.cluster_info(P, make_dd.port(p))], 3000) == (SUCCESS, [SUCCESS])
    d.cache_manager.pull_blocks(BlocksCacheKey(P, 0), dst, [7, 2], [0, 4])
    for s, t in zip(src_arrays, dst_arrays):
        assert (t[0] == s[7]).all() and (t[4] == s[2]).all()
    # a second peer links later still
    late = make_dd(LLMRole.DECODER, 3, **attrs)
    late_dst, late_arrays = new_cache(late.cache_manager, 4, (8, 32), placement=Placement.DEVICE, blocks=True,
                                      fill="sentinel")
    assert late.link_clusters([tools.cluster_info(P, make_dd.port(p))], 3000) == (SUCCESS, [SUCCESS])
    late.cache_manager.pull_blocks(BlocksCacheKey(P, 0), late_dst, [5], [5])
    assert all((t[5] == s[5]).all() for s, t in zip(src_arrays, late_arrays))
    # and a cache registered after the links is visible to them
    fresh, fresh_arrays = new_cache(p.cache_manager, 4, (8, 32), placement=Placement.DEVICE, blocks=True,
                                    blocks_key=BlocksCacheKey(P, 1))
    d.cache_manager.pull_blocks(BlocksCacheKey(P, 1), dst, [6], [6])
    assert all((t[6] == s[6]).all() for s, t in zip(fresh_arrays, dst_arrays))


# -- one-sided link calls --------------------------------------------------------------------------
def test_link_and_unlink_shapes(make_pair):
    pair = make_pair()
    info = LLMClusterInfo()
    info.remote_cluster_id = P
    info.append_local_ip_info("127.0.0.1", 0)  # port 0 is allowed
    info.append_remote_ip_info("127.0.0.1", pair.port)
    ret = pair.d.link_clusters([info])  # default timeout
    assert ret == (LLMStatusCode.LLM_ALREADY_LINK, [LLMStatusCode.LLM_ALREADY_LINK])  # repeated use tolerated
    ret = pair.d.unlink_clusters([info], timeout=3000, force=False)
    assert ret == (SUCCESS, [SUCCESS])
    assert pair.d.link_clusters(clusters=[info], timeout=3000) == (SUCCESS, [SUCCESS])
    assert pair.d.unlink_clusters([info]) == (SUCCESS, [SUCCESS])


def test_force_unlink_both_sides_then_relink(make_pair, new_cache, tools):
    pair = make_pair()
    src, src_arrays = new_cache(pair.p_cm, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pair.d_cm, 1, (4, 16), blocks=True, fill="sentinel")
    assert pair.d.unlink_clusters([pair.info()], 3000, force=True) == (SUCCESS, [SUCCESS])
    assert pair.p.unlink_clusters([tools.cluster_info(D, 1)], 3000, True) == (SUCCESS, [SUCCESS])
    assert _status(lambda: pair.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [0])) \
        == LLMStatusCode.LLM_NOT_YET_LINK
    pair.link()
    pair.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [0])
    assert (dst_arrays[0][0] == src_arrays[0][0]).all()


def test_client_restart_relinks(make_dd, new_cache, tools):
    # a client that dies without unlinking comes back with the same cluster id: the server relinks it
    p = make_dd(LLMRole.PROMPT, P, listen=True)
    src, src_arrays = new_cache(p.cache_manager, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    info = tools.cluster_info(P, make_dd.port(p))
    first = make_dd(LLMRole.DECODER, D)
    first_src, _ = new_cache(first.cache_manager, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(D, 0))
    p_dst, _ = new_cache(p.cache_manager, 1, (4, 16), blocks=True)
    assert first.link_clusters([info], 3000) == (SUCCESS, [SUCCESS])
    p.cache_manager.pull_blocks(BlocksCacheKey(D, 0), p_dst, [0], [0])  # the link is in use on both sides
    first.finalize()  # the process "dies": its connection closes, nothing is unlinked
    second = make_dd(LLMRole.DECODER, D)  # the restarted client
    assert second.link_clusters([info], 3000) == (SUCCESS, [SUCCESS])
    dst, dst_arrays = new_cache(second.cache_manager, 1, (4, 16), blocks=True, fill="sentinel")
    second.cache_manager.pull_blocks(BlocksCacheKey(P, 0), dst, [2], [2])
    assert (dst_arrays[0][2] == src_arrays[0][2]).all()


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_a_claimed_cluster_id_evicts_a_live_link_only_with_the_secret(make_dd, new_cache, tools, secret):
    """Without a secret anyone can claim an id: a live link is kept (ALREADY_LINK); with one, the prover wins."""
    extra = {"link_secret": secret} if secret else {}
    p = make_dd(LLMRole.PROMPT, P, listen=True, **extra)
    src, src_arrays = new_cache(p.cache_manager, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    info = tools.cluster_info(P, make_dd.port(p))
    first, second = make_dd(LLMRole.DECODER, D, **extra), make_dd(LLMRole.DECODER, D, **extra)
    assert first.link_clusters([info], 3000) == (SUCCESS, [SUCCESS])
    code, _ = second.link_clusters([info], 3000)
    dst, dst_arrays = new_cache(first.cache_manager, 1, (4, 16), blocks=True, fill="sentinel")
    if secret:
        assert code == SUCCESS
        dst2, dst2_arrays = new_cache(second.cache_manager, 1, (4, 16), blocks=True, fill="sentinel")
        second.cache_manager.pull_blocks(BlocksCacheKey(P, 0), dst2, [2], [2])
        assert (dst2_arrays[0][2] == src_arrays[0][2]).all()
    else:
        assert code == LLMStatusCode.LLM_ALREADY_LINK
        first.cache_manager.pull_blocks(BlocksCacheKey(P, 0), dst, [1], [1])  # the first link still works
        assert (dst_arrays[0][1] == src_arrays[0][1]).all()

def test_missing_remote_id_and_local_ip(make_dd, new_cache, tools):
    p = make_dd(LLMRole.PROMPT, 11, listen=True)
    src, src_arrays = new_cache(p.cache_manager, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(11, 0))
    d = make_dd(LLMRole.DECODER, 12)
    info = tools.cluster_info(None, make_dd.port(p), local_ip=None)  # SGLang style
    assert d.link_clusters([info], 3000) == (SUCCESS, [SUCCESS])
    dst, dst_arrays = new_cache(d.cache_manager, 2, (4, 16), blocks=True, fill="sentinel")
    d.cache_manager.pull_blocks(BlocksCacheKey(11, 0), dst, [0], [3])
    assert all((t[3] == s[0]).all() for s, t in zip(src_arrays, dst_arrays))


# -- pull_blocks call forms and semantics ----------------------------------------------------------
def test_pull_blocks_positional_and_keyword(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 2, (8, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pd.d_cm, 2, (8, 16), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [1])
    pd.d_cm.pull_blocks(src_cache_key=BlocksCacheKey(P, 0), dst_cache=dst, src_blocks=[2], dst_blocks=[3])
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, src_blocks=(4,), dst_blocks=(5,))
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[1] == s[0]).all() and (d[3] == s[2]).all() and (d[5] == s[4]).all()
    _rows_untouched(dst_arrays, tools, {1, 3, 5})


def _rows_untouched(arrays, tools, written):
    for a in arrays:
        keep = [r for r in range(a.shape[0]) if r not in written]
        assert (tools.rows(a)[keep] == tools.SENTINEL).all()


def test_unsorted_scattered_blocks_many_tensors(pd, new_cache, tools):
    tensors, p_blocks, d_blocks = 56, 40, 24
    src, src_arrays = new_cache(pd.p_cm, tensors, (p_blocks, 64), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pd.d_cm, tensors, (d_blocks, 64), blocks=True, fill="sentinel")
    src_ids = [37, 3, 4, 5, 20, 0, 39, 12]
    dst_ids = [2, 10, 11, 12, 0, 23, 7, 1]  # runs (3,4,5 -> 10,11,12) and jumps, unsorted, different ids
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, src_ids, dst_ids)
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[dst_ids] == s[src_ids]).all()
    _rows_untouched(dst_arrays, tools, set(dst_ids))


def test_layer_ranges_select_tensors(pd, new_cache, tools):
    tensors = 12  # 6 layers of K, V
    src, src_arrays = new_cache(pd.p_cm, tensors, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pd.d_cm, tensors, (4, 16), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [1, 2], [3, 0], src_layer_range=range(2, 4),
                        dst_layer_range=range(2, 4))  # tensors 4..7, tensor_num_per_layer defaults to 2
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [1], src_layer_range=range(0, 1),
                        dst_layer_range=range(3, 4), tensor_num_per_layer=3)  # tensors 0..2 -> 9..11
    for t in range(tensors):
        written = set()
        if 4 <= t < 8:
            assert (dst_arrays[t][3] == src_arrays[t][1]).all() and (dst_arrays[t][0] == src_arrays[t][2]).all()
            written |= {0, 3}
        if t >= 9:
            assert (dst_arrays[t][1] == src_arrays[t - 9][0]).all()
            written |= {1}
        _rows_untouched([dst_arrays[t]], tools, written)


# -- synchronous, errors fast ----------------------------------------------------------------------
def test_pull_is_synchronous_copy(pd, new_cache, tools):
    src, src_arrays = new_cache(pd.p_cm, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, dst_arrays = new_cache(pd.d_cm, 2, (4, 16), blocks=True, fill="sentinel")
    expected = [s[[0, 1]].copy() for s in src_arrays]
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0, 1], [2, 3])
    for s in src_arrays:  # P frees and reuses its blocks at once
        s[:] = 0
    for e, d in zip(expected, dst_arrays):
        assert (d[[2, 3]] == e).all()


def test_unknown_cluster_fails_fast(make_pair, new_cache):
    pd = make_pair(sync_kv_timeout=60000)  # waiting for this timeout would take minutes
    dst, _ = new_cache(pd.d_cm, 2, (4, 16), blocks=True)
    started = time.monotonic()
    for cluster in (99, 2**48 + 5):
        assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(cluster, 0), dst, [0], [0])) \
            == LLMStatusCode.LLM_NOT_YET_LINK
    assert time.monotonic() - started < NEVER_HANGS_S  # long before the timeout


def test_bad_arguments(pd, new_cache):
    new_cache(pd.p_cm, 2, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, _ = new_cache(pd.d_cm, 2, (4, 16), blocks=True)
    with pytest.raises(TypeError):
        pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0.0], [0])
    with pytest.raises(ValueError):
        pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [0], tensor_num_per_layer=-1)
    assert _status(lambda: pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0, 1], [0])) \
        == LLMStatusCode.LLM_PARAM_INVALID
    pd.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0, 1], [0, 1])  # still usable


def test_pull_blocks_timeout(make_pair, new_cache):
    pair = make_pair(sync_kv_timeout=100)
    new_cache(pair.p_cm, 1, (4, 16), blocks=True, blocks_key=BlocksCacheKey(P, 0))
    dst, _ = new_cache(pair.d_cm, 1, (4, 16), blocks=True)
    with Delayed(pair.p._engine.registry, "lookup_blocks", None):  # P answers only after the pull gave up
        with pytest.raises(LLMException) as exc:
            pair.d_cm.pull_blocks(BlocksCacheKey(P, 0), dst, [0], [0])
    assert exc.value.status_code in (LLMStatusCode.LLM_TIMEOUT, LLMStatusCode.LLM_WAIT_PROCESS_TIMEOUT)


def test_id_and_index_into_blocks(pd, new_cache):
    # the C2B form some clients use: a continuous remote slot cut into local blocks
    src, src_arrays = new_cache(pd.p_cm, 2, (2, 64))
    dst, dst_arrays = new_cache(pd.d_cm, 2, (8, 16), blocks=True, fill="sentinel")
    pd.d_cm.pull_blocks(CacheKeyByIdAndIndex(P, src.cache_id, 1), dst, [], [7, 6, 5, 4])
    for s, d in zip(src_arrays, dst_arrays):
        assert (d[[7, 6, 5, 4]].reshape(-1) == s[1]).all()


def test_two_instances_one_process(make_dd):
    a = LLMDataDist(LLMRole.PROMPT, 1)
    assert a.cluster_id == 1
    first, second = make_dd(LLMRole.PROMPT, 1), make_dd(LLMRole.DECODER, 2)
    assert first.cache_manager is not second.cache_manager
