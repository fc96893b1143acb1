"""A peer process on a simulated host: JSON-line commands on stdin, one JSON reply per command on stdout.

Uses the public API only. The replies keep the original stdout; anything else printed to stdout (the
library's log lines) goes to stderr, so replies and logs never mix. An op with ``"bg": TAG`` runs in a thread and
answers at once; ``join`` with that tag
returns its reply. Every reply carries ``elapsed`` (seconds the call took) and, on failure, the status code.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

import numpy as np

import llm_datadist as api

SENTINEL = 0xEE


def pattern(seed: int, tensor: int, nbytes: int) -> np.ndarray:
    """The content of tensor ``tensor`` of a cache filled with ``seed`` (never a SENTINEL byte)."""
    data = np.random.default_rng(seed * 7919 + tensor).integers(0, 256, nbytes, dtype=np.uint8)
    data[data == SENTINEL] = 0x11
    return data


def row_hash(row: np.ndarray) -> str:
    """The digest the peer reports for one row (block or batch slot) of a tensor."""
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).hexdigest()


def _key(spec: Dict[str, Any]):
    """A cache key from its JSON form: kind blocks / key / idx."""
    kind = spec["kind"]
    if kind == "blocks":
        return api.BlocksCacheKey(spec["cluster_id"], spec.get("model_id", 0))
    if kind == "key":
        return api.CacheKey(spec["cluster_id"], spec["req_id"], spec.get("model_id", 0))
    if kind == "idx":
        return api.CacheKeyByIdAndIndex(spec["cluster_id"], spec["cache_id"], spec.get("batch_index", 0))
    raise ValueError(f"unknown key kind {kind!r}")


def _layers(args: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in ("src_layer_range", "dst_layer_range"):
        if args.get(name) is not None:
            out[name] = range(*args[name])
    if args.get("tensor_num_per_layer") is not None:
        out["tensor_num_per_layer"] = args["tensor_num_per_layer"]
    return out


class _Synchronizer(api.LayerSynchronizer):
    """A LayerSynchronizer whose layers the test releases one by one (op ``release_layer``)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.asked: List[int] = []
        self._released: Dict[int, bool] = {}
        self._cond = threading.Condition()

    def synchronize_layer(self, layer_index, timeout_in_millis=None):
        with self._cond:
            self.asked.append(int(layer_index))
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: layer_index in self._released, self.timeout_s):
                return False
            return self._released[layer_index]

    def release(self, layer: int, ok: bool) -> None:
        with self._cond:
            self._released[layer] = ok
            self._cond.notify_all()


