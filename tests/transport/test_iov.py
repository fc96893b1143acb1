"""Unit tests of the vectorised copy layer (_transport/iov.py)."""
from __future__ import annotations

import ctypes
import mmap
import os
import time

import numpy as np
import pytest

from llm_datadist._transport import iov
from llm_datadist._transport.base import (
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


def _assert_copied(dst, dst_off, src, src_off, sizes):
    for d, s, n in zip(dst_off.tolist(), src_off.tolist(), sizes.tolist()):
        assert np.array_equal(dst[d:d + n], src[s:s + n])


def test_pvm_read_and_write_own_pid_many_chunks():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, 4 << 20, dtype=np.uint8)
    dst = np.zeros(8 << 20, dtype=np.uint8)
    d, s, n = _scattered(rng, 2500, 3000, src.size, dst.size)  # > 2 chunks of 1024 iovecs
    moved = iov.pvm_read(os.getpid(), d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src), n)
    assert moved == int(n.sum())
    _assert_copied(dst, d, src, s, n)
    back = np.zeros_like(src)
    iov.pvm_write(os.getpid(), d.astype(U64) + _addr(dst), s.astype(U64) + _addr(back), n)
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
        return iov._READV(pid, liov.ctypes.data, cnt, riov.ctypes.data, cnt, flags)

    return fake, calls


def test_a_short_transfer_is_an_error_never_a_silent_resume():
    """The kernel stops at the first iovec it cannot copy: a short result means unmapped memory."""
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(2 << 20, dtype=np.uint8)
    d, s, n = _scattered(rng, 700, 5000, src.size, dst.size)
    fake, calls = _truncating(12345)
    with pytest.raises(RemoteRejected):
        iov._pvm_rw(fake, "fake", os.getpid(), d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src),
                    n.astype(U64), None)
    assert len(calls) == 1


def _recording():
    """process_vm_readv that records the remote iovecs of every call, then runs the real one."""
    calls = []

    def fake(pid, lptr, lcnt, rptr, rcnt, flags):
        riov = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * rcnt)).from_address(rptr)).reshape(rcnt, 2).copy()
        calls.append(riov)
        return iov._READV(pid, lptr, lcnt, rptr, rcnt, flags)

    return fake, calls


def test_guards_ride_first_and_last_in_every_call():
    rng = np.random.default_rng(4)
    src = rng.integers(0, 256, 4 << 20, dtype=np.uint8)
    dst = np.zeros(8 << 20, dtype=np.uint8)
    word = np.array([0xDEADBEEF12345679], dtype=U64)
    d, s, n = _scattered(rng, 2500, 3000, src.size, dst.size)  # several calls of 1022 data iovecs
    guards = iov.Guards(np.array([_addr(word)], dtype=U64), word.copy())
    fake, calls = _recording()
    iov._pvm_rw(fake, "fake", os.getpid(), d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src),
                n.astype(U64), None, guards)
    _assert_copied(dst, d, src, s, n)
    assert len(calls) == 3
    for riov in calls:
        assert riov.shape[0] <= iov.IOV_MAX
        assert riov[0, 0] == _addr(word) and riov[-1, 0] == _addr(word) and riov[0, 1] == riov[-1, 1] == 8


def test_a_guard_that_changed_is_stale_memory():
    from llm_datadist._transport.base import StaleMemory

    src = np.ones(4096, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    word = np.array([7], dtype=U64)
    with pytest.raises(StaleMemory):
        iov.pvm_read(os.getpid(), np.array([_addr(dst)]), np.array([_addr(src)]), np.array([4096], dtype=U64),
                     guards=iov.Guards(np.array([_addr(word)], dtype=U64), np.array([9], dtype=U64)))
    iov.pvm_read(os.getpid(), np.array([_addr(dst)]), np.array([_addr(src)]), np.array([4096], dtype=U64),
                 guards=iov.Guards(np.array([_addr(word)], dtype=U64), np.array([7], dtype=U64)))
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
        iov.pvm_read(os.getpid(), np.array([_addr(dst)]), np.array([base], dtype=U64),
                     np.array([2 * page], dtype=U64))
    with pytest.raises(RemoteRejected):
        iov.local_copy(np.array([_addr(dst)]), np.array([base + page], dtype=U64), np.array([16], dtype=U64))
    libc.mprotect(base + page, page, 3)
    mm.close()


def test_missing_process_is_transport_closed():
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1  # can never exist
    dst = np.zeros(8, dtype=np.uint8)
    with pytest.raises(TransportClosed):
        iov.pvm_read(pid, np.array([_addr(dst)]), np.array([4096], dtype=U64), np.array([8], dtype=U64))
    assert not iov.pvm_permitted(pid, 4096)
    assert iov.pvm_permitted(os.getpid(), int(_addr(dst)), 8)


def test_deadline_is_checked_between_chunks():
    src = np.ones(1 << 16, dtype=np.uint8)
    dst = np.zeros(1 << 16, dtype=np.uint8)
    offs = np.arange(2048, dtype=U64) * U64(16)
    with pytest.raises(TransferTimeout):
        iov.pvm_read(os.getpid(), offs + _addr(dst), offs + _addr(src), np.full(2048, 16, dtype=U64),
                     deadline=time.monotonic() - 1)
    with pytest.raises(TransferTimeout):
        iov.local_copy(offs + _addr(dst), offs + _addr(src), np.full(2048, 8, dtype=U64),
                       deadline=time.monotonic() - 1, checked=False)


@pytest.mark.parametrize("checked", [True, False])
def test_local_copy_paths(monkeypatch, checked):
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(2 << 20, dtype=np.uint8)
    d, s, n = _scattered(rng, 1500, 1000, src.size, dst.size)
    if checked:
        monkeypatch.setattr(iov, "_SELF_PVM", False)  # pvm refused: the memmove fallback must work
    iov.local_copy(d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src), n.astype(U64), checked=checked)
    _assert_copied(dst, d, src, s, n)
    empty = np.zeros(0, dtype=U64)
    iov.local_copy(empty, empty, empty)


