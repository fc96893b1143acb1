"""``llm-datadist stats URL``: a live view of an llm_datadist /metrics endpoint (like ``top``), or one JSON dump.

The endpoint is what ``LLM_DATADIST_METRICS_PORT`` (or ``llm_datadist.metrics.serve``) opens. Each refresh scrapes
it once; rates (transfers/s, MB/s) and the p50/p99 latency come from the difference between two scrapes (the
histogram's buckets), so a refresh shows the last interval, not the average since init. ``--once`` shows the totals
since init (latency quantiles over every call) and exits; ``--json`` prints the same as JSON.

The text format is parsed with prometheus_client's parser when it is installed, else with the small parser below
(samples only; enough for what this library's endpoint writes), so the command needs nothing beyond the library.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["add_arguments", "run", "endpoint_url", "scrape", "parse_samples", "summarize"]

PREFIX = "llm_datadist_"
Sample = Tuple[str, Dict[str, str], float]
_ROUTE = ("peer", "transport", "direction")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", help="the /metrics endpoint: http://HOST:PORT/metrics, or HOST:PORT")
    parser.add_argument("--once", action="store_true", help="show the totals since init once and exit")
    parser.add_argument("--json", action="store_true",
                        help="print JSON instead of the table (with --once: one object; else one line per refresh)")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes (2)")
    parser.add_argument("--count", type=int, default=0, metavar="N",
                        help="stop after N refreshes (default: until Ctrl-C)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="HTTP timeout per scrape (5 s)")


def endpoint_url(text: str) -> str:
    """``HOST:PORT`` -> ``http://HOST:PORT/metrics``; a URL without a path gets ``/metrics``."""
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


class Unreachable(Exception):
    """The endpoint could not be scraped (connection refused, timeout, an HTTP error)."""


def scrape(url: str, timeout_s: float = 5.0) -> str:
    """The text the endpoint serves (Prometheus text format 0.0.4)."""
    request = urllib.request.Request(url, headers={"Accept": "text/plain;version=0.0.4"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(str(reason)) from None


# ---- parsing ---------------------------------------------------------------------------------------
def parse_samples(text: str, use_prometheus_client: Optional[bool] = None) -> List[Sample]:
    """Every sample of the exposition ``text``: (name, labels, value). prometheus_client's parser when it is
    installed (``use_prometheus_client`` None), else (or with False) the built-in one."""
    if use_prometheus_client is not False:
        try:
            from prometheus_client.parser import text_string_to_metric_families
        except ImportError:
            if use_prometheus_client:
                raise
        else:
            return [(s.name, dict(s.labels), float(s.value))
                    for family in text_string_to_metric_families(text) for s in family.samples]
    return _parse_text(text)


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|\})')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _parse_text(text: str) -> List[Sample]:
    """The samples of the text format (comments and blank lines skipped); ValueError on a malformed line."""
    out: List[Sample] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _NAME.match(line)
        if not match:
            raise ValueError(f"line {number}: no metric name: {line!r}")
        name, pos, labels = match.group(0), match.end(), {}
        if line[pos:pos + 1] == "{":
            pos += 1
            if line[pos:pos + 1] == "}":
                pos += 1
            while line[pos - 1] != "}":
                label = _LABEL.match(line, pos)
                if not label:
                    raise ValueError(f"line {number}: malformed labels: {line!r}")
                labels[label.group(1)] = re.sub(r'\\[\\"n]', lambda m: _ESCAPES[m.group(0)], label.group(2))
                pos = label.end()
        fields = line[pos:].split()
        if not fields:
            raise ValueError(f"line {number}: no value: {line!r}")
        out.append((name, labels, float(fields[0])))
    return out


# ---- the model: per cluster, per route -------------------------------------------------------------
def _num(value: float) -> Any:
    return int(value) if math.isfinite(value) and value == int(value) else value


def _le(text: str) -> float:
    return float("inf") if text in ("+Inf", "Inf") else float(text)


