"""Transport contract: small, synchronous, batch-first byte movers between registered memory.

Lifecycle of a transport inside one LLMDataDist instance::

    t = TransportCls(ctx)            # at init; may start a data server thread (tcp)
    t.register(region) ...           # every region peers may touch (engine decides which)
    info = t.local_info()            # bytes, sent to peers in the link handshake
    ch = t.connect(peer, deadline)   # per link; raises ConnectFailed if unusable (permissions, ...)
    t.read(ch, plan, deadline)       # remote -> local, whole batch, thread-safe
    t.write(ch, plan, deadline)      # local -> remote, whole batch, thread-safe
    t.disconnect(ch); t.close()      # idempotent

Policy (validation of keys, layer/block planning, timeouts per API) lives in the engine. A transport
only moves the bytes of a ``CopyPlan`` and raises ``TransportError`` subclasses, never anything else.
Every server side of a transport re-validates requested ranges against its registered regions.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, FrozenSet, Optional

import numpy as np

from llm_datadist.status import LLMStatusCode

HOST = "host"
CUDA = "cuda"


class TransportError(Exception):
    """Base of all transport failures; ``code`` is the public status it maps to."""

    code: LLMStatusCode = LLMStatusCode.LLM_FAILED

    def __init__(self, message: str = "", code: Optional[int] = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = LLMStatusCode(code)


class ConnectFailed(TransportError):
    """The channel could not be set up (unreachable, refused, no permission)."""

    code = LLMStatusCode.LLM_LINK_FAILED


class TransferTimeout(TransportError):
    """The deadline passed before the batch completed."""

    code = LLMStatusCode.LLM_TIMEOUT


class RemoteRejected(TransportError):
    """The serving side refused the request (range outside registered memory, bad frame)."""

    code = LLMStatusCode.LLM_PARAM_INVALID


class TransportClosed(TransportError):
    """The peer went away or the transport was closed during the transfer."""

    code = LLMStatusCode.LLM_LINK_FAILED


@dataclasses.dataclass(frozen=True)
class Region:
    """A registered memory range. ``shm_name`` is set when the range lies in a shareable segment."""

    addr: int
    nbytes: int
    kind: str = HOST
    device_id: int = 0
    shm_name: Optional[str] = None
    shm_offset: int = 0

    @property
    def end(self) -> int:
        return self.addr + self.nbytes


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """What the handshake told us about a peer, as a transport needs it."""

    cluster_id: int
    host_id: str
    pid: int
    address: str  # IP address the control connection came from / went to
    descriptor: bytes  # the peer transport's local_info()

    def same_host(self, host_id: str) -> bool:
        return self.host_id == host_id


@dataclasses.dataclass(frozen=True)
class TransportContext:
    """What a transport knows about its own instance."""

    host_id: str
    pid: int
    bind_host: str = "0.0.0.0"
    device_id: int = 0


class CopyPlan:
    """A batch of copies: ``sizes[i]`` bytes between ``local[i]`` and ``remote[i]`` (uint64 arrays).

    Plans are built vectorised by the engine's planner; transports consume them whole.
    """

    __slots__ = ("local", "remote", "sizes")

    def __init__(self, local: np.ndarray, remote: np.ndarray, sizes: np.ndarray) -> None:
        self.local = np.ascontiguousarray(local, dtype=np.uint64)
        self.remote = np.ascontiguousarray(remote, dtype=np.uint64)
        self.sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
        if not (self.local.shape == self.remote.shape == self.sizes.shape) or self.local.ndim != 1:
            raise ValueError("CopyPlan arrays must be 1-D and of equal length")

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def total_bytes(self) -> int:
        return int(self.sizes.sum()) if len(self) else 0

    def merged(self) -> "CopyPlan":
        """Merge neighbouring ops that are contiguous on both sides (order preserved)."""
        n = len(self)
        if n < 2:
            return self
        end_l = self.local[:-1] + self.sizes[:-1]
        end_r = self.remote[:-1] + self.sizes[:-1]
        joins = (end_l == self.local[1:]) & (end_r == self.remote[1:])
        if not joins.any():
            return self
        starts = np.flatnonzero(np.concatenate(([True], ~joins)))
        sizes = np.add.reduceat(self.sizes, starts)
        return CopyPlan(self.local[starts], self.remote[starts], sizes)

    def swapped(self) -> "CopyPlan":
        """The same plan seen from the other side (local and remote exchanged)."""
        return CopyPlan(self.remote, self.local, self.sizes)

    def __repr__(self) -> str:
        return f"CopyPlan(ops={len(self)}, bytes={self.total_bytes})"


class Channel:
    """A connected path to one peer. Transports subclass it to hold their state."""

    def __init__(self, peer: PeerInfo) -> None:
        self.peer = peer

    def close(self) -> None:  # pragma: no cover - default no-op
        """Release resources held by the channel (idempotent)."""


class Transport(abc.ABC):
    """Base class of every transport. Subclasses set the class attributes below."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # higher wins when several can reach a peer
    memory_kinds: ClassVar[FrozenSet[str]] = frozenset({HOST})
    same_host_only: ClassVar[bool] = False
    same_process_only: ClassVar[bool] = False

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx

    @classmethod
    def available(cls) -> bool:
        """Whether this transport can work in this process at all. Never raises."""
        return True

    def register(self, region: Region) -> None:
        """Expose a region to peers (server-side validation, shm export, ...)."""

    def deregister(self, region: Region) -> None:
        """Stop exposing a region; unknown regions are ignored."""

    def local_info(self) -> bytes:
        """Descriptor sent to peers in the handshake (ports, tokens, pid, probe address...)."""
        return b""

    def can_reach(self, peer: PeerInfo) -> bool:
        """Cheap locality check before connect (same host, same process...)."""
        if self.same_host_only and not peer.same_host(self.ctx.host_id):
            return False
        return True

    def supports(self, channel: Channel, plan: CopyPlan) -> bool:
        """Whether this channel can move every op of the plan (shm: ranges inside shared segments)."""
        return True

    @abc.abstractmethod
    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Open a channel to the peer, checking permissions once. Raises ConnectFailed."""

    @abc.abstractmethod
    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy ``plan.sizes[i]`` bytes from peer ``plan.remote[i]`` to local ``plan.local[i]``."""

    @abc.abstractmethod
    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy ``plan.sizes[i]`` bytes from local ``plan.local[i]`` to peer ``plan.remote[i]``."""

    def disconnect(self, channel: Channel) -> None:
        """Close a channel (idempotent)."""
        channel.close()

    def close(self) -> None:
        """Stop servers and release everything (idempotent)."""
