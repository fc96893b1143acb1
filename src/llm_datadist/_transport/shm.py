"""Same-host transport over shared segments: a peer maps our segments and copies with memcpy-class speed."""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from llm_datadist._transport import iov
from llm_datadist._transport.base import (
    Channel,
    ConnectFailed,
    CopyPlan,
    PeerInfo,
    Region,
    RemoteRejected,
    Transport,
    TransportClosed,
    TransportContext,
)

SMALL_PIECE_BYTES = 64 << 10  # below this average piece size the syscall path beats memmove

logger = logging.getLogger(__name__)

_MAGIC = b"SHM1"
_DESC = struct.Struct("<4sQ")  # magic, pid; then the index segment path (utf-8)
_INDEX_MAGIC = b"LDSHMIX1"
_HEADER = struct.Struct("<8sQQQ")  # magic, seqlock counter (odd while writing), count, capacity
_HEADER_BYTES = 64
_NAME_BYTES = 128
_CAPACITY = 4096
ENTRY = np.dtype([("addr", "<u8"), ("nbytes", "<u8"), ("offset", "<u8"), ("dev", "<u8"),
                  ("ino", "<u8"), ("name", f"S{_NAME_BYTES}")])
_INDEX_BYTES = _HEADER_BYTES + ENTRY.itemsize * _CAPACITY


def _mapping_address(mm: mmap.mmap) -> int:
    obj = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(obj)
    del obj  # release the buffer export so the mapping can be closed later
    return addr


class _Index:
    """Our published list of shared regions: a memfd the peers map read-only (seqlock-protected)."""

    def __init__(self) -> None:
        self._fd = os.memfd_create("llm_datadist-shm-index", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, _INDEX_BYTES)
        self._mm: Optional[mmap.mmap] = mmap.mmap(self._fd, _INDEX_BYTES)
        self._entries: List[tuple] = []
        self._seq = 0
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"
        self._publish()

    def _publish(self) -> None:
        mm = self._mm
        if mm is None:
            return
        self._seq += 1  # odd: readers retry
        mm[:_HEADER.size] = _HEADER.pack(_INDEX_MAGIC, self._seq, len(self._entries), _CAPACITY)
        table = np.array(self._entries, dtype=ENTRY)
        mm[_HEADER_BYTES:_HEADER_BYTES + table.nbytes] = table.tobytes()
        self._seq += 1
        mm[:_HEADER.size] = _HEADER.pack(_INDEX_MAGIC, self._seq, len(self._entries), _CAPACITY)

    def add(self, region: Region) -> None:
        try:
            st = os.stat(region.shm_name)
        except (OSError, TypeError, ValueError):
            logger.debug("shm segment %r not found; region not shared", region.shm_name)
            return
        name = os.fsencode(region.shm_name)
        if len(name) >= _NAME_BYTES or len(self._entries) >= _CAPACITY:
            logger.debug("shm index cannot hold %r", region.shm_name)
            return
        self._entries.append((region.addr, region.nbytes, region.shm_offset, st.st_dev, st.st_ino, name))
        self._publish()

    def remove(self, region: Region) -> None:
        for i, entry in enumerate(self._entries):
            if entry[0] == region.addr and entry[1] == region.nbytes:
                del self._entries[i]
                self._publish()
                return

    def close(self) -> None:
        if self._mm is not None:
            self._entries = []
            self._publish()
            self._mm.close()
            self._mm = None
            os.close(self._fd)


def read_index(mm: mmap.mmap) -> Tuple[int, np.ndarray]:
    """A consistent snapshot ``(seq, entries)`` of a peer's index."""
    for _ in range(10000):
        magic, seq, count, cap = _HEADER.unpack(mm[:_HEADER.size])
        if magic != _INDEX_MAGIC or count > cap or cap > _CAPACITY:
            raise ConnectFailed("bad shm index segment")
        if seq & 1:
            time.sleep(0)
            continue
        table = np.frombuffer(mm[_HEADER_BYTES:_HEADER_BYTES + count * ENTRY.itemsize], dtype=ENTRY)
        if _HEADER.unpack(mm[:_HEADER.size])[1] == seq:
            return seq, table
    raise ConnectFailed("shm index keeps changing")


