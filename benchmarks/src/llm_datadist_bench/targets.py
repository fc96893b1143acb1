"""The project's performance targets for ``bench``: what they say, and each one checked against a run."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from llm_datadist_bench.common import format_size
from llm_datadist_bench.results import MEMCPY_2T, RAW_PVM, RAW_TCP, RAW_TCP_N, TLS, Results

__all__ = ["TARGET_STATEMENTS", "call_target_rows", "call_target_table", "status", "target_checks", "target_rows",
           "target_table"]

KIB = 1 << 10
# (first size, last size, minimum ratio); sizes outside every range have no target of this kind
CEILING_TARGETS = ((16 * KIB, 32 * KIB, 0.85), (64 * KIB, 1 << 40, 0.92))
NIXL_TARGETS = ((16 * KIB, 256 * KIB, 1.5),)
TCP_RAW_TARGET, TCP_MOONCAKE_TARGET = 1.0, 2.0
MODEL_TARGET = 0.95
SMALL_P50_US, SMALL_P99_US = 15.0, 40.0

TARGET_STATEMENTS = (
    "Same host, `auto`, pull and push: at least 0.85 of a 2-thread memcpy of the same scattered blocks at "
    "16-32 KiB blocks and at least 0.92 from 64 KiB on (both cores copying is what the machine can do; the ratio "
    "is paired pass by pass in the initiator).",
    "A model-shaped request, 56 tensors × 32 blocks × 64 KiB in one `pull_blocks` call: at least 0.95 of a 2-thread "
    "memcpy of the same blocks timed right before each call.",
    f"One 16 KiB block per `pull_blocks` call on a warm link (`auto`): p50 ≤ {SMALL_P50_US:.0f} µs and p99 ≤ "
    f"{SMALL_P99_US:.0f} µs, read next to the raw system-call floor (one `process_vm_readv` of 16 KiB from Python, "
    f"between the same two processes, in the same run).",
    "One 16 KiB block of each of 56 layers in one call: p50 and p99 reported next to the same kind of floor (56 "
    "pieces in one `process_vm_readv`); no fixed bound.",
    "`tcp`, pull and push, at every block size: at least as fast as one raw loopback socket stream moving the same "
    "blocks (≥ 1.0) and at least twice Mooncake Transfer Engine over tcp (≥ 2.0).",
    "`auto` against NIXL 1.5.1 (UCX over CMA): at least 1.5× from 16 to 256 KiB; from 512 KiB on, the memcpy "
    "targets above are the bar instead.",
)


def status(value: Optional[float], target: float, at_most: bool = False) -> str:
    """``met`` or ``NOT met (-12%)`` (how far from the target), ``n/a`` without a value."""
    if value is None:
        return "n/a"
    if (value <= target) if at_most else (value >= target):
        return "met"
    return f"NOT met ({(value / target - 1) * 100:+.0f}%)"


def _target_for(size: int, spec: Any) -> Optional[float]:
    if spec is None or isinstance(spec, float):
        return spec
    for lo, hi, minimum in spec:
        if lo <= size <= hi:
            return minimum
    return None


def target_checks(results: Results) -> List[Tuple[str, str, str, Any]]:
    """(column title, mechanism, reference, target ranges, a fixed minimum or None) of the bandwidth checks."""
    checks = [("auto / memcpy 2t", "auto", MEMCPY_2T, CEILING_TARGETS), ("auto / nixl", "auto", "nixl", NIXL_TARGETS),
              ("tcp / raw socket, 1 stream", "tcp", RAW_TCP, TCP_RAW_TARGET),
              ("tcp / mooncake", "tcp", "mooncake", TCP_MOONCAKE_TARGET)]
    if results.has(RAW_PVM):
        checks[1:1] = [("auto / raw process_vm 2t", "auto", RAW_PVM, None),
                       ("raw process_vm 2t / memcpy 2t", RAW_PVM, MEMCPY_2T, None)]
    if results.has(RAW_TCP_N):
        checks.append((f"tcp / {results.column_label(RAW_TCP_N)}", "tcp", RAW_TCP_N, None))
    if results.has(TLS):
        checks.append(("tcp+tls / tcp (the cost of TLS)", TLS, "tcp", None))
    return checks


def target_rows(results: Results, placement: str = "host/host") -> List[Tuple[str, str, str, str, str, str]]:
    """(check, size, direction, measured, target, status) for every cell with a target and both sides measured."""
    rows = []
    for direction in ("pull", "push"):
        for size in results.sizes():
            for title, mech, ref, spec in target_checks(results):
                target = _target_for(size, spec)
                value = results.ratio(mech, direction, placement, size, against=ref)
                if target is None or value is None:
                    continue
                rows.append((title, format_size(size), direction, f"×{value:.2f}", f"≥ {target}",
                             status(value, target)))
    return rows


def target_table(results: Results, direction: str, placement: str = "host/host") -> List[str]:
    """Rows = block size, columns = the checks; a cell is "×ratio status (≥ target)" or the ratio alone."""
    checks = target_checks(results)
    lines = ["| block size | " + " | ".join(t for t, _, _, _ in checks) + " |", "|---" * (len(checks) + 1) + "|"]
    for size in results.sizes():
        cells = []
        for _title, mech, ref, spec in checks:
            target = _target_for(size, spec)
            value = results.ratio(mech, direction, placement, size, against=ref)
            if value is None:
                cells.append("—")
            elif target is None:
                cells.append(f"×{value:.2f} (no target)")
            else:
                cells.append(f"×{value:.2f} {status(value, target)} (≥ {target})")
        lines.append(f"| {format_size(size)} | " + " | ".join(cells) + " |")
    return lines


def _us(rec: Optional[dict], field: str) -> Optional[float]:
    return float(rec[field]) if rec and rec.get(field) is not None else None


def call_target_rows(results: Results, suite: str = "auto") -> List[Tuple[str, str, str, str, str]]:
    """(check, measured, floor, target, status) of the per-call targets of one suite."""
    small, layers = results.by_suite("latency_16k").get(suite), results.by_suite("latency_layers").get(suite)
    floor16, floor56 = results.by_suite("floor_16k").get(suite), results.by_suite("floor_layers").get(suite)
    model = results.by_suite("latency_model").get(suite)
    rows = []
    for title, rec, floor, field, target in (("16 KiB block per call, p50", small, floor16, "median_us", SMALL_P50_US),
                                             ("16 KiB block per call, p99", small, floor16, "p99_us", SMALL_P99_US),
                                             ("56 × 1 × 16 KiB per call, p50", layers, floor56, "median_us", None),
                                             ("56 × 1 × 16 KiB per call, p99", layers, floor56, "p99_us", None)):
        value = _us(rec, field)
        if value is None:
            continue
        bound = _us(floor, field)
        rows.append((title, f"{value:.1f} µs", f"{bound:.1f} µs" if bound is not None else "—",
                     f"≤ {target:.0f} µs" if target else "no fixed bound",
                     status(value, target, at_most=True) if target else "—"))
    ratio = model.get("paired_ratio_2t") if model else None
    if ratio:
        rows.append(("56 × 32 × 64 KiB request / memcpy 2t of the same blocks", f"×{ratio:.2f}", "—",
                     f"≥ {MODEL_TARGET}", status(float(ratio), MODEL_TARGET)))
    return rows


def call_target_table(results: Results, suite: str = "auto") -> List[str]:
    rows = call_target_rows(results, suite)
    if not rows:
        return []
    lines = [f"| check ({suite}) | measured | floor, same run | target | status |", "|---|---|---|---|---|"]
    return lines + [f"| {' | '.join(row)} |" for row in rows]
