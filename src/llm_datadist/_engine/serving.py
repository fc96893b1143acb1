"""Serving peers: the answers of one instance to the requests its linked peers send over the control plane.

``PeerService.handle(conn, msg)`` is every link connection's request handler (it runs on the engine's handler
pool, never on a user's thread). Each request type has one method, listed in ``_SERVES`` by message type; a
message of any other type is refused as ParamInvalid. A refusal travels back as an ``Error`` reply carrying the
error's status code (see ``rpc.Connection``).
"""
from __future__ import annotations

from typing import Callable, Dict, Type, TypeVar, cast

from llm_datadist._engine import protocol as proto
from llm_datadist._engine.context import EngineCore
from llm_datadist._engine.errors import CacheNotExist, ParamInvalid
from llm_datadist._engine.registry import CacheEntry, KeyId
from llm_datadist._engine.rpc import Connection

__all__ = ["PeerService"]

Serve = Callable[["PeerService", Connection, proto.Message], proto.Message]
_M = TypeVar("_M", bound=proto.Message)

_SERVES: Dict[type, Serve] = {}  # message type -> the PeerService method answering it


def _serves(kind: Type[_M]) -> Callable[[Callable[[PeerService, Connection, _M], proto.Message]],
                                        Callable[[PeerService, Connection, _M], proto.Message]]:
    """List the decorated method as the answer to requests of type ``kind`` (the method itself is kept)."""
    def register(method: Callable[[PeerService, Connection, _M], proto.Message]
                 ) -> Callable[[PeerService, Connection, _M], proto.Message]:
        _SERVES[kind] = cast(Serve, method)  # called only with messages of type ``kind``
        return method

    return register


