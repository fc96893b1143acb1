"""Link manager: the listener, one-sided link_clusters/unlink_clusters and the link table."""
from __future__ import annotations

import logging
import itertools
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import msgspec

from llm_datadist._engine import notices as nt
from llm_datadist._engine import protocol as proto
from llm_datadist._engine import rpc
from llm_datadist._engine.errors import (AlreadyLinked, EngineError, ExistLink, LinkFailed, NotLinked, ParamInvalid,
                                         Timeout)
from llm_datadist._engine.executor import Executor
from llm_datadist._engine.link import Link
from llm_datadist._engine.listener import Listener
from llm_datadist._engine.options import EngineOptions
from llm_datadist._engine.poller import Poller
from llm_datadist._engine.registry import CacheEntry, Registry
from llm_datadist._engine.stats import Stats, Usage, valid_usage
from llm_datadist._transport.base import PeerInfo, Transport
from llm_datadist._transport.tls import Tls
from llm_datadist.status import LLMStatusCode
from llm_datadist.utils.log import warn_unauthenticated_listener

_log = logging.getLogger(__name__)
MAX_PARALLEL_LINKS = 16
MAX_LINKS = int(os.environ.get("LLM_DATADIST_MAX_LINKS", "") or 1024)  # links one instance holds at most
EVICT_PING_S = 1.0  # how long an existing link has to answer before a new one with its identity replaces it
MAX_GRANTS_PER_LINK = 256  # outstanding write grants one peer may hold (a push holds one while it writes)
NOTICE_SEND_S = 0.2  # a table-change notice that cannot be queued this fast is dropped (guards still hold)


LinkKey = Tuple[int, int]  # (peer cluster id, comm id, or DIALED / ACCEPTED for link_clusters links)
FINALIZED = "finalized"  # a link dropped because this instance finalized (statistics)
DIALED, ACCEPTED = 0, -1  # a link_clusters link we made, and one a peer made to us


class LinkOwner(Protocol):
    """What the link manager uses of its engine (the engine module imports this one, not the reverse)."""

    cluster_id: int
    host_id: str
    opts: EngineOptions
    tls: Optional[Tls]
    registry: Registry
    transports: Dict[str, Transport]
    poller: Poller
    handlers: Executor
    handle_request: rpc.Handler
    writable_entry: Callable[[int, int], CacheEntry]
    stats: Stats

    def hello(self, comm: Any, target_cluster_id: Optional[int] = None) -> proto.Hello: ...

    def hello_ack(self, credentials: Dict[str, bytes]) -> proto.HelloAck: ...

    def grant_credentials(self, link_id: int) -> Dict[str, bytes]: ...

    def revoke_credentials(self, link_id: int) -> None: ...


