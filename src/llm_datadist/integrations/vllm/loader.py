"""Decode side: link to prefills once, pull (or await the push of) each request's blocks, report the outcome."""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Deque, Dict, List, Optional, Set, Tuple

from llm_datadist import BlocksCacheKey, Cache, LLMDataDist, LLMException, notifications
from llm_datadist.integrations.vllm import messages as msg
from llm_datadist.integrations.vllm.block_layout import KVLayout, block_pairs, blocks_for_tokens
from llm_datadist.integrations.vllm.config import ConnectorConfig, connector_logger
from llm_datadist.integrations.vllm.control import Control
from llm_datadist.integrations.vllm.datadist import link_prefill, unlink_prefill
from llm_datadist.integrations.vllm.metadata import LoadJob

__all__ = ["Peer", "Loader", "TransferStat"]

_log = connector_logger(__name__)
Endpoint = Tuple[str, int, int]  # (host, port, cluster id) of a prefill worker's llm_datadist
# (request id, mode, bytes, seconds from job start to release, seconds in pull_blocks (push: 0))
TransferStat = Tuple[str, str, int, float, float]


class Peer:
    """A linked prefill worker; ``alive`` until its link goes down."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.host, self.port, self.cluster_id = endpoint
        self.alive = True


class Loader:
    """Runs LoadJobs on a small thread pool; ``take_finished`` hands back (done ids, blocks that failed).

    ``control`` is set by the worker once its Control exists (it calls ``on_push_done`` and ``on_prefill_lost``).
    """

    def __init__(self, config: ConnectorConfig, datadist: LLMDataDist, cache: Cache, layout: KVLayout,
                 geometry: msg.Geometry, cluster_id: int, tp_rank: int) -> None:
        self._config = config
        self._datadist = datadist
        self._cache = cache
        self._layout = layout
        self._geometry = geometry
        self._cluster_id = cluster_id
        self._tp_rank = tp_rank
        self.control: Optional[Control] = None
        self._lock = threading.Lock()
        self._peers: Dict[Endpoint, Peer] = {}
        self._peer_locks: Dict[Endpoint, threading.Lock] = collections.defaultdict(threading.Lock)
        self._done: Dict[str, List[int]] = {}  # request id -> failed local blocks (empty: success)
        self._push_waits: Dict[str, Tuple[LoadJob, int, float, float]] = {}  # transfer id -> job, prefill...
        self.stats: Deque[TransferStat] = collections.deque(maxlen=4096)
        self._pool = concurrent.futures.ThreadPoolExecutor(config.load_threads, thread_name_prefix="llm-dd-vllm-load")
        self._closed = False

    # -- peers --------------------------------------------------------------------------------------
    def _control(self) -> Control:
        if self.control is None:
            raise ConnectionError("the connector's control messages are not set up")
        return self.control

    def _peer(self, endpoint: Endpoint) -> Peer:
        with self._peer_locks[endpoint]:
            peer = self._peers.get(endpoint)
            if peer is not None and peer.alive:
                return peer
            if peer is not None:
                self._forget(endpoint, peer)
            host, port, cluster_id = endpoint
            link_prefill(self._datadist, cluster_id, host, port, self._config.link_timeout_ms)
            peer = Peer(endpoint)
            self._peers[endpoint] = peer
            return peer

    def _forget(self, endpoint: Endpoint, peer: Peer) -> None:
        self._peers.pop(endpoint, None)
        peer.alive = False
        unlink_prefill(self._datadist, peer.cluster_id, peer.host, peer.port, self._config.link_timeout_ms)

    def on_prefill_lost(self, cluster_id: int) -> None:
        """The link to a prefill went down: its peer is dead, its pushes will not come."""
        with self._lock:
            for peer in self._peers.values():
                if peer.cluster_id == cluster_id:
                    peer.alive = False
            lost = [tid for tid, wait in self._push_waits.items() if wait[1] == cluster_id]
            jobs = [self._push_waits.pop(tid) for tid in lost]
        for job, _, started, _ in jobs:
            self._finish(job, "the link to the prefill went down before its push arrived", started)
        if jobs:
            _log.info("prefill cluster %d lost: %d pushes failed", cluster_id, len(jobs))

    def on_push_done(self, cluster_id: int, message: msg.PushDone) -> None:
        """A prefill's PushDone (a successful one arrives after the pushed bytes)."""
        with self._lock:
            wait = self._push_waits.get(message.transfer_id)
            if wait is None or wait[1] != cluster_id:
                return
            del self._push_waits[message.transfer_id]
        job, _, started, _ = wait
        if message.ok:
            self.stats.append((job.request_id, "push", message.nbytes, time.monotonic() - started, 0.0))
            self._finish(job, "", started)
        else:
            self._finish(job, f"the prefill's push failed: {message.reason}", started)

    # -- jobs ---------------------------------------------------------------------------------------
    def submit(self, job: LoadJob) -> None:
        """Start a load in the background (its outcome comes back through ``take_finished``)."""
        self._pool.submit(self._run, job)

    def _endpoint(self, job: LoadJob) -> Endpoint:
        endpoints = job.params.endpoints
        if self._tp_rank >= len(endpoints):
            raise ConnectionError(f"the prefill has {len(endpoints)} TP ranks, this decode worker is rank "
                                  f"{self._tp_rank}: use the same tensor-parallel size on both")
        return endpoints[self._tp_rank]

    def _run(self, job: LoadJob) -> None:
        started = time.monotonic()
        try:
            peer = self._peer(self._endpoint(job))
            if job.num_tokens == 0:
                self._control().release(peer.cluster_id, [job.params.request_id])
            elif job.params.mode == "push":
                self._start_push_wait(job, peer, started)
            else:
                self._pull(job, peer, started)
        except (ConnectionError, OSError, LLMException, ValueError) as exc:
            if job.num_tokens:
                self._finish(job, str(exc), started)
            else:
                _log.info("request %s: could not release the prefill's blocks (%s); its lease frees them",
                          job.request_id, exc)
        except Exception as exc:  # noqa: BLE001 - a worker thread must report every failure as data
            _log.exception("request %s: unexpected load failure", job.request_id)
            self._finish(job, repr(exc), started)

    def _pull(self, job: LoadJob, peer: Peer, started: float) -> None:
        remote_id = job.params.request_id
        control = self._control()
        reply = control.claim(peer.cluster_id, remote_id)
        if not reply.ok:
            raise ConnectionError(f"prefill refused the claim: {reply.reason}")
        released = False
        try:
            src, dst = block_pairs(reply.block_ids, job.local_block_ids, job.num_tokens, self._geometry.block_size,
                                   job.first_block)
            pull_began = time.monotonic()
            if src:  # the release goes with the pull: the prefill learns of it once every byte is here
                released = True
                notifications.pull_blocks(self._datadist, BlocksCacheKey(peer.cluster_id, self._config.model_id),
                                          self._cache, src, dst, control.release_payload([remote_id]),
                                          timeout_ms=self._config.link_timeout_ms)
        except notifications.NotificationNotDelivered as exc:  # the bytes are here: only the release is missing
            _log.info("request %s: release not delivered with the pull (%s); sending it again", job.request_id, exc)
            control.release(peer.cluster_id, [remote_id])
        except BaseException:
            control.release(peer.cluster_id, [remote_id])  # the pull failed: the blocks are not needed any more
            raise
        pull_s = time.monotonic() - pull_began
        if not released:
            control.release(peer.cluster_id, [remote_id])
        nbytes = len(src) * self._layout.num_regions * self._layout.block_nbytes
        self.stats.append((job.request_id, "pull", nbytes, time.monotonic() - started, pull_s))
        self._finish(job, "", started)

    def _start_push_wait(self, job: LoadJob, peer: Peer, started: float) -> None:
        needed = blocks_for_tokens(job.num_tokens, self._geometry.block_size)
        if len(job.local_block_ids) < needed:
            raise ValueError(f"{job.num_tokens} tokens need {needed} blocks, the decode allocated "
                             f"{len(job.local_block_ids)}")
        with self._lock:
            self._push_waits[job.params.request_id] = (job, peer.cluster_id, started,
                                                       started + self._config.push_timeout_s)
        try:
            self._control().push_ready(peer.cluster_id, job.params.request_id, list(job.local_block_ids[:needed]),
                                       job.num_tokens, job.first_block)
        except BaseException:
            with self._lock:
                self._push_waits.pop(job.params.request_id, None)
            raise

    def _finish(self, job: LoadJob, error: str, started: float) -> None:
        failed: List[int] = []
        if error:
            needed = blocks_for_tokens(job.num_tokens, self._geometry.block_size)
            failed = list(job.local_block_ids[job.first_block:needed]) or list(job.local_block_ids)
            _log.warning("request %s: KV load failed after %.3f s (%s); vLLM's kv_load_failure_policy applies",
                         job.request_id, time.monotonic() - started, error)
        with self._lock:
            self._done[job.request_id] = failed

    def _expire_push_waits(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [tid for tid, wait in self._push_waits.items() if wait[3] <= now]
            jobs = [self._push_waits.pop(tid) for tid in late]
        for job, _, started, _ in jobs:
            self._finish(job, f"no push arrived within push_timeout_s={self._config.push_timeout_s}", started)

    def take_finished(self) -> Tuple[Set[str], Set[int]]:
        """Requests whose load ended since the last call, and the local blocks of those that failed."""
        self._expire_push_waits()
        with self._lock:
            done, self._done = self._done, {}
        failed_blocks: Set[int] = set()
        for blocks in done.values():
            failed_blocks.update(blocks)
        return set(done), failed_blocks

    def close(self) -> None:
        """Stop the pool and unlink every prefill (they free what we held); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            peers = list(self._peers.items())
        for endpoint, peer in peers:
            self._forget(endpoint, peer)


