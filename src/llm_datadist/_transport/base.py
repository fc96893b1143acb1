"""Transport contract v2: capability-declared, descriptor-based byte movers between registered memory.

A transport moves the bytes of a ``CopyPlan`` between this process and one peer, and nothing else: keys,
layers, blocks, timeouts per API and retries are the engine's business. Lifecycle inside one instance::

    t = TransportCls(ctx)                # at init; may start a data server (tcp)
    desc = t.register(region)            # every region peers may touch; desc travels in the cache table
    info = t.local_info()                # non-secret descriptor, sent in the link handshake
    cred = t.grant(link_id)              # per-link credential, sent only after the peer proved the secret
    ch = t.connect(peer, deadline)       # per link; ConnectFailed if unusable (permissions, identity)
    t.learn(ch, remote_regions)          # the peer's region descriptors, from its cache table (refreshed)
    t.covers(ch, plan)                   # can this channel move every op of the plan?
    t.read(ch, plan, deadline)           # remote -> local, whole batch, thread-safe
    t.write(ch, plan, deadline)          # local -> remote, whole batch, thread-safe
    p = t.start(ch, plan, deadline, write)  # optional asynchronous form: p.poll() / p.wait(deadline)
    t.fence(deadline)                    # after the engine invalidated a generation: wait for requests
                                         # the serving side validated before now
    t.revoke(link_id); t.disconnect(ch); t.close()   # idempotent

Capabilities (``Transport.caps``) say what the engine may route over a transport: the memory kinds it moves,
how far it reaches (same process, same host, network), whether it is one-sided (the owner's CPU does no work:
the engine obtains a write grant before a write, and every read checks the plan's guards), whether it covers
only some plans (shm: only shared segments, so a general route is kept behind it) and whether it has a native
asynchronous form.

Guards: every plan names the generation words of the remote caches it touches (``Guard``). The owner changes a
word before it releases that memory. One-sided transports read each word before and after the copy (in the
same system call where they can) and raise ``StaleMemory`` on a mismatch; two-sided transports send the guards
to the serving side, which checks them against ``ctx.guards`` after admitting the request and holds the
request open (``fence``) until it is done. So a transfer that raced a release fails; it never reports success
with bytes of freed or reused memory.

Transports raise only ``TransportError`` subclasses; the engine maps them to status codes.
"""
from __future__ import annotations

import abc
import dataclasses
import socket
from typing import Callable, ClassVar, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

HOST = "host"
CUDA = "cuda"

# Locality: how far a transport reaches.
PROCESS = "process"
SAME_HOST = "host"
NETWORK = "network"


class TransportError(Exception):
    """Base of all transport failures."""


class ConnectFailed(TransportError):
    """The channel could not be set up (unreachable, refused, no permission, wrong identity)."""


class TransferTimeout(TransportError):
    """The deadline passed before the batch completed."""


class RemoteRejected(TransportError):
    """The serving side refused the request (range outside registered memory, bad frame)."""


class StaleMemory(RemoteRejected):
    """A guard did not match: the peer released or replaced that memory since the plan was made."""


class TransportClosed(TransportError):
    """The peer went away or the transport was closed during the transfer."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the engine may route over a transport."""

    memory_kinds: FrozenSet[str] = frozenset({HOST})
    locality: str = NETWORK
    one_sided: bool = False
    partial: bool = False
    asynchronous: bool = False


@dataclasses.dataclass(frozen=True)
class Segment:
    """The shareable file behind a region: ``path`` opens it, the region starts at ``offset``."""

    path: str
    offset: int
    dev: int
    ino: int
    size: int


@dataclasses.dataclass(frozen=True)
class Region:
    """A registered memory range of this process."""

    addr: int
    nbytes: int
    kind: str = HOST
    device_id: int = 0
    segment: Optional[Segment] = None
    writable: bool = True  # whether peers may write into it (read-only regions: the guard table)

    @property
    def end(self) -> int:
        return self.addr + self.nbytes


@dataclasses.dataclass(frozen=True)
class RemoteRegion:
    """One of the peer's regions as one transport sees it: the peer's ``register`` descriptor."""

    addr: int
    nbytes: int
    kind: str
    descriptor: bytes


@dataclasses.dataclass(frozen=True)
class Guard:
    """The generation word of a remote cache: ``value`` at ``addr`` in the owner, slot ``slot`` of its table."""

    slot: int
    value: int
    addr: int


class GuardTable(abc.ABC):
    """The owner's generation words, as a transport's serving side checks them."""

    @abc.abstractmethod
    def valid(self, slot: int, value: int) -> bool:
        """Whether slot ``slot`` currently holds ``value`` (a live cache)."""


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """What the handshake told us about a peer, as one transport needs it."""

    cluster_id: int
    host_id: str
    pid: int
    address: str  # IP address the control connection came from / went to
    descriptor: bytes  # the peer transport's local_info()
    credential: bytes = b""  # what the peer granted us for this link (tcp: a data-plane token)
    nonce: bytes = b""  # the peer instance's random identity, proven by its guard table


_NO_BOOT_ID = "no-boot-id"


