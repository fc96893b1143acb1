"""Low-level vectorised copies between raw addresses: process_vm_readv/writev batches, views, range tables."""
from __future__ import annotations

import collections
import ctypes
import errno
import os
import queue
import sys
import threading
import time
from bisect import bisect_right
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from llm_datadist._transport import tls
from llm_datadist._transport.base import (
    ConnectFailed,
    RemoteRejected,
    StaleMemory,
    TransferTimeout,
    TransportClosed,
    TransportError,
)

IOV_MAX = 1024  # iovecs per process_vm_* call (UIO_MAXIOV)
CHUNK_BYTES = 1 << 30  # bytes per call; the kernel truncates one call at MAX_RW_COUNT (~2 GiB)

# Splitting a batch across threads. A copy runs in the kernel with the GIL released, so k threads move k
# slices at once when the machine has k cores to spare. A slice handed to a (persistent) helper thread costs
# a queue hand-off and a wake-up, some tens of microseconds, which at 10 GB/s is the time to copy a few hundred
# KiB: so a batch is split only from PARALLEL_MIN_BYTES on (1 MiB per extra thread), and into at most
# COPY_THREADS parts, one per core the process may run on (capped at 4: memory bandwidth, not cores, is the
# limit beyond). LLM_DATADIST_COPY_THREADS overrides the thread count (1 turns the split off).
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_ENV_THREADS = os.environ.get("LLM_DATADIST_COPY_THREADS", "")
COPY_THREADS = int(_ENV_THREADS) if _ENV_THREADS.isdigit() and int(_ENV_THREADS) > 0 else max(1, min(4, _cores()))
SPLIT_BYTES_PER_THREAD = 1 << 20
PARALLEL_MIN_BYTES = 2 * SPLIT_BYTES_PER_THREAD  # the smallest batch worth two threads

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


def _chunk_end(cum: np.ndarray, i: int, n: int, per_call: int) -> int:
    """End index of the chunk starting at ``i``: at most ``per_call`` entries and about CHUNK_BYTES bytes."""
    j = min(i + per_call, n)
    if int(cum[j]) - int(cum[i]) > CHUNK_BYTES:
        k = int(np.searchsorted(cum, cum[i] + _U64(CHUNK_BYTES), side="right")) - 1
        j = max(i + 1, min(k, j))
    return j


class Guards:
    """Generation words read around every process_vm_readv batch: addresses in the peer and expected values."""

    __slots__ = ("addrs", "values")

    def __init__(self, addrs: np.ndarray, values: np.ndarray) -> None:
        self.addrs = np.ascontiguousarray(addrs, dtype=_U64)
        self.values = np.ascontiguousarray(values, dtype=_U64)

    def __len__(self) -> int:
        return int(self.addrs.shape[0])


def _call(func, what: str, pid: int, liov: np.ndarray, riov: np.ndarray, expected: int) -> None:
    """One process_vm call over complete iovec arrays; a short transfer is an error, never resumed."""
    count = int(liov.shape[0])
    while True:
        got = func(pid, liov.ctypes.data, count, riov.ctypes.data, count, 0)
        if got == expected:
            return
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise _errno_error(err, what)
        # the kernel stops at the first iovec it cannot copy: unmapped memory on one side
        raise RemoteRejected(f"{what}: copied {got} of {expected} bytes (memory not mapped)")


