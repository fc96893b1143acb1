"""Memory pools for ``mem_pool_cfg`` / ``host_mem_pool_cfg``: one shareable segment, free-list allocator."""
from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from llm_datadist._engine.errors import Finalized, OutOfMemory, ParamInvalid
from llm_datadist._engine.memory import PAGE_SIZE, MemoryBackend, SharedSegment
from llm_datadist._transport.base import Region, Segment

__all__ = ["PoolConfig", "parse_pool_config", "MemPool", "DEFAULT_PAGE_SHIFT"]

_log = logging.getLogger(__name__)

DEFAULT_PAGE_SHIFT = 16
_MIN_PAGE_SHIFT = 10
_MAX_PAGE_SHIFT = 31  # exclusive
_UINT64_MAX = (1 << 64) - 1
_MAX_PAGES = (1 << 32) - 1  # (memory_size >> page_shift) must stay below this


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """A validated pool configuration (``memory_size`` bytes, pages of ``1 << page_shift`` bytes)."""

    memory_size: int
    page_shift: int = DEFAULT_PAGE_SHIFT

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift


def _unsigned(obj: dict, name: str, default: Optional[int]) -> int:
    if name not in obj:
        if default is None:
            raise ParamInvalid(f"memory pool config requires \"{name}\"")
        return default
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise ParamInvalid(f"memory pool config \"{name}\" must be an unsigned integer, got {value!r}")
    return value


