"""Local copies inside one instance (copy_cache, copy_blocks, swap_blocks, V1 copies): planned by the one planner,
run by the memory backend of the caches' kind, with both caches pinned."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence, Tuple

import numpy as np

from llm_datadist._engine import planner
from llm_datadist._engine.errors import ParamInvalid
from llm_datadist._engine.memory import backend_for
from llm_datadist._engine.planner import Side, side_of
from llm_datadist._transport.base import CopyPlan

_U64 = np.uint64


@contextlib.contextmanager
def _pinned(engine, *cache_ids: int) -> Iterator[list]:
    """Pin each distinct cache (a concurrent unregister/deallocate waits for the copy)."""
    with contextlib.ExitStack() as stack:
        entries = {}
        for cache_id in dict.fromkeys(cache_ids):
            entries[cache_id] = stack.enter_context(engine.registry.pinned(cache_id))
        yield [entries[cache_id] for cache_id in cache_ids]


def run(engine, plan: CopyPlan, placement: int) -> None:
    """Run a local plan with the backend of its memory (after the caller pinned the caches)."""
    if plan.local_kind != plan.remote_kind:
        raise ParamInvalid(f"a local copy between {plan.remote_kind} and {plan.local_kind} memory is not supported")
    backend = backend_for(placement, engine.opts.device_id)
    backend.copy(plan.local, plan.remote, plan.sizes, None)


def copy_cache(engine, dst_id: int, src_id: int, dst_index: int, src_index: int, offset: int, size: int) -> None:
    """Copy ``size`` bytes (-1: the rest of the source slot) of one slot per tensor, at ``offset``."""
    with _pinned(engine, dst_id, src_id) as (dst_entry, src_entry):
        dst, src = side_of(dst_entry), side_of(src_entry)
        if src.num_tensors != dst.num_tensors:
            raise ParamInvalid(f"num_tensors differ: source {src.num_tensors}, destination {dst.num_tensors}")
        if src_index >= src.count or dst_index >= dst.count:
            raise ParamInvalid(f"batch index out of range (source {src_index}/{src.count}, destination "
                               f"{dst_index}/{dst.count})")
        if offset > 0 and (offset >= src.stride or offset >= dst.stride):
            raise ParamInvalid(f"offset {offset} must be smaller than both strides ({src.stride}, {dst.stride})")
        nbytes = src.stride - offset if size == -1 else size
        if nbytes > src.stride - offset or nbytes > dst.stride - offset:
            raise ParamInvalid(f"size {nbytes} at offset {offset} exceeds a slot ({src.stride}, {dst.stride} bytes)")
        tensors = range(src.num_tensors)
        ops = planner.slot_ops(src, tensors, src_index, dst, tensors, dst_index, nbytes, offset)
        run(engine, planner.local_plan(ops, dst.kind), dst_entry.placement)


def copy_blocks(engine, cache_id: int, pairs: Sequence[Tuple[int, int]]) -> None:
    """Copy block ``src`` to block ``dst`` for every (src, dst) pair, in every tensor of one blocks cache."""
    if not pairs:
        return
    with _pinned(engine, cache_id) as (entry,):
        side = side_of(entry)
        _blocks_between(engine, side, side, pairs, entry.placement)


def copy_blocks_between(engine, src_id: int, dst_id: int, pairs: Sequence[Tuple[int, int]]) -> None:
    """Blocks of one cache into blocks of another, caches seen as blocks (V1 CopyKvBlocks)."""
    with _pinned(engine, src_id, dst_id) as (src_entry, dst_entry):
        src, dst = side_of(src_entry, as_blocks=True), side_of(dst_entry, as_blocks=True)
        if src.num_tensors != dst.num_tensors:
            raise ParamInvalid(f"num_tensors differ ({src.num_tensors}, {dst.num_tensors})")
        if pairs:
            _blocks_between(engine, src, dst, pairs, dst_entry.placement)


def _blocks_between(engine, src: Side, dst: Side, pairs: Sequence[Tuple[int, int]], placement: int) -> None:
    tensors = range(src.num_tensors)
    ops = planner.blocks_ops(src, tensors, [p[0] for p in pairs], dst, tensors, [p[1] for p in pairs])
    run(engine, planner.local_plan(ops, dst.kind), placement)


def swap_blocks(engine, src_cache_id: int, src_addrs: Sequence[int], dst_cache_id: int, dst_addrs: Sequence[int],
                block_size: int, num_blocks: Tuple[int, int], placements: Tuple[int, int],
                pairs: Sequence[Tuple[int, int]]) -> None:
    """Copy blocks between a HOST and a DEVICE blocks cache (swap in / swap out).

    Caches of this instance (id >= 0) are pinned; CPU caches made with ``Cache.create_cpu_cache`` (id -1) are
    the caller's memory, checked to be mapped.
    """
    if not pairs:
        return
    ids = [c for c in (src_cache_id, dst_cache_id) if c >= 0]
    with _pinned(engine, *ids):
        for addrs, placement in ((src_addrs, placements[0]), (dst_addrs, placements[1])):
            engine.check_ranges(addrs, block_size * (num_blocks[0] if addrs is src_addrs else num_blocks[1]),
                                placement)
        src = Side(tuple(src_addrs), block_size, num_blocks[0], True,
                   backend_for(placements[0], engine.opts.device_id).kind)
        dst = Side(tuple(dst_addrs), block_size, num_blocks[1], True,
                   backend_for(placements[1], engine.opts.device_id).kind)
        if src.kind != dst.kind:
            raise ParamInvalid(f"swap_blocks between {src.kind} and {dst.kind} memory needs a backend for both")
        tensors = range(len(src_addrs))
        ops = planner.blocks_ops(src, tensors, [p[0] for p in pairs], dst, tensors, [p[1] for p in pairs])
        run(engine, planner.local_plan(ops, dst.kind), placements[1])
