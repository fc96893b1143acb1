"""The per-instance engine: registry, guards, pools, transports, links, comm domains and tasks of one LLMDataDist."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from llm_datadist._engine import local_ops, transfers
from llm_datadist._engine import stats as st
from llm_datadist._engine import protocol as proto
from llm_datadist._engine import requests as rq
from llm_datadist._engine.comm import CommDomain, parse_rank_addresses
from llm_datadist._engine.errors import (EngineError, FeatureNotEnabled, NotLinked, ParamInvalid, Timeout,
                                         status_of)
from llm_datadist._engine.executor import Executor
from llm_datadist._engine.guards import Guards
from llm_datadist._engine.link import Link
from llm_datadist._engine.link_manager import LinkManager
from llm_datadist._engine.memory import backend_for, maps_segment
from llm_datadist._engine.notices import Notices, send as send_notice
from llm_datadist._engine.options import ROLE_NAMES, EngineOptions, link_timeout_s
from llm_datadist._engine.poller import Poller
from llm_datadist._engine.pool import MemPool, parse_pool_config
from llm_datadist._engine.registry import CacheEntry, KeyId, Registry
from llm_datadist._engine.rpc import Handler
from llm_datadist._engine.serving import PeerService
from llm_datadist._engine.tasks import LayerTask, TaskJob, TaskSet
from llm_datadist._engine.types import DEVICE, HOST, CacheSpec
from llm_datadist.status import LLMStatusCode
from llm_datadist._transport import available_transports, parallel, transport_class, unavailable_reason
from llm_datadist._transport.base import Guard, Region, Transport, TransportContext, host_identity
from llm_datadist._transport.tls import Tls
from llm_datadist.utils.log import warn_weak_secret

_log = logging.getLogger(__name__)
MAX_COMM_DOMAINS = 512
DEFAULT_TRANSPORTS = ("loopback", "process_vm", "shm", "nixl", "tcp")
TASK_WORKERS = 8  # layer-wise tasks running at once; more wait in the executor's queue
HANDLER_WORKERS = 4  # threads serving peers' requests (resolve, table, grants) for every link together
_ENGINES = itertools.count(1)
RELEASE_GRACE_S = 2.0  # beyond sync_kv_timeout, how long an unregister waits for transfers using the cache
USAGE_REPORT_S = 1.0  # how often each link tells its peer what it moved in or out of the peer's memory
STATS_ENV = "LLM_DATADIST_STATS"  # "0" turns counting off (to measure what counting costs)
_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()  # the started engines of this process (metrics endpoint)


def live_engines() -> List[Engine]:
    """The engines of this process that are started and not closed, oldest first."""
    return sorted((e for e in list(_LIVE) if not e.closed), key=lambda e: e.serial)


class _Exposed:
    """A region registered with every transport, how many caches use it, and its descriptors for peers."""

    __slots__ = ("region", "count", "descriptors")

    def __init__(self, region: Region) -> None:
        self.region = region
        self.count = 0
        self.descriptors: Dict[str, bytes] = {}


class Engine:
    """Everything one initialized LLMDataDist owns. All methods raise EngineError subclasses."""

    def __init__(self, opts: EngineOptions) -> None:
        self.opts = opts
        self.cluster_id = opts.cluster_id
        self.role = opts.role
        self.host_id = host_identity()
        self.pid = os.getpid()
        self.tls = Tls(opts.tls) if opts.tls is not None else None
        self.guards = Guards()
        self.registry = Registry(on_release=self._on_release, on_invalidate=self._on_invalidate,
                                 reguard=self._reguard)
        self.pools: Dict[int, Optional[MemPool]] = {DEVICE: None, HOST: None}
        self.transports: Dict[str, Transport] = {}
        self.stats = st.Stats(opts.cluster_id, enabled=os.environ.get(STATS_ENV, "1").strip().lower()
                              not in ("0", "off", "false", "no"))
        self.links = LinkManager(self)
        self.serial = serial = next(_ENGINES)
        self._reporting = threading.Event()  # set: the usage reporter stops
        self._reporter: Optional[threading.Thread] = None
        self.executor = Executor(TASK_WORKERS, f"llm-dd-tasks-{opts.cluster_id}-{serial}")
        self.poller = Poller(f"llm-dd-links-{opts.cluster_id}-{serial}")  # reads every link connection
        self.handlers = Executor(HANDLER_WORKERS, f"llm-dd-serve-{opts.cluster_id}-{serial}")
        self.tasks = TaskSet(self, self.executor)
        self.service = PeerService(self)  # answers peers' requests; the links hand these two to their connections
        self.handle_request: Handler = self.service.handle
        self.writable_entry: Callable[[int, int], CacheEntry] = self.service.writable_entry
        self._comms: Dict[int, CommDomain] = {}
        self._next_comm_id = 1
        self._regions: Dict[Tuple[int, int], _Exposed] = {}
        self._lock = threading.RLock()
        self.closed = False

    @property
    def nonce(self) -> bytes:
        """This instance's random identity (its guard table holds it)."""
        return self.guards.nonce

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        parallel.acquire_helpers()  # local copies split across threads too
        self._helpers = True
        try:
            if self.tls is not None:
                try:
                    self.tls.check()
                except (OSError, ValueError) as exc:
                    raise ParamInvalid(f"the TLS certificate, key or CA file can not be used: {exc}") from exc
            if self.opts.link_secret:
                warn_weak_secret(self.opts.link_secret)
                proto.stretch_secret(self.opts.link_secret)  # once per process, before any handshake waits on it
            self._start_transports()
            self._start_pools()
            if self.opts.listen_ip is not None and self.opts.listen_port is not None:
                self.links.start_listening(self.opts.listen_ip, self.opts.listen_port)
            if self.stats.enabled:
                self._reporter = threading.Thread(target=self._report_usage, daemon=True,
                                                  name=f"llm-dd-usage-{self.cluster_id}-{self.serial}")
                self._reporter.start()
        except BaseException:
            self.close()
            raise
        _LIVE.add(self)

    def _report_usage(self) -> None:
        """Every USAGE_REPORT_S, each link tells its peer what it moved in or out of the peer's memory."""
        while not self._reporting.wait(USAGE_REPORT_S):
            self.stats.fold()  # off the callers' threads
            for link in self.links.links():
                link.report_usage(time.monotonic() + USAGE_REPORT_S)
                link.held_grants.expire()

    def _transport_names(self) -> Sequence[str]:
        """The default set, or the forced backend(s): a name, or several separated by commas."""
        backend = self.opts.transfer_backend
        if backend is None or backend == "hixl":
            available = available_transports()
            # A transport may stay out of auto mode where it would never win (nixl without RDMA or a GPU).
            return [name for name in DEFAULT_TRANSPORTS
                    if name in available and getattr(transport_class(name), "in_auto", True)]
        names = [name.strip() for name in backend.split(",") if name.strip()]
        if not names:
            raise FeatureNotEnabled(f"transfer backend {backend!r} names no transport")
        for name in names:
            try:
                reason = unavailable_reason(name)
            except KeyError:
                raise FeatureNotEnabled(f"transfer backend {name!r} is unknown") from None
            if reason:
                raise FeatureNotEnabled(f"transfer backend {name!r} is not available on this machine: {reason}")
        return names

    def _start_transports(self) -> None:
        ctx = TransportContext(host_id=self.host_id, pid=self.pid, bind_host=self.opts.listen_ip or "0.0.0.0",
                               device_id=self.opts.device_id, guards=self.guards, tls=self.tls)
        for name in self._transport_names():
            self.transports[name] = transport_class(name)(ctx)
        self._expose(self.guards.region)
        _log.info("cluster %d transports: %s", self.cluster_id, ", ".join(self.transports))

    def _start_pools(self) -> None:
        for placement, text in ((DEVICE, self.opts.mem_pool_cfg), (HOST, self.opts.host_mem_pool_cfg)):
            if text:
                config = parse_pool_config(text)
                pool = MemPool(config, backend_for(placement, self.opts.device_id))
                self.pools[placement] = pool
                self._expose(pool.region)

    def close(self) -> None:
        """Finalize: stop tasks, comm domains and links, release every cache, stop transports and pools."""
        if self.closed:
            return
        self.closed = True
        self.tasks.cancel_all()
        self.executor.shutdown(0.5)
        self._reporting.set()
        if self._reporter is not None:
            self._reporter.join(USAGE_REPORT_S + 1.0)
        for link in self.links.links():  # the last reports: peers' served counters stay exact
            link.report_usage(time.monotonic() + 0.5)
        for comm in list(self._comms.values()):
            comm.close()
        self._comms.clear()
        self.links.close()
        self.poller.close()
        self.handlers.shutdown(2.0)
        entries = self.registry.entries()
        self.registry.clear()
        deadline = time.monotonic() + RELEASE_GRACE_S
        for entry in entries:
            if not entry.freed.wait(max(0.0, deadline - time.monotonic())):
                _log.warning("cache %d is still in use at finalize; its memory is released when that ends",
                             entry.cache_id)
        for transport in self.transports.values():
            _quietly(transport.close)
        for pool in self.pools.values():
            if pool is not None:
                _quietly(pool.close)
        _quietly(self.guards.close)
        if getattr(self, "_helpers", False):
            self._helpers = False
            parallel.release_helpers()
        _log.info("cluster %d finalized", self.cluster_id)

    # -- regions exposed to peers ---------------------------------------------------------------
    def _expose(self, region: Region) -> _Exposed:
        key = (region.addr, region.nbytes)
        with self._lock:
            held = self._regions.get(key)
            if held is None:
                held = self._regions[key] = _Exposed(region)
                for name, transport in self.transports.items():
                    descriptor = transport.register(region)
                    if descriptor:
                        held.descriptors[name] = descriptor
            held.count += 1
            return held

    def _unexpose(self, region: Region) -> None:
        key = (region.addr, region.nbytes)
        with self._lock:
            held = self._regions.get(key)
            if held is None:
                return
            held.count -= 1
            if held.count:
                return
            del self._regions[key]
        for transport in self.transports.values():
            transport.deregister(held.region)

    def _tensor_regions(self, entry: CacheEntry) -> List[Region]:
        return [Region(addr=a, nbytes=entry.tensor_nbytes, kind=entry.kind, device_id=entry.device_id,
                       writable=entry.writable) for a in entry.tensor_addrs]

    def is_exposed(self, entry: CacheEntry) -> bool:
        """Whether peers may see the cache's addresses (its memory is registered with the transports)."""
        return entry.owned or entry.remote_accessible or not self.opts.remote_cache_accessible

    def region_views(self, entry: CacheEntry) -> List[proto.RegionView]:
        """The descriptors peers need for the memory of a cache (only regions that have any, and always the pool's:
        a pool region whose descriptors were withdrawn, after a remap, must replace what peers learned of it)."""
        if entry.owned:
            pool = self.pools.get(entry.placement)
            keys = [(pool.region.addr, pool.region.nbytes)] if pool is not None else []
        else:
            keys = [(a, entry.tensor_nbytes) for a in dict.fromkeys(entry.tensor_addrs)]
        views = []
        with self._lock:
            for key in keys:
                held = self._regions.get(key)
                if held is not None and (held.descriptors or entry.owned):
                    views.append((key[0], key[1], held.region.kind, dict(held.descriptors)))
        return views

    def _on_invalidate(self, entry: CacheEntry) -> None:
        if entry.guard is not None:
            self.guards.invalidate(entry.guard)

    def _reguard(self, guard: Guard) -> Guard:
        fresh = self.guards.acquire()
        self.guards.invalidate(guard)
        return fresh

    def _on_release(self, entry: CacheEntry) -> None:
        """Free a cache's memory: first wait for server-side requests admitted under its old generation."""
        deadline = time.monotonic() + self.opts.sync_kv_timeout_ms / 1000.0 + RELEASE_GRACE_S
        for transport in self.transports.values():
            _quietly(transport.fence, deadline)
        if entry.owned:
            pool = self.pools.get(entry.placement)
            if pool is not None:
                for addr in entry.tensor_addrs:
                    _quietly(pool.free, addr)
        elif self.is_exposed(entry):
            for region in self._tensor_regions(entry):
                self._unexpose(region)

    def _await_release(self, entry: CacheEntry) -> None:
        """After unregister/deallocate: return only once nothing of this library touches the memory any more."""
        if entry.freed.is_set():
            return
        self.links.revoke_released()  # writers keep grants for reuse: ask for those that hold this cache
        timeout = self.opts.sync_kv_timeout_ms / 1000.0 + RELEASE_GRACE_S
        if not entry.freed.wait(timeout):
            raise Timeout(f"cache {entry.cache_id} is still in use by a transfer after {timeout:.1f} s (a stopped "
                          f"peer holding a write?); its memory is released when that transfer ends")

    # -- registration ---------------------------------------------------------------------------
    def _entry(self, spec: CacheSpec, addrs: Sequence[int], owned: bool, remote_accessible: bool) -> CacheEntry:
        if not 1 <= len(spec.shape) < 32:
            raise ParamInvalid(f"shape must have 1 to 31 dims, got {len(spec.shape)}")
        if any(dim <= 0 for dim in spec.shape):
            raise ParamInvalid(f"every dim of shape {list(spec.shape)} must be > 0")
        if spec.num_tensors <= 0:
            raise ParamInvalid("num_tensors must be > 0")
        backend = backend_for(spec.placement, self.opts.device_id)
        return CacheEntry(cache_id=self.registry.new_id(), tensor_addrs=tuple(int(a) for a in addrs),
                          tensor_nbytes=spec.tensor_nbytes, dim0=spec.dim0, placement=spec.placement,
                          is_blocks=spec.is_blocks, owned=owned,
                          remote_accessible=remote_accessible, data_type=spec.data_type, shape=tuple(spec.shape),
                          device_id=self.opts.device_id, kind=backend.kind)

    def _register(self, spec: CacheSpec, addrs: Sequence[int], keys: Sequence[Optional[KeyId]],
                  blocks_model_id: Optional[int], remote_accessible: bool, writable: Optional[bool]) -> CacheEntry:
        """register_cache / register_blocks_cache: record user memory after checking it is mapped.

        Peers may write into it when it is remote accessible and this instance pushes (remote-cache-accessible
        mode), or when the caller says so (``writable``: an explicit remote_accessible=True in normal mode,
        where only layer-wise pushes write); a pull-only cache is never written by a peer.
        """
        if len(addrs) != spec.num_tensors:
            raise ParamInvalid(f"{len(addrs)} addresses given for {spec.num_tensors} tensors")
        entry = self._entry(spec, addrs, owned=False, remote_accessible=remote_accessible)
        entry.writable = remote_accessible and (self.opts.remote_cache_accessible if writable is None else writable)
        backend = backend_for(spec.placement, self.opts.device_id)
        for addr in entry.tensor_addrs:
            backend.check_range(addr, entry.tensor_nbytes)
        entry.guard = self.guards.acquire()
        exposed = self.is_exposed(entry)
        if exposed:
            for region in self._tensor_regions(entry):
                self._expose(region)
        try:
            if spec.is_blocks:
                self.registry.add_blocks(entry, blocks_model_id, replace=True)
            else:
                self.registry.add_registered(entry, keys)
        except BaseException:
            self.guards.invalidate(entry.guard)
            if exposed:
                for region in self._tensor_regions(entry):
                    self._unexpose(region)
            raise
        self._table_changed(entry.is_blocks)
        return entry

    def _allocate(self, spec: CacheSpec, keys: Sequence[Optional[KeyId]], blocks_model_id: Optional[int]) -> CacheEntry:
        """allocate_cache / allocate_blocks_cache from the pool of the placement."""
        self._require_a_pool()
        pool = self.pools.get(spec.placement)
        if pool is None:
            raise ParamInvalid("no memory pool is configured for this placement")
        entry = self._entry(spec, [], owned=True, remote_accessible=True)
        entry.writable = True
        if not spec.is_blocks and len(keys) > spec.dim0:
            raise ParamInvalid(f"{len(keys)} cache keys exceed the batch size {spec.dim0}")
        addrs = pool.allocate_many([entry.tensor_nbytes] * spec.num_tensors)
        entry.tensor_addrs = tuple(addrs)
        try:
            entry.guard = self.guards.acquire()
            if spec.is_blocks:
                self.registry.add_blocks(entry, blocks_model_id, replace=False)
            else:
                self.registry.add_allocated(entry, keys)
        except BaseException:
            if entry.guard is not None:
                self.guards.invalidate(entry.guard)
            for addr in addrs:
                pool.free(addr)
            raise
        self._table_changed(entry.is_blocks)
        return entry

    def _require_a_pool(self) -> None:
        """The pool APIs (allocate, deallocate, remove_cache_key) need at least one pool."""
        if self.pools[DEVICE] is None and self.pools[HOST] is None:
            raise FeatureNotEnabled("no memory pool is configured (mem_pool_cfg / host_mem_pool_cfg)")

    def deallocate(self, cache_id: int) -> None:
        self._require_a_pool()
        entry = self._find(cache_id)
        self.registry.release_id(cache_id)
        self._table_changed(entry is not None and entry.is_blocks)
        if entry is not None and entry.released:
            self._await_release(entry)

    def remove_key(self, key: KeyId) -> None:
        self._require_a_pool()
        self.registry.remove_key(key)
        self.links.revoke_released()
        self._table_changed(False)

    def unregister(self, cache_id: int) -> None:
        entry = self._find(cache_id)
        if entry is None:
            return
        self.registry.unregister(cache_id)
        self._table_changed(entry.is_blocks)
        self._await_release(entry)

    def _find(self, cache_id: int) -> Optional[CacheEntry]:
        try:
            return self.registry.get(cache_id)
        except EngineError:
            return None

    def _table_changed(self, blocks: bool) -> None:
        """Tell linked peers our table changed (a notice each, none waits for the others).

        Peers keep the whole table in remote-cache-accessible mode and blocks-cache views in normal mode. The
        notice only spares them a failed attempt: a view they use after a change fails its guard check and is
        refreshed, so correctness never depends on the notice arriving.
        """
        if (self.opts.remote_cache_accessible or blocks) and self.links.has_links():
            self.links.notify_table_changed(self.registry.version)

    def entry(self, cache_id: int) -> CacheEntry:
        return self.registry.get(cache_id)

    def check_ranges(self, addrs: Sequence[int], nbytes: int, placement: int) -> None:
        """Every [addr, addr + nbytes) must be memory of the placement's kind in this process."""
        backend = backend_for(placement, self.opts.device_id)
        for addr in addrs:
            backend.check_range(int(addr), nbytes)

    def remap(self, ranges: Sequence[Tuple[int, int]]) -> None:
        """Re-register exposed ranges that contain the given ones with every transport (after a memory error).

        The pages behind a range may have been replaced: a region that a shared segment aliased for same-host
        peers loses that alias unless this process still maps the segment there, and every cache on remapped
        memory gets a new generation, so a peer's view or read from before the remap fails and is refreshed.
        """
        with self._lock:
            exposed = [held for held in self._regions.values()]
        touched = []
        for addr, size in ranges:
            for held in exposed:
                region = held.region
                if region.addr <= addr and addr + size <= region.end:
                    touched.append((addr, size))
                    for transport in self.transports.values():
                        transport.deregister(region)
                    segment = region.segment
                    if segment is not None and not maps_segment(region.addr, region.nbytes, segment):
                        _log.info("remapped memory at %#x is no longer its shared segment's: peers on this host "
                                  "read it without the segment", region.addr)
                        held.region = region = dataclasses.replace(region, segment=None)
                    held.descriptors.clear()
                    for name, transport in self.transports.items():
                        descriptor = transport.register(region)
                        if descriptor:
                            held.descriptors[name] = descriptor
        for entry in self.registry.entries():
            if any(a < addr + size and addr < a + entry.tensor_nbytes
                   for a in entry.tensor_addrs for addr, size in touched):
                self.registry.new_generation(entry)
        self._table_changed(True)

    # -- handshake ------------------------------------------------------------------------------
    def hello(self, comm: Optional[CommDomain], target_cluster_id: Optional[int] = None) -> proto.Hello:
        return proto.Hello(protocol_version=proto.PROTOCOL_VERSION, cluster_id=self.cluster_id, role=self.role,
                           host_id=self.host_id, pid=self.pid,
                           remote_cache_accessible=self.opts.remote_cache_accessible,
                           transports={n: t.local_info() for n, t in self.transports.items()},
                           comm_name=comm.comm_name if comm else "",
                           comm_members=sorted(comm.members) if comm else [],
                           target_cluster_id=target_cluster_id, nonce=self.nonce)

    def hello_ack(self, credentials: Dict[str, bytes]) -> proto.HelloAck:
        return proto.HelloAck(cluster_id=self.cluster_id, role=self.role, host_id=self.host_id, pid=self.pid,
                              remote_cache_accessible=self.opts.remote_cache_accessible,
                              transports={n: t.local_info() for n, t in self.transports.items()},
                              nonce=self.nonce, credentials=credentials)

    def grant_credentials(self, link_id: int) -> Dict[str, bytes]:
        """Per-link credentials of every transport for the peer of ``link_id``."""
        granted = {}
        for name, transport in self.transports.items():
            credential = transport.grant(link_id)
            if credential:
                granted[name] = credential
        return granted

    def revoke_credentials(self, link_id: int) -> None:
        for transport in self.transports.values():
            _quietly(transport.revoke, link_id)

    # -- comm domains (rank-table link) ---------------------------------------------------------
    def comm_link(self, comm_name: str, members: Dict[int, int], rank_table: Optional[str]) -> int:
        if self.cluster_id not in members:
            raise ParamInvalid(f"local cluster {self.cluster_id} is not in cluster_rank_info")
        with self._lock:
            if len(self._comms) >= MAX_COMM_DOMAINS:
                raise ParamInvalid(f"at most {MAX_COMM_DOMAINS} comm domains per instance")
            addresses = parse_rank_addresses(rank_table)
            comm_id = self._next_comm_id
            self._next_comm_id += 1
            comm = CommDomain(self.links, comm_id, comm_name, members, self.cluster_id, addresses,
                              link_timeout_s(self.opts))
            self._comms[comm_id] = comm
        comm.start()
        return comm_id

    def comm(self, comm_id: int) -> CommDomain:
        comm = self._comms.get(comm_id)
        if comm is None:
            raise NotLinked(f"comm_id {comm_id} is not linked")
        return comm

    def comm_unlink(self, comm_id: int) -> None:
        comm = self.comm(comm_id)
        with self._lock:
            self._comms.pop(comm_id, None)
        comm.close(unlink_timeout_s=self.opts.sync_kv_timeout_ms / 1000.0)

    def link_for_transfer(self, cluster_id: int) -> Link:
        """The newest link to ``cluster_id`` that can carry transfers (a comm domain's only once it is OK)."""
        def usable(link: Link) -> bool:
            if not link.comm_id:
                return True
            comm = self._comms.get(link.comm_id)
            return comm is not None and comm.status == 0

        try:
            return self.links.get(cluster_id, usable)
        except NotLinked:
            self.links.get(cluster_id)  # no link at all: NotLinked as is
            raise NotLinked(f"comm domain of cluster {cluster_id} is not ready") from None


    # -- the Engine API (what the facades call; see _engine/api.py) -----------------------------------
    def register(self, req: rq.Register) -> rq.CacheInfo:
        return _info(self._register(req.spec, req.addrs, req.keys, req.blocks_model_id, req.remote_accessible,
                                    req.writable))

    def allocate(self, req: rq.Allocate) -> rq.CacheInfo:
        return _info(self._allocate(req.spec, req.keys, req.blocks_model_id))

    def cache_info(self, cache_id: int) -> rq.CacheInfo:
        return _info(self.registry.get(cache_id))

    def has_pool(self) -> bool:
        return any(pool is not None for pool in self.pools.values())

    def transfer(self, req: rq.Transfer) -> None:
        """A pull or push between this instance and a linked one (synchronous): the request's handler in
        ``transfers.HANDLERS`` runs with the request whole, counted as one call."""
        handler = transfers.HANDLERS.get(type(req))
        if handler is None:
            raise ParamInvalid(f"not a transfer request: {type(req).__name__}")
        self._counted(handler, req, *transfers.counted_as(req))

    def copy(self, req: rq.LocalCopy) -> None:
        """A copy between caches of this instance: the request's handler in ``local_ops.HANDLERS``."""
        handler = local_ops.HANDLERS.get(type(req))
        if handler is None:
            raise ParamInvalid(f"not a copy request: {type(req).__name__}")
        self._counted(handler, req, self.cluster_id, st.LOCAL)

    def _counted(self, handler, req, peer: int, direction: str) -> None:
        """Run ``handler(self, req)`` as one call of the statistics (its route, bytes, status and latency)."""
        call = self.stats.begin(peer, direction)
        if call is None:
            handler(self, req)
            return
        prev = st.set_current(call)
        try:
            handler(self, req)
        except BaseException as exc:
            self.stats.end(call, status_of(exc))
            raise
        finally:
            st.set_current(prev)
        self.stats.end(call)

    def stats_snapshot(self) -> st.StatsSnapshot:
        """Everything this instance counted, as plain data."""
        kinds: Dict[str, List[int]] = {}
        for entry in self.registry.entries():
            row = kinds.setdefault(entry.kind, [0, 0])
            row[0] += 1
            row[1] += entry.tensor_nbytes * entry.num_tensors
        caches = tuple(st.CacheStats(kind=k, caches=n, bytes=b) for k, (n, b) in sorted(kinds.items()))
        live = sum(1 for link in self.links.links() if not link.gone)
        return self.stats.snapshot(ROLE_NAMES.get(self.role, str(self.role)).lower(), live, caches)

    def start_layerwise(self, job: TaskJob) -> LayerTask:
        """transfer_cache_async: queue the layer-wise push task and return its waiter."""
        return self.tasks.start(job)

    def link_clusters(self, req: rq.LinkClusters) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        """Link every peer in parallel; (overall, [code per peer]), never raises."""
        return self.links.link_clusters([{"cluster_id": p.cluster_id, "remote": list(p.remote)} for p in req.peers],
                                        req.timeout_s)

    def unlink_clusters(self, req: rq.UnlinkClusters) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        return self.links.unlink_clusters([{"cluster_id": p.cluster_id, "remote": list(p.remote)}
                                           for p in req.peers], req.timeout_s, req.force)

    def check_linked(self, cluster_id: int) -> None:
        """NotLinked unless a link to the cluster exists."""
        self.links.get(cluster_id)

    def route(self, cluster_id: int, every: bool = False) -> str:
        """The general data route of the link to a cluster, or with ``every`` all of them joined by ">"
        ("" before its first transfer)."""
        link = self.links.get(cluster_id)
        return ">".join(link.route_names) if every else link.route_name

    def comm_status(self, comm_id: int) -> int:
        return self.comm(comm_id).status

    def listen_address(self) -> Optional[Tuple[str, int]]:
        """(ip, port) this instance listens on (the bound port when port 0 was asked for), or None."""
        return self.links.listen_address

    @property
    def notices(self) -> Notices:
        """The notification queue and link-down events of this instance (see notices.py)."""
        return self.links.notices

    def notify(self, cluster_id: int, payload: bytes, timeout_s: float, after: int = proto.NOTIFY_PLAIN) -> None:
        """Send a notification to a linked cluster; one that follows a transfer takes the transfer's link."""
        link = self.link_for_transfer(cluster_id) if after != proto.NOTIFY_PLAIN else self.links.get(cluster_id)
        send_notice(link, payload, time.monotonic() + timeout_s, after)

    def set_role(self, role: int, listen: Optional[Tuple[str, int]]) -> None:
        """switch_role: move, start or stop listening (no link may exist), then take the new role label."""
        hixl = self.opts.transfer_backend is not None and self.opts.transfer_backend == "hixl"
        if hixl:
            if listen is not None and listen != (self.opts.listen_ip, self.opts.listen_port):
                raise FeatureNotEnabled("the listen address can not change with the hixl backend")
        else:
            self.links.check_no_links()
            if listen is not None:
                self.links.start_listening(*listen)
            else:
                self.links.stop_listening()
        self.role = int(role)


def _info(entry: CacheEntry) -> rq.CacheInfo:
    return rq.CacheInfo(cache_id=entry.cache_id, tensor_addrs=tuple(entry.tensor_addrs),
                        num_tensors=entry.num_tensors, stride=entry.stride, dim0=entry.dim0,
                        is_blocks=entry.is_blocks)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - teardown continues past one failure
        _log.debug("teardown step failed", exc_info=True)
