"""The connector's transfer statistics, as vLLM's KV connector metrics carry them (this module needs no vLLM).

Each vLLM step, every worker hands what it moved since the previous step to vLLM (``get_kv_connector_stats``);
vLLM adds the workers' parts up (``ConnectorStats.aggregate``), sends the plain ``data`` dict to its frontend,
which logs a summary every ``VLLM_LOG_STATS_INTERVAL`` seconds (``reduce``) and records Prometheus metrics in
``/metrics`` (``PromExporter``). ``vllm_stats`` wraps these in vLLM's base classes.

Directions (the ``direction`` label):

* ``pulled``:   a decode pulled a request's KV (one transfer per request and decode rank, timed: the seconds
  spent in ``pull_blocks``);
* ``received``: a prefill pushed a request's KV into this decode (counted when the prefill's PushDone arrives;
  not timed: the decode only sees when the push ends);
* ``served``:   decodes pulled from this prefill's memory: the deltas of llm_datadist's served counters
  (``llm_datadist.stats.snapshot(instance).served``, direction pull), reported by the puller each second and
  before it unlinks, so they show up with the prefill's first step after that report;
* ``pushed``:   this prefill pushed a request's KV to a decode (timed: from the end of the forward, or the
  decode's hand-off when it came later, to the last byte).

Failures carry one of ``REASONS``.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from llm_datadist.stats import LATENCY_BUCKETS_S

__all__ = ["PULLED", "RECEIVED", "SERVED", "PUSHED", "DIRECTIONS", "TIMED_DIRECTIONS", "REASONS", "METRIC_NAMES",
           "ConnectorStats", "TransferRecorder", "ServedCounter", "PromExporter", "failure_reason", "collect_step"]

PULLED, RECEIVED, SERVED, PUSHED = "pulled", "received", "served", "pushed"
DIRECTIONS: Tuple[str, ...] = (PULLED, RECEIVED, SERVED, PUSHED)
TIMED_DIRECTIONS: Tuple[str, ...] = (PULLED, PUSHED)  # the directions whose transfers have a duration
# A bounded set, so the failure counter's label values stay few.
REASONS: Tuple[str, ...] = ("claim_refused", "connection", "transfer", "invalid", "internal", "push_failed",
                            "push_timeout", "prefill_lost", "lease_expired")
# Prometheus names (a Counter's samples get the _total suffix); vLLM adds its labels model_name and engine.
METRIC_NAMES = {"transfers": "vllm:llm_datadist_kv_transfers", "bytes": "vllm:llm_datadist_kv_bytes",
                "failures": "vllm:llm_datadist_kv_failures", "seconds": "vllm:llm_datadist_kv_transfer_seconds"}
_MB = 1e6

Data = Dict[str, Any]


def _empty() -> Data:
    return {"transfers": {}, "bytes": {}, "seconds": {}, "failures": {}}


def _normalized(data: Optional[Mapping[str, Any]]) -> Data:
    """A private copy of ``data`` with every part present (a dict from another process may lack empty parts)."""
    out = _empty()
    if not data:
        return out
    for key in ("transfers", "bytes"):
        out[key] = {str(d): int(n) for d, n in (data.get(key) or {}).items()}
    out["seconds"] = {str(d): [float(s) for s in values] for d, values in (data.get("seconds") or {}).items()}
    out["failures"] = {str(d): {str(r): int(n) for r, n in reasons.items()}
                       for d, reasons in (data.get("failures") or {}).items()}
    return out


def _quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile, interpolated between the closest ranks (as numpy's default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class ConnectorStats:
    """Transfers, bytes, durations and failures by direction; ``data`` is plain (msgpack- and JSON-ready):

    ``{"transfers": {direction: n}, "bytes": {direction: n}, "seconds": {direction: [s, ...]},
    "failures": {direction: {reason: n}}}``.
    """

    data: Data

    def __init__(self, data: Optional[Mapping[str, Any]] = None) -> None:
        self.data = _normalized(data)

    # -- recording (the worker) --------------------------------------------------------------------
    def record_transfer(self, direction: str, nbytes: int, seconds: Optional[float] = None,
                        transfers: int = 1) -> None:
        """``transfers`` transfers moved ``nbytes`` in all; ``seconds``: the duration of one transfer, if known."""
        self.data["transfers"][direction] = self.data["transfers"].get(direction, 0) + transfers
        self.data["bytes"][direction] = self.data["bytes"].get(direction, 0) + nbytes
        if seconds is not None:
            self.data["seconds"].setdefault(direction, []).append(float(seconds))

    def record_failure(self, direction: str, reason: str, count: int = 1) -> None:
        reasons = self.data["failures"].setdefault(direction, {})
        reasons[reason] = reasons.get(reason, 0) + count

    # -- vLLM's KVConnectorStats interface ---------------------------------------------------------
    def reset(self) -> None:
        self.data = _empty()

    def to_dict(self) -> Data:
        return self.data

    def is_empty(self) -> bool:
        return (not any(self.data["transfers"].values()) and not any(self.data["bytes"].values())
                and not any(n for reasons in self.data["failures"].values() for n in reasons.values()))

    def aggregate(self, other: Any) -> Any:
        """Add ``other`` (another worker's or step's stats) into this one; returns self."""
        theirs = _normalized(other.data)
        mine = self.data
        for key in ("transfers", "bytes"):
            for direction, n in theirs[key].items():
                mine[key][direction] = mine[key].get(direction, 0) + n
        for direction, values in theirs["seconds"].items():
            mine["seconds"].setdefault(direction, []).extend(values)
        for direction, reasons in theirs["failures"].items():
            for reason, n in reasons.items():
                self.record_failure(direction, reason, n)
        return self

    def reduce(self) -> Dict[str, Any]:
        """The summary vLLM logs: per direction with activity, transfers, MB, and for timed directions MB/s (over
        the transfers' own durations) and mean/p99 milliseconds; then failures, in all and by direction/reason."""
        out: Dict[str, Any] = {}
        data = self.data
        for direction in DIRECTIONS:
            transfers = data["transfers"].get(direction, 0)
            nbytes = data["bytes"].get(direction, 0)
            if not transfers and not nbytes:
                continue
            out[f"{direction}_transfers"] = transfers
            out[f"{direction}_MB"] = round(nbytes / _MB, 3)
            seconds = data["seconds"].get(direction) or []
            if seconds:
                total_s = sum(seconds)
                if total_s > 0:
                    out[f"{direction}_MB_per_s"] = round(nbytes / _MB / total_s, 1)
                out[f"{direction}_mean_ms"] = round(total_s / len(seconds) * 1e3, 3)
                out[f"{direction}_p99_ms"] = round(_quantile(seconds, 0.99) * 1e3, 3)
        failures = {(d, r): n for d, reasons in sorted(data["failures"].items()) for r, n in sorted(reasons.items())
                    if n}
        out["failures"] = sum(failures.values())
        for (direction, reason), n in failures.items():
            out[f"{direction}_failed_{reason}"] = n
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConnectorStats) and self.data == other.data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.data!r})"


