"""The /metrics endpoint of two real processes: exact counts against known transfers (bytes to the byte on the
puller and, as served bytes, on the owner), failures by status code, latency histograms, links; and
``llm-datadist stats`` against the live endpoints."""
from __future__ import annotations

import json
import socket
import urllib.request
from typing import Dict, List, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_datadist.cli import stats as stats_cli
from llm_datadist.cli.main import main
from llm_datadist.metrics import ENV_PORT
from tests.api.notify_peer import NUM_TENSORS, PeerClient as Peer
from waiting import wait_until

PREFILL, DECODE, NOBODY = 311, 412, 513
BLOCK = 4096
PULLS = [[1], [2, 3], [4, 5, 6], [7, 8, 9, 10]]
PUSHES = [[0], [11, 12]]
FAILED_PULLS = 2
PULLED = sum(len(b) for b in PULLS) * NUM_TENSORS * BLOCK
PUSHED = sum(len(b) for b in PUSHES) * NUM_TENSORS * BLOCK

Samples = List[Tuple[str, Dict[str, str], float]]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def series(samples: Samples, name: str, **labels: str) -> List[Tuple[Dict[str, str], float]]:
    return [(lab, v) for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]


@pytest.fixture(scope="module")
def traffic():
    """A prefill and a decode process, each serving /metrics on a port of its own (LLM_DATADIST_METRICS_PORT=0:
    a free one), after known pulls, pushes, failed pulls and one failed dial of the decode."""
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_PORT, "0")
    server, client = Peer(), Peer()
    mp.undo()
    try:
        server.port = server.call("init", cluster_id=PREFILL, listen=True, block_bytes=BLOCK)["port"]
        client.call("init", cluster_id=DECODE, block_bytes=BLOCK)
        with socket.socket() as sock:  # a port nothing listens on: one failed dial
            sock.bind(("127.0.0.1", 0))
            dial_code = client.call("link", cluster_id=NOBODY, port=sock.getsockname()[1])["code"]
        assert dial_code != "LLM_SUCCESS"
        assert client.call("link", cluster_id=PREFILL, port=server.port)["code"] == "LLM_SUCCESS"
        for i, blocks in enumerate(PULLS):
            server.call("fill", blocks=blocks, seed=i + 1)
            assert client.call("pull", cluster_id=PREFILL, src_blocks=blocks, dst_blocks=blocks,
                               seed=i + 1) == {"code": "LLM_SUCCESS", "right": True}
        for i, blocks in enumerate(PUSHES):
            assert client.call("push", cluster_id=PREFILL, src_blocks=blocks, dst_blocks=blocks,
                               seed=50 + i)["code"] == "LLM_SUCCESS"
        for _ in range(FAILED_PULLS):  # a block beyond the source cache: the owner's geometry refuses it
            assert client.call("pull", cluster_id=PREFILL, src_blocks=[99], dst_blocks=[0], seed=1)["code"] == \
                "LLM_PARAM_INVALID"
        urls = {}
        for name, peer in (("prefill", server), ("decode", client)):
            host, port = peer.call("metrics")["address"]
            assert host == "127.0.0.1"
            urls[name] = f"http://{host}:{port}/metrics"
        yield {"urls": urls, "dial_code": dial_code, "client": client, "server": server}
    finally:
        client.close()
        server.close()


def test_the_decode_endpoint_counts_every_call_and_byte(traffic):
    samples = scrape(traffic["urls"]["decode"])
    me = {"cluster_id": str(DECODE)}
    pull = dict(me, peer=str(PREFILL), direction="pull")
    push = dict(me, peer=str(PREFILL), direction="push")
    assert total(samples, "llm_datadist_transfers_total", **pull) == len(PULLS)
    assert total(samples, "llm_datadist_transfer_bytes_total", **pull) == PULLED
    assert total(samples, "llm_datadist_transfers_total", **push) == len(PUSHES)
    assert total(samples, "llm_datadist_transfer_bytes_total", **push) == PUSHED
    failures = series(samples, "llm_datadist_transfer_failures_total", **me)
    assert {(lab["direction"], lab["code"]): v for lab, v in failures} == {("pull", "LLM_PARAM_INVALID"): 2}
    # the histogram: one observation per call, failed ones included; cumulative buckets, +Inf == _count
    assert total(samples, "llm_datadist_transfer_duration_seconds_count", **pull) == len(PULLS) + FAILED_PULLS
    assert total(samples, "llm_datadist_transfer_duration_seconds_count", **push) == len(PUSHES)
    assert total(samples, "llm_datadist_transfer_duration_seconds_sum", **pull) > 0
    routes = {(lab["transport"], lab["direction"]) for lab, _ in
              series(samples, "llm_datadist_transfer_duration_seconds_count", **me)}
    for transport, direction in routes:
        route = dict(me, peer=str(PREFILL), transport=transport, direction=direction)
        buckets = series(samples, "llm_datadist_transfer_duration_seconds_bucket", **route)
        counts = [v for lab, v in sorted(buckets, key=lambda b: float(b[0]["le"]))]
        assert counts == sorted(counts), buckets
        assert [lab["le"] for lab, _ in buckets][-1] == "+Inf"
        assert counts[-1] == total(samples, "llm_datadist_transfer_duration_seconds_count", **route)
    assert total(samples, "llm_datadist_info", role="decoder", stats_enabled="true", **me) == 1
    assert total(samples, "llm_datadist_links", **me) == 1
    assert total(samples, "llm_datadist_links_made_total", how="dialed", **me) == 1
    assert total(samples, "llm_datadist_link_failures_total", side="dial", code=traffic["dial_code"], **me) == 1
    assert total(samples, "llm_datadist_transfers_in_flight", **me) == 0
    assert total(samples, "llm_datadist_caches", kind="host", **me) == 1
    assert total(samples, "llm_datadist_cache_bytes", kind="host", **me) == 16 * BLOCK * NUM_TENSORS
    # the endpoint says what llm_datadist.stats says, row by row
    snap = traffic["client"].call("stats")["stats"]
    for row in snap["transfers"]:
        route = dict(me, peer=str(row["peer"]), transport=row["transport"], direction=row["direction"])
        assert total(samples, "llm_datadist_transfers_total", **route) == row["transfers"]
        assert total(samples, "llm_datadist_transfer_bytes_total", **route) == row["bytes"]
        assert total(samples, "llm_datadist_transfer_duration_seconds_count", **route) == \
            sum(row["latency"]["counts"])
    # one process, one endpoint: the decode's endpoint has no prefill series
    assert {lab["cluster_id"] for _, lab, _ in samples} == {str(DECODE)}


