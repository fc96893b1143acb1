"""What the engine's parts (transfers, local copies, layer-wise tasks, the peer service) use of their Engine.

``EngineCore`` is the typed context those modules take instead of the ``Engine`` class itself: they depend on
this short list, not on engine.py (which imports them), and mypy checks ``Engine`` against it wherever the
engine hands itself over.
"""
from __future__ import annotations

from typing import List, Protocol, Sequence

from llm_datadist._engine import protocol as proto
from llm_datadist._engine.link import Link
from llm_datadist._engine.link_manager import LinkManager
from llm_datadist._engine.options import EngineOptions
from llm_datadist._engine.registry import CacheEntry, Registry
from llm_datadist._engine.stats import Stats

__all__ = ["EngineCore"]


class EngineCore(Protocol):
    """The part of one ``Engine`` its transfers, copies, tasks and peer service read and call."""

    opts: EngineOptions
    cluster_id: int
    registry: Registry
    links: LinkManager
    stats: Stats
    closed: bool

    def link_for_transfer(self, cluster_id: int) -> Link:
        """The newest link to ``cluster_id`` that can carry transfers (NotLinked if none)."""
        ...

    def check_ranges(self, addrs: Sequence[int], nbytes: int, placement: int) -> None:
        """Every [addr, addr + nbytes) is memory of the placement's kind in this process (ParamInvalid if not)."""
        ...

    def is_exposed(self, entry: CacheEntry) -> bool:
        """Whether peers may see the cache's addresses (its memory is registered with the transports)."""
        ...

    def region_views(self, entry: CacheEntry) -> List[proto.RegionView]:
        """The transport descriptors peers need for the memory of a cache."""
        ...
