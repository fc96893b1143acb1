"""One established link to a peer instance: its RPC connection, data channel and cache-table cache."""
from __future__ import annotations

import logging
import threading
from typing import Dict, List, Optional, Tuple

from llm_datadist._engine import protocol as proto
from llm_datadist._engine.errors import CacheNotExist, LinkFailed, NotLinked, ParamInvalid
from llm_datadist._engine.types import SourceSpec
from llm_datadist._transport.base import Channel, ConnectFailed, CopyPlan, PeerInfo, Transport

_log = logging.getLogger(__name__)


class Link:
    """A symmetric link: either side resolves, reads and writes the other's caches through it."""

    def __init__(self, peer: PeerInfo, conn, transports: Dict[str, Transport], peer_ra: bool,
                 comm_id: int = 0, serial: int = 0) -> None:
        self.peer = peer
        self.conn = conn
        self.peer_ra = peer_ra
        self.comm_id = comm_id
        self.serial = serial  # creation order: the newest usable link to a cluster carries its transfers
        self._transports = transports
        self._peer_descriptors: Dict[str, bytes] = {}
        self._routes: List[Tuple[Transport, Channel]] = []
        self._lock = threading.Lock()
        self._table: Optional[proto.Table] = None
        self._blocks_views: Dict[int, proto.CacheView] = {}
        self.closed = False
        self.retired = False
        self.peer_unlinked = False

    @property
    def cluster_id(self) -> int:
        return self.peer.cluster_id

    @property
    def key(self) -> Tuple[int, int]:
        """(peer cluster id, comm id): the link table key."""
        return self.peer.cluster_id, self.comm_id

    def retire(self) -> None:
        """Take no new transfers (unlink in progress); the connection stays up until closed."""
        self.retired = True

    def set_peer_transports(self, descriptors: Dict[str, bytes]) -> None:
        self._peer_descriptors = dict(descriptors)

    # -- data routes ----------------------------------------------------------------------------
    def _ensure_routes(self, deadline: float) -> List[Tuple[Transport, Channel]]:
        """Connect reachable transports in priority order until one that covers every plan is up.

        A transport that overrides ``supports`` (shm: only shared segments) is kept in front of the
        general one and used for the plans it covers.
        """
        with self._lock:
            if self.retired:
                raise NotLinked(f"cluster {self.cluster_id} was unlinked")
            if self.closed:
                raise LinkFailed(f"link to cluster {self.cluster_id} is closed")
            if self._routes:
                return self._routes
            errors: List[str] = []
            for transport in sorted(self._transports.values(), key=lambda t: -t.priority):
                channel = self._connect(transport, deadline, errors)
                if channel is None:
                    continue
                self._routes.append((transport, channel))
                if type(transport).supports is Transport.supports:
                    break
            if not self._routes:
                raise LinkFailed(f"no transport reaches cluster {self.cluster_id}: "
                                 f"{'; '.join(errors) or 'none shared'}")
            same = "same host" if self.peer.same_host(self._routes[0][0].ctx.host_id) else "cross host"
            _log.info("link to cluster %d routes over %s (%s, peer %s pid %d)", self.cluster_id,
                      " then ".join(t.name for t, _ in self._routes), same, self.peer.address, self.peer.pid)
            return self._routes

    def _connect(self, transport: Transport, deadline: float, errors: List[str]) -> Optional[Channel]:
        descriptor = self._peer_descriptors.get(transport.name)
        if descriptor is None:
            return None
        peer = PeerInfo(self.peer.cluster_id, self.peer.host_id, self.peer.pid, self.peer.address, descriptor)
        if not transport.can_reach(peer):
            return None
        try:
            channel = transport.connect(peer, deadline)
        except ConnectFailed as exc:
            errors.append(f"{transport.name}: {exc}")
            return None
        return channel

    def _route_for(self, plan: CopyPlan, deadline: float) -> Tuple[Transport, Channel]:
        routes = self._ensure_routes(deadline)
        for transport, channel in routes:
            if transport.supports(channel, plan):
                return transport, channel
        raise LinkFailed(f"no transport to cluster {self.cluster_id} can move this plan")

    @property
    def route_name(self) -> str:
        """The general (last) route of the link, e.g. "process_vm" or "tcp"; "" before the first transfer."""
        routes = self._routes
        return routes[-1][0].name if routes else ""

    def read(self, plan: CopyPlan, deadline: float) -> None:
        if len(plan) == 0:
            return
        transport, channel = self._route_for(plan, deadline)
        transport.read(channel, plan, deadline)

    def write(self, plan: CopyPlan, deadline: float) -> None:
        if len(plan) == 0:
            return
        transport, channel = self._route_for(plan, deadline)
        transport.write(channel, plan, deadline)

    # -- control --------------------------------------------------------------------------------
    def call(self, msg, deadline: float):
        if self.retired:
            raise NotLinked(f"cluster {self.cluster_id} was unlinked")
        if self.closed:
            raise LinkFailed(f"link to cluster {self.cluster_id} is closed")
        return self.conn.call(msg, deadline)

    def resolve(self, source: SourceSpec, deadline: float) -> proto.CacheView:
        """Ask the peer to resolve a key/id (normal mode: the owner answers).

        Blocks keys are never consumed, so their views are kept until the peer announces a change of
        its blocks caches (TableChanged); keys and ids are resolved by the owner on every pull.
        """
        if source.kind == "blocks":
            view = self._blocks_views.get(source.model_id)
            if view is not None:
                return view
        view = self.call(proto.Resolve(kind=source.kind, cluster_id=source.cluster_id, ident=source.ident,
                                       model_id=source.model_id, cache_id=source.cache_id,
                                       batch_index=source.batch_index), deadline)
        if source.kind == "blocks":
            self._blocks_views[source.model_id] = view
        return view

    def resolve_from_table(self, source: SourceSpec, deadline: float) -> proto.CacheView:
        """Remote-cache-accessible mode: look up the peer's table snapshot, refreshing once on a miss (D13)."""
        if self._table is None:
            self._table = self.call(proto.TableRequest(), deadline)
        view = _lookup(self._table, source)
        if view is None:
            self._table = self.call(proto.TableRequest(), deadline)
            view = _lookup(self._table, source)
        if view is None:
            raise CacheNotExist(f"cluster {self.cluster_id} has no cache for {_describe(source)}")
        return view

    def invalidate_table(self) -> None:
        """The peer's table changed: the next lookup fetches a fresh snapshot."""
        self._table = None
        self._blocks_views.clear()

    def consume(self, cache_id: int, slot: int, lo: int, hi: int, deadline: float) -> None:
        self.call(proto.Consume(cache_id=cache_id, slot=slot, tensor_lo=lo, tensor_hi=hi), deadline)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            routes, self._routes = self._routes, []
        for transport, channel in routes:
            try:
                transport.disconnect(channel)
            except Exception:  # noqa: BLE001 - closing must never fail
                _log.debug("disconnect failed", exc_info=True)
        self.conn.close()


