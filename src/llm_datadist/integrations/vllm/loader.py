"""Decode side: link to prefills once, pull (or await the push of) each request's blocks, report the outcome."""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Deque, Dict, List, Optional, Sequence, Set, Tuple

from llm_datadist import BlocksCacheKey, Cache, LLMDataDist, LLMException
from llm_datadist.integrations.vllm import messages as msg
from llm_datadist.integrations.vllm.block_layout import KVLayout, blocks_for_tokens
from llm_datadist.integrations.vllm.compat import IncompatiblePeer
from llm_datadist.integrations.vllm.config import ConnectorConfig, connector_logger
from llm_datadist.integrations.vllm.control import Control
from llm_datadist.integrations.vllm.datadist import link_prefill, unlink_prefill
from llm_datadist.integrations.vllm.kv_groups import grouped_block_pairs, split_groups
from llm_datadist.integrations.vllm.metadata import LoadJob, TransferParams
from llm_datadist.integrations.vllm.stats import PULLED, RECEIVED, TransferRecorder, failure_reason
from llm_datadist.integrations.vllm.tp_map import HeadSlice, RankPlan, plan_for, sub_block_pairs

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
        self.lease_s = 0.0  # the prefill's default lease (its hello reply; 0: not known)
        self.incompatible = ""  # why its KV can not be exchanged with ours (compat), "" when it can

    def check(self, control: Control) -> None:
        """Compare fingerprints with the prefill (once per link): keep its lease, or why it is incompatible."""
        try:
            reply = control.hello(self.cluster_id)
        except IncompatiblePeer as exc:
            self.incompatible = f"prefill {self.host}:{self.port}: {exc}"
            return
        self.lease_s = reply.lease_s if reply is not None else 0.0


