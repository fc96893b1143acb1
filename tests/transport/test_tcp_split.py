"""Requests with more ranges than one frame may carry (``tcp_wire.MAX_OPS``) are cut into several frames.

The real limit is 1 Mi ranges per frame (reached by, e.g., an 80-layer model moving 8192 scattered blocks), so
these tests lower the client's limit in this process; the serving side runs in a second process with its own
(real) limit. Each case reads (pull) and writes (push) scattered, non-mergeable ranges whose count is a multiple
of the limit, one more and one less, and checks every byte of the destination against data computed here:
the ranges next to frame boundaries included, and every byte outside the ranges still the sentinel (a read) or
the peer's pristine pattern (a write). Written bytes are read straight from the peer's shared segment (its
memfd, through /proc), not back through the tcp path under test.
"""
from __future__ import annotations

import mmap
import os
import threading
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pytest

from conftest import LOCAL_BYTES, PEER_BYTES, TESTED, Setup
from llm_datadist._transport import tcp
from llm_datadist._transport import tcp_wire as wire
from llm_datadist._transport.base import SMALL_OPS, CopyPlan

pytestmark = pytest.mark.skipif("tcp" not in TESTED, reason="tcp transport unavailable")

SENTINEL = 0x5A
SMALL_SLOT = 8192  # one range per slot, strictly inside it: neighbours never touch, so nothing merges
LARGE_SLOT = 512 << 10

Ranges = Tuple[np.ndarray, np.ndarray, np.ndarray]  # local offsets, remote offsets, sizes


@pytest.fixture(scope="module")
def pair() -> Iterator[Setup]:
    setup = Setup("tcp")
    yield setup
    setup.close()


class _PeerMemory:
    """The peer's first segment, mapped read-only from its memfd (None where /proc does not allow it)."""

    def __init__(self, pid: int, seed: int) -> None:
        self.view: Optional[np.ndarray] = None
        self._map: Optional[mmap.mmap] = None
        fd_dir = f"/proc/{pid}/fd"
        try:
            for name in os.listdir(fd_dir):
                if os.readlink(f"{fd_dir}/{name}").startswith(f"/memfd:peer-{seed} "):
                    fd = os.open(f"{fd_dir}/{name}", os.O_RDONLY)
                    try:
                        self._map = mmap.mmap(fd, PEER_BYTES, mmap.MAP_SHARED, mmap.PROT_READ)
                    finally:
                        os.close(fd)
                    self.view = np.frombuffer(self._map, dtype=np.uint8)
                    return
        except OSError:
            self.view = None

    def close(self) -> None:
        self.view = None
        if self._map is not None:
            self._map.close()


@pytest.fixture(scope="module")
def peer_memory(pair: Setup) -> Iterator[_PeerMemory]:
    memory = _PeerMemory(pair.peer.pid, pair.seed)
    yield memory
    memory.close()


def _peer_bytes(pair: Setup, memory: _PeerMemory) -> np.ndarray:
    """A copy of the peer's whole segment: from its memfd, else through one single-range (one-frame) read."""
    if memory.view is not None:
        return memory.view.copy()
    pair.local[:] = 0
    pair.transport.read(pair.channel, pair.plan([0], [0], [PEER_BYTES]), pair.deadline())
    return pair.local[:PEER_BYTES].copy()


