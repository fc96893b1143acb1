"""Low-level vectorised copies between raw addresses: process_vm_readv/writev batches, views, range tables."""
from __future__ import annotations

import collections
import ctypes
import errno
import os
import sys
import threading
import time
from bisect import bisect_right
from typing import Callable, List, Optional, Tuple

import numpy as np

from llm_datadist._transport.base import (
    ConnectFailed,
    CopyPlan,
    RemoteRejected,
    TransferTimeout,
    TransportClosed,
    TransportError,
)

IOV_MAX = 1024  # iovecs per process_vm_* call (UIO_MAXIOV)
CHUNK_BYTES = 1 << 30  # bytes per call; the kernel truncates one call at MAX_RW_COUNT (~2 GiB)

PARALLEL_MIN_BYTES = 16 << 20  # batches at least this large are split across COPY_THREADS threads
# Threads for large batches: 2 where the machine has them; LLM_DATADIST_COPY_THREADS=1 turns the split off.
_ENV_THREADS = os.environ.get("LLM_DATADIST_COPY_THREADS", "")
COPY_THREADS = int(_ENV_THREADS) if _ENV_THREADS.isdigit() and int(_ENV_THREADS) > 0 else \
    max(1, min(2, os.cpu_count() or 1))

_U64 = np.uint64
_ADDRESS_SPACE_BYTES = min(1 << 62, sys.maxsize)  # covers 57-bit (LA57) user address spaces


def _load_libc() -> Tuple[Optional[object], Optional[object]]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        funcs = []
        for name in ("process_vm_readv", "process_vm_writev"):
            fn = getattr(libc, name)
            fn.restype = ctypes.c_ssize_t
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
            funcs.append(fn)
        return funcs[0], funcs[1]
    except (OSError, AttributeError):
        return None, None


_READV, _WRITEV = _load_libc()
_SELF_PVM: Optional[bool] = None
_SELF_LOCK = threading.Lock()

# One writable memoryview over the whole user address space; only ever sliced, never read whole.
_AS_VIEW = memoryview((ctypes.c_char * _ADDRESS_SPACE_BYTES).from_address(0)).cast("B")


def _errno_error(err: int, what: str) -> TransportError:
    """Map an errno from process_vm_* to a TransportError subclass."""
    msg = f"{what}: {os.strerror(err)} (errno {err})"
    if err == errno.ESRCH:
        return TransportClosed(msg)
    if err in (errno.EPERM, errno.EACCES, errno.ENOSYS):
        return ConnectFailed(msg)
    if err == errno.EFAULT:
        return RemoteRejected(msg)
    return TransportError(msg)


def _chunk_end(cum: np.ndarray, i: int, n: int) -> int:
    """End index of the chunk starting at ``i``: at most IOV_MAX entries and about CHUNK_BYTES bytes."""
    j = min(i + IOV_MAX, n)
    if int(cum[j]) - int(cum[i]) > CHUNK_BYTES:
        k = int(np.searchsorted(cum, cum[i] + _U64(CHUNK_BYTES), side="right")) - 1
        j = max(i + 1, min(k, j))
    return j


def _pvm_rw(func, what: str, pid: int, local: np.ndarray, remote: np.ndarray,
            sizes: np.ndarray, deadline: Optional[float]) -> int:
    """Move ``sizes[i]`` bytes between ``local[i]`` and ``remote[i]`` with one call per chunk."""
    if func is None:
        raise ConnectFailed(f"{what} is not available on this system")
    local = np.ascontiguousarray(local, dtype=_U64)
    remote = np.ascontiguousarray(remote, dtype=_U64)
    sizes = np.ascontiguousarray(sizes, dtype=_U64)
    n = int(sizes.shape[0])
    if n == 0:
        return 0
    liov = np.empty((n, 2), dtype=_U64)
    riov = np.empty((n, 2), dtype=_U64)
    liov[:, 0] = local
    liov[:, 1] = sizes
    riov[:, 0] = remote
    riov[:, 1] = sizes
    cum = np.zeros(n + 1, dtype=_U64)
    np.cumsum(sizes, out=cum[1:])
    lbase, rbase = liov.ctypes.data, riov.ctypes.data
    i, skip = 0, 0
    while i < n:
        if deadline is not None and time.monotonic() > deadline:
            raise TransferTimeout(f"{what}: deadline passed after {int(cum[i]) + skip} bytes")
        j = _chunk_end(cum, i, n)
        expected = int(cum[j]) - int(cum[i]) - skip
        got = func(pid, lbase + 16 * i, j - i, rbase + 16 * i, j - i, 0)
        if got == expected:
            i, skip = j, 0
            continue
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise _errno_error(err, what)
        if got == 0:
            raise RemoteRejected(f"{what}: no progress at op {i} (unmapped memory?)")
        pos = int(cum[i]) + skip + got  # absolute byte position reached in the flattened plan
        k = int(np.searchsorted(cum, _U64(pos), side="right")) - 1
        skip = pos - int(cum[k])
        liov[k, 0] = local[k] + _U64(skip)
        liov[k, 1] = sizes[k] - _U64(skip)
        riov[k, 0] = remote[k] + _U64(skip)
        riov[k, 1] = liov[k, 1]
        i = k
    return int(cum[n])


