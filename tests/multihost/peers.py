"""The test side of the multihost peers: a driver for host_peer.py processes and byte-exact expectations."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import waiting

from llm_datadist.cli.netns import Host, SimulatedHosts
from tests.multihost.host_peer import SENTINEL, pattern, row_hash

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SRC = os.path.join(ROOT, "src")
LISTEN_PORT = 26000  # every host has its own network namespace: the same port on every host never clashes
PROMPT, DECODER = 1, 2
OK = 0


class PeerFailed(AssertionError):
    """A peer op that had to succeed failed, or the peer stopped answering."""


class HostPeer:
    """One host_peer.py process on a simulated host; ``call(op, **args)`` returns its reply."""

    def __init__(self, hosts: SimulatedHosts, host: Host, log_path: str, env: Optional[Dict[str, str]] = None):
        self.host = host
        self.log_path = log_path
        environ = dict(os.environ)
        environ["PYTHONPATH"] = os.pathsep.join([SRC, ROOT, environ.get("PYTHONPATH", "")])
        environ.setdefault("LLM_DATADIST_LOG_LEVEL", "INFO")
        environ.update(env or {})
        self._log = open(log_path, "w")
        self.proc = hosts.popen(host, [sys.executable, os.path.join(HERE, "host_peer.py")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=self._log, text=True, env=environ)
        self._replies: queue.Queue[Optional[dict]] = queue.Queue()
        self._next_id = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name=f"peer-reader-{host.index}", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def request(self, op: str, timeout: float = 60.0, **args: Any) -> Dict[str, Any]:
        """Send one op and wait for its reply (PeerFailed when the peer is gone or silent past ``timeout``)."""
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            try:
                self.proc.stdin.write(json.dumps({"op": op, "id": request_id, **args}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise PeerFailed(f"peer on {self.host.hostname} is gone ({exc}); log:\n{self.log()}") from None
            deadline = time.monotonic() + timeout
            while True:
                try:
                    reply = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise PeerFailed(f"peer on {self.host.hostname}: no reply to {op} within {timeout} s") from None
                if reply is None:
                    raise PeerFailed(f"peer on {self.host.hostname} exited during {op}; log:\n{self.log()}")
                if reply.get("id") == request_id:
                    return reply

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Dict[str, Any]:
        """Like :meth:`request`, but the op must succeed."""
        reply = self.request(op, timeout, **args)
        if not reply.get("ok"):
            raise PeerFailed(f"{op} on {self.host.hostname} failed: {reply}")
        return reply

    def join(self, tag: str, timeout: float = 60.0) -> Dict[str, Any]:
        """The reply of a background op started with ``bg=tag``."""
        return self.call("join", timeout=timeout + 5.0, tag=tag, wait_s=timeout)["reply"]

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-6000:]

    def close(self) -> None:
        """Ask the peer to finalize and exit; the simulated hosts kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.request("exit", timeout=15.0)
            except PeerFailed:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


# ----------------------------------------------------------------------------------------------
# Instances
# ----------------------------------------------------------------------------------------------
def config(host: Host, listen: bool = True, **extra: Any) -> Dict[str, Any]:
    """LLMConfig attributes: cache-manager mode, listening on the host's address when ``listen``."""
    cfg: Dict[str, Any] = {"enable_cache_manager": True, "sync_kv_timeout": 5000}
    if listen:
        cfg["listen_ip_info"] = f"{host.ip}:{LISTEN_PORT}"
    cfg.update(extra)
    return cfg


def cluster(host: Host, cluster_id: Optional[int], local: Optional[Host] = None) -> Dict[str, Any]:
    """The link_clusters entry for the instance listening on ``host``."""
    return {"ip": host.ip, "port": LISTEN_PORT, "cluster_id": cluster_id, "local_ip": local.ip if local else None}


