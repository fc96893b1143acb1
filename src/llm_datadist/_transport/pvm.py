"""process_vm_readv/writev: the system calls of a plan, guard words first and last in every call.

Two implementations of one contract: the compiled data path (``_fastpath.pvm_rw``: the whole plan, split across
threads, with the GIL released once) where the extension was built, else the system calls through ctypes, one
call at a time (``rw``). ``LLM_DATADIST_PURE_PYTHON=1`` forces the second; which one runs is logged once.
"""
from __future__ import annotations

import array
import ctypes
import errno
import logging
import os
import threading
import time
from typing import List, Optional, Sequence, Tuple

from llm_datadist._transport.base import (
    ConnectFailed,
    CopyPlan,
    RemoteRejected,
    StaleMemory,
    TransferTimeout,
    TransportClosed,
    TransportError,
)

_log = logging.getLogger(__name__)
IOV_MAX = 1024  # iovecs per process_vm_* call (UIO_MAXIOV)
CHUNK_BYTES = 1 << 30  # bytes per call; the kernel truncates one call at MAX_RW_COUNT (~2 GiB)

#: ``(address in the peer, expected value)`` of the generation words a read checks.
GuardWords = Sequence[Tuple[int, int]]


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
PURE_PYTHON_ENV = "LLM_DATADIST_PURE_PYTHON"


def _load_fastpath():
    """The compiled data path, or None (not built here, or turned off by LLM_DATADIST_PURE_PYTHON=1)."""
    if os.environ.get(PURE_PYTHON_ENV, "").strip() not in ("", "0"):
        _log.info("%s is set: the pure-Python data path moves same-host bytes", PURE_PYTHON_ENV)
        return None
    try:
        from llm_datadist._transport import _fastpath  # type: ignore[attr-defined]
    except ImportError as exc:
        _log.warning("the compiled data path is not built (%s): the pure-Python path moves same-host bytes, "
                     "slower for small calls and next to busy Python threads; reinstall with a C compiler "
                     "(pip install --force-reinstall --no-deps llm-datadist) to build it", exc)
        return None
    return _fastpath


_FAST = _load_fastpath()


def compiled() -> bool:
    """Whether the compiled data path moves the bytes in this process."""
    return _FAST is not None
_SELF_PVM: Optional[bool] = None
_SELF_LOCK = threading.Lock()
_EMPTY = CopyPlan([], [], [])


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


def _call(func, what: str, pid: int, liov: int, riov: int, count: int, expected: int) -> None:
    """One process_vm call over complete iovec arrays; a short transfer is an error, never resumed."""
    while True:
        got = func(pid, liov, count, riov, count, 0)
        if got == expected:
            return
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise _errno_error(err, what)
        # the kernel stops at the first iovec it cannot copy: unmapped memory on one side
        raise RemoteRejected(f"{what}: copied {got} of {expected} bytes (memory not mapped)")


_LOCAL = threading.local()
_GUARD_SETS = 64  # guard sets a thread keeps the iovecs of (a new generation makes a new set)


def _guard_iovecs(guards: GuardWords) -> Tuple[array.array, Tuple[List[int], List[int]], Tuple[List[int], List[int]],
                                                array.array]:
    """``(scratch, head, tail, expected)`` of a call's guard words: the buffer the words are read into (first
    copies, then last), the iovecs before and after the data (:meth:`CopyPlan.iovecs`), and the words the buffer
    must hold after the call. Made once per thread and guard set: the buffer is this thread's own (a call that
    succeeds rewrites all of it), so concurrent calls never share one."""
    return _per_thread("iovecs", tuple(guards), _make_guard_iovecs)


def _per_thread(slot: str, key: tuple, make):
    """``make(key)``, made once per thread and key (at most _GUARD_SETS keys per slot are kept)."""
    cache = getattr(_LOCAL, slot, None)
    if cache is None:
        cache = {}
        setattr(_LOCAL, slot, cache)
    made = cache.get(key)
    if made is None:
        if len(cache) >= _GUARD_SETS:
            cache.clear()
        made = cache[key] = make(key)
    return made


def _make_guard_iovecs(key: tuple):
    g = len(key)
    scratch = array.array("Q", bytes(16 * g))
    base = scratch.buffer_info()[0]
    addrs = [w for addr, _value in key for w in (addr, 8)]
    head = ([w for k in range(g) for w in (base + 8 * k, 8)], addrs)
    tail = ([w for k in range(g, 2 * g) for w in (base + 8 * k, 8)], addrs)
    return scratch, head, tail, array.array("Q", [value for _addr, value in key] * 2)


def rw(func, what: str, pid: int, plan: CopyPlan, deadline: Optional[float], guards: GuardWords = ()) -> int:
    """Move ``plan.sizes[i]`` bytes between local ``plan.local[i]`` and ``plan.remote[i]`` in ``pid``, one call
    per run of at most IOV_MAX iovecs (guards included) and CHUNK_BYTES bytes.

    With ``guards`` (reads only) every call also reads each guard word first and last, into a scratch
    buffer, and the words must equal their expected values both times (StaleMemory otherwise): the data
    of that call was copied while the owner still held it. A plan of no ops with guards is one call that
    reads only them. The deadline is checked before every call.
    """
    if func is None:
        raise ConnectFailed(f"{what} is not available on this system")
    g = len(guards)
    if not len(plan) and not g:
        return 0
    per_call = IOV_MAX - 2 * g
    if per_call < 1:
        raise RemoteRejected(f"{what}: too many guards ({g})")
    scratch, head, tail, expected = _guard_iovecs(guards)
    moved = 0
    for start, stop, nbytes in plan.chunks(per_call, CHUNK_BYTES):
        if deadline is not None and time.monotonic() > deadline:
            raise TransferTimeout(f"{what}: deadline passed after {moved} bytes")
        liov, riov, count, _keep = plan.iovecs(start, stop, head, tail)
        _call(func, what, pid, liov, riov, count, nbytes + 16 * g)
        if scratch != expected:
            raise StaleMemory(f"{what}: the peer released or replaced that memory during the transfer")
        moved += nbytes
    return moved


