"""Loopback transport: two instances inside one process copy memory directly, peer regions and guards checked."""
from __future__ import annotations

import ctypes
import os
import struct
import threading
import weakref
from typing import Optional, Sequence

from llm_datadist._transport import copies, parallel, ranges
from llm_datadist._transport.base import (
    HOST,
    PROCESS,
    Capabilities,
    Channel,
    ConnectFailed,
    CopyPlan,
    Guard,
    PeerInfo,
    Region,
    RemoteRejected,
    StaleMemory,
    Transport,
    TransportClosed,
    TransportContext,
)

_MAGIC = b"LBK1"
_DESC = struct.Struct("<4sQ16s")  # magic, pid, token

_DIRECTORY: weakref.WeakValueDictionary[bytes, LoopbackTransport] = weakref.WeakValueDictionary()
_DIR_LOCK = threading.Lock()


def _parse(descriptor: bytes) -> Optional[tuple]:
    if len(descriptor) != _DESC.size:
        return None
    magic, pid, token = _DESC.unpack(descriptor)
    return (pid, token) if magic == _MAGIC else None


def _guards_hold(guards: Sequence[Guard]) -> bool:
    """Each guard word (in this process) holds its expected value."""
    return all(ctypes.c_uint64.from_address(g.addr).value == g.value for g in guards)


class LoopbackChannel(Channel):
    """A channel to another transport instance of this process."""

    def __init__(self, peer: PeerInfo, target: LoopbackTransport) -> None:
        super().__init__(peer)
        self._target: Optional[LoopbackTransport] = target

    def target(self) -> LoopbackTransport:
        """The serving instance; TransportClosed once the channel or the peer is closed."""
        target = self._target
        if target is None:
            raise TransportClosed("loopback channel is closed")
        if target.closed:
            raise TransportClosed("loopback peer is closed")
        return target

    def close(self) -> None:
        """Drop the reference to the peer (idempotent)."""
        self._target = None


class LoopbackTransport(Transport):
    """Same-process transport: vectorised local copies, the serving side's regions re-validated."""

    name = "loopback"
    priority = 100
    caps = Capabilities(memory_kinds=frozenset({HOST}), locality=PROCESS, one_sided=True)

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        parallel.acquire_helpers()  # split copies' helper threads live while this transport does
        self._token = os.urandom(16)
        self._readable = ranges.RangeTable()
        self._writable = ranges.RangeTable()
        self.closed = False
        with _DIR_LOCK:
            _DIRECTORY[self._token] = self

    def register(self, region: Region) -> bytes:
        """Expose a region to peer instances of this process (writable ones for writes too)."""
        self._readable.add(region.addr, region.nbytes)
        if region.writable:
            self._writable.add(region.addr, region.nbytes)
        return b""

    def deregister(self, region: Region) -> None:
        """Stop exposing a region; unknown regions are ignored."""
        self._readable.remove(region.addr, region.nbytes)
        if region.writable:
            self._writable.remove(region.addr, region.nbytes)

    def local_info(self) -> bytes:
        """Descriptor: ``<4sQ16s`` = (b"LBK1", pid, 16-byte token of this instance)."""
        return _DESC.pack(_MAGIC, os.getpid(), self._token)

    def can_reach(self, peer: PeerInfo) -> bool:
        """True when the peer's descriptor names a live instance in this process."""
        parsed = _parse(peer.descriptor)
        if parsed is None or parsed[0] != os.getpid():
            return False
        return parsed[1] in _DIRECTORY

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Find the peer instance in the process-local directory (ConnectFailed if it is not there)."""
        if self.closed:
            raise ConnectFailed("loopback transport is closed")
        parsed = _parse(peer.descriptor)
        if parsed is None:
            raise ConnectFailed("not a loopback descriptor")
        pid, token = parsed
        if pid != os.getpid():
            raise ConnectFailed(f"loopback peer lives in process {pid}, not this one")
        target = _DIRECTORY.get(token)
        if target is None or target.closed:
            raise ConnectFailed("loopback peer instance not found")
        return LoopbackChannel(peer, target)

    def _checked_target(self, channel: Channel, plan: CopyPlan, write: bool) -> LoopbackTransport:
        if self.closed:
            raise TransportClosed("loopback transport is closed")
        if not isinstance(channel, LoopbackChannel):
            raise ConnectFailed("not a loopback channel")
        target = channel.target()
        table = target._writable if write else target._readable
        if not table.holds(plan):
            if not _guards_hold(plan.guards):  # released (guard first, then its ranges): not a caller error
                raise StaleMemory("the peer released that cache")
            raise RemoteRejected("range outside the peer's registered memory")
        return target

    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy peer ``plan.remote[i]`` to local ``plan.local[i]``, the guards checked before and after.

        Raises:
            RemoteRejected: a remote range is outside the peer's registered memory.
            StaleMemory: a guard changed (the peer released that cache).
            TransportClosed: the channel, this transport or the peer is closed.
            TransferTimeout: the deadline passed.
        """
        self._checked_target(channel, plan, write=False)
        if not _guards_hold(plan.guards):
            raise StaleMemory("the peer released that cache")
        copies.copy(plan, deadline, threads=parallel.COPY_THREADS)
        if not _guards_hold(plan.guards):
            raise StaleMemory("the peer released that cache during the copy")

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy local ``plan.local[i]`` to peer ``plan.remote[i]`` (the engine holds a write grant).

        Args and errors as :meth:`read`; only ranges of writable regions are accepted.
        """
        self._checked_target(channel, plan, write=True)
        if not _guards_hold(plan.guards):
            raise StaleMemory("the peer released that cache")
        copies.copy(plan.swapped(), deadline, threads=parallel.COPY_THREADS)

    def close(self) -> None:
        """Leave the directory; channels to this instance fail with TransportClosed (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._readable.clear()
        self._writable.clear()
        with _DIR_LOCK:
            _DIRECTORY.pop(self._token, None)
        parallel.release_helpers()

