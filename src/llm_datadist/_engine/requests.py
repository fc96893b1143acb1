"""Frozen request objects of the Engine API: what the facades (v2, V1, CLI) ask the engine to do."""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple, Union

from llm_datadist._engine.registry import KeyId
from llm_datadist._engine.types import CacheSpec, LayerSel, SourceSpec

TENSORS_PER_LAYER = 2  # transfer_cache_async always moves K and V of a layer


@dataclasses.dataclass(frozen=True)
class Register:
    """register_cache / register_blocks_cache / V1 RegisterKvCache: user memory at ``addrs``."""

    spec: CacheSpec
    addrs: Tuple[int, ...]
    keys: Tuple[Optional[KeyId], ...] = ()
    blocks_model_id: Optional[int] = None
    remote_accessible: bool = True
    writable: Optional[bool] = None  # peers may write into it; None: remote accessible in RA mode


@dataclasses.dataclass(frozen=True)
class Allocate:
    """allocate_cache / allocate_blocks_cache / V1 AllocateCache from the placement's pool."""

    spec: CacheSpec
    keys: Tuple[Optional[KeyId], ...] = ()
    blocks_model_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class PullCache:
    """A remote slot into slot ``batch_index`` of a local continuous cache (``size`` -1: one slot)."""

    source: SourceSpec
    cache_id: int
    batch_index: int = 0
    size: int = -1
    layers: LayerSel = LayerSel()


@dataclasses.dataclass(frozen=True)
class PullBlocks:
    """Remote blocks (BlocksCacheKey) or a remote slot cut into blocks, into local blocks."""

    source: SourceSpec
    cache_id: int
    src_blocks: Tuple[int, ...]
    dst_blocks: Tuple[int, ...]
    layers: LayerSel = LayerSel()


@dataclasses.dataclass(frozen=True)
class PushCache:
    """A local slot into a remote slot addressed by cache id and batch index."""

    dest: SourceSpec
    cache_id: int
    src_batch_index: int
    layers: LayerSel


@dataclasses.dataclass(frozen=True)
class PushBlocks:
    """Local blocks into a remote blocks cache addressed by BlocksCacheKey."""

    dest: SourceSpec
    cache_id: int
    src_blocks: Tuple[int, ...]
    dst_blocks: Tuple[int, ...]
    layers: LayerSel


@dataclasses.dataclass(frozen=True)
class BlocksById:
    """V1 PullKvBlocks / PushKvBlocks: blocks between a local cache and a remote cache by id."""

    cluster_id: int
    remote_cache_id: int
    cache_id: int
    src_blocks: Tuple[int, ...]
    dst_blocks: Tuple[int, ...]
    layers: LayerSel
    pull: bool


Transfer = Union[PullCache, PullBlocks, PushCache, PushBlocks, BlocksById]


@dataclasses.dataclass(frozen=True)
class CopyCache:
    """copy_cache / V1 CopyKvCache: ``size`` bytes (-1: the rest of the slot) at ``offset`` of one slot."""

    dst_id: int
    src_id: int
    dst_index: int = 0
    src_index: int = 0
    offset: int = 0
    size: int = -1


@dataclasses.dataclass(frozen=True)
class CopyBlocks:
    """copy_blocks / V1 CopyKvBlocks: (src block, dst block) pairs, in one cache or between two."""

    src_id: int
    dst_id: int
    pairs: Tuple[Tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class SwapBlocks:
    """swap_blocks: blocks between a HOST and a DEVICE blocks cache given by their handles."""

    src_id: int
    src_addrs: Tuple[int, ...]
    dst_id: int
    dst_addrs: Tuple[int, ...]
    block_size: int
    num_blocks: Tuple[int, int]
    placements: Tuple[int, int]
    pairs: Tuple[Tuple[int, int], ...]


LocalCopy = Union[CopyCache, CopyBlocks, SwapBlocks]


@dataclasses.dataclass(frozen=True)
class Peer:
    """One cluster to link or unlink: its id (None: learned from the handshake) and ip infos."""

    cluster_id: Optional[int]
    remote: Tuple[Tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class LinkClusters:
    peers: Tuple[Peer, ...]
    timeout_s: float


@dataclasses.dataclass(frozen=True)
class UnlinkClusters:
    peers: Tuple[Peer, ...]
    timeout_s: float
    force: bool = False


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """What a facade learns about a cache of this instance."""

    cache_id: int
    tensor_addrs: Tuple[int, ...]
    num_tensors: int
    stride: int
    dim0: int
    is_blocks: bool


def peers(items: Sequence[Tuple[Optional[int], Sequence[Tuple[str, int]]]]) -> Tuple[Peer, ...]:
    """Peers from (cluster id, [(ip, port)]) pairs."""
    return tuple(Peer(cluster_id, tuple((str(ip), int(port)) for ip, port in remote)) for cluster_id, remote in items)


@dataclasses.dataclass(frozen=True)
class ConfigJob:
    """One destination of a task. Raw mode: ``dst_addrs`` (2 per layer); key mode: ``dest`` + ``dst_layers``."""

    dst_cluster_id: int
    src_layers: range
    src_batch_index: int = 0
    dst_addrs: Tuple[int, ...] = ()
    dest: Optional[SourceSpec] = None
    dst_layers: Optional[range] = None


@dataclasses.dataclass(frozen=True)
class TaskJob:
    """Everything the worker needs, validated by the facade.

    ``dst_block_size`` is ``dst_block_memory_size`` (0 when not given). ``timeout_s`` bounds each
    (layer, destination) transfer, table lookups included.
    """

    src_cache_id: int
    configs: Tuple[ConfigJob, ...]
    synchronizer: Any
    src_blocks: Tuple[int, ...] = ()
    dst_blocks: Tuple[int, ...] = ()
    dst_block_size: int = 0
    timeout_s: float = 1.0

    def layers(self) -> List[int]:
        """Every source layer some destination needs, ascending."""
        return sorted({layer for cfg in self.configs for layer in cfg.src_layers})
