"""``llm-datadist bench``: a tiny --quick run end to end (table, JSON lines, PNG) and the report's arithmetic."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import llm_datadist
import llm_datadist_bench
from llm_datadist_bench import cli as bench
from llm_datadist_bench.common import (Buffer, block_order, fill_pattern, format_size, merge_samples, parse_size,
                                       parse_sizes, record, verify_blocks)
from llm_datadist_bench.report import Results, target_rows, target_table, transfer_table

# the folders of the core and of the bench distribution, first on the path of the bench processes
SRC = os.pathsep.join(os.path.dirname(os.path.dirname(os.path.abspath(str(package.__file__))))
                      for package in (llm_datadist, llm_datadist_bench))


def c_compiler():
    """The compiler the bench builds its C loops with ($CC, else cc, else gcc), or None where there is none."""
    named = os.environ.get("CC")
    return shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("LLM_DATADIST_TRANSPORT", None)
    cmd = [sys.executable, "-m", "llm_datadist", "bench", "--quick", "--sizes", "16K,64K", "--total-mib", "2",
           "--passes", "2", "--warmup", "1", "--tcp-streams", "2", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return proc, out


def test_quick_run_succeeds(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| block size |" in proc.stdout


def test_quick_run_jsonl(quick_run):
    _, out = quick_run
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0]["kind"] == "meta" and records[0]["mode"] == "quick"
    bw = {(r["mechanism"], r.get("direction"), r["block_bytes"]) for r in records if r["kind"] == "bandwidth"}
    ceiling = "memcpy.c_1t" if c_compiler() else "memcpy.np_1t"  # with a compiler the C loops must have been built
    for size in (16384, 65536):
        assert (ceiling, "copy", size) in bw
        assert ("raw_tcp", "pull", size) in bw
        if ceiling == "memcpy.c_1t":  # the C loops were built: the kernel's process_vm ceiling too
            assert ("pvm.c_2t", "pull", size) in bw and ("pvm.c_2t", "push", size) in bw
        for mech in ("process_vm", "tcp", "auto"):
            for direction in ("pull", "push"):
                assert (mech, direction, size) in bw, (mech, direction, size)
    for rec in records:
        if rec["kind"] == "bandwidth":
            assert rec["min_gbps"] <= rec["median_gbps"] <= rec["max_gbps"]
            assert rec["median_gbps"] > 0 and len(rec["samples_gbps"]) >= 2
    kinds = {r["kind"] for r in records}
    assert {"plan", "link", "latency_16k", "latency_layers", "latency_model"} <= kinds
    assert not [r for r in records if r["kind"] == "error"]


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_quick_run_floor_next_to_every_same_host_latency(quick_run):
    _, out = quick_run
    records = _records(out)
    floors = {(r["kind"], r["mechanism"]): r for r in records if r["kind"].startswith("floor_")}
    for suite in ("process_vm", "auto"):  # process_vm ran, so process_vm_readv works between the two processes
        small, layers = floors[("floor_16k", suite)], floors[("floor_layers", suite)]
        assert small["iovecs"] == 1 and small["bytes"] == 16384 and small["verified"]
        assert layers["iovecs"] == 56 and layers["bytes"] == 56 * 16384 and layers["verified"]
        assert 0 < small["median_us"] <= small["p99_us"] and len(small["samples_us"]) == 100
    shape = {r["mechanism"]: r for r in records if r["kind"] == "latency_layers"}["auto"]
    assert shape["tensors"] == 56 and shape["blocks"] == 1 and shape["bytes"] == 56 * 16384 and shape["verified"]


def test_quick_run_model_request_paired_with_two_thread_memcpy(quick_run):
    _, out = quick_run
    records = _records(out)
    if not c_compiler():
        pytest.skip("no C compiler: no native memcpy to pair with")
    assert any(r["mechanism"] == "memcpy.c_2t" for r in records), "a C compiler is here and the loop was not built"
    model = {r["mechanism"]: r for r in records if r["kind"] == "latency_model"}
    for suite in ("process_vm", "auto"):
        rec = model[suite]
        assert len(rec["paired_memcpy_2t_us"]) == len(rec["samples_us"]) == len(rec["paired_ratios_2t"]) == 2
        assert rec["paired_ratio_2t"] > 0 and rec["verified"]
    assert "paired_ratios_2t" not in model["tcp"]  # its reference is the socket, not memcpy


def test_quick_run_raw_socket_one_stream_and_n_streams(quick_run):
    _, out = quick_run
    bw = {(r["mechanism"], r["block_bytes"]): r for r in _records(out) if r["kind"] == "bandwidth"}
    for size in (16384, 65536):
        assert bw[("raw_tcp", size)]["streams"] == 1
        parallel = bw[("raw_tcp_n", size)]
        assert parallel["streams"] == 2 and parallel["verified"] and parallel["best_of"].startswith("raw_tcp_n.")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_quick_run_tls_suite_against_plain_tcp(quick_run):
    _, out = quick_run
    records = _records(out)
    tls = [r for r in records if r["kind"] == "bandwidth" and r["mechanism"] == "tcp+tls"]
    assert {(r["direction"], r["block_bytes"]) for r in tls} == {(d, s) for d in ("pull", "push")
                                                                 for s in (16384, 65536)}
    assert all(r["verified"] and r["transport"] == "tcp" for r in tls)
    link = {r["mechanism"]: r for r in records if r["kind"] == "link"}["tcp+tls"]
    assert link["route"] == "tcp"
    text = (out / "results.md").read_text()
    assert "tcp+tls / tcp (the cost of TLS)" in text


def test_quick_run_markdown(quick_run):
    _, out = quick_run
    text = (out / "results.md").read_text()
    assert "### READ direction (pull), host/host" in text and "### WRITE direction (push), host/host" in text
    rows = [line for line in text.splitlines() if line.startswith("| 16K |") or line.startswith("| 64K |")]
    assert len(rows) >= 4
    assert any("×" in row for row in rows)  # ratios to the references
    assert "Bandwidth, pull, host/host (ratio and status)" in text and "plan_blocks" in text
    assert "| raw tcp socket | raw tcp, 2 streams | tcp |" in text
    assert "Per call (auto):" in text and "| 16 KiB block per call, p50 |" in text
    assert "floor, 1 × 16 KiB" in text and "memcpy 2t, same blocks" in text


def test_quick_run_png(quick_run):
    _, out = quick_run
    png = out / "bench.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert not png.exists()
        assert "matplotlib is not installed" in (out / "results.md").read_text()
        pytest.skip("matplotlib is not installed")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_bad_options_return_2(capsys):
    assert bench.main(["--directions", "sideways"]) == 2
    assert bench.main(["--sizes", "3M", "--total-mib", "2"]) == 2
    assert bench.main(["--transports", "carrier-pigeon"]) == 2
    assert bench.main(["--tcp-streams", "0"]) == 2
    assert "error" in capsys.readouterr().err


def test_tls_suite_moves_the_same_bytes_per_pass_in_fewer_passes():
    from llm_datadist_bench.common import TlsFiles

    args = bench.build_parser().parse_args([])
    opts = dict(sizes=(16384, 2 << 20), total=128 << 20, passes=10, warmup=2, directions=("pull", "push"),
                transports=["tcp", "tcp+tls", "auto"], peers=(), streams=1)
    tls = TlsFiles("ca.pem", "prefill.pem", "prefill.key", "decode.pem", "decode.key")
    suites = {s.name: s for s in bench._suites(opts, args, ["host/host"], tls)}
    plain, secure = suites["tcp"], suites["tcp+tls"]
    assert secure.transport == "tcp" and secure.tls == tls and plain.tls is None and suites["auto"].tls is None
    assert (secure.sizes, secure.total_bytes, secure.directions) == (plain.sizes, plain.total_bytes, plain.directions)
    assert (secure.passes, secure.warmup, secure.latency_iters, secure.model_iters) == (5, 1, 200, 5)
    assert (plain.passes, plain.warmup, plain.latency_iters, plain.model_iters) == (10, 2, 1000, 20)
    assert tls.config(owner=True) == {"tls_cert_file": "prefill.pem", "tls_key_file": "prefill.key",
                                      "tls_ca_file": "ca.pem"}
    assert tls.config(owner=False)["tls_cert_file"] == "decode.pem"
    assert "tcp+tls" not in {s.name for s in bench._suites(opts, args, ["host/host"], None)}  # no certificates


def test_tcp_streams_default_asks_the_library(monkeypatch):
    from llm_datadist._transport import tcp

    monkeypatch.setattr(tcp, "STREAMS_SAME_MACHINE", 1)
    monkeypatch.setattr(tcp, "STREAMS_PER_TRANSFER", 3)
    assert bench.library_tcp_streams() == 1  # the bench's peers share this machine's cores
    monkeypatch.setattr(tcp, "STREAMS_SAME_MACHINE", 4)
    assert bench.library_tcp_streams() == 4


def test_sizes():
    assert parse_size("16K") == 16384 and parse_size("2MiB") == 2 << 20 and parse_size("4096") == 4096
    assert parse_sizes("2M,16k,16K") == (16384, 2 << 20)
    assert [format_size(s) for s in (16384, 1 << 20, 1000)] == ["16K", "1M", "1000"]
    with pytest.raises(ValueError):
        parse_size("lots")


def test_block_order_and_verification():
    src, dst = block_order(64, 3)
    assert sorted(src.tolist()) == list(range(64)) and sorted(dst.tolist()) == list(range(64))
    assert np.array_equal(block_order(64, 3)[0], src)
    block = 4096
    a, b = Buffer(64 * block), Buffer(64 * block)
    fill_pattern(a.array, 5)
    b.array.reshape(64, block)[dst] = a.array.reshape(64, block)[src]
    assert verify_blocks(b.array, block, src, dst, 5) is None
    assert verify_blocks(b.array, block, src, dst, 6) is not None
    a.close()
    b.close()


def _bw(mech, direction, size, gbps, **extra):
    return record("bandwidth", mech, direction=direction, placement="host/host", block_bytes=size,
                  samples_gbps=[gbps * 0.9, gbps, gbps * 1.1], **extra)


def test_report_ratios_and_targets():
    k16, k64, k512 = 16 << 10, 64 << 10, 512 << 10
    recs = [_bw("memcpy.c_1t", "copy", k16, 8.0), _bw("memcpy.c_1t", "copy", k64, 10.0),
            _bw("raw_tcp", "pull", k16, 3.0), _bw("raw_tcp", "pull", k64, 3.0),
            _bw("auto", "pull", k16, 6.4), _bw("auto", "pull", k64, 8.0),
            _bw("nixl", "pull", k16, 4.0), _bw("nixl", "pull", k64, 6.0),
            _bw("tcp", "pull", k16, 2.8), _bw("mooncake", "pull", k16, 1.0)]
    results = Results(recs)  # no 2-thread memcpy measured: the same-host ratios fall back to memcpy 1t
    assert results.ratio("auto", "pull", "host/host", k16) == pytest.approx(0.8)
    assert results.ratio("tcp", "pull", "host/host", k16) == pytest.approx(2.8 / 3.0)
    table = "\n".join(transfer_table(results, "host/host", "pull"))
    assert "| 16K | 8.00 (7.20-8.80) |" in table and "×0.80" in table
    status = {(r[0], r[1]): r[5] for r in target_rows(results) if r[2] == "pull"}
    assert ("auto / memcpy 2t", "16K") not in status  # nothing to check it against
    assert status[("auto / nixl", "16K")] == "met"  # 1.6 >= 1.5
    assert status[("auto / nixl", "64K")].startswith("NOT met")  # 1.33 < 1.5
    assert status[("tcp / raw socket, 1 stream", "16K")].startswith("NOT met (-7%)")  # 0.93 < 1.0
    assert status[("tcp / mooncake", "16K")] == "met"
    recs += [_bw("memcpy.c_2t", "copy", k16, 10.0), _bw("memcpy.c_2t", "copy", k64, 10.0),
             _bw("memcpy.c_2t", "copy", k512, 10.0), _bw("memcpy.c_1t", "copy", k512, 8.0),
             _bw("auto", "pull", k512, 9.0, paired_ratios=[1.2, 1.1, 1.3], paired_ratios_2t=[0.95, 0.9, 0.93]),
             _bw("nixl", "pull", k512, 6.0)]
    results = Results(recs)
    assert results.ratio("auto", "pull", "host/host", k16) == pytest.approx(0.64)  # 6.4 / 10.0, medians
    assert results.ratio("auto", "pull", "host/host", k512) == pytest.approx(0.93)  # paired, per pass
    assert results.ratio("auto", "pull", "host/host", k512, against="memcpy.c_1t") == pytest.approx(1.2)
    table = "\n".join(transfer_table(results, "host/host", "pull"))
    assert "| 512K | 8.00 (7.20-8.80) | 10.00 (9.00-11.00) | 9.00 (8.10-9.90) ×0.93 (1t ×1.20) |" in table
    status = {(r[0], r[1]): r[5] for r in target_rows(results) if r[2] == "pull"}
    assert status[("auto / memcpy 2t", "16K")].startswith("NOT met")  # 0.64 < 0.85
    assert status[("auto / memcpy 2t", "64K")].startswith("NOT met (-13%)")  # 0.80 < 0.92
    assert status[("auto / memcpy 2t", "512K")] == "met"  # 0.93 >= 0.92
    assert ("auto / nixl", "512K") not in status  # from 512 KiB the memcpy target is the bar
    matrix = "\n".join(target_table(results, "pull"))
    assert "| 512K | ×0.93 met (≥ 0.92) | ×1.50 (no target) |" in matrix
    recs += [_bw("pvm.c_2t", "pull", k512, 8.0), _bw("pvm.c_2t", "push", k512, 7.0)]
    results = Results(recs)  # the kernel's own cross-process copy: a column after memcpy 2t, a ratio to it
    cols = results.columns("host/host", "pull")
    assert cols.index("pvm.c_2t") == cols.index("memcpy.c_2t") + 1 < cols.index("auto")
    assert results.ratio("pvm.c_2t", "pull", "host/host", k512) == pytest.approx(0.8)
    assert results.ratio("pvm.c_2t", "push", "host/host", k512) == pytest.approx(0.7)
    assert results.ratio("auto", "pull", "host/host", k512, against="pvm.c_2t") == pytest.approx(9.0 / 8.0)
    assert "| raw process_vm 2t |" in "\n".join(transfer_table(results, "host/host", "pull"))
    matrix = "\n".join(target_table(results, "pull"))
    assert "| 512K | ×0.93 met (≥ 0.92) | ×1.12 (no target) | ×0.80 (no target) | ×1.50 (no target) |" in matrix
    from llm_datadist_bench.report import _legend

    legend = "\n".join(_legend(results))  # one library stream: the one-stream socket is that reference too
    assert "**raw process_vm 2t**" in legend and "**raw tcp, N streams**: not a separate column" in legend
    legend = "\n".join(_legend(Results(recs + [_bw("raw_tcp_n", "pull", k16, 3.5, streams=2)])))
    assert "not a separate column" not in legend and "**raw tcp, 2 streams**" in legend


def _lat(kind, suite, us, **extra):
    return record(kind, suite, bytes=16384, samples_us=us, **extra)


def test_per_call_targets_next_to_the_floor():
    from llm_datadist_bench.targets import call_target_rows

    recs = [_lat("latency_16k", "auto", [10.0] * 98 + [30.0, 50.0]), _lat("floor_16k", "auto", [3.0] * 100),
            _lat("latency_layers", "auto", [200.0] * 100), _lat("floor_layers", "auto", [150.0] * 100),
            _lat("latency_model", "auto", [12000.0, 12500.0, 12100.0], paired_ratios_2t=[0.94, 1.0, 0.97],
                 paired_memcpy_2t_us=[11300.0, 12500.0, 11700.0])]
    rows = {row[0]: row for row in call_target_rows(Results(recs))}
    assert rows["16 KiB block per call, p50"] == ("16 KiB block per call, p50", "10.0 µs", "3.0 µs", "≤ 15 µs", "met")
    assert rows["16 KiB block per call, p99"][1:3] == ("50.0 µs", "3.0 µs")
    assert rows["16 KiB block per call, p99"][4] == "NOT met (+25%)"  # 50 > 40
    assert rows["56 × 1 × 16 KiB per call, p50"][1:4] == ("200.0 µs", "150.0 µs", "no fixed bound")
    model = rows["56 × 32 × 64 KiB request / memcpy 2t of the same blocks"]
    assert model[1] == "×0.97" and model[4] == "met"  # the median of the paired ratios


def test_merge_samples_pools_rounds():
    merged = merge_samples([_bw("memcpy.c_1t", "copy", 16384, 8.0), _bw("memcpy.c_1t", "copy", 16384, 10.0)])
    assert len(merged) == 1 and len(merged[0]["samples_gbps"]) == 6 and merged[0]["rounds"] == 2
    assert merged[0]["min_gbps"] == pytest.approx(7.2) and merged[0]["max_gbps"] == pytest.approx(11.0)
