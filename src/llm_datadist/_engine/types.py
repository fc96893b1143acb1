"""Frozen internal values passed from the facade to the engine."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Tuple

UINT64_MAX = 2**64 - 1
SourceKind = Literal["req", "prefix", "id", "blocks"]  # how a pull names the remote cache
HOST = 0
DEVICE = 1


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Geometry of a cache as the engine needs it (a validated copy of the user's CacheDesc)."""

    num_tensors: int
    shape: Tuple[int, ...]
    data_type: int
    elem_size: int
    placement: int
    is_blocks: bool

    @property
    def tensor_nbytes(self) -> int:
        n = self.elem_size
        for dim in self.shape:
            n *= dim
        return n

    @property
    def dim0(self) -> int:
        return self.shape[0]


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What a pull names on the remote side."""

    kind: SourceKind
    cluster_id: int
    ident: int = 0
    model_id: int = 0
    cache_id: int = 0
    batch_index: int = 0


@dataclasses.dataclass(frozen=True)
class LayerSel:
    """Layer ranges and tensors per layer of a transfer; ``None`` ranges mean every tensor."""

    src: Optional[range] = None
    dst: Optional[range] = None
    tensors_per_layer: int = 2
