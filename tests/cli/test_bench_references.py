"""The bench's references measured for real: raw loopback sockets (one stream and N) and the system-call floor."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from llm_datadist_bench.common import Buffer, expected_words, fill_pattern
from llm_datadist_bench.floor import ReadvFloor
from llm_datadist_bench.raw_socket import best_raw_tcp, measure_raw_tcp

MIB = 1 << 20


def c_compiler():
    """The compiler the bench builds its C loops with ($CC, else cc, else gcc), or None where there is none."""
    named = os.environ.get("CC")
    return shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")


@pytest.mark.parametrize("streams", [1, 3])
def test_raw_socket_moves_the_same_blocks_over_one_or_n_streams(streams):
    steps = []
    records = measure_raw_tcp((16 << 10, 256 << 10), 2 * MIB, passes=2, warmup=1, seed=5,
                              on_step=lambda: steps.append(1), streams=streams)
    assert len(steps) == 2
    by_mech = {}
    for rec in records:
        by_mech.setdefault(rec["mechanism"], []).append(rec)
    one = {"raw_tcp.batch", "raw_tcp.b1"}
    assert set(by_mech) == (one | {"raw_tcp_n.batch", "raw_tcp_n.b1"} if streams > 1 else one)
    for mech, recs in by_mech.items():
        assert all(r["verified"] and len(r["samples_gbps"]) == 2 and r["median_gbps"] > 0 for r in recs)
        assert all(r["streams"] == (1 if mech.startswith("raw_tcp.") else streams) for r in recs)
    best = {(r["mechanism"], r["block_bytes"]): r for r in best_raw_tcp(records) if "best_of" in r}
    assert {m for m, _ in best} == ({"raw_tcp", "raw_tcp_n"} if streams > 1 else {"raw_tcp"})
    for (family, size), rec in best.items():
        variants = [r["median_gbps"] for r in records
                    if r["mechanism"].startswith(family + ".") and r["block_bytes"] == size]
        assert len(variants) == 2 and rec["median_gbps"] == max(variants)


def test_floor_times_one_readv_per_call_and_reads_the_right_bytes():
    block = 16 << 10
    src, dst = Buffer(8 * block), Buffer(4 * block)
    fill_pattern(src.array, 11)
    try:
        calls = [[(dst.addr + d * block, src.addr + s * block, block) for d, s in ((0, 5), (1, 2))],
                 [(dst.addr + 2 * block, src.addr + 7 * block, block)]]
        floor = ReadvFloor()
        samples = floor.measure(os.getpid(), calls, iters=7, warmup=3)
        assert floor.problem is None and len(samples) == 7 and all(s > 0 for s in samples)
        words = dst.array.view(np.uint64).reshape(4, -1)
        for d, s in ((0, 5), (1, 2), (2, 7)):
            assert np.array_equal(words[d], expected_words(s, block, 11))
    finally:
        src.close()
        dst.close()


def test_floor_reports_a_failed_read_instead_of_timing_it():
    dst = Buffer(16 << 10)
    try:
        floor = ReadvFloor()
        assert floor.measure(os.getpid(), [[(dst.addr, 8, 16 << 10)]], iters=5) is None  # unmapped remote page
        assert "process_vm_readv read -1 of 16384 bytes" in floor.problem and "no floor measured" in floor.problem
    finally:
        dst.close()


def _copier_with_pvm():
    from llm_datadist_bench.ceiling import load_copier

    if not c_compiler():
        pytest.skip("the raw process_vm loop needs a C compiler, and there is none")
    copier = load_copier()
    assert copier.native and copier.cross_process, f"a C compiler is here and the loops were not built: {copier.note}"
    return copier


def test_raw_process_vm_moves_the_same_blocks_both_ways_with_a_child():
    from llm_datadist_bench.ceiling import measure_raw_pvm

    records = measure_raw_pvm(_copier_with_pvm(), (16 << 10, 64 << 10), 2 * MIB, passes=2, warmup=1, seed=3)
    assert [(r["direction"], r["block_bytes"]) for r in records] == [
        ("pull", 16 << 10), ("pull", 64 << 10), ("push", 16 << 10), ("push", 64 << 10)]
    for rec in records:
        assert rec["kind"] == "bandwidth" and rec["mechanism"] == "pvm.c_2t" and rec["threads"] == 2
        assert rec["verified"] and "problem" not in rec, rec
        assert len(rec["samples_gbps"]) == 2 and rec["median_gbps"] > 0


def test_raw_process_vm_reports_a_fault_as_oserror():
    copier = _copier_with_pvm()
    dst = Buffer(16 << 10)
    try:
        one = np.array([16 << 10], dtype=np.uint64)
        with pytest.raises(OSError, match="process_vm_readv"):
            copier.pvm(os.getpid(), False, np.array([dst.addr], dtype=np.uint64), np.array([8], dtype=np.uint64), one)
    finally:
        dst.close()


def test_two_threads_hand_back_the_helpers_error_and_keep_working():
    from llm_datadist_bench.ceiling import TwoThreads

    seen = []

    def work(tag):
        if tag == "bad":
            raise OSError("helper failed")
        seen.append(tag)

    two = TwoThreads(work)
    try:
        with pytest.raises(OSError, match="helper failed"):
            two.run([("a",), ("bad",)])
        two.run([("b",), ("c",)])
        assert sorted(seen) == ["a", "b", "c"]
    finally:
        two.close()
