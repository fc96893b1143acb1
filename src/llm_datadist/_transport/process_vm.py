"""Same-host transport over process_vm_readv/writev: one-sided, 1024 ops per syscall."""
from __future__ import annotations

import ctypes
import logging
import os
import struct
from typing import Optional

import numpy as np

from llm_datadist._transport import iov
from llm_datadist._transport.base import (
    Channel,
    ConnectFailed,
    CopyPlan,
    PeerInfo,
    RemoteRejected,
    Transport,
    TransportClosed,
    TransportContext,
    TransportError,
)

logger = logging.getLogger(__name__)

_MAGIC = b"PVM1"
_NONCE_BYTES = 16
_DESC = struct.Struct("<4sQQ16s")  # magic, pid, probe address, nonce stored at the probe address


def _parse(descriptor: bytes) -> Optional[tuple]:
    if len(descriptor) != _DESC.size:
        return None
    magic, pid, probe, nonce = _DESC.unpack(descriptor)
    return (int(pid), int(probe), nonce) if magic == _MAGIC else None


def check_plan(plan: CopyPlan) -> None:
    """Reject plans that can never be valid (NULL addresses, address overflow)."""
    if len(plan) == 0:
        return
    top = np.uint64(1 << 62)
    bad = (plan.remote == 0) | (plan.local == 0) | (plan.sizes >= top)
    bad |= (plan.remote >= top) | (plan.local >= top)
    if bad.any():
        raise RemoteRejected(f"invalid op at index {int(np.flatnonzero(bad)[0])}")


class ProcessVmChannel(Channel):
    """A channel to a process on this host: its pid and the probe that proves its identity."""

    def __init__(self, peer: PeerInfo, pid: int, probe: int, nonce: bytes) -> None:
        super().__init__(peer)
        self.pid = pid
        self.probe = probe
        self.nonce = nonce
        self.closed = False

    def close(self) -> None:
        """Mark the channel closed (idempotent; nothing else to release)."""
        self.closed = True


class ProcessVmTransport(Transport):
    """process_vm_readv/writev between processes of one host (same uid or ptrace permission)."""

    name = "process_vm"
    priority = 60
    same_host_only = True

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        self._nonce = os.urandom(_NONCE_BYTES)
        self._probe = ctypes.create_string_buffer(self._nonce, _NONCE_BYTES)
        self._closed = False

    @classmethod
    def available(cls) -> bool:
        """True when process_vm_readv exists and works on our own process. Never raises."""
        try:
            return iov.self_pvm_permitted()
        except Exception:  # noqa: BLE001 - available() never raises
            return False

    def local_info(self) -> bytes:
        """Descriptor: ``<4sQQ16s`` = (b"PVM1", pid, probe address, 16-byte nonce at that address)."""
        return _DESC.pack(_MAGIC, os.getpid(), ctypes.addressof(self._probe), self._nonce)

    def can_reach(self, peer: PeerInfo) -> bool:
        """Same host and a process_vm descriptor."""
        return super().can_reach(peer) and _parse(peer.descriptor) is not None

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Probe the peer once: read its nonce with process_vm_readv and compare.

        Args:
            peer: Handshake information; ``peer.descriptor`` is the peer's ``local_info()``.
            deadline: Unused (the probe is one syscall).

        Returns:
            A ProcessVmChannel.

        Raises:
            ConnectFailed: bad descriptor, no permission, process gone, or another process behind
                that pid (different pid namespace).
        """
        if self._closed:
            raise ConnectFailed("process_vm transport is closed")
        parsed = _parse(peer.descriptor)
        if parsed is None:
            raise ConnectFailed("not a process_vm descriptor")
        pid, probe, nonce = parsed
        try:
            seen = iov.pvm_peek(pid, probe, _NONCE_BYTES)
        except TransportError as exc:
            raise ConnectFailed(f"process_vm_readv not permitted on pid {pid}: {exc}") from exc
        if seen != nonce:
            raise ConnectFailed(f"pid {pid} is not the expected peer (pid namespace?)")
        logger.debug("process_vm channel to pid %d", pid)
        return ProcessVmChannel(peer, pid, probe, nonce)

    def _prepare(self, channel: Channel, plan: CopyPlan) -> ProcessVmChannel:
        if self._closed:
            raise TransportClosed("process_vm transport is closed")
        if not isinstance(channel, ProcessVmChannel):
            raise ConnectFailed("not a process_vm channel")
        if channel.closed:
            raise TransportClosed("process_vm channel is closed")
        check_plan(plan)
        try:  # the pid may have been reused by another process since connect
            same = iov.pvm_peek(channel.pid, channel.probe, _NONCE_BYTES) == channel.nonce
        except TransportError as exc:
            raise TransportClosed(f"peer pid {channel.pid} is gone: {exc}") from exc
        if not same:
            raise TransportClosed(f"peer pid {channel.pid} is gone (probe changed)")
        return channel

    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy peer ``plan.remote[i]`` to local ``plan.local[i]`` with process_vm_readv.

        Contiguous runs are merged first; one syscall moves up to 1024 ops; batches of 16 MiB or
        more are split across ``iov.COPY_THREADS`` threads.

        Args:
            channel: From ``connect``.
            plan: The copies (remote ranges already bounds-checked by the engine).
            deadline: ``time.monotonic()`` value, checked between 1024-op chunks.

        Raises:
            RemoteRejected: invalid or unmapped address.
            TransportClosed: the peer process is gone or the channel is closed.
            TransferTimeout: the deadline passed.
        """
        ch = self._prepare(channel, plan)
        merged = plan.merged()
        try:
            iov.pvm_read(ch.pid, merged.local, merged.remote, merged.sizes, deadline, iov.COPY_THREADS)
        except ConnectFailed as exc:  # permission lost after connect: treat as a dead link
            raise TransportClosed(str(exc)) from exc

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy local ``plan.local[i]`` to peer ``plan.remote[i]`` with process_vm_writev.

        Args and errors as :meth:`read`.
        """
        ch = self._prepare(channel, plan)
        merged = plan.merged()
        try:
            iov.pvm_write(ch.pid, merged.local, merged.remote, merged.sizes, deadline, iov.COPY_THREADS)
        except ConnectFailed as exc:
            raise TransportClosed(str(exc)) from exc

    def close(self) -> None:
        """Invalidate the probe so peers' channels fail with TransportClosed (idempotent)."""
        if self._closed:
            return
        self._closed = True
        ctypes.memset(self._probe, 0, _NONCE_BYTES)
