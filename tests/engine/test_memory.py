"""Tests of the engine's host memory facilities (mapping checks, shared segments, backends)."""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import gc
import mmap
import os
import struct
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from llm_datadist._engine import memory
from llm_datadist._engine.errors import OutOfMemory, ParamInvalid
from llm_datadist._engine.memory import (
    PAGE_SIZE, CpuDevice, HostMemory, SharedSegment, backend_for, cuda_available, is_mapped, map_shared,
    np_view, read_bytes, write_bytes,
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _raw_mmap(nbytes: int) -> int:
    addr = _libc.mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, _MAP_FAILED)
    return addr


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _present(addr: int, npages: int) -> list:
    """Whether each page has a page table entry in this process (bit 63 of /proc/self/pagemap, which the kernel
    shows without privileges): what populating a mapping does, read independently of the code under test."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE_SIZE * 8)
        data = f.read(8 * npages)
    return [(entry >> 63) & 1 for entry in struct.unpack(f"<{npages}Q", data)]


def _reserved_bytes(fd: int) -> int:
    """Bytes of backing store the segment's file holds (what posix_fallocate reserves)."""
    return os.fstat(fd).st_blocks * 512


def _vm_flags(addr: int) -> list:
    """The VmFlags of the mapping holding ``addr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                inside = start <= addr < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds 0x{addr:x}")


# -- is_mapped ----------------------------------------------------------------------------------
def test_is_mapped_numpy_array_and_interior_pointer():
    arr = np.zeros(3 * 1024 * 1024 + 17, dtype=np.uint8)
    base = arr.ctypes.data
    assert is_mapped(base, arr.nbytes)
    assert is_mapped(base + 12345, 1000)  # interior pointers are normal
    assert is_mapped(np.uint64(base), np.int64(16))  # numpy integers are accepted


@pytest.mark.parametrize("addr, nbytes", [
    (1, 1), (0, 10), (0, 0), (-4096, 100), (4096, -1), (2**63, 4096), (2**64 - 1, 1), (2**64, 1),
    (2**70, 1), (True, 1), ("x", 1), (None, 1), (1.5, 2), (4096, 2**64),
])
def test_is_mapped_garbage_is_false(addr, nbytes):
    assert is_mapped(addr, nbytes) is False


def test_is_mapped_rejects_float_addresses():
    arr = np.zeros(16, dtype=np.uint8)
    assert not is_mapped(float(arr.ctypes.data), 16)
    assert not is_mapped(arr.ctypes.data, 16.0)


def test_is_mapped_empty_range_is_false():
    arr = np.zeros(16, dtype=np.uint8)
    assert not is_mapped(arr.ctypes.data, 0)


def test_is_mapped_huge_range_from_a_valid_address():
    arr = np.zeros(4096, dtype=np.uint8)
    assert not is_mapped(arr.ctypes.data, 2**62)


def test_is_mapped_false_after_munmap_and_for_holes():
    base = _raw_mmap(3 * PAGE_SIZE)
    try:
        assert is_mapped(base, 3 * PAGE_SIZE)
        assert _libc.munmap(base + PAGE_SIZE, PAGE_SIZE) == 0
        assert is_mapped(base, PAGE_SIZE)
        assert is_mapped(base + 2 * PAGE_SIZE, PAGE_SIZE)
        assert not is_mapped(base + PAGE_SIZE, 1)
        assert not is_mapped(base, 3 * PAGE_SIZE)
        assert not is_mapped(base + PAGE_SIZE - 1, 2)  # straddles into the hole
    finally:
        _libc.munmap(base, 3 * PAGE_SIZE)
    assert not is_mapped(base, PAGE_SIZE)


def test_is_mapped_just_past_an_unmapped_mmap():
    mm = mmap.mmap(-1, 4 * PAGE_SIZE)
    addr = memory._buffer_address(mm)
    assert is_mapped(addr, 4 * PAGE_SIZE)
    mm.close()
    assert not is_mapped(addr, 4 * PAGE_SIZE)
    assert not is_mapped(addr + 4 * PAGE_SIZE - 1, 1)


def test_procmaps_fallback_agrees_with_mincore(monkeypatch):
    arr = np.zeros(1 << 20, dtype=np.uint8)
    base = _raw_mmap(2 * PAGE_SIZE)
    _libc.munmap(base + PAGE_SIZE, PAGE_SIZE)
    cases = [(arr.ctypes.data, arr.nbytes), (1, 1), (base, PAGE_SIZE), (base, 2 * PAGE_SIZE), (0, 5), (-1, 5)]
    truth = [True, False, True, False, False, False]  # what was mapped and unmapped above
    try:
        assert [is_mapped(a, n) for a, n in cases] == truth
        monkeypatch.setattr(memory, "_mincore", lambda: None)
        assert [is_mapped(a, n) for a, n in cases] == truth
    finally:
        _libc.munmap(base, PAGE_SIZE)


def test_procmaps_unreadable_is_false():
    assert memory._is_mapped_procmaps(4096, 1, maps_path="/nonexistent/maps") is False


def test_is_mapped_many_registrations_of_large_ranges():
    arr = np.zeros(64 << 20, dtype=np.uint8)
    assert all(is_mapped(arr.ctypes.data + i * 4096, 32 << 20) for i in range(300))


# -- raw helpers --------------------------------------------------------------------------------
def test_read_write_and_np_view_share_memory():
    arr = np.zeros(64, dtype=np.uint8)
    write_bytes(arr.ctypes.data + 3, b"abc")
    assert bytes(arr[3:6]) == b"abc"
    view = np_view(arr.ctypes.data, 64)
    assert view.dtype == np.uint8 and view.shape == (64,)
    view[10] = 99
    assert arr[10] == 99
    assert read_bytes(arr.ctypes.data + 3, 3) == b"abc"
    assert read_bytes(arr.ctypes.data, 0) == b""
    assert np_view(arr.ctypes.data, 0).size == 0
    write_bytes(arr.ctypes.data, b"")


# -- SharedSegment ------------------------------------------------------------------------------
def test_shared_segment_basics_and_double_close():
    fds = _open_fds()
    seg = SharedSegment(3 * PAGE_SIZE + 5)
    assert seg.nbytes == 3 * PAGE_SIZE + 5
    assert seg.addr % PAGE_SIZE == 0
    assert isinstance(seg.name, str) and os.path.exists(seg.name)
    assert is_mapped(seg.addr, seg.nbytes)
    assert os.fstat(seg.fd).st_size == seg.nbytes
    write_bytes(seg.addr + seg.nbytes - 3, b"xyz")
    assert os.pread(seg.fd, 3, seg.nbytes - 3) == b"xyz"  # the segment's file holds what the mapping wrote
    assert "addr=" in repr(seg)
    seg.close()
    seg.close()
    assert seg.closed and "closed" in repr(seg)
    with pytest.raises(OSError):
        os.fstat(seg.fd)
    assert _open_fds() == fds


def test_shared_segment_mapped_by_second_process():
    seg = SharedSegment(1 << 20)
    try:
        write_bytes(seg.addr, b"from-parent")
        code = textwrap.dedent(f"""
            import mmap, os
            fd = os.open({seg.name!r}, os.O_RDWR)
            mm = mmap.mmap(fd, {seg.nbytes}, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
            assert mm[:11] == b"from-parent", mm[:11]
            mm[4096:4096 + 10] = b"from-child"
            mm.close()
        """)
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert read_bytes(seg.addr + 4096, 10) == b"from-child"
    finally:
        seg.close()


def test_map_shared_in_process_and_closer_idempotent():
    fds = _open_fds()
    with SharedSegment(2 * PAGE_SIZE) as seg:
        addr, closer = map_shared(seg.name, seg.nbytes)
        assert addr != seg.addr
        write_bytes(addr + 7, b"peer")
        assert read_bytes(seg.addr + 7, 4) == b"peer"
        again, again_closer = SharedSegment.map_shared(seg.name, seg.nbytes)  # the same function, on the class
        assert again not in (addr, seg.addr) and read_bytes(again + 7, 4) == b"peer"
        again_closer()
        closer()
        closer()
    assert _open_fds() == fds


def test_map_shared_errors():
    with pytest.raises(ParamInvalid):
        map_shared("/nonexistent/segment", 4096)
    with pytest.raises(ParamInvalid):
        map_shared(None, 4096)  # type: ignore[arg-type]
    with SharedSegment(PAGE_SIZE) as seg:
        with pytest.raises(ParamInvalid):
            map_shared(seg.name, 0)
        with pytest.raises(ParamInvalid):
            map_shared(seg.name, 100 * PAGE_SIZE)  # larger than the segment


@pytest.mark.parametrize("nbytes", [0, -1, True, 1.5, "4096"])
def test_shared_segment_rejects_bad_sizes(nbytes):
    with pytest.raises(ParamInvalid):
        SharedSegment(nbytes)  # type: ignore[arg-type]


def test_shared_segment_dev_shm_fallback(monkeypatch):
    monkeypatch.delattr(os, "memfd_create", raising=False)
    seg = SharedSegment(PAGE_SIZE)
    path = seg.name
    try:
        assert not path.startswith("/proc/")
        assert os.path.exists(path)
        addr, closer = map_shared(path, PAGE_SIZE)
        write_bytes(addr, b"shm")
        assert read_bytes(seg.addr, 3) == b"shm"
        closer()
    finally:
        seg.close()
    assert not os.path.exists(path)
    seg.close()


def test_shared_segment_prefault_reserves_and_maps_every_page():
    npages = (4 << 20) // PAGE_SIZE
    with SharedSegment(4 << 20) as lazy:  # the control: a fresh segment holds nothing and maps nothing
        assert _reserved_bytes(lazy.fd) == 0 and _present(lazy.addr, npages) == [0] * npages
    with SharedSegment(4 << 20, prefault=True) as seg:
        assert _reserved_bytes(seg.fd) >= seg.nbytes
        assert _present(seg.addr, npages) == [1] * npages
        seg.prefault()  # again: nothing changes
        assert _present(seg.addr, npages) == [1] * npages
    seg.prefault()  # closed: no-op


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="no transparent huge pages on this kernel")
def test_shared_segment_hugepage_advice_only_for_large_segments():
    with SharedSegment(4 << 20) as large, SharedSegment(1 << 20) as small, \
            SharedSegment(4 << 20, hugepages=False) as declined:
        assert "hg" in _vm_flags(large.addr)  # the kernel's record of madvise(MADV_HUGEPAGE)
        assert "hg" not in _vm_flags(small.addr) and "hg" not in _vm_flags(declined.addr)


def test_prefault_fallback_touches_pages(monkeypatch):
    monkeypatch.setattr(memory, "_madvise", lambda *args: False)  # no MADV_POPULATE_WRITE: pages are touched
    with SharedSegment(8 * PAGE_SIZE, prefault=True) as seg:
        assert _present(seg.addr, 8) == [1] * 8
        assert _reserved_bytes(seg.fd) >= seg.nbytes
        assert not np_view(seg.addr, seg.nbytes).any()  # touching writes back what was there


def test_prefault_a_sub_range():
    with SharedSegment(8 * PAGE_SIZE) as seg:
        assert _present(seg.addr, 8) == [0] * 8
        seg.prefault(4 * PAGE_SIZE + 10, 2 * PAGE_SIZE)
        assert _present(seg.addr, 8) == [0] * 4 + [1] * 3 + [0]  # from page 4 to the end of the range
        assert 3 * PAGE_SIZE <= _reserved_bytes(seg.fd) < 8 * PAGE_SIZE
        seg.prefault(100 * PAGE_SIZE, PAGE_SIZE)  # outside: nothing to do
        assert _present(seg.addr, 8) == [0] * 4 + [1] * 3 + [0]
        seg.prefault()
        assert _present(seg.addr, 8) == [1] * 8


def test_prefault_reports_out_of_memory(monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    fds = _open_fds()
    with pytest.raises(OutOfMemory, match="cannot reserve"):
        SharedSegment(4 * PAGE_SIZE, prefault=True)
    gc.collect()
    assert _open_fds() == fds


def test_segments_do_not_leak_fds_or_mappings():
    fds = _open_fds()
    for _ in range(50):
        seg = SharedSegment(PAGE_SIZE)
        _, closer = map_shared(seg.name, PAGE_SIZE)
        closer()
        seg.close()
    for _ in range(10):
        SharedSegment(PAGE_SIZE)  # dropped without close: the finalizer releases it
    gc.collect()
    assert _open_fds() == fds


# -- backends -----------------------------------------------------------------------------------
def test_backend_for_host_and_cpu_device(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    host = backend_for(0, 0)
    dev = backend_for(1, 3)
    assert isinstance(host, HostMemory) and not isinstance(host, CpuDevice)
    assert isinstance(dev, CpuDevice)
    assert host.kind == dev.kind == "host"
    assert host.placement == 0 and dev.placement == 1
    assert dev.device_id == 3 and "device_id=3" in repr(dev)
    assert "torch" not in sys.modules
    with pytest.raises(ParamInvalid):
        backend_for(7, 0)


def test_check_range(monkeypatch):
    arr = np.zeros(1 << 16, dtype=np.uint8)
    for backend in (backend_for(0, 0), CpuDevice(0)):
        backend.check_range(arr.ctypes.data, arr.nbytes)
        for addr, nbytes in ((1, 16), (0, 16), (arr.ctypes.data, 2**62)):
            with pytest.raises(ParamInvalid, match="not mapped"):
                backend.check_range(addr, nbytes)


def test_backend_allocate_segment():
    seg = HostMemory().allocate_segment(2 * PAGE_SIZE)
    try:
        assert isinstance(seg, SharedSegment) and seg.nbytes == 2 * PAGE_SIZE
    finally:
        seg.close()


def _fake_torch(available):
    def is_available():
        if isinstance(available, Exception):
            raise available
        return available
    return types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=is_available))


def test_cuda_available_never_imports_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert cuda_available() is False
    assert "torch" not in sys.modules
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(False))
    assert cuda_available() is False
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(RuntimeError("broken driver")))
    assert cuda_available() is False
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(True))
    assert cuda_available() is True


def test_device_backend_with_cuda_but_no_cuda_backend_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(True))
    monkeypatch.setattr(memory, "_DEVICE_BACKENDS", {})
    assert isinstance(backend_for(1, 0), CpuDevice)


def test_device_backend_uses_a_registered_cuda_backend_when_cuda_is_active(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(memory, "_DEVICE_BACKENDS", {})
    memory.register_backend("cuda", lambda device_id: sentinel)
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(False))
    assert isinstance(backend_for(1, 0), CpuDevice)  # registered but CUDA inactive: host memory
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(True))
    assert backend_for(1, 0) is sentinel
    assert isinstance(backend_for(0, 0), HostMemory)


def test_maps_segment_is_true_only_where_the_segments_file_is_mapped_at_its_offset():
    page = mmap.PAGESIZE
    with SharedSegment(8 * page) as seg:
        whole = seg.segment()
        assert memory.maps_segment(seg.addr, 8 * page, whole)
        assert memory.maps_segment(seg.addr + 2 * page, 3 * page, dataclasses.replace(whole, offset=2 * page))
        assert not memory.maps_segment(seg.addr + 2 * page, page, whole)  # offset 0 claimed, 2 pages in
        assert not memory.maps_segment(seg.addr, page, dataclasses.replace(whole, ino=whole.ino + 1))
        assert not memory.maps_segment(seg.addr, 9 * page, whole)  # runs past the mapping
        anon = mmap.mmap(-1, page)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(anon))
        try:
            assert not memory.maps_segment(addr, page, whole)  # private pages, not the file's
        finally:
            del addr
            anon.close()
