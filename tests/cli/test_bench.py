"""``llm-datadist bench``: a tiny --quick run end to end (table, JSON lines, PNG) and the report's arithmetic."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import llm_datadist
from llm_datadist.cli import bench
from llm_datadist.cli.bench_common import (Buffer, block_order, fill_pattern, format_size, merge_samples, parse_size,
                                           parse_sizes, record, verify_blocks)
from llm_datadist.cli.bench_report import Results, target_rows, target_table, transfer_table

SRC = os.path.dirname(os.path.dirname(os.path.abspath(llm_datadist.__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("LLM_DATADIST_TRANSPORT", None)
    cmd = [sys.executable, "-m", "llm_datadist", "bench", "--quick", "--sizes", "16K,64K", "--total-mib", "2",
           "--passes", "2", "--warmup", "1", "--out", str(out), "--no-progress"]
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
    ceiling = "memcpy.c_1t" if any(m == "memcpy.c_1t" for m, _, _ in bw) else "memcpy.np_1t"
    for size in (16384, 65536):
        assert (ceiling, "copy", size) in bw
        assert ("raw_tcp", "pull", size) in bw
        for mech in ("process_vm", "tcp", "auto"):
            for direction in ("pull", "push"):
                assert (mech, direction, size) in bw, (mech, direction, size)
    for rec in records:
        if rec["kind"] == "bandwidth":
            assert rec["min_gbps"] <= rec["median_gbps"] <= rec["max_gbps"]
            assert rec["median_gbps"] > 0 and len(rec["samples_gbps"]) >= 2
    kinds = {r["kind"] for r in records}
    assert {"plan", "link", "latency_16k", "latency_model"} <= kinds
    assert not [r for r in records if r["kind"] == "error"]


def test_quick_run_markdown(quick_run):
    _, out = quick_run
    text = (out / "results.md").read_text()
    assert "### READ direction (pull), host/host" in text and "### WRITE direction (push), host/host" in text
    rows = [line for line in text.splitlines() if line.startswith("| 16K |") or line.startswith("| 64K |")]
    assert len(rows) >= 4
    assert any("×" in row for row in rows)  # ratios to the references
    assert "### Targets: ratio and status, pull" in text and "plan_blocks" in text


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
    assert "error" in capsys.readouterr().err


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


def _bw(mech, direction, size, gbps):
    return record("bandwidth", mech, direction=direction, placement="host/host", block_bytes=size,
                  samples_gbps=[gbps * 0.9, gbps, gbps * 1.1])


def test_report_ratios_and_targets():
    k16, k64 = 16 << 10, 64 << 10
    recs = [_bw("memcpy.c_1t", "copy", k16, 8.0), _bw("memcpy.c_1t", "copy", k64, 10.0),
            _bw("raw_tcp", "pull", k16, 3.0), _bw("raw_tcp", "pull", k64, 3.0),
            _bw("auto", "pull", k16, 6.4), _bw("auto", "pull", k64, 8.0),
            _bw("nixl", "pull", k16, 4.0), _bw("nixl", "pull", k64, 6.0),
            _bw("tcp", "pull", k16, 2.8), _bw("mooncake", "pull", k16, 1.0)]
    results = Results(recs)
    assert results.ratio("auto", "pull", "host/host", k16) == pytest.approx(0.8)
    assert results.ratio("tcp", "pull", "host/host", k16) == pytest.approx(2.8 / 3.0)
    table = "\n".join(transfer_table(results, "host/host", "pull"))
    assert "| 16K | 8.00 (7.20-8.80) |" in table and "×0.80" in table
    status = {(r[0], r[1]): r[5] for r in target_rows(results) if r[2] == "pull"}
    assert status[("auto / memcpy 1t", "16K")] == "met"  # 0.80 >= 0.75
    assert status[("auto / memcpy 1t", "64K")].startswith("NOT met")  # 0.80 < 0.85
    assert status[("auto / nixl", "16K")] == "met"  # 1.6 >= 1.5
    assert status[("auto / nixl", "64K")].startswith("NOT met")  # 1.33 < 1.5
    assert status[("tcp / raw socket", "16K")] == "met"
    assert status[("tcp / mooncake", "16K")] == "met"
    matrix = "\n".join(target_table(results, "pull"))
    assert "| 16K | ×0.80 met (≥ 0.75) | ×1.60 met (≥ 1.5) |" in matrix


def test_merge_samples_pools_rounds():
    merged = merge_samples([_bw("memcpy.c_1t", "copy", 16384, 8.0), _bw("memcpy.c_1t", "copy", 16384, 10.0)])
    assert len(merged) == 1 and len(merged[0]["samples_gbps"]) == 6 and merged[0]["rounds"] == 2
    assert merged[0]["min_gbps"] == pytest.approx(7.2) and merged[0]["max_gbps"] == pytest.approx(11.0)
