"""Same-host transport over shared segments: a peer maps our pool segments and copies at memcpy speed.

Descriptors: ``register`` gives every region that lies in a shareable segment a descriptor (the segment's path,
its device/inode identity, the region's offset); peers learn them from our cache table. ``local_info`` names
our guard table segment. A peer maps that table read-only and checks that its header holds the nonce of the
handshake before anything else: a path such as ``/proc/<pid>/fd/<n>`` means another process in another pid
namespace, so a mismatch refuses the route instead of mapping the wrong memory. Every segment opened later
must have the device/inode its descriptor names. Reads check the plan's guards in the mapped table before and
after the copy; writes run under the engine's write grant.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from llm_datadist._transport import copies, parallel
from llm_datadist._transport.base import (
    HOST,
    SAME_HOST,
    Capabilities,
    Channel,
    ConnectFailed,
    CopyPlan,
    PeerInfo,
    Region,
    RemoteRegion,
    RemoteRejected,
    StaleMemory,
    Transport,
    TransportClosed,
    TransportContext,
)

SMALL_PIECE_BYTES = 64 << 10  # below this average piece size the syscall path beats memmove

logger = logging.getLogger(__name__)

_INFO_MAGIC = b"SHM2"
_INFO = struct.Struct("<4sQQQQQ")  # magic, pid, guard table addr, its size, dev, ino; then the path (utf-8)
_REGION = struct.Struct("<QQQQ")  # dev, ino, offset of the region in the segment, segment size; then the path
_NONCE = slice(8, 24)  # the guard table header: magic (8 bytes), then the 16-byte instance nonce
_U64 = np.uint64


def _mapping_address(mm: mmap.mmap) -> int:
    obj = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(obj)
    del obj  # release the buffer export so the mapping can be closed later
    return addr


def _open_map(path: str, dev: int, ino: int, size: int, writable: bool) -> mmap.mmap:
    """Map a peer's segment after checking it is the file the peer described (device and inode)."""
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as exc:
        raise ConnectFailed(f"cannot open the peer's segment {path}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (dev, ino):
            raise ConnectFailed(f"{path} is not the peer's segment here (another namespace?)")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, prot=prot)
    except (OSError, ValueError) as exc:
        raise ConnectFailed(f"cannot map the peer's segment {path}: {exc}") from exc
    finally:
        os.close(fd)