class Loader:
    """Runs LoadJobs on a small thread pool; ``take_finished`` hands back (done ids, blocks that failed).

    ``control`` is set by the worker once its Control exists (it calls ``on_push_done`` and ``on_prefill_lost``).
    """

    def __init__(self, config: ConnectorConfig, datadist: LLMDataDist, cache: Cache, layout: KVLayout,
                 geometry: msg.Geometry, cluster_id: int, tp_rank: int, tp_size: int = 1,
                 total_kv_heads: int = 0, windows: Sequence[int] = ()) -> None:
        self._config = config
        self._windows = tuple(windows)  # per KV cache group: blocks from the prompt's end (kv_groups; 0: all)
        self._datadist = datadist
        self._cache = cache
        self._layout = layout
        self._geometry = geometry
        self._cluster_id = cluster_id
        self._tp_rank = tp_rank
        self._tp_size = tp_size
        self._total_kv_heads = total_kv_heads
        self._plans: Dict[int, RankPlan] = {}  # prefill TP size -> this rank's pulls
        self.control: Optional[Control] = None
        self._lock = threading.Lock()
        self._peers: Dict[Endpoint, Peer] = {}
        self._peer_locks: Dict[Endpoint, threading.Lock] = collections.defaultdict(threading.Lock)
        self._done: Dict[str, List[int]] = {}  # request id -> failed local blocks (empty: success)
        self._failed: Set[str] = set()  # requests whose load failed (reported by id where there are several groups)
        self._failed_taken: Set[str] = set()  # those of them take_finished reported as done
        self._push_waits: Dict[str, Tuple[LoadJob, int, float, float]] = {}  # transfer id -> job, prefill...
        self.stats: Deque[TransferStat] = collections.deque(maxlen=4096)
        self.recorder = TransferRecorder()  # since the last step, for vLLM's metrics (WorkerSide.take_stats)
        self._pool = concurrent.futures.ThreadPoolExecutor(config.load_threads, thread_name_prefix="llm-dd-vllm-load")
        self._closed = False

    # -- peers --------------------------------------------------------------------------------------
    def _control(self) -> Control:
        if self.control is None:
            raise ConnectionError("the connector's control messages are not set up")
        return self.control

    def _peer(self, endpoint: Endpoint, compatible: bool = True) -> Peer:
        """The prefill of ``endpoint``, linked and compared (compat) once per link; ``compatible``: raise
        ``IncompatiblePeer`` if it is not (a release needs no compatibility)."""
        with self._peer_locks[endpoint]:
            peer = self._peers.get(endpoint)
            if peer is None or not peer.alive:
                if peer is not None:
                    self._forget(endpoint, peer)
                host, port, cluster_id = endpoint
                link_prefill(self._datadist, cluster_id, host, port, self._config.link_timeout_ms)
                peer = Peer(endpoint)
                peer.check(self._control())
                self._peers[endpoint] = peer
        if compatible and peer.incompatible:
            raise IncompatiblePeer(peer.incompatible)
        return peer

    def peer_lease(self, endpoint: Endpoint) -> Tuple[int, float]:
        """(cluster id, announced lease) of a compatible prefill rank, linked if need be (lease renewals)."""
        peer = self._peer(endpoint)
        return peer.cluster_id, peer.lease_s

    def endpoints_of(self, params: TransferParams) -> List[Endpoint]:
        """The prefill ranks this decode rank pulls a request from or releases it on (and so renews it on)."""
        plan = self._plan(LoadJob("", params, (), 0))
        return [params.endpoints[rank] for rank in sorted(set(plan.pulls) | set(plan.release_only))]

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
            self._finish(job, "the link to the prefill went down before its push arrived", started, "prefill_lost")
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
            self.recorder.transfer(RECEIVED, message.nbytes)
            self._finish(job, "", started)
        else:
            self._finish(job, f"the prefill's push failed: {message.reason}", started, "push_failed")

    # -- jobs ---------------------------------------------------------------------------------------
    def submit(self, job: LoadJob) -> None:
        """Start a load in the background (its outcome comes back through ``take_finished``)."""
        self._pool.submit(self._run, job)

    def _plan(self, job: LoadJob) -> RankPlan:
        """This rank's pulls from a prefill of ``len(endpoints)`` TP ranks (one endpoint per rank)."""
        prefill_tp = len(job.params.endpoints)
        plan = self._plans.get(prefill_tp)
        if plan is not None:
            return plan
        if not self._total_kv_heads:
            if prefill_tp != self._tp_size:
                raise ValueError(f"the prefill has {prefill_tp} TP ranks, this decode {self._tp_size}, and the "
                                 f"model's KV head count is not known: use the same tensor-parallel size on both")
            heads = self._layout.heads
            plan = RankPlan({self._tp_rank: (HeadSlice(0, 0, heads),)}, {r: 1 for r in range(prefill_tp)}, (),
                            heads, heads)
        else:
            plan = plan_for(self._tp_rank, self._tp_size, prefill_tp, self._total_kv_heads)
            if not plan.same_shape and self._layout.heads != plan.dst_heads:
                raise ValueError(f"this decode's KV blocks are not head-major (HND), so it can not take part of the "
                                 f"heads of a prefill of {prefill_tp} TP ranks (this decode has {self._tp_size})")
        self._plans[prefill_tp] = plan
        return plan

    def _source_geometry(self, plan: RankPlan) -> msg.Geometry:
        """The geometry a prefill rank of the plan has: ours with its heads per block."""
        heads = plan.src_heads if self._layout.heads == plan.dst_heads else self._geometry.heads
        return msg.Geometry(self._geometry.num_regions, self._geometry.block_nbytes, self._geometry.block_size,
                            self._geometry.layers, heads)

    def _run(self, job: LoadJob) -> None:
        started = time.monotonic()
        try:
            plan = self._plan(job)
            endpoints = job.params.endpoints
            if job.num_tokens == 0:
                for rank in list(plan.pulls) + list(plan.release_only):
                    self._release_quietly(endpoints[rank], job.params.request_id)
            elif job.params.mode == "push":
                if not plan.same_shape:
                    raise ValueError(f"push mode needs the prefill's tensor-parallel size ({len(endpoints)} ranks) "
                                     f"to equal the decode's ({self._tp_size}); pull instead")
                (rank,) = plan.pulls
                self._start_push_wait(job, self._peer(endpoints[rank]), started)
            else:
                self._pull_all(job, plan, started)
        except (ConnectionError, OSError, LLMException, ValueError) as exc:
            if job.num_tokens:
                self._finish(job, str(exc), started, failure_reason(exc))
            else:
                _log.info("request %s: could not release the prefill's blocks (%s); its lease frees them",
                          job.request_id, exc)
        except Exception as exc:  # noqa: BLE001 - a worker thread must report every failure as data
            _log.exception("request %s: unexpected load failure", job.request_id)
            self._finish(job, repr(exc), started, "internal")

    def _pull_all(self, job: LoadJob, plan: RankPlan, started: float) -> None:
        """Pull this rank's heads from every prefill rank that has them, then release the prefill ranks nobody
        pulls from; after a failure, only release the rest."""
        endpoints = job.params.endpoints
        failure: Optional[BaseException] = None
        nbytes = 0
        pull_s = 0.0
        for rank, slices in plan.pulls.items():
            if failure is None:
                try:
                    moved, seconds = self._pull(job, rank, plan, slices)
                    nbytes, pull_s = nbytes + moved, pull_s + seconds
                    continue
                except (ConnectionError, OSError, LLMException, ValueError) as exc:
                    failure = exc
            self._release_quietly(endpoints[rank], job.params.request_id)
        for rank in plan.release_only:
            self._release_quietly(endpoints[rank], job.params.request_id)
        if failure is not None:
            raise failure
        self.stats.append((job.request_id, "pull", nbytes, time.monotonic() - started, pull_s))
        self.recorder.transfer(PULLED, nbytes, pull_s)
        self._finish(job, "", started)

    def _release_quietly(self, endpoint: Endpoint, remote_id: str) -> None:
        try:
            self._control().release(self._peer(endpoint, compatible=False).cluster_id, [remote_id])
        except (ConnectionError, OSError, LLMException) as exc:
            _log.info("request %s: release on prefill %s:%d not sent (%s); its lease frees the blocks", remote_id,
                      endpoint[0], endpoint[1], exc)

    def _pull(self, job: LoadJob, rank: int, plan: RankPlan, slices: Tuple[HeadSlice, ...]) -> Tuple[int, float]:
        """Claim the request on prefill rank ``rank`` and pull the heads of ``slices``; (bytes, seconds pulling)."""
        peer = self._peer(job.params.endpoints[rank])
        remote_id = job.params.request_id
        control = self._control()
        reply = control.claim(peer.cluster_id, remote_id, plan.sharers[rank], self._source_geometry(plan))
        if not reply.ok:
            raise ConnectionError(f"prefill refused the claim: {reply.reason}")
        src: List[int] = []
        pull_began = time.monotonic()
        try:
            blocks = grouped_block_pairs(reply.block_ids, job.local_block_ids, job.num_tokens,
                                         self._geometry.block_size, job.first_block, reply.group_sizes,
                                         job.group_sizes, self._windows)
            if self._layout.heads == plan.dst_heads:
                src, dst = sub_block_pairs(blocks[0], blocks[1], slices, plan.src_heads, plan.dst_heads)
            else:  # whole blocks (the plan is block for block)
                src, dst = blocks
            pull_began = time.monotonic()
            if src:
                self._datadist.cache_manager.pull_blocks(BlocksCacheKey(peer.cluster_id, self._config.model_id),
                                                         self._cache, src, dst)
        except BaseException:
            control.release(peer.cluster_id, [remote_id])  # the pull failed: the blocks are not needed any more
            raise
        pull_s = time.monotonic() - pull_began
        # Every byte is here: the release goes out from the pool, off the load's path. A round trip waited for
        # here would cost this thread two or three GIL hand-offs next to vLLM's busy engine loop (up to 5 ms
        # each); a release that never arrives is freed by the link going down or the lease.
        try:
            self._pool.submit(control.release, peer.cluster_id, [remote_id])
        except RuntimeError:  # the pool is shut down (closing): send it here
            control.release(peer.cluster_id, [remote_id])
        return len(src) * self._layout.num_regions * self._geometry.block_nbytes, pull_s

    def _start_push_wait(self, job: LoadJob, peer: Peer, started: float) -> None:
        needed = blocks_for_tokens(job.num_tokens, self._geometry.block_size)
        groups = split_groups(job.local_block_ids, job.group_sizes)
        if any(len(blocks) < needed for blocks in groups):
            raise ValueError(f"{job.num_tokens} tokens need {needed} blocks, the decode allocated "
                             f"{min(len(blocks) for blocks in groups)}")
        with self._lock:
            self._push_waits[job.params.request_id] = (job, peer.cluster_id, started,
                                                       started + self._config.push_timeout_s)
        try:
            self._control().push_ready(peer.cluster_id, job.params.request_id,
                                       [int(b) for blocks in groups for b in blocks[:needed]], job.num_tokens,
                                       job.first_block, [needed] * len(job.group_sizes))
        except BaseException:
            with self._lock:
                self._push_waits.pop(job.params.request_id, None)
            raise

    def _finish(self, job: LoadJob, error: str, started: float, reason: str = "internal") -> None:
        failed: List[int] = []
        if error:
            self.recorder.failure(RECEIVED if job.params.mode == "push" else PULLED, reason)
            needed = blocks_for_tokens(job.num_tokens, self._geometry.block_size)
            failed = list(job.local_block_ids[job.first_block:needed]) or list(job.local_block_ids)
            _log.warning("request %s: KV load failed after %.3f s (%s); vLLM's kv_load_failure_policy applies",
                         job.request_id, time.monotonic() - started, error)
        with self._lock:
            if error and job.group_sizes:  # several KV cache groups: vLLM takes load failures by request only
                failed = []
                self._failed.add(job.request_id)
            self._done[job.request_id] = failed

    def _expire_push_waits(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [tid for tid, wait in self._push_waits.items() if wait[3] <= now]
            jobs = [self._push_waits.pop(tid) for tid in late]
        for job, _, started, _ in jobs:
            self._finish(job, f"no push arrived within push_timeout_s={self._config.push_timeout_s}", started,
                         "push_timeout")

    def take_finished(self) -> Tuple[Set[str], Set[int]]:
        """Requests whose load ended since the last call, and the local blocks of those that failed."""
        self._expire_push_waits()
        with self._lock:
            done, self._done = self._done, {}
            self._failed_taken |= self._failed
            self._failed = set()
        failed_blocks: Set[int] = set()
        for blocks in done.values():
            failed_blocks.update(blocks)
        return set(done), failed_blocks

    def take_failed_requests(self) -> Set[str]:
        """Requests of several KV cache groups whose failed loads ``take_finished`` reported as done since the last
        call (vLLM's ``failed_recving``)."""
        with self._lock:
            failed, self._failed_taken = self._failed_taken, set()
        return failed

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


