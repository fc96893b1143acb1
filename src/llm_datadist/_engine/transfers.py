"""Transfers between linked instances: the one resolve -> plan -> move -> retry path of pulls, pushes and tasks.

Each transfer request type of the Engine API has one handler here, ``handler(engine, request)``, listed in
``HANDLERS`` by request type; ``Engine.transfer`` looks the handler up and calls it with the request whole.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, cast

import numpy as np

from llm_datadist._engine import planner
from llm_datadist._engine import protocol as proto
from llm_datadist._engine import requests as rq
from llm_datadist._engine import stats
from llm_datadist._engine.context import EngineCore
from llm_datadist._engine.errors import CacheNotExist, EngineError, ParamInvalid, status_of
from llm_datadist._engine.grants import Held
from llm_datadist._engine.link import Link, check_view_accessible
from llm_datadist._engine.planner import Side, side_of
from llm_datadist._engine.registry import CacheEntry
from llm_datadist._engine.types import LayerSel, SourceSpec
from llm_datadist._transport.base import CopyPlan, RemoteRejected, StaleMemory, TransportError
from llm_datadist.status import LLMStatusCode

_log = logging.getLogger(__name__)
MakePlan = Callable[[proto.CacheView], CopyPlan]
Handler = Callable[[EngineCore, rq.Transfer], None]
_R = TypeVar("_R", bound=rq.Transfer)

HANDLERS: Dict[type, Handler] = {}  # request type -> its handler: the table Engine.transfer dispatches from


def _handles(kind: Type[_R]) -> Callable[[Callable[[EngineCore, _R], None]], Callable[[EngineCore, _R], None]]:
    """List the decorated function as the handler of requests of type ``kind`` (the function itself is kept)."""
    def register(handler: Callable[[EngineCore, _R], None]) -> Callable[[EngineCore, _R], None]:
        HANDLERS[kind] = cast(Handler, handler)  # called only with requests of type ``kind``
        return handler

    return register


def counted_as(req: rq.Transfer) -> Tuple[int, str]:
    """(peer cluster id, direction) under which the statistics count a transfer request."""
    if isinstance(req, rq.BlocksById):
        return req.cluster_id, stats.PULL if req.pull else stats.PUSH
    if isinstance(req, (rq.PullCache, rq.PullBlocks)):
        return req.source.cluster_id, stats.PULL
    return req.dest.cluster_id, stats.PUSH


def deadline_of(engine: EngineCore) -> float:
    return time.monotonic() + engine.opts.sync_kv_timeout_ms / 1000.0


def link_to(engine: EngineCore, cluster_id: int) -> Link:
    """The link for a transfer; our own cluster only through a self link (link_clusters to our listener)."""
    if cluster_id == engine.cluster_id and not engine.links.has_link_to(cluster_id):
        raise ParamInvalid(f"cluster {cluster_id} is the local cluster; a cache can not be pulled from own cluster "
                           f"without a self link")
    return engine.link_for_transfer(cluster_id)


class PinnedLocalCache:
    """The local cache entry, pinned so that a concurrent unregister/deallocate waits for the transfer."""

    __slots__ = ("_registry", "_entry")

    def __init__(self, engine: EngineCore, cache_id: int) -> None:
        self._registry = engine.registry
        self._entry = entry = self._registry.pin(cache_id)
        if engine.opts.remote_cache_accessible and not (entry.remote_accessible or entry.owned):
            self._registry.unpin(entry)
            raise ParamInvalid(f"local cache {cache_id} is not remote accessible")

    def __enter__(self) -> CacheEntry:
        return self._entry

    def __exit__(self, *exc) -> None:
        self._registry.unpin(self._entry)


def send(link: Link, plan: CopyPlan, write: bool, deadline: float) -> None:
    """Move one plan over the link's route for it.

    A one-sided write first asks the owner to hold the destination caches (a write grant), so the owner's
    unregister waits for the write instead of freeing memory under it; the grant is released after.
    """
    if len(plan) == 0:
        return
    link.enter()
    broken = False
    try:
        route = link.route_for(plan, deadline)
        if not (write and route.transport.caps.one_sided):
            (route.transport.write if write else route.transport.read)(route.channel, plan, deadline)
            _count(link, route.transport.name, plan, write)
            return
        if not plan.guards:
            raise ParamInvalid("a one-sided write needs the generation of its destination cache")
        held = _grant(link, plan, deadline)
        failed = True
        try:
            route.transport.write(route.channel, plan, deadline)
            failed = False
        finally:
            link.held_grants.done(held, failed)
        _count(link, route.transport.name, plan, write)
    except (EngineError, TransportError) as exc:
        broken = status_of(exc) == LLMStatusCode.LLM_LINK_FAILED
        raise
    finally:
        link.leave()
        if broken:  # after leave(): closing the link waits for its transfers
            link.drop_if_dead(deadline)  # the next call on this cluster answers NotLinked if the peer is gone


def _grant(link: Link, plan: CopyPlan, deadline: float) -> Held:
    """A write grant over the plan's destination caches: the one the link holds for this generation of them, else
    a new one from the owner (kept for later writes; see grants.py)."""
    key = tuple(sorted((g.slot, g.value) for g in plan.guards))
    held = link.held_grants.take(key)
    if held is not None:
        return held
    granted = proto.expect_reply(link.conn.call(proto.WriteGrant(guards=list(key)), deadline), proto.Granted,
                                 f"cluster {link.cluster_id}")
    return link.held_grants.add(granted.grant_id, key)


def _count(link: Link, transport: str, plan: CopyPlan, write: bool) -> None:
    """A route completed ``plan``: the running call counts its bytes, the link batches them for its peer."""
    nbytes = plan.total_bytes
    stats.moved(transport, nbytes)
    link.usage.add(stats.PUSH if write else stats.PULL, transport, nbytes)


def _view(engine: EngineCore, link: Link, source: SourceSpec, deadline: float) -> proto.CacheView:
    if engine.opts.remote_cache_accessible:
        view = link.resolve_from_table(source, deadline)
        check_view_accessible(view, "remote")
        return view
    return link.resolve(source, deadline)


def move(engine: EngineCore, link: Link, source: SourceSpec, make_plan: MakePlan, write: bool,
         deadline: float) -> proto.CacheView:
    """Resolve the remote cache, plan, move; returns the view used.

    A view may be a snapshot (the peer's table in remote-cache-accessible mode, a blocks view in normal
    mode). When the owner released or replaced that memory since (a guard no longer matches, or the owner
    refuses the ranges), the snapshot is dropped and the move retried once on a fresh view; a cache that is
    really gone ends as LLM_KV_CACHE_NOT_EXIST.
    """
    view = _view(engine, link, source, deadline)
    try:
        send(link, make_plan(view), write, deadline)
        return view
    except (StaleMemory, CacheNotExist, RemoteRejected) as exc:
        link.invalidate_table()
        try:
            fresh = _view(engine, link, source, deadline)
        except CacheNotExist:
            raise CacheNotExist(f"cluster {link.cluster_id} released the cache during the transfer") from exc
        if tuple(fresh.guard) == tuple(view.guard) and not isinstance(exc, StaleMemory):
            raise  # the same live cache refused the ranges: not a stale view
    try:
        send(link, make_plan(fresh), write, deadline)
    except StaleMemory as exc:
        raise CacheNotExist(f"cluster {link.cluster_id} released the cache during the transfer") from exc
    return fresh


def _consume(engine: EngineCore, link: Link, view: proto.CacheView, layers: LayerSel, deadline: float) -> None:
    """After a successful pull in normal mode, tell the owner which tensors of the slot were pulled."""
    if engine.opts.remote_cache_accessible or view.is_blocks or not view.owned:
        return
    if not any(slot == view.slot and ns == "req" for ns, _i, _m, slot in view.keys):
        return
    lo, hi = planner.covered_tensors(layers, view.num_tensors)
    link.consume(view.cache_id, view.slot, lo, hi, deadline)


def _need(view: proto.CacheView, blocks: bool, hint: str = "") -> None:
    if blocks and not view.is_blocks:
        raise ParamInvalid(f"remote cache {view.cache_id} is not a blocks cache{hint}")
    if not blocks and view.is_blocks:
        raise ParamInvalid(f"remote cache {view.cache_id} is a blocks cache{hint}")


@_handles(rq.PullCache)
def pull_cache(engine: EngineCore, req: rq.PullCache) -> None:
    """Pull one remote slot into slot ``batch_index`` of a local continuous cache."""
    deadline = deadline_of(engine)
    with PinnedLocalCache(engine, req.cache_id) as entry:
        if entry.is_blocks:
            raise ParamInvalid("pull_cache needs a continuous destination cache")
        local = side_of(entry)
        if req.batch_index >= local.count:
            raise ParamInvalid(f"batch_index {req.batch_index} >= batch size {local.count}")
        if req.size != -1 and req.size > local.stride:
            raise ParamInvalid(f"size {req.size} exceeds the local slot of {local.stride} bytes")
        link = link_to(engine, req.source.cluster_id)

        def make_plan(view: proto.CacheView) -> CopyPlan:
            _need(view, blocks=False)
            remote = side_of(view)
            src_t, dst_t = planner.tensor_pairs(remote.num_tensors, local.num_tensors, req.layers, local.num_tensors)
            nbytes = local.stride if req.size == -1 else req.size
            ops = planner.slot_ops(remote, src_t, view.slot, local, dst_t, req.batch_index, nbytes)
            return planner.oriented(ops, remote, local, local_is_dst=True)

        view = move(engine, link, req.source, make_plan, False, deadline)
        _consume(engine, link, view, req.layers, deadline)


@_handles(rq.PullBlocks)
def pull_blocks(engine: EngineCore, req: rq.PullBlocks) -> None:
    """Pull remote blocks (or one remote slot cut into blocks) into local blocks."""
    deadline = deadline_of(engine)
    with PinnedLocalCache(engine, req.cache_id) as entry:
        if not entry.is_blocks:
            raise ParamInvalid("pull_blocks needs a blocks destination cache")
        local = side_of(entry)
        link = link_to(engine, req.source.cluster_id)

        def make_plan(view: proto.CacheView) -> CopyPlan:
            remote = link.side_of(view)
            src_t, dst_t = planner.tensor_pairs(remote.num_tensors, local.num_tensors, req.layers, local.num_tensors)
            if req.source.kind == "blocks":
                _need(view, blocks=True)
                ops = planner.blocks_ops(remote, src_t, req.src_blocks, local, dst_t, req.dst_blocks)
            else:
                _need(view, blocks=False, hint="; use a BlocksCacheKey")
                if len(req.dst_blocks) * local.stride > remote.stride:
                    raise ParamInvalid(f"{len(req.dst_blocks)} blocks of {local.stride} bytes exceed the source slot "
                                       f"of {remote.stride} bytes")
                ops = planner.chunk_ops(remote, src_t, view.slot, local, dst_t, req.dst_blocks, local.stride)
            return planner.oriented(ops, remote, local, local_is_dst=True)

        view = move(engine, link, req.source, make_plan, False, deadline)
        if req.source.kind != "blocks":
            _consume(engine, link, view, req.layers, deadline)


@_handles(rq.PushCache)
def push_cache(engine: EngineCore, req: rq.PushCache) -> None:
    """Write one local slot into a remote slot addressed by cache id and batch index."""
    deadline = deadline_of(engine)
    with PinnedLocalCache(engine, req.cache_id) as entry:
        if entry.is_blocks:
            raise ParamInvalid("push_cache needs a continuous source cache")
        local = side_of(entry)
        if req.src_batch_index >= local.count:
            raise ParamInvalid(f"src_batch_index {req.src_batch_index} >= batch size {local.count}")
        link = link_to(engine, req.dest.cluster_id)

        def make_plan(view: proto.CacheView) -> CopyPlan:
            _need(view, blocks=False)
            remote = side_of(view)
            if local.stride > remote.stride:
                raise ParamInvalid(f"local slot of {local.stride} bytes exceeds the remote slot of "
                                   f"{remote.stride} bytes")
            src_t, dst_t = planner.tensor_pairs(local.num_tensors, remote.num_tensors, req.layers, local.num_tensors)
            ops = planner.slot_ops(local, src_t, req.src_batch_index, remote, dst_t, view.slot, local.stride)
            return planner.oriented(ops, local, remote, local_is_dst=False)

        move(engine, link, req.dest, make_plan, True, deadline)


@_handles(rq.PushBlocks)
def push_blocks(engine: EngineCore, req: rq.PushBlocks) -> None:
    """Write local blocks into a remote blocks cache addressed by BlocksCacheKey."""
    deadline = deadline_of(engine)
    with PinnedLocalCache(engine, req.cache_id) as entry:
        if not entry.is_blocks:
            raise ParamInvalid("push_blocks needs a blocks source cache")
        local = side_of(entry)
        link = link_to(engine, req.dest.cluster_id)

        def make_plan(view: proto.CacheView) -> CopyPlan:
            _need(view, blocks=True)
            remote = side_of(view)
            src_t, dst_t = planner.tensor_pairs(local.num_tensors, remote.num_tensors, req.layers, local.num_tensors)
            ops = planner.blocks_ops(local, src_t, req.src_blocks, remote, dst_t, req.dst_blocks)
            return planner.oriented(ops, local, remote, local_is_dst=False)

        move(engine, link, req.dest, make_plan, True, deadline)


@_handles(rq.BlocksById)
def blocks_by_id(engine: EngineCore, req: rq.BlocksById) -> None:
    """V1 PullKvBlocks/PushKvBlocks: blocks between a local cache and a remote cache addressed by id,
    both seen as blocks whatever they were registered as (num_blocks = shape[0])."""
    deadline = deadline_of(engine)
    with PinnedLocalCache(engine, req.cache_id) as entry:
        local = side_of(entry, as_blocks=True)
        link = link_to(engine, req.cluster_id)
        source = SourceSpec("id", req.cluster_id, cache_id=req.remote_cache_id)

        def make_plan(view: proto.CacheView) -> CopyPlan:
            remote = side_of(view, as_blocks=True)
            src, dst = (remote, local) if req.pull else (local, remote)
            src_t, dst_t = planner.tensor_pairs(src.num_tensors, dst.num_tensors, req.layers, local.num_tensors)
            ops = planner.blocks_ops(src, src_t, req.src_blocks, dst, dst_t, req.dst_blocks)
            return planner.oriented(ops, src, dst, local_is_dst=req.pull)

        move(engine, link, source, make_plan, not req.pull, deadline)


def raw_destination(link: Link, bases: Sequence[int], stride: int, deadline: float, fresh: bool = False) -> Side:
    """A destination given by raw peer addresses (layer-wise TransferConfig), checked against the peer's table.

    Every address must lie inside a remote-accessible cache of the peer (the table is fetched fresh once if
    not); the side carries those caches' guards, and :func:`check_inside` checks every planned range.
    """
    for refresh in (fresh, True):
        owners = _owners_of(link.table(deadline, fresh=refresh), bases)
        if owners is not None:
            extent = tuple((int(a), int(a) + int(v.tensor_nbytes)) for v in owners for a in v.tensor_addrs)
            guards = tuple(g for v in owners for g in planner.guards_of(v))
            return Side(bases=tuple(int(b) for b in bases), stride=stride, count=planner.UNBOUNDED,
                        is_blocks=True, kind=owners[0].kind, guards=guards, extent=extent)
    raise ParamInvalid(f"a destination address is not inside any remote accessible cache of cluster "
                       f"{link.cluster_id}")


def check_inside(plan: CopyPlan, side: Side) -> None:
    """Every remote range of ``plan`` lies inside one tensor of the caches ``side`` was found in."""
    if side.extent is None:
        return
    bounds = sorted(side.extent)
    starts = np.asarray([b[0] for b in bounds], dtype=np.uint64)
    ends = np.asarray([b[1] for b in bounds], dtype=np.uint64)
    idx = np.searchsorted(starts, plan.remote, side="right").astype(np.int64) - 1
    ok = idx >= 0
    if not bool(np.all(ok & (plan.remote + plan.sizes <= ends[np.clip(idx, 0, None)]))):
        raise ParamInvalid("a destination address range is not inside any remote accessible cache")


def _owners_of(table: proto.Table, bases: Sequence[int]) -> Optional[List[proto.CacheView]]:
    """The accessible caches of the table that contain the base addresses (each once), or None."""
    owners: List[proto.CacheView] = []
    for base in bases:
        owner = next((v for v in table.caches if (v.remote_accessible or v.owned)
                      and any(int(a) <= base < int(a) + int(v.tensor_nbytes) for a in v.tensor_addrs)), None)
        if owner is None:
            return None
        if all(o is not owner for o in owners):
            owners.append(owner)
    return owners