class LinkManager:
    """Owns every link of one instance, keyed by (peer cluster id, comm id).

    ``link_clusters`` links are keyed DIALED on the side that called it and ACCEPTED on the other, so two
    peers that both link to each other (every endpoint a client and a server) hold two links; each
    rank-table comm domain has its own links, so several domains with the same members coexist. The newest
    usable link to a cluster carries its transfers. A self link
    (``link_clusters`` to our own listener) has two ends in this process: the client end is in the table,
    the serving end is kept apart in ``_served`` so that lookups find exactly one link.
    """

    def __init__(self, engine: LinkOwner) -> None:
        self._engine = engine
        self._links: Dict[LinkKey, Link] = {}
        self._served: Dict[int, Link] = {}  # id(link) -> serving end of a self link
        self._by_conn: Dict[int, Link] = {}  # id(rpc connection) -> link
        self._lock = threading.RLock()
        self._listener: Optional[Listener] = None
        self._listen: Optional[Tuple[str, int]] = None
        self._serials = itertools.count(1)
        self._dialing: set = set()  # dial nonces of our handshakes in flight (a peer may ask us to vouch)
        self._closed = False
        self.notices = nt.Notices(f"llm-dd-{engine.cluster_id}")  # notifications and link-down events

    # -- table ----------------------------------------------------------------------------------
    def get(self, cluster_id: int, usable: Optional[Callable[[Link], bool]] = None) -> Link:
        """The live link to ``cluster_id`` that carries transfers (that ``usable`` accepts); NotLinked if none.

        Deterministic, and never decided by a peer: links this side's caller made (``link_clusters`` dials and
        rank-table domains, newest first) come before links peers made to us (``link_clusters`` accepted).
        """
        with self._lock:
            candidates = [link for (cid, _), link in self._links.items()
                          if cid == cluster_id and not link.gone]
        for link in sorted(candidates, key=lambda link: (link.key[1] == ACCEPTED, -link.serial)):
            if usable is None or usable(link):
                return link
        raise NotLinked(f"cluster {cluster_id} is not linked")

    def has_links(self) -> bool:
        with self._lock:
            return any(not link.gone for link in self._links.values())

    def has_link_to(self, cluster_id: int) -> bool:
        with self._lock:
            return any(cid == cluster_id and not link.gone
                       for (cid, _), link in self._links.items())

    def links(self) -> List[Link]:
        """Every link in the table (the serving ends of self links excluded)."""
        with self._lock:
            return list(self._links.values())

    def add(self, link: Link, replace: bool) -> None:
        with self._lock:
            old = self._links.get(link.key)
            if old is not None and not old.closed and not replace:
                raise AlreadyLinked(f"cluster {link.cluster_id} is already linked")
            self._links[link.key] = link
            link.listed = True
        self._engine.stats.link_made("comm" if link.comm_id else "accepted" if link.accepted else "dialed")
        if old is not None and old is not link:
            _log.info("replacing stale link to cluster %d", link.cluster_id)
            old.cause = old.cause or nt.REPLACED
            old.close()

    def drop(self, key: LinkKey, link: Optional[Link] = None) -> None:
        """Remove the link under ``key`` (only if it is ``link``, when given) and close it."""
        with self._lock:
            current = self._links.get(key)
            if current is None or (link is not None and current is not link):
                return
            del self._links[key]
        current.cause = current.cause or nt.UNLINKED
        current.close()

    def _forget(self, link: Link) -> bool:
        """Take ``link`` out of the table (or the served set) without closing it; True if it was there."""
        with self._lock:
            if self._served.pop(id(link), None) is not None:
                return True
            if self._links.get(link.key) is link:
                del self._links[link.key]
                return True
        return False

    def link_of(self, conn) -> Optional[Link]:
        """The link (either end of a self link) that owns the RPC connection ``conn``."""
        with self._lock:
            return self._by_conn.get(id(conn))

    # -- listening ------------------------------------------------------------------------------
    @property
    def listen_address(self) -> Optional[Tuple[str, int]]:
        return self._listen

    def start_listening(self, ip: str, port: int) -> None:
        if self._listen is not None and self._listen[1] == port and self._listen[0] == ip:
            return
        self.stop_listening()
        self._listener = Listener(ip, port, self._on_accept, name=f"llm-dd-listen-{port}")
        self._listen = (ip, self._listener.port)
        _log.info("cluster %d listening on %s:%d", self._engine.cluster_id, ip, self._listener.port)
        warn_unauthenticated_listener(ip, self.link_secret, self.tls_on)

    @property
    def link_secret(self) -> Optional[bytes]:
        """The instance's link secret (None: links are not authenticated)."""
        return self._engine.opts.link_secret

    @property
    def tls_on(self) -> bool:
        """Whether mutual TLS authenticates every link's peer."""
        return self._engine.tls is not None

    def stop_listening(self) -> None:
        listener, self._listener, self._listen = self._listener, None, None
        if listener is not None:
            listener.close()

    def _on_accept(self, sock: socket.socket, addr) -> None:
        self.accept(sock, addr, comm=None)

    def accept(self, sock: socket.socket, addr, comm) -> Optional[Link]:
        """Serve one incoming handshake; ``comm`` is the rank-table domain it belongs to, if any.

        The link is in the table before the HelloAck leaves, so the server can use it as soon as the
        client's link_clusters returns.
        """
        deadline = time.monotonic() + 10.0
        engine = self._engine
        made: Dict[str, Any] = {}

        def decide(hello: proto.Hello) -> proto.HelloAck:
            if hello.remote_cache_accessible != engine.opts.remote_cache_accessible:
                return _refusal(LLMStatusCode.LLM_PARAM_INVALID, "remote cache accessible mode differs")
            if hello.target_cluster_id is not None and hello.target_cluster_id != engine.cluster_id:
                return _refusal(LLMStatusCode.LLM_LINK_FAILED,
                                f"this is cluster {engine.cluster_id}, not {hello.target_cluster_id}")
            if comm is not None and not comm.accepts(hello):
                return _refusal(LLMStatusCode.LLM_LINK_FAILED, "not a member of this comm domain")
            refusal = self._admit(hello, comm)
            if refusal is not None:
                return refusal
            link = self._make_link(made.get("sock", sock), hello, addr[0], comm)
            made["link"] = link
            if hello.cluster_id == engine.cluster_id and comm is None:
                with self._lock:  # the serving end of a self link: the client end goes into the table
                    self._served[id(link)] = link
                    link.listed = True
            else:
                self.add(link, replace=True)  # a client that restarted replaces its stale link ("force link")
            return engine.hello_ack(engine.grant_credentials(link.serial))

        try:
            sock, _hello, ack = rpc.accept_handshake(sock, deadline, engine.opts.link_secret, decide, engine.tls,
                                                     secured=lambda s: made.update(sock=s))
        except Exception as exc:  # noqa: BLE001 - a bad client never hurts the server
            # INFO, not WARNING: port scanners and TCP health probes connect and close, and a stranger must not
            # be able to fill the log; the client that wanted the link gets the error itself
            _log.info("handshake from %s failed: %s", addr, exc)
            ack = None
        link = made.get("link")
        if link is None or ack is None or ack.code != 0:
            self._engine.stats.link_failed("accept", LLMStatusCode(ack.code) if ack is not None and ack.code
                                           else LLMStatusCode.LLM_LINK_FAILED)
            if link is not None and self._forget(link):
                link.close()
            _close_quietly(sock)
            return None
        link.conn.start()
        _log.info("accepted link from cluster %d (%s)", link.cluster_id, addr[0])
        return link

    def _admit(self, hello: proto.Hello, comm) -> Optional[proto.HelloAck]:
        """Refuse a handshake beyond the link cap, or one whose claimed cluster id a live link disputes.

        Without a shared secret anyone can claim a cluster id, so every live link we hold to that cluster
        (dialed or accepted, any comm domain) is asked over its own connection whether its peer is making
        this dial (``ConfirmDial`` with the handshake's ``dial_nonce``): a peer that denies it keeps the
        newcomer out (LLM_ALREADY_LINK); one that vouches for it (mutual links, another comm domain, a
        re-dial) or that does not answer (dead) lets it in. A newcomer under the key of a live link
        replaces that link only when the peer vouched, or its link is dead; with a secret the newcomer
        proved it belongs and replaces the link of its own key at once, but links under other keys are
        still asked.
        """
        key = (hello.cluster_id, comm.comm_id if comm else ACCEPTED)
        with self._lock:
            live = [link for link in self._links.values() if not link.closed]
            old = self._links.get(key)
            others = [link for k, link in self._links.items()
                      if k[0] == hello.cluster_id and k != key and not link.gone]
        if len(live) >= MAX_LINKS and old is None:
            return _refusal(LLMStatusCode.LLM_LINK_FAILED, f"this instance already holds {MAX_LINKS} links "
                                                           f"(LLM_DATADIST_MAX_LINKS)")
        if old is not None and not old.closed and not self._engine.opts.link_secret:
            others.insert(0, old)
        for link in others:
            if self._vouches(link, hello.dial_nonce) is False:
                return _refusal(LLMStatusCode.LLM_ALREADY_LINK,
                                f"cluster {hello.cluster_id} is already linked here, its link is alive and its "
                                f"peer did not make this handshake")
        return None

    def _vouches(self, link: Link, dial_nonce: bytes) -> Optional[bool]:
        """Whether ``link``'s peer is making the dial ``dial_nonce``; None when the link is dead."""
        try:
            reply = link.conn.call(proto.ConfirmDial(dial_nonce=dial_nonce), time.monotonic() + EVICT_PING_S)
        except (Timeout, LinkFailed):
            _log.info("link to cluster %d did not answer: a new link with its identity may replace it",
                      link.cluster_id)
            return None
        except EngineError:  # any refusal to answer is a denial
            return False
        return isinstance(reply, proto.DialConfirmed) and reply.dialing

    def is_dialing(self, dial_nonce: bytes) -> bool:
        """Whether one of our handshakes in flight carries ``dial_nonce`` (a peer asks before admitting it)."""
        with self._lock:
            return len(dial_nonce) >= proto.MIN_DIAL_NONCE_BYTES and dial_nonce in self._dialing

    def _make_link(self, sock, hello, address: str, comm, start: bool = False) -> Link:
        """A link over a handshaken socket; ``hello`` is the peer's Hello or HelloAck."""
        engine = self._engine
        peer = PeerInfo(cluster_id=hello.cluster_id, host_id=hello.host_id, pid=hello.pid, address=address,
                        descriptor=b"", nonce=hello.nonce)
        holder: Dict[str, Link] = {}
        conn = rpc.Connection(sock, handler=engine.handle_request,
                              on_close=lambda _c: self._on_connection_lost(holder.get("link")),
                              name=f"llm-dd-link-{hello.cluster_id}", start=False, poller=engine.poller,
                              executor=engine.handlers)
        link = Link(peer, conn, engine.transports, hello.remote_cache_accessible,
                    comm_id=comm.comm_id if comm else 0, serial=next(self._serials), descriptors=hello.transports,
                    same_host=hello.host_id == engine.host_id, on_closed=self._link_closed,
                    accepted=isinstance(hello, proto.Hello))
        holder["link"] = link
        link.usage = Usage(enabled=engine.stats.enabled)
        with self._lock:
            self._by_conn[id(conn)] = link
        self.notices.link_up(link.serial)  # before its connection reads: the peer may notify as soon as it is up
        if start:
            conn.start()
        return link

    def note_credentials(self, conn, credentials: Dict[str, bytes]) -> None:
        """The client end granted us its per-link credentials (first request after the handshake)."""
        link = self.link_of(conn)
        if link is not None:
            link.set_credentials(credentials)

    # -- one-sided write grants (owner side) ------------------------------------------------------
    def grant_write(self, conn, msg: proto.WriteGrant) -> proto.Granted:
        """Hold the caches a peer's one-sided write targets, so their release waits for the write."""
        link = self.link_of(conn)
        if link is None:
            raise NotLinked("write grant over a connection that is no link")
        if not msg.guards:
            raise ParamInvalid("a write grant names no cache")
        if len({slot for slot, _value in msg.guards}) != len(msg.guards):
            raise ParamInvalid("a write grant names a cache more than once")
        with self._lock:
            if len(link.grants) >= MAX_GRANTS_PER_LINK:
                raise ParamInvalid(f"cluster {link.cluster_id} already holds {MAX_GRANTS_PER_LINK} write grants; "
                                   f"release some first")
        registry = self._engine.registry
        held = []
        try:
            for slot, value in msg.guards:
                held.append(registry.pin_entry(self._engine.writable_entry(slot, value)))
        except BaseException:
            for entry in held:
                registry.unpin(entry)
            raise
        grant_id = next(self._serials)
        with self._lock:
            if link.closed or link.retired:
                for entry in held:
                    registry.unpin(entry)
                raise NotLinked(f"cluster {link.cluster_id} is unlinking")
            link.grants[grant_id] = held  # the cap was checked above: concurrent handlers exceed it by a few
        return proto.Granted(grant_id=grant_id)

    def revoke_released(self) -> None:
        """Ask peers to give back the write grants that hold caches being released (their writers keep grants
        for reuse; the release waits for them)."""
        with self._lock:
            asks = [(link, grant_id) for link in list(self._links.values()) + list(self._served.values())
                    for grant_id, held in link.grants.items()
                    if grant_id not in link.revoking and any(entry.released for entry in held)]
            for link, grant_id in asks:
                link.revoking.add(grant_id)
        for link, grant_id in asks:
            try:
                link.conn.notify(proto.RevokeGrant(grant_id=grant_id), time.monotonic() + NOTICE_SEND_S)
            except EngineError as exc:  # the link is going: its grants go with it
                _log.debug("grant revocation to cluster %d not sent: %s", link.cluster_id, exc)

    def revoke_grant(self, conn, grant_id: int) -> None:
        """The owner over ``conn`` wants a grant it gave us back."""
        link = self.link_of(conn)
        if link is not None:
            link.held_grants.revoke(grant_id)

    def release_write(self, conn, grant_id: int) -> None:
        link = self.link_of(conn)
        if link is None:
            return
        with self._lock:
            held = link.grants.pop(grant_id, [])
            link.revoking.discard(grant_id)
        for entry in held:
            self._engine.registry.unpin(entry)

    def _link_closed(self, link: Link) -> None:
        """A link went away: its peer's grants end, the credentials given to it are revoked, and the application
        learns of it (a link-down event, unless this instance is finalizing)."""
        with self._lock:
            grants, link.grants = link.grants, {}
            self._by_conn.pop(id(link.conn), None)
        for held in grants.values():
            for entry in held:
                self._engine.registry.unpin(entry)
        self._engine.revoke_credentials(link.serial)
        cause = nt.PEER_UNLINKED if link.peer_unlinked else link.cause or nt.LOST
        if link.listed:
            self._engine.stats.link_dropped(FINALIZED if self._closed else cause)
        self.notices.link_down(link.cluster_id, link.serial, cause, self.has_link_to(link.cluster_id),
                               report=link.listed and not self._closed)

    # -- notifications ----------------------------------------------------------------------------
    def receive_usage(self, conn, msg: proto.Usage) -> None:
        """A peer's report of what it moved in or out of our memory over ``conn`` (our served counters)."""
        link = self.link_of(conn)
        if link is not None:
            self._engine.stats.served(link.cluster_id, valid_usage(msg.rows))

    def receive_notice(self, conn, msg: proto.Notify) -> None:
        """A peer's notification over ``conn``: queued for the application (refused when it cannot be)."""
        link = self.link_of(conn)
        if link is None or link.retired:
            raise NotLinked("notification over a connection that is no link (or is unlinking)")
        self.notices.receive(link.cluster_id, link.serial, lambda: link.closed or link.conn.closed, msg)

    def note_peer_unlink(self, conn) -> None:
        """The peer is unlinking over ``conn``: our end leaves the table before the reply goes out.

        So when the peer's unlink returns, this side already answers NotLinked; the connection itself
        closes when the peer closes it (or at finalize).
        """
        link = self.link_of(conn)
        if link is not None:
            link.peer_unlinked = True
            link.retire()
            self._forget(link)
            self._engine.revoke_credentials(link.serial)  # its data-plane token ends with the link, not the socket

    def _on_connection_lost(self, link: Optional[Link]) -> None:
        if link is None or self._closed:
            return
        if link.peer_unlinked:
            _log.info("cluster %d unlinked", link.cluster_id)
        elif not link.closed:
            _log.info("connection to cluster %d lost; link removed", link.cluster_id)
        self._forget(link)
        link.close()

    # -- client side ----------------------------------------------------------------------------
    def connect(self, ip: str, port: int, expected_cluster: Optional[int], deadline: float, comm=None,
                wait_for_listener: bool = False) -> Link:
        """Open one link to a listening peer; raises EngineError subclasses (each counted as a failed dial)."""
        try:
            return self._connect(ip, port, expected_cluster, deadline, comm, wait_for_listener)
        except EngineError as exc:
            self._engine.stats.link_failed("dial", exc.code)
            raise

    def _connect(self, ip: str, port: int, expected_cluster: Optional[int], deadline: float, comm,
                 wait_for_listener: bool) -> Link:
        """Open one link to a listening peer; raises EngineError subclasses.

        With ``wait_for_listener`` a refused connection is retried until the deadline, so a client started a
        moment before its server links as soon as the server listens.
        """
        engine = self._engine
        comm_id = comm.comm_id if comm else DIALED
        if expected_cluster is not None:
            with self._lock:
                existing = self._links.get((expected_cluster, comm_id))
            if existing is not None and not existing.closed:
                raise AlreadyLinked(f"cluster {expected_cluster} is already linked")
        hello = engine.hello(comm, expected_cluster)
        delay = 0.01
        while True:
            try:
                sock, ack = self._dial(ip, port, hello, deadline)
                break
            except rpc.ConnectionRefused as exc:
                remaining = deadline - time.monotonic()
                if not wait_for_listener or remaining <= delay:
                    raise LinkFailed(str(exc)) from exc
                time.sleep(delay)  # nothing listens yet: back off, bounded by the link timeout
                delay = min(delay * 2, 0.2)
        if ack.code != 0:
            _close_quietly(sock)
            raise EngineError(ack.message or "link refused", code=ack.code)
        if expected_cluster is not None and ack.cluster_id != expected_cluster:
            _close_quietly(sock)
            raise LinkFailed(f"{ip}:{port} is cluster {ack.cluster_id}, not the expected {expected_cluster}")
        link = self._make_link(sock, ack, ip, comm, start=True)
        link.set_credentials(ack.credentials)
        try:
            link.conn.call(proto.Credentials(credentials=engine.grant_credentials(link.serial)), deadline)
            self.add(link, replace=False)
        except EngineError:
            link.close()
            raise
        _log.info("linked to cluster %d at %s:%d", ack.cluster_id, ip, port)
        return link

    def _dial(self, ip: str, port: int, hello: proto.Hello, deadline: float):
        """One handshake under a fresh dial nonce that we vouch for while it runs (see ``_admit``)."""
        dial_nonce = proto.make_nonce()
        with self._lock:
            self._dialing.add(dial_nonce)
        try:
            return rpc.open_connection(ip, port, msgspec.structs.replace(hello, dial_nonce=dial_nonce), deadline,
                                       self._engine.opts.link_secret, self._engine.tls)
        finally:
            with self._lock:
                self._dialing.discard(dial_nonce)

    def link_clusters(self, clusters: List[dict], timeout_s: float):
        """Link every cluster in parallel; returns (overall, [code per cluster]) and never raises."""
        deadline = time.monotonic() + timeout_s
        if not clusters:
            return LLMStatusCode.LLM_PARAM_INVALID, []
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_LINKS, len(clusters)),
                                thread_name_prefix="llm-dd-link") as pool:
            codes = list(pool.map(lambda c: self._link_one(c, deadline), clusters))
        return _overall(codes), codes

    def _link_one(self, cluster: dict, deadline: float) -> LLMStatusCode:
        remote = cluster["remote"]
        if len(remote) != 1:
            _log.debug("link_clusters needs exactly one remote ip info, got %d", len(remote))
            return LLMStatusCode.LLM_PARAM_INVALID
        ip, port = remote[0]
        try:
            self.connect(ip, port, cluster["cluster_id"], deadline, wait_for_listener=True)
            return LLMStatusCode.LLM_SUCCESS
        except EngineError as exc:
            _log.info("link to %s:%d failed: %s", ip, port, exc)
            return LLMStatusCode(exc.code)

    def unlink_clusters(self, clusters: List[dict], timeout_s: float, force: bool):
        deadline = time.monotonic() + timeout_s
        if not clusters:
            return LLMStatusCode.LLM_PARAM_INVALID, []
        codes = [self._unlink_one(c, deadline, force) for c in clusters]
        return _overall(codes), codes

    def _unlink_one(self, cluster: dict, deadline: float, force: bool) -> LLMStatusCode:
        """Our own link_clusters link to the cluster, else the one it made to us (the server's unlink)."""
        cluster_id = cluster["cluster_id"]
        keys = [(cluster_id, DIALED), (cluster_id, ACCEPTED)]
        if force:
            for key in keys:
                self.drop(key)
            return LLMStatusCode.LLM_SUCCESS
        if len(cluster["remote"]) != 1:
            return LLMStatusCode.LLM_PARAM_INVALID
        with self._lock:
            link = next((self._links[k] for k in keys if k in self._links), None)
        if link is None:
            return LLMStatusCode.LLM_NOT_YET_LINK
        try:
            self.unlink(link, deadline)
        except EngineError as exc:
            _log.info("unlink of cluster %d failed: %s", cluster_id, exc)
            return LLMStatusCode.LLM_UNLINK_FAILED
        return LLMStatusCode.LLM_SUCCESS

    def unlink(self, link: Link, deadline: float) -> None:
        """Unlink in order: our end stops taking transfers, the peer drops its end and answers, we close.

        Raises EngineError when the peer did not confirm (the link is closed on this side anyway).
        """
        link.retire()
        link.report_usage(deadline)  # before the Unlink: the peer's served counters stay exact
        try:
            link.conn.call(proto.Unlink(cluster_id=self._engine.cluster_id), deadline)
        finally:
            self.drop(link.key, link)

    def invalidate_table_of(self, conn) -> None:
        """A peer announced a table change over ``conn``."""
        link = self.link_of(conn)
        if link is not None:
            link.invalidate_table()

    def notify_table_changed(self, version: int) -> None:
        """Tell every linked peer that our cache table changed, so no stale snapshot is used."""
        for link in self.links():
            if link.cluster_id == self._engine.cluster_id:  # a self link caches our own table: drop it here
                link.invalidate_table()
                continue
            try:  # a notification each: nobody waits for a reply, one slow peer delays no other
                link.conn.notify(proto.TableChanged(version=version), time.monotonic() + NOTICE_SEND_S)
            except EngineError as exc:
                _log.info("table change notice to cluster %d not sent: %s", link.cluster_id, exc)

    def check_no_links(self) -> None:
        if self.has_links():
            raise ExistLink("links exist, unlink them first")

    def close(self) -> None:
        self._closed = True
        self.stop_listening()
        with self._lock:
            links = list(self._links.values()) + list(self._served.values())
            self._links, self._served = {}, {}
        for link in links:
            link.close()
        self.notices.close()


def _overall(codes: List[LLMStatusCode]) -> LLMStatusCode:
    for code in codes:
        if code != LLMStatusCode.LLM_SUCCESS:
            return code
    return LLMStatusCode.LLM_SUCCESS


def _refusal(code: LLMStatusCode, message: str) -> proto.HelloAck:
    """A refused handshake: the code and the reason, nothing about this instance."""
    return proto.HelloAck(code=int(code), message=message)


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass

