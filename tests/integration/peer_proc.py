"""A scriptable LLMDataDist peer process for integration tests: JSON-line commands on stdin, replies on stdout."""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import time
import traceback

import numpy as np

from llm_datadist import (BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType, LLMClusterInfo,
                          LLMConfig, LLMDataDist, LLMException, LLMRole, MemInfo, Memtype, Placement)

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10


def pattern(seed: int, tensor: int, nbytes: int) -> np.ndarray:
    """The deterministic content of tensor ``tensor`` of a cache filled with ``seed``."""
    return np.random.default_rng(seed * 7919 + tensor).integers(0, 256, nbytes, dtype=np.uint8)


class Peer:
    def __init__(self) -> None:
        self.dd = None
        self.caches = {}  # name -> (Cache, [arrays])
        self.mappings = []  # page-aligned mappings behind arrays: kept for the life of the process

    def _aligned_zeros(self, num_blocks, block_bytes):
        """A zeroed array in a mapping of its own (page aligned), so that its pages can be replaced."""
        mm = mmap.mmap(-1, num_blocks * block_bytes)
        self.mappings.append(mm)
        return np.frombuffer(mm, dtype=np.uint8).reshape(num_blocks, block_bytes)

    def op_init(self, role, cluster_id, config):
        cfg = LLMConfig()
        for key, value in config.items():
            setattr(cfg, key, value)
        self.dd = LLMDataDist(LLMRole(role), cluster_id)
        self.dd.init(cfg.generate_options())
        return {"pid": os.getpid()}

    def _arrays(self, num_tensors, num_blocks, block_bytes, seed, aligned=False):
        if aligned:
            arrays = [self._aligned_zeros(num_blocks, block_bytes) for _ in range(num_tensors)]
            for t, array in enumerate(arrays):
                if seed is not None:
                    array.reshape(-1)[:] = pattern(seed, t, num_blocks * block_bytes)
            return arrays
        if seed is None:
            return [np.zeros((num_blocks, block_bytes), np.uint8) for _ in range(num_tensors)]
        return [pattern(seed, t, num_blocks * block_bytes).reshape(num_blocks, block_bytes)
                for t in range(num_tensors)]

    def op_register(self, name, num_tensors, num_blocks, block_bytes, seed=None, blocks=True, model_id=None,
                    keys=(), placement=1, remote_accessible=None, aligned=False):
        arrays = self._arrays(num_tensors, num_blocks, block_bytes, seed, aligned)
        desc = CacheDesc(num_tensors, [num_blocks, block_bytes], DataType.DT_UINT8, Placement(placement))
        addrs = [a.ctypes.data for a in arrays]
        cm = self.dd.cache_manager
        if blocks:
            key = None if model_id is None else BlocksCacheKey(self.dd.cluster_id, model_id)
            cache = cm.register_blocks_cache(desc, addrs, key, remote_accessible)
        else:
            cache_keys = [CacheKey(self.dd.cluster_id, *k) for k in keys]
            cache = cm.register_cache(desc, addrs, cache_keys, remote_accessible)
        self.caches[name] = (cache, arrays)
        return {"cache_id": cache.cache_id}

    def op_allocate(self, name, num_tensors, num_blocks, block_bytes, seed, keys=(), placement=1):
        desc = CacheDesc(num_tensors, [num_blocks, block_bytes], DataType.DT_UINT8, Placement(placement))
        cache = self.dd.cache_manager.allocate_cache(desc, [CacheKey(self.dd.cluster_id, *k) for k in keys])
        arrays = []
        for t, addr in enumerate(cache.tensor_addrs):
            view = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * (num_blocks * block_bytes)).from_address(addr))
            view[:] = pattern(seed, t, num_blocks * block_bytes)
            arrays.append(view.reshape(num_blocks, block_bytes))
        self.caches[name] = (cache, arrays)
        return {"cache_id": cache.cache_id}

    def op_deallocate(self, name):
        self.dd.cache_manager.deallocate_cache(self.caches[name][0])
        return {}

    def op_remap(self, name, seed):
        """What an application does after a device memory error: new physical pages behind the same addresses
        of every tensor of the cache (the bytes around the tensors in those pages are restored), the tensors
        refilled, here with the pattern of ``seed``, then ``remap_registered_memory`` of the tensors."""
        cache, arrays = self.caches[name]
        nbytes = arrays[0].nbytes
        spans = sorted({(addr // _PAGE * _PAGE, -(-(addr + nbytes) // _PAGE) * _PAGE) for addr in cache.tensor_addrs})
        for start, end in spans:
            keep = np.ctypeslib.as_array((ctypes.c_uint8 * (end - start)).from_address(start)).copy()
            got = _libc.mmap(start, end - start, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
            if got != start:
                raise OSError(ctypes.get_errno(), "mmap MAP_FIXED failed")
            ctypes.memmove(start, keep.ctypes.data, end - start)
        for t, array in enumerate(arrays):
            array.reshape(-1)[:] = pattern(seed, t, nbytes)
        self.dd.cache_manager.remap_registered_memory([MemInfo(Memtype.MEM_TYPE_DEVICE, addr, nbytes)
                                                       for addr in cache.tensor_addrs])
        return {"spans": len(spans)}

    def op_digest(self, name):
        """sha-like digest of every tensor, to verify pushes from the other side."""
        _cache, arrays = self.caches[name]
        return {"tensors": [a.tobytes().hex() for a in arrays]}

    def op_link_clusters(self, clusters, timeout=3000):
        infos = []
        for c in clusters:
            info = LLMClusterInfo()
            if c.get("cluster_id") is not None:
                info.remote_cluster_id = c["cluster_id"]
            info.append_local_ip_info("127.0.0.1", 0)
            info.append_remote_ip_info(c["ip"], c["port"])
            infos.append(info)
        code, codes = self.dd.link_clusters(infos, timeout)
        return {"code": int(code), "codes": [int(x) for x in codes]}

    def op_unlink_clusters(self, cluster_id, ip, port, force=False, timeout=3000):
        info = LLMClusterInfo()
        info.remote_cluster_id = cluster_id
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info(ip, port)
        code, codes = self.dd.unlink_clusters([info], timeout, force=force)
        return {"code": int(code), "codes": [int(x) for x in codes]}

    def op_unlink(self, comm_id):
        self.dd.unlink(comm_id)
        return {}

    def op_push_blocks(self, name, cluster_id, model_id, src_blocks, dst_blocks):
        cache, _ = self.caches[name]
        self.dd.cache_manager.push_blocks(BlocksCacheKey(cluster_id, model_id), cache, src_blocks, dst_blocks)
        return {}

    def op_pull_code_after(self, name, cluster_id, model_id, src_blocks, dst_blocks, timeout=5.0):
        """Pull until it fails (bounded); returns the first failure code and how many pulls succeeded first."""
        cache, _ = self.caches[name]
        deadline = time.monotonic() + timeout
        succeeded = 0
        while time.monotonic() < deadline:
            try:
                self.dd.cache_manager.pull_blocks(BlocksCacheKey(cluster_id, model_id), cache, src_blocks,
                                                  dst_blocks)
            except LLMException as exc:
                return {"code": int(exc.status_code), "succeeded": succeeded}
            succeeded += 1
            time.sleep(0.01)
        return {"code": 0, "succeeded": succeeded}

    def op_link(self, comm_name, ranks, rank_table):
        comm_id = self.dd.link(comm_name, {int(k): v for k, v in ranks}, rank_table)
        return {"comm_id": comm_id}

    def op_query(self, comm_id):
        return {"status": self.dd.query_register_mem_status(comm_id).value}

    def op_wait_comm(self, comm_id, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.dd.query_register_mem_status(comm_id).value
            if status != 1:
                return {"status": status}
            time.sleep(0.02)
        return {"status": 1}

    def op_pull_blocks(self, name, cluster_id, model_id, src_blocks, dst_blocks):
        cache, _ = self.caches[name]
        self.dd.cache_manager.pull_blocks(BlocksCacheKey(cluster_id, model_id), cache, src_blocks, dst_blocks)
        return {}

    def op_pull_by_id(self, name, cluster_id, cache_id, batch_index, dst_index):
        cache, _ = self.caches[name]
        self.dd.cache_manager.pull_cache(CacheKeyByIdAndIndex(cluster_id, cache_id, batch_index), cache, dst_index)
        return {}

    def op_finalize(self):
        self.dd.finalize()
        return {}

    def op_exit(self, finalize=True):
        if finalize and self.dd is not None:
            self.dd.finalize()
        REPLIES.write(json.dumps({"ok": True}) + "\n")
        REPLIES.flush()
        os._exit(0)


REPLIES = sys.stdout  # the reply channel; library log lines go to stderr instead


def main() -> None:
    sys.stdout = sys.stderr
    peer = Peer()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = {"ok": True, **getattr(peer, f"op_{op}")(**request)}
        except LLMException as exc:
            reply = {"ok": False, "code": int(exc.status_code), "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - report everything to the test
            reply = {"ok": False, "code": -1, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
        REPLIES.write(json.dumps(reply) + "\n")
        REPLIES.flush()


if __name__ == "__main__":
    main()
