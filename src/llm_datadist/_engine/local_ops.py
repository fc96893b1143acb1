"""Local copies inside one instance (copy_cache, copy_blocks, swap_blocks, V1 copies): planned by the one planner,
run by the memory backend of the caches' kind, with both caches pinned.

Each copy request type of the Engine API has one handler here, ``handler(engine, request)``, listed in
``HANDLERS`` by request type; ``Engine.copy`` looks the handler up and calls it with the request whole.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Sequence, Tuple, Type, TypeVar, cast

import numpy as np

from llm_datadist._engine import planner
from llm_datadist._engine import requests as rq
from llm_datadist._engine import stats
from llm_datadist._engine.context import EngineCore
from llm_datadist._engine.errors import ParamInvalid
from llm_datadist._engine.memory import backend_for
from llm_datadist._engine.planner import Side, side_of
from llm_datadist._engine.registry import CacheEntry
from llm_datadist._transport.base import CopyPlan

_U64 = np.uint64
Handler = Callable[[EngineCore, rq.LocalCopy], None]
_R = TypeVar("_R", bound=rq.LocalCopy)

HANDLERS: Dict[type, Handler] = {}  # request type -> its handler: the table Engine.copy dispatches from


def _handles(kind: Type[_R]) -> Callable[[Callable[[EngineCore, _R], None]], Callable[[EngineCore, _R], None]]:
    """List the decorated function as the handler of requests of type ``kind`` (the function itself is kept)."""
    def register(handler: Callable[[EngineCore, _R], None]) -> Callable[[EngineCore, _R], None]:
        HANDLERS[kind] = cast(Handler, handler)  # called only with requests of type ``kind``
        return handler

    return register


@contextlib.contextmanager
def _pinned(engine: EngineCore, *cache_ids: int) -> Iterator[List[CacheEntry]]:
    """Pin each distinct cache (a concurrent unregister/deallocate waits for the copy)."""
    with contextlib.ExitStack() as stack:
        entries = {}
        for cache_id in dict.fromkeys(cache_ids):
            entries[cache_id] = stack.enter_context(engine.registry.pinned(cache_id))
        yield [entries[cache_id] for cache_id in cache_ids]


def run(engine: EngineCore, plan: CopyPlan, placement: int) -> None:
    """Run a local plan with the backend of its memory (after the caller pinned the caches)."""
    if plan.local_kind != plan.remote_kind:
        raise ParamInvalid(f"a local copy between {plan.remote_kind} and {plan.local_kind} memory is not supported")
    backend = backend_for(placement, engine.opts.device_id)
    backend.copy(plan.local, plan.remote, plan.sizes, None)
    stats.moved(stats.LOCAL_ROUTE, plan.total_bytes)


@_handles(rq.CopyCache)
def copy_cache(engine: EngineCore, req: rq.CopyCache) -> None:
    """Copy ``size`` bytes (-1: the rest of the source slot) of one slot per tensor, at ``offset``."""
    with _pinned(engine, req.dst_id, req.src_id) as (dst_entry, src_entry):
        dst, src = side_of(dst_entry), side_of(src_entry)
        offset = req.offset
        if src.num_tensors != dst.num_tensors:
            raise ParamInvalid(f"num_tensors differ: source {src.num_tensors}, destination {dst.num_tensors}")
        if req.src_index >= src.count or req.dst_index >= dst.count:
            raise ParamInvalid(f"batch index out of range (source {req.src_index}/{src.count}, destination "
                               f"{req.dst_index}/{dst.count})")
        if offset > 0 and (offset >= src.stride or offset >= dst.stride):
            raise ParamInvalid(f"offset {offset} must be smaller than both strides ({src.stride}, {dst.stride})")
        nbytes = src.stride - offset if req.size == -1 else req.size
        if nbytes > src.stride - offset or nbytes > dst.stride - offset:
            raise ParamInvalid(f"size {nbytes} at offset {offset} exceeds a slot ({src.stride}, {dst.stride} bytes)")
        tensors = range(src.num_tensors)
        ops = planner.slot_ops(src, tensors, req.src_index, dst, tensors, req.dst_index, nbytes, offset)
        run(engine, planner.local_plan(ops, dst.kind), dst_entry.placement)


@_handles(rq.CopyBlocks)
def copy_blocks(engine: EngineCore, req: rq.CopyBlocks) -> None:
    """Copy block ``src`` to block ``dst`` for every (src, dst) pair: in every tensor of one blocks cache
    (copy_blocks), or from one cache into another, both seen as blocks (V1 CopyKvBlocks)."""
    if req.src_id == req.dst_id:
        if not req.pairs:
            return
        with _pinned(engine, req.src_id) as (entry,):
            side = side_of(entry)
            _blocks_between(engine, side, side, req.pairs, entry.placement)
        return
    with _pinned(engine, req.src_id, req.dst_id) as (src_entry, dst_entry):
        src, dst = side_of(src_entry, as_blocks=True), side_of(dst_entry, as_blocks=True)
        if src.num_tensors != dst.num_tensors:
            raise ParamInvalid(f"num_tensors differ ({src.num_tensors}, {dst.num_tensors})")
        if req.pairs:
            _blocks_between(engine, src, dst, req.pairs, dst_entry.placement)


def _blocks_between(engine: EngineCore, src: Side, dst: Side, pairs: Sequence[Tuple[int, int]], placement: int) -> None:
    tensors = range(src.num_tensors)
    ops = planner.blocks_ops(src, tensors, [p[0] for p in pairs], dst, tensors, [p[1] for p in pairs])
    run(engine, planner.local_plan(ops, dst.kind), placement)


@_handles(rq.SwapBlocks)
def swap_blocks(engine: EngineCore, req: rq.SwapBlocks) -> None:
    """Copy blocks between a HOST and a DEVICE blocks cache (swap in / swap out).

    Caches of this instance (id >= 0) are pinned; CPU caches made with ``Cache.create_cpu_cache`` (id -1) are
    the caller's memory, checked to be mapped.
    """
    if not req.pairs:
        return
    ids = [c for c in (req.src_id, req.dst_id) if c >= 0]
    with _pinned(engine, *ids):
        engine.check_ranges(req.src_addrs, req.block_size * req.num_blocks[0], req.placements[0])
        engine.check_ranges(req.dst_addrs, req.block_size * req.num_blocks[1], req.placements[1])
        src = Side(tuple(req.src_addrs), req.block_size, req.num_blocks[0], True,
                   backend_for(req.placements[0], engine.opts.device_id).kind)
        dst = Side(tuple(req.dst_addrs), req.block_size, req.num_blocks[1], True,
                   backend_for(req.placements[1], engine.opts.device_id).kind)
        if src.kind != dst.kind:
            raise ParamInvalid(f"swap_blocks between {src.kind} and {dst.kind} memory needs a backend for both")
        tensors = range(len(req.src_addrs))
        ops = planner.blocks_ops(src, tensors, [p[0] for p in req.pairs], dst, tensors, [p[1] for p in req.pairs])
        run(engine, planner.local_plan(ops, dst.kind), req.placements[1])