def _split_run(run: Callable[[np.ndarray, np.ndarray, np.ndarray], object], local: np.ndarray, remote: np.ndarray,
               sizes: np.ndarray, threads: int) -> int:
    """Run ``run(local, remote, sizes)`` on ``threads`` byte-balanced slices of a batch at once.

    Small batches (under PARALLEL_MIN_BYTES) run on the calling thread only. The copy primitives release
    the GIL, so the slices really proceed in parallel.
    """
    sizes = np.ascontiguousarray(sizes, dtype=_U64)
    n = int(sizes.shape[0])
    total = int(sizes.sum()) if n else 0
    if threads <= 1 or n < threads or total < PARALLEL_MIN_BYTES:
        run(local, remote, sizes)
        return total
    cum = np.cumsum(sizes)
    cuts = np.searchsorted(cum, np.arange(1, threads, dtype=np.float64) * (total / threads)).tolist()
    edges = sorted(set([0] + [int(c) + 1 for c in cuts] + [n]))
    errors: List[BaseException] = []

    def part(a: int, b: int) -> None:
        try:
            run(local[a:b], remote[a:b], sizes[a:b])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)

    helpers = [threading.Thread(target=part, args=(a, b), daemon=True, name="llm-dd-copy")
               for a, b in zip(edges[1:-1], edges[2:])]
    for thread in helpers:
        thread.start()
    part(edges[0], edges[1])
    for thread in helpers:
        thread.join()
    if errors:
        raise errors[0]
    return total


def _pvm_split(func, what: str, pid: int, local: np.ndarray, remote: np.ndarray, sizes: np.ndarray,
               deadline: Optional[float], threads: int) -> int:
    """:func:`_pvm_rw` over the batch, split across ``threads`` threads when it is large."""
    return _split_run(lambda lo, re, sz: _pvm_rw(func, what, pid, lo, re, sz, deadline), local, remote, sizes,
                      threads)


def pvm_read(pid: int, plan_local: np.ndarray, plan_remote: np.ndarray, sizes: np.ndarray,
             deadline: Optional[float] = None, threads: int = 1) -> int:
    """Copy ``sizes[i]`` bytes from ``plan_remote[i]`` in process ``pid`` to ``plan_local[i]`` here.

    Args:
        pid: Process to read from (may be our own pid).
        plan_local: uint64 destination addresses in this process.
        plan_remote: uint64 source addresses in ``pid``.
        sizes: uint64 byte counts.
        deadline: ``time.monotonic()`` value checked between 1024-iovec chunks.
        threads: Split batches of at least PARALLEL_MIN_BYTES across this many threads.

    Returns:
        Total bytes copied.

    Raises:
        TransportClosed: the process is gone (ESRCH).
        ConnectFailed: no permission (EPERM) or syscall missing.
        RemoteRejected: an address is not mapped (EFAULT).
        TransferTimeout: the deadline passed between chunks.
    """
    return _pvm_split(_READV, "process_vm_readv", pid, plan_local, plan_remote, sizes, deadline, threads)


def pvm_write(pid: int, plan_local: np.ndarray, plan_remote: np.ndarray, sizes: np.ndarray,
              deadline: Optional[float] = None, threads: int = 1) -> int:
    """Copy ``sizes[i]`` bytes from ``plan_local[i]`` here to ``plan_remote[i]`` in process ``pid``.

    Args and errors as :func:`pvm_read`.
    """
    return _pvm_split(_WRITEV, "process_vm_writev", pid, plan_local, plan_remote, sizes, deadline, threads)


def pvm_peek(pid: int, addr: int, nbytes: int) -> bytes:
    """Read ``nbytes`` at ``addr`` in process ``pid``; raises TransportError subclasses."""
    buf = ctypes.create_string_buffer(max(nbytes, 1))
    arr = np.array([ctypes.addressof(buf)], dtype=_U64)
    pvm_read(pid, arr, np.array([addr], dtype=_U64), np.array([nbytes], dtype=_U64))
    return buf.raw[:nbytes]


