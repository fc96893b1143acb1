"""The one transfer planner: (sides, tensors, blocks or slots) -> one bounds-checked CopyPlan, for every path.

Pulls, pushes, layer-wise pushes and local copies all describe their two caches as ``Side`` objects and ask
for one of three shapes: blocks to blocks, slot to slot, or a slot cut into destination blocks (chunks). Every
index is checked against the side it addresses before an address is computed; the result is oriented (which
side is local) and merged once.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from llm_datadist._engine.errors import ParamInvalid
from llm_datadist._engine.types import LayerSel
from llm_datadist._transport.base import HOST, CopyPlan, Guard, grid

UNBOUNDED = 1 << 62  # block count of a raw destination (addresses the caller vouches for)


@dataclasses.dataclass(frozen=True)
class Side:
    """One cache as the planner sees it: tensor base addresses, bytes per block/slot, blocks/slots per tensor."""

    bases: Tuple[int, ...]
    stride: int
    count: int
    is_blocks: bool
    kind: str = HOST
    guards: Tuple[Guard, ...] = ()  # generation words of the cache(s) behind this side
    cache_id: int = -1
    extent: Optional[Tuple[Tuple[int, int], ...]] = None  # raw sides: [start, end) of every tensor that may be hit

    @property
    def num_tensors(self) -> int:
        return len(self.bases)


def side_of(cache, as_blocks: Optional[bool] = None) -> Side:
    """A Side of a local CacheEntry or a peer's CacheView (``as_blocks`` overrides its blocks flag).

    A local entry's side is made once and kept on the entry (its geometry never changes; a local side needs
    no guards: guards protect the remote side of a plan).
    """
    if as_blocks is None and hasattr(cache, "side_cache"):
        side = cache.side_cache
        if side is None:
            side = cache.side_cache = Side(bases=tuple(cache.tensor_addrs), stride=int(cache.stride),
                                           count=int(cache.dim0), is_blocks=bool(cache.is_blocks),
                                           kind=cache.kind, cache_id=int(cache.cache_id))
        return side
    return Side(bases=tuple(cache.tensor_addrs), stride=int(cache.stride), count=int(cache.dim0),
                is_blocks=bool(cache.is_blocks if as_blocks is None else as_blocks),
                kind=getattr(cache, "kind", HOST) or HOST, guards=guards_of(cache), cache_id=int(cache.cache_id))


def guards_of(cache) -> Tuple[Guard, ...]:
    """The generation guard of a local entry (a Guard) or of a peer's view ((slot, value, addr))."""
    guard = getattr(cache, "guard", None)
    if isinstance(guard, (tuple, list)):
        return (Guard(int(guard[0]), int(guard[1]), int(guard[2])),) if guard[1] else ()
    return (guard,) if guard is not None else ()


def raw_side(bases: Sequence[int], stride: int) -> Side:
    """Destination addresses given by the caller (layer-wise TransferConfig): unbounded block count."""
    return Side(bases=tuple(int(b) for b in bases), stride=stride, count=UNBOUNDED, is_blocks=True)


# ---- tensor selection (ranges of tensor indices) --------------------------------------------------------------
def tensor_pairs(src_nt: int, dst_nt: int, layers: LayerSel, local_nt: int) -> Tuple[range, range]:
    """Source and destination tensor indices selected by the layer ranges (all tensors when none is given)."""
    n = layers.tensors_per_layer
    if layers.src is None and layers.dst is None:
        if src_nt != dst_nt:
            raise ParamInvalid(f"tensor count mismatch: source has {src_nt} tensors, destination {dst_nt}")
        return range(src_nt), range(dst_nt)
    if local_nt % n != 0:
        raise ParamInvalid(f"num_tensors {local_nt} is not a multiple of tensor_num_per_layer {n}")
    src = _range_tensors(layers.src, n, src_nt, "src_layer_range")
    dst = _range_tensors(layers.dst, n, dst_nt, "dst_layer_range")
    if len(src) != len(dst):
        raise ParamInvalid(f"layer ranges select {len(src)} source tensors but {len(dst)} destination tensors")
    return src, dst


def layer_tensors(layer: int, per_layer: int, num_tensors: int, what: str) -> range:
    """The tensors of one layer (``per_layer`` consecutive tensors)."""
    first = layer * per_layer
    if first + per_layer > num_tensors:
        raise ParamInvalid(f"layer {layer} is outside the {num_tensors // per_layer} layers of the {what} cache")
    return range(first, first + per_layer)


def _range_tensors(layer_range: Optional[range], n: int, count: int, name: str) -> range:
    if layer_range is None:
        return range(count)
    lo, hi = layer_range.start * n, layer_range.stop * n
    if hi > count:
        raise ParamInvalid(f"{name} {layer_range} exceeds the {count // n} layers of the cache")
    return range(lo, hi)


def covered_tensors(layers: LayerSel, src_nt: int) -> Tuple[int, int]:
    """The [lo, hi) source tensor range a pull reads (for key consumption accounting)."""
    if layers.src is None:
        return 0, src_nt
    n = layers.tensors_per_layer
    return layers.src.start * n, layers.src.stop * n