def link(peer: HostPeer, target: HostPeer, cluster_id: int, timeout_ms: int = 5000) -> None:
    """``peer`` links to the instance listening on ``target``'s host; the link must succeed."""
    reply = peer.call("link_clusters", clusters=[cluster(target.host, cluster_id, peer.host)], timeout_ms=timeout_ms)
    assert (reply["code"], reply["codes"]) == (OK, [OK]), reply


# ----------------------------------------------------------------------------------------------
# Expected bytes
# ----------------------------------------------------------------------------------------------
def source(seed: int, num_tensors: int, rows: int, row_bytes: int) -> List[np.ndarray]:
    """The tensors a peer registered with ``seed`` (rows = blocks or batch slots)."""
    return [pattern(seed, t, rows * row_bytes).reshape(rows, row_bytes) for t in range(num_tensors)]


class Expected:
    """What a destination cache must hold, row by row: SENTINEL (or ``initial``) except the rows set here."""

    def __init__(self, num_tensors: int, rows: int, row_bytes: int,
                 initial: Optional[Sequence[np.ndarray]] = None) -> None:
        untouched = row_hash(np.full(row_bytes, SENTINEL, np.uint8))
        if initial is None:
            self.rows = [[untouched] * rows for _ in range(num_tensors)]
        else:  # a cache registered with a pattern: it starts as that pattern
            self.rows = [[row_hash(row) for row in initial[t]] for t in range(num_tensors)]

    def put(self, src: Sequence[np.ndarray], pairs: Iterable[Tuple[int, int]],
            tensors: Optional[Iterable[int]] = None, src_tensors: Optional[Sequence[int]] = None) -> Expected:
        """Rows ``dst`` of ``tensors`` hold rows ``src_row`` of ``src`` (same tensor, or ``src_tensors[i]``)."""
        chosen = list(range(len(self.rows)) if tensors is None else tensors)
        pairs = list(pairs)
        for i, t in enumerate(chosen):
            s = t if src_tensors is None else src_tensors[i]
            for src_row, dst_row in pairs:
                self.rows[t][dst_row] = row_hash(src[s][src_row])
        return self

    def check(self, peer: HostPeer, name: str, skip_rows: Iterable[int] = ()) -> None:
        """Every byte of the peer's cache ``name`` as expected (compared through per-row digests).

        ``skip_rows`` are left unchecked (rows a failed transfer may have written in part).
        """
        got = peer.call("hashes", name=name)["tensors"]
        assert len(got) == len(self.rows), f"{name}: {len(got)} tensors, expected {len(self.rows)}"
        skip = set(skip_rows)
        bad = [(t, r) for t in range(len(self.rows)) for r in range(len(self.rows[t]))
               if r not in skip and got[t][r] != self.rows[t][r]]
        assert not bad, f"{name} on {peer.host.hostname}: {len(bad)} rows differ, first (tensor, row): {bad[:10]}"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll ``predicate`` until it is true (``waiting.wait_until``); AssertionError naming ``what`` after
    ``timeout`` seconds."""
    if not waiting.wait_until(predicate, timeout, interval):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def finalize_leaves_nothing(peer: HostPeer, grace_s: float = 5.0) -> None:
    """Finalize the peer's instance; then its threads, open descriptors and /dev/shm entries must be back
    to what they were before the instance existed."""
    peer.call("finalize")
    state: Dict[str, Any] = {}

    def clean() -> bool:
        state.update(peer.call("resources"))
        now, before = state["now"], state["before"]
        return all(now[k] == before[k] for k in ("threads", "fds", "shm"))

    try:
        wait_until(clean, grace_s, "threads, descriptors and shared memory to be released", interval=0.05)
    except AssertionError:
        now, before = state["now"], state["before"]
        diff = {k: {"before": before[k], "after": now[k]} for k in ("threads", "fds", "shm") if now[k] != before[k]}
        raise AssertionError(f"finalize on {peer.host.hostname} left: {diff}") from None
