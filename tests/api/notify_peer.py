"""A peer process for the notification tests: JSON-line commands on stdin, one JSON reply per line on stdout.

It holds one LLMDataDist (remote-cache-accessible mode, a blocks cache under BlocksCacheKey(own id, 0)) and
answers ``init``, ``link``, ``unlink``, ``send``, ``push``, ``pull``, ``fill``, ``check``, ``poll``,
``link_down``, ``limit``, ``watch``, ``verdicts``, ``stats`` (the instance's statistics snapshot) and ``metrics``
(the address of the process's /metrics endpoint, started by ``LLM_DATADIST_METRICS_PORT``). A failing library
call replies ``{"ok": true, "code": <status name>}``; a bug replies ``{"ok": false, ...}``.

``watch`` sets a notification callback that, the moment a notification arrives, acts on the blocks its payload
names (JSON ``{"blocks": [...], "seed": n}``): after a push it checks every byte of them against ``seed``'s pattern
(a verdict per notification), after a pull it overwrites them at once with another pattern (the owner reuses
blocks it was told are no longer needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import traceback
from typing import Dict, List

import numpy as np

from llm_datadist import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig, LLMDataDist, LLMException,
                          LLMRole, Placement, metrics, notifications, stats)

NUM_TENSORS = 2
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "src")
CALL_S = 60.0


def pattern(seed: int, tensor: int, block: int, nbytes: int) -> np.ndarray:
    """The content of block ``block`` of tensor ``tensor`` filled with ``seed``."""
    return np.random.default_rng([seed, tensor, block]).integers(0, 256, nbytes, dtype=np.uint8)


def _cluster(cluster_id: int, port: int) -> LLMClusterInfo:
    info = LLMClusterInfo()
    info.remote_cluster_id = cluster_id
    info.append_remote_ip_info("127.0.0.1", port)
    return info


class Peer:
    def __init__(self) -> None:
        self.dd = None
        self.cache = None
        self.arrays = []
        self.block_bytes = 0
        self.verdicts = []  # (after, seed, every byte right) per watched notification
        self.lock = threading.Lock()

    def op_init(self, cluster_id, listen=False, secret="", num_blocks=16, block_bytes=4096, backend=""):
        if backend:  # the routes this instance offers (both ends must offer it)
            os.environ["LLM_DATADIST_TRANSPORT"] = backend
        options = LLMConfig()
        options.enable_cache_manager = True
        options.enable_remote_cache_accessible = True
        if listen:
            options.listen_ip_info = "127.0.0.1:0"
        if secret:
            options.link_secret = secret
        self.dd = LLMDataDist(LLMRole.PROMPT if listen else LLMRole.DECODER, cluster_id)
        self.dd.init(options.generate_options())
        self.block_bytes = block_bytes
        self.arrays = [np.zeros((num_blocks, block_bytes), np.uint8) for _ in range(NUM_TENSORS)]
        desc = CacheDesc(NUM_TENSORS, [num_blocks, block_bytes], DataType.DT_UINT8, Placement.HOST)
        self.cache = self.dd.cache_manager.register_blocks_cache(desc, [a.ctypes.data for a in self.arrays],
                                                                 BlocksCacheKey(cluster_id, 0), True)
        address = notifications.listen_address(self.dd)
        return {"port": address[1] if address else 0, "pid": os.getpid()}

    def op_link(self, cluster_id, port, timeout_ms=5000):
        _, codes = self.dd.link_clusters([_cluster(cluster_id, port)], timeout_ms)
        return {"code": codes[0].name}

    def op_unlink(self, cluster_id, port):
        _, codes = self.dd.unlink_clusters([_cluster(cluster_id, port)], 5000)
        return {"code": codes[0].name}

    def op_send(self, cluster_id, payloads, timeout_ms=None):
        """Send each hex payload in order; stops at the first failure: {"sent": n, "code": name of the failure}."""
        for sent, payload in enumerate(payloads):
            try:
                notifications.send(self.dd, cluster_id, bytes.fromhex(payload), timeout_ms)
            except LLMException as exc:
                return {"sent": sent, "code": exc.status_code.name}
        return {"sent": len(payloads), "code": "LLM_SUCCESS"}

    def _fill(self, blocks, seed):
        for t, array in enumerate(self.arrays):
            for b in blocks:
                array[b] = pattern(seed, t, b, self.block_bytes)

    def _right(self, blocks, seed, mapping=None):
        return all(np.array_equal(array[b], pattern(seed, t, (mapping or {}).get(b, b), self.block_bytes))
                   for t, array in enumerate(self.arrays) for b in blocks)

    def op_fill(self, blocks, seed):
        self._fill(blocks, seed)
        return {}

    def op_check(self, blocks, seed, src_blocks=None):
        """Whether every byte of ``blocks`` is ``seed``'s pattern of ``src_blocks`` (default: the same blocks)."""
        mapping = dict(zip(blocks, src_blocks or blocks))
        return {"right": self._right(blocks, seed, mapping)}

    def op_push(self, cluster_id, src_blocks, dst_blocks, seed):
        """Fill ``src_blocks`` with ``seed``'s pattern of ``dst_blocks``, push them with a notification naming them."""
        for t, array in enumerate(self.arrays):
            for s, d in zip(src_blocks, dst_blocks):
                array[s] = pattern(seed, t, d, self.block_bytes)
        payload = json.dumps({"blocks": dst_blocks, "seed": seed}).encode()
        try:
            notifications.push_blocks(self.dd, BlocksCacheKey(cluster_id, 0), self.cache, src_blocks, dst_blocks,
                                      payload)
        except LLMException as exc:
            return {"code": exc.status_code.name}
        return {"code": "LLM_SUCCESS"}

    def op_pull(self, cluster_id, src_blocks, dst_blocks, seed):
        """Pull with a notification naming the source blocks; then check every pulled byte against ``seed``."""
        payload = json.dumps({"blocks": src_blocks, "seed": seed}).encode()
        try:
            notifications.pull_blocks(self.dd, BlocksCacheKey(cluster_id, 0), self.cache, src_blocks, dst_blocks,
                                      payload)
        except LLMException as exc:
            return {"code": exc.status_code.name}
        return {"code": "LLM_SUCCESS", "right": self._right(dst_blocks, seed, dict(zip(dst_blocks, src_blocks)))}

    def op_watch(self):
        def on_note(note):
            info = json.loads(note.payload)
            if note.after == "push":
                right = self._right(info["blocks"], info["seed"])
            else:  # after a pull: the puller has the bytes, reuse the blocks at once
                self._fill(info["blocks"], info["seed"] + 1_000_000)
                right = True
            with self.lock:
                self.verdicts.append([note.after, info["seed"], right, note.cluster_id])

        notifications.set_callback(self.dd, on_note)
        return {}

    def op_verdicts(self):
        with self.lock:
            return {"verdicts": list(self.verdicts)}

    def op_poll(self, max_count=64, timeout_ms=0):
        notes = notifications.poll(self.dd, max_count, timeout_ms)
        return {"notes": [[n.cluster_id, n.payload.hex(), n.after, n.link_id] for n in notes]}

    def op_link_down(self, timeout_ms=0):
        downs = notifications.poll_link_down(self.dd, 64, timeout_ms)
        return {"downs": [[d.cluster_id, d.cause, d.linked, d.link_id] for d in downs]}

    def op_limit(self, max_count):
        notifications.set_queue_limit(self.dd, max_count)
        return {"queued": list(notifications.queued(self.dd))}

    def op_stats(self):
        return {"stats": stats.snapshot(self.dd).to_dict()}

    def op_metrics(self):
        address = metrics.server_address()
        return {"address": list(address) if address else None}

    def op_queued(self):
        return {"queued": list(notifications.queued(self.dd))}


class PeerClient:
    """The test side of a notify_peer.py process: ``call(op, **args)`` returns its reply (AssertionError when the op
    failed)."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.port = 0

    def call(self, op: str, **args) -> Dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line: List[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(CALL_S)
        assert line and line[0], f"peer gave no answer to {op} (exit code {self.proc.poll()})"
        reply = json.loads(line[0])
        assert reply.pop("ok"), reply
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(30)


    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def main() -> None:
    peer = Peer()
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.pop("op")
        if op == "exit":
            break
        try:
            reply = {"ok": True, **getattr(peer, "op_" + op)(**command)}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
            reply = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    if peer.dd is not None:
        peer.dd.finalize()


if __name__ == "__main__":
    main()