def pvm_permitted(pid: int, probe_addr: int, nbytes: int = 1) -> bool:
    """Whether process_vm_readv of ``nbytes`` at ``probe_addr`` in ``pid`` works. Never raises."""
    try:
        pvm_peek(pid, probe_addr, nbytes)
        return True
    except TransportError:
        return False


def self_pvm_permitted() -> bool:
    """Whether process_vm_readv on our own pid works (detected once)."""
    global _SELF_PVM
    if _SELF_PVM is None:
        with _SELF_LOCK:
            if _SELF_PVM is None:
                probe = ctypes.create_string_buffer(b"probe", 8)
                _SELF_PVM = pvm_permitted(os.getpid(), ctypes.addressof(probe), 8)
    return _SELF_PVM


def _memmove_all(local: np.ndarray, remote: np.ndarray, sizes: np.ndarray,
                 deadline: Optional[float]) -> None:
    """ctypes.memmove driven by ``map`` (C-level iteration, GIL released per call), 1024 ops per step."""
    move = ctypes.memmove
    dst, src, cnt = local.tolist(), remote.tolist(), sizes.tolist()
    for s in range(0, len(cnt), IOV_MAX):
        if deadline is not None and time.monotonic() > deadline:
            raise TransferTimeout("local copy: deadline passed")
        e = s + IOV_MAX
        collections.deque(map(move, dst[s:e], src[s:e], cnt[s:e]), maxlen=0)


def local_copy(plan: CopyPlan, deadline: Optional[float] = None, checked: bool = True,
               threads: int = 1) -> None:
    """Copy ``plan.remote[i]`` to ``plan.local[i]`` inside this process, the whole plan in one pass.

    Args:
        plan: The copies; both sides are addresses in this process. Contiguous runs are merged.
        deadline: ``time.monotonic()`` value checked between 1024-op chunks.
        checked: True uses process_vm_readv on our own pid (when permitted), so an unmapped address
            raises RemoteRejected instead of crashing; False uses memmove (faster on 4 KiB-page
            shared mappings; callers must guarantee every range is mapped).
        threads: Threads for large batches (at least PARALLEL_MIN_BYTES), on either path.

    Raises:
        RemoteRejected: an address is not mapped (checked path).
        TransferTimeout: the deadline passed.
    """
    if len(plan) == 0:
        if deadline is not None and time.monotonic() > deadline:
            raise TransferTimeout("local copy: deadline passed")
        return
    plan = plan.merged()
    if checked and self_pvm_permitted():
        pvm_read(os.getpid(), plan.local, plan.remote, plan.sizes, deadline, threads)
    else:
        _split_run(lambda lo, re, sz: _memmove_all(lo, re, sz, deadline), plan.local, plan.remote, plan.sizes,
                   threads)


def view(addr: int, nbytes: int) -> memoryview:
    """A writable byte memoryview of ``nbytes`` at raw address ``addr`` (no copy, no checks)."""
    return _AS_VIEW[addr:addr + nbytes]


def views(addrs: np.ndarray, sizes: np.ndarray) -> List[memoryview]:
    """Writable byte memoryviews for many raw ranges at once (no per-range ctypes objects)."""
    starts = np.asarray(addrs, dtype=_U64)
    ends = starts + np.asarray(sizes, dtype=_U64)
    return list(map(_AS_VIEW.__getitem__, map(slice, starts.tolist(), ends.tolist())))


def chunk_bounds(sizes: np.ndarray, max_bytes: int, max_count: int = IOV_MAX) -> List[int]:
    """Chunk start indices (plus ``n``) grouping ops by ``max_bytes`` windows and ``max_count`` ops."""
    n = int(sizes.shape[0])
    if n == 0:
        return [0]
    starts = np.zeros(n, dtype=_U64)
    np.cumsum(sizes[:-1], out=starts[1:])
    window = starts // _U64(max(max_bytes, 1))
    breaks = np.flatnonzero(window[1:] != window[:-1]) + 1
    fixed = np.arange(0, n, max_count)
    return np.union1d(np.union1d(breaks, fixed), [0, n]).astype(np.int64).tolist()