def test_views_are_writable_windows_on_raw_memory():
    buf = np.arange(100, dtype=np.uint8)
    views = iov.views(np.array([_addr(buf) + U64(10), _addr(buf) + U64(50)]), np.array([5, 0], dtype=U64))
    assert bytes(views[0]) == bytes(range(10, 15)) and len(views[1]) == 0
    views[0][:] = b"abcde"
    assert bytes(buf[10:15]) == b"abcde"
    assert bytes(iov.view(int(_addr(buf)), 3)) == bytes(buf[:3])


def test_range_table():
    t = iov.RangeTable()
    assert not t.contains(np.array([1], dtype=U64), np.array([1], dtype=U64))
    t.add(1000, 100)
    t.add(1100, 50)  # adjacent: coalesced
    t.add(2000, 10)
    t.add(2000, 10)  # registered twice: needs two removes
    addrs = np.array([1000, 1149, 1000, 999, 1150, 2000, 2005, 0, 2 ** 64 - 8], dtype=U64)
    sizes = np.array([150, 1, 151, 2, 1, 10, 6, 0, 16], dtype=U64)
    assert t.check(addrs, sizes).tolist() == [True, True, False, False, False, True, False, False, False]
    huge = np.array([2 ** 63], dtype=U64)
    assert not t.contains(np.array([1000], dtype=U64), huge)  # no wrap-around
    assert t.remove(2000, 10) and t.contains(np.array([2000], dtype=U64), np.array([10], dtype=U64))
    assert t.remove(2000, 10) and not t.contains(np.array([2000], dtype=U64), np.array([1], dtype=U64))
    assert not t.remove(5, 5)
    assert t.contains(np.array([], dtype=U64), np.array([], dtype=U64))


def test_range_table_small_lookup_agrees_with_the_vectorised_check():
    """``contains`` looks a few ranges up one by one: same answers as the numpy check, edges and wrap included."""
    rng = np.random.default_rng(11)
    t = iov.RangeTable()
    for a in rng.integers(0, 1 << 20, 40).tolist():
        t.add(a, int(rng.integers(0, 5000)))
    t.add(2 ** 64 - 8192, 4096)
    starts, ends = t.intervals()
    edges = np.concatenate((starts, ends, starts - U64(1), ends - U64(1))).astype(U64)
    for _ in range(3000):
        n = int(rng.integers(1, 2 * iov._SMALL_LOOKUP))
        addrs = np.where(rng.random(n) < 0.5, rng.choice(edges, n), rng.integers(0, 1 << 21, n)).astype(U64)
        sizes = rng.choice(np.array([0, 1, 7, 4096, 2 ** 63, 2 ** 64 - 1], dtype=U64), n)
        expected = bool(t.check(addrs, sizes).all())
        assert t.contains(addrs, sizes) == expected
        assert t.contains(addrs.tolist(), sizes.tolist()) == expected


def test_chunk_bounds_respect_count_and_bytes():
    sizes = np.full(5000, 100, dtype=U64)
    bounds = iov.chunk_bounds(sizes, max_bytes=1 << 40)
    assert bounds[0] == 0 and bounds[-1] == 5000
    assert max(np.diff(bounds)) <= iov.IOV_MAX
    bounds = iov.chunk_bounds(np.full(10, 1 << 20, dtype=U64), max_bytes=1 << 20)
    assert bounds == list(range(11))


def _scatter_small(op, addrs, sizes, stall, max_bytes=1 << 20):
    """``iov.scatter_io_small`` called like ``iov.scatter_io`` (its ranges as Python ints)."""
    iov.scatter_io_small(op, list(zip(np.asarray(addrs, dtype=U64).tolist(), np.asarray(sizes, dtype=U64).tolist())),
                         stall, max_bytes)