def summarize(samples: List[Sample]) -> Dict[str, Dict[str, Any]]:
    """The samples of this library's metrics, by cluster id: info, links, caches, in flight, and per route
    (peer, transport, direction) the transfers, bytes, failures and latency buckets (cumulative, by bound)."""
    clusters: Dict[str, Dict[str, Any]] = {}

    def cluster(labels: Dict[str, str]) -> Dict[str, Any]:
        cid = labels["cluster_id"]
        if cid not in clusters:
            clusters[cid] = {"cluster_id": _num(float(cid)) if cid.isdigit() else cid, "role": "", "version": "",
                             "stats_enabled": True, "start_time": None, "in_flight": 0,
                             "links": {"live": 0, "made": {}, "dropped": {}, "failed": {}},
                             "caches": {}, "transfers": {}, "served": {}}
        return clusters[cid]

    def route(table: Dict[Tuple[str, ...], Dict[str, Any]], labels: Dict[str, str], served: bool) -> Dict[str, Any]:
        key = tuple(labels.get(k, "") for k in _ROUTE)
        if key not in table:
            row: Dict[str, Any] = {"peer": _num(float(key[0])) if key[0].isdigit() else key[0],
                                   "transport": key[1], "direction": key[2], "transfers": 0, "bytes": 0}
            if not served:
                row.update(failures={}, buckets={}, sum_s=0.0, count=0)
            table[key] = row
        return table[key]

    for name, labels, value in samples:
        if not name.startswith(PREFIX) or "cluster_id" not in labels:
            continue
        c = cluster(labels)
        metric = name[len(PREFIX):]
        if metric == "info":
            c.update(role=labels.get("role", ""), version=labels.get("version", ""),
                     stats_enabled=labels.get("stats_enabled", "true") == "true")
        elif metric == "start_time_seconds":
            c["start_time"] = value
        elif metric == "transfers_in_flight":
            c["in_flight"] = _num(value)
        elif metric == "links":
            c["links"]["live"] = _num(value)
        elif metric == "links_made_total":
            c["links"]["made"][labels.get("how", "")] = _num(value)
        elif metric == "links_dropped_total":
            c["links"]["dropped"][labels.get("cause", "")] = _num(value)
        elif metric == "link_failures_total":
            c["links"]["failed"].setdefault(labels.get("side", ""), {})[labels.get("code", "")] = _num(value)
        elif metric in ("caches", "cache_bytes"):
            entry = c["caches"].setdefault(labels.get("kind", ""), {"caches": 0, "bytes": 0})
            entry["caches" if metric == "caches" else "bytes"] = _num(value)
        elif metric == "transfers_total":
            route(c["transfers"], labels, False)["transfers"] = _num(value)
        elif metric == "transfer_bytes_total":
            route(c["transfers"], labels, False)["bytes"] = _num(value)
        elif metric == "transfer_failures_total":
            route(c["transfers"], labels, False)["failures"][labels.get("code", "")] = _num(value)
        elif metric == "transfer_duration_seconds_bucket":
            route(c["transfers"], labels, False)["buckets"][_le(labels.get("le", "+Inf"))] = _num(value)
        elif metric == "transfer_duration_seconds_sum":
            route(c["transfers"], labels, False)["sum_s"] = value
        elif metric == "transfer_duration_seconds_count":
            route(c["transfers"], labels, False)["count"] = _num(value)
        elif metric == "served_transfers_total":
            route(c["served"], labels, True)["transfers"] = _num(value)
        elif metric == "served_bytes_total":
            route(c["served"], labels, True)["bytes"] = _num(value)
    return clusters


def quantile(buckets: Dict[float, float], q: float) -> Optional[float]:
    """The q-quantile (seconds) of cumulative ``le`` buckets, as Prometheus' histogram_quantile; None if empty."""
    from llm_datadist.stats import Histogram

    bounds = sorted(b for b in buckets if math.isfinite(b))
    cumulative = [buckets[b] for b in bounds] + [buckets.get(float("inf"), buckets[bounds[-1]] if bounds else 0)]
    counts = [max(0, int(round(c - p))) for c, p in zip(cumulative, [0.0] + cumulative[:-1])]
    if not bounds or not sum(counts):
        return None
    return Histogram(tuple(bounds), tuple(counts), 0.0).quantile(q)


def _delta(now: float, before: Optional[float]) -> float:
    """A counter's increase; a counter that went down was reset (the instance restarted): all of it is new."""
    if before is None:
        return now
    return now - before if now >= before else now


def _as_json(clusters: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for cid in sorted(clusters, key=lambda c: (len(c), c)):
        c = dict(clusters[cid])
        c["caches"] = [{"kind": k, **v} for k, v in sorted(c["caches"].items())]
        transfers = []
        for row in c["transfers"].values():
            row = dict(row)
            buckets = row.pop("buckets")
            row["latency"] = {"count": row.pop("count"), "sum_s": row.pop("sum_s"),
                              "p50_s": quantile(buckets, 0.5), "p99_s": quantile(buckets, 0.99),
                              "buckets": [["+Inf" if math.isinf(b) else repr(b), n]
                                          for b, n in sorted(buckets.items())]}
            transfers.append(row)
        c["transfers"] = transfers
        c["served"] = list(c["served"].values())
        out.append(c)
    return out


# ---- the table -------------------------------------------------------------------------------------
def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f}"


def _ms(seconds: Optional[float]) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1e3:.3f}"