def _describe(source: SourceSpec) -> str:
    if source.kind == "id":
        return f"cache_id={source.cache_id} batch_index={source.batch_index}"
    if source.kind == "blocks":
        return f"blocks key model_id={source.model_id}"
    return f"{source.kind}_id={source.ident} model_id={source.model_id}"


def _lookup(table: proto.Table, source: SourceSpec) -> Optional[proto.CacheView]:
    for view in table.caches:
        if source.kind == "id":
            if view.cache_id == source.cache_id:
                if source.batch_index >= view.dim0:
                    raise CacheNotExist(f"batch index {source.batch_index} >= remote batch size {view.dim0}")
                return _with_slot(view, source.batch_index)
        elif source.kind == "blocks":
            if view.is_blocks and view.blocks_model_id == source.model_id:
                return view
        else:
            for namespace, ident, model_id, slot in view.keys:
                if namespace == source.kind and ident == source.ident and model_id == source.model_id:
                    return _with_slot(view, slot)
    return None


def _with_slot(view: proto.CacheView, slot: int) -> proto.CacheView:
    import msgspec

    return msgspec.structs.replace(view, slot=slot)


def check_view_accessible(view: proto.CacheView, what: str) -> None:
    if not view.remote_accessible:
        raise ParamInvalid(f"{what} cache {view.cache_id} is not remote accessible")
