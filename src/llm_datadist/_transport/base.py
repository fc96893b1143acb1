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
import array
import bisect
import dataclasses
import itertools
import socket
import struct
from typing import Callable, ClassVar, FrozenSet, List, Optional, Sequence, Tuple, Union

import numpy as np

#: Addresses or sizes: Python ints (a small plan) or a uint64 array.
Ints = Union[List[int], np.ndarray]
#: ``(local, remote, sizes)`` of a plan held as Python ints.
_IntOps = Tuple[List[int], List[int], List[int]]

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


SMALL_OPS = 4096  # plans of at most this many ops keep Python int lists: no numpy, whose calls let go of the GIL

_U64 = np.uint64
_WRAP = 1 << 64


def grid(src_bases: Sequence[int], src_offsets: Sequence[int], dst_bases: Sequence[int],
         dst_offsets: Sequence[int], sizes: Sequence[int]) -> Tuple[Ints, Ints, Ints]:
    """The ops of a regular transfer, source-major: item ``j`` of tensor ``t``, ``sizes[j]`` bytes from
    ``src_bases[t] + src_offsets[j]`` to ``dst_bases[t] + dst_offsets[j]``, as ``(sources, destinations, sizes)``
    in the form a CopyPlan keeps: Python int lists for at most SMALL_OPS ops, uint64 arrays beyond."""
    if len(src_bases) * len(src_offsets) <= SMALL_OPS:
        return ([b + o for b in src_bases for o in src_offsets], [b + o for b in dst_bases for o in dst_offsets],
                list(sizes) * len(src_bases))
    src = np.add.outer(np.asarray(src_bases, dtype=_U64), np.asarray(src_offsets, dtype=_U64)).ravel()
    dst = np.add.outer(np.asarray(dst_bases, dtype=_U64), np.asarray(dst_offsets, dtype=_U64)).ravel()
    return src, dst, np.tile(np.asarray(sizes, dtype=_U64), len(src_bases))