def test_the_prefill_endpoint_counts_what_its_peer_moved(traffic):
    url = traffic["urls"]["prefill"]
    me = {"cluster_id": str(PREFILL), "peer": str(DECODE)}
    # the decode reports each second what it moved in and out of the prefill's memory
    assert wait_until(lambda: total(scrape(url), "llm_datadist_served_bytes_total", direction="pull", **me) == PULLED)
    assert wait_until(lambda: total(scrape(url), "llm_datadist_served_bytes_total", direction="push", **me) == PUSHED)
    samples = scrape(url)
    assert total(samples, "llm_datadist_served_transfers_total", direction="pull", **me) == len(PULLS)
    assert total(samples, "llm_datadist_served_transfers_total", direction="push", **me) == len(PUSHES)
    assert total(samples, "llm_datadist_links_made_total", how="accepted", cluster_id=str(PREFILL)) == 1
    assert total(samples, "llm_datadist_info", role="prompt", cluster_id=str(PREFILL)) == 1
    assert total(samples, "llm_datadist_transfers_total", cluster_id=str(PREFILL)) == 0  # it moved nothing itself


def test_stats_once_json_reads_the_live_endpoint(traffic, capsys):
    url = traffic["urls"]["decode"]
    assert main(["stats", url.replace("http://", "").replace("/metrics", ""), "--once", "--json"]) == 0
    dump = json.loads(capsys.readouterr().out)
    assert dump["endpoint"] == url
    [cluster] = dump["clusters"]
    assert cluster["cluster_id"] == DECODE and cluster["role"] == "decoder"
    assert cluster["links"]["live"] == 1 and cluster["links"]["made"] == {"dialed": 1}
    assert cluster["links"]["failed"] == {"dial": {traffic["dial_code"]: 1}}
    assert cluster["in_flight"] == 0
    assert cluster["caches"] == [{"kind": "host", "caches": 1, "bytes": 16 * BLOCK * NUM_TENSORS}]
    pulls = [r for r in cluster["transfers"] if r["direction"] == "pull"]
    assert sum(r["transfers"] for r in pulls) == len(PULLS)
    assert sum(r["bytes"] for r in pulls) == PULLED
    assert sum(r["failures"].get("LLM_PARAM_INVALID", 0) for r in pulls) == FAILED_PULLS
    assert sum(r["latency"]["count"] for r in pulls) == len(PULLS) + FAILED_PULLS
    moved = [r for r in pulls if r["transfers"]]
    assert all(0 < r["latency"]["p50_s"] <= r["latency"]["p99_s"] for r in moved)
    pushes = [r for r in cluster["transfers"] if r["direction"] == "push"]
    assert sum(r["bytes"] for r in pushes) == PUSHED


def test_stats_table_refreshes(traffic, capsys):
    url = traffic["urls"]["decode"]
    assert main(["stats", url, "--count", "2", "--interval", "0.05"]) == 0
    out = capsys.readouterr().out
    assert out.count("llm-datadist stats  ") == 2  # two frames
    assert f"cluster {DECODE} (decoder)" in out and "since init" in out and "last " in out
    assert "LLM_PARAM_INVALID=2" in out


def test_the_builtin_parser_reads_what_prometheus_client_reads(traffic):
    with urllib.request.urlopen(traffic["urls"]["prefill"], timeout=10) as reply:
        text = reply.read().decode()
    text += '# a line with escapes\nx_total{a="q\\"uote",b="back\\\\slash",c="new\\nline"} 3\n'

    def key(sample):
        return sample[0], sorted(sample[1].items()), sample[2]

    ours = sorted(map(key, stats_cli.parse_samples(text, use_prometheus_client=False)))
    theirs = sorted(map(key, stats_cli.parse_samples(text, use_prometheus_client=True)))
    assert ours == theirs
    assert ("x_total", [("a", 'q"uote'), ("b", "back\\slash"), ("c", "new\nline")], 3.0) in ours
    assert stats_cli.summarize(stats_cli.parse_samples(text, False)) == stats_cli.summarize(
        stats_cli.parse_samples(text, True))