def _pvm_rw(func, what: str, pid: int, local: np.ndarray, remote: np.ndarray,
            sizes: np.ndarray, deadline: Optional[float], guards: Optional[Guards] = None) -> int:
    """Move ``sizes[i]`` bytes between ``local[i]`` and ``remote[i]`` with one call per chunk.

    With ``guards`` (reads only) every call also reads each guard word first and last, into a scratch
    buffer, and the words must equal their expected values both times (StaleMemory otherwise): the data
    of that call was copied while the owner still held it.
    """
    if func is None:
        raise ConnectFailed(f"{what} is not available on this system")
    local = np.ascontiguousarray(local, dtype=_U64)
    remote = np.ascontiguousarray(remote, dtype=_U64)
    sizes = np.ascontiguousarray(sizes, dtype=_U64)
    n = int(sizes.shape[0])
    g = len(guards) if guards is not None else 0
    if n == 0 and g == 0:
        return 0
    per_call = IOV_MAX - 2 * g
    if per_call < 1:
        raise RemoteRejected(f"{what}: too many guards ({g})")
    cum = np.zeros(n + 1, dtype=_U64)
    if n:
        np.cumsum(sizes, out=cum[1:])
    scratch = np.zeros(2 * g, dtype=_U64)
    guard_l = np.empty((2 * g, 2), dtype=_U64)
    guard_r = np.empty((2 * g, 2), dtype=_U64)
    if g:
        guard_l[:, 0] = scratch.ctypes.data + np.arange(2 * g, dtype=_U64) * _U64(8)
        guard_l[:, 1] = 8
        guard_r[:g, 0] = guards.addrs  # type: ignore[union-attr]
        guard_r[g:, 0] = guards.addrs  # type: ignore[union-attr]
        guard_r[:, 1] = 8
    i = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TransferTimeout(f"{what}: deadline passed after {int(cum[i])} bytes")
        j = _chunk_end(cum, i, n, per_call) if n else 0
        m = j - i
        liov = np.empty((m + 2 * g, 2), dtype=_U64)
        riov = np.empty((m + 2 * g, 2), dtype=_U64)
        liov[g:g + m, 0] = local[i:j]
        liov[g:g + m, 1] = sizes[i:j]
        riov[g:g + m, 0] = remote[i:j]
        riov[g:g + m, 1] = sizes[i:j]
        if g:
            liov[:g], liov[g + m:] = guard_l[:g], guard_l[g:]
            riov[:g], riov[g + m:] = guard_r[:g], guard_r[g:]
        _call(func, what, pid, liov, riov, int(cum[j]) - int(cum[i]) + 16 * g)
        if g and not (np.array_equal(scratch[:g], guards.values)  # type: ignore[union-attr]
                      and np.array_equal(scratch[g:], guards.values)):  # type: ignore[union-attr]
            raise StaleMemory(f"{what}: the peer released or replaced that memory during the transfer")
        i = j
        if i >= n:
            return int(cum[n])


_U64C = ctypes.c_uint64


def pvm_small(func, what: str, pid: int, ops, guards=()) -> int:
    """One process_vm call for a small plan held as Python ints: ``ops`` are (local, remote, nbytes) tuples,
    ``guards`` (address, value) pairs read first and last in the same call (StaleMemory if one changed).

    The small-request path: no numpy, one system call, the iovec arrays built straight from the ints.
    """
    if func is None:
        raise ConnectFailed(f"{what} is not available on this system")
    g = len(guards)
    count = len(ops) + 2 * g
    if count > IOV_MAX:
        raise RemoteRejected(f"{what}: {count} iovecs in a small plan")
    scratch = (_U64C * (2 * g))() if g else None
    local: list = []
    remote: list = []
    if scratch is not None:
        base = ctypes.addressof(scratch)
        for k, (addr, _value) in enumerate(guards):
            local += (base + 8 * k, 8)
            remote += (addr, 8)
    total = 0
    for lo, re, n in ops:
        local += (lo, n)
        remote += (re, n)
        total += n
    if scratch is not None:
        for k, (addr, _value) in enumerate(guards):
            local += (base + 8 * (g + k), 8)
            remote += (addr, 8)
    liov = (_U64C * (2 * count))(*local)
    riov = (_U64C * (2 * count))(*remote)
    expected = total + 16 * g
    while True:
        got = func(pid, ctypes.addressof(liov), count, ctypes.addressof(riov), count, 0)
        if got == expected:
            break
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise _errno_error(err, what)
        raise RemoteRejected(f"{what}: copied {got} of {expected} bytes (memory not mapped)")
    if scratch is not None:
        for k, (_addr, value) in enumerate(guards):
            if scratch[k] != value or scratch[g + k] != value:
                raise StaleMemory(f"{what}: the peer released or replaced that memory during the transfer")
    return total


def pvm_read_small(pid: int, ops, guards=()) -> int:
    """:func:`pvm_small` with process_vm_readv."""
    return pvm_small(_READV, "process_vm_readv", pid, ops, guards)


def pvm_write_small(pid: int, ops) -> int:
    """:func:`pvm_small` with process_vm_writev (no guards: a write cannot read)."""
    return pvm_small(_WRITEV, "process_vm_writev", pid, ops)


