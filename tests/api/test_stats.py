"""llm_datadist.stats: exact counts against known transfers between two real processes (bytes to the byte on the
puller and on the owner, failures by status code, latency observations, links made/dropped/failed), local copies
and caches in this process, and the switch that turns counting off."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from llm_datadist import (BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMRole, LLMStatusCode,
                          Placement, stats)
from notify_peer import NUM_TENSORS, PeerClient as Peer
from waiting import wait_until

PREFILL, DECODE = 301, 402
BLOCK = 4096


@pytest.fixture(params=["", "tcp"], ids=["auto", "tcp"])
def pair(request):
    """A listening prefill and a decode linked to it, both forced to ``request.param`` when set."""
    server, client = Peer(), Peer()
    try:
        server.port = server.call("init", cluster_id=PREFILL, listen=True, block_bytes=BLOCK,
                                  backend=request.param)["port"]
        client.call("init", cluster_id=DECODE, block_bytes=BLOCK, backend=request.param)
        assert client.call("link", cluster_id=PREFILL, port=server.port)["code"] == "LLM_SUCCESS"
        yield server, client, request.param
    finally:
        client.close()
        server.close()


def _rows(snap, direction, peer):
    return [t for t in snap["transfers"] if t["direction"] == direction and t["peer"] == peer]


def _served(snap, direction, peer):
    rows = [s for s in snap["served"] if s["direction"] == direction and s["peer"] == peer]
    return sum(r["transfers"] for r in rows), sum(r["bytes"] for r in rows)


def test_pulls_and_pushes_are_counted_exactly_on_both_sides(pair):
    server, client, backend = pair
    pulls = [[1], [2, 3], [4, 5, 6], [7, 8, 9, 10]]
    for i, blocks in enumerate(pulls):
        server.call("fill", blocks=blocks, seed=i + 1)
        reply = client.call("pull", cluster_id=PREFILL, src_blocks=blocks, dst_blocks=blocks, seed=i + 1)
        assert reply == {"code": "LLM_SUCCESS", "right": True}
    pushes = [[0], [11, 12]]
    for i, blocks in enumerate(pushes):
        assert client.call("push", cluster_id=PREFILL, src_blocks=blocks, dst_blocks=blocks,
                           seed=50 + i)["code"] == "LLM_SUCCESS"
    # two failed pulls: a block index beyond the source cache (the owner's geometry refuses it)
    for _ in range(2):
        assert client.call("pull", cluster_id=PREFILL, src_blocks=[99], dst_blocks=[0], seed=1)["code"] == \
            "LLM_PARAM_INVALID"
    pulled = sum(len(b) for b in pulls) * NUM_TENSORS * BLOCK
    pushed = sum(len(b) for b in pushes) * NUM_TENSORS * BLOCK

    snap = client.call("stats")["stats"]
    assert snap["enabled"] and snap["cluster_id"] == DECODE and snap["role"] == "decoder"
    pull_rows = _rows(snap, "pull", PREFILL)
    assert sum(r["transfers"] for r in pull_rows) == len(pulls)
    assert sum(r["bytes"] for r in pull_rows) == pulled
    assert {r["transport"] for r in pull_rows if r["transfers"]} <= {"process_vm", "shm", "tcp", "nixl"}
    if backend:
        assert {r["transport"] for r in pull_rows if r["transfers"]} == {backend}
    failures = {}
    for r in pull_rows:
        for code, n in r["failures"].items():
            failures[code] = failures.get(code, 0) + n
    assert failures == {"LLM_PARAM_INVALID": 2}
    assert sum(sum(r["latency"]["counts"]) for r in pull_rows) == len(pulls) + 2  # every call, failed ones too
    assert all(r["latency"]["sum_s"] > 0 for r in pull_rows)
    push_rows = _rows(snap, "push", PREFILL)
    assert sum(r["transfers"] for r in push_rows) == len(pushes)
    assert sum(r["bytes"] for r in push_rows) == pushed
    assert snap["in_flight"] == 0
    assert snap["links"]["made"] == {"dialed": 1} and snap["links"]["live"] == 1
    assert snap["caches"] == [{"kind": "host", "caches": 1, "bytes": 16 * BLOCK * NUM_TENSORS}]

    # the owner learns what its peer moved in and out of its memory (reported over the link each second)
    assert wait_until(lambda: _served(server.call("stats")["stats"], "pull", DECODE) == (len(pulls), pulled))
    assert wait_until(lambda: _served(server.call("stats")["stats"], "push", DECODE) == (len(pushes), pushed))
    owner = server.call("stats")["stats"]
    assert owner["links"]["made"] == {"accepted": 1}
    assert not [t for t in owner["transfers"] if t["direction"] in ("pull", "push")]  # it moved nothing itself


def test_unlink_flushes_the_last_report_and_counts_the_drop(pair):
    server, client, _backend = pair
    server.call("fill", blocks=[3], seed=7)
    assert client.call("pull", cluster_id=PREFILL, src_blocks=[3], dst_blocks=[3], seed=7)["right"]
    assert client.call("unlink", cluster_id=PREFILL, port=server.port)["code"] == "LLM_SUCCESS"
    # the report went out before the Unlink: no waiting for the next second
    assert _served(server.call("stats")["stats"], "pull", DECODE) == (1, NUM_TENSORS * BLOCK)
    snap = client.call("stats")["stats"]
    assert snap["links"]["dropped"] == {"unlinked": 1} and snap["links"]["live"] == 0
    assert wait_until(lambda: server.call("stats")["stats"]["links"]["dropped"] == {"peer_unlinked": 1})


def test_a_failed_dial_is_counted_by_its_status():
    client = Peer()
    try:
        client.call("init", cluster_id=DECODE)
        with __import__("socket").socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            code = client.call("link", cluster_id=PREFILL, port=port, timeout_ms=500)["code"]
        assert code != "LLM_SUCCESS"
        snap = client.call("stats")["stats"]
        assert snap["links"]["failed"] == {"dial": {code: 1}}
        assert snap["links"]["made"] == {}
    finally:
        client.close()


def _local_instance(cluster_id: int) -> LLMDataDist:
    dd = LLMDataDist(LLMRole.PROMPT, cluster_id)
    options = LLMConfig()
    options.enable_cache_manager = True
    dd.init(options.generate_options())
    return dd


def test_local_copies_caches_and_snapshots_in_this_process():
    dd = _local_instance(77)
    try:
        arrays = [np.arange(8 * 1024, dtype=np.uint8).reshape(8, 1024).copy() for _ in range(3)]
        desc = CacheDesc(3, [8, 1024], DataType.DT_UINT8, Placement.HOST)
        cache = dd.cache_manager.register_blocks_cache(desc, [a.ctypes.data for a in arrays], BlocksCacheKey(77, 0))
        dd.cache_manager.copy_blocks(cache, {0: [5], 1: [6, 7]})
        snap = stats.snapshot(dd)
        rows = [t for t in snap.transfers if t.direction == "local"]
        assert [(t.peer, t.transport, t.transfers, t.bytes) for t in rows] == [(77, "local", 1, 3 * 3 * 1024)]
        assert all(np.array_equal(a[7], a[1]) for a in arrays)
        assert snap.bytes_total("local") == 3 * 3 * 1024 and snap.transfers_total("local") == 1
        assert [(c.kind, c.caches, c.bytes) for c in snap.caches] == [("host", 1, 3 * 8 * 1024)]
        assert snap.latency("local").count == 1 and 0 < snap.latency("local").quantile(0.5) < 10
        assert snap.role == "prompt" and snap.in_flight == 0 and snap.uptime_s > 0
        assert [s.cluster_id for s in stats.snapshots()] == [77]
        assert snap.to_dict()["transfers"][0]["latency"]["bounds"] == list(stats.LATENCY_BUCKETS_S)
    finally:
        dd.finalize()
    assert stats.snapshots() == []
    with pytest.raises(RuntimeError):
        stats.snapshot(dd)


def test_histogram_quantiles_interpolate_like_prometheus():
    hist = stats.Histogram(bounds=(1.0, 2.0, 4.0), counts=(0, 10, 10, 0), sum_s=45.0)
    assert hist.count == 20 and hist.cumulative() == (0, 10, 20, 20)
    assert hist.quantile(0.5) == pytest.approx(2.0)
    assert hist.quantile(0.25) == pytest.approx(1.5)
    assert hist.quantile(0.75) == pytest.approx(3.0)
    assert stats.Histogram((1.0,), (0, 3), 9.0).quantile(0.9) == 1.0  # the +Inf bucket answers the last bound
    assert np.isnan(stats.Histogram((1.0,), (0, 0), 0.0).quantile(0.5))


def test_counting_can_be_turned_off():
    """LLM_DATADIST_STATS=0 (the switch the bench uses to measure what counting costs) counts nothing."""
    code = ("import numpy as np\n"
            "from llm_datadist import BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMRole, "
            "Placement, stats\n"
            "dd = LLMDataDist(LLMRole.PROMPT, 5); o = LLMConfig(); o.enable_cache_manager = True\n"
            "dd.init(o.generate_options())\n"
            "a = np.zeros((4, 64), np.uint8)\n"
            "c = dd.cache_manager.register_blocks_cache(CacheDesc(1, [4, 64], DataType.DT_UINT8, Placement.HOST), "
            "[a.ctypes.data], BlocksCacheKey(5, 0))\n"
            "dd.cache_manager.copy_blocks(c, {0: [1]})\n"
            "s = stats.snapshot(dd); dd.finalize()\n"
            "print(s.enabled, len(s.transfers))\n")
    env = dict(os.environ, LLM_DATADIST_STATS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0"]


def test_counting_is_exact_under_concurrent_callers():
    """The hot path takes no lock (deque appends, folded later): 8 threads, 20,000 calls each, with the reporter's
    fold and snapshots running meanwhile, lose nothing."""
    import threading

    from llm_datadist._engine import stats as engine_stats

    counters, usage = engine_stats.Stats(1), engine_stats.Usage()
    calls, threads = 20_000, 8
    taken: list = []
    stop = threading.Event()

    def caller(peer: int) -> None:
        for i in range(calls):
            call = counters.begin(peer, "pull")
            prev = engine_stats.set_current(call)
            engine_stats.moved("tcp", 100 + i % 7)
            usage.add("pull", "tcp", 100 + i % 7)
            engine_stats.set_current(prev)
            counters.end(call, None if i % 10 else LLMStatusCode.LLM_TIMEOUT)  # every tenth call fails

    def reporter() -> None:
        while not stop.is_set():
            counters.fold()
            taken.extend(usage.take())
            counters.snapshot("prompt", 0, ())

    workers = [threading.Thread(target=caller, args=(peer,)) for peer in range(threads)]
    side = threading.Thread(target=reporter)
    side.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    side.join()
    taken.extend(usage.take())
    per_thread = sum(100 + i % 7 for i in range(calls))
    snap = counters.snapshot("prompt", 0, ())
    assert snap.in_flight == 0
    assert sorted((t.peer, t.transfers, t.bytes, dict(t.failures), t.latency.count) for t in snap.transfers) == [
        (peer, calls - calls // 10, per_thread, {"LLM_TIMEOUT": calls // 10}, calls)
        for peer in range(threads)]
    assert sum(n for _d, _t, n, _b in taken) == calls * threads
    assert sum(b for _d, _t, _n, b in taken) == per_thread * threads
