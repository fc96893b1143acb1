"""Prometheus metrics of every llm_datadist instance of this process (an extension; ``pip install
'llm-datadist[metrics]'``).

The collector reads :func:`llm_datadist.stats.snapshots` at each scrape: nothing is counted twice, and an
instance's series appear at its ``init`` and go at its ``finalize``. Every series carries the ``cluster_id`` of
its instance, so one endpoint serves every instance of the process.

Three ways to expose them::

    # 1. the environment (or LLMConfig.metrics_port): the first init of the process starts /metrics on
    #    127.0.0.1:9400, the last finalize stops it
    LLM_DATADIST_METRICS_PORT=9400 python serve.py

    # 2. an application that already runs a Prometheus registry
    from llm_datadist import metrics
    metrics.register()                        # prometheus_client.REGISTRY, or register(registry=my_registry)

    # 3. an endpoint of its own, stopped with close()
    server = metrics.serve(9400)               # addr="0.0.0.0" to serve other hosts
    ...
    server.close()

prometheus_client is imported only when one of these is used; ``import llm_datadist`` never imports it.
Every metric is described in docs/observability.md.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from llm_datadist import stats as _stats
from llm_datadist.status import LLMException, LLMStatusCode

__all__ = ["DataDistCollector", "MetricsServer", "register", "unregister", "serve", "server_address", "METRICS",
           "ENV_PORT", "ENV_ADDR", "OPTION_PORT", "DEFAULT_ADDR", "INSTALL_HINT"]

_log = logging.getLogger(__name__)

ENV_PORT = "LLM_DATADIST_METRICS_PORT"
ENV_ADDR = "LLM_DATADIST_METRICS_ADDR"
OPTION_PORT = "llm.MetricsPort"  # LLMConfig.metrics_port
DEFAULT_ADDR = "127.0.0.1"  # serving other hosts is a choice: LLM_DATADIST_METRICS_ADDR=0.0.0.0
INSTALL_HINT = "pip install 'llm-datadist[metrics]' (or: pip install prometheus_client)"
PREFIX = "llm_datadist"

_ROUTE = ("cluster_id", "peer", "transport", "direction")
#: name (as exposed, without the suffixes Prometheus adds) -> (type, labels, help). The collector exports exactly
#: these; docs/observability.md describes each.
METRICS: Dict[str, Tuple[str, Tuple[str, ...], str]] = {
    f"{PREFIX}_info": (
        "gauge", ("cluster_id", "role", "version", "stats_enabled"),
        "Always 1: one series per initialized instance (role prompt/decoder, library version, whether it counts)."),
    f"{PREFIX}_start_time_seconds": (
        "gauge", ("cluster_id",), "Unix time the instance was initialized (its counters start at 0 then)."),
    f"{PREFIX}_transfers_in_flight": (
        "gauge", ("cluster_id",), "Pulls, pushes and local copies running now."),
    f"{PREFIX}_transfers": (
        "counter", _ROUTE, "Pulls, pushes (and local copies) this instance made that succeeded."),
    f"{PREFIX}_transfer_bytes": (
        "counter", _ROUTE, "Bytes those calls moved (exact; a failed call's completed ranges included)."),
    f"{PREFIX}_transfer_failures": (
        "counter", _ROUTE + ("code",), "Calls that failed, by status code name."),
    f"{PREFIX}_transfer_duration_seconds": (
        "histogram", _ROUTE, "Duration of every call, succeeded or failed, from entry to return."),
    f"{PREFIX}_served_transfers": (
        "counter", _ROUTE, "Transfers peers made into (push) or out of (pull) this instance's memory, as the "
                           "peers report them."),
    f"{PREFIX}_served_bytes": (
        "counter", _ROUTE, "Bytes peers moved into (push) or out of (pull) this instance's memory."),
    f"{PREFIX}_links": (
        "gauge", ("cluster_id",), "Live links now."),
    f"{PREFIX}_links_made": (
        "counter", ("cluster_id", "how"), "Links made: dialed (link_clusters from here), accepted, comm (rank table)."),
    f"{PREFIX}_links_dropped": (
        "counter", ("cluster_id", "cause"), "Links dropped, by cause (unlinked, peer_unlinked, lost, ...)."),
    f"{PREFIX}_link_failures": (
        "counter", ("cluster_id", "side", "code"), "Failed link attempts by side (dial, accept) and status code."),
    f"{PREFIX}_caches": (
        "gauge", ("cluster_id", "kind"), "Registered and allocated caches, by memory kind (host, cuda)."),
    f"{PREFIX}_cache_bytes": (
        "gauge", ("cluster_id", "kind"), "Bytes of those caches, by memory kind."),
}


def _prometheus() -> Any:
    """prometheus_client, or ImportError saying how to install it."""
    try:
        import prometheus_client
        import prometheus_client.core
        import prometheus_client.exposition
        import prometheus_client.registry
        import prometheus_client.utils  # noqa: F401 - the submodules the collector and the endpoint use
    except ImportError as exc:
        raise ImportError(f"llm_datadist.metrics needs prometheus_client: {INSTALL_HINT}") from exc
    return prometheus_client


_VERSION: List[str] = []


def _version() -> str:
    if not _VERSION:
        try:
            from importlib.metadata import version

            _VERSION.append(version("llm-datadist"))
        except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout on PYTHONPATH)
            _VERSION.append("unknown")
    return _VERSION[0]


# ---- the collector ---------------------------------------------------------------------------------
class _Values:
    """The samples of one family, keyed by their label values; instances sharing a cluster id are summed."""

    def __init__(self, combine: Callable[[float, float], float] = lambda a, b: a + b) -> None:
        self.rows: Dict[Tuple[str, ...], float] = {}
        self._combine = combine

    def add(self, labels: Tuple[str, ...], value: float) -> None:
        old = self.rows.get(labels)
        self.rows[labels] = value if old is None else self._combine(old, value)


class _Histograms:
    def __init__(self) -> None:
        self.rows: Dict[Tuple[str, ...], Tuple[Tuple[float, ...], List[int], float]] = {}

    def add(self, labels: Tuple[str, ...], hist: _stats.Histogram) -> None:
        old = self.rows.get(labels)
        if old is None or old[0] != hist.bounds:
            self.rows[labels] = (hist.bounds, list(hist.counts), hist.sum_s)
        else:
            self.rows[labels] = (old[0], [a + b for a, b in zip(old[1], hist.counts)], old[2] + hist.sum_s)


def _gather(snapshots: Iterable[_stats.StatsSnapshot]) -> Dict[str, Any]:
    """The values of every family from the snapshots."""
    values: Dict[str, Any] = {name: (_Histograms() if kind == "histogram" else _Values())
                              for name, (kind, _labels, _help) in METRICS.items()}
    values[f"{PREFIX}_info"] = _Values(lambda a, b: 1.0)
    values[f"{PREFIX}_start_time_seconds"] = _Values(min)
    version = _version()
    for snap in snapshots:
        cid = str(snap.cluster_id)
        values[f"{PREFIX}_info"].add((cid, snap.role, version, "true" if snap.enabled else "false"), 1.0)
        values[f"{PREFIX}_start_time_seconds"].add((cid,), snap.taken_at - snap.uptime_s)
        values[f"{PREFIX}_transfers_in_flight"].add((cid,), snap.in_flight)
        for t in snap.transfers:
            route = (cid, str(t.peer), t.transport, t.direction)
            values[f"{PREFIX}_transfers"].add(route, t.transfers)
            values[f"{PREFIX}_transfer_bytes"].add(route, t.bytes)
            for code, n in sorted(t.failures.items()):
                values[f"{PREFIX}_transfer_failures"].add(route + (code,), n)
            values[f"{PREFIX}_transfer_duration_seconds"].add(route, t.latency)
        for s in snap.served:
            route = (cid, str(s.peer), s.transport, s.direction)
            values[f"{PREFIX}_served_transfers"].add(route, s.transfers)
            values[f"{PREFIX}_served_bytes"].add(route, s.bytes)
        links = snap.links
        values[f"{PREFIX}_links"].add((cid,), links.live)
        for how, n in sorted(links.made.items()):
            values[f"{PREFIX}_links_made"].add((cid, how), n)
        for cause, n in sorted(links.dropped.items()):
            values[f"{PREFIX}_links_dropped"].add((cid, cause), n)
        for side, codes in sorted(links.failed.items()):
            for code, n in sorted(codes.items()):
                values[f"{PREFIX}_link_failures"].add((cid, side, code), n)
        for cache in snap.caches:
            values[f"{PREFIX}_caches"].add((cid, cache.kind), cache.caches)
            values[f"{PREFIX}_cache_bytes"].add((cid, cache.kind), cache.bytes)
    return values


class DataDistCollector:
    """A Prometheus collector (``prometheus_client.registry.Collector``) of every initialized instance of this
    process, read from :func:`llm_datadist.stats.snapshots` at each ``collect()``.

    ``source`` replaces where the snapshots come from (for tests and custom selections of instances).
    """

    def __init__(self, source: Optional[Callable[[], Sequence[_stats.StatsSnapshot]]] = None) -> None:
        _register_collector_abc()
        self._source = source or _stats.snapshots

    def describe(self) -> List[Any]:
        """The families without samples (what a registry checks for name clashes)."""
        return list(self._families([]))

    def collect(self) -> Iterator[Any]:
        """The families with a sample per (instance, label values), as of now."""
        return self._families(self._source())

    @staticmethod
    def _families(snapshots: Iterable[_stats.StatsSnapshot]) -> Iterator[Any]:
        core = _prometheus().core
        from prometheus_client.utils import floatToGoString

        values = _gather(snapshots)
        for name, (kind, labels, doc) in METRICS.items():
            family: Any
            if kind == "histogram":
                family = core.HistogramMetricFamily(name, doc, labels=labels)
                for key, (bounds, counts, sum_s) in values[name].rows.items():
                    run, buckets = 0, []
                    for bound, count in zip(list(bounds) + [float("inf")], counts):
                        run += count
                        buckets.append((floatToGoString(bound), run))
                    family.add_metric(list(key), buckets, sum_s)
            else:
                cls = core.CounterMetricFamily if kind == "counter" else core.GaugeMetricFamily
                family = cls(name, doc, labels=labels)
                for key, value in values[name].rows.items():
                    family.add_metric(list(key), value)
            yield family


_ABC_DONE: List[bool] = []


def _register_collector_abc() -> None:
    """Make DataDistCollector a virtual subclass of prometheus_client's Collector, without importing
    prometheus_client at import time (where it has the Collector base class)."""
    if _ABC_DONE:
        return
    registry = _prometheus().registry
    base = getattr(registry, "Collector", None)
    if base is not None and hasattr(base, "register"):
        base.register(DataDistCollector)
    _ABC_DONE.append(True)


_registered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_registered_lock = threading.Lock()


def register(registry: Any = None) -> DataDistCollector:
    """Add the collector to ``registry`` (default ``prometheus_client.REGISTRY``) and return it; idempotent: a
    registry that already has it keeps it and gets the same collector back.

    Raises:
        ImportError: prometheus_client is not installed (the message says how to install it).
    """
    prom = _prometheus()
    registry = prom.REGISTRY if registry is None else registry
    with _registered_lock:
        collector = _registered.get(registry)
        if collector is None:
            collector = DataDistCollector()
            registry.register(collector)
            _registered[registry] = collector
        return collector


def unregister(registry: Any = None) -> bool:
    """Take the collector off ``registry`` (default ``prometheus_client.REGISTRY``); whether it was there."""
    prom = _prometheus()
    registry = prom.REGISTRY if registry is None else registry
    with _registered_lock:
        collector = _registered.pop(registry, None)
    if collector is None:
        return False
    registry.unregister(collector)
    return True


# ---- an endpoint ----------------------------------------------------------------------------------
def _server_class(ipv6: bool) -> Any:
    """A threading HTTP server class (http.server is imported here: it is not needed at ``import llm_datadist``)."""
    from http.server import ThreadingHTTPServer

    class _HTTPServer(ThreadingHTTPServer):
        daemon_threads = True  # a scrape in progress never holds up close()
        address_family = socket.AF_INET6 if ipv6 else socket.AF_INET

    return _HTTPServer


class MetricsServer:
    """An HTTP endpoint serving ``/metrics`` from a daemon thread (``llm-dd-metrics``) until :meth:`close`."""

    def __init__(self, httpd: Any) -> None:
        self._httpd = httpd
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"llm-dd-metrics-{self.address[1]}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) the endpoint listens on: the bound port when port 0 was asked for."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetricsServer({self.url}{', closed' if self._closed else ''})"


def serve(port: int, addr: str = DEFAULT_ADDR, registry: Any = None) -> MetricsServer:
    """Serve ``registry`` (default: a registry of its own holding only this library's collector) on
    ``http://addr:port/metrics`` until the returned server's ``close()``. ``port`` 0 takes a free port
    (``MetricsServer.address`` says which); ``addr`` ``"0.0.0.0"`` (or ``"::"``) serves other hosts too.

    Raises:
        ImportError: prometheus_client is not installed.
        OSError: the address cannot be bound (e.g. the port is in use).
    """
    prom = _prometheus()
    if registry is None:
        registry = prom.CollectorRegistry(auto_describe=True)
        register(registry)
    handler = prom.exposition.MetricsHandler.factory(registry)
    return MetricsServer(_server_class(":" in addr)((addr, int(port)), handler))


# ---- the endpoint the instances start (LLM_DATADIST_METRICS_PORT / LLMConfig.metrics_port) ---------------
_auto_lock = threading.Lock()
_auto: List[MetricsServer] = []  # the running one, if any
_auto_users = [0]  # initialized instances of this process (the last finalize stops the endpoint)
_missing_warned: List[bool] = []


def server_address() -> Optional[Tuple[str, int]]:
    """(host, port) of the endpoint the instances started (``LLM_DATADIST_METRICS_PORT`` or
    ``LLMConfig.metrics_port``), or None while none runs."""
    with _auto_lock:
        return _auto[0].address if _auto else None


def _parse_port(text: str) -> Optional[int]:
    text = text.strip()
    if not text.isdigit() or int(text) > 65535:
        return None
    return int(text)


def requested_port(options: Mapping[str, str]) -> Optional[int]:
    """The port an instance's init asks the endpoint for: ``llm.MetricsPort`` of its options, else
    ``LLM_DATADIST_METRICS_PORT``; None when neither is set (or the variable is not a port: one WARNING).

    Raises:
        LLMException(LLM_PARAM_INVALID): ``llm.MetricsPort`` is set but is not a port number.
    """
    value = options.get(OPTION_PORT)
    if value is not None:
        port = _parse_port(value) if isinstance(value, str) else None
        if port is None:
            raise LLMException(f"{OPTION_PORT} must be a port number in [0, 65535], but got {value!r}",
                               status_code=LLMStatusCode.LLM_PARAM_INVALID)
        return port
    text = os.environ.get(ENV_PORT, "")
    if not text.strip():
        return None
    port = _parse_port(text)
    if port is None:
        _log.warning("%s=%r is not a port number in [0, 65535]: no metrics endpoint is started", ENV_PORT, text)
    return port


def instance_up(port: Optional[int]) -> None:
    """An instance was initialized: count it, and start the endpoint on ``port`` if one is asked for and none
    runs. Never raises: a missing prometheus_client or an address that cannot be bound is one WARNING."""
    with _auto_lock:
        _auto_users[0] += 1
        if port is None:
            return
        if _auto:
            running = _auto[0].address
            if running[1] != port and port != 0:
                _log.warning("the metrics endpoint already serves http://%s:%d/metrics; port %d asked for by "
                             "another instance is not opened", running[0], running[1], port)
            return
        addr = os.environ.get(ENV_ADDR, "").strip() or DEFAULT_ADDR
        try:
            server = serve(port, addr)
        except ImportError:
            if not _missing_warned:
                _missing_warned.append(True)
                _log.warning("a metrics endpoint is asked for (%s or LLMConfig.metrics_port), but prometheus_client "
                             "is not installed: %s; no endpoint is started", ENV_PORT, INSTALL_HINT)
            return
        except Exception as exc:  # noqa: BLE001 - the port in use, an address that is not this host's, ...
            _log.warning("the metrics endpoint could not listen on %s:%d (%s); no endpoint is started",
                         addr, port, exc)
            return
        _auto.append(server)
    _log.info("metrics of every llm_datadist instance of this process: %s", server.url)


def instance_down() -> None:
    """An instance was finalized: the last one stops the endpoint (its port is free when this returns)."""
    with _auto_lock:
        _auto_users[0] = max(0, _auto_users[0] - 1)
        if _auto_users[0] or not _auto:
            return
        _auto.pop().close()  # under the lock: an init racing this finalize finds the port free
