"""CopyPlan's methods give the same answers whether the plan holds its ops as Python ints or as arrays."""
from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest

from llm_datadist._transport.base import SMALL_OPS, CopyPlan, Guard

U64 = np.uint64
GUARD = (Guard(3, 0x1234, 0x7F00_0000_1000),)


def _twins(local, remote, sizes):
    """The same ops as a plan of ints and a plan of arrays."""
    ints = CopyPlan([int(x) for x in local], [int(x) for x in remote], [int(x) for x in sizes], guards=GUARD)
    arrays = CopyPlan(np.asarray(local, dtype=U64), np.asarray(remote, dtype=U64), np.asarray(sizes, dtype=U64),
                      guards=GUARD)
    assert ints.ops is not None and arrays.ops is None
    return ints, arrays


def _random_ops(rng, n, merge_some=True):
    sizes = rng.integers(0, 5000, n)
    local = 4096 + np.cumsum(sizes + (rng.integers(0, 2, n) * 64 if merge_some else 64)) - sizes
    remote = (1 << 30) + np.cumsum(sizes + (rng.integers(0, 2, n) * 32 if merge_some else 32)) - sizes
    return local, remote, sizes


def _ops(plan):
    return list(zip(*plan.lists()))


CASES = [pytest.param(seed, n, id=f"ops{n}") for seed, n in enumerate([0, 1, 2, 7, 33, SMALL_OPS])]


@pytest.mark.parametrize("seed, n", CASES)
def test_the_views_of_the_ops_agree(seed, n):
    rng = np.random.default_rng(seed)
    ints, arrays = _twins(*_random_ops(rng, n))
    assert len(ints) == len(arrays) == n and ints.total_bytes == arrays.total_bytes
    assert ints.lists() == arrays.lists()
    assert ints.ranges() == arrays.ranges() and ints.ranges(remote=True) == arrays.ranges(remote=True)
    assert ints.pairs() == arrays.pairs()
    assert ints.local.tolist() == arrays.local.tolist() and ints.sizes.dtype == U64
    for a, b in ((ints.merged(), arrays.merged()), (ints.swapped(), arrays.swapped()), (ints.part(1, n - 1),
                                                                                          arrays.part(1, n - 1))):
        assert _ops(a) == _ops(b) and a.guards == b.guards
        assert (a.local_kind, a.remote_kind) == (b.local_kind, b.remote_kind)
    assert ints.merged().ops is not None, "merging keeps a plan of ints as ints"
    assert ints.swapped().guards == ()


@pytest.mark.parametrize("seed, n", CASES)
def test_chunks_and_cuts_agree(seed, n):
    rng = np.random.default_rng(100 + seed)
    ints, arrays = _twins(*_random_ops(rng, n, merge_some=False))
    for count, nbytes in ((1022, 1 << 30), (5, 1 << 30), (3, 6000), (1000, 4000), (1, 1)):
        chunks = ints.chunks(count, nbytes)
        assert chunks == arrays.chunks(count, nbytes)
        assert chunks[0][0] == 0 and chunks[-1][1] == n and sum(c[2] for c in chunks) == ints.total_bytes
        assert all(1 <= b - a <= count for a, b, _ in chunks if n)
        assert all(c[2] <= nbytes or c[1] - c[0] == 1 for c in chunks)
    for parts in (1, 2, 3, 8):
        cuts = ints.cuts(parts)
        assert cuts == arrays.cuts(parts)
        assert cuts[0] == 0 and cuts[-1] == n and len(cuts) <= parts + 1
        assert cuts == sorted(set(cuts)) if n else cuts == [0, 0]  # an empty plan is one empty part


def _iovecs(plan, start, stop, head, tail):
    laddr, raddr, count, keep = plan.iovecs(start, stop, head, tail)
    read = lambda addr: np.ctypeslib.as_array((ctypes.c_uint64 * (2 * count)).from_address(addr)).tolist()  # noqa: E731
    return read(laddr), read(raddr)


@pytest.mark.parametrize("seed, n", CASES[1:])
def test_iovecs_agree_with_guards_around_them(seed, n):
    rng = np.random.default_rng(200 + seed)
    ints, arrays = _twins(*_random_ops(rng, n))
    head, tail = ([11, 8, 13, 8], [12, 8, 14, 8]), ([15, 8], [16, 8])
    for start, stop in ((0, n), (n // 2, n), (0, 0)):
        got = _iovecs(ints, start, stop, head, tail)
        assert got == _iovecs(arrays, start, stop, head, tail)
        lo, re, sz = ints.lists()
        want_l = [11, 8, 13, 8] + [w for k in range(start, stop) for w in (lo[k], sz[k])] + [15, 8]
        want_r = [12, 8, 14, 8] + [w for k in range(start, stop) for w in (re[k], sz[k])] + [16, 8]
        assert got == (want_l, want_r)


def test_invalid_ops_are_found_in_both_forms():
    top = 1 << 62
    for local, remote, sizes, bad in (([1, 2], [3, 4], [5, 6], -1), ([1, 0], [3, 4], [5, 6], 1),
                                      ([1, 2], [top, 4], [5, 6], 0), ([1, 2], [3, 4], [5, top], 1)):
        ints, arrays = _twins(local, remote, sizes)
        assert ints.first_invalid(top) == arrays.first_invalid(top) == bad
    assert CopyPlan([], [], []).first_invalid(top) == CopyPlan(np.zeros(0), np.zeros(0), np.zeros(0)).first_invalid(top)


def test_remote_regions_and_moves_agree():
    starts, ends = [1000, 5000, 9000], [2000, 6000, 9100]
    deltas = [7, -4000, 1 << 40]
    ints, arrays = _twins([1, 2, 3, 4], [1000, 5500, 1990, 9000], [0, 500, 10, 100])
    assert ints.remote_regions(starts, ends) == arrays.remote_regions(starts, ends) == [0, 1, 2]
    moved_i, moved_a = ints.remote_moved(starts, deltas), arrays.remote_moved(starts, deltas)
    assert _ops(moved_i) == _ops(moved_a) and moved_i.ranges(remote=True)[0] == [1007, 1500, 1997, 9000 + (1 << 40)]
    assert moved_i.guards == ints.guards
    for remote, sizes in (([999], [1]), ([1990], [11]), ([6000], [1]), ([9050], [51])):
        ints, arrays = _twins([1] * len(remote), remote, sizes)
        assert ints.remote_regions(starts, ends) is None and arrays.remote_regions(starts, ends) is None
    assert CopyPlan([1], [1], [1]).remote_regions([], []) is None and CopyPlan([], [], []).remote_regions([], []) == []


@pytest.mark.parametrize("count", [0, 1, SMALL_OPS, SMALL_OPS + 1, 300])
def test_a_frames_ranges_make_a_plan_of_this_process(count):
    rng = np.random.default_rng(count)
    addrs, sizes = rng.integers(1, 1 << 48, count).tolist(), rng.integers(0, 1 << 20, count).tolist()
    words = [w for pair in zip(addrs, sizes) for w in pair]
    body = struct.pack(f"<2Q{2 * count}Q", 9, 9, *words)
    plan = CopyPlan.from_pairs(body, 16, count)
    assert plan.ranges() == (addrs, sizes) and plan.ranges(remote=True) == (addrs, sizes)
    assert plan.pairs() == body[16:] and plan.total_bytes == sum(sizes)
    assert (plan.ops is not None) == (count <= SMALL_OPS)