class TransferRecorder:
    """What one part of a worker (loader, pusher, the worker itself) recorded since the last ``take``; thread-safe
    (loads and pushes end on their own threads, ``take`` runs on the model runner's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = ConnectorStats()

    def transfer(self, direction: str, nbytes: int, seconds: Optional[float] = None, transfers: int = 1) -> None:
        with self._lock:
            self._stats.record_transfer(direction, nbytes, seconds, transfers)

    def failure(self, direction: str, reason: str, count: int = 1) -> None:
        with self._lock:
            self._stats.record_failure(direction, reason, count)

    def take(self) -> ConnectorStats:
        """Everything recorded since the last call (and forget it)."""
        with self._lock:
            stats, self._stats = self._stats, ConnectorStats()
        return stats


class ServedCounter:
    """Per-step deltas of an llm_datadist instance's served pull counters (what decodes pulled from it)."""

    def __init__(self, snapshot: Optional[Callable[[Any], Any]] = None) -> None:
        if snapshot is None:
            from llm_datadist import stats

            snapshot = stats.snapshot
        self._snapshot = snapshot
        self._transfers = 0
        self._bytes = 0

    def take(self, datadist: Any) -> Tuple[int, int]:
        """(transfers, bytes) served since the last call; (0, 0) before the instance is initialized."""
        if datadist is None:
            return 0, 0
        try:
            snap = self._snapshot(datadist)
        except (RuntimeError, TypeError):  # not initialized (yet, or any more)
            return 0, 0
        transfers = sum(s.transfers for s in snap.served if s.direction == "pull")
        nbytes = sum(s.bytes for s in snap.served if s.direction == "pull")
        delta = (transfers - self._transfers, nbytes - self._bytes)
        self._transfers, self._bytes = transfers, nbytes
        return delta


