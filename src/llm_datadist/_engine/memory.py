"""Memory facilities: mapping checks, shareable segments, raw views and one backend per memory kind."""
from __future__ import annotations

import abc
import atexit
import ctypes
import errno
import itertools
import logging
import mmap
import operator
import os
import sys
import threading
import weakref
from typing import Callable, ClassVar, Iterator, List, Optional, Tuple

import numpy as np

from llm_datadist._engine.errors import OutOfMemory, ParamInvalid
from llm_datadist._transport import copies, parallel
from llm_datadist._transport.base import CUDA, HOST, Segment

__all__ = [
    "PAGE_SIZE", "PLACEMENT_HOST", "PLACEMENT_DEVICE", "HOST", "CUDA",
    "is_mapped", "SharedSegment", "map_shared", "MemoryBackend", "HostMemory", "CpuDevice",
    "backend_for", "register_backend", "cuda_available", "read_bytes", "write_bytes", "np_view",
]

_log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
PLACEMENT_HOST = 0
PLACEMENT_DEVICE = 1

_ADDR_LIMIT = 1 << 64
_CHUNK_PAGES = 1 << 18  # pages checked per mincore call (1 GiB with 4 KiB pages; vec of 256 KiB)
_HUGE_MIN = 2 << 20
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_counter = itertools.count()


# ----------------------------------------------------------------------------------------------
# Mapping checks
# ----------------------------------------------------------------------------------------------
_mincore_fn: Optional[Callable[..., int]] = None
_mincore_loaded = False


def _mincore() -> Optional[Callable[..., int]]:
    """The libc ``mincore`` function, or None when this platform has none."""
    global _mincore_fn, _mincore_loaded
    if not _mincore_loaded:
        try:
            fn = ctypes.CDLL(None, use_errno=True).mincore
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            _mincore_fn = fn
        except (OSError, AttributeError):
            _mincore_fn = None
        _mincore_loaded = True
    return _mincore_fn


def _as_range(addr: object, nbytes: object) -> Optional[Tuple[int, int]]:
    """Validate (addr, nbytes) as a non-empty range of the 64-bit address space, else None."""
    if isinstance(addr, bool) or isinstance(nbytes, bool):
        return None
    try:
        start, size = operator.index(addr), operator.index(nbytes)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if start <= 0 or size <= 0 or start + size > _ADDR_LIMIT:
        return None
    return start, size


