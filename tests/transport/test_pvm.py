"""Unit tests of the process_vm system calls (_transport/pvm.py), local copies (copies.py) and split copies
(parallel.py)."""
from __future__ import annotations

import ctypes
import mmap
import os
import time

import numpy as np
import pytest

from llm_datadist._transport import copies, parallel, pvm
from llm_datadist._transport.base import (
    CopyPlan,
    RemoteRejected,
    TransferTimeout,
    TransportClosed,
)

U64 = np.uint64


def _scattered(rng, n, max_size, src_bytes, dst_bytes):
    sizes = rng.integers(1, max_size, n)
    dst = np.cumsum(sizes + rng.integers(0, 64, n)) - sizes
    src = rng.integers(0, src_bytes - max_size, n)
    assert dst[-1] + sizes[-1] <= dst_bytes
    return dst, src, sizes


def _addr(arr):
    return U64(arr.ctypes.data)


def _plan(dst, src, sizes) -> CopyPlan:
    """A plan of uint64 arrays (or of int lists, which a plan of at most SMALL_OPS ops keeps as ints)."""
    return CopyPlan(dst, src, sizes)


def _assert_copied(dst, dst_off, src, src_off, sizes):
    for d, s, n in zip(dst_off.tolist(), src_off.tolist(), sizes.tolist()):
        assert np.array_equal(dst[d:d + n], src[s:s + n])


def test_pvm_read_and_write_own_pid_many_chunks():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, 4 << 20, dtype=np.uint8)
    dst = np.zeros(8 << 20, dtype=np.uint8)
    d, s, n = _scattered(rng, 2500, 3000, src.size, dst.size)  # > 2 chunks of 1024 iovecs
    moved = pvm.read(os.getpid(), _plan(d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src), n))
    assert moved == int(n.sum())
    _assert_copied(dst, d, src, s, n)
    back = np.zeros_like(src)
    pvm.write(os.getpid(), _plan(d.astype(U64) + _addr(dst), s.astype(U64) + _addr(back), n))
    _assert_copied(back, s, dst, d, n)


def _truncating(budget):
    """A process_vm_readv stand-in that moves at most ``budget`` bytes per call (partial transfers)."""
    calls = []

    def fake(pid, lptr, lcnt, rptr, rcnt, flags):
        liov = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * lcnt)).from_address(lptr)).reshape(lcnt, 2).copy()
        riov = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * rcnt)).from_address(rptr)).reshape(rcnt, 2).copy()
        assert (liov[:, 1] == riov[:, 1]).all()  # lists stay pairwise aligned
        ends = np.cumsum(liov[:, 1])
        k = int(np.searchsorted(ends, budget, side="left"))
        k = min(k, lcnt - 1)
        before = int(ends[k - 1]) if k else 0
        liov[k, 1] = riov[k, 1] = min(int(liov[k, 1]), budget - before)
        calls.append(k + 1)
        cnt = k + 1
        return pvm._READV(pid, liov.ctypes.data, cnt, riov.ctypes.data, cnt, flags)

    return fake, calls


def test_a_short_transfer_is_an_error_never_a_silent_resume():
    """The kernel stops at the first iovec it cannot copy: a short result means unmapped memory."""
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(2 << 20, dtype=np.uint8)
    d, s, n = _scattered(rng, 700, 5000, src.size, dst.size)
    fake, calls = _truncating(12345)
    with pytest.raises(RemoteRejected):
        pvm.rw(fake, "fake", os.getpid(), _plan(d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src), n), None)
    assert len(calls) == 1


def _recording():
    """process_vm_readv that records the remote iovecs of every call, then runs the real one."""
    calls = []

    def fake(pid, lptr, lcnt, rptr, rcnt, flags):
        riov = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * rcnt)).from_address(rptr)).reshape(rcnt, 2).copy()
        calls.append(riov)
        return pvm._READV(pid, lptr, lcnt, rptr, rcnt, flags)

    return fake, calls


def test_guards_ride_first_and_last_in_every_call():
    rng = np.random.default_rng(4)
    src = rng.integers(0, 256, 4 << 20, dtype=np.uint8)
    dst = np.zeros(8 << 20, dtype=np.uint8)
    word = np.array([0xDEADBEEF12345679], dtype=U64)
    d, s, n = _scattered(rng, 2500, 3000, src.size, dst.size)  # several calls of 1022 data iovecs
    guards = [(int(_addr(word)), int(word[0]))]
    fake, calls = _recording()
    pvm.rw(fake, "fake", os.getpid(), _plan(d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src), n), None, guards)
    _assert_copied(dst, d, src, s, n)
    assert len(calls) == 3
    for riov in calls:
        assert riov.shape[0] <= pvm.IOV_MAX
        assert riov[0, 0] == _addr(word) and riov[-1, 0] == _addr(word) and riov[0, 1] == riov[-1, 1] == 8


