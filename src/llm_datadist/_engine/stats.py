"""Always-on statistics of one engine: exact transfer and byte counters, latency histograms, link events.

Counting happens where the facts are: ``Engine.transfer`` / ``Engine.copy`` / a layer-wise task open one
:class:`Call` per public call and close it with its status; ``transfers.send`` tells the call which route moved
how many bytes (through :func:`moved`, a per-thread slot, so the transfer path keeps its signatures) and tells the
link, which batches what it moved for its peer (the peer's *served* counters, see :class:`Usage`). Links report
made/dropped/failed here. Nothing blocks: one lock, a few dict updates per call.

A snapshot (:meth:`Stats.snapshot`) is plain frozen data, public as ``llm_datadist.stats``.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import threading
import time
from time import perf_counter
from typing import Any, Deque, Dict, Iterator, List, Mapping, Optional, Tuple

from llm_datadist.status import LLMStatusCode

__all__ = ["LATENCY_BUCKETS_S", "Histogram", "TransferStats", "ServedStats", "LinkStats", "CacheStats",
           "StatsSnapshot", "Stats", "Call", "Usage", "moved", "PULL", "PUSH", "LOCAL", "NO_ROUTE"]

PULL, PUSH, LOCAL = "pull", "push", "local"
DIRECTIONS = (PULL, PUSH, LOCAL)
NO_ROUTE = "none"  # the transport label of calls that failed before a route moved anything
LOCAL_ROUTE = "local"  # the transport label of local copies (the memory backend's copy)
# Upper bounds in seconds: a warm one-block pull takes tens of microseconds, a model's prompt over tcp seconds.
LATENCY_BUCKETS_S: Tuple[float, ...] = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                                        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_USAGE_ENTRIES = 64  # a peer's usage report lists at most this many (direction, transport) rows


# ---- the snapshot: plain frozen data -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Histogram:
    """A latency distribution: ``counts[i]`` observations fell in (bounds[i-1], bounds[i]] seconds; the last
    count, beyond the last bound, is the +Inf bucket (``len(counts) == len(bounds) + 1``)."""

    bounds: Tuple[float, ...]
    counts: Tuple[int, ...]
    sum_s: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> Tuple[int, ...]:
        """Observations at or below each bound, then the total (the Prometheus ``le`` buckets)."""
        out, run = [], 0
        for c in self.counts:
            run += c
            out.append(run)
        return tuple(out)

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1), interpolated inside its bucket as Prometheus' histogram_quantile does; NaN
        without observations, the last bound when it falls in the +Inf bucket."""
        total = self.count
        if total == 0:
            return float("nan")
        rank = min(max(q, 0.0), 1.0) * total
        run = 0
        for i, c in enumerate(self.counts):
            if c and run + c >= rank:
                if i == len(self.bounds):
                    return self.bounds[-1]
                lo = self.bounds[i - 1] if i else 0.0
                return lo + (self.bounds[i] - lo) * (rank - run) / c
            run += c
        return self.bounds[-1]

    def merged(self, other: Histogram) -> Histogram:
        return Histogram(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts)),
                         self.sum_s + other.sum_s)


def empty_histogram() -> Histogram:
    return Histogram(LATENCY_BUCKETS_S, (0,) * (len(LATENCY_BUCKETS_S) + 1), 0.0)


@dataclasses.dataclass(frozen=True)
class TransferStats:
    """The calls of one (peer, transport, direction): pulls and pushes this instance made, or its local copies.

    ``peer`` is the peer's cluster id (this instance's own for local copies); ``transport`` the route that moved
    the bytes (``process_vm``, ``shm``, ``tcp``, ``nixl``, ``loopback``; ``local`` for local copies; ``none`` for
    calls that failed before a route moved anything). ``transfers`` counts calls that succeeded, ``bytes`` the
    bytes they moved (exact: the sum of every range a route completed), ``failures`` failed calls by status code
    name, ``latency`` every call (success or failure) from entry to return, in seconds.
    """

    peer: int
    transport: str
    direction: str
    transfers: int
    bytes: int
    failures: Mapping[str, int]
    latency: Histogram