# ---- index checks ----------------------------------------------------------------------------------------
# source addresses, destination addresses, sizes: int lists for a few ops, uint64 arrays for many (base.grid)
Addrs = Union[Sequence[int], np.ndarray]
Ops = Tuple[Addrs, Addrs, Addrs]


def block_indices(blocks: Sequence[int], limit: int, what: str) -> List[int]:
    """Block indices as Python ints, each in ``[0, limit)`` (ParamInvalid otherwise)."""
    try:
        out = [operator.index(b) for b in blocks]
    except TypeError:
        raise ParamInvalid(f"{what} indices must be integers in [0, {limit})") from None
    if out and (min(out) < 0 or max(out) >= limit):
        bad = min(out) if min(out) < 0 else max(out)
        raise ParamInvalid(f"{what} index {bad} out of range, the cache has {limit}")
    return out


def _check_slot(side: Side, slot: int, what: str) -> None:
    if not 0 <= slot < side.count:
        raise ParamInvalid(f"{what} batch index {slot} out of range {side.count}")


# ---- the three shapes (source -> destination) ------------------------------------------------------------
def blocks_ops(src: Side, src_t: Sequence[int], src_blocks: Sequence[int], dst: Side, dst_t: Sequence[int],
               dst_blocks: Sequence[int]) -> Ops:
    """Block ``src_blocks[i]`` of every selected source tensor to block ``dst_blocks[i]`` of its destination."""
    if len(src_blocks) != len(dst_blocks):
        raise ParamInvalid(f"src_blocks ({len(src_blocks)}) and dst_blocks ({len(dst_blocks)}) differ in length")
    if not len(src_blocks):
        raise ParamInvalid("block lists can not be empty")
    if src.stride != dst.stride:
        raise ParamInvalid(f"block size differs: source {src.stride} bytes, destination {dst.stride} bytes")
    bs = src.stride
    s_blk = block_indices(src_blocks, src.count, "source block")
    d_blk = block_indices(dst_blocks, dst.count, "destination block")
    return grid([src.bases[t] for t in src_t], [b * bs for b in s_blk], [dst.bases[t] for t in dst_t],
                [b * bs for b in d_blk], [bs] * len(s_blk))


def slot_ops(src: Side, src_t: Sequence[int], src_slot: int, dst: Side, dst_t: Sequence[int], dst_slot: int,
             nbytes: int, offset: int = 0) -> Ops:
    """``nbytes`` at ``offset`` of one slot per selected tensor into the same place of a destination slot."""
    _check_slot(src, src_slot, "source")
    _check_slot(dst, dst_slot, "destination")
    if nbytes <= 0 or offset + nbytes > src.stride or offset + nbytes > dst.stride:
        raise ParamInvalid(f"{nbytes} bytes at offset {offset} exceed a slot (source {src.stride}, destination "
                           f"{dst.stride} bytes)")
    return grid([src.bases[t] for t in src_t], [src_slot * src.stride + offset], [dst.bases[t] for t in dst_t],
                [dst_slot * dst.stride + offset], [nbytes])


def chunk_ops(src: Side, src_t: Sequence[int], src_slot: int, dst: Side, dst_t: Sequence[int],
              dst_blocks: Sequence[int], chunk: int) -> Ops:
    """A source slot cut into ``chunk``-byte pieces, piece j to destination block ``dst_blocks[j]``.

    The last piece may be partial; the destination blocks are ``chunk`` bytes apart.
    """
    _check_slot(src, src_slot, "source")
    if chunk <= 0:
        raise ParamInvalid("the destination block size must be > 0")
    pieces = -(-src.stride // chunk)
    if len(dst_blocks) > pieces:
        raise ParamInvalid(f"{len(dst_blocks)} destination blocks of {chunk} bytes exceed the source slot of "
                           f"{src.stride} bytes ({pieces} pieces)")
    base = src_slot * src.stride
    d_blk = block_indices(dst_blocks, dst.count, "destination block")
    offsets = [j * chunk for j in range(len(d_blk))]
    return grid([src.bases[t] for t in src_t], [base + o for o in offsets], [dst.bases[t] for t in dst_t],
                [b * chunk for b in d_blk], [min(chunk, src.stride - o) for o in offsets])


# ---- orientation -----------------------------------------------------------------------------------------
def oriented(ops: Ops, src: Side, dst: Side, local_is_dst: bool) -> CopyPlan:
    """The plan seen from the local side; the remote side's guard travels with it."""
    s, d, sizes = ops
    if local_is_dst:
        return CopyPlan(d, s, sizes, dst.kind, src.kind, src.guards).merged()
    return CopyPlan(s, d, sizes, src.kind, dst.kind, dst.guards).merged()


def local_plan(ops: Ops, kind: str) -> CopyPlan:
    """A copy inside this process: ``local`` is the destination, ``remote`` the source."""
    s, d, sizes = ops
    return CopyPlan(d, s, sizes, kind, kind).merged()