def host_identity() -> str:
    """Identity of this host (``hostname/boot id``): equal ids make same-host routes worth trying.

    Only a hint: every same-host route proves the peer's identity itself before it is used.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = _NO_BOOT_ID
    return f"{socket.gethostname()}/{boot}"


def same_machine(host_a: str, host_b: str) -> bool:
    """Whether two host ids (:func:`host_identity`) name one running kernel: containers and network namespaces
    of one machine have their own hostnames but share its boot id, and its cores. A hint for sizing work, never
    for trust: a route between the two still proves the peer itself."""
    boot_a, boot_b = host_a.rpartition("/")[2], host_b.rpartition("/")[2]
    return bool(boot_a) and boot_a == boot_b and boot_a != _NO_BOOT_ID


@dataclasses.dataclass(frozen=True)
class TransportContext:
    """What a transport knows about its own instance."""

    host_id: str
    pid: int
    bind_host: str = "0.0.0.0"
    device_id: int = 0
    guards: Optional[GuardTable] = None
    tls: Optional[object] = None  # a tls.Tls when mutual TLS is configured (tcp wraps its connections)


SMALL_OPS = 64  # plans of at most this many ops live as Python ints (no numpy on the small-request path)


class CopyPlan:
    """A batch of copies: ``sizes[i]`` bytes between ``local[i]`` and ``remote[i]``.

    ``local_kind``/``remote_kind`` are the memory kinds of each side; ``guards`` the remote generation words
    the plan relies on. A small plan (at most SMALL_OPS ops, built from Python lists) keeps its ops as a list
    of ``(local, remote, nbytes)`` int tuples (``ops``) and makes uint64 arrays only when ``local``, ``remote``
    or ``sizes`` is read; a large plan holds the arrays (``ops`` is None). Plans are built by the engine's
    planner; transports consume them whole.
    """

    __slots__ = ("_local", "_remote", "_sizes", "ops", "local_kind", "remote_kind", "guards", "_merged")

    def __init__(self, local, remote, sizes, local_kind: str = HOST, remote_kind: str = HOST,
                 guards: Tuple[Guard, ...] = (), merged: bool = False) -> None:
        self.local_kind = local_kind
        self.remote_kind = remote_kind
        self.guards = tuple(guards)
        self._merged = merged
        if isinstance(local, list) and len(local) <= SMALL_OPS:
            if not (len(local) == len(remote) == len(sizes)):
                raise ValueError("CopyPlan lists must be of equal length")
            self.ops: Optional[List[Tuple[int, int, int]]] = list(zip(local, remote, sizes))
            self._local = self._remote = self._sizes = None
            return
        self.ops = None
        self._local = np.ascontiguousarray(local, dtype=np.uint64)
        self._remote = np.ascontiguousarray(remote, dtype=np.uint64)
        self._sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
        if not (self._local.shape == self._remote.shape == self._sizes.shape) or self._local.ndim != 1:
            raise ValueError("CopyPlan arrays must be 1-D and of equal length")

    @classmethod
    def from_ops(cls, ops: List[Tuple[int, int, int]], local_kind: str = HOST, remote_kind: str = HOST,
                 guards: Tuple[Guard, ...] = (), merged: bool = False) -> CopyPlan:
        plan = cls.__new__(cls)
        plan.ops, plan._local, plan._remote, plan._sizes = ops, None, None, None
        plan.local_kind, plan.remote_kind, plan.guards, plan._merged = local_kind, remote_kind, guards, merged
        return plan

    def _arrays(self) -> None:
        ops = self.ops or []
        self._local = np.array([op[0] for op in ops], dtype=np.uint64)
        self._remote = np.array([op[1] for op in ops], dtype=np.uint64)
        self._sizes = np.array([op[2] for op in ops], dtype=np.uint64)

    @property
    def local(self) -> np.ndarray:
        if self._local is None:
            self._arrays()
        return self._local  # type: ignore[return-value]

    @property
    def remote(self) -> np.ndarray:
        if self._remote is None:
            self._arrays()
        return self._remote  # type: ignore[return-value]

    @property
    def sizes(self) -> np.ndarray:
        if self._sizes is None:
            self._arrays()
        return self._sizes  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.ops) if self.ops is not None else int(self._sizes.shape[0])  # type: ignore[union-attr]

    @property
    def total_bytes(self) -> int:
        if self.ops is not None:
            return sum(op[2] for op in self.ops)
        return int(self._sizes.sum()) if len(self) else 0  # type: ignore[union-attr]

    def merged(self) -> CopyPlan:
        """Neighbouring ops that are contiguous on both sides merged (order kept); computed once."""
        if self._merged:
            return self
        if self.ops is not None:
            out: List[Tuple[int, int, int]] = []
            for op in self.ops:
                if out and out[-1][0] + out[-1][2] == op[0] and out[-1][1] + out[-1][2] == op[1]:
                    last = out[-1]
                    out[-1] = (last[0], last[1], last[2] + op[2])
                else:
                    out.append(op)
            return CopyPlan.from_ops(out, self.local_kind, self.remote_kind, self.guards, merged=True)
        n = len(self)
        if n >= 2:
            end_l = self.local[:-1] + self.sizes[:-1]
            end_r = self.remote[:-1] + self.sizes[:-1]
            joins = (end_l == self.local[1:]) & (end_r == self.remote[1:])
            if joins.any():
                starts = np.flatnonzero(np.concatenate(([True], ~joins)))
                return CopyPlan(self.local[starts], self.remote[starts], np.add.reduceat(self.sizes, starts),
                                self.local_kind, self.remote_kind, self.guards, merged=True)
        self._merged = True
        return self

    def swapped(self) -> CopyPlan:
        """The same copies seen from the other side (local and remote exchanged, no guards)."""
        if self.ops is not None:
            return CopyPlan.from_ops([(r, lo, n) for lo, r, n in self.ops], self.remote_kind, self.local_kind, (),
                                     self._merged)
        return CopyPlan(self.remote, self.local, self.sizes, self.remote_kind, self.local_kind, (), self._merged)

    def part(self, start: int, stop: int) -> CopyPlan:
        """Ops ``[start, stop)`` with the same kinds and guards."""
        if self.ops is not None:
            return CopyPlan.from_ops(self.ops[start:stop], self.local_kind, self.remote_kind, self.guards,
                                     self._merged)
        return CopyPlan(self.local[start:stop], self.remote[start:stop], self.sizes[start:stop], self.local_kind,
                        self.remote_kind, self.guards, self._merged)

    def __repr__(self) -> str:
        return f"CopyPlan(ops={len(self)}, bytes={self.total_bytes}, guards={len(self.guards)})"


class Channel:
    """A connected path to one peer. Transports subclass it to hold their state."""

    def __init__(self, peer: PeerInfo) -> None:
        self.peer = peer

    def close(self) -> None:  # pragma: no cover - default no-op
        """Release resources held by the channel (idempotent)."""


class Pending:
    """An asynchronous transfer started by :meth:`Transport.start`."""

    def __init__(self, poll: Callable[[], bool], wait: Callable[[float], None]) -> None:
        self._poll = poll
        self._wait = wait

    def poll(self) -> bool:
        """True once the transfer completed; raises its TransportError if it failed."""
        return self._poll()

    def wait(self, deadline: float) -> None:
        """Block until completion (TransferTimeout at ``deadline``); raises the transfer's error."""
        self._wait(deadline)