@dataclasses.dataclass(frozen=True)
class ServedStats:
    """What a peer moved in or out of this instance's memory: ``direction`` ``pull`` = the peer read from us,
    ``push`` = the peer wrote into us. One-sided routes never pass through the owner, so the peer that moved the
    bytes reports them over the link (each second, and before it unlinks); a peer that dies loses at most its
    last second of reports."""

    peer: int
    transport: str
    direction: str
    transfers: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class LinkStats:
    """Links: ``live`` now; ``made`` by how (``dialed``: link_clusters from here, ``accepted``: a peer dialled us,
    ``comm``: rank-table domains); ``dropped`` by cause (``unlinked``, ``peer_unlinked``, ``lost``, ``replaced``,
    ``finalized``, ...); ``failed`` attempts by side (``dial``, ``accept``) and status code name."""

    live: int
    made: Mapping[str, int]
    dropped: Mapping[str, int]
    failed: Mapping[str, Mapping[str, int]]


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """Registered and allocated caches of one memory kind (``host``, ``cuda``) and their bytes."""

    kind: str
    caches: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class StatsSnapshot:
    """Everything one instance counted since ``init``, taken at ``taken_at`` (Unix seconds)."""

    cluster_id: int
    role: str
    enabled: bool
    taken_at: float
    uptime_s: float
    in_flight: int
    transfers: Tuple[TransferStats, ...]
    served: Tuple[ServedStats, ...]
    links: LinkStats
    caches: Tuple[CacheStats, ...]

    def bytes_total(self, direction: str) -> int:
        """Bytes this instance moved in one direction (``pull``, ``push``, ``local``), over every peer and route."""
        return sum(t.bytes for t in self.transfers if t.direction == direction)

    def served_bytes_total(self, direction: str) -> int:
        """Bytes peers moved out of (``pull``) or into (``push``) this instance's memory."""
        return sum(s.bytes for s in self.served if s.direction == direction)

    def transfers_total(self, direction: str) -> int:
        return sum(t.transfers for t in self.transfers if t.direction == direction)

    def failures_total(self) -> Dict[str, int]:
        """Failed calls by status code name, over every peer, route and direction."""
        out: Dict[str, int] = {}
        for t in self.transfers:
            for code, n in t.failures.items():
                out[code] = out.get(code, 0) + n
        return out

    def latency(self, direction: Optional[str] = None) -> Histogram:
        """The latency of every call (of one direction), merged over peers and routes."""
        hist = empty_histogram()
        for t in self.transfers:
            if direction is None or t.direction == direction:
                hist = hist.merged(t.latency)
        return hist

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready plain data: dicts, lists, str, int, float (histograms with bounds, per-bucket counts, sum)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- counting ----------------------------------------------------------------------------------------
# The hot path (one call: begin, moved, end) only appends to deques (atomic under the GIL, no lock) and reads the
# clock twice; the records are folded into the counters under the lock by the caller that finds FOLD_AT of them
# waiting (a few µs once per FOLD_AT calls: p99 unchanged, memory bounded to a few KiB per instance), by the
# engine's reporter thread each second, and when a snapshot or a report is taken.
FOLD_AT = 256


class _Row:
    __slots__ = ("transfers", "bytes", "failures", "buckets", "sum_s")

    def __init__(self) -> None:
        self.transfers = 0
        self.bytes = 0
        self.failures: Dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum_s = 0.0


# A call being counted is a list [peer, direction, transport, nbytes, t0] (a list: the cheapest mutable record).
Call = list
_PEER, _DIRECTION, _TRANSPORT, _NBYTES, _T0 = range(5)
_current = threading.local()  # the call the running thread counts for (transfers.send reports into it)


