"""The connector's transfer statistics (integrations/vllm/stats.py, no vLLM needed): recording, aggregation over
workers and steps, the logged summary, serialization, per-step served deltas, Prometheus metrics; and, with the
Python of .venv-vllm, the same classes inside vLLM's own stats plumbing (KVConnectorLogging, KVConnectorProm)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import threading
from types import SimpleNamespace

import msgspec
import pytest

from llm_datadist import LLMException, LLMStatusCode
from llm_datadist.integrations.vllm.stats import (DIRECTIONS, PULLED, PUSHED, RECEIVED, SERVED, ConnectorStats,
                                                  PromExporter, ServedCounter, TransferRecorder, collect_step,
                                                  failure_reason)
from llm_datadist.stats import LATENCY_BUCKETS_S
from vllm_harness import HERE, vllm_env

BLOCK_BYTES = 32768  # the tiny model's KV per block: 2 layers x (K, V) x 32 tokens x 2 heads x 32 dims x 4 bytes


def _pulls(*seconds: float, nbytes: int = 3 * BLOCK_BYTES) -> ConnectorStats:
    stats = ConnectorStats()
    for s in seconds:
        stats.record_transfer(PULLED, nbytes, s)
    return stats


def test_recording_and_the_plain_data():
    stats = _pulls(0.002, 0.004)
    stats.record_transfer(RECEIVED, 5000)
    stats.record_transfer(SERVED, 7000, transfers=2)
    stats.record_failure(PULLED, "claim_refused")
    stats.record_failure(PULLED, "claim_refused")
    assert stats.to_dict() == {"transfers": {PULLED: 2, RECEIVED: 1, SERVED: 2},
                               "bytes": {PULLED: 6 * BLOCK_BYTES, RECEIVED: 5000, SERVED: 7000},
                               "seconds": {PULLED: [0.002, 0.004]},
                               "failures": {PULLED: {"claim_refused": 2}}}
    assert not stats.is_empty()


def test_empty_reset_and_failures_only():
    stats = ConnectorStats()
    assert stats.is_empty() and stats.to_dict() == {"transfers": {}, "bytes": {}, "seconds": {}, "failures": {}}
    stats.record_failure(SERVED, "lease_expired", 3)
    assert not stats.is_empty()  # failures alone are worth reporting
    assert stats.reduce() == {"failures": 3, "served_failed_lease_expired": 3}
    stats.reset()
    assert stats.is_empty() and stats == ConnectorStats()
    assert ConnectorStats({"transfers": {PULLED: 0}, "failures": {PULLED: {"transfer": 0}}}).is_empty()


def test_aggregate_adds_workers_and_steps_without_touching_the_other():
    first = _pulls(0.001)
    first.record_failure(PULLED, "connection")
    second = _pulls(0.003, nbytes=BLOCK_BYTES)
    second.record_transfer(PUSHED, 100, 0.5)
    second.record_failure(PULLED, "connection")
    second.record_failure(PUSHED, "push_failed")
    before = json.dumps(second.to_dict(), sort_keys=True)
    assert first.aggregate(second) is first
    assert first.to_dict() == {"transfers": {PULLED: 2, PUSHED: 1}, "bytes": {PULLED: 4 * BLOCK_BYTES, PUSHED: 100},
                               "seconds": {PULLED: [0.001, 0.003], PUSHED: [0.5]},
                               "failures": {PULLED: {"connection": 2}, PUSHED: {"push_failed": 1}}}
    assert json.dumps(second.to_dict(), sort_keys=True) == before
    first.aggregate(ConnectorStats())
    assert first.to_dict()["transfers"] == {PULLED: 2, PUSHED: 1}


def test_reduce_is_the_log_summary():
    stats = _pulls(*[0.001] * 99, 0.101, nbytes=1_000_000)  # 100 pulls of 1 MB in 0.2 s
    stats.record_transfer(RECEIVED, 2_000_000)
    stats.record_transfer(SERVED, 3_000_000, transfers=3)
    stats.record_failure(PULLED, "transfer")
    stats.record_failure(RECEIVED, "push_timeout", 2)
    summary = stats.reduce()
    assert summary == {
        "pulled_transfers": 100, "pulled_MB": 100.0, "pulled_MB_per_s": 500.0, "pulled_mean_ms": 2.0,
        "pulled_p99_ms": pytest.approx(2.0), "received_transfers": 1, "received_MB": 2.0,
        "served_transfers": 3, "served_MB": 3.0,
        "failures": 3, "pulled_failed_transfer": 1, "received_failed_push_timeout": 2}
    # p99 interpolates between the closest ranks, as numpy does
    assert _pulls(*[0.001 * i for i in range(1, 101)]).reduce()["pulled_p99_ms"] == pytest.approx(99.01)
    assert list(summary)[:5] == ["pulled_transfers", "pulled_MB", "pulled_MB_per_s", "pulled_mean_ms",
                                 "pulled_p99_ms"]


def test_serialization_round_trips():
    stats = _pulls(0.25, 0.5)
    stats.record_transfer(SERVED, 123, transfers=1)
    stats.record_failure(RECEIVED, "prefill_lost")
    for wire in (msgspec.msgpack.encode(stats.to_dict()), json.dumps(stats.to_dict()).encode()):
        data = msgspec.msgpack.decode(wire) if wire[:1] != b"{" else json.loads(wire)
        again = ConnectorStats(data)
        assert again == stats and again.reduce() == stats.reduce()
        again.aggregate(stats)
        assert data == stats.to_dict()  # the rebuilt stats own their data: aggregating never changes the input
    assert pickle.loads(pickle.dumps(stats)) == stats
    # a sender may leave empty parts out
    assert ConnectorStats({"bytes": {SERVED: 5}}).to_dict() == {"transfers": {}, "bytes": {SERVED: 5},
                                                                "seconds": {}, "failures": {}}


def test_recorder_takes_everything_once_across_threads():
    recorder = TransferRecorder()

    def record():
        for _ in range(1000):
            recorder.transfer(PULLED, 10, 0.001)
            recorder.failure(PULLED, "connection")

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    taken = [recorder.take()]
    for thread in threads:
        thread.join()
    taken.append(recorder.take())
    total = ConnectorStats()
    for part in taken:
        total.aggregate(part)
    assert total.to_dict()["transfers"] == {PULLED: 4000} and total.to_dict()["bytes"] == {PULLED: 40000}
    assert len(total.to_dict()["seconds"][PULLED]) == 4000
    assert total.to_dict()["failures"] == {PULLED: {"connection": 4000}}
    assert recorder.take().is_empty()


def _snapshot(*served):
    return SimpleNamespace(served=tuple(SimpleNamespace(direction=d, transfers=n, bytes=b) for d, n, b in served))


def test_served_counter_takes_deltas_of_the_served_pulls():
    snaps = [_snapshot(("pull", 1, 100), ("push", 5, 999)), _snapshot(("pull", 1, 100), ("pull", 2, 50)),
             _snapshot(("pull", 1, 100), ("pull", 2, 50))]
    counter = ServedCounter(lambda datadist: snaps.pop(0))
    assert counter.take(None) == (0, 0)  # not registered yet
    assert counter.take(object()) == (1, 100)
    assert counter.take(object()) == (2, 50)
    assert counter.take(object()) == (0, 0)

    def finalized(datadist):
        raise RuntimeError("the instance is not initialized")

    assert ServedCounter(finalized).take(object()) == (0, 0)


def test_collect_step_merges_the_parts_and_the_served_delta():
    loads, pushes = TransferRecorder(), TransferRecorder()
    snaps = [_snapshot(), _snapshot(("pull", 1, 4096))]
    served = ServedCounter(lambda datadist: snaps.pop(0))
    assert collect_step([loads, pushes], served, object()) is None  # nothing happened
    loads.transfer(PULLED, 8192, 0.01)
    pushes.failure(PUSHED, "lease_expired")
    data = collect_step([loads, pushes], served, object())
    assert data == {"transfers": {PULLED: 1, SERVED: 1}, "bytes": {PULLED: 8192, SERVED: 4096},
                    "seconds": {PULLED: [0.01]}, "failures": {PUSHED: {"lease_expired": 1}}}
    assert collect_step([loads, pushes]) is None


def test_failure_reasons():
    assert failure_reason(LLMException("x", status_code=LLMStatusCode.LLM_TIMEOUT)) == "transfer"
    assert failure_reason(ConnectionError("prefill refused the claim: unknown request")) == "claim_refused"
    assert failure_reason(ConnectionError("connection refused")) == "connection"
    assert failure_reason(TimeoutError("link")) == "connection"
    assert failure_reason(ValueError("3 tokens need 1 blocks")) == "invalid"
    assert failure_reason(KeyError("x")) == "internal"


def test_prometheus_metrics_keep_vllms_labels():
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()

    def counter(**kwargs):
        return prometheus_client.Counter(registry=registry, **kwargs)

    def histogram(**kwargs):
        return prometheus_client.Histogram(registry=registry, **kwargs)

    exporter = PromExporter(counter, histogram, ["model_name", "engine"], {0: ["tiny", "0"], 1: ["tiny", "1"]})
    text = prometheus_client.generate_latest(registry).decode()
    for direction in DIRECTIONS:  # every series exists from the start
        assert f'vllm:llm_datadist_kv_bytes_total{{direction="{direction}",engine="1",model_name="tiny"}} 0.0' \
            in text
    stats = _pulls(0.002, 0.004)
    stats.record_transfer(SERVED, 5000, transfers=2)
    stats.record_failure(PULLED, "claim_refused")
    exporter.observe(stats.to_dict(), engine_idx=0)
    exporter.observe(_pulls(20.0).to_dict(), engine_idx=0)  # beyond the last bucket: +Inf
    exporter.observe(stats.to_dict(), engine_idx=7)  # an engine vLLM did not announce: ignored

    def value(name, **labels):
        return registry.get_sample_value(name, {"model_name": "tiny", "engine": "0", **labels})

    assert value("vllm:llm_datadist_kv_transfers_total", direction=PULLED) == 3
    assert value("vllm:llm_datadist_kv_bytes_total", direction=PULLED) == 9 * BLOCK_BYTES
    assert value("vllm:llm_datadist_kv_bytes_total", direction=SERVED) == 5000
    assert value("vllm:llm_datadist_kv_transfers_total", direction=SERVED) == 2
    assert value("vllm:llm_datadist_kv_bytes_total", direction=RECEIVED) == 0
    assert value("vllm:llm_datadist_kv_failures_total", direction=PULLED, reason="claim_refused") == 1
    assert value("vllm:llm_datadist_kv_transfer_seconds_count", direction=PULLED) == 3
    assert value("vllm:llm_datadist_kv_transfer_seconds_sum", direction=PULLED) == pytest.approx(20.006)
    assert value("vllm:llm_datadist_kv_transfer_seconds_bucket", direction=PULLED, le="0.0025") == 1
    assert value("vllm:llm_datadist_kv_transfer_seconds_bucket", direction=PULLED,
                 le=str(float(LATENCY_BUCKETS_S[-1]))) == 2
    assert value("vllm:llm_datadist_kv_transfer_seconds_bucket", direction=PULLED, le="+Inf") == 3
    assert value("vllm:llm_datadist_kv_bytes_total", direction=PULLED).is_integer()
    assert registry.get_sample_value("vllm:llm_datadist_kv_bytes_total",
                                     {"model_name": "tiny", "engine": "1", "direction": PULLED}) == 0


def test_the_stats_inside_vllms_plumbing(vllm_python):
    """The connector class as vLLM's factory resolves it: workers' stats aggregated, the scheduler's payload through
    vLLM's msgpack, the frontend's log line and Prometheus metrics."""
    out = subprocess.run([vllm_python, os.path.join(HERE, "stats_in_vllm.py")], capture_output=True, text=True,
                         env=vllm_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["type"] == "LLMDataDistKVConnectorStats"
    assert result["scheduler_side"] is None
    assert result["log"] == ("KV Transfer metrics: pulled_transfers=3, pulled_MB=0.295, pulled_MB_per_s=49.2, "
                             "pulled_mean_ms=2.0, pulled_p99_ms=2.0, served_transfers=1, served_MB=0.098, "
                             "failures=1, pulled_failed_claim_refused=1")
    assert result["bytes_pulled"] == 9 * BLOCK_BYTES and result["bytes_served"] == 3 * BLOCK_BYTES
    assert result["seconds_count"] == 3
    assert result["failures"] == 1