class CopyPlan:
    """A batch of copies: ``sizes[i]`` bytes between ``local[i]`` and ``remote[i]``.

    ``local_kind``/``remote_kind`` are the memory kinds of each side; ``guards`` the remote generation words
    the plan relies on. Plans are built by the engine's planner; transports consume them whole, through the
    methods below, which give every transport what it needs (the ops as Python ints, iovec arrays for one
    system call, request frame words, byte-balanced parts, the region each remote range lies in) in one form
    whatever the plan's size. How the plan holds its ops is its own business: a plan built from at most
    SMALL_OPS Python ints keeps them as three int lists (a small request never touches numpy), any other as
    uint64 arrays; ``local``, ``remote`` and ``sizes`` are arrays either way (made on first use). Every choice
    between the two lives in this class.
    """

    __slots__ = ("_ints", "_local", "_remote", "_sizes", "_total", "local_kind", "remote_kind", "guards",
                 "_merged")

    def __init__(self, local, remote, sizes, local_kind: str = HOST, remote_kind: str = HOST,
                 guards: Tuple[Guard, ...] = (), merged: bool = False) -> None:
        self.local_kind = local_kind
        self.remote_kind = remote_kind
        self.guards = tuple(guards)
        self._merged = merged
        self._total: Optional[int] = None
        if isinstance(local, list) and len(local) <= SMALL_OPS:
            if not (len(local) == len(remote) == len(sizes)):
                raise ValueError("CopyPlan lists must be of equal length")
            self._ints: Optional[_IntOps] = (local, list(remote), list(sizes))
            self._local = self._remote = self._sizes = None
            return
        self._ints = None
        self._local = np.ascontiguousarray(local, dtype=_U64)
        self._remote = np.ascontiguousarray(remote, dtype=_U64)
        self._sizes = np.ascontiguousarray(sizes, dtype=_U64)
        if not (self._local.shape == self._remote.shape == self._sizes.shape) or self._local.ndim != 1:
            raise ValueError("CopyPlan arrays must be 1-D and of equal length")

    def _like(self, local, remote, sizes, merged: bool, swap: bool = False) -> CopyPlan:
        """A plan of these kinds and guards (kinds exchanged and no guards with ``swap``) over other ops, in the
        form they come in (int lists stay ints)."""
        plan = CopyPlan.__new__(CopyPlan)
        if isinstance(local, list):
            plan._ints, plan._local, plan._remote, plan._sizes = (local, remote, sizes), None, None, None
        else:
            plan._ints, plan._local, plan._remote, plan._sizes = None, local, remote, sizes
        plan._total = None
        plan.local_kind, plan.remote_kind = (self.remote_kind, self.local_kind) if swap else (self.local_kind,
                                                                                             self.remote_kind)
        plan.guards, plan._merged = ((), merged) if swap else (self.guards, merged)
        return plan

    @classmethod
    def from_pairs(cls, buf, offset: int, count: int) -> CopyPlan:
        """The plan of ``count`` little-endian uint64 ``(addr, nbytes)`` pairs at ``offset`` of ``buf`` (a tcp
        request frame's ranges), as ranges of this process: ``local`` and ``remote`` both name them."""
        if count <= SMALL_OPS:
            words = struct.unpack_from(f"<{2 * count}Q", buf, offset)
            addrs = list(words[0::2])
            return cls(addrs, addrs, list(words[1::2]))
        pairs = np.frombuffer(buf, dtype="<u8", count=2 * count, offset=offset).reshape(count, 2)
        column = pairs[:, 0].astype(_U64)
        return cls(column, column, pairs[:, 1].astype(_U64))

    @property
    def ops(self) -> Optional[List[Tuple[int, int, int]]]:
        """The ``(local, remote, nbytes)`` int tuples of a plan held as ints, else None (introspection only:
        transports use the methods below, which never ask)."""
        return list(zip(*self._ints)) if self._ints is not None else None

    def _arrays(self) -> None:
        lo, re, sz = self._ints or ([], [], [])
        self._local = np.array(lo, dtype=_U64)
        self._remote = np.array(re, dtype=_U64)
        self._sizes = np.array(sz, dtype=_U64)

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
        return len(self._ints[2]) if self._ints is not None else int(self._sizes.shape[0])  # type: ignore[union-attr]

    @property
    def total_bytes(self) -> int:
        if self._total is None:
            if self._ints is not None:
                self._total = sum(self._ints[2])
            else:
                self._total = int(self._sizes.sum()) if len(self) else 0  # type: ignore[union-attr]
        return self._total

    # ---- the ops in the forms transports consume --------------------------------------------------------
    def lists(self) -> _IntOps:
        """``(local, remote, sizes)`` as Python int lists (do not modify them)."""
        if self._ints is not None:
            return self._ints
        return self.local.tolist(), self.remote.tolist(), self.sizes.tolist()

    def u64_buffers(self) -> Tuple[object, object, object]:
        """``(local, remote, sizes)`` as buffers of uint64 (the compiled data path's input): ``array('Q')`` for a
        small plan of ints (cheaper to make than numpy arrays), the plan's own arrays otherwise."""
        if self._ints is not None:
            lo, re, sz = self._ints
            return array.array("Q", lo), array.array("Q", re), array.array("Q", sz)
        return self.local, self.remote, self.sizes

    def ranges(self, remote: bool = False) -> Tuple[List[int], List[int]]:
        """``(addresses, sizes)`` of one side as Python int lists (scatter/gather calls build views of them)."""
        if self._ints is not None:
            return self._ints[1 if remote else 0], self._ints[2]
        return (self.remote if remote else self.local).tolist(), self.sizes.tolist()

    def pairs(self) -> bytes:
        """The remote ranges as little-endian uint64 ``(addr, nbytes)`` pairs (a tcp request frame's body)."""
        n = len(self)
        if self._ints is not None:
            words = [0] * (2 * n)
            words[0::2], words[1::2] = self._ints[1], self._ints[2]
            return struct.pack(f"<{2 * n}Q", *words)
        out = np.empty((n, 2), dtype="<u8")
        out[:, 0], out[:, 1] = self.remote, self.sizes
        return out.tobytes()

    def _cum(self):
        """Running byte counts before each op and after the last (``n + 1`` entries; a list or an array)."""
        if self._ints is not None:
            return list(itertools.accumulate(self._ints[2], initial=0))
        cum = np.zeros(len(self) + 1, dtype=_U64)
        np.cumsum(self.sizes, out=cum[1:])
        return cum

    def chunks(self, max_count: int, max_bytes: int) -> List[Tuple[int, int, int]]:
        """``(start, stop, nbytes)`` of consecutive runs of at most ``max_count`` ops and, unless one op is larger,
        ``max_bytes`` bytes (one system call each); an empty plan is one empty run."""
        n, total = len(self), self.total_bytes
        if n <= max_count and total <= max_bytes:
            return [(0, n, total)]
        cum = self._cum()
        out = []
        i = 0
        while i < n:
            j = min(i + max_count, n)
            first = int(cum[i])
            if int(cum[j]) - first > max_bytes:
                j = max(i + 1, min(j, bisect.bisect_right(cum, first + max_bytes, i, n + 1) - 1))
            out.append((i, j, int(cum[j]) - first))
            i = j
        return out

    def cuts(self, parts: int) -> List[int]:
        """Op indices cutting the plan into up to ``parts`` byte-balanced runs: ``[0, ..., len(self)]``."""
        n = len(self)
        if parts <= 1 or n <= 1:
            return [0, n]
        cum, step = self._cum(), self.total_bytes / parts
        inner = [min(bisect.bisect_left(cum, k * step, 1, n + 1), n) for k in range(1, parts)]
        return sorted(set([0] + inner + [n]))

    def iovecs(self, start: int, stop: int, head: Tuple[List[int], List[int]] = ([], []),
               tail: Tuple[List[int], List[int]] = ([], [])) -> Tuple[int, int, int, object]:
        """Ops ``[start, stop)`` as two ``struct iovec`` arrays, local and remote, between the iovecs of ``head``
        and of ``tail`` (each ``(local words, remote words)``: flat ``[addr, nbytes, addr, nbytes, ...]`` lists):
        ``(local array address, remote array address, entries, an object that keeps both arrays alive)``."""
        m = stop - start
        count = m + (len(head[0]) + len(tail[0])) // 2
        if self._ints is not None:  # both arrays in one array.array (cheaper to make than ctypes arrays)
            lo, re, sz = self._ints
            body_l, body_r = [0] * (2 * m), [0] * (2 * m)
            body_l[0::2], body_r[0::2] = lo[start:stop], re[start:stop]
            body_l[1::2] = body_r[1::2] = sz[start:stop]
            both = array.array("Q", head[0] + body_l + tail[0] + head[1] + body_r + tail[1])
            base = both.buffer_info()[0]
            return base, base + 16 * count, count, both
        h = len(head[0]) // 2
        liov = np.empty((count, 2), dtype=_U64)
        riov = np.empty((count, 2), dtype=_U64)
        t = count - h - m
        liov[:h], riov[:h] = np.reshape(head[0], (h, 2)), np.reshape(head[1], (h, 2))
        liov[h + m:], riov[h + m:] = np.reshape(tail[0], (t, 2)), np.reshape(tail[1], (t, 2))
        liov[h:h + m, 0], liov[h:h + m, 1] = self.local[start:stop], self.sizes[start:stop]
        riov[h:h + m, 0], riov[h:h + m, 1] = self.remote[start:stop], self.sizes[start:stop]
        return liov.ctypes.data, riov.ctypes.data, count, (liov, riov)

    def first_invalid(self, top: int) -> int:
        """Index of the first op with a zero address, an address at or above ``top`` or a size at or above it;
        -1 when there is none."""
        if self._ints is not None:
            for k, (lo, re, n) in enumerate(zip(*self._ints)):
                if not (0 < lo < top and 0 < re < top and n < top):
                    return k
            return -1
        if not len(self):
            return -1
        limit = _U64(top)
        bad = (self.remote == 0) | (self.local == 0) | (self.sizes >= limit)
        bad |= (self.remote >= limit) | (self.local >= limit)
        return int(np.flatnonzero(bad)[0]) if bad.any() else -1

    def remote_regions(self, starts: List[int], ends: List[int]) -> Optional[List[int]]:
        """The indices (sorted, distinct) of the regions ``[starts[k], ends[k])`` (sorted, disjoint) that hold the
        remote ranges; None when some range lies in none of them."""
        if not starts:
            return None if len(self) else []
        if self._ints is not None:
            used = set()
            for re, n in zip(self._ints[1], self._ints[2]):
                k = bisect.bisect_right(starts, re) - 1
                if k < 0 or re + n > ends[k]:
                    return None
                used.add(k)
            return sorted(used)
        s_arr, e_arr = np.array(starts, dtype=_U64), np.array(ends, dtype=_U64)
        idx = np.searchsorted(s_arr, self.remote, side="right").astype(np.int64) - 1
        if (idx < 0).any():
            return None
        end = e_arr[idx]
        if ((self.remote > end) | (self.sizes > end - np.minimum(self.remote, end))).any():
            return None
        return np.unique(idx).tolist()

    def remote_moved(self, starts: List[int], deltas: List[int]) -> CopyPlan:
        """The plan with every remote address moved by the delta of the region it lies in (``starts`` sorted;
        :meth:`remote_regions` said every range lies in one)."""
        if self._ints is not None:
            lo, re, sz = self._ints
            moved = [a + deltas[bisect.bisect_right(starts, a) - 1] for a in re]
            return self._like(lo, moved, sz, self._merged)
        idx = np.searchsorted(np.array(starts, dtype=_U64), self.remote, side="right").astype(np.int64) - 1
        shift = np.array([d % _WRAP for d in deltas], dtype=_U64)
        return self._like(self.local, self.remote + shift[idx], self.sizes, self._merged)

    # ---- derived plans ----------------------------------------------------------------------------------
    def merged(self) -> CopyPlan:
        """Neighbouring ops that are contiguous on both sides merged (order kept); computed once."""
        if self._merged:
            return self
        if self._ints is not None:
            lo_in, re_in, sz_in = self._ints
            lo: List[int] = []
            re: List[int] = []
            sz: List[int] = []
            for a, b, n in zip(lo_in, re_in, sz_in):
                if sz and lo[-1] + sz[-1] == a and re[-1] + sz[-1] == b:
                    sz[-1] += n
                else:
                    lo.append(a)
                    re.append(b)
                    sz.append(n)
            if len(sz) == len(sz_in):
                self._merged = True
                return self
            return self._like(lo, re, sz, merged=True)
        n = len(self)
        if n >= 2:
            end_l = self.local[:-1] + self.sizes[:-1]
            end_r = self.remote[:-1] + self.sizes[:-1]
            joins = (end_l == self.local[1:]) & (end_r == self.remote[1:])
            if joins.any():
                starts = np.flatnonzero(np.concatenate(([True], ~joins)))
                return self._like(self.local[starts], self.remote[starts], np.add.reduceat(self.sizes, starts),
                                  merged=True)
        self._merged = True
        return self

    def swapped(self) -> CopyPlan:
        """The same copies seen from the other side (local and remote exchanged, no guards)."""
        if self._ints is not None:
            lo, re, sz = self._ints
            return self._like(re, lo, sz, self._merged, swap=True)
        return self._like(self.remote, self.local, self.sizes, self._merged, swap=True)

    def part(self, start: int, stop: int) -> CopyPlan:
        """Ops ``[start, stop)`` with the same kinds and guards."""
        if self._ints is not None:
            lo, re, sz = self._ints
            return self._like(lo[start:stop], re[start:stop], sz[start:stop], self._merged)
        return self._like(self.local[start:stop], self.remote[start:stop],
                          self.sizes[start:stop], self._merged)

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