def test_a_guard_that_changed_is_stale_memory():
    from llm_datadist._transport.base import StaleMemory

    src = np.ones(4096, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    word = np.array([7], dtype=U64)
    for plan in (_plan(np.array([_addr(dst)]), np.array([_addr(src)]), np.array([4096], dtype=U64)),
                 _plan([int(_addr(dst))], [int(_addr(src))], [4096])):
        dst[:] = 0
        with pytest.raises(StaleMemory):
            pvm.read(os.getpid(), plan, guards=[(int(_addr(word)), 9)])
        with pytest.raises(StaleMemory):
            pvm.check_guards(os.getpid(), [(int(_addr(word)), 9)])
        pvm.check_guards(os.getpid(), [(int(_addr(word)), 7)])
        pvm.read(os.getpid(), plan, guards=[(int(_addr(word)), 7)])
        assert (dst == 1).all()


def test_unmapped_remote_memory_is_rejected_after_partial_copy():
    page = mmap.PAGESIZE
    mm = mmap.mmap(-1, 2 * page)
    holder = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(holder)
    del holder
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + page, page, 0) == 0  # second page: no access
    dst = np.zeros(2 * page, dtype=np.uint8)
    with pytest.raises(RemoteRejected):
        pvm.read(os.getpid(), _plan(np.array([_addr(dst)]), np.array([base], dtype=U64), np.array([2 * page])))
    with pytest.raises(RemoteRejected):
        pvm.read(os.getpid(), _plan([int(_addr(dst))], [base], [2 * page]))
    with pytest.raises(RemoteRejected):
        copies.local_copy(np.array([_addr(dst)]), np.array([base + page], dtype=U64), np.array([16], dtype=U64))
    libc.mprotect(base + page, page, 3)
    mm.close()


def test_missing_process_is_transport_closed():
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1  # can never exist
    dst = np.zeros(8, dtype=np.uint8)
    with pytest.raises(TransportClosed):
        pvm.read(pid, _plan(np.array([_addr(dst)]), np.array([4096], dtype=U64), np.array([8], dtype=U64)))
    assert not pvm.permitted(pid, 4096)
    assert pvm.permitted(os.getpid(), int(_addr(dst)), 8)


def test_deadline_is_checked_between_chunks():
    src = np.ones(1 << 16, dtype=np.uint8)
    dst = np.zeros(1 << 16, dtype=np.uint8)
    offs = np.arange(2048, dtype=U64) * U64(16)
    with pytest.raises(TransferTimeout):
        pvm.read(os.getpid(), _plan(offs + _addr(dst), offs + _addr(src), np.full(2048, 16, dtype=U64)),
                 deadline=time.monotonic() - 1)
    with pytest.raises(TransferTimeout):
        copies.local_copy(offs + _addr(dst), offs + _addr(src), np.full(2048, 8, dtype=U64),
                          deadline=time.monotonic() - 1, checked=False)


@pytest.mark.parametrize("checked", [True, False])
def test_local_copy_paths(monkeypatch, checked):
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(2 << 20, dtype=np.uint8)
    d, s, n = _scattered(rng, 1500, 1000, src.size, dst.size)
    if checked:
        monkeypatch.setattr(pvm, "_SELF_PVM", False)  # pvm refused: the memmove fallback must work
    copies.local_copy(d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src), n.astype(U64), checked=checked)
    _assert_copied(dst, d, src, s, n)
    empty = np.zeros(0, dtype=U64)
    copies.local_copy(empty, empty, empty)
    copies.local_copy([], [], [])


def test_parallel_split_copies_everything_and_reraises(monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 1 << 16)
    monkeypatch.setattr(parallel, "SPLIT_BYTES_PER_THREAD", 1 << 15)
    rng = np.random.default_rng(4)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(2 << 20, dtype=np.uint8)
    d, s, n = _scattered(rng, 900, 2000, src.size, dst.size)
    local, remote = d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src)
    parts = []

    def read(part):
        parts.append(len(part))
        return pvm.read(os.getpid(), part)

    parallel.acquire_helpers()  # as a transport does: the helper threads live while it does
    try:
        assert parallel.run_split(_plan(local, remote, n), 3, read) == int(n.sum())
        assert len(parts) == 3 and sum(parts) == n.size
        _assert_copied(dst, d, src, s, n)
        remote = remote.copy()
        remote[-1] = U64(8)  # unmapped, in the last thread's share
        with pytest.raises(RemoteRejected):
            parallel.run_split(_plan(local, remote, n), 2, read)
    finally:
        parallel.release_helpers()