def scatter_io(op: Callable[[List[memoryview]], int], addrs: np.ndarray, sizes: np.ndarray,
               on_stall: Callable[[], None], max_bytes: int = 1 << 20) -> None:
    """Move every byte of raw ranges with a socket scatter/gather call, handling partial transfers.

    Views are built per call (at most IOV_MAX per chunk), so building them overlaps the transfer.

    Args:
        op: e.g. ``lambda b: sock.recvmsg_into(b, 0, MSG_WAITALL)[0]`` or ``sock.sendmsg``.
        addrs: uint64 start addresses (memory this process may read or write).
        sizes: uint64 byte counts.
        on_stall: Called when ``op`` times out (BlockingIOError) or moves less than asked, and between
            chunks (a slow but steady peer must not outlast the deadline); it raises to abort
            (deadline passed, server stopping) or re-arms the socket timeouts.
        max_bytes: About how many bytes one call moves.

    Raises:
        TransportClosed: ``op`` returned 0 (peer closed) or the connection failed.
    """
    starts = np.asarray(addrs, dtype=_U64)
    sizes = np.asarray(sizes, dtype=_U64)
    n = int(sizes.shape[0])
    bounds = chunk_bounds(sizes, max_bytes)
    cum = [0] + np.cumsum(sizes, dtype=_U64).tolist()
    first, last = starts.tolist(), (starts + sizes).tolist()
    getitem = _AS_VIEW.__getitem__
    i, skip = 0, 0
    while i < n:
        j = bounds[bisect_right(bounds, i)]
        expected = cum[j] - cum[i] - skip
        if expected == 0:
            i, skip = j, 0
            continue
        chunk = list(map(getitem, map(slice, first[i:j], last[i:j])))
        if skip:
            chunk[0] = chunk[0][skip:]
        try:
            got = op(chunk)
        except (BlockingIOError, InterruptedError):
            on_stall()
            continue
        except OSError as exc:
            raise TransportClosed(f"connection lost: {exc}") from exc
        if got == expected:
            i, skip = j, 0
            if i < n:
                on_stall()
            continue
        if got <= 0:
            raise TransportClosed("connection closed by peer")
        pos = cum[i] + skip + got
        k = bisect_right(cum, pos) - 1
        i, skip = k, pos - cum[k]
        on_stall()


class RangeTable:
    """Registered address ranges, coalesced into a sorted disjoint list for vectorised checks.

    ``add``/``remove`` keep a multiset of ranges (registering twice needs two removes). Lookups use a
    snapshot of two numpy arrays swapped atomically, so checks never block registration.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: dict = {}
        self._starts = np.zeros(0, dtype=_U64)
        self._ends = np.zeros(0, dtype=_U64)

    def add(self, addr: int, nbytes: int) -> None:
        """Add the range ``[addr, addr + nbytes)``."""
        with self._lock:
            key = (int(addr), int(nbytes))
            self._ranges[key] = self._ranges.get(key, 0) + 1
            self._rebuild()

    def remove(self, addr: int, nbytes: int) -> bool:
        """Remove one registration of the range; returns False when it was unknown."""
        with self._lock:
            key = (int(addr), int(nbytes))
            count = self._ranges.get(key, 0)
            if not count:
                return False
            if count == 1:
                del self._ranges[key]
            else:
                self._ranges[key] = count - 1
            self._rebuild()
            return True

    def clear(self) -> None:
        """Forget every range."""
        with self._lock:
            self._ranges.clear()
            self._rebuild()

    def _rebuild(self) -> None:
        items = sorted(k for k in self._ranges if k[1] > 0)
        starts: List[int] = []
        ends: List[int] = []
        for a, n in items:
            if starts and a <= ends[-1]:
                ends[-1] = max(ends[-1], a + n)
            else:
                starts.append(a)
                ends.append(a + n)
        self._starts = np.array(starts, dtype=_U64)
        self._ends = np.array(ends, dtype=_U64)

    def __len__(self) -> int:
        return len(self._ranges)

    def intervals(self) -> Tuple[np.ndarray, np.ndarray]:
        """The coalesced ``(starts, ends)`` arrays (a consistent snapshot)."""
        return self._starts, self._ends

    def check(self, addrs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Boolean mask: whether each ``[addrs[i], addrs[i] + sizes[i])`` lies inside one interval."""
        starts, ends = self._starts, self._ends
        addrs = np.asarray(addrs, dtype=_U64)
        sizes = np.asarray(sizes, dtype=_U64)
        if starts.shape[0] == 0:
            return np.zeros(addrs.shape[0], dtype=bool)
        idx = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        found = idx >= 0
        end = ends[np.maximum(idx, 0)]
        inside = found & (addrs <= end)
        room = np.where(inside, end - np.where(inside, addrs, end), _U64(0))
        return inside & (sizes <= room)

    def contains(self, addrs: np.ndarray, sizes: np.ndarray) -> bool:
        """Whether every range lies inside the registered intervals."""
        return bool(self.check(addrs, sizes).all()) if len(addrs) else True
