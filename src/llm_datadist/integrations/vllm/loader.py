"""Decode side: link to prefills once, pull (or await the push of) each request's blocks, report the outcome."""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Deque, Dict, List, Set, Tuple

from llm_datadist import BlocksCacheKey, Cache, LLMDataDist, LLMException
from llm_datadist.integrations.vllm import protocol as proto
from llm_datadist.integrations.vllm.block_layout import KVLayout, block_pairs, blocks_for_tokens
from llm_datadist.integrations.vllm.config import ConnectorConfig, connector_logger
from llm_datadist.integrations.vllm.datadist import link_prefill, unlink_prefill
from llm_datadist.integrations.vllm.metadata import LoadJob
from llm_datadist.integrations.vllm.side_channel import ControlClient

__all__ = ["Peer", "Loader", "TransferStat"]

_log = connector_logger(__name__)
Endpoint = Tuple[str, int]
# (request id, mode, bytes, seconds from job start to release, seconds in pull_blocks (push: 0))
TransferStat = Tuple[str, str, int, float, float]


class Peer:
    """A linked prefill worker: its control-channel client and its llm_datadist identity."""

    def __init__(self, client: ControlClient, welcome: proto.Welcome) -> None:
        self.client = client
        self.cluster_id = welcome.cluster_id
        self.datadist_host = welcome.datadist_host
        self.datadist_port = welcome.datadist_port


class Loader:
    """Runs LoadJobs on a small thread pool; ``take_finished`` hands back (done ids, blocks that failed)."""

    def __init__(self, config: ConnectorConfig, datadist: LLMDataDist, cache: Cache, layout: KVLayout,
                 geometry: proto.Geometry, cluster_id: int, tp_rank: int) -> None:
        self._config = config
        self._datadist = datadist
        self._cache = cache
        self._layout = layout
        self._geometry = geometry
        self._cluster_id = cluster_id
        self._tp_rank = tp_rank
        self._lock = threading.Lock()
        self._peers: Dict[Endpoint, Peer] = {}
        self._peer_locks: Dict[Endpoint, threading.Lock] = collections.defaultdict(threading.Lock)
        self._dead: List[Peer] = []
        self._done: Dict[str, List[int]] = {}  # request id -> failed local blocks (empty: success)
        self._push_waits: Dict[str, Tuple[LoadJob, ControlClient, float, float]] = {}  # transfer id -> job...
        self.stats: Deque[TransferStat] = collections.deque(maxlen=4096)
        self._pool = concurrent.futures.ThreadPoolExecutor(config.load_threads, thread_name_prefix="llm-dd-vllm-load")
        self._closed = False

    # -- peers --------------------------------------------------------------------------------------
    def _peer(self, endpoint: Endpoint) -> Peer:
        with self._peer_locks[endpoint]:
            peer = self._peers.get(endpoint)
            if peer is not None and peer.client.alive:
                return peer
            if peer is not None:
                self._forget(endpoint, peer)
            client = ControlClient(endpoint[0], endpoint[1], self._config.link_secret, self._cluster_id,
                                   self._config.link_timeout_s, self._on_push_done, self._on_lost)
            welcome = client.connect()
            if welcome.geometry != self._geometry:
                client.close()
                raise ConnectionError(f"prefill {endpoint[0]}:{endpoint[1]} has KV geometry {welcome.geometry}, "
                                      f"this decode {self._geometry}: run the same model and block size")
            try:
                link_prefill(self._datadist, welcome.cluster_id, welcome.datadist_host, welcome.datadist_port,
                             self._config.link_timeout_ms)
            except BaseException:
                client.close()
                raise
            peer = Peer(client, welcome)
            self._peers[endpoint] = peer
            return peer

    def _forget(self, endpoint: Endpoint, peer: Peer) -> None:
        self._peers.pop(endpoint, None)
        peer.client.close()
        unlink_prefill(self._datadist, peer.cluster_id, peer.datadist_host, peer.datadist_port,
                       self._config.link_timeout_ms)

    def _on_lost(self, client: ControlClient) -> None:
        now = time.monotonic()
        with self._lock:
            lost = [tid for tid, wait in self._push_waits.items() if wait[1] is client]
            jobs = [self._push_waits.pop(tid)[0] for tid in lost]
        for job in jobs:
            self._finish(job, "control channel to the prefill lost before its push arrived", now)

    def _on_push_done(self, message: proto.PushDone) -> None:
        with self._lock:
            wait = self._push_waits.pop(message.transfer_id, None)
        if wait is None:
            return
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
                peer.client.release([job.params.request_id])
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
        reply = peer.client.claim(remote_id)
        if not reply.ok:
            raise ConnectionError(f"prefill refused the claim: {reply.reason}")
        try:
            src, dst = block_pairs(reply.block_ids, job.local_block_ids, job.num_tokens, self._geometry.block_size,
                                   job.first_block)
            pull_began = time.monotonic()
            if src:
                self._datadist.cache_manager.pull_blocks(BlocksCacheKey(peer.cluster_id, self._config.model_id),
                                                         self._cache, src, dst)
            pull_s = time.monotonic() - pull_began
        finally:
            peer.client.release([remote_id])
        nbytes = len(src) * self._layout.num_regions * self._layout.block_nbytes
        self.stats.append((job.request_id, "pull", nbytes, time.monotonic() - started, pull_s))
        self._finish(job, "", started)

    def _start_push_wait(self, job: LoadJob, peer: Peer, started: float) -> None:
        needed = blocks_for_tokens(job.num_tokens, self._geometry.block_size)
        if len(job.local_block_ids) < needed:
            raise ValueError(f"{job.num_tokens} tokens need {needed} blocks, the decode allocated "
                             f"{len(job.local_block_ids)}")
        with self._lock:
            self._push_waits[job.params.request_id] = (job, peer.client, started,
                                                       started + self._config.push_timeout_s)
        try:
            peer.client.push_ready(proto.PushReady(job.params.request_id, self._cluster_id,
                                                   list(job.local_block_ids[:needed]), job.num_tokens,
                                                   job.first_block))
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
        """Stop the pool, close every control channel (prefills free what we held) and drop links; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            peers = list(self._peers.items())
        for endpoint, peer in peers:
            self._forget(endpoint, peer)