class ShmChannel(Channel):
    """The peer's index, our mappings of its segments, and a lookup table of its shared regions."""

    def __init__(self, peer: PeerInfo, pid: int, index: mmap.mmap) -> None:
        super().__init__(peer)
        self.pid = pid
        self._index: Optional[mmap.mmap] = index
        self._seq = -1
        self._maps: Dict[Tuple[int, int], Tuple[mmap.mmap, int]] = {}  # (dev, ino) -> (map, addr)
        self._lock = threading.Condition()
        self._busy = 0
        self._starts = np.zeros(0, dtype=np.uint64)
        self._ends = np.zeros(0, dtype=np.uint64)
        self._table = np.zeros(0, dtype=ENTRY)
        self._delta = np.zeros(0, dtype=np.uint64)  # local = remote + delta (mod 2**64)
        self._mapped = np.zeros(0, dtype=bool)

    def _refresh(self) -> None:
        if self._index is None:
            raise TransportClosed("shm channel is closed")
        seq = _HEADER.unpack(self._index[:_HEADER.size])[1]
        if seq == self._seq:
            return
        seq, table = read_index(self._index)
        order = np.argsort(table["addr"], kind="stable")
        self._table = table[order]
        self._starts = self._table["addr"].astype(np.uint64)
        self._ends = self._starts + self._table["nbytes"]
        self._delta = np.zeros(len(order), dtype=np.uint64)
        self._mapped = np.zeros(len(order), dtype=bool)
        self._seq = seq

    def _map_entry(self, k: int) -> None:
        entry = self._table[k]
        key = (int(entry["dev"]), int(entry["ino"]))
        if key not in self._maps:
            try:
                fd = os.open(os.fsdecode(bytes(entry["name"])), os.O_RDWR)
            except OSError as exc:
                raise TransportClosed(f"cannot open peer segment: {exc}") from exc
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != key:
                    raise TransportClosed("peer segment was replaced")
                mm = mmap.mmap(fd, st.st_size)
            except (OSError, ValueError) as exc:
                raise TransportClosed(f"cannot map peer segment: {exc}") from exc
            finally:
                os.close(fd)
            self._maps[key] = (mm, _mapping_address(mm))
        base = self._maps[key][1]
        self._delta[k] = np.uint64((base + int(entry["offset"]) - int(entry["addr"])) % (1 << 64))
        self._mapped[k] = True

    def translate(self, remote: np.ndarray, sizes: np.ndarray) -> Optional[np.ndarray]:
        """Local addresses of remote ranges, mapping segments on first use; None if not all shared."""
        with self._lock:
            self._refresh()
            if self._starts.shape[0] == 0:
                return None
            idx = np.searchsorted(self._starts, remote, side="right").astype(np.int64) - 1
            if (idx < 0).any():
                return None
            ends = self._ends[idx]
            if ((remote > ends) | (sizes > ends - np.minimum(remote, ends))).any():
                return None
            used = np.unique(idx)
            for k in used[~self._mapped[used]].tolist():
                self._map_entry(k)
            return remote + self._delta[idx]

    def enter(self) -> None:
        """Count an in-flight copy (mappings stay until it leaves)."""
        with self._lock:
            if self._index is None:
                raise TransportClosed("shm channel is closed")
            self._busy += 1

    def leave(self) -> None:
        """End of an in-flight copy."""
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()

    def close(self) -> None:
        """Unmap the peer's segments and index, after in-flight copies finish (idempotent)."""
        with self._lock:
            if self._index is None:
                return
            self._lock.wait_for(lambda: self._busy == 0, timeout=30.0)
            for mm, _ in self._maps.values():
                mm.close()
            self._maps.clear()
            self._index.close()
            self._index = None
            self._starts = np.zeros(0, dtype=np.uint64)