def parse_pool_config(text: str) -> PoolConfig:
    """Parse ``{"memory_size": n > 0, "page_shift": 10 <= x < 31 (default 16)}``.

    Raises:
        ParamInvalid: not JSON, not an object, a missing or non-unsigned value, or a value out of range.
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise ParamInvalid(f"memory pool config must be a JSON string, got {type(text).__name__}")
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParamInvalid(f"memory pool config is not valid JSON: {text!r}") from exc
    if not isinstance(obj, dict):
        raise ParamInvalid(f"memory pool config must be a JSON object, got {text!r}")
    memory_size = _unsigned(obj, "memory_size", None)
    page_shift = _unsigned(obj, "page_shift", DEFAULT_PAGE_SHIFT)
    if memory_size == 0:
        raise ParamInvalid("memory pool config \"memory_size\" must be > 0")
    if not _MIN_PAGE_SHIFT <= page_shift < _MAX_PAGE_SHIFT:
        raise ParamInvalid(f"memory pool config \"page_shift\" must be in [{_MIN_PAGE_SHIFT}, {_MAX_PAGE_SHIFT}), "
                           f"got {page_shift}")
    if (memory_size >> page_shift) >= _MAX_PAGES:
        raise ParamInvalid(f"memory pool config: memory_size {memory_size} has too many pages of "
                           f"{1 << page_shift} bytes (must be < 2^32-1)")
    return PoolConfig(memory_size, page_shift)


class MemPool:
    """A pool over ONE shared segment: page-granular, page-aligned first-fit allocator with coalescing.

    Usable capacity (``total``) is ``memory_size`` rounded down to whole pages. Every allocation is rounded
    up to the page size and its address is aligned to it. All methods are thread-safe.
    """

    def __init__(self, config: PoolConfig, backend: MemoryBackend, prefault: bool = False) -> None:
        """Reserve the pool's segment from ``backend``; ``prefault`` also commits its pages now.

        Raises:
            OutOfMemory: the segment cannot be created (or, with ``prefault``, its pages reserved).
        """
        self.config = config
        self.backend = backend
        self._page = config.page_size
        self._total = (config.memory_size // self._page) * self._page
        slack = self._page - PAGE_SIZE if self._page > PAGE_SIZE else 0
        self._segment: Optional[SharedSegment] = backend.allocate_segment(max(self._total, self._page) + slack)
        seg = self._segment
        self._base = -(-seg.addr // self._page) * self._page
        shared = seg.segment()
        self._region = Region(addr=self._base, nbytes=self._total, kind=backend.kind, device_id=backend.device_id,
                              segment=Segment(shared.path, self._base - seg.addr, shared.dev, shared.ino, shared.size))
        self._lock = threading.Lock()
        self._free_offs: List[int] = [0] if self._total else []  # sorted offsets of free blocks
        self._free_size: Dict[int, int] = {0: self._total} if self._total else {}
        self._used: Dict[int, int] = {}  # offset -> rounded size
        self._used_bytes = 0
        if prefault and self._total:
            try:
                seg.prefault(self._base - seg.addr, self._total)
            except OutOfMemory:
                self._segment = None
                seg.close()
                raise
        _log.info("memory pool ready: %s bytes, page %s, %r", self._total, self._page, backend)

    # -- allocation ------------------------------------------------------------------------------
    def _round(self, nbytes: int) -> int:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ParamInvalid(f"allocation size must be a positive int, got {nbytes!r}")
        return -(-nbytes // self._page) * self._page

    def _take(self, size: int) -> Optional[int]:
        """First fit over the address-ordered free list; returns the offset or None. Lock held."""
        for i, off in enumerate(self._free_offs):
            avail = self._free_size[off]
            if avail < size:
                continue
            del self._free_size[off]
            if avail == size:
                del self._free_offs[i]
            else:
                self._free_offs[i] = off + size
                self._free_size[off + size] = avail - size
            self._used[off] = size
            self._used_bytes += size
            return off
        return None

    def _give(self, off: int) -> None:
        """Return the block at ``off`` to the free list, coalescing with both neighbours. Lock held."""
        size = self._used.pop(off)
        self._used_bytes -= size
        i = bisect.bisect_left(self._free_offs, off)
        if i < len(self._free_offs) and off + size == self._free_offs[i]:  # merge with the next block
            size += self._free_size.pop(self._free_offs[i])
            del self._free_offs[i]
        if i > 0:
            prev = self._free_offs[i - 1]
            if prev + self._free_size[prev] == off:  # merge into the previous block
                self._free_size[prev] += size
                return
        self._free_offs.insert(i, off)
        self._free_size[off] = size

    def _check_open(self) -> None:
        if self._segment is None:
            raise Finalized("memory pool is closed")

    def allocate(self, nbytes: int) -> int:
        """Allocate ``nbytes`` (rounded up to the page size) and return its address.

        Raises:
            OutOfMemory: no free block is large enough (raised at once, never waits).
        """
        size = self._round(nbytes)
        with self._lock:
            self._check_open()
            off = self._take(size)
            if off is None:
                raise OutOfMemory(self._oom_message(size))
            return self._base + off

    def allocate_many(self, sizes: Sequence[int]) -> List[int]:
        """Allocate every size or nothing; on failure what was taken is released and OutOfMemory raised."""
        rounded = [self._round(n) for n in sizes]
        with self._lock:
            self._check_open()
            taken: List[int] = []
            for size in rounded:
                off = self._take(size)
                if off is None:
                    for done in reversed(taken):
                        self._give(done)
                    raise OutOfMemory(self._oom_message(size, sum(rounded)))
                taken.append(off)
            return [self._base + off for off in taken]

    def free(self, addr: int) -> None:
        """Return an allocation by its address. Unknown address or double free → ParamInvalid.

        After :meth:`close` this is a no-op (the memory is already gone).
        """
        with self._lock:
            if self._segment is None:
                return
            off = addr - self._base if isinstance(addr, int) else -1
            if off not in self._used:
                raise ParamInvalid(f"address {addr!r} is not an allocation of this memory pool")
            self._give(off)

    def free_many(self, addrs: Sequence[int]) -> None:
        """Free several allocations; every address is checked before anything is freed (no-op if closed)."""
        with self._lock:
            if self._segment is None:
                return
            offs = [a - self._base if isinstance(a, int) else -1 for a in addrs]
            bad = [a for a, off in zip(addrs, offs) if off not in self._used]
            if bad or len(set(offs)) != len(offs):
                raise ParamInvalid(f"addresses {bad or list(addrs)!r} are not distinct allocations of this pool")
            for off in offs:
                self._give(off)

    def _oom_message(self, size: int, request: int = 0) -> str:
        largest = max(self._free_size.values(), default=0)
        need = f"{size} bytes" + (f" (request of {request} bytes in all)" if request > size else "")
        return (f"memory pool exhausted: cannot allocate {need}; free {self._total - self._used_bytes} of "
                f"{self._total} bytes, largest free block {largest}")

    # -- queries ---------------------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return self._page

    @property
    def total(self) -> int:
        return self._total

    @property
    def used(self) -> int:
        with self._lock:
            return self._used_bytes

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._total - self._used_bytes

    @property
    def largest_free(self) -> int:
        with self._lock:
            return max(self._free_size.values(), default=0)

    @property
    def num_allocations(self) -> int:
        with self._lock:
            return len(self._used)

    def stats(self) -> Dict[str, int]:
        """A consistent snapshot of the counters."""
        with self._lock:
            return {"total": self._total, "used": self._used_bytes, "free_bytes": self._total - self._used_bytes,
                    "largest_free": max(self._free_size.values(), default=0),
                    "num_allocations": len(self._used), "num_free_blocks": len(self._free_offs)}

    def free_blocks(self) -> List[Tuple[int, int]]:
        """(address, nbytes) of every free block in address order (diagnostics, tests)."""
        with self._lock:
            return [(self._base + off, self._free_size[off]) for off in self._free_offs]

    def allocation_size(self, addr: int) -> int:
        """Rounded size of the allocation at ``addr``; ParamInvalid if there is none."""
        with self._lock:
            size = self._used.get(addr - self._base) if isinstance(addr, int) else None
        if size is None:
            raise ParamInvalid(f"address {addr!r} is not an allocation of this memory pool")
        return size

    @property
    def region(self) -> Region:
        """The whole usable pool as one Region, with the segment's ``shm_name`` and offset."""
        return self._region

    @property
    def addr(self) -> int:
        return self._base

    def contains(self, addr: int, nbytes: int) -> bool:
        """Whether ``[addr, addr + nbytes)`` lies inside the pool's usable range."""
        return (isinstance(addr, int) and isinstance(nbytes, int) and nbytes >= 0
                and self._base <= addr and addr + nbytes <= self._base + self._total)

    @property
    def closed(self) -> bool:
        return self._segment is None

    def close(self) -> None:
        """Unmap the pool (idempotent). Outstanding allocations become invalid."""
        with self._lock:
            seg, self._segment = self._segment, None
            self._used.clear()
            self._free_offs, self._free_size, self._used_bytes = [], {}, 0
        if seg is not None:
            seg.close()

    def __repr__(self) -> str:
        return (f"MemPool(total={self._total}, page={self._page}, used={self._used_bytes}, "
                f"allocations={len(self._used)}, {'closed' if self.closed else hex(self._base)})")
