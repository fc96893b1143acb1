"""Soak: 100k pulls of small blocks over the default same-host route, every byte checked, nothing growing.

Growth is measured from the end of a warm-up to the end of the run, in both processes: fds and threads must
not grow at all, RSS less than a few MiB (allocator noise). The rate is reported, never asserted.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from llm_datadist import BlocksCacheKey, LLMRole
from tests.reliability import kv, local
from tests.reliability.procs import Usage, server, thread_census

P, D = 95, 96
NT, NB, BB = 2, 64, 256
PULLS = int(os.environ.get("RELIABILITY_SOAK_PULLS", "") or 100_000)  # more for a longer soak by hand
WARMUP = 2_000
RSS_BOUND_KIB = 4 << 10


@pytest.mark.timeout(600)  # the rate depends on the machine; only growth is asserted
def test_100k_verified_pulls_without_growth(spawn, make_dd, figures):
    peer, port = server(spawn, P)
    peer.call("blocks", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB)
    dd = make_dd(LLMRole.DECODER, D)
    local.link(dd, P, port)
    cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB)
    expected = [kv.content(1, t, NB, BB) for t in range(NT)]
    pull = dd.cache_manager.pull_blocks
    key = BlocksCacheKey(P, 0)
    rng = np.random.default_rng(5)
    src_seq = rng.integers(0, NB, PULLS).tolist()
    dst_seq = rng.integers(0, NB, PULLS).tolist()
    me = os.getpid()
    bad = 0
    for i in range(PULLS):
        if i == WARMUP:
            warm_local, warm_peer = Usage(me), peer.usage()
            warm_census = thread_census(peer)
            started = time.perf_counter()
        s, d = src_seq[i], dst_seq[i]
        arrays[0][d, :8] = 0  # the verified bytes must come from this very pull
        arrays[1][d, :8] = 0
        pull(key, cache, [s], [d])
        bad += not (np.array_equal(arrays[0][d], expected[0][s]) and np.array_equal(arrays[1][d], expected[1][s]))
    elapsed = time.perf_counter() - started
    end_local, end_peer = Usage(me), peer.usage()
    route = dd._engine.route(P)  # test-only probe: the route the library chose
    local.unlink(dd, P, port)
    assert bad == 0, f"{bad} pulls returned wrong bytes"
    rate = (PULLS - WARMUP) / elapsed
    figures.add(f"soak: {PULLS:,} verified pulls over {route}", rate, "pulls/s")
    for name, warm, end in (("decoder", warm_local, end_local), ("owner", warm_peer, end_peer)):
        figures.add(f"soak: {name} growth after warm-up (fds, threads, RSS)",
                    f"{end.fds - warm.fds:+d}, {end.threads - warm.threads:+d}, {end.rss_kib - warm.rss_kib:+d} KiB")
    assert end_local.fds == warm_local.fds, (warm_local, end_local)
    assert end_peer.fds == warm_peer.fds, (warm_peer, end_peer)
    assert thread_census(peer)[1] == warm_census[1]
    assert end_local.threads == warm_local.threads
    assert end_local.rss_kib - warm_local.rss_kib < RSS_BOUND_KIB
    assert end_peer.rss_kib - warm_peer.rss_kib < RSS_BOUND_KIB