class ShmTransport(Transport):
    """Copies between our memory and the peer's shared segments mapped into this process."""

    name = "shm"
    priority = 70
    same_host_only = True

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        self._lock = threading.Lock()
        self._index: Optional[_Index] = _Index()
        self._channels: "List[ShmChannel]" = []

    @classmethod
    def available(cls) -> bool:
        """True on Linux with memfd_create. Never raises."""
        return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")

    def register(self, region: Region) -> None:
        """Publish a region that lies in a shared segment (``region.shm_name``); others are ignored.

        Args:
            region: The range; ``shm_name`` is a path peers can ``os.open`` and ``shm_offset`` the
                offset of ``region.addr`` in that segment.
        """
        if region.shm_name and self._index is not None:
            with self._lock:
                self._index.add(region)

    def deregister(self, region: Region) -> None:
        """Withdraw a published region; unknown regions are ignored.

        Args:
            region: A region passed to ``register`` before.
        """
        if self._index is not None:
            with self._lock:
                self._index.remove(region)

    def local_info(self) -> bytes:
        """Descriptor: ``<4sQ`` (b"SHM1", pid) followed by the utf-8 path of our index segment."""
        path = self._index.path if self._index is not None else ""
        return _DESC.pack(_MAGIC, os.getpid()) + path.encode()

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Map the peer's index segment; its shared regions are mapped lazily on first use.

        Args:
            peer: Handshake information; ``peer.descriptor`` is the peer's ``local_info()``.
            deadline: Unused.

        Returns:
            A ShmChannel.

        Raises:
            ConnectFailed: bad descriptor or the index cannot be opened (other host, permissions).
        """
        desc = peer.descriptor
        if self._index is None:
            raise ConnectFailed("shm transport is closed")
        if len(desc) <= _DESC.size or desc[:4] != _MAGIC:
            raise ConnectFailed("not an shm descriptor")
        pid = _DESC.unpack(desc[:_DESC.size])[1]
        try:
            fd = os.open(desc[_DESC.size:].decode(), os.O_RDONLY)
            try:
                mm = mmap.mmap(fd, _INDEX_BYTES, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ConnectFailed(f"cannot map the peer's shm index: {exc}") from exc
        channel = ShmChannel(peer, pid, mm)
        try:
            read_index(mm)
        except ConnectFailed:
            channel.close()
            raise
        with self._lock:
            self._channels.append(channel)
        return channel

    def supports(self, channel: Channel, plan: CopyPlan) -> bool:
        """True only if every remote range lies inside one of the peer's shared regions."""
        if not isinstance(channel, ShmChannel):
            return False
        try:
            return channel.translate(plan.remote, plan.sizes) is not None
        except Exception:  # noqa: BLE001 - supports() answers, it does not fail
            return False

    def _run(self, channel: Channel, plan: CopyPlan, deadline: float, push: bool) -> None:
        if not isinstance(channel, ShmChannel):
            raise ConnectFailed("not an shm channel")
        if self._index is None:
            raise TransportClosed("shm transport is closed")
        try:
            os.kill(channel.pid, 0)
        except ProcessLookupError as exc:
            raise TransportClosed(f"peer pid {channel.pid} is gone") from exc
        except PermissionError:
            pass
        channel.enter()
        try:
            mapped = channel.translate(plan.remote, plan.sizes)
            if mapped is None:
                raise RemoteRejected("range outside the peer's shared regions")
            copy = CopyPlan(mapped, plan.local, plan.sizes) if push else CopyPlan(plan.local, mapped, plan.sizes)
            # Small pieces: process_vm_readv on our own pid (1024 per call, GIL released, so two threads
            # scale); large pieces: memmove, faster on the 4 KiB pages of shared segments. Every range
            # was translated into a mapped segment above, so memmove can not fault.
            small = plan.total_bytes < SMALL_PIECE_BYTES * len(plan)
            iov.local_copy(copy, deadline, checked=small, threads=iov.COPY_THREADS)
        finally:
            channel.leave()

    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy from the peer's mapped segments to local ``plan.local[i]``.

        Args:
            channel: From ``connect``.
            plan: The copies; every remote range must lie in a shared region of the peer.
            deadline: ``time.monotonic()`` value, checked between 1024-op chunks.

        Raises:
            RemoteRejected: a remote range is not inside a shared region.
            TransportClosed: the peer is gone or the channel is closed.
            TransferTimeout: the deadline passed.
        """
        self._run(channel, plan, deadline, push=False)

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy local ``plan.local[i]`` into the peer's mapped segments.

        Args and errors as :meth:`read`.
        """
        self._run(channel, plan, deadline, push=True)

    def disconnect(self, channel: Channel) -> None:
        """Unmap the peer's segments (idempotent)."""
        channel.close()
        with self._lock:
            if channel in self._channels:
                self._channels.remove(channel)

    def close(self) -> None:
        """Close every channel and our index segment (idempotent)."""
        with self._lock:
            channels, self._channels = self._channels, []
            index, self._index = self._index, None
        for channel in channels:
            channel.close()
        if index is not None:
            index.close()