class ShmChannel(Channel):
    """The peer's guard table (mapped read-only), its shared regions and our lazy mappings of them."""

    def __init__(self, peer: PeerInfo, pid: int, guards: mmap.mmap, guards_addr: int, guards_size: int) -> None:
        super().__init__(peer)
        self.pid = pid
        self._guards: Optional[mmap.mmap] = guards
        self._words = np.frombuffer(guards, dtype=_U64)  # read-only view of the peer's guard table
        self._peer_guards = guards_addr
        self._guards_size = guards_size
        self._maps: Dict[Tuple[int, int], Tuple[mmap.mmap, int]] = {}  # (dev, ino) -> (map, addr)
        self._lock = threading.Condition()
        self._busy = 0
        self._entries: List[Tuple[int, int, int, int, int, int, str]] = []  # addr, nbytes, dev, ino, offset, size, path
        self._starts: List[int] = []  # the regions' [start, end), sorted
        self._ends: List[int] = []
        self._deltas: List[int] = []  # once mapped: local = remote + delta
        self._mapped: List[bool] = []

    def learn(self, regions: Sequence[RemoteRegion]) -> None:
        entries = []
        for region in regions:
            desc = region.descriptor
            if len(desc) <= _REGION.size:
                continue
            dev, ino, offset, size = _REGION.unpack(desc[:_REGION.size])
            try:
                path = desc[_REGION.size:].decode()
            except UnicodeDecodeError:
                continue
            if offset + region.nbytes > size:
                continue
            entries.append((region.addr, region.nbytes, dev, ino, offset, size, path))
        entries.sort()
        with self._lock:
            self._entries = entries
            self._starts = [e[0] for e in entries]
            self._ends = [e[0] + e[1] for e in entries]
            self._deltas = [0] * len(entries)
            self._mapped = [False] * len(entries)

    def _map_entry(self, k: int) -> None:
        addr, _nbytes, dev, ino, offset, size, path = self._entries[k]
        key = (dev, ino)
        if key not in self._maps:
            mm = _open_map(path, dev, ino, size, writable=True)
            self._maps[key] = (mm, _mapping_address(mm))
        base = self._maps[key][1]
        self._deltas[k] = base + offset - addr
        self._mapped[k] = True

    def mapped(self, plan: CopyPlan) -> bool:
        """Whether every remote range of the plan lies in one shared region; maps those regions on first use."""
        with self._lock:
            if self._guards is None:
                raise TransportClosed("shm channel is closed")
            used = plan.remote_regions(self._starts, self._ends)
            if used is None:
                return False
            for k in used:
                if not self._mapped[k]:
                    self._map_entry(k)
            return True

    def translate(self, plan: CopyPlan) -> Optional[CopyPlan]:
        """The plan with its remote addresses in our mappings of the peer's segments; None if not all are
        shared."""
        with self._lock:
            if not self.mapped(plan):
                return None
            return plan.remote_moved(self._starts, self._deltas)

    def guards_hold(self, plan: CopyPlan) -> bool:
        """Each guard of the plan holds its value in our mapping of the peer's guard table."""
        words = self._words
        for guard in plan.guards:
            offset = guard.addr - self._peer_guards
            if offset % 8 or not 0 <= offset < words.shape[0] * 8:
                return False
            if int(words[offset // 8]) != guard.value:
                return False
        return True

    def enter(self) -> None:
        """Count an in-flight copy (mappings stay until it leaves)."""
        with self._lock:
            if self._guards is None:
                raise TransportClosed("shm channel is closed")
            self._busy += 1

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()

    def close(self) -> None:
        """Unmap the peer's segments and guard table, after in-flight copies finish (idempotent)."""
        with self._lock:
            if self._guards is None:
                return
            self._lock.wait_for(lambda: self._busy == 0, timeout=30.0)
            for mm, _ in self._maps.values():
                mm.close()
            self._maps.clear()
            self._words = np.zeros(0, dtype=_U64)
            self._guards.close()
            self._guards = None
            self._starts, self._ends = [], []


class ShmTransport(Transport):
    """Copies between our memory and the peer's shared segments mapped into this process."""

    name = "shm"
    priority = 70
    caps = Capabilities(memory_kinds=frozenset({HOST}), locality=SAME_HOST, one_sided=True, partial=True)

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        parallel.acquire_helpers()  # split copies' helper threads live while this transport does
        self._lock = threading.Lock()
        self._channels: List[ShmChannel] = []
        self._info = b""
        self._closed = False

    @classmethod
    def unavailable_reason(cls) -> str:
        """Linux with memfd_create and /proc. Never raises."""
        if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
            return "needs Linux memfd_create and /proc"
        return ""

    def register(self, region: Region) -> bytes:
        """A region in a shareable segment gets a descriptor (path, device, inode, offset); others b""."""
        segment = region.segment
        if segment is None:
            return b""
        if not region.writable and region.addr == getattr(self.ctx.guards, "addr", None):
            self._info = _INFO.pack(_INFO_MAGIC, os.getpid(), region.addr, region.nbytes, segment.dev,
                                    segment.ino) + segment.path.encode()
            return b""
        return _REGION.pack(segment.dev, segment.ino, segment.offset, segment.size) + segment.path.encode()

    def local_info(self) -> bytes:
        """Descriptor: ``<4sQQQQQ`` (b"SHM2", pid, guard table address, size, device, inode) + its path."""
        return self._info

    def can_reach(self, peer: PeerInfo) -> bool:
        return len(peer.descriptor) > _INFO.size and peer.descriptor[:4] == _INFO_MAGIC and len(peer.nonce) == 16

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Map the peer's guard table read-only and check its nonce (the peer's identity).

        Raises:
            ConnectFailed: bad descriptor, the table cannot be opened here, or it is not the peer's.
        """
        if self._closed:
            raise ConnectFailed("shm transport is closed")
        desc = peer.descriptor
        if not self.can_reach(peer):
            raise ConnectFailed("not an shm descriptor")
        _magic, pid, addr, size, dev, ino = _INFO.unpack(desc[:_INFO.size])
        try:
            path = desc[_INFO.size:].decode()
        except UnicodeDecodeError as exc:
            raise ConnectFailed("bad shm descriptor") from exc
        mm = _open_map(path, dev, ino, size, writable=False)
        if bytes(mm[_NONCE]) != peer.nonce:
            mm.close()
            raise ConnectFailed(f"{path} is not the peer's guard table here (another pid namespace?)")
        channel = ShmChannel(peer, pid, mm, addr, size)
        with self._lock:
            self._channels.append(channel)
        return channel

    def learn(self, channel: Channel, regions: Sequence[RemoteRegion]) -> None:
        if isinstance(channel, ShmChannel):
            channel.learn(regions)

    def covers(self, channel: Channel, plan: CopyPlan) -> bool:
        """True only if every remote range lies inside one of the peer's shared regions."""
        if not isinstance(channel, ShmChannel):
            return False
        try:
            return channel.mapped(plan)
        except Exception:  # noqa: BLE001 - covers() answers, it does not fail
            return False

    def _run(self, channel: Channel, plan: CopyPlan, deadline: float, push: bool) -> None:
        if not isinstance(channel, ShmChannel):
            raise ConnectFailed("not an shm channel")
        if self._closed:
            raise TransportClosed("shm transport is closed")
        channel.enter()
        try:
            mapped = channel.translate(plan)
            if mapped is None:
                raise RemoteRejected("range outside the peer's shared regions")
            if not channel.guards_hold(plan):
                raise StaleMemory("the peer released that cache")
            # Small pieces: process_vm_readv on our own pid (1024 per call, GIL released, so two threads
            # scale); large pieces: memmove, faster on the 4 KiB pages of shared segments. Every range
            # was translated into a mapped segment above, so memmove can not fault.
            small = plan.total_bytes < SMALL_PIECE_BYTES * len(plan)
            copies.copy(mapped.swapped() if push else mapped, deadline, checked=small,
                        threads=parallel.COPY_THREADS)
            if not push and not channel.guards_hold(plan):
                raise StaleMemory("the peer released that cache during the copy")
        finally:
            channel.leave()

    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy from the peer's mapped segments to local ``plan.local[i]``, guards checked before and after.

        Raises:
            RemoteRejected: a remote range is not inside a shared region.
            StaleMemory: a guard changed (the peer released that cache).
            TransportClosed: the peer is gone or the channel is closed.
            TransferTimeout: the deadline passed.
        """
        self._run(channel, plan, deadline, push=False)

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy local ``plan.local[i]`` into the peer's mapped segments (under the engine's write grant)."""
        self._run(channel, plan, deadline, push=True)

    def disconnect(self, channel: Channel) -> None:
        """Unmap the peer's segments (idempotent)."""
        channel.close()
        with self._lock:
            if channel in self._channels:
                self._channels.remove(channel)

    def close(self) -> None:
        """Close every channel (idempotent)."""
        with self._lock:
            channels, self._channels = self._channels, []
            first = not self._closed
            self._closed = True
        if first:
            parallel.release_helpers()
        for channel in channels:
            channel.close()
