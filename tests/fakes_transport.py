"""Recording transports for engine-level tests: in-process, real copies, every plan and call recorded."""
from __future__ import annotations

import ctypes
import os
import threading
import weakref
from typing import Callable, List, Optional

from llm_datadist._transport import copies, register_transport, transport_names
from llm_datadist._transport.ranges import RangeTable
from llm_datadist._transport.base import (HOST, PROCESS, Capabilities, Channel, ConnectFailed, CopyPlan, PeerInfo,
                                          Region, RemoteRejected, StaleMemory, Transport, TransportContext)

LOG: List[tuple] = []  # (transport name, "read" | "write" | "connect" | "learn", details)
_LOCK = threading.Lock()
_LIVE: weakref.WeakValueDictionary[bytes, RecordingTransport] = weakref.WeakValueDictionary()
ON_WRITE: List[Callable[[CopyPlan], None]] = []  # hooks run inside write(), before the bytes move


def record(*entry) -> None:
    with _LOCK:
        LOG.append(entry)


class _Channel(Channel):
    def __init__(self, peer: PeerInfo, target: RecordingTransport) -> None:
        super().__init__(peer)
        self.target = target


class RecordingTransport(Transport):
    """Like loopback (same process, memcpy, the peer's ranges and guards checked) but records everything."""

    name = "recording"
    priority = 50
    caps = Capabilities(memory_kinds=frozenset({HOST}), locality=PROCESS, one_sided=True)

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        self._token = os.urandom(8)
        self._table = RangeTable()
        self.pooled = RangeTable()  # regions that lie in a shareable segment
        _LIVE[self._token] = self

    def register(self, region: Region) -> bytes:
        self._table.add(region.addr, region.nbytes)
        if region.segment is not None:
            self.pooled.add(region.addr, region.nbytes)
        return b"pooled" if region.segment is not None else b""

    def deregister(self, region: Region) -> None:
        self._table.remove(region.addr, region.nbytes)
        if region.segment is not None:
            self.pooled.remove(region.addr, region.nbytes)

    def local_info(self) -> bytes:
        return self._token

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        target = _LIVE.get(peer.descriptor)
        if target is None:
            raise ConnectFailed("no such recording instance in this process")
        record(self.name, "connect", peer.cluster_id)
        return _Channel(peer, target)

    def learn(self, channel: Channel, regions) -> None:
        record(self.name, "learn", len(regions))

    def _check(self, channel: Channel, plan: CopyPlan) -> RecordingTransport:
        target = channel.target  # type: ignore[attr-defined]
        if not target._table.contains(plan.remote, plan.sizes):
            raise RemoteRejected("outside the peer's registered memory")
        if not all(ctypes.c_uint64.from_address(g.addr).value == g.value for g in plan.guards):
            raise StaleMemory("guard changed")
        return target

    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        self._check(channel, plan)
        record(self.name, "read", plan)
        copies.local_copy(plan.local, plan.remote, plan.sizes, deadline)

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        self._check(channel, plan)
        record(self.name, "write", plan)
        for hook in list(ON_WRITE):
            hook(plan)
        copies.local_copy(plan.remote, plan.local, plan.sizes, deadline)

    def close(self) -> None:
        _LIVE.pop(self._token, None)


class PartialRecordingTransport(RecordingTransport):
    """A partial route in front (like shm): covers only plans whose remote ranges are pooled memory."""

    name = "recording_partial"
    priority = 70
    caps = Capabilities(memory_kinds=frozenset({HOST}), locality=PROCESS, one_sided=True, partial=True)

    def covers(self, channel: Channel, plan: CopyPlan) -> bool:
        return channel.target.pooled.contains(plan.remote, plan.sizes)  # type: ignore[attr-defined]


class CudaOnlyTransport(RecordingTransport):
    """Moves device memory only: a host plan must find no route over it."""

    name = "recording_cuda"
    caps = Capabilities(memory_kinds=frozenset({"cuda"}), locality=PROCESS, one_sided=True)


def install() -> None:
    """Register the three fakes with the transport registry (once per process)."""
    for cls in (RecordingTransport, PartialRecordingTransport, CudaOnlyTransport):
        if cls.name not in transport_names():
            register_transport(cls.name, f"fakes_transport:{cls.__name__}")


def uninstall() -> None:
    """Take the fakes out of the registry again, so tests after this one see only the real transports."""
    from llm_datadist._transport import _LOCK as registry_lock, _REGISTRY

    with registry_lock:
        for cls in (RecordingTransport, PartialRecordingTransport, CudaOnlyTransport):
            _REGISTRY.pop(cls.name, None)


def plans(kind: str, name: Optional[str] = None) -> List[CopyPlan]:
    with _LOCK:
        return [e[2] for e in LOG if e[1] == kind and (name is None or e[0] == name)]