def _drained(pending: Deque[Any]) -> Iterator[Any]:
    """The records of ``pending``, oldest first, taken out one by one (appends meanwhile are taken too)."""
    while True:
        try:
            yield pending.popleft()
        except IndexError:
            return


def moved(transport: str, nbytes: int) -> None:
    """A route completed ``nbytes`` for the call this thread is counting (if any)."""
    call = getattr(_current, "call", None)
    if call is not None:
        call[_TRANSPORT] = transport
        call[_NBYTES] += nbytes


def set_current(call: Optional[Call]) -> Optional[Call]:
    """Make ``call`` the one this thread counts for; returns the previous one (restore it after)."""
    prev = getattr(_current, "call", None)
    _current.call = call
    return prev


class Usage:
    """What one link moved for its peer since the last report: (direction, transport) -> [transfers, bytes]."""

    __slots__ = ("_rows", "_lock", "_enabled", "_pending")

    def __init__(self, enabled: bool = True) -> None:
        self._rows: Dict[Tuple[str, str], List[int]] = {}
        self._lock = threading.Lock()
        self._enabled = enabled
        self._pending: Deque[Tuple[str, str, int]] = collections.deque()

    def add(self, direction: str, transport: str, nbytes: int) -> None:
        if self._enabled:
            self._pending.append((direction, transport, nbytes))
            if len(self._pending) > FOLD_AT:
                with self._lock:
                    self._fold()

    def _fold(self) -> None:
        rows = self._rows
        for direction, transport, nbytes in _drained(self._pending):
            row = rows.get((direction, transport))
            if row is None:
                rows[(direction, transport)] = [1, nbytes]
            else:
                row[0] += 1
                row[1] += nbytes

    def take(self) -> List[Tuple[str, str, int, int]]:
        """The rows since the last take (and forget them)."""
        with self._lock:
            self._fold()
            rows, self._rows = self._rows, {}
        return [(d, t, n, b) for (d, t), (n, b) in rows.items()]

    def give_back(self, rows: List[Tuple[str, str, int, int]]) -> None:
        """Rows whose report could not be sent: counted again in the next one."""
        with self._lock:
            for d, t, n, b in rows:
                row = self._rows.setdefault((d, t), [0, 0])
                row[0] += n
                row[1] += b


