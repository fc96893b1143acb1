"""The Engine API: the one way into the engine for the v2 facade, the V1 API and the CLI.

Facades build frozen requests (``requests``), call the methods of ``EngineApi`` (what ``open_engine`` returns),
and turn failures into status codes or exceptions at one boundary (``status_of`` / ``ErrorBoundary``). Nothing
above the engine imports the engine's other modules or the transports.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from llm_datadist._engine import diagnostics, options, requests
from llm_datadist._engine.errors import (EngineError, FeatureNotEnabled, LinkFailed, NotLinked, ParamInvalid,
                                         ErrorBoundary, status_of, to_llm_exception)
from llm_datadist._engine.options import EngineOptions, link_timeout_s
from llm_datadist._engine.registry import UINT64_MAX, KeyId
from llm_datadist._engine.requests import TENSORS_PER_LAYER, ConfigJob, TaskJob
from llm_datadist._engine.stats import (LATENCY_BUCKETS_S, CacheStats, Histogram, LinkStats, ServedStats,
                                        StatsSnapshot, TransferStats)
from llm_datadist._engine.types import DEVICE, HOST, CacheSpec, LayerSel, SourceSpec
from llm_datadist.status import LLMStatusCode

if TYPE_CHECKING:  # the engine itself (numpy, transports) loads on the first open_engine
    from llm_datadist._engine.engine import Engine
    from llm_datadist._engine.notices import LinkDown, Notice

__all__ = [
    "EngineApi", "TaskWaiter", "EngineOptions", "open_engine", "options", "requests", "ErrorBoundary", "status_of",
    "to_llm_exception", "NoticesApi",
    "EngineError", "FeatureNotEnabled", "LinkFailed", "NotLinked", "ParamInvalid", "KeyId", "UINT64_MAX",
    "CacheSpec", "LayerSel", "SourceSpec", "ConfigJob", "TaskJob", "TENSORS_PER_LAYER", "HOST",
    "DEVICE", "link_timeout_s", "memory_kind",
    "diagnostics",  # doctor's and the bench's probes of this machine (_engine/diagnostics.py)
    "StatsSnapshot", "TransferStats", "ServedStats", "LinkStats", "CacheStats", "Histogram", "LATENCY_BUCKETS_S",
    "all_stats",
]


class TaskWaiter(Protocol):
    """A running transfer_cache_async, as ``EngineApi.start_layerwise`` returns it."""

    def join(self, timeout_s: Optional[float]) -> bool:
        """Wait until the task finished (``None``: no limit); True once it has."""
        ...

    def results(self) -> List[Optional[LLMStatusCode]]:
        """One status per config, in order; None for a config none of whose layers ran to its end."""
        ...


class NoticesApi(Protocol):
    """The notification queue and link-down events of one engine (``EngineApi.notices``; see notices.py)."""

    def poll(self, max_count: int, timeout_s: float) -> List[Notice]:
        """Take up to ``max_count`` queued notifications, waiting up to ``timeout_s`` for the first one."""
        ...

    def poll_link_down(self, max_count: int, timeout_s: float) -> List[LinkDown]:
        """Take up to ``max_count`` link-down events, waiting up to ``timeout_s`` for the first one."""
        ...

    def set_callback(self, fn: Optional[Callable[[Notice], None]]) -> None:
        """Deliver notifications to ``fn`` on the dispatcher thread (None: back to polling)."""
        ...

    def set_link_down_callback(self, fn: Optional[Callable[[LinkDown], None]]) -> None:
        """Deliver link-down events to ``fn`` on the dispatcher thread (None: back to polling)."""
        ...

    def set_limits(self, max_count: Optional[int], max_bytes: Optional[int]) -> None:
        """Bound the receive queue (notifications and payload bytes)."""
        ...

    def queued(self) -> Tuple[int, int]:
        """(notifications, payload bytes) waiting in the queue."""
        ...


class EngineApi(Protocol):
    """What the facades (v2, V1, CLI) may call on an engine. Every method raises EngineError subclasses;
    ``ErrorBoundary`` / ``status_of`` turn them into the facade's exceptions or codes."""

    @property
    def opts(self) -> EngineOptions:
        """The options the engine was opened with."""
        ...

    @property
    def cluster_id(self) -> int:
        ...

    # -- lifecycle and role -----------------------------------------------------------------------
    def close(self) -> None:
        """Finalize (idempotent): stop tasks and links, release every cache, stop the transports."""
        ...

    def set_role(self, role: int, listen: Optional[Tuple[str, int]]) -> None:
        """switch_role: move, start or stop listening (no link may exist), then take the new role label."""
        ...

    # -- caches -------------------------------------------------------------------------------------
    def register(self, req: requests.Register) -> requests.CacheInfo:
        ...

    def allocate(self, req: requests.Allocate) -> requests.CacheInfo:
        ...

    def cache_info(self, cache_id: int) -> requests.CacheInfo:
        ...

    def has_pool(self) -> bool:
        ...

    def deallocate(self, cache_id: int) -> None:
        ...

    def unregister(self, cache_id: int) -> None:
        ...

    def remove_key(self, key: KeyId) -> None:
        ...

    def remap(self, ranges: Sequence[Tuple[int, int]]) -> None:
        """Re-register exposed (addr, size) ranges with every transport after a memory error."""
        ...

    # -- moving bytes -------------------------------------------------------------------------------
    def transfer(self, req: requests.Transfer) -> None:
        """A pull or push between this instance and a linked one (synchronous)."""
        ...

    def copy(self, req: requests.LocalCopy) -> None:
        """A copy between caches of this instance."""
        ...

    def start_layerwise(self, job: TaskJob) -> TaskWaiter:
        """transfer_cache_async: queue the layer-wise push task and return its waiter."""
        ...

    # -- links --------------------------------------------------------------------------------------
    def link_clusters(self, req: requests.LinkClusters) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        """Link every peer in parallel; (overall, [code per peer]), never raises."""
        ...

    def unlink_clusters(self, req: requests.UnlinkClusters) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        ...

    def check_linked(self, cluster_id: int) -> None:
        """NotLinked unless a link to the cluster exists."""
        ...

    def route(self, cluster_id: int, every: bool = False) -> str:
        """The data route of the link to a cluster (every route joined by ">" with ``every``)."""
        ...

    def comm_link(self, comm_name: str, members: Dict[int, int], rank_table: Optional[str]) -> int:
        """Join a rank-table comm domain; returns its comm id at once (it links in the background)."""
        ...

    def comm_status(self, comm_id: int) -> int:
        ...

    def comm_unlink(self, comm_id: int) -> None:
        ...

    # -- notifications (the llm_datadist.notifications extension) -----------------------------------
    @property
    def notices(self) -> NoticesApi:
        """This instance's notification queue and link-down events."""
        ...

    def notify(self, cluster_id: int, payload: bytes, timeout_s: float, after: int = 0) -> None:
        """Send a notification to a linked cluster and wait until it queued it (``after``: 0 plain, 1 after a
        push, 2 after a pull, over the transfer's link)."""
        ...

    def listen_address(self) -> Optional[Tuple[str, int]]:
        """(ip, port) this instance listens on (the bound port when port 0 was asked for), or None."""
        ...

    # -- statistics (the llm_datadist.stats extension) ---------------------------------------------------
    def stats_snapshot(self) -> StatsSnapshot:
        """Everything this instance counted since init, as plain data."""
        ...


def open_engine(opts: EngineOptions) -> EngineApi:
    """A started engine for ``opts`` (EngineError if it cannot start; nothing is left running then)."""
    from llm_datadist._engine.engine import Engine

    engine: Engine = Engine(opts)
    engine.start()
    return engine


def all_stats() -> List[StatsSnapshot]:
    """A snapshot of every initialized instance of this process (none before the engine first loads)."""
    import sys

    engine_module = sys.modules.get("llm_datadist._engine.engine")
    if engine_module is None:
        return []
    return [engine.stats_snapshot() for engine in engine_module.live_engines()]


def memory_kind(placement: int, device_id: int = 0) -> str:
    """The memory kind ("host", "cuda") of caches of a placement in this process."""
    from llm_datadist._engine.memory import backend_for

    return backend_for(placement, device_id).kind