class _Helpers:
    """Daemon threads that run slices of split copies, kept while some transport or engine uses them.

    Started on first use (never more than a split needs); ``acquire``/``release`` count the users and the last
    release stops the threads, so nothing outlives the instances that needed it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._users = 0

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users:
                return
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(5.0)

    def run(self, jobs: Sequence[Callable[[], object]]) -> None:
        """Run every job, the first on the calling thread, the others on helpers; re-raise the first error."""
        done = threading.Semaphore(0)
        errors: List[BaseException] = []

        def wrap(job: Callable[[], object]) -> Callable[[], None]:
            def slice_job() -> None:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                    errors.append(exc)
                finally:
                    done.release()
            return slice_job

        with self._lock:
            while len(self._threads) < len(jobs) - 1:
                thread = threading.Thread(target=self._work, name=f"llm-dd-copy-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        for job in jobs[1:]:
            self._queue.put(wrap(job))
        wrap(jobs[0])()
        for _ in jobs:
            done.acquire()
        if errors:
            raise errors[0]

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job()


_HELPERS = _Helpers()
acquire_helpers = _HELPERS.acquire
release_helpers = _HELPERS.release
run_parallel = _HELPERS.run


def _split_run(run: Callable[[np.ndarray, np.ndarray, np.ndarray], object], local: np.ndarray, remote: np.ndarray,
               sizes: np.ndarray, threads: int) -> int:
    """Run ``run(local, remote, sizes)`` on up to ``threads`` byte-balanced slices of a batch at once.

    A batch is split into ``min(threads, total // SPLIT_BYTES_PER_THREAD)`` slices; a small one runs on the
    calling thread only.
    """
    sizes = np.ascontiguousarray(sizes, dtype=_U64)
    n = int(sizes.shape[0])
    total = int(sizes.sum()) if n else 0
    parts = min(threads, n, total // SPLIT_BYTES_PER_THREAD) if total >= PARALLEL_MIN_BYTES else 1
    if parts <= 1:
        run(local, remote, sizes)
        return total
    cum = np.cumsum(sizes)
    cuts = np.searchsorted(cum, np.arange(1, parts, dtype=np.float64) * (total / parts)).tolist()
    edges = sorted(set([0] + [min(int(c) + 1, n) for c in cuts] + [n]))
    jobs = [(lambda a=a, b=b: run(local[a:b], remote[a:b], sizes[a:b])) for a, b in zip(edges[:-1], edges[1:])
            if b > a]
    _HELPERS.run(jobs)
    return total


def _pvm_split(func, what: str, pid: int, local: np.ndarray, remote: np.ndarray, sizes: np.ndarray,
               deadline: Optional[float], threads: int, guards: Optional[Guards] = None) -> int:
    """:func:`_pvm_rw` over the batch, split across ``threads`` threads when it is large."""
    return _split_run(lambda lo, re, sz: _pvm_rw(func, what, pid, lo, re, sz, deadline, guards), local, remote,
                      sizes, threads)


def pvm_read(pid: int, plan_local: np.ndarray, plan_remote: np.ndarray, sizes: np.ndarray,
             deadline: Optional[float] = None, threads: int = 1, guards: Optional[Guards] = None) -> int:
    """Copy ``sizes[i]`` bytes from ``plan_remote[i]`` in process ``pid`` to ``plan_local[i]`` here.

    Args:
        pid: Process to read from (may be our own pid).
        plan_local: uint64 destination addresses in this process.
        plan_remote: uint64 source addresses in ``pid``.
        sizes: uint64 byte counts.
        deadline: ``time.monotonic()`` value checked between 1024-iovec chunks.
        threads: Split batches of at least PARALLEL_MIN_BYTES across this many threads.
        guards: Generation words read first and last in every call (see :func:`_pvm_rw`).

    Returns:
        Total bytes copied.

    Raises:
        TransportClosed: the process is gone (ESRCH).
        ConnectFailed: no permission (EPERM) or syscall missing.
        RemoteRejected: an address is not mapped (EFAULT).
        StaleMemory: a guard word did not hold its expected value.
        TransferTimeout: the deadline passed between chunks.
    """
    return _pvm_split(_READV, "process_vm_readv", pid, plan_local, plan_remote, sizes, deadline, threads, guards)


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


def local_copy_small(ops, deadline: Optional[float] = None, checked: bool = True) -> None:
    """Copy a small plan's (dst, src, nbytes) ops in this process (see :func:`local_copy`)."""
    if deadline is not None and time.monotonic() > deadline:
        raise TransferTimeout("local copy: deadline passed")
    if checked and self_pvm_permitted():
        pvm_read_small(os.getpid(), ops)
    else:
        move = ctypes.memmove
        for dst, src, n in ops:
            move(dst, src, n)


def local_copy(dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, deadline: Optional[float] = None,
               checked: bool = True, threads: int = 1) -> None:
    """Copy ``sizes[i]`` bytes from ``src[i]`` to ``dst[i]`` inside this process, the whole batch in one pass.

    Args:
        dst: uint64 destination addresses.
        src: uint64 source addresses.
        sizes: uint64 byte counts (the caller merges contiguous runs first where that pays).
        deadline: ``time.monotonic()`` value checked between 1024-op chunks.
        checked: True uses process_vm_readv on our own pid (when permitted), so an unmapped address
            raises RemoteRejected instead of crashing; False uses memmove (faster on 4 KiB-page
            shared mappings; callers must guarantee every range is mapped).
        threads: Threads for large batches (at least PARALLEL_MIN_BYTES), on either path.

    Raises:
        RemoteRejected: an address is not mapped (checked path).
        TransferTimeout: the deadline passed.
    """
    if deadline is not None and time.monotonic() > deadline:
        raise TransferTimeout("local copy: deadline passed")
    if not len(sizes):
        return
    if checked and self_pvm_permitted():
        pvm_read(os.getpid(), dst, src, sizes, deadline, threads)
    else:
        _split_run(lambda lo, re, sz: _memmove_all(lo, re, sz, deadline), dst, src, sizes, threads)


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
    if n <= max_count and int(sizes.sum()) < max_bytes:  # every op starts in the first window: one chunk
        return [0, n]
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
    _scatter(op, starts.tolist(), (starts + sizes).tolist(), [0] + np.cumsum(sizes, dtype=_U64).tolist(),
             chunk_bounds(sizes, max_bytes), on_stall)


def scatter_io_small(op: Callable[[List[memoryview]], int], ranges: Sequence[Tuple[int, int]],
                     on_stall: Callable[[], None], max_bytes: int = 1 << 20) -> None:
    """:func:`scatter_io` for a few ``(addr, nbytes)`` ranges given as Python ints (no numpy on this path).

    Chunks as :func:`scatter_io` does (the same bounds as :func:`chunk_bounds`): a new call where a range
    starts in another ``max_bytes`` window than the one before it, and at every IOV_MAX-th range.
    """
    first = [addr for addr, _ in ranges]
    last = [addr + nbytes for addr, nbytes in ranges]
    window = max(max_bytes, 1)
    cum = [0]
    bounds = [0]
    for k, (_, nbytes) in enumerate(ranges):
        if k and (cum[k] // window != cum[k - 1] // window or k % IOV_MAX == 0):
            bounds.append(k)
        cum.append(cum[k] + nbytes)
    if ranges:
        bounds.append(len(ranges))
    _scatter(op, first, last, cum, bounds, on_stall)


def _scatter(op: Callable[[List[memoryview]], int], first: List[int], last: List[int], cum: List[int],
             bounds: List[int], on_stall: Callable[[], None]) -> None:
    """The loop of the scatter calls: ranges ``[first[k], last[k])``, running byte counts ``cum`` (one more
    entry than ranges) and chunk starts ``bounds`` (ending with the number of ranges)."""
    n = len(first)
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
        except tls.WOULD_BLOCK:
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


#: Addresses or sizes: a uint64 array, or Python ints.
_Ints = Union[np.ndarray, Sequence[int]]

#: Up to this many ranges, ``RangeTable.contains`` checks them one by one in Python (cheaper than numpy's
#: fixed per-call cost); above it, vectorised.
_SMALL_LOOKUP = 16


class RangeTable:
    """Registered address ranges, coalesced into a sorted disjoint list for vectorised checks.

    ``add``/``remove`` keep a multiset of ranges (registering twice needs two removes). Lookups read one
    snapshot (the interval starts and ends, as numpy arrays and as lists) swapped in by a single assignment,
    so checks never block registration and never pair the starts of one version with the ends of another.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: dict = {}
        self._snapshot: Tuple[np.ndarray, np.ndarray, List[int], List[int]] = (
            np.zeros(0, dtype=_U64), np.zeros(0, dtype=_U64), [], [])

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
        self._snapshot = (np.array(starts, dtype=_U64), np.array(ends, dtype=_U64), starts, ends)

    def __len__(self) -> int:
        return len(self._ranges)

    def intervals(self) -> Tuple[np.ndarray, np.ndarray]:
        """The coalesced ``(starts, ends)`` arrays (a consistent snapshot)."""
        starts, ends, _, _ = self._snapshot
        return starts, ends

    def check(self, addrs: _Ints, sizes: _Ints) -> np.ndarray:
        """Boolean mask: whether each ``[addrs[i], addrs[i] + sizes[i])`` lies inside one interval."""
        starts, ends, _, _ = self._snapshot
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

    def contains(self, addrs: _Ints, sizes: _Ints) -> bool:
        """Whether every range lies inside the registered intervals.

        A few ranges (a small request, the common case on a serving thread) are looked up with ``bisect``
        on Python ints: a handful of list operations instead of a dozen numpy calls of fixed cost each.
        """
        n = len(addrs)
        if n > _SMALL_LOOKUP:
            return bool(self.check(addrs, sizes).all())
        _, _, starts, ends = self._snapshot
        as_list = lambda v: v.tolist() if isinstance(v, np.ndarray) else [int(x) for x in v]  # noqa: E731
        for addr, size in zip(as_list(addrs), as_list(sizes)):
            i = bisect_right(starts, addr) - 1
            if i < 0 or addr + size > ends[i]:
                return False
        return True
