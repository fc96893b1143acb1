"""The Engine API: the one way into the engine for the v2 facade, the V1 API and the CLI.

Facades build frozen requests (``requests``), call the methods of ``EngineApi`` (what ``open_engine`` returns),
and turn failures into status codes or exceptions at one boundary (``status_of`` / ``map_errors``). Nothing
above the engine imports the engine's other modules or the transports.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from llm_datadist._engine import options, requests
from llm_datadist._engine.errors import (EngineError, FeatureNotEnabled, LinkFailed, NotLinked, ParamInvalid,
                                         map_errors, status_of, to_llm_exception)
from llm_datadist._engine.options import EngineOptions, link_timeout_s
from llm_datadist._engine.registry import UINT64_MAX, KeyId
from llm_datadist._engine.requests import TENSORS_PER_LAYER, ConfigJob, TaskJob
from llm_datadist._engine.types import DEVICE, HOST, CacheSpec, LayerSel, SourceSpec
from llm_datadist.status import LLMStatusCode

if TYPE_CHECKING:  # the engine itself (numpy, transports) loads on the first open_engine
    from llm_datadist._engine.engine import Engine
    from llm_datadist._engine.notices import LinkDown, Notice

__all__ = [
    "EngineApi", "TaskWaiter", "EngineOptions", "open_engine", "options", "requests", "map_errors", "status_of",
    "to_llm_exception", "NoticesApi",
    "EngineError", "FeatureNotEnabled", "LinkFailed", "NotLinked", "ParamInvalid", "KeyId", "UINT64_MAX",
    "CacheSpec", "LayerSel", "SourceSpec", "ConfigJob", "TaskJob", "TENSORS_PER_LAYER", "HOST",
    "DEVICE", "link_timeout_s", "transport_report", "process_vm_status", "plan_blocks_timing", "read_process_memory",
    "memory_kinds", "memory_kind",
    "cross_host_choice", "tcp_streams_per_transfer",
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
    ``map_errors`` / ``status_of`` turn them into the facade's exceptions or codes."""

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


def open_engine(opts: EngineOptions) -> EngineApi:
    """A started engine for ``opts`` (EngineError if it cannot start; nothing is left running then)."""
    from llm_datadist._engine.engine import Engine

    engine: Engine = Engine(opts)
    engine.start()
    return engine


def transport_report() -> List[Tuple[str, str]]:
    """(transport name, why it is unavailable here or "") for every transport this build has."""
    from llm_datadist._transport import transport_report as report

    return report()


def tcp_streams_per_transfer(same_machine: bool = False) -> int:
    """How many data connections the tcp transport opens for one large transfer (to a peer on this machine,
    or on another host)."""
    from llm_datadist._transport import tcp

    return tcp.streams_per_transfer(same_machine)


def cross_host_choice() -> str:
    """How auto mode moves bytes between hosts here (nixl or tcp) and why, UCX settings included."""
    from llm_datadist._transport import nixl_env, unavailable_reason

    reason = unavailable_reason("nixl")
    if reason:
        return f"tcp (nixl: {reason})"
    ucx = {k: v for k, v in nixl_env.ucx_defaults().items() if k != "UCX_LOG_LEVEL"}
    ucx.update({k: v for k, v in os.environ.items() if k in ("UCX_TLS", "UCX_MODULES", "UCX_NET_DEVICES")})
    settings = ", ".join(f"{k}={v}" for k, v in sorted(ucx.items())) or "UCX picks its transports"
    preferred = nixl_env.preferred_reason()
    why = preferred or nixl_env.NOT_PREFERRED
    return f"{'nixl' if preferred else 'tcp'} ({why}; nixl runs with {settings})"


def process_vm_status() -> Tuple[bool, int]:
    """(process_vm_readv works on our own process, threads large copies are split across)."""
    from llm_datadist._transport import iov

    return iov.self_pvm_permitted(), iov.COPY_THREADS


def read_process_memory(pid: int, addr: int, nbytes: int) -> bytes:
    """``nbytes`` at ``addr`` of process ``pid`` with process_vm_readv (doctor's probe of a sibling process)."""
    from llm_datadist._transport import iov

    return iov.pvm_peek(pid, addr, nbytes)


def memory_kind(placement: int, device_id: int = 0) -> str:
    """The memory kind ("host", "cuda") of caches of a placement in this process."""
    from llm_datadist._engine.memory import backend_for

    return backend_for(placement, device_id).kind


def memory_kinds() -> List[str]:
    """The memory kinds this build has a backend for (``host`` always; ``cuda`` once registered)."""
    from llm_datadist._engine import memory

    return [memory.HOST] + sorted(memory.device_backends())


def plan_blocks_timing(num_tensors: int, pool_blocks: int, picked: int, block_bytes: int, iters: int,
                       seed: int = 0) -> Tuple[int, List[float]]:
    """Plan a ``picked``-block pull over ``num_tensors`` tensors ``iters`` times (scattered block ids, two fake
    caches); returns (ops in the plan, seconds per planning). The bench's planning row."""
    import time

    import numpy as np

    from llm_datadist._engine import planner

    src = planner.Side(tuple((1 << 32) + t * pool_blocks * block_bytes for t in range(num_tensors)), block_bytes,
                       pool_blocks, True)
    dst = planner.Side(tuple((1 << 40) + t * pool_blocks * block_bytes for t in range(num_tensors)), block_bytes,
                       pool_blocks, True)
    rng = np.random.default_rng(seed)
    s_blk = rng.choice(pool_blocks, picked, replace=False).tolist()
    d_blk = rng.choice(pool_blocks, picked, replace=False).tolist()
    layers = LayerSel()
    ops = 0
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        src_t, dst_t = planner.tensor_pairs(num_tensors, num_tensors, layers, num_tensors)
        plan = planner.oriented(planner.blocks_ops(src, src_t, s_blk, dst, dst_t, d_blk), src, dst, True)
        times.append(time.perf_counter() - start)
        ops = len(plan)
    return ops, times
