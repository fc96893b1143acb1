"""The compiled data path (_transport/_fastpath.c through pvm.rw_whole) against the pure-Python one (pvm.rw): the
same bytes, the same errors, guard words checked in every call, parts split across threads, the GIL free while the
bytes move, and arguments checked before anything moves."""
from __future__ import annotations

import array
import ctypes
import mmap
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import subsystems
from llm_datadist._transport import pvm
from llm_datadist._transport.base import CopyPlan, RemoteRejected, StaleMemory, TransferTimeout, TransportClosed

_why = None if pvm.compiled() else "the compiled data path is not built here (or LLM_DATADIST_PURE_PYTHON is set)"
pytestmark = subsystems.skip_if_missing("fastpath", _why)
_fastpath = pvm._FAST

U64 = np.uint64
MiB = 1 << 20


def _scattered_plan(rng, n, max_size, src, dst):
    """n ops of 1..max_size bytes from random places of ``src`` to ascending places of ``dst``."""
    sizes = rng.integers(1, max_size, n).astype(U64)
    dst_off = (np.cumsum(sizes + rng.integers(0, 64, n).astype(U64)) - sizes).astype(U64)
    src_off = rng.integers(0, src.size - max_size, n).astype(U64)
    assert int(dst_off[-1] + sizes[-1]) <= dst.size
    return CopyPlan(dst_off + U64(dst.ctypes.data), src_off + U64(src.ctypes.data), sizes), dst_off, src_off, sizes


def _copied(dst, dst_off, src, src_off, sizes):
    return all(np.array_equal(dst[d:d + n], src[s:s + n])
               for d, s, n in zip(dst_off.tolist(), src_off.tolist(), sizes.tolist()))


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("n, max_size", [(1, 100), (3000, 3000), (40, 300_000)])
def test_same_bytes_as_the_python_path(threads, n, max_size):
    rng = np.random.default_rng([n, threads])
    src = rng.integers(0, 256, 16 * MiB, dtype=np.uint8)
    ours, theirs = np.zeros(16 * MiB, np.uint8), np.zeros(16 * MiB, np.uint8)
    plan, d, s, sizes = _scattered_plan(rng, n, max_size, src, ours)
    moved = pvm.rw_whole(False, os.getpid(), plan, None, (), threads, 64 * 1024)
    assert moved == int(sizes.sum()) and _copied(ours, d, src, s, sizes)
    other = CopyPlan(d + U64(theirs.ctypes.data), s + U64(src.ctypes.data), sizes)
    assert pvm.read(os.getpid(), other) == moved
    assert np.array_equal(ours, theirs)  # nothing outside the destination ranges was touched either
    back = np.zeros_like(src)
    assert pvm.rw_whole(True, os.getpid(), CopyPlan(d + U64(ours.ctypes.data), s + U64(back.ctypes.data), sizes),
                        None, (), threads, 64 * 1024) == moved
    assert _copied(back, s, ours, d, sizes)


def test_small_plans_of_ints_and_empty_plans():
    src = np.arange(64, dtype=np.uint8)
    dst = np.zeros(64, np.uint8)
    plan = CopyPlan([dst.ctypes.data + 8], [src.ctypes.data + 16], [8])
    assert pvm.rw_whole(False, os.getpid(), plan, None, (), 4, MiB) == 8
    assert dst[8:16].tolist() == list(range(16, 24))
    assert pvm.rw_whole(False, os.getpid(), CopyPlan([], [], []), None, (), 1, MiB) == 0


def test_guards_are_read_first_and_last_in_every_call():
    word = array.array("Q", [0x1234])
    guard = [(word.buffer_info()[0], 0x1234)]
    src = np.arange(1 << 16, dtype=np.uint8)
    dst = np.zeros(1 << 16, np.uint8)
    plan = CopyPlan([dst.ctypes.data], [src.ctypes.data], [1 << 16])
    assert pvm.rw_whole(False, os.getpid(), plan, None, guard, 1, MiB) == 1 << 16
    word[0] = 0x9999  # the owner released the memory: its generation word changed
    with pytest.raises(StaleMemory):
        pvm.rw_whole(False, os.getpid(), plan, None, guard, 1, MiB)
    with pytest.raises(StaleMemory):  # a plan of no ops still reads its guards
        pvm.rw_whole(False, os.getpid(), CopyPlan([], [], []), None, guard, 1, MiB)


def test_a_guard_changed_during_a_long_read_fails_it():
    """Every system call checks the guards: a word that changes between calls of one plan fails the plan."""
    word = array.array("Q", [7])
    guard = [(word.buffer_info()[0], 7)]
    src = np.ones(64 * MiB, np.uint8)
    dst = np.zeros(64 * MiB, np.uint8)
    sizes = np.full(64 * 1024, 1024, dtype=U64)  # 64 calls of 1024 iovecs
    offs = np.arange(64 * 1024, dtype=U64) * U64(1024)
    plan = CopyPlan(offs + U64(dst.ctypes.data), offs + U64(src.ctypes.data), sizes)
    flip = threading.Timer(0.0005, lambda: word.__setitem__(0, 8))
    flip.start()
    try:
        pvm.rw_whole(False, os.getpid(), plan, None, guard, 1, MiB)
    except StaleMemory:
        pass
    else:  # the copy outran the timer: then the words must still have been 7 at its last call
        flip.join()
        with pytest.raises(StaleMemory):
            pvm.rw_whole(False, os.getpid(), plan, None, guard, 1, MiB)
    flip.join()


