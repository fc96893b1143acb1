"""llm_datadist.metrics in this process: the collector's families from known snapshots and live instances, the
registry helper, the endpoint that init starts and the last finalize stops, and what goes wrong politely (a port
in use, a variable that is not a port, prometheus_client missing)."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import llm_datadist
from llm_datadist import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig, LLMDataDist, LLMException,
                          LLMRole, LLMStatusCode, Placement, metrics, notifications, stats)
from llm_datadist.cli.main import main

SRC = os.path.dirname(os.path.dirname(os.path.abspath(llm_datadist.__file__)))


def _instance(cluster_id: int, role: LLMRole = LLMRole.PROMPT, listen: bool = False, **attrs) -> LLMDataDist:
    options = LLMConfig()
    options.enable_cache_manager = True
    if listen:
        options.listen_ip_info = "127.0.0.1:0"
    for name, value in attrs.items():
        setattr(options, name, value)
    dd = LLMDataDist(role, cluster_id)
    dd.init(options.generate_options())
    return dd


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def _metrics_threads():
    return [t for t in threading.enumerate() if t.name.startswith("llm-dd-metrics")]


@pytest.fixture(autouse=True)
def _no_instance_and_no_endpoint(monkeypatch):
    """Each test starts and ends without instances or an endpoint (they decide when the endpoint stops)."""
    monkeypatch.delenv(metrics.ENV_PORT, raising=False)
    monkeypatch.delenv(metrics.ENV_ADDR, raising=False)
    assert stats.snapshots() == [] and metrics.server_address() is None
    yield
    assert stats.snapshots() == [], "a test left an instance initialized"
    assert metrics.server_address() is None and not _metrics_threads()


# ---- the families ---------------------------------------------------------------------------------
def _snapshot(cluster_id: int) -> stats.StatsSnapshot:
    hist = stats.Histogram(bounds=(0.001, 0.01), counts=(2, 1, 1), sum_s=0.5)
    return stats.StatsSnapshot(
        cluster_id=cluster_id, role="decoder", enabled=True, taken_at=1000.0, uptime_s=10.0, in_flight=2,
        transfers=(stats.TransferStats(peer=9, transport="tcp", direction="pull", transfers=3, bytes=3000,
                                       failures={"LLM_TIMEOUT": 1}, latency=hist),),
        served=(stats.ServedStats(peer=9, transport="tcp", direction="push", transfers=4, bytes=400),),
        links=stats.LinkStats(live=1, made={"dialed": 2}, dropped={"lost": 1}, failed={"dial": {"LLM_LINK_FAILED": 3}}),
        caches=(stats.CacheStats(kind="host", caches=2, bytes=8192),))


def _samples(collector) -> dict:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_field_of_a_snapshot_becomes_a_sample():
    got = _samples(metrics.DataDistCollector(source=lambda: [_snapshot(5)]))
    route = (("cluster_id", "5"), ("direction", "pull"), ("peer", "9"), ("transport", "tcp"))

    def at(name, *extra, labels=route):
        return got[(name, tuple(sorted(labels + extra)))]

    assert at("llm_datadist_transfers_total") == 3
    assert at("llm_datadist_transfer_bytes_total") == 3000
    assert at("llm_datadist_transfer_failures_total", ("code", "LLM_TIMEOUT")) == 1
    assert [at("llm_datadist_transfer_duration_seconds_bucket", ("le", le)) for le in ("0.001", "0.01", "+Inf")] \
        == [2, 3, 4]
    assert at("llm_datadist_transfer_duration_seconds_count") == 4
    assert at("llm_datadist_transfer_duration_seconds_sum") == 0.5
    served = (("cluster_id", "5"), ("direction", "push"), ("peer", "9"), ("transport", "tcp"))
    assert at("llm_datadist_served_transfers_total", labels=served) == 4
    assert at("llm_datadist_served_bytes_total", labels=served) == 400
    me = (("cluster_id", "5"),)
    assert at("llm_datadist_links", labels=me) == 1
    assert at("llm_datadist_links_made_total", ("how", "dialed"), labels=me) == 2
    assert at("llm_datadist_links_dropped_total", ("cause", "lost"), labels=me) == 1
    assert at("llm_datadist_link_failures_total", ("side", "dial"), ("code", "LLM_LINK_FAILED"), labels=me) == 3
    assert at("llm_datadist_transfers_in_flight", labels=me) == 2
    assert at("llm_datadist_caches", ("kind", "host"), labels=me) == 2
    assert at("llm_datadist_cache_bytes", ("kind", "host"), labels=me) == 8192
    assert at("llm_datadist_start_time_seconds", labels=me) == 990.0
    info = [k for k in got if k[0] == "llm_datadist_info"]
    assert len(info) == 1 and dict(info[0][1])["role"] == "decoder" and dict(info[0][1])["stats_enabled"] == "true"
    # every family the collector declares, and nothing else
    names = {n for n, _ in got}
    for name, (kind, _labels, _help) in metrics.METRICS.items():
        expected = {"counter": [name + "_total"], "gauge": [name],
                    "histogram": [name + "_bucket", name + "_sum", name + "_count"]}[kind]
        assert set(expected) <= names, name


def test_instances_sharing_a_cluster_id_are_summed():
    one = _samples(metrics.DataDistCollector(source=lambda: [_snapshot(5)]))
    two = _samples(metrics.DataDistCollector(source=lambda: [_snapshot(5), _snapshot(5)]))
    assert one.keys() == two.keys()  # no duplicate series, which Prometheus would refuse
    for key, value in one.items():
        if key[0] in ("llm_datadist_info", "llm_datadist_start_time_seconds"):
            assert two[key] == value
        else:
            assert two[key] == 2 * value, key


# ---- live instances, the registry helper -----------------------------------------------------------
def test_register_is_idempotent_and_reads_live_instances():
    registry = CollectorRegistry()
    collector = metrics.register(registry)
    assert metrics.register(registry) is collector
    p = _instance(21, listen=True)
    d = _instance(22, LLMRole.DECODER)
    try:
        arrays = [np.arange(8 * 1024, dtype=np.uint8).reshape(8, 1024).copy() for _ in range(2)]
        desc = CacheDesc(2, [8, 1024], DataType.DT_UINT8, Placement.HOST)
        cache = d.cache_manager.register_blocks_cache(desc, [a.ctypes.data for a in arrays], BlocksCacheKey(22, 0))
        d.cache_manager.copy_blocks(cache, {0: [5, 6], 1: [7]})
        info = LLMClusterInfo()
        info.remote_cluster_id = 21
        info.append_remote_ip_info("127.0.0.1", notifications.listen_address(p)[1])
        assert d.link_clusters([info], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        assert d.unlink_clusters([info], 5000)[0] == LLMStatusCode.LLM_SUCCESS

        def value(name, **labels):
            return registry.get_sample_value(name, labels)

        local = {"cluster_id": "22", "peer": "22", "transport": "local", "direction": "local"}
        assert value("llm_datadist_transfers_total", **local) == 1
        assert value("llm_datadist_transfer_bytes_total", **local) == 3 * 2 * 1024
        assert value("llm_datadist_transfer_duration_seconds_count", **local) == 1
        assert value("llm_datadist_links_made_total", cluster_id="22", how="dialed") == 1
        assert value("llm_datadist_links_dropped_total", cluster_id="22", cause="unlinked") == 1
        assert value("llm_datadist_links", cluster_id="22") == 0
        assert value("llm_datadist_cache_bytes", cluster_id="22", kind="host") == 2 * 8 * 1024
        assert value("llm_datadist_info", cluster_id="21", role="prompt", stats_enabled="true",
                     version=metrics._version()) == 1
    finally:
        d.finalize()
        p.finalize()
    assert value("llm_datadist_links", cluster_id="22") is None  # a finalized instance's series are gone
    assert metrics.unregister(registry) and not metrics.unregister(registry)
    assert metrics.register(registry) is not collector  # registered anew
    metrics.unregister(registry)


def test_register_defaults_to_the_global_registry():
    from prometheus_client import REGISTRY

    collector = metrics.register()
    try:
        assert metrics.register(REGISTRY) is collector
        dd = _instance(23)
        try:
            assert REGISTRY.get_sample_value("llm_datadist_links", {"cluster_id": "23"}) == 0
        finally:
            dd.finalize()
    finally:
        assert metrics.unregister()


def test_serve_until_close():
    dd = _instance(24)
    try:
        with metrics.serve(0) as server:
            host, port = server.address
            assert host == "127.0.0.1" and server.url == f"http://127.0.0.1:{port}/metrics"
            assert 'llm_datadist_links{cluster_id="24"} 0.0' in _scrape(server.url)
        _assert_port_free(port)
    finally:
        dd.finalize()


def _assert_port_free(port: int) -> None:
    with pytest.raises(urllib.error.URLError):
        _scrape(f"http://127.0.0.1:{port}/metrics")
    with socket.socket() as sock:  # nothing listens on it any more (a scrape's connection may be in TIME_WAIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


# ---- the endpoint init starts ---------------------------------------------------------------------
def test_the_first_init_starts_the_endpoint_and_the_last_finalize_stops_it(monkeypatch):
    monkeypatch.setenv(metrics.ENV_PORT, "0")
    first = _instance(31)
    second = None
    try:
        address = metrics.server_address()
        assert address is not None and address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{address[1]}/metrics"
        second = _instance(32, LLMRole.DECODER)
        assert metrics.server_address() == address  # one endpoint per process
        text = _scrape(url)
        assert 'cluster_id="31"' in text and 'cluster_id="32"' in text
        first.finalize()
        text = _scrape(url)
        assert 'cluster_id="31"' not in text and 'cluster_id="32"' in text
        assert len(_metrics_threads()) == 1
    finally:
        first.finalize()
        if second is not None:
            second.finalize()
    assert metrics.server_address() is None and not _metrics_threads()
    _assert_port_free(address[1])


def test_the_llmconfig_option_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(metrics.ENV_PORT, "not-used")
    dd = _instance(33, metrics_port=0)
    try:
        assert metrics.server_address() is not None
    finally:
        dd.finalize()
    config = LLMConfig()
    assert config.metrics_port is None and "llm.MetricsPort" not in config.generate_options()
    config.metrics_port = 9400
    assert config.generate_options()["llm.MetricsPort"] == "9400"
    with pytest.raises(LLMException):
        config.metrics_port = 65536
    with pytest.raises(TypeError):
        config.metrics_port = "9400"
    bad = LLMDataDist(LLMRole.PROMPT, 34)
    with pytest.raises(LLMException) as info:
        bad.init({"llm.EnableCacheManager": "1", "llm.MetricsPort": "http"})
    assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert "llm.MetricsPort" in str(info.value)


def test_a_port_in_use_is_one_warning_and_init_succeeds(monkeypatch, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv(metrics.ENV_PORT, str(port))
        with caplog.at_level(logging.WARNING, logger="llm_datadist.metrics"):
            dd = _instance(35)
        try:
            warnings = [r for r in caplog.records if r.name == "llm_datadist.metrics"]
            assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
            assert f"127.0.0.1:{port}" in warnings[0].getMessage()
            assert metrics.server_address() is None
            assert stats.snapshot(dd).cluster_id == 35
        finally:
            dd.finalize()


def test_a_variable_that_is_not_a_port_is_one_warning(monkeypatch, caplog):
    monkeypatch.setenv(metrics.ENV_PORT, "ninety")
    with caplog.at_level(logging.WARNING, logger="llm_datadist.metrics"):
        dd = _instance(36)
    dd.finalize()
    warnings = [r.getMessage() for r in caplog.records if r.name == "llm_datadist.metrics"]
    assert len(warnings) == 1 and metrics.ENV_PORT in warnings[0]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_import_does_not_load_prometheus_client():
    out = _python("import sys, llm_datadist, llm_datadist.metrics, llm_datadist.cli.stats\n"
                  "print('prometheus_client' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


def test_without_prometheus_client_init_warns_once_and_succeeds():
    code = ("import sys\n"
            "sys.modules['prometheus_client'] = None  # as if it were not installed\n"
            "from llm_datadist import LLMConfig, LLMDataDist, LLMRole, metrics\n"
            "o = LLMConfig(); o.enable_cache_manager = True\n"
            "a = LLMDataDist(LLMRole.PROMPT, 1); a.init(o.generate_options())\n"
            "b = LLMDataDist(LLMRole.PROMPT, 2); b.init(o.generate_options())\n"
            "print(metrics.server_address())\n"
            "try:\n    metrics.register()\nexcept ImportError as exc:\n    print('ImportError', exc)\n"
            "a.finalize(); b.finalize()\n")
    out = _python(code, **{metrics.ENV_PORT: "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "None"
    assert out.stdout.splitlines()[1].startswith("ImportError") and metrics.INSTALL_HINT in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "prometheus_client is not installed" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and metrics.INSTALL_HINT in warnings[0]


# ---- llm-datadist stats, unreachable --------------------------------------------------------------
def test_stats_says_when_the_endpoint_cannot_be_reached(capsys):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert main(["stats", f"127.0.0.1:{port}", "--once", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cannot reach http://127.0.0.1:{port}/metrics" in captured.err


def test_stats_from_the_command_line():
    with metrics.serve(0) as server:
        out = subprocess.run([sys.executable, "-m", "llm_datadist", "stats", server.url, "--once"],
                             env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "no llm_datadist instance is initialized" in out.stdout
