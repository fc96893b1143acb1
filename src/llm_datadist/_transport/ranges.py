"""Registered address ranges: a coalesced, sorted table that checks a plan's ranges against it."""
from __future__ import annotations

import threading
from bisect import bisect_right
from typing import List, Sequence, Tuple, Union

import numpy as np

from llm_datadist._transport.base import CopyPlan

_U64 = np.uint64

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
        if len(addrs) > _SMALL_LOOKUP:
            return bool(self.check(addrs, sizes).all())
        as_list = lambda v: v.tolist() if isinstance(v, np.ndarray) else [int(x) for x in v]  # noqa: E731
        return self._lookup(as_list(addrs), as_list(sizes))

    def holds(self, plan: CopyPlan, remote: bool = True) -> bool:
        """Whether every range of one side of the plan (its remote side by default) lies inside the intervals:
        looked up one by one up to _SMALL_LOOKUP ranges, vectorised beyond."""
        if len(plan) > _SMALL_LOOKUP:
            return bool(self.check(plan.remote if remote else plan.local, plan.sizes).all())
        return self._lookup(*plan.ranges(remote))

    def _lookup(self, addrs: List[int], sizes: List[int]) -> bool:
        _, _, starts, ends = self._snapshot
        for addr, size in zip(addrs, sizes):
            i = bisect_right(starts, addr) - 1
            if i < 0 or addr + size > ends[i]:
                return False
        return True