def _scattered(seed: int, n: int, slot: int, max_size: int) -> Ranges:
    """``n`` ranges of varied sizes, each strictly inside its own slot (slots shuffled on both sides)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, n)
    sizes[0] = 1  # a one-byte range at the start of the first frame
    local = rng.permutation(LOCAL_BYTES // slot)[:n] * slot + 1 + (rng.integers(0, 1 << 30, n) % (slot - sizes - 1))
    remote = rng.permutation(PEER_BYTES // slot)[:n] * slot + 1 + (rng.integers(0, 1 << 30, n) % (slot - sizes - 1))
    return local.astype(np.int64), remote.astype(np.int64), sizes.astype(np.int64)


def _plan(pair: Setup, ranges: Ranges, ints: bool) -> CopyPlan:
    """The plan of ``ranges``: built from Python ints (the small-plan path) or from arrays."""
    local, remote, sizes = ranges
    base_l, base_r = pair.local.ctypes.data, pair.addr
    if ints:
        assert len(sizes) <= SMALL_OPS
        plan = CopyPlan([base_l + int(x) for x in local], [base_r + int(x) for x in remote],
                        [int(x) for x in sizes], guards=(pair.guard,))
        assert plan.ops is not None
    else:
        plan = pair.plan(local, remote, sizes)
        assert plan.ops is None
    assert len(plan.merged()) == len(sizes), "the ranges must stay apart after merging"
    return plan


def _image(base: np.ndarray, dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``base`` with ``source[src[i]:+sizes[i]]`` put at ``dst[i]`` for every range: the expected destination."""
    out = base.copy()
    for d, s, n in zip(dst.tolist(), src.tolist(), sizes.tolist()):
        out[d:d + n] = source[s:s + n]
    return out


def _first_difference(got: np.ndarray, want: np.ndarray, dst: np.ndarray, sizes: np.ndarray) -> str:
    bad = np.flatnonzero(got != want)
    at = int(bad[0])
    inside = [i for i, (d, n) in enumerate(zip(dst.tolist(), sizes.tolist())) if d <= at < d + n]
    where = f"range {inside[0]} of {len(sizes)}" if inside else "outside every range"
    return f"{bad.size} bytes differ, the first at offset {at} ({where})"


