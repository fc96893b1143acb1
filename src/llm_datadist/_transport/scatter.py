"""Scatter/gather socket I/O straight from and into raw memory ranges, partial moves and stalls handled."""
from __future__ import annotations

import ctypes
import itertools
import operator
import sys
from bisect import bisect_left, bisect_right
from typing import Callable, List, Sequence

from llm_datadist._transport import tls
from llm_datadist._transport.base import TransportClosed

IOV_MAX = 1024  # buffers per sendmsg/recvmsg_into call (UIO_MAXIOV)

_ADDRESS_SPACE_BYTES = min(1 << 62, sys.maxsize)  # covers 57-bit (LA57) user address spaces

# One writable memoryview over the whole user address space; only ever sliced, never read whole.
_AS_VIEW = memoryview((ctypes.c_char * _ADDRESS_SPACE_BYTES).from_address(0)).cast("B")


def view(addr: int, nbytes: int) -> memoryview:
    """A writable byte memoryview of ``nbytes`` at raw address ``addr`` (no copy, no checks)."""
    return _AS_VIEW[addr:addr + nbytes]


def views(addrs: Sequence[int], sizes: Sequence[int]) -> List[memoryview]:
    """Writable byte memoryviews for many raw ranges at once (no per-range ctypes objects)."""
    return list(map(_AS_VIEW.__getitem__, map(slice, addrs, map(operator.add, addrs, sizes))))


def scatter_io(op: Callable[[List[memoryview]], int], addrs: List[int], sizes: List[int],
               on_stall: Callable[[], None], max_bytes: int = 1 << 20) -> None:
    """Move every byte of raw ranges with a socket scatter/gather call, handling partial transfers.

    One call moves a chunk: at most IOV_MAX ranges (a new chunk at every IOV_MAX-th range) that start in one
    ``max_bytes`` window of the running byte count (a new chunk where a range starts in a later window), so
    about ``max_bytes`` per call; views are built per chunk, so building them overlaps the transfer.

    Args:
        op: e.g. ``lambda b: sock.recvmsg_into(b, 0, MSG_WAITALL)[0]`` or ``sock.sendmsg``.
        addrs: start addresses as Python ints (memory this process may read or write).
        sizes: byte counts as Python ints.
        on_stall: Called when ``op`` times out (BlockingIOError) or moves less than asked, and between
            chunks (a slow but steady peer must not outlast the deadline); it raises to abort
            (deadline passed, server stopping) or re-arms the socket timeouts.
        max_bytes: About how many bytes one call moves.

    Raises:
        TransportClosed: ``op`` returned 0 (peer closed) or the connection failed.
    """
    n = len(addrs)
    ends = list(map(operator.add, addrs, sizes))
    cum = list(itertools.accumulate(sizes, initial=0))
    window = max(max_bytes, 1)
    getitem = _AS_VIEW.__getitem__
    i, skip = 0, 0
    while i < n:
        j = min((i // IOV_MAX + 1) * IOV_MAX, bisect_left(cum, (cum[i] // window + 1) * window, i + 1, n))
        expected = cum[j] - cum[i] - skip
        if expected == 0:
            i, skip = j, 0
            continue
        chunk = list(map(getitem, map(slice, addrs[i:j], ends[i:j])))
        if skip:
            chunk[0] = chunk[0][skip:]
        try:
            got = op(chunk)
        except tls.WOULD_BLOCK:
            on_stall()
            continue
        except OSError as exc:
            raise TransportClosed(f"connection lost: {exc}") from exc
        if got == expected:
            i, skip = j, 0
            if i < n:
                on_stall()
            continue
        if got <= 0:
            raise TransportClosed("connection closed by peer")
        pos = cum[i] + skip + got
        k = bisect_right(cum, pos) - 1
        i, skip = k, pos - cum[k]
        on_stall()