def collect_step(recorders: Iterable[TransferRecorder], served: Optional[ServedCounter] = None,
                 datadist: Any = None) -> Optional[Data]:
    """One worker's statistics since its previous step: every recorder's part and the served delta; None when
    nothing happened."""
    total = ConnectorStats()
    for recorder in recorders:
        total.aggregate(recorder.take())
    if served is not None:
        transfers, nbytes = served.take(datadist)
        if transfers or nbytes:
            total.record_transfer(SERVED, nbytes, None, transfers)
    return None if total.is_empty() else total.data


def failure_reason(exc: BaseException) -> str:
    """The ``REASONS`` entry of a load's exception."""
    from llm_datadist import LLMException

    if isinstance(exc, LLMException):
        return "transfer"
    if isinstance(exc, ConnectionError) and "refused the claim" in str(exc):  # the loader's refused-claim error
        return "claim_refused"
    if isinstance(exc, OSError):  # ConnectionError included: a link or a control message failed
        return "connection"
    if isinstance(exc, ValueError):
        return "invalid"
    return "internal"


class PromExporter:
    """The Prometheus metrics of the connector in vLLM's ``/metrics``; the metric classes come from vLLM
    (``metric_types``), and so do the labels it puts on every metric (``model_name``, ``engine``), to which
    ``direction`` (and ``reason``) are added:

    * ``vllm:llm_datadist_kv_transfers_total{direction}``: transfers;
    * ``vllm:llm_datadist_kv_bytes_total{direction}``: bytes;
    * ``vllm:llm_datadist_kv_failures_total{direction,reason}``: failed transfers and holds;
    * ``vllm:llm_datadist_kv_transfer_seconds{direction}``: a histogram of transfer durations (``pulled``,
      ``pushed``).
    """

    def __init__(self, counter_cls: Callable[..., Any], histogram_cls: Callable[..., Any], labelnames: List[str],
                 per_engine_labelvalues: Mapping[int, List[object]]) -> None:
        names = list(labelnames)
        self._labelvalues = {idx: list(values) for idx, values in per_engine_labelvalues.items()}
        self.transfers = counter_cls(name=METRIC_NAMES["transfers"], labelnames=names + ["direction"],
                                     documentation="KV transfers of the llm_datadist connector, by direction "
                                                   "(pulled, received, served, pushed).")
        self.bytes = counter_cls(name=METRIC_NAMES["bytes"], labelnames=names + ["direction"],
                                 documentation="KV bytes the llm_datadist connector moved, by direction (pulled, "
                                               "received, served, pushed).")
        self.failures = counter_cls(name=METRIC_NAMES["failures"], labelnames=names + ["direction", "reason"],
                                    documentation="Failed KV transfers (and holds whose lease expired unclaimed) of "
                                                  "the llm_datadist connector, by direction and reason.")
        self.seconds = histogram_cls(name=METRIC_NAMES["seconds"], labelnames=names + ["direction"],
                                     buckets=list(LATENCY_BUCKETS_S),
                                     documentation="Duration of each KV transfer of the llm_datadist connector "
                                                   "(pulled, pushed), in seconds.")
        for values in self._labelvalues.values():  # every series from the start, at zero
            for direction in DIRECTIONS:
                self.transfers.labels(*values, direction)
                self.bytes.labels(*values, direction)
            for direction in TIMED_DIRECTIONS:
                self.seconds.labels(*values, direction)

    def observe(self, data: Mapping[str, Any], engine_idx: int = 0) -> None:
        """Add one interval's statistics (a ``ConnectorStats.data``) to engine ``engine_idx``'s series."""
        values = self._labelvalues.get(engine_idx)
        if values is None:
            return
        stats = _normalized(data)
        for direction, n in stats["transfers"].items():
            if n:
                self.transfers.labels(*values, direction).inc(n)
        for direction, n in stats["bytes"].items():
            if n:
                self.bytes.labels(*values, direction).inc(n)
        for direction, durations in stats["seconds"].items():
            histogram = self.seconds.labels(*values, direction)
            for seconds in durations:
                histogram.observe(seconds)
        for direction, reasons in stats["failures"].items():
            for reason, n in reasons.items():
                if n:
                    self.failures.labels(*values, direction, reason).inc(n)
