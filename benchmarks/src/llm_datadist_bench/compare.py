"""``bench --compare A.jsonl B.jsonl``: how every ratio and latency cell of the report moved from run A to run B."""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional, Tuple

from llm_datadist_bench.common import format_size
from llm_datadist_bench.results import SAME_HOST, Results
from llm_datadist_bench.targets import call_target_rows, target_rows

__all__ = ["cells", "compare_lines", "compare_main", "load_run"]

Key = Tuple[str, str]  # (section, cell)
Value = Tuple[float, str]  # (value, unit: "x" for a ratio, "us" or "ms" for a time)
_LATENCY = (("latency_16k", "16 KiB block"), ("floor_16k", "floor 1 x 16 KiB"),
            ("latency_layers", "56 x 1 x 16 KiB"), ("floor_layers", "floor 56 x 16 KiB"))


def load_run(path: str) -> Tuple[Dict[str, Any], Results]:
    """The meta record and the indexed records of a ``results.jsonl``.

    Raises:
        OSError: the file cannot be read.
        ValueError: it holds no bench records.
    """
    meta: Dict[str, Any] = {}
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
            if rec.get("kind") == "meta" and rec.get("mechanism") == "run":
                meta = rec
            else:
                records.append(rec)
    if not any(r.get("kind") in ("bandwidth", "latency_16k") for r in records):
        raise ValueError(f"{path}: no bench measurements in it")
    return meta, Results(records)


def _bandwidth_cells(results: Results, out: Dict[Key, Value]) -> None:
    for placement, direction in results.pairs():
        section = f"{direction}, {placement}"
        for mech in results.columns(placement, direction):
            for ref in results.references(mech):
                for size in results.sizes():
                    value = results.ratio(mech, direction, placement, size, against=ref)
                    if value:
                        out[(section, f"{mech}/{results.column_label(ref)} {format_size(size)}")] = (value, "x")
        for mech, peer in [(m, "nixl") for m in SAME_HOST] + [("tcp", "mooncake")]:
            if not results.has(mech) or not results.has(peer):
                continue
            for size in results.sizes():
                value = results.ratio(mech, direction, placement, size, against=peer)
                if value:
                    out[(section, f"{mech}/{peer} {format_size(size)}")] = (value, "x")


def _latency_cells(results: Results, out: Dict[Key, Value]) -> None:
    section = "per call"
    for kind, title in _LATENCY:
        for suite, rec in results.by_suite(kind).items():
            if rec.get("samples_us"):
                out[(section, f"{suite} {title} p50")] = (float(rec["median_us"]), "us")
                out[(section, f"{suite} {title} p99")] = (float(rec["p99_us"]), "us")
    for suite, rec in results.by_suite("latency_model").items():
        if rec.get("samples_us"):
            out[(section, f"{suite} 56 x 32 x 64 KiB request p50")] = (float(rec["median_us"]) / 1e3, "ms")
        if rec.get("paired_ratio_2t"):
            out[(section, f"{suite} 56 x 32 x 64 KiB request/memcpy 2t")] = (float(rec["paired_ratio_2t"]), "x")
    for suite, rec in results.by_suite("link").items():
        if rec.get("median_ms") is not None:
            out[(section, f"{suite} link_clusters")] = (float(rec["median_ms"]), "ms")
        if rec.get("first_pull_ms") is not None:
            out[(section, f"{suite} first pull after link")] = (float(rec["first_pull_ms"]), "ms")


def cells(results: Results) -> Dict[Key, Value]:
    """Every ratio cell of the report (transfer and peer tables) and every latency cell, in report order."""
    out: Dict[Key, Value] = {}
    _bandwidth_cells(results, out)
    _latency_cells(results, out)
    return out


def _show(value: float, unit: str) -> str:
    return f"x{value:.2f}" if unit == "x" else f"{value:.1f} {unit}"


def _met(results: Results) -> Tuple[int, int]:
    statuses = [row[5] for row in target_rows(results)] + [row[4] for row in call_target_rows(results)
                                                           if row[4] != "—"]
    return sum(1 for s in statuses if s == "met"), len(statuses)


def _describe(path: str, meta: Dict[str, Any]) -> str:
    facts = [str(meta[k]) for k in ("date", "library", "mode") if meta.get(k)]
    return f"{path}" + (f" ({', '.join(facts)})" if facts else "")


def compare_lines(a_path: str, a: Results, b_path: str, b: Results, a_meta: Optional[Dict[str, Any]] = None,
                  b_meta: Optional[Dict[str, Any]] = None) -> List[str]:
    """The comparison, one line per cell measured in both runs, grouped by table.

    Ratios read ``x0.81 -> x0.93 (+15%)`` (higher is better); times read ``139.0 us -> 52.0 us (-63%)``
    (lower is better).
    """
    a_cells, b_cells = cells(a), cells(b)
    lines = [f"A: {_describe(a_path, a_meta or {})}", f"B: {_describe(b_path, b_meta or {})}"]
    common = [key for key in a_cells if key in b_cells]
    width = max((len(key[1]) + 1 for key in common), default=0)
    section = None
    for key in common:
        if key[0] != section:
            section = key[0]
            lines += ["", f"## {section}"]
        (old, unit), (new, _) = a_cells[key], b_cells[key]
        change = f"{(new / old - 1) * 100:+.0f}%" if old else "n/a"
        lines.append(f"{key[1] + ':':<{width}} {_show(old, unit)} -> {_show(new, unit)} ({change})")
    only_a, only_b = len(set(a_cells) - set(b_cells)), len(set(b_cells) - set(a_cells))
    (met_a, of_a), (met_b, of_b) = _met(a), _met(b)
    lines += ["", f"targets met: A {met_a}/{of_a}, B {met_b}/{of_b}"]
    if only_a or only_b:
        lines.append(f"not compared: {only_a} cells only in A, {only_b} only in B")
    return lines


def compare_main(a_path: str, b_path: str) -> int:
    """Print the comparison of two ``results.jsonl`` files; 0, or 2 when one cannot be read."""
    try:
        a_meta, a = load_run(a_path)
        b_meta, b = load_run(b_path)
    except (OSError, ValueError) as exc:
        print(f"llm-datadist bench --compare: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(compare_lines(a_path, a, b_path, b, a_meta, b_meta)))
    return 0
