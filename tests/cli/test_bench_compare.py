"""``llm-datadist bench --compare A.jsonl B.jsonl``: one line per cell measured in both runs, ratio and change."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import llm_datadist
import llm_datadist_bench
from llm_datadist_bench import cli as bench
from llm_datadist_bench.common import record
from llm_datadist_bench.compare import cells, compare_lines, load_run
from llm_datadist_bench.report import write_jsonl

# the folders of the core and of the bench distribution, first on the path of the bench processes
SRC = os.pathsep.join(os.path.dirname(os.path.dirname(os.path.abspath(str(package.__file__))))
                      for package in (llm_datadist, llm_datadist_bench))
K64 = 64 << 10


def _bw(mech, direction, size, gbps, **extra):
    return record("bandwidth", mech, direction=direction, placement="host/host", block_bytes=size,
                  samples_gbps=[gbps], **extra)


def _run(path, auto_2t, p50_us, extra=()):
    recs = [record("meta", "run", date="2026-01-01 00:00 UTC", library="git abc1234", mode="full"),
            _bw("memcpy.c_1t", "copy", K64, 7.0), _bw("memcpy.c_2t", "copy", K64, 12.0),
            _bw("auto", "pull", K64, 9.0, paired_ratios=[1.3], paired_ratios_2t=[auto_2t]),
            _bw("raw_tcp", "pull", K64, 4.0), _bw("tcp", "pull", K64, 3.6),
            record("latency_16k", "auto", bytes=16384, samples_us=[p50_us] * 10), *extra]
    write_jsonl(str(path), recs)
    return str(path)


def test_every_cell_in_both_runs_gets_its_change(tmp_path):
    a = _run(tmp_path / "a.jsonl", 0.81, 140.0)
    b = _run(tmp_path / "b.jsonl", 0.93, 14.0, [_bw("shm", "pull", K64, 10.0, paired_ratios_2t=[0.9])])
    (a_meta, ra), (b_meta, rb) = load_run(a), load_run(b)
    lines = compare_lines(a, ra, b, rb, a_meta, b_meta)
    assert lines[0] == f"A: {a} (2026-01-01 00:00 UTC, git abc1234, full)"
    by_cell = {line.split(":")[0]: line for line in lines if ": " in line and not line.startswith(("A:", "B:"))}
    assert by_cell["auto/memcpy 2t 64K"].endswith("x0.81 -> x0.93 (+15%)")
    assert by_cell["auto/memcpy 1t 64K"].endswith("x1.30 -> x1.30 (+0%)")
    assert by_cell["tcp/raw tcp socket 64K"].endswith("x0.90 -> x0.90 (+0%)")
    assert by_cell["auto 16 KiB block p50"].endswith("140.0 us -> 14.0 us (-90%)")
    assert "## pull, host/host" in lines and "## per call" in lines
    assert "shm/memcpy 2t 64K" not in by_cell  # only in B
    assert "not compared: 0 cells only in A, 2 only in B" in lines  # shm against memcpy 2t and 1t
    met = [line for line in lines if line.startswith("targets met")]
    assert met == ["targets met: A 0/4, B 3/4"]  # auto/memcpy 2t, tcp/raw socket, 16 KiB p50 and p99


def test_cells_of_a_run_compared_with_itself_do_not_move(tmp_path):
    a = _run(tmp_path / "a.jsonl", 0.9, 50.0)
    _meta, results = load_run(a)
    lines = compare_lines(a, results, a, results)
    changes = [line for line in lines if "->" in line]
    assert len(changes) == len(cells(results)) >= 4
    assert all(line.endswith("(+0%)") for line in changes)


def test_unreadable_or_empty_files_exit_2(tmp_path, capsys):
    good = _run(tmp_path / "a.jsonl", 0.9, 50.0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"kind": "meta", "mechanism": "run"}) + "\n")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    assert bench.main(["--compare", good, str(tmp_path / "missing.jsonl")]) == 2
    assert bench.main(["--compare", str(empty), good]) == 2
    assert bench.main(["--compare", good, str(garbage)]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "no bench measurements" in err and "garbage.jsonl:1: not JSON" in err


def test_compare_from_the_command_line(tmp_path):
    a = _run(tmp_path / "a.jsonl", 0.81, 140.0)
    b = _run(tmp_path / "b.jsonl", 0.93, 14.0)
    env = dict(os.environ, PYTHONPATH=SRC + (os.pathsep + os.environ["PYTHONPATH"]
                                             if os.environ.get("PYTHONPATH") else ""))
    proc = subprocess.run([sys.executable, "-m", "llm_datadist", "bench", "--compare", a, b], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [" ".join(line.split()) for line in proc.stdout.splitlines()]  # the cell names are padded to align
    assert "auto/memcpy 2t 64K: x0.81 -> x0.93 (+15%)" in lines


def test_a_run_without_paired_2t_ratios_falls_back_to_medians(tmp_path):
    path = tmp_path / "old.jsonl"
    write_jsonl(str(path), [_bw("memcpy.c_2t", "copy", K64, 12.0), _bw("auto", "pull", K64, 9.0)])
    _meta, results = load_run(str(path))
    assert cells(results)[("pull, host/host", "auto/memcpy 2t 64K")] == (pytest.approx(0.75), "x")