class Peer:
    """The state of this process: one LLMDataDist, named caches, background ops, a layer-wise task."""

    def __init__(self) -> None:
        self.dd = None
        self.caches: Dict[str, Any] = {}  # name -> (Cache, [arrays])
        self.bg: Dict[str, threading.Thread] = {}
        self.bg_replies: Dict[str, Dict[str, Any]] = {}
        self.task = None
        self.sync: Optional[_Synchronizer] = None
        self.baseline: Dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------------------
    def op_init(self, role: int, cluster_id: int, config: Dict[str, Any]):
        self.baseline = _resources()
        cfg = api.LLMConfig()
        for key, value in config.items():
            setattr(cfg, key, value)
        self.dd = api.LLMDataDist(api.LLMRole(role), cluster_id)
        self.dd.init(cfg.generate_options())
        return {"pid": os.getpid(), "hostname": socket.gethostname()}

    def op_register(self, name: str, num_tensors: int, num_blocks: int, block_bytes: int, seed: Optional[int] = None,
                    blocks: bool = True, model_id: Optional[int] = None, keys=(), remote_accessible=None):
        if seed is None:
            arrays = [np.full((num_blocks, block_bytes), SENTINEL, np.uint8) for _ in range(num_tensors)]
        else:
            arrays = [pattern(seed, t, num_blocks * block_bytes).reshape(num_blocks, block_bytes)
                      for t in range(num_tensors)]
        desc = api.CacheDesc(num_tensors, [num_blocks, block_bytes], api.DataType.DT_UINT8, api.Placement.DEVICE)
        addrs = [int(a.ctypes.data) for a in arrays]
        cm = self.dd.cache_manager
        if blocks:
            key = None if model_id is None else api.BlocksCacheKey(self.dd.cluster_id, model_id)
            cache = cm.register_blocks_cache(desc, addrs, key, remote_accessible)
        else:
            cache_keys = [api.CacheKey(self.dd.cluster_id, req, model) for req, model in keys]
            cache = cm.register_cache(desc, addrs, cache_keys, remote_accessible)
        self.caches[name] = (cache, arrays)
        return {"cache_id": cache.cache_id, "addrs": addrs}

    def op_hashes(self, name: str):
        """Per tensor, the digest of every row (block or slot): the test compares them byte for byte."""
        _cache, arrays = self.caches[name]
        return {"tensors": [[row_hash(row) for row in array] for array in arrays]}

    # -- links ----------------------------------------------------------------------------------
    def _infos(self, clusters):
        infos = []
        for c in clusters:
            info = api.LLMClusterInfo()
            if c.get("cluster_id") is not None:
                info.remote_cluster_id = c["cluster_id"]
            if c.get("local_ip"):
                info.append_local_ip_info(c["local_ip"], 0)
            info.append_remote_ip_info(c["ip"], c["port"])
            infos.append(info)
        return infos

    def op_link_clusters(self, clusters, timeout_ms: int = 5000):
        code, codes = self.dd.link_clusters(self._infos(clusters), timeout_ms)
        return {"code": int(code), "codes": [int(x) for x in codes]}

    def op_unlink_clusters(self, clusters, timeout_ms: int = 5000, force: bool = False):
        code, codes = self.dd.unlink_clusters(self._infos(clusters), timeout_ms, force=force)
        return {"code": int(code), "codes": [int(x) for x in codes]}

    def op_link(self, comm_name: str, ranks, rank_table: str):
        return {"comm_id": self.dd.link(comm_name, {int(k): int(v) for k, v in ranks}, rank_table)}

    def op_wait_comm(self, comm_id: int, wait_s: float = 20.0):
        """Poll query_register_mem_status until it leaves PREPARING (1) or the deadline passes."""
        deadline = time.monotonic() + wait_s
        status = self.dd.query_register_mem_status(comm_id).value
        while status == 1 and time.monotonic() < deadline:
            time.sleep(0.01)
            status = self.dd.query_register_mem_status(comm_id).value
        return {"status": status}

    # -- transfers ------------------------------------------------------------------------------
    def op_pull_blocks(self, name: str, src, src_blocks=(), dst_blocks=(), **layers):
        cache, _ = self.caches[name]
        self.dd.cache_manager.pull_blocks(_key(src), cache, list(src_blocks), list(dst_blocks), **_layers(layers))
        return {}

    def op_pull_cache(self, name: str, src, batch_index: int = 0, size: int = -1, **layers):
        cache, _ = self.caches[name]
        self.dd.cache_manager.pull_cache(_key(src), cache, batch_index, size, **_layers(layers))
        return {}

    def op_push_blocks(self, name: str, dst, src_blocks=(), dst_blocks=(), **layers):
        cache, _ = self.caches[name]
        self.dd.cache_manager.push_blocks(_key(dst), cache, list(src_blocks), list(dst_blocks), **_layers(layers))
        return {}

    def op_push_cache(self, name: str, dst, src_batch_index: int = 0, **layers):
        cache, _ = self.caches[name]
        self.dd.cache_manager.push_cache(_key(dst), cache, src_batch_index, **_layers(layers))
        return {}

    def op_transfer_async(self, name: str, configs, src_blocks=None, dst_blocks=None, wait_s: float = 30.0):
        """Start transfer_cache_async with a test-released synchronizer; configs: key or addrs destinations."""
        cache, _ = self.caches[name]
        made = []
        for c in configs:
            if "key" in c:
                made.append(api.TransferWithCacheKeyConfig(_key(c["key"]), range(*c["src_layers"]),
                                                           range(*c["dst_layers"])))
            else:
                made.append(api.TransferConfig(c["dst_cluster_id"], c["dst_addrs"], range(*c["src_layers"]),
                                               c.get("src_batch_index", 0)))
        self.sync = _Synchronizer(wait_s)
        self.task = self.dd.cache_manager.transfer_cache_async(cache, self.sync, made, src_blocks, dst_blocks)
        return {}

    def op_asked_layers(self):
        return {"asked": list(self.sync.asked)}

    def op_release_layer(self, layer: int, ok: bool = True):
        self.sync.release(layer, ok)
        return {}

    def op_task_wait(self, timeout_ms: int = 30000):
        code = self.task.synchronize(timeout_ms)
        return {"code": int(code), "results": [int(c) for c in self.task.get_results(0)]}

    # -- lifecycle ------------------------------------------------------------------------------
    def op_resources(self):
        """Threads and open descriptors now, and at init (before the instance existed)."""
        return {"now": _resources(), "before": self.baseline}

    def op_finalize(self):
        self.dd.finalize()
        self.caches.clear()
        return {}

    def op_join(self, tag: str, wait_s: float = 60.0):
        thread = self.bg.pop(tag)
        thread.join(wait_s)
        if thread.is_alive():
            raise TimeoutError(f"background op {tag} still running after {wait_s} s")
        return {"reply": self.bg_replies.pop(tag)}


def _resources() -> Dict[str, Any]:
    kinds: Dict[str, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    shm = sorted(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else []
    return {"threads": sorted(t.name for t in threading.enumerate()), "fds": kinds, "shm": shm,
            "rss_kib": _rss_kib()}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _execute(peer: Peer, op: str, args: Dict[str, Any]) -> Dict[str, Any]:
    started = time.monotonic()
    try:
        reply = {"ok": True, **getattr(peer, f"op_{op}")(**args)}
    except api.LLMException as exc:
        reply = {"ok": False, "code": int(exc.status_code), "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the test
        reply = {"ok": False, "code": -1, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
    reply["elapsed"] = time.monotonic() - started
    return reply


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the library logs to stdout: send it to stderr, keep the reply channel clean
    sys.stdout = sys.stderr
    peer = Peer()
    lock = threading.Lock()

    def answer(request_id: int, reply: Dict[str, Any]) -> None:
        with lock:
            replies.write(json.dumps({"id": request_id, **reply}) + "\n")

    for line in sys.stdin:
        request = json.loads(line)
        request_id, op, tag = request.pop("id"), request.pop("op"), request.pop("bg", None)
        if op == "exit":
            if peer.dd is not None:
                peer.dd.finalize()
            answer(request_id, {"ok": True})
            os._exit(0)
        if tag is None:
            answer(request_id, _execute(peer, op, request))
            continue

        def run(tag=tag, op=op, request=request) -> None:
            peer.bg_replies[tag] = _execute(peer, op, request)

        peer.bg[tag] = threading.Thread(target=run, name=f"bg-{tag}", daemon=True)
        peer.bg[tag].start()
        answer(request_id, {"ok": True, "started": tag, "elapsed": 0.0})


if __name__ == "__main__":
    main()
