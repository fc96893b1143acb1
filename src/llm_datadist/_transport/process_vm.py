"""Same-host transport over process_vm_readv/writev: one-sided, 1024 ops per system call, guards in the batch."""
from __future__ import annotations

import logging
import os
import struct
from typing import List, Optional, Tuple

from llm_datadist._transport import parallel, ptrace, pvm
from llm_datadist._transport.base import (
    HOST,
    SAME_HOST,
    Capabilities,
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

_MAGIC = b"PVM2"
_DESC = struct.Struct("<4sQQ")  # magic, pid, address of the instance's guard table (its header holds the nonce)
_NONCE_OFFSET = 8  # the guard table header: 8 bytes of magic, then the 16-byte instance nonce
_NONCE_BYTES = 16
_TOP = 1 << 62


def _parse(descriptor: bytes) -> Optional[Tuple[int, int]]:
    if len(descriptor) != _DESC.size:
        return None
    magic, pid, table = _DESC.unpack(descriptor)
    return (int(pid), int(table)) if magic == _MAGIC else None


def check_plan(plan: CopyPlan) -> None:
    """Reject plans that can never be valid (NULL addresses, address overflow)."""
    bad = plan.first_invalid(_TOP)
    if bad >= 0:
        raise RemoteRejected(f"invalid op at index {bad}")


class ProcessVmChannel(Channel):
    """A channel to a process on this host: its pid, and the identity guards read in every batch."""

    def __init__(self, peer: PeerInfo, pid: int, identity: List[Tuple[int, int]]) -> None:
        super().__init__(peer)
        self.pid = pid
        self.identity = identity  # (address, value) of the peer's nonce words: read when a plan brings no guard
        self.closed = False

    def close(self) -> None:
        """Mark the channel closed (idempotent; nothing else to release)."""
        self.closed = True


class ProcessVmTransport(Transport):
    """process_vm_readv/writev between processes of one host (same uid or ptrace permission).

    Identity: at connect the peer's instance nonce is read at the address its descriptor names and compared
    with the nonce of the handshake, so a pid that means another process here (another pid namespace, a
    reused pid) is refused. After that every read carries the plan's generation guards in the same system
    call (first and last iovec), which proves again, per batch, that the peer and its cache are still there.
    """

    name = "process_vm"
    priority = 60
    caps = Capabilities(memory_kinds=frozenset({HOST}), locality=SAME_HOST, one_sided=True)

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        parallel.acquire_helpers()  # split copies' helper threads live while this transport does
        ptrace.grant_same_user_peers()  # under Yama ptrace_scope 1, let same-user peers read us
        self._closed = False

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why process_vm_readv cannot be used here ("" when it works on our own process). Never raises."""
        try:
            return "" if pvm.self_permitted() else "process_vm_readv is not permitted in this process"
        except Exception as exc:  # noqa: BLE001 - never raises
            return f"process_vm_readv failed: {exc}"

    def local_info(self) -> bytes:
        """Descriptor: ``<4sQQ`` = (b"PVM2", pid, address of this instance's guard table)."""
        table = getattr(self.ctx.guards, "addr", 0) if self.ctx.guards is not None else 0
        return _DESC.pack(_MAGIC, os.getpid(), int(table))

    def can_reach(self, peer: PeerInfo) -> bool:
        """A process_vm descriptor with a guard table and a nonce to prove."""
        parsed = _parse(peer.descriptor)
        return parsed is not None and parsed[1] != 0 and len(peer.nonce) == _NONCE_BYTES

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Read the peer's nonce with process_vm_readv and compare it with the handshake's.

        Raises:
            ConnectFailed: bad descriptor, no permission, process gone, or another process behind that pid.
        """
        if self._closed:
            raise ConnectFailed("process_vm transport is closed")
        parsed = _parse(peer.descriptor)
        if parsed is None or len(peer.nonce) != _NONCE_BYTES:
            raise ConnectFailed("not a process_vm descriptor")
        pid, table = parsed
        try:
            seen = pvm.peek(pid, table + _NONCE_OFFSET, _NONCE_BYTES)
        except TransportError as exc:
            raise ConnectFailed(f"process_vm_readv of pid {pid} is not permitted ({exc}); fix: "
                                f"{ptrace.refusal_hint()}") from exc
        if seen != peer.nonce:
            raise ConnectFailed(f"pid {pid} here is not the peer (another pid namespace or a reused pid)")
        words = struct.unpack("=QQ", peer.nonce)
        identity = [(table + _NONCE_OFFSET, words[0]), (table + _NONCE_OFFSET + 8, words[1])]
        logger.debug("process_vm channel to pid %d", pid)
        return ProcessVmChannel(peer, pid, identity)

    def _channel(self, channel: Channel, plan: CopyPlan) -> ProcessVmChannel:
        if self._closed:
            raise TransportClosed("process_vm transport is closed")
        if not isinstance(channel, ProcessVmChannel):
            raise ConnectFailed("not a process_vm channel")
        if channel.closed:
            raise TransportClosed("process_vm channel is closed")
        check_plan(plan)
        return channel

    @staticmethod
    def _guard_words(ch: ProcessVmChannel, plan: CopyPlan) -> List[Tuple[int, int]]:
        """(address, value) of the words every call reads: the plan's guards, else the peer's nonce."""
        if not plan.guards:
            return ch.identity
        return [(g.addr, g.value) for g in plan.guards]

    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy peer ``plan.remote[i]`` to local ``plan.local[i]`` with process_vm_readv.

        Every call reads the plan's guards first and last; plans of parallel.PARALLEL_MIN_BYTES or more are
        split across ``parallel.COPY_THREADS`` threads.

        Raises:
            RemoteRejected: invalid or unmapped address.
            StaleMemory: a guard did not match (the peer released or replaced that cache).
            TransportClosed: the peer process is gone or the channel is closed.
            TransferTimeout: the deadline passed.
        """
        ch = self._channel(channel, plan)
        pid, guards = ch.pid, self._guard_words(ch, plan)
        try:
            if pvm.compiled():
                pvm.rw_whole(False, pid, plan.merged(), deadline, guards, parallel.COPY_THREADS,
                             parallel.SPLIT_BYTES_PER_THREAD)
            else:
                parallel.run_split(plan.merged(), parallel.COPY_THREADS,
                                   lambda part: pvm.read(pid, part, deadline, guards))
        except ConnectFailed as exc:  # permission lost after connect: treat as a dead link
            raise TransportClosed(str(exc)) from exc

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Copy local ``plan.local[i]`` to peer ``plan.remote[i]`` with process_vm_writev.

        The engine holds a write grant (the owner cannot release the caches meanwhile); the guards are read
        once before writing, to be sure the pid is still the peer. Errors as :meth:`read`.
        """
        ch = self._channel(channel, plan)
        pid = ch.pid
        try:
            pvm.check_guards(pid, self._guard_words(ch, plan), deadline)
            if pvm.compiled():
                pvm.rw_whole(True, pid, plan.merged(), deadline, (), parallel.COPY_THREADS,
                             parallel.SPLIT_BYTES_PER_THREAD)
            else:
                parallel.run_split(plan.merged(), parallel.COPY_THREADS, lambda part: pvm.write(pid, part, deadline))
        except ConnectFailed as exc:
            raise TransportClosed(str(exc)) from exc

    def close(self) -> None:
        """Stop serving channels (idempotent)."""
        if not self._closed:
            self._closed = True
            parallel.release_helpers()
