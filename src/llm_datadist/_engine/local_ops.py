"""Local copies inside one instance: copy_cache, copy_blocks and swap_blocks as one vectorised plan each."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from llm_datadist._engine import planner
from llm_datadist._engine.errors import ParamInvalid
from llm_datadist._transport.base import CopyPlan
from llm_datadist._transport.iov import local_copy


def copy_cache(engine, dst_id: int, src_id: int, dst_index: int, src_index: int, offset: int, size: int) -> None:
    """Copy ``size`` bytes (-1: the rest of the source slot) of one slot per tensor, at ``offset``."""
    dst, src = engine.entry(dst_id), engine.entry(src_id)
    if src.num_tensors != dst.num_tensors:
        raise ParamInvalid(f"num_tensors differ: source {src.num_tensors}, destination {dst.num_tensors}")
    if src_index >= src.dim0 or dst_index >= dst.dim0:
        raise ParamInvalid(f"batch index out of range (source {src_index}/{src.dim0}, destination "
                           f"{dst_index}/{dst.dim0})")
    if offset > 0 and (offset >= src.stride or offset >= dst.stride):
        raise ParamInvalid(f"offset {offset} must be smaller than both strides ({src.stride}, {dst.stride})")
    nbytes = src.stride - offset if size == -1 else size
    if nbytes > src.stride - offset or nbytes > dst.stride - offset:
        raise ParamInvalid(f"size {nbytes} at offset {offset} exceeds a slot ({src.stride}, {dst.stride} bytes)")
    s = np.asarray(src.tensor_addrs, dtype=np.uint64) + np.uint64(src_index * src.stride + offset)
    d = np.asarray(dst.tensor_addrs, dtype=np.uint64) + np.uint64(dst_index * dst.stride + offset)
    local_copy(planner.plan_local_copy(d, s, np.full(s.shape, nbytes, dtype=np.uint64)))


def copy_blocks(engine, cache_id: int, mapping: Dict[int, List[int]]) -> None:
    """Copy block ``src`` to each listed destination block, in every tensor of one blocks cache."""
    entry = engine.entry(cache_id)
    pairs = [(src, dst) for src, dsts in mapping.items() for dst in dsts]
    if not pairs:
        return
    src_blocks, dst_blocks = (np.asarray(col, dtype=np.int64) for col in zip(*pairs))
    for blocks in (src_blocks, dst_blocks):
        if int(blocks.min()) < 0 or int(blocks.max()) >= entry.dim0:
            raise ParamInvalid(f"block index out of range [0, {entry.dim0})")
    addrs = np.asarray(entry.tensor_addrs, dtype=np.uint64)
    bs = np.uint64(entry.stride)
    s = np.add.outer(addrs, src_blocks.astype(np.uint64) * bs).ravel()
    d = np.add.outer(addrs, dst_blocks.astype(np.uint64) * bs).ravel()
    local_copy(planner.plan_local_copy(d, s, np.full(s.shape, bs, dtype=np.uint64)))


def swap_plan(src_addrs: Sequence[int], dst_addrs: Sequence[int], block_size: int,
              pairs: Sequence[Tuple[int, int]]) -> CopyPlan:
    """Block copies between two caches given by raw addresses (swap in / swap out)."""
    src_blocks = np.asarray([p[0] for p in pairs], dtype=np.uint64)
    dst_blocks = np.asarray([p[1] for p in pairs], dtype=np.uint64)
    bs = np.uint64(block_size)
    s = np.add.outer(np.asarray(src_addrs, dtype=np.uint64), src_blocks * bs).ravel()
    d = np.add.outer(np.asarray(dst_addrs, dtype=np.uint64), dst_blocks * bs).ravel()
    return planner.plan_local_copy(d, s, np.full(s.shape, bs, dtype=np.uint64))


def swap_blocks(src_addrs: Sequence[int], dst_addrs: Sequence[int], block_size: int,
                pairs: Sequence[Tuple[int, int]]) -> None:
    if pairs:
        local_copy(swap_plan(src_addrs, dst_addrs, block_size, pairs))