def test_unmapped_memory_is_refused_not_copied():
    """A range that runs into a hole: the kernel copies up to it and stops short; the call fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    base = libc.mmap(None, 3 * page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    try:
        assert libc.munmap(base + 2 * page, page) == 0  # the third page is a hole now
        dst = np.zeros(2 * page, np.uint8)
        with pytest.raises(RemoteRejected):
            pvm.rw_whole(False, os.getpid(), CopyPlan([dst.ctypes.data], [base + page], [2 * page]), None, (), 1,
                         MiB)
        with pytest.raises(RemoteRejected):
            pvm.rw_whole(False, os.getpid(), CopyPlan([dst.ctypes.data], [8], [16]), None, (), 1, MiB)
    finally:
        libc.munmap(base, 2 * page)


def test_a_dead_process_is_transport_closed():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    buf = np.zeros(16, np.uint8)
    with pytest.raises(TransportClosed):
        pvm.rw_whole(False, proc.pid, CopyPlan([buf.ctypes.data], [buf.ctypes.data], [16]), None, (), 1, MiB)


def test_the_deadline_is_checked_before_every_call():
    buf = np.zeros(16, np.uint8)
    plan = CopyPlan([buf.ctypes.data], [buf.ctypes.data + 8], [8])
    with pytest.raises(TransferTimeout):
        pvm.rw_whole(False, os.getpid(), plan, time.monotonic() - 1.0, (), 1, MiB)


def test_arguments_are_checked_before_anything_moves():
    q = array.array("Q", [0])
    with pytest.raises(TypeError):
        _fastpath.pvm_rw(False, os.getpid(), [1], q, q, q, q, 1, MiB, 0.0)  # a list is no uint64 buffer
    with pytest.raises(TypeError):
        _fastpath.pvm_rw(False, os.getpid(), array.array("I", [0]), q, q, q, q, 1, MiB, 0.0)  # 32-bit items
    with pytest.raises(ValueError):
        _fastpath.pvm_rw(False, os.getpid(), array.array("Q", [0, 0]), q, q, q, q, 1, MiB, 0.0)  # lengths differ
    with pytest.raises(ValueError):
        _fastpath.pvm_rw(False, 0, q, q, q, q, q, 1, MiB, 0.0)  # no pid 0
    with pytest.raises(ValueError):
        _fastpath.pvm_rw(True, os.getpid(), q, q, q, q, q, 1, MiB, 0.0)  # guards on a write
    with pytest.raises(RemoteRejected):
        pvm.rw_whole(False, os.getpid(), CopyPlan([], [], []), None, [(8, 0)] * 300, 1, MiB)


def test_the_gil_is_free_while_the_bytes_move():
    """With a long switch interval no thread takes the GIL from a running one: a counting thread advances only if
    the one compiled call lets go of it while the bytes move."""
    src = np.ones(128 * MiB, np.uint8)
    dst = np.zeros(128 * MiB, np.uint8)
    plan = CopyPlan([dst.ctypes.data], [src.ctypes.data], [128 * MiB])
    ticks = [0]
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            ticks[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    try:
        counter = threading.Thread(target=count)
        counter.start()  # from here on this thread keeps the GIL until it lets go or 0.5 s pass
        before = ticks[0]
        pvm.rw_whole(False, os.getpid(), plan, None, (), 1, MiB)
        after = ticks[0]
        done.set()
        counter.join()
    finally:
        sys.setswitchinterval(interval)
    assert after > before
    assert dst[0] == 1 and dst[-1] == 1


@pytest.mark.parametrize("threads", [1, 3])
def test_memmoves_inside_this_process(threads):
    """Mode MEMCPY: the unchecked local copy (ranges the caller guarantees mapped), split and GIL-free too."""
    rng = np.random.default_rng(threads)
    src = rng.integers(0, 256, 16 * MiB, dtype=np.uint8)
    dst = np.zeros(16 * MiB, np.uint8)
    plan, d, s, sizes = _scattered_plan(rng, 500, 60_000, src, dst)
    assert pvm.rw_whole(pvm.MEMCPY, os.getpid(), plan, None, (), threads, 64 * 1024) == int(sizes.sum())
    assert _copied(dst, d, src, s, sizes)
    with pytest.raises(TransferTimeout):
        pvm.rw_whole(pvm.MEMCPY, os.getpid(), plan, time.monotonic() - 1, (), threads, 64 * 1024)
    q = array.array("Q", [0])
    with pytest.raises(ValueError):
        _fastpath.pvm_rw(3, os.getpid(), q, q, q, array.array("Q"), array.array("Q"), 1, MiB, 0.0)  # no mode 3
    with pytest.raises(ValueError):
        _fastpath.pvm_rw(pvm.MEMCPY, os.getpid(), q, q, q, q, q, 1, MiB, 0.0)  # guards on a memcpy
