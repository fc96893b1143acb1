"""The per-instance engine: registry, pools, transports, links and comm domains of one LLMDataDist."""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Dict, List, Optional, Sequence

from llm_datadist._engine import protocol as proto
from llm_datadist._engine.comm import CommDomain, parse_rank_addresses
from llm_datadist._engine.errors import CacheNotExist, EngineError, FeatureNotEnabled, NotLinked, ParamInvalid
from llm_datadist._engine.links import LinkManager
from llm_datadist._engine.memory import backend_for
from llm_datadist._engine.pool import MemPool, parse_pool_config
from llm_datadist._engine.registry import CacheEntry, KeyId, Registry
from llm_datadist._engine.types import DEVICE, HOST, CacheSpec
from llm_datadist._transport import available_transports, transport_class
from llm_datadist._transport.base import Region, Transport, TransportContext
from llm_datadist.v2.config import EngineOptions, link_timeout_s

_log = logging.getLogger(__name__)
MAX_COMM_DOMAINS = 512
DEFAULT_TRANSPORTS = ("loopback", "process_vm", "shm", "tcp")


def host_identity() -> str:
    """Identity of this host (boot id + hostname): equal ids mean a peer shares our memory system."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


class Engine:
    """Everything one initialized LLMDataDist owns. All methods raise EngineError subclasses."""

    def __init__(self, opts: EngineOptions) -> None:
        self.opts = opts
        self.cluster_id = opts.cluster_id
        self.role = opts.role
        self.host_id = host_identity()
        self.pid = os.getpid()
        self.registry = Registry(on_release=self._on_release)
        self.pools: Dict[int, Optional[MemPool]] = {DEVICE: None, HOST: None}
        self.transports: Dict[str, Transport] = {}
        self.links = LinkManager(self)
        self._comms: Dict[int, CommDomain] = {}
        self._next_comm_id = 1
        self._regions: Dict[tuple, list] = {}  # (addr, nbytes) -> [Region, exposure count]
        self._lock = threading.RLock()
        self.closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._start_transports()
            self._start_pools()
            if self.opts.listen_ip is not None and self.opts.listen_port is not None:
                self.links.start_listening(self.opts.listen_ip, self.opts.listen_port)
        except BaseException:
            self.close()
            raise

    def _transport_names(self) -> Sequence[str]:
        backend = self.opts.transfer_backend
        available = available_transports()
        if backend is None or backend == "hixl":
            return [name for name in DEFAULT_TRANSPORTS if name in available]
        try:
            transport_class(backend)
        except KeyError:
            raise FeatureNotEnabled(f"transfer backend {backend!r} is unknown") from None
        if backend not in available:
            raise FeatureNotEnabled(f"transfer backend {backend!r} is not available on this machine")
        return [backend]

    def _start_transports(self) -> None:
        ctx = TransportContext(host_id=self.host_id, pid=self.pid, bind_host=self.opts.listen_ip or "0.0.0.0",
                               device_id=self.opts.device_id)
        for name in self._transport_names():
            self.transports[name] = transport_class(name)(ctx)
        _log.info("cluster %d transports: %s", self.cluster_id, ", ".join(self.transports))

    def _start_pools(self) -> None:
        for placement, text in ((DEVICE, self.opts.mem_pool_cfg), (HOST, self.opts.host_mem_pool_cfg)):
            if text:
                config = parse_pool_config(text)
                pool = MemPool(config, backend_for(placement, self.opts.device_id))
                self.pools[placement] = pool
                self._expose(pool.region)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        from llm_datadist._engine import tasks  # running transfer_cache_async workers stop first

        tasks.cancel_tasks(self)
        for comm in list(self._comms.values()):
            comm.close()
        self._comms.clear()
        self.links.close()
        self.registry.clear()
        for transport in self.transports.values():
            _quietly(transport.close)
        for pool in self.pools.values():
            if pool is not None:
                _quietly(pool.close)
        _log.info("cluster %d finalized", self.cluster_id)

    # -- regions exposed to peers ---------------------------------------------------------------
    def _expose(self, region: Region) -> None:
        key = (region.addr, region.nbytes)
        with self._lock:
            held = self._regions.setdefault(key, [region, 0])
            held[1] += 1
            first = held[1] == 1
        if first:
            for transport in self.transports.values():
                transport.register(region)

    def _unexpose(self, region: Region) -> None:
        key = (region.addr, region.nbytes)
        with self._lock:
            held = self._regions.get(key)
            if held is None:
                return
            held[1] -= 1
            last = held[1] == 0
            if last:
                del self._regions[key]
        if last:
            for transport in self.transports.values():
                transport.deregister(held[0])

    def _tensor_regions(self, entry: CacheEntry) -> List[Region]:
        kind = "host"
        return [Region(addr=a, nbytes=entry.tensor_nbytes, kind=kind) for a in entry.tensor_addrs]

    def _exposed(self, entry: CacheEntry) -> bool:
        return not entry.owned and (entry.remote_accessible or not self.opts.remote_cache_accessible)

    def _on_release(self, entry: CacheEntry) -> None:
        if entry.owned:
            pool = self.pools.get(entry.placement)
            if pool is not None:
                for addr in entry.tensor_addrs:
                    _quietly(pool.free, addr)
        elif self._exposed(entry):
            for region in self._tensor_regions(entry):
                self._unexpose(region)

    # -- registration ---------------------------------------------------------------------------
    def _entry(self, spec: CacheSpec, addrs: Sequence[int], owned: bool, remote_accessible: bool) -> CacheEntry:
        if not 1 <= len(spec.shape) < 32:
            raise ParamInvalid(f"shape must have 1 to 31 dims, got {len(spec.shape)}")
        if any(dim <= 0 for dim in spec.shape):
            raise ParamInvalid(f"every dim of shape {list(spec.shape)} must be > 0")
        if spec.num_tensors <= 0:
            raise ParamInvalid("num_tensors must be > 0")
        nbytes = spec.tensor_nbytes
        return CacheEntry(cache_id=self.registry.new_id(), tensor_addrs=tuple(int(a) for a in addrs),
                          tensor_nbytes=nbytes, dim0=spec.dim0, placement=spec.placement, is_blocks=spec.is_blocks,
                          owned=owned, remote_accessible=remote_accessible, data_type=spec.data_type,
                          shape=tuple(spec.shape), device_id=self.opts.device_id)

    def register(self, spec: CacheSpec, addrs: Sequence[int], keys: Sequence[Optional[KeyId]],
                 blocks_model_id: Optional[int], remote_accessible: bool) -> CacheEntry:
        """register_cache / register_blocks_cache: record user memory after checking it is mapped."""
        if len(addrs) != spec.num_tensors:
            raise ParamInvalid(f"{len(addrs)} addresses given for {spec.num_tensors} tensors")
        entry = self._entry(spec, addrs, owned=False, remote_accessible=remote_accessible)
        backend = backend_for(spec.placement, self.opts.device_id)
        for addr in entry.tensor_addrs:
            backend.check_range(addr, entry.tensor_nbytes)
        if spec.is_blocks:
            self.registry.add_blocks(entry, blocks_model_id, replace=True)
        else:
            self.registry.add_registered(entry, keys)
        if self._exposed(entry):
            for region in self._tensor_regions(entry):
                self._expose(region)
        self._table_changed(entry.is_blocks)
        return entry

    def allocate(self, spec: CacheSpec, keys: Sequence[Optional[KeyId]], blocks_model_id: Optional[int]) -> CacheEntry:
        """allocate_cache / allocate_blocks_cache from the pool of the placement."""
        self._require_a_pool()
        pool = self.pools.get(spec.placement)
        if pool is None:
            raise ParamInvalid("no memory pool is configured for this placement")
        entry = self._entry(spec, [], owned=True, remote_accessible=True)
        if not spec.is_blocks and len(keys) > spec.dim0:
            raise ParamInvalid(f"{len(keys)} cache keys exceed the batch size {spec.dim0}")
        addrs = pool.allocate_many([entry.tensor_nbytes] * spec.num_tensors)
        entry.tensor_addrs = tuple(addrs)
        try:
            if spec.is_blocks:
                self.registry.add_blocks(entry, blocks_model_id, replace=False)
            else:
                self.registry.add_allocated(entry, keys)
        except BaseException:
            for addr in addrs:
                pool.free(addr)
            raise
        self._table_changed(entry.is_blocks)
        return entry

    def _require_a_pool(self) -> None:
        """The pool APIs (allocate, deallocate, remove_cache_key) need at least one pool (§9.2)."""
        if self.pools[DEVICE] is None and self.pools[HOST] is None:
            raise FeatureNotEnabled("no memory pool is configured (mem_pool_cfg / host_mem_pool_cfg)")

    def deallocate(self, cache_id: int) -> None:
        self._require_a_pool()
        blocks = self._is_blocks(cache_id)
        self.registry.release_id(cache_id)
        self._table_changed(blocks)

    def remove_key(self, key: KeyId) -> None:
        self._require_a_pool()
        self.registry.remove_key(key)
        self._table_changed(False)

    def unregister(self, cache_id: int) -> None:
        blocks = self._is_blocks(cache_id)
        self.registry.unregister(cache_id)
        self._table_changed(blocks)

    def _is_blocks(self, cache_id: int) -> bool:
        try:
            return self.registry.get(cache_id).is_blocks
        except EngineError:
            return False

    def _table_changed(self, blocks: bool) -> None:
        """Tell linked peers our table changed before the call returns, so none uses a stale view (D12).

        Peers keep the whole table in remote-cache-accessible mode and blocks-cache views in normal mode.
        """
        if (self.opts.remote_cache_accessible or blocks) and self.links.has_links():
            self.links.notify_table_changed(self.registry.version)

    def entry(self, cache_id: int) -> CacheEntry:
        return self.registry.get(cache_id)

    def check_ranges(self, addrs: Sequence[int], nbytes: int, placement: int) -> None:
        """D23: every [addr, addr + nbytes) must be memory of the placement's kind in this process."""
        backend = backend_for(placement, self.opts.device_id)
        for addr in addrs:
            backend.check_range(int(addr), nbytes)

    def remap(self, ranges: Sequence[tuple]) -> None:
        """Re-register exposed ranges that contain the given ones with every transport (after a memory error)."""
        with self._lock:
            exposed = [held[0] for held in self._regions.values()]
        for addr, size in ranges:
            for region in exposed:
                if region.addr <= addr and addr + size <= region.end:
                    for transport in self.transports.values():
                        transport.deregister(region)
                        transport.register(region)

    # -- handshake ------------------------------------------------------------------------------
    def hello(self, comm: Optional[CommDomain], target_cluster_id: Optional[int] = None) -> proto.Hello:
        return proto.Hello(protocol_version=proto.PROTOCOL_VERSION, cluster_id=self.cluster_id, role=self.role,
                           host_id=self.host_id, pid=self.pid,
                           remote_cache_accessible=self.opts.remote_cache_accessible,
                           transports={n: t.local_info() for n, t in self.transports.items()},
                           comm_name=comm.comm_name if comm else "",
                           comm_members=sorted(comm.members) if comm else [],
                           target_cluster_id=target_cluster_id)

    def hello_ack(self, code: int, message: str) -> proto.HelloAck:
        return proto.HelloAck(cluster_id=self.cluster_id, role=self.role, host_id=self.host_id, pid=self.pid,
                              remote_cache_accessible=self.opts.remote_cache_accessible,
                              transports={n: t.local_info() for n, t in self.transports.items()},
                              code=code, message=message)

    # -- serving side (runs in link reader threads, no user thread involved) ----------------------
    def handle_request(self, conn, msg):
        if isinstance(msg, proto.Resolve):
            return self._resolve_local(msg)
        if isinstance(msg, proto.Consume):
            self.registry.note_pulled(msg.cache_id, msg.slot, msg.tensor_lo, msg.tensor_hi)
            return proto.Ack()
        if isinstance(msg, proto.TableRequest):
            return proto.Table(version=self.registry.version, caches=[view_of(e) for e in self.registry.entries()])
        if isinstance(msg, proto.Unlink):
            self.links.note_peer_unlink(conn)
            return proto.Ack()
        if isinstance(msg, proto.TableChanged):
            self.links.invalidate_table_of(conn)
            return proto.Ack()
        if isinstance(msg, proto.Ping):
            return proto.Ack()
        raise ParamInvalid(f"unexpected request {type(msg).__name__}")

    def _resolve_local(self, msg: proto.Resolve) -> proto.CacheView:
        if msg.kind == "id":
            entry = self.registry.get(msg.cache_id)
            if msg.batch_index >= entry.dim0:
                raise CacheNotExist(f"batch index {msg.batch_index} >= batch size {entry.dim0} of cache {msg.cache_id}")
            return view_of(entry, msg.batch_index)
        if msg.kind == "blocks":
            return view_of(self.registry.lookup_blocks(msg.model_id))
        if msg.kind in ("req", "prefix"):
            entry, slot = self.registry.lookup_key(KeyId(msg.kind, msg.ident, msg.model_id))
            return view_of(entry, slot)
        raise ParamInvalid(f"unknown resolve kind {msg.kind!r}")

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

    def link_for_transfer(self, cluster_id: int):
        """The newest link to ``cluster_id`` that can carry transfers (a comm domain's only once it is OK)."""
        def usable(link) -> bool:
            if not link.comm_id:
                return True
            comm = self._comms.get(link.comm_id)
            return comm is not None and comm.status == 0

        try:
            return self.links.get(cluster_id, usable)
        except NotLinked:
            self.links.get(cluster_id)  # no link at all: NotLinked as is
            raise NotLinked(f"comm domain of cluster {cluster_id} is not ready") from None


def view_of(entry: CacheEntry, slot: int = 0) -> proto.CacheView:
    """Describe a local cache for a peer."""
    keys = [(k.namespace, k.ident, k.model_id, s) for s, k in sorted(entry.slot_keys.items())]
    return proto.CacheView(cache_id=entry.cache_id, tensor_addrs=list(entry.tensor_addrs),
                           tensor_nbytes=entry.tensor_nbytes, stride=entry.stride, dim0=entry.dim0,
                           num_tensors=entry.num_tensors, placement=entry.placement, is_blocks=entry.is_blocks,
                           remote_accessible=entry.remote_accessible or entry.owned, owned=entry.owned, slot=slot,
                           keys=keys, blocks_model_id=-1 if entry.blocks_model_id is None else entry.blocks_model_id)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - teardown continues past one failure
        _log.debug("teardown step failed", exc_info=True)


