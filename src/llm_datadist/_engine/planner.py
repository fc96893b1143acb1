"""Vectorised transfer planning: (views, blocks, layers, size) -> one bounds-checked CopyPlan."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from llm_datadist._engine.errors import ParamInvalid
from llm_datadist._engine.types import LayerSel
from llm_datadist._transport.base import CopyPlan

# A "view" is anything with tensor_addrs, tensor_nbytes, stride, dim0, num_tensors, is_blocks:
# a local registry entry or a peer's CacheView.


def tensor_pairs(src_nt: int, dst_nt: int, layers: LayerSel, local_nt: int) -> Tuple[np.ndarray, np.ndarray]:
    """Source and destination tensor indices selected by the layer ranges (API-SPEC §9.7.4)."""
    n = layers.tensors_per_layer
    if layers.src is None and layers.dst is None:
        if src_nt != dst_nt:
            raise ParamInvalid(f"tensor count mismatch: source has {src_nt} tensors, destination {dst_nt}")
        idx = np.arange(src_nt, dtype=np.uint64)
        return idx, idx
    if local_nt % n != 0:
        raise ParamInvalid(f"num_tensors {local_nt} is not a multiple of tensor_num_per_layer {n}")
    src = _range_tensors(layers.src, n, src_nt, "src_layer_range")
    dst = _range_tensors(layers.dst, n, dst_nt, "dst_layer_range")
    if len(src) != len(dst):
        raise ParamInvalid(f"layer ranges select {len(src)} source tensors but {len(dst)} destination tensors")
    return src, dst


def _range_tensors(layer_range: Optional[range], n: int, count: int, name: str) -> np.ndarray:
    if layer_range is None:
        return np.arange(count, dtype=np.uint64)
    lo, hi = layer_range.start * n, layer_range.stop * n
    if hi > count:
        raise ParamInvalid(f"{name} {layer_range} exceeds the {count // n} layers of the cache")
    return np.arange(lo, hi, dtype=np.uint64)


def _addrs(view) -> np.ndarray:
    return np.asarray(view.tensor_addrs, dtype=np.uint64)


def _check_indices(indices: np.ndarray, limit: int, what: str) -> None:
    if indices.size and (int(indices.max()) >= limit):
        raise ParamInvalid(f"{what} index {int(indices.max())} out of range, the cache has {limit}")


def _block_array(blocks: Sequence[int], what: str) -> np.ndarray:
    arr = np.asarray(blocks, dtype=np.int64)
    if arr.size and int(arr.min()) < 0:
        raise ParamInvalid(f"{what} contains a negative index")
    return arr.astype(np.uint64)


def _outer(tensor_bases: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.add.outer(tensor_bases, offsets).ravel()


def plan_blocks(src, dst, src_blocks: Sequence[int], dst_blocks: Sequence[int], layers: LayerSel,
                local_is_dst: bool) -> CopyPlan:
    """Blocks to blocks: src block ``src_blocks[i]`` -> dst block ``dst_blocks[i]`` for every tensor."""
    if not src.is_blocks or not dst.is_blocks:
        raise ParamInvalid("blocks transfer needs blocks caches on both sides")
    s_blk, d_blk = _block_array(src_blocks, "src_blocks"), _block_array(dst_blocks, "dst_blocks")
    if s_blk.size != d_blk.size:
        raise ParamInvalid(f"src_blocks ({s_blk.size}) and dst_blocks ({d_blk.size}) differ in length")
    if s_blk.size == 0:
        raise ParamInvalid("block lists can not be empty")
    if src.stride != dst.stride:
        raise ParamInvalid(f"block size differs: source {src.stride} bytes, destination {dst.stride} bytes")
    _check_indices(s_blk, src.dim0, "source block")
    _check_indices(d_blk, dst.dim0, "destination block")
    local_nt = dst.num_tensors if local_is_dst else src.num_tensors
    s_t, d_t = tensor_pairs(src.num_tensors, dst.num_tensors, layers, local_nt)
    bs = np.uint64(src.stride)
    s_ops = _outer(_addrs(src)[s_t], s_blk * bs)
    d_ops = _outer(_addrs(dst)[d_t], d_blk * bs)
    sizes = np.full(s_ops.shape, bs, dtype=np.uint64)
    return _oriented(s_ops, d_ops, sizes, local_is_dst)


def plan_slot(src, dst, src_slot: int, dst_slot: int, size: int, layers: LayerSel, local_is_dst: bool) -> CopyPlan:
    """Continuous slot to continuous slot; ``size`` -1 means one destination stride."""
    if src.is_blocks or dst.is_blocks:
        raise ParamInvalid("slot transfer needs continuous caches on both sides")
    if src_slot >= src.dim0:
        raise ParamInvalid(f"source batch index {src_slot} out of range {src.dim0}")
    if dst_slot >= dst.dim0:
        raise ParamInvalid(f"destination batch index {dst_slot} out of range {dst.dim0}")
    nbytes = dst.stride if size == -1 else size
    if nbytes > dst.stride or nbytes > src.stride:
        raise ParamInvalid(f"size {nbytes} exceeds a slot (source {src.stride}, destination {dst.stride} bytes)")
    local_nt = dst.num_tensors if local_is_dst else src.num_tensors
    s_t, d_t = tensor_pairs(src.num_tensors, dst.num_tensors, layers, local_nt)
    s_ops = _addrs(src)[s_t] + np.uint64(src_slot * src.stride)
    d_ops = _addrs(dst)[d_t] + np.uint64(dst_slot * dst.stride)
    sizes = np.full(s_ops.shape, nbytes, dtype=np.uint64)
    return _oriented(s_ops, d_ops, sizes, local_is_dst)


def plan_slot_to_blocks(src, dst, src_slot: int, dst_blocks: Sequence[int], layers: LayerSel) -> CopyPlan:
    """Continuous source slot cut into destination-block-sized chunks, chunk i -> ``dst_blocks[i]``."""
    if src.is_blocks or not dst.is_blocks:
        raise ParamInvalid("continuous-to-blocks transfer needs a continuous source and a blocks destination")
    if src_slot >= src.dim0:
        raise ParamInvalid(f"source batch index {src_slot} out of range {src.dim0}")
    d_blk = _block_array(dst_blocks, "dst_blocks")
    _check_indices(d_blk, dst.dim0, "destination block")
    bs = dst.stride
    if d_blk.size * bs > src.stride:
        raise ParamInvalid(f"{d_blk.size} blocks of {bs} bytes exceed the source slot of {src.stride} bytes")
    s_t, d_t = tensor_pairs(src.num_tensors, dst.num_tensors, layers, dst.num_tensors)
    chunk = np.arange(d_blk.size, dtype=np.uint64) * np.uint64(bs)
    s_ops = _outer(_addrs(src)[s_t] + np.uint64(src_slot * src.stride), chunk)
    d_ops = _outer(_addrs(dst)[d_t], d_blk * np.uint64(bs))
    sizes = np.full(s_ops.shape, bs, dtype=np.uint64)
    return _oriented(s_ops, d_ops, sizes, True)


def plan_local_copy(dst_addrs, src_addrs, sizes) -> CopyPlan:
    """A local copy plan: ``local`` is the destination, ``remote`` the source (same process)."""
    return CopyPlan(np.asarray(dst_addrs, dtype=np.uint64), np.asarray(src_addrs, dtype=np.uint64),
                    np.asarray(sizes, dtype=np.uint64)).merged()


def _oriented(s_ops: np.ndarray, d_ops: np.ndarray, sizes: np.ndarray, local_is_dst: bool) -> CopyPlan:
    if local_is_dst:
        return CopyPlan(d_ops, s_ops, sizes).merged()
    return CopyPlan(s_ops, d_ops, sizes).merged()


def covered_tensors(layers: LayerSel, src_nt: int) -> Tuple[int, int]:
    """The [lo, hi) source tensor range a pull reads (for key consumption accounting, D16)."""
    if layers.src is None:  # all source tensors (only a dst range given: it must match the whole source)
        return 0, src_nt
    n = layers.tensors_per_layer
    return layers.src.start * n, layers.src.stop * n
