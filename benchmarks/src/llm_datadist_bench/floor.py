"""The latency floor for ``bench``: one ``process_vm_readv`` call from Python (ctypes), timed call by call."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from typing import List, Optional, Sequence, Tuple

__all__ = ["ReadvFloor"]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# one call's pieces: (local address, remote address, bytes) per iovec
Pieces = Sequence[Tuple[int, int, int]]


class ReadvFloor:
    """Times single ``process_vm_readv`` calls of prepared scatter lists against another process."""

    def __init__(self) -> None:
        self.problem: Optional[str] = None
        self._fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.process_vm_readv
        except (OSError, AttributeError) as exc:
            self.problem = f"process_vm_readv is not available here ({exc})"
            return
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                       ctypes.c_ulong]
        fn.restype = ctypes.c_ssize_t
        self._fn = fn

    def measure(self, pid: int, calls: Sequence[Pieces], iters: int, warmup: int = 20) -> Optional[List[float]]:
        """Microseconds per call for ``iters`` calls (after ``warmup``), cycling over ``calls``.

        Args:
            pid: the process to read from.
            calls: the scatter list of each distinct call; the iovec arrays are built before timing.
            iters: timed calls.
            warmup: untimed calls first.

        Returns:
            The samples, or None with ``self.problem`` set when a call fails or reads short.
        """
        if self._fn is None:
            return None
        prepared = [self._prepare(pieces) for pieces in calls]
        fn, samples = self._fn, []
        clock = time.perf_counter
        for i in range(warmup + iters):
            local, remote, count, want = prepared[i % len(prepared)]
            start = clock()
            got = fn(pid, local, count, remote, count, 0)
            elapsed = clock() - start
            if got != want:
                err = ctypes.get_errno()
                self.problem = (f"process_vm_readv read {got} of {want} bytes"
                                f"{' (' + os.strerror(err) + ')' if got < 0 and err else ''}: no floor measured")
                return None
            if i >= warmup:
                samples.append(elapsed * 1e6)
        return samples

    @staticmethod
    def _prepare(pieces: Pieces):
        local = (_Iovec * len(pieces))(*[_Iovec(lo, n) for lo, _re, n in pieces])
        remote = (_Iovec * len(pieces))(*[_Iovec(re, n) for _lo, re, n in pieces])
        return local, remote, len(pieces), sum(n for _lo, _re, n in pieces)
