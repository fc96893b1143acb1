"""Unit tests of the range tables (_transport/ranges.py)."""
from __future__ import annotations

import numpy as np

from llm_datadist._transport import ranges
from llm_datadist._transport.base import CopyPlan

U64 = np.uint64


def test_range_table():
    t = ranges.RangeTable()
    assert not t.contains(np.array([1], dtype=U64), np.array([1], dtype=U64))
    t.add(1000, 100)
    t.add(1100, 50)  # adjacent: coalesced
    t.add(2000, 10)
    t.add(2000, 10)  # registered twice: needs two removes
    addrs = np.array([1000, 1149, 1000, 999, 1150, 2000, 2005, 0, 2 ** 64 - 8], dtype=U64)
    sizes = np.array([150, 1, 151, 2, 1, 10, 6, 0, 16], dtype=U64)
    assert t.check(addrs, sizes).tolist() == [True, True, False, False, False, True, False, False, False]
    huge = np.array([2 ** 63], dtype=U64)
    assert not t.contains(np.array([1000], dtype=U64), huge)  # no wrap-around
    assert t.remove(2000, 10) and t.contains(np.array([2000], dtype=U64), np.array([10], dtype=U64))
    assert t.remove(2000, 10) and not t.contains(np.array([2000], dtype=U64), np.array([1], dtype=U64))
    assert not t.remove(5, 5)
    assert t.contains(np.array([], dtype=U64), np.array([], dtype=U64))


def test_range_table_small_lookup_agrees_with_the_vectorised_check():
    """``contains`` looks a few ranges up one by one: same answers as the numpy check, edges and wrap included."""
    rng = np.random.default_rng(11)
    t = ranges.RangeTable()
    for a in rng.integers(0, 1 << 20, 40).tolist():
        t.add(a, int(rng.integers(0, 5000)))
    t.add(2 ** 64 - 8192, 4096)
    starts, ends = t.intervals()
    edges = np.concatenate((starts, ends, starts - U64(1), ends - U64(1))).astype(U64)
    for _ in range(3000):
        n = int(rng.integers(1, 2 * ranges._SMALL_LOOKUP))
        addrs = np.where(rng.random(n) < 0.5, rng.choice(edges, n), rng.integers(0, 1 << 21, n)).astype(U64)
        sizes = rng.choice(np.array([0, 1, 7, 4096, 2 ** 63, 2 ** 64 - 1], dtype=U64), n)
        expected = bool(t.check(addrs, sizes).all())
        assert t.contains(addrs, sizes) == expected
        assert t.contains(addrs.tolist(), sizes.tolist()) == expected




def test_a_plan_is_held_by_the_table_on_the_side_asked_for_as_ints_or_arrays():
    """``holds`` answers like ``contains`` for either side of a plan, whether it holds ints or arrays, few ranges
    or many."""
    rng = np.random.default_rng(5)
    t = ranges.RangeTable()
    t.add(1 << 20, 1 << 20)
    t.add(4 << 20, 4096)
    for n in (1, 3, ranges._SMALL_LOOKUP, ranges._SMALL_LOOKUP + 1, 40, 200):
        for _ in range(20):
            inside = rng.integers(1 << 20, (2 << 20) - 64, n)
            outside = rng.integers(0, 8 << 20, n)
            remote = np.where(rng.random(n) < 0.9, inside, outside).astype(U64)
            local = inside.astype(U64)
            sizes = rng.integers(0, 64, n).astype(U64)
            for plan in (CopyPlan(local, remote, sizes), CopyPlan(local.tolist(), remote.tolist(), sizes.tolist())):
                assert t.holds(plan) == t.contains(remote, sizes)
                assert t.holds(plan, remote=False) == t.contains(local, sizes)
