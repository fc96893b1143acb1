"""How vLLM's per-layer KV tensors map onto one llm_datadist blocks cache, and block ids between two pools.

A layer tensor holds ``num_blocks`` blocks along one dimension; the dimensions before it (for example K/V on
CUDA backends, ``[2, num_blocks, ...]``) give separate regions, the dimensions after it must be one
contiguous block. Every region becomes one tensor of the cache: ``num_regions = layers * regions_per_layer``,
so one ``pull_blocks`` moves every layer of a request. Works on tensor-like objects (``shape``, ``stride()``,
``element_size()``, ``data_ptr()``, ``device``) without importing torch.

A head-major (HND) block ``[heads, block_size, ...]`` is ``heads`` equal contiguous sub-blocks of one KV head each;
the cache is registered in those sub-blocks (``[num_blocks * heads, block_nbytes / heads]`` per region), so ranks
of different tensor-parallel sizes can move single heads (see ``tp_map``).

Layers of different KV cache groups may share one tensor (vLLM overlays the groups of a hybrid model, see
``kv_groups``): such a region is registered once, and ``region_layers`` says which layers write it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

__all__ = ["KVLayout", "layout_of", "blocks_for_tokens", "block_pairs"]


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """The regions of every layer, in layer order."""

    layer_names: Tuple[str, ...]
    region_addrs: Tuple[int, ...]  # layers * regions_per_layer addresses, layer-major
    regions_per_layer: int
    num_blocks: int
    block_nbytes: int
    dtype: str
    device_type: str
    heads: int = 1  # KV heads per block, each a contiguous sub-block (1: whole blocks only)
    region_layers: Tuple[Tuple[int, ...], ...] = ()  # per region, the layers that write it (empty: r // per layer)

    @property
    def sub_block_nbytes(self) -> int:
        """Bytes of one head of one block: the block size of the registered cache."""
        return self.block_nbytes // self.heads

    @property
    def num_sub_blocks(self) -> int:
        """Blocks of the registered cache (``num_blocks * heads``)."""
        return self.num_blocks * self.heads

    def sub_blocks(self, block_ids: Sequence[int]) -> List[int]:
        """The registered cache's blocks of whole blocks ``block_ids`` (every head, in order)."""
        heads = self.heads
        return [int(b) * heads + j for b in block_ids for j in range(heads)]

    @property
    def num_regions(self) -> int:
        """Tensors of the llm_datadist cache."""
        return len(self.region_addrs)

    def layer_index(self, layer_name: str) -> int:
        """Position of a layer name (ValueError when unknown)."""
        return self.layer_names.index(layer_name)

    def writers(self, region: int) -> Tuple[int, ...]:
        """The layers (indices into ``layer_names``) whose KV is in ``region``."""
        if self.region_layers:
            return self.region_layers[region]
        return (region // self.regions_per_layer,)


def _regions_of(name: str, tensor: Any, num_blocks: int) -> Tuple[List[int], int, int]:
    shape = [int(d) for d in tensor.shape]
    strides = [int(s) for s in tensor.stride()]
    elem = int(tensor.element_size())
    if num_blocks not in shape:
        raise ValueError(f"KV tensor {name} of shape {tuple(shape)} has no dimension of {num_blocks} blocks")
    dim = shape.index(num_blocks)
    inner = shape[dim + 1:]
    expected = 1
    for size, stride in zip(reversed(inner), reversed(strides[dim + 1:])):
        if size > 1 and stride != expected:
            raise ValueError(f"KV tensor {name}: the dimensions after the block dimension are not contiguous "
                             f"(shape {tuple(shape)}, strides {tuple(strides)}); whole blocks can not move as bytes")
        expected *= size
    if strides[dim] != expected:
        raise ValueError(f"KV tensor {name}: block stride {strides[dim]} differs from the block size {expected} "
                         f"elements (shape {tuple(shape)}, strides {tuple(strides)})")
    base = int(tensor.data_ptr())
    addrs = [base]
    for size, stride in zip(shape[:dim], strides[:dim]):
        addrs = [addr + i * stride * elem for addr in addrs for i in range(size)]
    return addrs, expected * elem, inner[0] if inner else 1


def layout_of(kv_caches: Mapping[str, Any], num_blocks: int, heads: int = 1) -> KVLayout:
    """The layout of ``register_kv_caches``' tensors (dict order is vLLM's layer order).

    ``heads``: the KV heads of this rank's blocks. When every tensor's first dimension after the block dimension
    has that size (a head-major block), the layout's ``heads`` is ``heads``; otherwise (one head, or heads not
    outermost in a block) it is 1 and only whole blocks can move.

    A region that several layers share (the layers of a hybrid model's KV cache groups overlay each other) is
    registered once.

    Raises:
        ValueError: no tensors, a tensor without a block dimension of ``num_blocks`` or with non-contiguous
            blocks, layers whose block sizes, dtypes, devices or region counts differ, or regions that overlap
            without being the same.
    """
    if not kv_caches:
        raise ValueError("register_kv_caches got no KV tensors")
    names: List[str] = []
    addrs: List[int] = []
    writers: List[List[int]] = []
    index_of: Dict[int, int] = {}  # region address -> its index in addrs
    per_layer = block_nbytes = -1
    dtype = device = ""
    head_major = heads > 1
    for name, tensor in kv_caches.items():
        regions, nbytes, outer = _regions_of(name, tensor, num_blocks)
        head_major = head_major and outer == heads
        this_dtype, this_device = str(tensor.dtype), str(tensor.device.type)
        if per_layer == -1:
            per_layer, block_nbytes, dtype, device = len(regions), nbytes, this_dtype, this_device
        elif (len(regions), nbytes, this_dtype, this_device) != (per_layer, block_nbytes, dtype, device):
            raise ValueError(f"KV tensor {name} ({len(regions)} regions of {nbytes}-byte blocks, {this_dtype} on "
                             f"{this_device}) differs from the first layer ({per_layer} regions of "
                             f"{block_nbytes}-byte blocks, {dtype} on {device}); one cache needs one geometry")
        for addr in regions:
            if addr in index_of:
                writers[index_of[addr]].append(len(names))
            else:
                index_of[addr] = len(addrs)
                addrs.append(addr)
                writers.append([len(names)])
        names.append(name)
    span = num_blocks * block_nbytes
    ordered = sorted(range(len(addrs)), key=lambda i: addrs[i])
    for before, after in zip(ordered, ordered[1:]):
        if addrs[after] < addrs[before] + span:
            raise ValueError(f"the KV tensors of layers {names[writers[before][0]]} and {names[writers[after][0]]} "
                             f"overlap without being the same memory; their blocks can not move separately")
    shared = len(addrs) != len(names) * per_layer
    return KVLayout(tuple(names), tuple(addrs), per_layer, num_blocks, block_nbytes, dtype, device,
                    heads if head_major else 1, tuple(tuple(w) for w in writers) if shared else ())


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks holding ``num_tokens`` tokens (the last one may be partial)."""
    return math.ceil(num_tokens / block_size) if num_tokens > 0 else 0


def block_pairs(remote_ids: Sequence[int], local_ids: Sequence[int], num_tokens: int, block_size: int,
                first_block: int = 0) -> Tuple[List[int], List[int]]:
    """Source and destination block ids for the first ``num_tokens`` tokens, skipping ``first_block`` blocks
    the destination already has (a local prefix-cache hit).

    Raises:
        ValueError: one side has fewer blocks than the tokens need.
    """
    needed = blocks_for_tokens(num_tokens, block_size)
    if len(remote_ids) < needed or len(local_ids) < needed:
        raise ValueError(f"{num_tokens} tokens need {needed} blocks of {block_size}, but the prefill has "
                         f"{len(remote_ids)} and the decode {len(local_ids)}")
    start = min(max(first_block, 0), needed)
    return [int(b) for b in remote_ids[start:needed]], [int(b) for b in local_ids[start:needed]]
