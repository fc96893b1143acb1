"""Generation words of this instance's caches: one shared, read-only-for-peers table of random uint64 values."""
from __future__ import annotations

import os
import struct
import threading
from typing import List, Tuple

import numpy as np

from llm_datadist._engine.errors import OutOfMemory
from llm_datadist._engine.memory import PAGE_SIZE, SharedSegment, np_view
from llm_datadist._transport.base import Guard, GuardTable, Region

MAGIC = b"LDGUARD1"
HEADER = struct.Struct("<8s16sQ")  # magic, instance nonce, capacity
NONCE_BYTES = 16
DEFAULT_CAPACITY = 65536  # caches alive at once; pages are only touched as slots are used


class Guards(GuardTable):
    """Slot ``i`` holds a cache's generation: a random odd value while the cache lives, 0 once released.

    The table is a shared segment: the header (magic, this instance's nonce, capacity) fills the first page,
    slots follow. Peers read it with one-sided transports (process_vm reads a slot before and after each batch;
    shm maps the segment read-only) and the nonce proves which process they reached. The owner writes a slot
    only from here; an aligned 8-byte store is atomic for every reader.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.nonce = os.urandom(NONCE_BYTES)
        self.capacity = capacity
        self._segment = SharedSegment(PAGE_SIZE + 8 * capacity, hugepages=False)
        header = np_view(self._segment.addr, HEADER.size)
        header[:] = np.frombuffer(HEADER.pack(MAGIC, self.nonce, capacity), dtype=np.uint8)
        self._words = np_view(self._segment.addr + PAGE_SIZE, 8 * capacity).view(np.uint64)
        self._lock = threading.Lock()
        self._free: List[int] = []
        self._next = 0
        self.closed = False

    @property
    def addr(self) -> int:
        """Address of the table (its header) in this process."""
        return self._segment.addr

    @property
    def region(self) -> Region:
        """The table as a read-only region for the transports (shm maps it, tcp never serves it)."""
        return Region(self._segment.addr, self._segment.nbytes, segment=self._segment.segment(), writable=False)

    def slot_addr(self, slot: int) -> int:
        return self._segment.addr + PAGE_SIZE + 8 * slot

    def acquire(self) -> Guard:
        """A fresh slot holding a fresh random generation (OutOfMemory when every slot is in use)."""
        value = int.from_bytes(os.urandom(8), "little") | 1
        with self._lock:
            if self._free:
                slot = self._free.pop()
            elif self._next < self.capacity:
                slot, self._next = self._next, self._next + 1
            else:
                raise OutOfMemory(f"more than {self.capacity} caches are alive at once")
            self._words[slot] = value
        return Guard(slot=slot, value=value, addr=self.slot_addr(slot))

    def invalidate(self, guard: Guard) -> None:
        """Mark the cache of ``guard`` released: every later check of its value fails. The slot is reused."""
        with self._lock:
            if 0 <= guard.slot < self._next and int(self._words[guard.slot]) == guard.value:
                self._words[guard.slot] = 0
                self._free.append(guard.slot)

    def valid(self, slot: int, value: int) -> bool:
        """Whether ``slot`` holds ``value`` now (0 is never valid)."""
        return bool(value) and 0 <= slot < self.capacity and int(self._words[slot]) == value

    def valid_all(self, guards: Tuple[Tuple[int, int], ...]) -> bool:
        return all(self.valid(slot, value) for slot, value in guards)

    def close(self) -> None:
        """Zero every slot and unmap (idempotent)."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            self._words[:self._next] = 0
        self._words = np.zeros(0, dtype=np.uint64)
        self._segment.close()


def parse_header(data: bytes) -> Tuple[bytes, int]:
    """(nonce, capacity) of a guard table header; ValueError when it is not one."""
    if len(data) < HEADER.size:
        raise ValueError("short guard table header")
    magic, nonce, capacity = HEADER.unpack(data[:HEADER.size])
    if magic != MAGIC:
        raise ValueError("not a guard table")
    return nonce, int(capacity)
