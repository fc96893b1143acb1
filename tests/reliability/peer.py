"""A scriptable peer process for the reliability tests: JSON-line commands on stdin, one JSON reply per line.

Run as ``python -m tests.reliability.peer`` from the repository root. It can hold several LLMDataDist instances
(by name) and runs owner churn and push loops in background threads, so the test process can race them.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from typing import Dict

import numpy as np

from llm_datadist import (BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType, LLMClusterInfo,
                          LLMConfig, LLMDataDist, LLMException, LLMRole, Placement)
from tests.reliability import kv


def _info(cluster_id, ip, port) -> LLMClusterInfo:
    info = LLMClusterInfo()
    if cluster_id is not None:
        info.remote_cluster_id = cluster_id
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info(ip, port)
    return info


class Peer:
    def __init__(self) -> None:
        self.dds: Dict[str, LLMDataDist] = {}
        self.blocks: Dict[str, kv.OwnedBlocks] = {}
        self.caches: Dict[str, tuple] = {}  # continuous caches: name -> (Cache, arrays)
        self.loops: Dict[str, kv.Loop] = {}

    def op_init(self, role, cluster_id, config, inst="main"):
        cfg = LLMConfig()
        for key, value in config.items():
            setattr(cfg, key, value)
        dd = LLMDataDist(LLMRole(role), cluster_id)
        dd.init(cfg.generate_options())
        self.dds[inst] = dd
        return {"pid": os.getpid()}

    def op_blocks(self, name, num_tensors, num_blocks, block_bytes, model_id=0, gen=1, pool=False,
                  remote_accessible=None, placement=0, inst="main"):
        dd = self.dds[inst]
        owned = kv.OwnedBlocks(dd.cache_manager, dd.cluster_id, model_id, num_tensors, num_blocks, block_bytes, gen,
                               pool, remote_accessible, Placement(placement))
        self.blocks[name] = owned
        return {"cache_id": owned.cache.cache_id, "addrs": owned.addrs}

    def op_renew(self, name, cycle=1):
        """One owner cycle now (release, garbage, next generation, register again)."""
        owned = self.blocks[name]
        owned.renew(cycle)
        return {"cache_id": owned.cache.cache_id, "gen": owned.gen}

    def op_continuous(self, name, num_tensors, batch, slot_bytes, req_ids, gen=1, inst="main"):
        """A registered continuous cache whose slot i is bound to CacheKey(req_id=req_ids[i]) (never consumed)."""
        dd = self.dds[inst]
        arrays = [np.empty((batch, slot_bytes), np.uint8) for _ in range(num_tensors)]
        kv.fill(arrays, gen)
        desc = CacheDesc(num_tensors, [batch, slot_bytes], DataType.DT_UINT8, Placement.HOST)
        keys = [CacheKey(dd.cluster_id, r, 0) for r in req_ids]
        cache = dd.cache_manager.register_cache(desc, [a.ctypes.data for a in arrays], keys)
        self.caches[name] = (cache, arrays)
        return {"cache_id": cache.cache_id}

    def op_churn_start(self, name, pause=0.0):
        owned = self.blocks[name]
        self.loops[name] = kv.Loop(owned.renew, f"churn-{name}", pause)
        return {}

    def op_push_start(self, name, cluster_id, model_id, src_blocks, dst_blocks, inst="main"):
        cm = self.dds[inst].cache_manager
        owned = self.blocks[name]
        key = BlocksCacheKey(cluster_id, model_id)
        self.loops[f"push-{name}"] = kv.Loop(lambda _i: cm.push_blocks(key, owned.cache, src_blocks, dst_blocks),
                                             f"push-{name}")
        return {}

    def op_stop(self, loop):
        result = self.loops.pop(loop).stop()
        owned = self.blocks.get(loop)
        if owned is not None:
            result["gen"] = owned.gen
        return result

    def op_release(self, name):
        self.blocks.pop(name).release()
        return {}

    def op_link(self, cluster_id, port, ip="127.0.0.1", timeout=5000, inst="main"):
        code, codes = self.dds[inst].link_clusters([_info(cluster_id, ip, port)], timeout)
        return {"code": int(code), "codes": [int(c) for c in codes]}

    def op_unlink(self, cluster_id, port, ip="127.0.0.1", force=False, timeout=3000, inst="main"):
        code, codes = self.dds[inst].unlink_clusters([_info(cluster_id, ip, port)], timeout, force=force)
        return {"code": int(code), "codes": [int(c) for c in codes]}

    def op_pull_slot(self, name, cluster_id, req_id, dst_index=0, inst="main"):
        cache, arrays = self.caches[name]
        self.dds[inst].cache_manager.pull_cache(CacheKey(cluster_id, req_id, 0), cache, dst_index)
        return {}

    def op_pull_by_id(self, name, cluster_id, cache_id, batch_index, inst="main"):
        cache, _ = self.caches[name]
        self.dds[inst].cache_manager.pull_cache(CacheKeyByIdAndIndex(cluster_id, cache_id, batch_index), cache, 0)
        return {}

    def op_check_blocks(self, name, gen):
        """Whether the blocks cache still holds generation ``gen`` everywhere."""
        owned = self.blocks[name]
        blocks = list(range(owned.arrays[0].shape[0]))
        return {"gen": kv.one_generation(owned.arrays, blocks, blocks), "expected": gen}

    def op_threads(self):
        """The names of this process's Python threads (for diagnostics in assertion messages)."""
        return {"names": sorted(t.name for t in threading.enumerate())}

    def op_finalize(self, inst="main"):
        self.dds.pop(inst).finalize()
        return {}

    def op_exit(self):
        for loop in list(self.loops.values()):
            loop.stop()
        for dd in list(self.dds.values()):
            dd.finalize()
        REPLIES.write(json.dumps({"ok": True}) + "\n")
        REPLIES.flush()
        os._exit(0)


REPLIES = sys.stdout  # the reply channel; library log lines go to stderr


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
        except Exception as exc:  # noqa: BLE001 - everything is reported to the test
            reply = {"ok": False, "code": -1, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
        REPLIES.write(json.dumps(reply) + "\n")
        REPLIES.flush()


if __name__ == "__main__":
    main()
