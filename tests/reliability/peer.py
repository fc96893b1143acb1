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

from llm_datadist import BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMException, LLMRole, Placement
from tests.reliability import kv, local


class Peer:
    """The commands: ``op_<name>(**args)`` returns the reply fields; instances, caches and loops by name."""

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

    def op_continuous(self, name, num_tensors, batch, slot_bytes, gen=1, pool=False, inst="main"):
        """A continuous cache without keys (peers pull it by cache id and batch index): registered numpy arrays,
        or allocated from the HOST pool."""
        cm = self.dds[inst].cache_manager
        desc = CacheDesc(num_tensors, [batch, slot_bytes], DataType.DT_UINT8, Placement.HOST)
        if pool:
            cache = cm.allocate_cache(desc, [])
            arrays = [kv.raw_view(a, batch * slot_bytes).reshape(batch, slot_bytes) for a in cache.tensor_addrs]
        else:
            arrays = [np.empty((batch, slot_bytes), np.uint8) for _ in range(num_tensors)]
            cache = cm.register_cache(desc, [a.ctypes.data for a in arrays], [])
        kv.fill(arrays, gen)
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

    def op_check_blocks(self, name, gen):
        """Whether the blocks cache still holds generation ``gen`` everywhere."""
        owned = self.blocks[name]
        blocks = list(range(owned.arrays[0].shape[0]))
        return {"gen": kv.one_generation(owned.arrays, blocks, blocks), "expected": gen}

    def op_link_clusters(self, cluster_id, port, timeout_ms=5000, inst="main"):
        """link_clusters to one listener on 127.0.0.1; returns the overall and per-cluster codes."""
        code, codes = self.dds[inst].link_clusters([local.cluster(cluster_id, port)], timeout_ms)
        return {"code": int(code), "codes": [int(c) for c in codes]}

    def op_unlink_clusters(self, cluster_id, port, force=False, inst="main"):
        code, _codes = self.dds[inst].unlink_clusters([local.cluster(cluster_id, port)], 3000, force=force)
        return {"code": int(code)}

    def op_comm_link(self, comm_name, ranks, rank_table, inst="main"):
        """Rank-table link(); ``ranks`` is [[cluster_id, rank], ...]."""
        return {"comm_id": self.dds[inst].link(comm_name, {int(c): int(r) for c, r in ranks}, rank_table)}

    def op_comm_status(self, comm_id, inst="main"):
        return {"status": int(self.dds[inst].query_register_mem_status(comm_id).value)}

    def op_release(self, name):
        """unregister_cache (or deallocate) of a blocks cache; the caller sees LLM_TIMEOUT while peers hold it."""
        self.blocks[name].release()
        return {}

    def op_route(self, cluster_id, inst="main"):
        """The transports that carried this instance's transfers to a cluster (a test-only probe)."""
        return {"route": self.dds[inst]._engine.route(cluster_id, every=True)}

    def op_threads(self):
        """The names of this process's Python threads (for diagnostics in assertion messages)."""
        return {"names": sorted(t.name for t in threading.enumerate())}

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
