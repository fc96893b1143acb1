"""Unit tests of the scatter/gather socket I/O (_transport/scatter.py)."""
from __future__ import annotations

from typing import List

import numpy as np
import pytest

from llm_datadist._transport import scatter
from llm_datadist._transport.base import TransferTimeout, TransportClosed

U64 = np.uint64


def _addr(arr):
    return U64(arr.ctypes.data)


def _bounds(sizes: np.ndarray, max_bytes: int, max_count: int = scatter.IOV_MAX) -> List[int]:
    """The chunk rule, vectorised (the reference): a new chunk where a range starts in another ``max_bytes``
    window of the running byte count than the range before it, and at every ``max_count``-th range."""
    n = int(sizes.shape[0])
    if n == 0:
        return [0]
    starts = np.zeros(n, dtype=U64)
    np.cumsum(sizes[:-1], out=starts[1:])
    window = starts // U64(max(max_bytes, 1))
    breaks = np.flatnonzero(window[1:] != window[:-1]) + 1
    return np.union1d(np.union1d(breaks, np.arange(0, n, max_count)), [0, n]).astype(np.int64).tolist()


def _scatter(op, addrs, sizes, stall, max_bytes=1 << 20):
    scatter.scatter_io(op, np.asarray(addrs, dtype=U64).tolist(), np.asarray(sizes, dtype=U64).tolist(), stall,
                       max_bytes)


def test_views_are_writable_windows_on_raw_memory():
    buf = np.arange(100, dtype=np.uint8)
    views = scatter.views([int(_addr(buf)) + 10, int(_addr(buf)) + 50], [5, 0])
    assert bytes(views[0]) == bytes(range(10, 15)) and len(views[1]) == 0
    views[0][:] = b"abcde"
    assert bytes(buf[10:15]) == b"abcde"
    assert bytes(scatter.view(int(_addr(buf)), 3)) == bytes(buf[:3])


def test_each_call_moves_one_chunk_of_the_rule():
    """For random ranges (many, larger than a window, empty ones), the calls follow the chunk rule: at most
    IOV_MAX ranges starting in one ``max_bytes`` window each; a chunk of empty ranges only makes no call."""
    rng = np.random.default_rng(11)
    buf = np.zeros(1 << 22, dtype=np.uint8)
    for _ in range(300):
        n = int(rng.integers(0, 2500))
        sizes = rng.integers(0, int(rng.choice([64, 4096, 1 << 18])), n).astype(U64)
        addrs = U64(_addr(buf)) + (rng.integers(0, 1 << 20, n).astype(U64) if n else np.zeros(0, dtype=U64))
        max_bytes = int(rng.choice([1 << 12, 1 << 16, 1 << 20]))
        calls: List[int] = []

        def op(chunk):
            calls.append(len(chunk))
            return sum(len(view) for view in chunk)

        _scatter(op, addrs, sizes, lambda: None, max_bytes)
        bounds = _bounds(sizes, max_bytes)
        assert calls == [b - a for a, b in zip(bounds[:-1], bounds[1:]) if int(sizes[a:b].sum())]
        assert max(calls, default=0) <= scatter.IOV_MAX


def test_scatter_io_handles_partial_moves_stalls_and_eof():
    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 3000, 3000).astype(U64)
    data = rng.integers(0, 256, int(sizes.sum()), dtype=np.uint8)
    dst = np.zeros(int(sizes.sum()) + 64 * len(sizes), dtype=np.uint8)
    offs = (np.cumsum(sizes + U64(64)) - sizes - U64(64)).astype(U64)
    addrs = offs + _addr(dst)
    stream = {"pos": 0, "calls": 0}

    def op(chunk):
        stream["calls"] += 1
        assert len(chunk) <= scatter.IOV_MAX
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
    _scatter(op, addrs, sizes, lambda: stalls.append(1), max_bytes=1 << 16)
    assert stream["pos"] == data.size and stalls
    flat = np.concatenate([dst[o:o + n] for o, n in zip(offs.tolist(), sizes.astype(np.int64).tolist())])
    assert np.array_equal(flat, data)
    with pytest.raises(TransportClosed):
        _scatter(lambda chunk: 0, addrs, sizes, lambda: None)
    with pytest.raises(TransferTimeout):
        def stall():
            raise TransferTimeout("stalled")

        def blocked(chunk):
            raise BlockingIOError()

        _scatter(blocked, addrs, sizes, stall)


def test_scatter_io_checks_the_deadline_between_complete_chunks():
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
        _scatter(steady, addrs, sizes, stall, max_bytes=1 << 20)
    assert len(calls) == 3