def _is_mapped_mincore(fn: Callable[..., int], start: int, size: int) -> bool:
    lo = start - start % PAGE_SIZE
    hi = -(-(start + size) // PAGE_SIZE) * PAGE_SIZE
    if hi > _ADDR_LIMIT:
        return False
    vec = (ctypes.c_ubyte * min((hi - lo) // PAGE_SIZE, _CHUNK_PAGES))()
    pos, retries = lo, 0
    while pos < hi:
        length = min(len(vec) * PAGE_SIZE, hi - pos)
        if fn(pos, length, vec) != 0:
            if ctypes.get_errno() == errno.EAGAIN and retries < 3:
                retries += 1
                continue
            return False  # ENOMEM: a page of the range is not mapped (or not a user address)
        pos += length
    return True


def _mappings_over(start: int, size: int, maps_path: str = "/proc/self/maps") -> Iterator[Tuple[int, int, List[str]]]:
    """(lo, hi, fields of the line) of the mappings of /proc/self/maps that cover ``[start, start + size)`` in turn;
    stops early at the first gap (the caller sees the cover fall short)."""
    pos = start
    with open(maps_path) as f:
        for line in f:
            fields = line.split()
            lo_s, _, hi_s = fields[0].partition("-")
            lo, hi = int(lo_s, 16), int(hi_s, 16)
            if hi <= pos:
                continue
            if lo > pos:
                return
            yield lo, hi, fields
            pos = hi
            if pos >= start + size:
                return


def _is_mapped_procmaps(start: int, size: int, maps_path: str = "/proc/self/maps") -> bool:
    """Fallback: walk the sorted mapping list of /proc/self/maps over [start, start+size)."""
    try:
        return any(hi >= start + size for _lo, hi, _fields in _mappings_over(start, size, maps_path))
    except (OSError, ValueError):
        return False


def maps_segment(addr: int, nbytes: int, segment: Segment, maps_path: str = "/proc/self/maps") -> bool:
    """Whether ``[addr, addr + nbytes)`` is still mapped from ``segment``'s file at ``segment.offset`` onwards.

    The owner's truth after pages were replaced behind a registered range (``remap_registered_memory``): another
    process that maps the segment sees the file's pages, so an alias is only right while this process does too.
    """
    pos = addr
    try:
        for lo, hi, fields in _mappings_over(addr, nbytes, maps_path):
            if len(fields) < 5:
                return False
            major, _, minor = fields[3].partition(":")
            if (int(fields[4]) != segment.ino or os.makedev(int(major, 16), int(minor, 16)) != segment.dev
                    or int(fields[2], 16) + (pos - lo) != segment.offset + (pos - addr)):
                return False
            pos = hi
    except (OSError, ValueError):
        return False
    return pos >= addr + nbytes


def is_mapped(addr: int, nbytes: int) -> bool:
    """Whether every page of ``[addr, addr + nbytes)`` is mapped in this process.

    Never raises: garbage input (0, negatives, non-ints, ranges past 2**64, empty ranges) gives False.
    PROT_NONE mappings (guard pages) count as mapped, as mincore reports them.
    """
    rng = _as_range(addr, nbytes)
    if rng is None:
        return False
    fn = _mincore()
    if fn is not None:
        return _is_mapped_mincore(fn, *rng)
    return _is_mapped_procmaps(*rng)


# ----------------------------------------------------------------------------------------------
# Raw memory helpers
# ----------------------------------------------------------------------------------------------
def read_bytes(addr: int, n: int) -> bytes:
    """Copy ``n`` bytes starting at raw address ``addr`` (the caller guarantees the range is valid)."""
    return ctypes.string_at(addr, n) if n > 0 else b""


def write_bytes(addr: int, data: bytes) -> None:
    """Copy ``data`` to raw address ``addr`` (the caller guarantees the range is valid)."""
    buf = bytes(data)
    if buf:
        ctypes.memmove(addr, buf, len(buf))


def np_view(addr: int, nbytes: int) -> np.ndarray:
    """A writable uint8 numpy view over raw memory, no copy. It must not outlive the memory."""
    if nbytes <= 0:
        return np.empty(0, dtype=np.uint8)
    buffer = (ctypes.c_ubyte * nbytes).from_address(addr)
    return np.frombuffer(buffer, dtype=np.uint8)  # type: ignore[call-overload]  # numpy's stubs omit ctypes buffers


def _buffer_address(mm: mmap.mmap) -> int:
    """Address of an mmap's memory; the temporary buffer export is released before returning."""
    obj = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(obj)
    finally:
        del obj


# ----------------------------------------------------------------------------------------------
# Shareable segments
# ----------------------------------------------------------------------------------------------
def _release(mm: mmap.mmap, fd: int, unlink_path: Optional[str]) -> None:
    """Unmap, close and unlink; every step is attempted even if an earlier one fails."""
    try:
        mm.close()
    except (BufferError, ValueError, OSError) as exc:  # pragma: no cover - exports are never kept
        _log.warning("could not unmap shared segment: %s", exc)
    _release_fd_only(fd, unlink_path)


def _create_fd(nbytes: int) -> Tuple[int, str, Optional[str]]:
    """Create the backing file: (fd, name for peers, path to unlink at close or None)."""
    tag = f"llm_datadist.{os.getpid()}.{next(_counter)}"
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create(tag, getattr(os, "MFD_CLOEXEC", 1))
            return fd, f"/proc/{os.getpid()}/fd/{fd}", None
        except OSError as exc:
            _log.debug("memfd_create unavailable (%s), using /dev/shm", exc)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    path = os.path.join(base, tag)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    return fd, path, path


class SharedSegment:
    """An anonymous, shareable host memory segment of ``nbytes`` bytes (memfd, else /dev/shm).

    ``name`` lets another process on this host map the same memory with :func:`map_shared` while this
    segment is open. Closing is idempotent and also happens at garbage collection or interpreter exit.
    """

    def __init__(self, nbytes: int, prefault: bool = False, hugepages: bool = True) -> None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ParamInvalid(f"shared segment size must be a positive int, got {nbytes!r}")
        try:
            fd, name, unlink_path = _create_fd(nbytes)
        except OSError as exc:
            raise OutOfMemory(f"cannot create a shared segment of {nbytes} bytes: {exc}") from exc
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            _release_fd_only(fd, unlink_path)
            raise OutOfMemory(f"cannot map a shared segment of {nbytes} bytes: {exc}") from exc
        self.nbytes = nbytes
        self.name = name
        self.fd = fd
        self.addr = _buffer_address(mm)
        self._mm = mm
        self._closed = False
        self._finalizer = weakref.finalize(self, _release, mm, fd, unlink_path)
        # Never unmap at interpreter exit: daemon threads and the engines' own exit-time finalize may still
        # touch the memory then, and the kernel reclaims it anyway. A /dev/shm file is still unlinked.
        self._finalizer.atexit = False
        if unlink_path:
            atexit.register(_release_fd_only, -1, unlink_path)
        if hugepages and nbytes >= _HUGE_MIN:
            _madvise(mm, getattr(mmap, "MADV_HUGEPAGE", None))
        if prefault:
            try:
                self.prefault()
            except BaseException:
                self.close()
                raise

    @property
    def closed(self) -> bool:
        return self._closed

    def segment(self) -> Segment:
        """How a process of this host opens the same memory (path, identity of the file)."""
        st = os.fstat(self.fd)
        return Segment(path=self.name, offset=0, dev=st.st_dev, ino=st.st_ino, size=self.nbytes)

    def prefault(self, offset: int = 0, nbytes: Optional[int] = None) -> None:
        """Reserve and fault in ``[offset, offset + nbytes)`` now (default: the whole segment).

        Backing pages are reserved first (posix_fallocate), so a short host fails here with OutOfMemory
        instead of with SIGBUS on a later access; then page tables are populated.
        """
        if self._closed:
            return
        start = max(0, offset) // PAGE_SIZE * PAGE_SIZE
        end = min(self.nbytes, offset + (self.nbytes if nbytes is None else nbytes))
        if end <= start:
            return
        try:
            os.posix_fallocate(self.fd, start, end - start)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise OutOfMemory(f"cannot reserve {end - start} bytes of shared memory: {exc}") from exc
        except AttributeError:  # pragma: no cover - platforms without posix_fallocate
            pass
        if not _madvise(self._mm, _MADV_POPULATE_WRITE, start, end - start):
            view = np_view(self.addr + start, end - start)
            view[::PAGE_SIZE] |= 0  # a write to every page (a plain self-assignment is skipped by numpy)

    def close(self) -> None:
        """Unmap and release the segment (idempotent). Views over it must no longer be used."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> SharedSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"addr=0x{self.addr:x}"
        return f"SharedSegment(name={self.name!r}, nbytes={self.nbytes}, {state})"


def _release_fd_only(fd: int, unlink_path: Optional[str]) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
    if unlink_path:
        try:
            os.unlink(unlink_path)
        except OSError:
            pass


def _madvise(mm: mmap.mmap, advice: Optional[int], start: int = 0, length: int = 0) -> bool:
    if advice is None or not hasattr(mm, "madvise"):
        return False
    try:
        if length:
            mm.madvise(advice, start, length)
        else:
            mm.madvise(advice)
        return True
    except (OSError, ValueError):
        return False


class _Unmapper:
    """Idempotent closer of a peer mapping returned by :func:`map_shared`."""

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm: Optional[mmap.mmap] = mm
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            mm, self._mm = self._mm, None
        if mm is not None:
            mm.close()


def map_shared(name: str, nbytes: int) -> Tuple[int, Callable[[], None]]:
    """Map ``nbytes`` of a peer's :class:`SharedSegment` (by its ``name``) read-write in this process.

    Returns:
        ``(addr, closer)``; calling ``closer()`` unmaps (idempotent).

    Raises:
        ParamInvalid: the name cannot be opened or is smaller than ``nbytes``.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ParamInvalid(f"mapping size must be a positive int, got {nbytes!r}")
    try:
        fd = os.open(name, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except (OSError, TypeError, ValueError) as exc:
        raise ParamInvalid(f"cannot open shared segment {name!r}: {exc}") from exc
    try:
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        raise ParamInvalid(f"cannot map {nbytes} bytes of shared segment {name!r}: {exc}") from exc
    finally:
        os.close(fd)
    return _buffer_address(mm), _Unmapper(mm)


SharedSegment.map_shared = staticmethod(map_shared)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# Backends per placement
# ----------------------------------------------------------------------------------------------
class MemoryBackend(abc.ABC):
    """Where the memory of one kind lives: address checks, pool segments and local copies.

    One backend per memory kind (``host``; ``cuda`` once a CUDA backend registers itself with
    :func:`register_backend`). Placement DEVICE maps to the CUDA backend when CUDA is active, else to host
    memory (a "CPU device").
    """

    kind: ClassVar[str] = HOST
    placement: ClassVar[int] = PLACEMENT_HOST

    def __init__(self, device_id: int = 0) -> None:
        self.device_id = device_id

    @abc.abstractmethod
    def check_range(self, addr: int, nbytes: int) -> None:
        """Raise ParamInvalid unless ``[addr, addr + nbytes)`` is usable memory of this backend."""

    @abc.abstractmethod
    def allocate_segment(self, nbytes: int, prefault: bool = False) -> SharedSegment:
        """Allocate one shareable segment of ``nbytes`` bytes (OutOfMemory when impossible)."""

    @abc.abstractmethod
    def copy(self, dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, deadline: Optional[float]) -> None:
        """Copy ``sizes[i]`` bytes from ``src[i]`` to ``dst[i]``, both in memory of this kind (one batch)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device_id={self.device_id})"


class HostMemory(MemoryBackend):
    """``Placement.HOST``: ordinary host memory of this process."""

    kind = HOST
    placement = PLACEMENT_HOST

    def check_range(self, addr: int, nbytes: int) -> None:
        if not is_mapped(addr, nbytes):
            raise ParamInvalid(f"address range [{_hex(addr)}, +{nbytes}) is not mapped host memory "
                               f"of this process")

    def allocate_segment(self, nbytes: int, prefault: bool = False) -> SharedSegment:
        return SharedSegment(nbytes, prefault=prefault)

    def copy(self, dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, deadline: Optional[float]) -> None:
        """process_vm_readv on our own pid (an unmapped address fails instead of crashing), two threads
        for large batches."""
        copies.local_copy(dst, src, sizes, deadline, checked=True, threads=parallel.COPY_THREADS)


class CpuDevice(HostMemory):
    """``Placement.DEVICE`` on a machine without CUDA: plain host memory (a "CPU device")."""

    placement = PLACEMENT_DEVICE


def _hex(addr: object) -> str:
    return hex(addr) if isinstance(addr, int) else repr(addr)


def cuda_available() -> bool:
    """True only if torch is already imported and reports CUDA; never imports anything itself."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install must not break host paths
        return False


_DEVICE_BACKENDS: dict[str, Callable[[int], MemoryBackend]] = {}


def register_backend(kind: str, factory: Callable[[int], MemoryBackend]) -> None:
    """Make ``factory(device_id)`` the backend of Placement.DEVICE memory of ``kind`` (e.g. ``cuda``)."""
    _DEVICE_BACKENDS[kind] = factory


def device_backends() -> list[str]:
    """Kinds of device memory that have a registered backend."""
    return list(_DEVICE_BACKENDS)


def backend_for(placement: int, device_id: int = 0) -> MemoryBackend:
    """The memory backend of a placement: HOST → HostMemory, DEVICE → CUDA when active and registered,
    else CpuDevice."""
    if int(placement) == PLACEMENT_HOST:
        return HostMemory(device_id)
    if int(placement) != PLACEMENT_DEVICE:
        raise ParamInvalid(f"unknown placement {placement!r}")
    factory = _DEVICE_BACKENDS.get(CUDA)
    if factory is not None and cuda_available():
        return factory(device_id)
    return CpuDevice(device_id)