def _frame(url: str, clusters: Dict[str, Dict[str, Any]], before: Optional[Dict[str, Dict[str, Any]]],
           elapsed_s: float) -> str:
    """One screen: per cluster a header line and one row per route; rates over ``elapsed_s`` when ``before``."""
    stamp = time.strftime("%H:%M:%S")
    window = f"last {elapsed_s:.1f} s" if before is not None else "since init"
    lines = [f"llm-datadist stats  {url}  {stamp}  (rates and latency: {window})"]
    if not clusters:
        lines.append("  no llm_datadist instance is initialized in that process")
    for cid in sorted(clusters, key=lambda c: (len(c), c)):
        c = clusters[cid]
        old = (before or {}).get(cid)
        links = c["links"]
        caches = ", ".join(f"{k} {v['caches']} ({_mb(v['bytes'])} MB)" for k, v in sorted(c["caches"].items()))
        failed_links = sum(n for codes in links["failed"].values() for n in codes.values())
        lines.append("")
        lines.append(f"cluster {cid} ({c['role'] or '?'}{'' if c['stats_enabled'] else ', counting OFF'})  "
                     f"links {links['live']} live, {sum(links['made'].values())} made, "
                     f"{sum(links['dropped'].values())} dropped, {failed_links} failed  "
                     f"in flight {c['in_flight']}  caches {caches or 'none'}")
        header = (f"  {'PEER':>10} {'TRANSPORT':<11} {'DIR':<6} {'XFER/S':>9} {'MB/S':>9} {'P50 ms':>9} "
                  f"{'P99 ms':>9} {'FAILED':>7} {'TRANSFERS':>10} {'MB':>10}")
        lines.append(header)
        for key in sorted(c["transfers"], key=lambda k: (k[2], k[0], k[1])):
            row = c["transfers"][key]
            prev = (old or {}).get("transfers", {}).get(key) if old is not None else None
            failed = sum(row["failures"].values())
            if before is None:
                rate, mbs, buckets = "-", "-", row["buckets"]
            else:
                span = max(elapsed_s, 1e-9)
                rate = f"{_delta(row['transfers'], prev and prev['transfers']) / span:.1f}"
                mbs = _mb(_delta(row["bytes"], prev and prev["bytes"]) / span)
                buckets = {b: _delta(n, (prev or {}).get("buckets", {}).get(b)) for b, n in row["buckets"].items()}
            codes = " ".join(f"{k}={v}" for k, v in sorted(row["failures"].items()))
            lines.append(f"  {str(row['peer']):>10} {row['transport']:<11} {row['direction']:<6} {rate:>9} "
                         f"{mbs:>9} {_ms(quantile(buckets, 0.5)):>9} {_ms(quantile(buckets, 0.99)):>9} "
                         f"{failed:>7} {row['transfers']:>10} {_mb(row['bytes']):>10}"
                         + (f"  {codes}" if codes else ""))
        for key in sorted(c["served"], key=lambda k: (k[2], k[0], k[1])):
            row = c["served"][key]
            prev = (old or {}).get("served", {}).get(key) if old is not None else None
            what = "served: the peer read it" if row["direction"] == "pull" else "served: the peer wrote it"
            if before is None:
                rate, mbs = "-", "-"
            else:
                span = max(elapsed_s, 1e-9)
                rate = f"{_delta(row['transfers'], prev and prev['transfers']) / span:.1f}"
                mbs = _mb(_delta(row["bytes"], prev and prev["bytes"]) / span)
            lines.append(f"  {str(row['peer']):>10} {row['transport']:<11} {row['direction']:<6} {rate:>9} {mbs:>9} "
                         f"{'':>9} {'':>9} {'':>7} {row['transfers']:>10} {_mb(row['bytes']):>10}  ({what})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The command: 0 when done (or stopped with Ctrl-C), 1 when the endpoint cannot be scraped or parsed."""
    url = endpoint_url(args.endpoint)
    previous: Optional[Dict[str, Dict[str, Any]]] = None
    previous_at = 0.0
    shown = 0
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                text = scrape(url, args.timeout)
                taken_at = time.monotonic()
                clusters = summarize(parse_samples(text))
            except Unreachable as exc:
                print(f"llm-datadist stats: cannot reach {url}: {exc}", file=sys.stderr)
                return 1
            except ValueError as exc:
                print(f"llm-datadist stats: {url} did not serve the Prometheus text format: {exc}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps({"endpoint": url, "scraped_at": time.time(), "clusters": _as_json(clusters)},
                                 indent=2 if args.once else None, sort_keys=True), flush=True)
            else:
                frame = _frame(url, clusters, previous, taken_at - previous_at)
                print(("\x1b[H\x1b[2J" if tty else "") + frame + ("" if tty else "\n"), flush=True)
            shown += 1
            if args.once or (args.count and shown >= args.count):
                return 0
            previous, previous_at = clusters, taken_at
            time.sleep(max(args.interval, 0.05))
    except KeyboardInterrupt:
        return 0