SCATTERS = pytest.mark.parametrize("scatter", [iov.scatter_io, _scatter_small], ids=["arrays", "ints"])


def test_the_ints_scatter_makes_the_same_calls_as_the_array_one():
    """For random plans (many ranges, ranges larger than a window, empty ones), both entry points issue the same
    chunks: the bounds of chunk_bounds."""
    rng = np.random.default_rng(11)
    buf = np.zeros(1 << 22, dtype=np.uint8)
    for _ in range(300):
        n = int(rng.integers(0, 2500))
        sizes = rng.integers(0, int(rng.choice([64, 4096, 1 << 18])), n).astype(U64)
        addrs = U64(_addr(buf)) + (rng.integers(0, 1 << 20, n).astype(U64) if n else np.zeros(0, dtype=U64))
        max_bytes = int(rng.choice([1 << 12, 1 << 16, 1 << 20]))
        calls = {"arrays": [], "ints": []}
        for name, scatter in (("arrays", iov.scatter_io), ("ints", _scatter_small)):
            def op(chunk, log=calls[name]):
                log.append(len(chunk))
                return sum(len(view) for view in chunk)
            scatter(op, addrs, sizes, lambda: None, max_bytes)
        bounds = iov.chunk_bounds(sizes, max_bytes)
        expected = [b - a for a, b in zip(bounds[:-1], bounds[1:])
                    if int(sizes[a:b].sum())]  # a chunk of empty ranges only is skipped
        assert calls["arrays"] == calls["ints"] == expected


@SCATTERS
def test_scatter_io_handles_partial_moves_stalls_and_eof(scatter):
    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 3000, 3000).astype(U64)
    data = rng.integers(0, 256, int(sizes.sum()), dtype=np.uint8)
    dst = np.zeros(int(sizes.sum()) + 64 * len(sizes), dtype=np.uint8)
    offs = (np.cumsum(sizes + U64(64)) - sizes - U64(64)).astype(U64)
    addrs = offs + _addr(dst)
    stream = {"pos": 0, "calls": 0}

    def op(chunk):
        stream["calls"] += 1
        assert len(chunk) <= iov.IOV_MAX
        if stream["calls"] % 7 == 0:
            raise BlockingIOError()
        budget = int(rng.integers(1, 50000))
        moved = 0
        for buf in chunk:
            take = min(len(buf), budget - moved, data.size - stream["pos"])
            buf[:take] = data[stream["pos"]:stream["pos"] + take].tobytes()
            stream["pos"] += take
            moved += take
            if moved == budget:
                break
        return moved

    stalls = []
    scatter(op, addrs, sizes, lambda: stalls.append(1), max_bytes=1 << 16)
    assert stream["pos"] == data.size and stalls
    flat = np.concatenate([dst[o:o + n] for o, n in zip(offs.tolist(), sizes.astype(np.int64).tolist())])
    assert np.array_equal(flat, data)
    with pytest.raises(TransportClosed):
        scatter(lambda chunk: 0, addrs, sizes, lambda: None)
    with pytest.raises(TransferTimeout):
        def stall():
            raise TransferTimeout("stalled")

        def blocked(chunk):
            raise BlockingIOError()

        scatter(blocked, addrs, sizes, stall)


@SCATTERS
def test_scatter_io_checks_the_deadline_between_complete_chunks(scatter):
    """A peer that completes every chunk in time, but too slowly overall, still hits the deadline."""
    buf = np.zeros(8 << 20, dtype=np.uint8)
    sizes = np.full(8, 1 << 20, dtype=U64)
    addrs = U64(_addr(buf)) + np.arange(8, dtype=U64) * U64(1 << 20)
    calls = []

    def steady(chunk):
        calls.append(1)
        return sum(len(view) for view in chunk)

    def stall():
        if len(calls) >= 3:
            raise TransferTimeout("deadline passed")

    with pytest.raises(TransferTimeout):
        scatter(steady, addrs, sizes, stall, max_bytes=1 << 20)
    assert len(calls) == 3


def test_parallel_split_copies_everything_and_reraises(monkeypatch):
    monkeypatch.setattr(iov, "PARALLEL_MIN_BYTES", 1 << 16)
    rng = np.random.default_rng(4)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(2 << 20, dtype=np.uint8)
    d, s, n = _scattered(rng, 900, 2000, src.size, dst.size)
    local, remote = d.astype(U64) + _addr(dst), s.astype(U64) + _addr(src)
    assert iov.pvm_read(os.getpid(), local, remote, n, threads=3) == int(n.sum())
    _assert_copied(dst, d, src, s, n)
    remote = remote.copy()
    remote[-1] = U64(8)  # unmapped, in the last thread's share
    with pytest.raises(RemoteRejected):
        iov.pvm_read(os.getpid(), local, remote, n, threads=2)
