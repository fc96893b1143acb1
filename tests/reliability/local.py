"""Helpers for the instances the tests run in this process (the decode side)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from llm_datadist import BlocksCacheKey, LLMClusterInfo, LLMStatusCode
from tests.reliability import kv

#: A word no generation ever holds (kv.one_generation rejects it): written where nothing may write.
SENTINEL = np.uint64(0xEEEE_EEEE_EEEE_EEEE)


def cluster(cluster_id: int, port: int) -> LLMClusterInfo:
    info = LLMClusterInfo()
    info.remote_cluster_id = cluster_id
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info("127.0.0.1", port)
    return info


def link(dd, cluster_id: int, port: int, timeout_ms: int = 5000) -> None:
    code, codes = dd.link_clusters([cluster(cluster_id, port)], timeout_ms)
    assert (code, codes) == (LLMStatusCode.LLM_SUCCESS, [LLMStatusCode.LLM_SUCCESS]), (code, codes)


def blocks(cm, num_tensors: int, num_blocks: int, block_bytes: int, key: Optional[BlocksCacheKey] = None,
           remote_accessible: Optional[bool] = None, pool: bool = False) -> Tuple[object, List[np.ndarray]]:
    """A destination blocks cache filled with SENTINEL: registered numpy arrays, or pool memory."""
    desc = kv.blocks_desc(num_tensors, num_blocks, block_bytes)
    if pool:
        cache = cm.allocate_blocks_cache(desc, key)
        arrays = [kv.raw_view(a, num_blocks * block_bytes).reshape(num_blocks, block_bytes)
                  for a in cache.tensor_addrs]
    else:
        arrays = [np.empty((num_blocks, block_bytes), np.uint8) for _ in range(num_tensors)]
        cache = cm.register_blocks_cache(desc, [a.ctypes.data for a in arrays], key, remote_accessible)
    mark(arrays)
    return cache, arrays


def mark(arrays) -> None:
    for array in arrays:
        array.view(np.uint64)[:] = SENTINEL


def untouched(arrays) -> bool:
    return all(bool((array.view(np.uint64) == SENTINEL).all()) for array in arrays)


def pool_cfg(nbytes: int) -> str:
    return f'{{"memory_size": {nbytes}, "page_shift": 16}}'


def unlink(dd, cluster_id: int, port: int) -> None:
    code, _codes = dd.unlink_clusters([cluster(cluster_id, port)], 3000)
    assert code == LLMStatusCode.LLM_SUCCESS, code