def completed() -> Pending:
    """A Pending that is already done (the synchronous transports' ``start``)."""
    return Pending(lambda: True, lambda _deadline: None)


class Transport(abc.ABC):
    """Base class of every transport. Subclasses set ``name``, ``priority`` and ``caps``."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # higher wins when several can reach a peer
    caps: ClassVar[Capabilities] = Capabilities()

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx

    @classmethod
    def available(cls) -> bool:
        """Whether this transport works in this process at all. Never raises."""
        return not cls.unavailable_reason()

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why the transport cannot work here ("" when it can). Never raises."""
        return ""

    def register(self, region: Region) -> bytes:
        """Expose a region to peers; returns its descriptor for peers (b"" when peers need none)."""
        return b""

    def deregister(self, region: Region) -> None:
        """Stop exposing a region; unknown regions are ignored."""

    def local_info(self) -> bytes:
        """Non-secret descriptor sent to peers in the handshake (ports, pid, identity probe...)."""
        return b""

    def grant(self, link_id: int) -> bytes:
        """A credential for the peer of link ``link_id`` (tcp: a data-plane token); b"" when none is needed."""
        return b""

    def revoke(self, link_id: int) -> None:
        """Invalidate what :meth:`grant` gave that link (at unlink); connections using it are closed."""

    def can_reach(self, peer: PeerInfo) -> bool:
        """Cheap locality check before connect (same host, same process...)."""
        return True

    @abc.abstractmethod
    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Open a channel to the peer, checking permissions and identity once. Raises ConnectFailed."""

    def learn(self, channel: Channel, regions: Sequence[RemoteRegion]) -> None:
        """Take note of the peer's current region descriptors (replaces what was learned before)."""

    def covers(self, channel: Channel, plan: CopyPlan) -> bool:
        """Whether this channel can move every op of the plan (memory kinds are checked by the engine)."""
        return True

    @abc.abstractmethod
    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy ``plan.sizes[i]`` bytes from peer ``plan.remote[i]`` to local ``plan.local[i]``."""

    @abc.abstractmethod
    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy ``plan.sizes[i]`` bytes from local ``plan.local[i]`` to peer ``plan.remote[i]``."""

    def start(self, channel: Channel, plan: CopyPlan, deadline: float, write: bool) -> Pending:
        """Begin a transfer and return at once where the transport can; by default it runs to its end here."""
        (self.write if write else self.read)(channel, plan, deadline)
        return completed()

    def fence(self, deadline: float) -> None:
        """Wait until the serving side finished every request it admitted before this call."""

    def disconnect(self, channel: Channel) -> None:
        """Close a channel (idempotent)."""
        channel.close()

    def close(self) -> None:
        """Stop servers and release everything (idempotent)."""