class Stats:
    """The counters of one engine. ``enabled=False`` (``LLM_DATADIST_STATS=0``) counts nothing: for measuring
    what counting costs."""

    def __init__(self, cluster_id: int, enabled: bool = True) -> None:
        self.cluster_id = cluster_id
        self.enabled = enabled
        self._lock = threading.Lock()
        self._rows: Dict[Tuple[int, str, str], _Row] = {}
        self._served: Dict[Tuple[int, str, str], List[int]] = {}
        self._begun = itertools.count()  # calls begun (next() is atomic: no lock on the hot path)
        self._reads = 0  # values of _begun consumed by reading it
        self._ended = 0  # calls folded (ended or abandoned)
        self._pending: Deque[Tuple[int, str, str, int, float, Optional[str]]] = collections.deque()
        self._made: Dict[str, int] = {}
        self._dropped: Dict[str, int] = {}
        self._failed: Dict[str, Dict[str, int]] = {}
        self._started = time.monotonic()

    # -- calls ----------------------------------------------------------------------------------------
    def begin(self, peer: int, direction: str) -> Optional[Call]:
        if not self.enabled:
            return None
        next(self._begun)
        return [peer, direction, NO_ROUTE, 0, perf_counter()]

    def end(self, call: Optional[Call], failure: Optional[LLMStatusCode] = None) -> None:
        """Close a call: a success adds its transfer and bytes, a failure its status code; both their latency."""
        if call is None:
            return
        self._pending.append((call[_PEER], call[_TRANSPORT], call[_DIRECTION], call[_NBYTES],
                              perf_counter() - call[_T0], None if failure is None else LLMStatusCode(failure).name))
        if len(self._pending) > FOLD_AT:
            with self._lock:
                self._fold()

    def abandon(self, call: Optional[Call]) -> None:
        """A call that ends without a status (a task cancelled at finalize): no longer in flight, not counted."""
        if call is not None:
            self._pending.append((call[_PEER], call[_TRANSPORT], call[_DIRECTION], 0, -1.0, None))

    def fold(self) -> None:
        """Fold the waiting call records into the counters (the reporter thread, each second)."""
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        """Fold the waiting call records into the rows (under the lock)."""
        rows = self._rows
        for peer, transport, direction, nbytes, elapsed, failure in _drained(self._pending):
            self._ended += 1
            if elapsed < 0:  # abandoned
                continue
            key = (peer, transport, direction)
            row = rows.get(key)
            if row is None:
                row = rows[key] = _Row()
            if failure is None:
                row.transfers += 1
            else:
                row.failures[failure] = row.failures.get(failure, 0) + 1
            row.bytes += nbytes  # a failed call's completed ranges did move (a partial multi-plan call)
            row.buckets[bisect.bisect_left(LATENCY_BUCKETS_S, elapsed)] += 1
            row.sum_s += elapsed

    # -- served (reported by peers) ---------------------------------------------------------------
    def served(self, peer: int, rows: List[Tuple[str, str, int, int]]) -> None:
        if not self.enabled:
            return
        with self._lock:
            for direction, transport, transfers, nbytes in rows:
                row = self._served.setdefault((peer, transport, direction), [0, 0])
                row[0] += transfers
                row[1] += nbytes

    # -- links ----------------------------------------------------------------------------------------
    def link_made(self, how: str) -> None:
        with self._lock:
            self._made[how] = self._made.get(how, 0) + 1

    def link_dropped(self, cause: str) -> None:
        with self._lock:
            self._dropped[cause] = self._dropped.get(cause, 0) + 1

    def link_failed(self, side: str, code: LLMStatusCode) -> None:
        name = LLMStatusCode(code).name
        with self._lock:
            by_code = self._failed.setdefault(side, {})
            by_code[name] = by_code.get(name, 0) + 1

    # -- the snapshot -------------------------------------------------------------------------------
    def snapshot(self, role: str, live_links: int, caches: Tuple[CacheStats, ...]) -> StatsSnapshot:
        with self._lock:
            self._fold()
            begun = next(self._begun) - self._reads
            self._reads += 1
            transfers = tuple(
                TransferStats(peer=peer, transport=transport, direction=direction, transfers=row.transfers,
                              bytes=row.bytes, failures=dict(row.failures),
                              latency=Histogram(LATENCY_BUCKETS_S, tuple(row.buckets), row.sum_s))
                for (peer, transport, direction), row in sorted(self._rows.items()))
            served = tuple(ServedStats(peer=peer, transport=transport, direction=direction, transfers=n, bytes=b)
                           for (peer, transport, direction), (n, b) in sorted(self._served.items()))
            links = LinkStats(live=live_links, made=dict(self._made), dropped=dict(self._dropped),
                              failed={side: dict(codes) for side, codes in self._failed.items()})
            in_flight = max(0, begun - self._ended - len(self._pending))
        return StatsSnapshot(cluster_id=self.cluster_id, role=role, enabled=self.enabled, taken_at=time.time(),
                             uptime_s=time.monotonic() - self._started, in_flight=in_flight, transfers=transfers,
                             served=served, links=links, caches=caches)


def valid_usage(rows: Any) -> List[Tuple[str, str, int, int]]:
    """A peer's usage report, checked: known directions, short transport names, non-negative counts."""
    out = []
    for row in list(rows)[:MAX_USAGE_ENTRIES]:
        direction, transport, transfers, nbytes = row
        if direction not in (PULL, PUSH) or not (0 < len(transport) <= 32) or not transport.isidentifier():
            continue
        if transfers < 0 or nbytes < 0:
            continue
        out.append((direction, transport, int(transfers), int(nbytes)))
    return out