_ST_OK, _ST_ERRNO, _ST_SHORT, _ST_STALE, _ST_TIMEOUT = range(5)


def _guard_buffers(guards: GuardWords) -> Tuple[array.array, array.array]:
    """The guard words' addresses and values as uint64 buffers (made once per thread and guard set)."""
    return _per_thread("buffers", tuple(guards),
                       lambda key: (array.array("Q", [a for a, _v in key]), array.array("Q", [v for _a, v in key])))


_NO_GUARDS = (array.array("Q"), array.array("Q"))


MEMCPY = 2  # rw_whole's mode for memmoves inside this process


def rw_whole(write: int, pid: int, plan: CopyPlan, deadline: Optional[float], guards: GuardWords, threads: int,
             split_bytes: int) -> int:
    """The whole plan in one call of the compiled data path (``compiled()`` must be true): the calls of
    :func:`rw` (``write`` 0/False a read, 1/True a write), or with ``write=MEMCPY`` memmoves inside this process
    (``pid`` ours; the caller guarantees every range is mapped), split into up to ``threads`` byte-balanced parts
    of at least ``split_bytes`` from twice that size on, with the GIL released once. Same errors as
    :func:`read` / :func:`write`."""
    what = ("process_vm_readv", "process_vm_writev", "local copy")[int(write)]
    if len(guards) > IOV_MAX // 4:
        raise RemoteRejected(f"{what}: too many guards ({len(guards)})")
    local, remote, sizes = plan.u64_buffers()
    gaddr, gval = _guard_buffers(guards) if guards else _NO_GUARDS
    status, err, moved, got, expected = _FAST.pvm_rw(  # type: ignore[union-attr]
        int(write), pid, local, remote, sizes, gaddr, gval, threads, split_bytes, deadline or 0.0)
    if status == _ST_OK:
        return moved
    if status == _ST_ERRNO:
        raise _errno_error(err, what)
    if status == _ST_SHORT:
        raise RemoteRejected(f"{what}: copied {got} of {expected} bytes (memory not mapped)")
    if status == _ST_STALE:
        raise StaleMemory(f"{what}: the peer released or replaced that memory during the transfer")
    raise TransferTimeout(f"{what}: deadline passed after {moved} bytes")


def read(pid: int, plan: CopyPlan, deadline: Optional[float] = None, guards: GuardWords = ()) -> int:
    """Copy ``plan.sizes[i]`` bytes from ``plan.remote[i]`` in process ``pid`` to ``plan.local[i]`` here.

    Args:
        pid: Process to read from (may be our own pid).
        plan: The copies (merge it first where that pays).
        deadline: ``time.monotonic()`` value checked before every call.
        guards: Generation words read first and last in every call (see :func:`rw`).

    Returns:
        Total bytes copied.

    Raises:
        TransportClosed: the process is gone (ESRCH).
        ConnectFailed: no permission (EPERM) or syscall missing.
        RemoteRejected: an address is not mapped (EFAULT).
        StaleMemory: a guard word did not hold its expected value.
        TransferTimeout: the deadline passed between calls.
    """
    return rw(_READV, "process_vm_readv", pid, plan, deadline, guards)


def write(pid: int, plan: CopyPlan, deadline: Optional[float] = None) -> int:
    """Copy ``plan.sizes[i]`` bytes from ``plan.local[i]`` here to ``plan.remote[i]`` in process ``pid``.

    Errors as :func:`read` (no guards: a write cannot read them).
    """
    return rw(_WRITEV, "process_vm_writev", pid, plan, deadline)


def check_guards(pid: int, guards: GuardWords, deadline: Optional[float] = None) -> None:
    """Read only the guard words in ``pid`` (StaleMemory if one does not hold its value)."""
    rw(_READV, "process_vm_readv", pid, _EMPTY, deadline, guards)


def peek(pid: int, addr: int, nbytes: int) -> bytes:
    """Read ``nbytes`` at ``addr`` in process ``pid``; raises TransportError subclasses."""
    buf = ctypes.create_string_buffer(max(nbytes, 1))
    read(pid, CopyPlan([ctypes.addressof(buf)], [addr], [nbytes]))
    return buf.raw[:nbytes]


def permitted(pid: int, probe_addr: int, nbytes: int = 1) -> bool:
    """Whether process_vm_readv of ``nbytes`` at ``probe_addr`` in ``pid`` works. Never raises."""
    try:
        peek(pid, probe_addr, nbytes)
        return True
    except TransportError:
        return False


def self_permitted() -> bool:
    """Whether process_vm_readv on our own pid works (detected once)."""
    global _SELF_PVM
    if _SELF_PVM is None:
        with _SELF_LOCK:
            if _SELF_PVM is None:
                probe = ctypes.create_string_buffer(b"probe", 8)
                _SELF_PVM = permitted(os.getpid(), ctypes.addressof(probe), 8)
    return _SELF_PVM
