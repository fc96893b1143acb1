"""One established link to a peer instance: its RPC connection, data routes, views of the peer's caches."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import msgspec

from llm_datadist._engine import planner
from llm_datadist._engine import protocol as proto
from llm_datadist._engine.errors import CacheNotExist, EngineError, LinkFailed, NotLinked, ParamInvalid, Timeout
from llm_datadist._engine.grants import HeldGrants
from llm_datadist._engine.stats import Usage
from llm_datadist._engine.types import SourceSpec
from llm_datadist._transport import cross_host_reason
from llm_datadist._transport.base import (PROCESS, SAME_HOST, Channel, ConnectFailed, CopyPlan, PeerInfo,
                                          RemoteRegion, Transport)

_log = logging.getLogger(__name__)
CREDENTIALS_WAIT_S = 5.0  # how long the serving end waits for the client's credentials before a route needs them
CLOSE_WAIT_S = 5.0  # how long close() waits for transfers still running on the link
PROBE_S = 1.0  # how long a broken transfer waits for the peer to answer a ping before the link is dropped


class Route:
    """A connected transport of a link."""

    __slots__ = ("transport", "channel")

    def __init__(self, transport: Transport, channel: Channel) -> None:
        self.transport = transport
        self.channel = channel

    @property
    def name(self) -> str:
        return self.transport.name


class Link:
    """A symmetric link: either side resolves, reads and writes the other's caches through it.

    Routes are connected on first use, in priority order, until a transport that covers every plan is up
    (a partial one such as shm stays in front of it); each plan takes the first route whose memory kinds
    and coverage fit. Transfers count themselves in, so ``close`` can wait for them before the channels go.
    """

    def __init__(self, peer: PeerInfo, conn, transports: Dict[str, Transport], peer_ra: bool,
                 comm_id: int = 0, serial: int = 0, descriptors: Optional[Dict[str, bytes]] = None,
                 same_host: bool = False, on_closed: Optional[Callable[[Link], None]] = None,
                 accepted: bool = False) -> None:
        self.peer = peer
        self.conn = conn
        self.peer_ra = peer_ra
        self.comm_id = comm_id
        self.serial = serial  # creation order: the newest usable link to a cluster carries its transfers
        self.accepted = accepted  # the peer made this link (we are its server)
        self.same_host = same_host
        self._transports = transports
        self._descriptors: Dict[str, bytes] = dict(descriptors or {})
        self._credentials: Dict[str, bytes] = {}
        self._have_credentials = threading.Event()
        self._routes: List[Route] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._table: Optional[proto.Table] = None
        self._blocks_views: Dict[int, proto.CacheView] = {}
        self._sides: Dict[int, Tuple[proto.CacheView, planner.Side]] = {}  # id(view) -> (view, Side)
        self._regions: Dict[Tuple[int, int], proto.RegionView] = {}
        self._on_closed = on_closed
        self.grants: Dict[int, list] = {}  # owner side: write grants the peer holds over this link
        self.closed = False
        self.retired = False
        self.peer_unlinked = False
        self.listed = False  # it was in the link table (its end is reported to the application)
        self.cause = ""  # why the link went away, when this side knows it (a link-down event's cause)
        self.usage = Usage()  # what we moved in or out of the peer's memory since our last report to it
        self.held_grants = HeldGrants(self._release_grant)  # write grants the peer gave us, kept for reuse
        self.revoking: set = set()  # owner side: ids of the peer's grants we asked back

    @property
    def cluster_id(self) -> int:
        return self.peer.cluster_id

    @property
    def key(self) -> Tuple[int, int]:
        """(peer cluster id, comm id; for link_clusters links 0 when we dialled, -1 when we accepted)."""
        if self.comm_id:
            return self.peer.cluster_id, self.comm_id
        return self.peer.cluster_id, (-1 if self.accepted else 0)

    def _release_grant(self, grant_id: int) -> None:
        """Give a write grant back to the peer (if the link is gone, the peer dropped it with the link)."""
        try:
            self.conn.notify(proto.WriteRelease(grant_id=grant_id), time.monotonic() + 1.0)
        except EngineError as exc:
            _log.debug("write release to cluster %d not sent: %s", self.cluster_id, exc)

    def report_usage(self, deadline: float) -> None:
        """Tell the peer what we moved in or out of its memory since the last report (its served statistics);
        rows a failed send could not deliver wait for the next report."""
        rows = self.usage.take()
        if not rows or self.conn.closed:
            return
        try:
            self.conn.notify(proto.Usage(rows=rows), deadline)
        except EngineError as exc:
            self.usage.give_back(rows)
            _log.debug("usage report to cluster %d not sent: %s", self.cluster_id, exc)

    def retire(self) -> None:
        """Take no new transfers (unlink in progress); the connection stays up until closed."""
        self.retired = True

    @property
    def gone(self) -> bool:
        """Closed, unlinking, or its control connection is closed (the close callback may still be on its way)."""
        return self.closed or self.retired or self.conn.closed

    def drop_if_dead(self, deadline: float) -> None:
        """A transfer on this link failed with LinkFailed: close the link now if its peer is gone.

        A peer's forced unlink or crash closes its data routes and its control connection together; which of
        them this side notices first is a matter of timing. A ping over the control connection settles it
        before the failure is reported, so the next call on this cluster answers NotLinked, not LinkFailed
        again. A peer that still answers keeps the link (only a data route broke). The ping waits at most
        PROBE_S and never past the call's ``deadline``; with no time left only a closed connection counts.
        """
        if self.closed:
            return
        if not self.conn.closed:
            wait = min(PROBE_S, deadline - time.monotonic())
            if wait <= 0:
                return
            try:
                self.conn.call(proto.Ping(), time.monotonic() + wait)
                return
            except (LinkFailed, Timeout):
                if not self.conn.closed and wait < PROBE_S:
                    return  # the call's own time ran out first: no verdict on the peer
        _log.info("cluster %d does not answer after a failed transfer; link removed", self.cluster_id)
        self.close()

    def set_credentials(self, credentials: Dict[str, bytes]) -> None:
        """What the peer granted us for this link (from its HelloAck or its Credentials request)."""
        self._credentials = dict(credentials)
        self._have_credentials.set()

    # -- data routes ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.retired:
            raise NotLinked(f"cluster {self.cluster_id} was unlinked")
        if self.closed:
            raise LinkFailed(f"link to cluster {self.cluster_id} is closed")

    def routes(self, deadline: float) -> List[Route]:
        """The connected routes, connecting them on first use."""
        routes = self._routes
        if routes:
            return routes
        with self._lock:
            self._check_open()
            if not self._routes:
                self._routes = self._connect_all(deadline)
            return self._routes

    def _connect_all(self, deadline: float) -> List[Route]:
        errors: List[str] = []
        routes: List[Route] = []
        for transport in sorted(self._transports.values(), key=lambda t: -t.priority):
            channel = self._connect(transport, deadline, errors)
            if channel is None:
                continue
            routes.append(Route(transport, channel))
            if not transport.caps.partial:
                break
        if not routes:
            raise LinkFailed(f"no transport reaches cluster {self.cluster_id}: {'; '.join(errors) or 'none shared'}")
        where = "same host" if self.same_host else "cross host"
        reason = "" if self.same_host else cross_host_reason(routes[-1].name, self._transports)
        _log.info("link to cluster %d routes over %s (%s, peer %s pid %d)%s", self.cluster_id,
                  " then ".join(r.name for r in routes), where, self.peer.address, self.peer.pid,
                  f": {reason}" if reason else "")
        for error in errors:  # a faster route that could not be used: why, and how to fix it, once per link
            _log.info("link to cluster %d: %s", self.cluster_id, error)
        if self._regions:
            for route in routes:
                route.transport.learn(route.channel, self._remote_regions(route.name))
        return routes

    def _reachable(self, transport: Transport) -> bool:
        locality = transport.caps.locality
        if locality == PROCESS or locality == SAME_HOST:
            return self.same_host
        return True

    @property
    def descriptors(self) -> Dict[str, bytes]:
        """The peer's transport descriptors from its handshake, by transport name (a copy)."""
        return dict(self._descriptors)

    def peer_info(self, name: str) -> PeerInfo:
        """What transport ``name`` needs to reach the peer: its descriptor and the credential it granted us."""
        return PeerInfo(self.peer.cluster_id, self.peer.host_id, self.peer.pid, self.peer.address,
                        self._descriptors.get(name, b""), self._credentials.get(name, b""), self.peer.nonce)

    def _connect(self, transport: Transport, deadline: float, errors: List[str]) -> Optional[Channel]:
        descriptor = self._descriptors.get(transport.name)
        if descriptor is None or not self._reachable(transport):
            return None
        if transport.name not in self._credentials and not self._have_credentials.is_set():
            self._have_credentials.wait(max(0.0, min(CREDENTIALS_WAIT_S, deadline - time.monotonic())))
        peer = self.peer_info(transport.name)
        if not transport.can_reach(peer):
            return None
        try:
            return transport.connect(peer, deadline)
        except ConnectFailed as exc:
            errors.append(f"{transport.name}: {exc}")
            _log.debug("link to cluster %d: %s not usable: %s", self.cluster_id, transport.name, exc)
            return None

    def route_for(self, plan: CopyPlan, deadline: float) -> Route:
        for route in self.routes(deadline):
            kinds = route.transport.caps.memory_kinds
            if plan.local_kind in kinds and plan.remote_kind in kinds and route.transport.covers(route.channel, plan):
                return route
        raise LinkFailed(f"no transport to cluster {self.cluster_id} moves {plan.local_kind} <-> "
                         f"{plan.remote_kind} memory for this plan")

    @property
    def route_name(self) -> str:
        """The general (last) route of the link, e.g. "process_vm" or "tcp"; "" before the first transfer."""
        routes = self._routes
        return routes[-1].name if routes else ""

    @property
    def route_names(self) -> List[str]:
        return [r.name for r in self._routes]

    def enter(self) -> None:
        """Count a transfer in (NotLinked/LinkFailed once the link is going away)."""
        with self._lock:
            self._check_open()
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            if not self._active:
                self._idle.notify_all()

    # -- views of the peer's caches ---------------------------------------------------------------
    def _remote_regions(self, transport_name: str) -> List[RemoteRegion]:
        return [RemoteRegion(addr, nbytes, kind, descs[transport_name])
                for (addr, nbytes, kind, descs) in self._regions.values() if transport_name in descs]

    def note_view(self, view: proto.CacheView) -> proto.CacheView:
        """Learn the region descriptors a view carries; returns the view.

        A region of the view replaces those it overlaps: the owner released that memory and registered it again
        in other bounds, and a transport must not be told of both.
        """
        new = False
        for region in view.regions:
            key = (region[0], region[1])
            if self._regions.get(key) != region:
                start, end = region[0], region[0] + region[1]
                for old in [k for k in self._regions if k != key and k[0] < end and start < k[0] + k[1]]:
                    del self._regions[old]
                self._regions[key] = region
                new = True
        if new:
            for route in self._routes:
                route.transport.learn(route.channel, self._remote_regions(route.name))
        return view

    def resolve(self, source: SourceSpec, deadline: float) -> proto.CacheView:
        """Ask the peer to resolve a key/id (normal mode: the owner answers).

        Blocks keys are never consumed, so their views are kept until the peer announces a change of
        its blocks caches (TableChanged) or a transfer finds the view stale; keys and ids are resolved by
        the owner on every pull.
        """
        if source.kind == "blocks":
            view = self._blocks_views.get(source.model_id)
            if view is not None:
                return view
        reply = self.call(proto.Resolve(kind=source.kind, cluster_id=source.cluster_id, ident=source.ident,
                                        model_id=source.model_id, cache_id=source.cache_id,
                                        batch_index=source.batch_index), deadline)
        view = proto.expect_reply(reply, proto.CacheView, f"cluster {self.cluster_id}")
        self.note_view(view)
        if source.kind == "blocks":
            self._blocks_views[source.model_id] = view
        return view

    def table(self, deadline: float, fresh: bool = False) -> proto.Table:
        """The peer's cache table (a snapshot, fetched again when ``fresh`` or after a change notice)."""
        table = self._table
        if table is None or fresh:
            table = proto.expect_reply(self.call(proto.TableRequest(), deadline), proto.Table,
                                       f"cluster {self.cluster_id}")
            for view in table.caches:
                self.note_view(view)
            self._table = table
        return table

    def resolve_from_table(self, source: SourceSpec, deadline: float) -> proto.CacheView:
        """Remote-cache-accessible mode: look up the peer's table snapshot, refreshing once on a miss."""
        view = _lookup(self.table(deadline), source)
        if view is None:
            view = _lookup(self.table(deadline, fresh=True), source)
        if view is None:
            raise CacheNotExist(f"cluster {self.cluster_id} has no cache for {_describe(source)}")
        return view

    def side_of(self, view: proto.CacheView) -> planner.Side:
        """The planner's Side of a peer view, kept while the view is (views of cached snapshots repeat)."""
        hit = self._sides.get(id(view))
        if hit is not None and hit[0] is view:
            return hit[1]
        side = planner.side_of(view)
        if len(self._sides) >= 256:
            self._sides.clear()
        self._sides[id(view)] = (view, side)
        return side

    def invalidate_table(self) -> None:
        """The peer's table changed: the next lookup fetches a fresh snapshot."""
        self._table = None
        self._blocks_views.clear()
        self._sides.clear()

    # -- control --------------------------------------------------------------------------------
    def call(self, msg: proto.Message, deadline: float) -> proto.Message:
        self._check_open()
        return self.conn.call(msg, deadline)

    def consume(self, cache_id: int, slot: int, lo: int, hi: int, deadline: float) -> None:
        self.call(proto.Consume(cache_id=cache_id, slot=slot, tensor_lo=lo, tensor_hi=hi), deadline)

    def close(self) -> None:
        """Wait (bounded) for transfers still running, then disconnect the routes and the connection."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._idle.wait_for(lambda: self._active == 0, CLOSE_WAIT_S)
            routes, self._routes = self._routes, []
        self.conn.close()  # first: a peer whose data route breaks finds the control connection closed already
        for route in routes:
            try:
                route.transport.disconnect(route.channel)
            except Exception:  # noqa: BLE001 - closing must never fail
                _log.debug("disconnect failed", exc_info=True)
        if self._on_closed is not None:
            self._on_closed(self)


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
                return msgspec.structs.replace(view, slot=source.batch_index)
        elif source.kind == "blocks":
            if view.is_blocks and view.blocks_model_id == source.model_id:
                return view
        else:
            for namespace, ident, model_id, slot in view.keys:
                if namespace == source.kind and ident == source.ident and model_id == source.model_id:
                    return msgspec.structs.replace(view, slot=slot)
    return None


def check_view_accessible(view: proto.CacheView, what: str) -> None:
    if not view.remote_accessible:
        raise ParamInvalid(f"{what} cache {view.cache_id} is not remote accessible")