class _FrameLog:
    """Records the ranges of every request frame the client sends (a spy around ``tcp._request``)."""

    def __init__(self, monkeypatch) -> None:
        self.frames: List[List[Tuple[int, int, int]]] = []
        self.sockets: set = set()
        self._lock = threading.Lock()
        real = tcp._request

        def spy(sock, op, plan, stall):
            ops = plan.ops if plan.ops is not None else list(zip(plan.local.tolist(), plan.remote.tolist(),
                                                                 plan.sizes.tolist()))
            with self._lock:
                self.frames.append([(int(a), int(b), int(c)) for a, b, c in ops])
                self.sockets.add(id(sock))
            return real(sock, op, plan, stall)

        monkeypatch.setattr(tcp, "_request", spy)

    def check(self, plan: CopyPlan, limit: int, streams: int) -> None:
        """Every frame within the limit; together the frames hold each range of the plan exactly once."""
        want = list(zip(plan.local.tolist(), plan.remote.tolist(), plan.sizes.tolist()))
        assert all(1 <= len(f) <= limit for f in self.frames), [len(f) for f in self.frames]
        got = [op for f in self.frames for op in f]
        assert sorted(got) == sorted(want), "the frames do not carry each range exactly once"
        if streams == 1:
            assert got == want, "one stream sends the ranges in plan order"
            assert len(self.frames) == -(-len(want) // limit)
        else:
            assert len(self.sockets) == streams, "the transfer did not spread over its streams"
            assert len(self.frames) <= -(-len(want) // limit) + streams - 1


# (frame limit, range counts, plans from ints too): a multiple of the limit, one less and one more.
CASES = [(1, [2, 3]), (5, [5, 6, 14, 15, 16]), (21, [62, 63, 64]), (70, [209, 210, 211])]
PARAMS = [pytest.param(limit, n, ints, id=f"limit{limit}-ops{n}-{'ints' if ints else 'array'}")
          for limit, counts in CASES for n in counts for ints in (True, False) if not ints or n <= SMALL_OPS]


@pytest.mark.parametrize("limit, n, ints", PARAMS)
def test_read_over_several_frames_lands_every_byte(pair: Setup, monkeypatch, limit, n, ints):
    monkeypatch.setattr(wire, "MAX_OPS", limit)
    ranges = _scattered(1000 * limit + n, n, SMALL_SLOT, 4000)
    local, remote, sizes = ranges
    plan = _plan(pair, ranges, ints)
    log = _FrameLog(monkeypatch)
    pair.local[:] = SENTINEL
    pair.transport.read(pair.channel, plan, pair.deadline())
    want = _image(np.full(LOCAL_BYTES, SENTINEL, dtype=np.uint8), local, remote, sizes, pair.expected())
    assert np.array_equal(pair.local, want), _first_difference(pair.local, want, local, sizes)
    log.check(plan, limit, streams=1)


@pytest.mark.parametrize("limit, n, ints", PARAMS)
def test_write_over_several_frames_lands_every_byte(pair: Setup, peer_memory: _PeerMemory, monkeypatch, limit, n,
                                                     ints):
    monkeypatch.setattr(wire, "MAX_OPS", limit)
    ranges = _scattered(2000 * limit + n, n, SMALL_SLOT, 4000)
    local, remote, sizes = ranges
    plan = _plan(pair, ranges, ints)
    payload = np.random.default_rng(n).integers(0, 256, LOCAL_BYTES, dtype=np.uint8)
    pair.local[:] = payload
    log = _FrameLog(monkeypatch)
    try:
        pair.transport.write(pair.channel, plan, pair.deadline())
        monkeypatch.undo()  # the check below may read back through tcp: with the real limit and no spy
        got = _peer_bytes(pair, peer_memory)
        want = _image(pair.expected(), remote, local, sizes, payload)
        assert np.array_equal(got, want), _first_difference(got, want, remote, sizes)
        log.check(plan, limit, streams=1)
    finally:
        pair.peer.command("reset")


@pytest.mark.parametrize("n", [29, 30, 31])
def test_frames_of_parallel_streams_land_every_byte(pair: Setup, peer_memory: _PeerMemory, monkeypatch, n):
    """A large transfer spread over two connections: each stream's part cut into frames of its own."""
    monkeypatch.setattr(wire, "MAX_OPS", 5)
    ranges = _scattered(3000 + n, n, LARGE_SLOT, 400 << 10)
    local, remote, sizes = ranges
    assert int(sizes.sum()) >= 2 * tcp.STREAM_MIN_BYTES  # room for two streams
    plan = _plan(pair, ranges, ints=False)
    monkeypatch.setattr(pair.channel, "streams", 2)
    log = _FrameLog(monkeypatch)
    pair.local[:] = SENTINEL
    pair.transport.read(pair.channel, plan, pair.deadline())
    want = _image(np.full(LOCAL_BYTES, SENTINEL, dtype=np.uint8), local, remote, sizes, pair.expected())
    assert np.array_equal(pair.local, want), _first_difference(pair.local, want, local, sizes)
    log.check(plan, 5, streams=2)

    log.frames.clear()
    log.sockets.clear()
    payload = np.random.default_rng(n).integers(0, 256, LOCAL_BYTES, dtype=np.uint8)
    pair.local[:] = payload
    try:
        pair.transport.write(pair.channel, plan, pair.deadline())
        monkeypatch.undo()
        got = _peer_bytes(pair, peer_memory)
        want = _image(pair.expected(), remote, local, sizes, payload)
        assert np.array_equal(got, want), _first_difference(got, want, remote, sizes)
        log.check(plan, 5, streams=2)
    finally:
        pair.peer.command("reset")


@pytest.mark.parametrize("limit", [1, 2, 3, 7])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_streams_cut_each_part_into_frames_in_order(monkeypatch, limit, parts):
    """The frame cutter alone: contiguous frames of at most the limit, covering every op once, in order."""
    monkeypatch.setattr(wire, "MAX_OPS", limit)
    for n in range(1, 4 * limit + 3):
        sizes = np.arange(1, n + 1, dtype=np.uint64) * 4096
        plan = CopyPlan(np.arange(n, dtype=np.uint64) * 1_000_000, np.arange(n, dtype=np.uint64) * 3_000_000, sizes)
        streams = tcp._streams(plan, parts)
        assert 1 <= len(streams) <= parts
        got: List[int] = []
        for frames in streams:
            part: List[int] = []
            for frame in frames:
                assert 1 <= len(frame) <= limit
                part += (frame.local // np.uint64(1_000_000)).tolist()
            # within a part, all frames but the last are full
            assert [len(f) for f in frames[:-1]] == [limit] * (len(frames) - 1)
            got += part
        assert got == list(range(n)), (n, limit, parts)
