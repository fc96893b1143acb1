"""Pull and push between linked instances: resolve, plan, move, then account keys on the owner."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator, Sequence

from llm_datadist._engine import planner
from llm_datadist._engine.errors import ParamInvalid
from llm_datadist._engine.link import Link, check_view_accessible
from llm_datadist._engine.types import LayerSel, SourceSpec
from llm_datadist._transport.base import CopyPlan, RemoteRejected

_log = logging.getLogger(__name__)


def _deadline(engine) -> float:
    return time.monotonic() + engine.opts.sync_kv_timeout_ms / 1000.0


def _link(engine, cluster_id: int) -> Link:
    """The link for a transfer; our own cluster only through a self link (link_clusters to our listener)."""
    if cluster_id == engine.cluster_id and not engine.links.has_link_to(cluster_id):
        raise ParamInvalid(f"cluster {cluster_id} is the local cluster; a cache can not be pulled from own cluster "
                           f"without a self link")
    return engine.link_for_transfer(cluster_id)


@contextlib.contextmanager
def _local(engine, cache_id: int) -> Iterator:
    """The local cache entry, pinned so that a concurrent unregister/deallocate waits for the transfer."""
    with engine.registry.pinned(cache_id) as entry:
        if engine.opts.remote_cache_accessible and not (entry.remote_accessible or entry.owned):
            raise ParamInvalid(f"local cache {cache_id} is not remote accessible")
        yield entry


def _remote_view(engine, link: Link, source: SourceSpec, deadline: float):
    if engine.opts.remote_cache_accessible:
        view = link.resolve_from_table(source, deadline)
        check_view_accessible(view, "remote")
        return view
    return link.resolve(source, deadline)


def _move(engine, link: Link, source: SourceSpec, deadline: float, make_plan: Callable, read: bool):
    """Resolve the remote side, plan and move; returns the remote view used.

    A view may come from a snapshot (the table in remote-cache-accessible mode, a blocks view in normal
    mode); if the peer rejects the ranges (the cache went away or was replaced since), the snapshot is
    dropped and the move retried once, so a vanished cache reports LLM_KV_CACHE_NOT_EXIST (D13).
    """
    view = _remote_view(engine, link, source, deadline)
    plan: CopyPlan = make_plan(view)
    try:
        (link.read if read else link.write)(plan, deadline)
        return view
    except RemoteRejected:
        if not engine.opts.remote_cache_accessible and source.kind != "blocks":
            raise
        link.invalidate_table()
        fresh = _remote_view(engine, link, source, deadline)
        if fresh.cache_id == view.cache_id and list(fresh.tensor_addrs) == list(view.tensor_addrs):
            raise
    plan = make_plan(fresh)
    (link.read if read else link.write)(plan, deadline)
    return fresh


def _consume(engine, link: Link, view, layers: LayerSel, deadline: float) -> None:
    """After a successful pull in normal mode, tell the owner which tensors of the slot were pulled."""
    if engine.opts.remote_cache_accessible or view.is_blocks or not view.owned:
        return
    if not any(slot == view.slot and ns == "req" for ns, _i, _m, slot in view.keys):
        return
    lo, hi = planner.covered_tensors(layers, view.num_tensors)
    link.consume(view.cache_id, view.slot, lo, hi, deadline)


def _continuous(view) -> None:
    if view.is_blocks:
        raise ParamInvalid(f"remote cache {view.cache_id} is a blocks cache")


def _blocks(view) -> None:
    if not view.is_blocks:
        raise ParamInvalid(f"remote cache {view.cache_id} is not a blocks cache")


def pull_cache(engine, source: SourceSpec, cache_id: int, batch_index: int, size: int, layers: LayerSel) -> None:
    """Pull one remote slot into slot ``batch_index`` of a local continuous cache."""
    deadline = _deadline(engine)
    with _local(engine, cache_id) as local:
        if local.is_blocks:
            raise ParamInvalid("pull_cache needs a continuous destination cache")
        if batch_index >= local.dim0:
            raise ParamInvalid(f"batch_index {batch_index} >= batch size {local.dim0}")
        if size != -1 and size > local.stride:
            raise ParamInvalid(f"size {size} exceeds the local slot of {local.stride} bytes")
        link = _link(engine, source.cluster_id)

        def make_plan(view) -> CopyPlan:
            _continuous(view)
            return planner.plan_slot(view, local, view.slot, batch_index, size, layers, local_is_dst=True)

        view = _move(engine, link, source, deadline, make_plan, read=True)
        _consume(engine, link, view, layers, deadline)


def pull_blocks(engine, source: SourceSpec, cache_id: int, src_blocks: Sequence[int], dst_blocks: Sequence[int],
                layers: LayerSel) -> None:
    """Pull remote blocks (or one remote slot cut into blocks) into local blocks."""
    deadline = _deadline(engine)
    with _local(engine, cache_id) as local:
        if not local.is_blocks:
            raise ParamInvalid("pull_blocks needs a blocks destination cache")
        link = _link(engine, source.cluster_id)

        def make_plan(view) -> CopyPlan:
            if source.kind == "blocks":
                _blocks(view)
                return planner.plan_blocks(view, local, src_blocks, dst_blocks, layers, local_is_dst=True)
            if view.is_blocks:
                raise ParamInvalid(f"remote cache {view.cache_id} is a blocks cache; use a BlocksCacheKey")
            return planner.plan_slot_to_blocks(view, local, view.slot, dst_blocks, layers)

        view = _move(engine, link, source, deadline, make_plan, read=True)
        if source.kind != "blocks":
            _consume(engine, link, view, layers, deadline)


def push_cache(engine, dest: SourceSpec, cache_id: int, src_batch_index: int, layers: LayerSel) -> None:
    """Write one local slot into a remote slot addressed by cache id and batch index."""
    deadline = _deadline(engine)
    with _local(engine, cache_id) as local:
        if local.is_blocks:
            raise ParamInvalid("push_cache needs a continuous source cache")
        if src_batch_index >= local.dim0:
            raise ParamInvalid(f"src_batch_index {src_batch_index} >= batch size {local.dim0}")
        link = _link(engine, dest.cluster_id)

        def make_plan(view) -> CopyPlan:
            _continuous(view)
            if local.stride > view.stride:
                raise ParamInvalid(f"local slot of {local.stride} bytes exceeds the remote slot of "
                                   f"{view.stride} bytes")
            return planner.plan_slot(local, view, src_batch_index, view.slot, local.stride, layers,
                                     local_is_dst=False)

        _move(engine, link, dest, deadline, make_plan, read=False)


def push_blocks(engine, dest: SourceSpec, cache_id: int, src_blocks: Sequence[int], dst_blocks: Sequence[int],
                layers: LayerSel) -> None:
    """Write local blocks into a remote blocks cache addressed by BlocksCacheKey."""
    deadline = _deadline(engine)
    with _local(engine, cache_id) as local:
        if not local.is_blocks:
            raise ParamInvalid("push_blocks needs a blocks source cache")
        link = _link(engine, dest.cluster_id)

        def make_plan(view) -> CopyPlan:
            _blocks(view)
            return planner.plan_blocks(local, view, src_blocks, dst_blocks, layers, local_is_dst=False)

        _move(engine, link, dest, deadline, make_plan, read=False)


class AsBlocks:
    """A cache (local entry or peer view) seen as blocks, num_blocks = shape[0] (V1 MIX caches, §10.1)."""

    is_blocks = True

    def __init__(self, view) -> None:
        self.tensor_addrs = view.tensor_addrs
        self.stride = view.stride
        self.dim0 = view.dim0
        self.num_tensors = view.num_tensors
        self.cache_id = view.cache_id


def blocks_by_id(engine, cluster_id: int, remote_cache_id: int, cache_id: int, src_blocks: Sequence[int],
                 dst_blocks: Sequence[int], layers: LayerSel, pull: bool) -> None:
    """V1 PullKvBlocks/PushKvBlocks: blocks between a local cache and a remote cache addressed by id,
    both seen as blocks whatever they were registered as."""
    deadline = _deadline(engine)
    with _local(engine, cache_id) as local:
        link = _link(engine, cluster_id)
        source = SourceSpec("id", cluster_id, cache_id=remote_cache_id)

        def make_plan(view) -> CopyPlan:
            lview, rview = AsBlocks(local), AsBlocks(view)
            if pull:
                return planner.plan_blocks(rview, lview, src_blocks, dst_blocks, layers, local_is_dst=True)
            return planner.plan_blocks(lview, rview, src_blocks, dst_blocks, layers, local_is_dst=False)

        _move(engine, link, source, deadline, make_plan, read=pull)


__all__ = ["pull_cache", "pull_blocks", "push_cache", "push_blocks", "blocks_by_id"]
