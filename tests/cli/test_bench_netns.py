"""``llm-datadist bench --hosts netns``: a tiny run across two simulated hosts (unlimited and rate limited) and a
tiny --scale run, end to end; the network conditions and transport lists of the run."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

import llm_datadist
import llm_datadist_bench
from llm_datadist_bench.netns_run import conditions, netns_suites
from llm_datadist.cli.netns import CROSS_HOST_TRANSPORTS, unavailable_reason
from subsystems import skip

# the folders of the core and of the bench distribution, first on the path of the bench processes
SRC = os.pathsep.join(os.path.dirname(os.path.dirname(os.path.abspath(str(package.__file__))))
                      for package in (llm_datadist, llm_datadist_bench))


def _run(out, *extra):
    reason = unavailable_reason()
    if reason is not None:
        skip("netns", f"simulated hosts unavailable: {reason}")
    env = dict(os.environ, PYTHONPATH=SRC + (os.pathsep + os.environ["PYTHONPATH"]
                                             if os.environ.get("PYTHONPATH") else ""))
    env.pop("LLM_DATADIST_TRANSPORT", None)
    cmd = [sys.executable, "-m", "llm_datadist", "bench", "--hosts", "netns", "--quick", "--total-mib", "2",
           "--passes", "2", "--warmup", "1", "--out", str(out), "--no-progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def test_netns_run_measures_every_condition_with_verified_bytes(tmp_path):
    proc = _run(tmp_path, "--sizes", "64K", "--rate", "2gbit")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "meta" and records[0]["hosts"] == "netns"
    assert [c["name"] for c in records[0]["conditions"]] == ["unlimited", "tbf 2gbit"]
    bw = {(r["condition"], r["mechanism"], r["direction"]) for r in records if r["kind"] == "bandwidth"}
    for condition in ("unlimited", "tbf 2gbit"):
        for mech in netns_suites(None):  # tcp, and nixl where it is installed
            assert {(condition, mech, "pull"), (condition, mech, "push")} <= bw
        assert (condition, "raw_tcp.batch", "pull") in bw
    assert all(r["verified"] for r in records if r["kind"] == "bandwidth")
    links = [r for r in records if r["kind"] == "link"]
    assert links and all(r["route"] == r["mechanism"] for r in links)  # the forced transport, across hosts
    assert not [r for r in records if r["kind"] == "error"]
    text = (tmp_path / "results.md").read_text()
    assert "## unlimited:" in text and "## tbf 2gbit:" in text
    assert "- unlimited: tcp pull / the raw socket: ×" in text


def test_netns_scale_run_reports_links_memory_threads_and_throughput(tmp_path):
    proc = _run(tmp_path, "--scale", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "scale.jsonl").read_text().splitlines()]
    phases = {r["mechanism"]: r for r in records if r["kind"] == "scale"}
    assert set(phases) == {"fan-in", "fan-out"}
    for phase in phases.values():
        assert phase["links"] == 2 and len(phase["aggregate_samples_gbps"]) == 3
        assert phase["hub_after_finalize"]["python_threads"] == ["MainThread"]
        assert set(phase["per_link_after_link"]) == {"rss_kib", "threads", "fds"}
    assert "| decode (fan-in) | 2 |" in (tmp_path / "scale.md").read_text()


def _args(**kw):
    base = dict(quick=False, rate="1gbit,10gbit", transports=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_conditions_unlimited_then_each_rate_with_a_smaller_workload():
    opts = {"sizes": (16 << 10, 64 << 10, 1 << 20), "total": 128 << 20, "passes": 10, "warmup": 2}
    conds = conditions(_args(), opts)
    assert [(c.name, c.rate) for c in conds] == [("unlimited", None), ("tbf 1gbit", "1gbit"),
                                                 ("tbf 10gbit", "10gbit")]
    assert conds[0].sizes == opts["sizes"] and conds[0].total_bytes == 128 << 20 and conds[0].passes == 10
    assert conds[1].sizes == (64 << 10, 1 << 20) and conds[1].total_bytes == 32 << 20 and conds[1].passes == 3
    assert [c.name for c in conditions(_args(rate="none"), opts)] == ["unlimited"]


def test_netns_suites_are_the_cross_host_ones_this_machine_has():
    from llm_datadist._transport import unavailable_reason as transport_unavailable

    assert netns_suites(None) == [n for n in CROSS_HOST_TRANSPORTS if not transport_unavailable(n)]
    assert "tcp" in netns_suites(None)
    with pytest.raises(ValueError, match="--transports takes"):
        netns_suites("process_vm")