class PeerService:
    """What one engine answers its peers: cache views and tables, key consumption, write grants, link notices."""

    __slots__ = ("_engine",)

    def __init__(self, engine: EngineCore) -> None:
        self._engine = engine

    def handle(self, conn: Connection, msg: proto.Message) -> proto.Message:
        """The reply to one request of a peer (the rpc handler of every link connection)."""
        serve = _SERVES.get(type(msg))
        if serve is None:
            raise ParamInvalid(f"unexpected request {type(msg).__name__}")
        return serve(self, conn, msg)

    # -- caches ---------------------------------------------------------------------------------
    @_serves(proto.Resolve)
    def _resolve(self, conn: Connection, msg: proto.Resolve) -> proto.CacheView:
        registry = self._engine.registry
        if msg.kind == "id":
            entry = registry.get(msg.cache_id)
            if not self._engine.is_exposed(entry):
                raise CacheNotExist(f"cache {msg.cache_id} does not exist")
            if msg.batch_index >= entry.dim0:
                raise CacheNotExist(f"batch index {msg.batch_index} >= batch size {entry.dim0} of cache {msg.cache_id}")
            return self.view_of(entry, msg.batch_index)
        if msg.kind == "blocks":
            return self.view_of(registry.lookup_blocks(msg.model_id))
        if msg.kind in ("req", "prefix"):
            entry, slot = registry.lookup_key(KeyId(msg.kind, msg.ident, msg.model_id))
            return self.view_of(entry, slot)
        raise ParamInvalid(f"unknown resolve kind {msg.kind!r}")

    @_serves(proto.TableRequest)
    def _table(self, conn: Connection, msg: proto.TableRequest) -> proto.Table:
        engine = self._engine
        caches = [self.view_of(e) if engine.is_exposed(e) else _redacted(e) for e in engine.registry.entries()]
        return proto.Table(version=engine.registry.version, caches=caches)

    @_serves(proto.Consume)
    def _consume(self, conn: Connection, msg: proto.Consume) -> proto.Ack:
        self._engine.registry.note_pulled(msg.cache_id, msg.slot, msg.tensor_lo, msg.tensor_hi)
        return proto.Ack()

    def view_of(self, entry: CacheEntry, slot: int = 0) -> proto.CacheView:
        """What a peer learns of one of our caches: geometry, keys, generation and memory descriptors."""
        keys = [(k.namespace, k.ident, k.model_id, s) for s, k in sorted(entry.slot_keys.items())]
        guard = entry.guard
        return proto.CacheView(cache_id=entry.cache_id, tensor_addrs=list(entry.tensor_addrs),
                               tensor_nbytes=entry.tensor_nbytes, stride=entry.stride, dim0=entry.dim0,
                               num_tensors=entry.num_tensors, placement=entry.placement, is_blocks=entry.is_blocks,
                               remote_accessible=entry.remote_accessible or entry.owned, owned=entry.owned,
                               slot=slot, keys=keys,
                               blocks_model_id=-1 if entry.blocks_model_id is None else entry.blocks_model_id,
                               kind=entry.kind, guard=(guard.slot, guard.value, guard.addr) if guard else (0, 0, 0),
                               regions=self._engine.region_views(entry))

    # -- one-sided writes -----------------------------------------------------------------------
    @_serves(proto.WriteGrant)
    def _grant_write(self, conn: Connection, msg: proto.WriteGrant) -> proto.Granted:
        return self._engine.links.grant_write(conn, msg)

    @_serves(proto.WriteRelease)
    def _release_write(self, conn: Connection, msg: proto.WriteRelease) -> proto.Ack:
        self._engine.links.release_write(conn, msg.grant_id)
        return proto.Ack()

    @_serves(proto.RevokeGrant)
    def _revoke_grant(self, conn: Connection, msg: proto.RevokeGrant) -> proto.Ack:
        self._engine.links.revoke_grant(conn, msg.grant_id)
        return proto.Ack()

    def writable_entry(self, slot: int, value: int) -> CacheEntry:
        """The live cache of a generation that accepts writes from peers (CacheNotExist / ParamInvalid)."""
        entry = self._engine.registry.by_guard(slot, value)
        if not (self._engine.is_exposed(entry) and entry.writable):
            raise ParamInvalid(f"cache {entry.cache_id} does not accept writes from peers (register it with "
                               f"remote_accessible=True to receive pushes)")
        return entry

    # -- link notices ---------------------------------------------------------------------------
    @_serves(proto.Credentials)
    def _credentials(self, conn: Connection, msg: proto.Credentials) -> proto.Ack:
        self._engine.links.note_credentials(conn, msg.credentials)
        return proto.Ack()

    @_serves(proto.Unlink)
    def _unlink(self, conn: Connection, msg: proto.Unlink) -> proto.Ack:
        self._engine.links.note_peer_unlink(conn)
        return proto.Ack()

    @_serves(proto.TableChanged)
    def _table_changed(self, conn: Connection, msg: proto.TableChanged) -> proto.Ack:
        self._engine.links.invalidate_table_of(conn)
        return proto.Ack()

    @_serves(proto.Ping)
    def _ping(self, conn: Connection, msg: proto.Ping) -> proto.Ack:
        return proto.Ack()

    @_serves(proto.Notify)
    def _notify(self, conn: Connection, msg: proto.Notify) -> proto.Ack:
        self._engine.links.receive_notice(conn, msg)
        return proto.Ack()

    @_serves(proto.Usage)
    def _usage(self, conn: Connection, msg: proto.Usage) -> proto.Ack:
        self._engine.links.receive_usage(conn, msg)
        return proto.Ack()

    @_serves(proto.ConfirmDial)
    def _confirm_dial(self, conn: Connection, msg: proto.ConfirmDial) -> proto.DialConfirmed:
        return proto.DialConfirmed(dialing=self._engine.links.is_dialing(msg.dial_nonce))


def _redacted(entry: CacheEntry) -> proto.CacheView:
    """A cache peers may not access: listed (so a pull of it is refused as not remote accessible) without its
    addresses, memory descriptors or generation."""
    return proto.CacheView(cache_id=entry.cache_id, tensor_addrs=[], tensor_nbytes=entry.tensor_nbytes,
                           stride=entry.stride, dim0=entry.dim0, num_tensors=entry.num_tensors,
                           placement=entry.placement, is_blocks=entry.is_blocks, remote_accessible=False, owned=False,
                           blocks_model_id=-1 if entry.blocks_model_id is None else entry.blocks_model_id,
                           kind=entry.kind)
