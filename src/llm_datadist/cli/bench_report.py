"""``bench`` output: markdown tables in the official shape (GB/s (min-max) ×ratio), the targets check, JSON lines."""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from llm_datadist.cli.bench_common import format_size

__all__ = ["Results", "markdown", "write_jsonl", "COLUMN_ORDER", "label"]

SAME_HOST = ("process_vm", "shm", "auto")
COLUMN_ORDER = ("memcpy.c_1t", "memcpy.np_1t", "memcpy.c_2t", "process_vm", "shm", "auto", "nixl", "raw_tcp", "tcp",
                "mooncake")
_LABELS = {"memcpy.c_1t": "memcpy 1t", "memcpy.np_1t": "memcpy 1t (numpy)", "memcpy.c_2t": "memcpy 2t",
           "raw_tcp": "raw tcp socket"}
# (first size, last size, minimum ratio) per target; None sizes have no target of their own.
SAME_HOST_TARGETS = ((16 << 10, 16 << 10, 0.75), (64 << 10, 2 << 20, 0.85))
NIXL_TARGETS = ((16 << 10, 64 << 10, 1.5), (256 << 10, 1 << 40, 1.0))


def label(mechanism: str) -> str:
    return _LABELS.get(mechanism, mechanism)


class Results:
    """Index of the records of one run: bandwidth by (mechanism, direction, placement, size)."""

    def __init__(self, records: Sequence[Dict[str, Any]]) -> None:
        self.records = list(records)
        self.bw: Dict[Tuple[str, str, str, int], Dict[str, Any]] = {}
        for rec in self.records:
            if rec.get("kind") == "bandwidth":
                key = (rec["mechanism"], rec.get("direction", "copy"), rec.get("placement", "host/host"),
                       int(rec["block_bytes"]))
                self.bw[key] = rec

    def of_kind(self, kind: str) -> List[Dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def get(self, mechanism: str, direction: str, placement: str, size: int) -> Optional[Dict[str, Any]]:
        rec = self.bw.get((mechanism, direction, placement, size))
        if rec is None and mechanism.startswith(("memcpy", "raw_tcp")):  # references serve both directions
            for other in ("copy", "pull", "push"):
                rec = rec or self.bw.get((mechanism, other, "host/host", size))
        return rec

    def median(self, mechanism: str, direction: str, placement: str, size: int) -> Optional[float]:
        rec = self.get(mechanism, direction, placement, size)
        return float(rec["median_gbps"]) if rec else None

    def ceiling_name(self) -> str:
        return "memcpy.c_1t" if any(k[0] == "memcpy.c_1t" for k in self.bw) else "memcpy.np_1t"

    def reference(self, mechanism: str) -> Optional[str]:
        """The reference a mechanism's ratio is taken against."""
        if mechanism == "nixl" and not any(k[0].startswith("memcpy") for k in self.bw):
            return "raw_tcp"  # across simulated hosts: the library's nixl transport, against the socket
        if mechanism in SAME_HOST or mechanism == "nixl":
            return self.ceiling_name()
        if mechanism in ("tcp", "mooncake"):
            return "raw_tcp"
        return None

    def ratio(self, mechanism: str, direction: str, placement: str, size: int,
              against: Optional[str] = None) -> Optional[float]:
        ref = against or self.reference(mechanism)
        rec = self.get(mechanism, direction, placement, size)
        if rec is not None and ref == self.ceiling_name() and rec.get("paired_ratio"):
            return float(rec["paired_ratio"])  # memcpy measured pass by pass next to it: robust to drift
        if rec is not None and ref == "memcpy.c_2t" and rec.get("paired_ratio_2t"):
            return float(rec["paired_ratio_2t"])
        mine = self.median(mechanism, direction, placement, size)
        theirs = self.median(ref, direction, placement, size) if ref else None
        if mine is None or not theirs:
            return None
        return mine / theirs

    def sizes(self) -> List[int]:
        return sorted({k[3] for k in self.bw})

    def pairs(self) -> List[Tuple[str, str]]:
        """(placement, direction) of the transfer tables, pull first."""
        found = {(k[2], k[1]) for k in self.bw if k[1] in ("pull", "push")}
        return sorted(found, key=lambda p: (p[0] != "host/host", p[0], p[1] != "pull"))

    def columns(self, placement: str, direction: str) -> List[str]:
        """Mechanisms measured for (placement, direction), plus the in-process and socket references."""
        refs = ("memcpy.c_1t", "memcpy.np_1t", "memcpy.c_2t", "raw_tcp")
        present = {k[0] for k in self.bw if (k[2], k[1]) == (placement, direction) or k[0] in refs}
        return [m for m in COLUMN_ORDER if m in present]


def _cell(results: Results, mechanism: str, direction: str, placement: str, size: int) -> str:
    rec = results.get(mechanism, direction, placement, size)
    if rec is None:
        return "—"
    text = f"{rec['median_gbps']:.2f} ({rec['min_gbps']:.2f}-{rec['max_gbps']:.2f})"
    ratio = results.ratio(mechanism, direction, placement, size)
    return f"{text} ×{ratio:.2f}" if ratio is not None else text


def transfer_table(results: Results, placement: str, direction: str) -> List[str]:
    cols = results.columns(placement, direction)
    lines = ["| block size | " + " | ".join(label(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for size in results.sizes():
        cells = [_cell(results, c, direction, placement, size) for c in cols]
        lines.append(f"| {format_size(size)} | " + " | ".join(cells) + " |")
    return lines


def peer_table(results: Results, placement: str, direction: str) -> List[str]:
    """The library's same-host transports as a ratio to NIXL, its tcp transport as a ratio to Mooncake (tcp)."""
    pairs = [(m, "nixl") for m in SAME_HOST] + [("tcp", "mooncake")]
    pairs = [(m, p) for m, p in pairs if any(k[0] == m and k[1] == direction for k in results.bw)
             and any(k[0] == p and k[1] == direction for k in results.bw)]
    if not pairs:
        return []
    lines = ["| block size | " + " | ".join(f"{m} / {p}" for m, p in pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
    for size in results.sizes():
        cells = []
        for mech, peer in pairs:
            value = results.ratio(mech, direction, placement, size, against=peer)
            cells.append("—" if value is None else f"×{value:.2f}")
        lines.append(f"| {format_size(size)} | " + " | ".join(cells) + " |")
    return lines


def _status(value: Optional[float], target: float) -> str:
    if value is None:
        return "n/a"
    if value >= target:
        return "met"
    return f"NOT met ({(value / target - 1) * 100:+.0f}%)"


def _target_for(size: int, table) -> Optional[float]:
    for lo, hi, minimum in table:
        if lo <= size <= hi:
            return minimum
    return None


def target_checks(results: Results) -> List[Tuple[str, str, Optional[str], Any]]:
    """(column title, mechanism, reference, target table or fixed minimum) of the bandwidth targets."""
    ceiling = results.ceiling_name()
    return [("auto / memcpy 1t", "auto", ceiling, SAME_HOST_TARGETS), ("auto / nixl", "auto", "nixl", NIXL_TARGETS),
            ("tcp / raw socket", "tcp", "raw_tcp", 0.9), ("tcp / mooncake", "tcp", "mooncake", 2.0),
            ("auto / memcpy 2t (optional)", "auto", "memcpy.c_2t", 0.85)]


def target_rows(results: Results, placement: str = "host/host") -> List[Tuple[str, str, str, str, str, str]]:
    """(check, size, direction, measured, target, status) for every size that has a target."""
    rows = []
    for direction in ("pull", "push"):
        for size in results.sizes():
            for title, mech, ref, spec in target_checks(results):
                target = spec if isinstance(spec, float) else _target_for(size, spec)
                if target is None or results.median(mech, direction, placement, size) is None:
                    continue
                value = results.ratio(mech, direction, placement, size, against=ref)
                rows.append((title, format_size(size), direction, f"×{value:.2f}" if value else "n/a",
                             f"≥ {target}", _status(value, target)))
    return rows


def target_table(results: Results, direction: str, placement: str = "host/host") -> List[str]:
    """Rows = block size, columns = the checks; a cell is "×ratio status" (or the ratio alone without a target)."""
    checks = target_checks(results)
    lines = ["| block size | " + " | ".join(t for t, _, _, _ in checks) + " |", "|---" * (len(checks) + 1) + "|"]
    for size in results.sizes():
        cells = []
        for _title, mech, ref, spec in checks:
            target = spec if isinstance(spec, float) else _target_for(size, spec)
            value = results.ratio(mech, direction, placement, size, against=ref)
            if value is None:
                cells.append("—")
            elif target is None:
                cells.append(f"×{value:.2f} (no target)")
            else:
                cells.append(f"×{value:.2f} {_status(value, target)} (≥ {target})")
        lines.append(f"| {format_size(size)} | " + " | ".join(cells) + " |")
    return lines


def latency_table(results: Results) -> List[str]:
    lines = ["| suite | route | 16 KiB pull p50 / p99 (µs) | 56×32×64 KiB request p50 (ms, GB/s) | "
             "link_clusters (ms) | first pull after link (ms) |", "|---|---|---|---|---|---|"]
    links = {r["mechanism"]: r for r in results.of_kind("link")}
    small = {r["mechanism"]: r for r in results.of_kind("latency_16k")}
    model = {r["mechanism"]: r for r in results.of_kind("latency_model")}
    for suite in sorted(set(links) | set(small) | set(model), key=_suite_order):
        s, m, k = small.get(suite), model.get(suite), links.get(suite)
        lines.append("| {} | {} | {} | {} | {} | {} |".format(
            suite, (k or {}).get("route", "?"),
            f"{s['median_us']:.0f} / {s['p99_us']:.0f}" if s else "—",
            f"{m['median_us'] / 1e3:.1f} ({m['median_gbps']:.2f})" if m else "—",
            f"{k['median_ms']:.1f}" if k else "—", f"{k['first_pull_ms']:.1f}" if k else "—"))
    return lines


def cpu_table(results: Results) -> List[str]:
    """One row per step and round: wall time, cores kept busy by the benchmark and by other processes."""
    lines = ["| step | round | wall (s) | cores busy, benchmark | cores busy, others |", "|---|---|---|---|---|"]
    for rec in results.of_kind("cpu"):
        lines.append(f"| {rec['mechanism']} | {rec.get('round', 1)} | {rec['wall_s']:.1f} | {rec['cores_ours']:.2f} | "
                     f"{rec.get('cores_others', float('nan')):.2f} |")
    return lines


def _suite_order(name: str) -> Tuple[int, str]:
    order = ("process_vm", "shm", "tcp", "auto")
    return (order.index(name) if name in order else len(order), name)


def _legend(results: Results) -> List[str]:
    routes = {r["mechanism"]: r.get("route", "?") for r in results.of_kind("link")}
    ceiling = results.ceiling_name()
    notes = {r.get("note") for r in results.records if r.get("mechanism") == ceiling and r.get("note")}
    paired = any(r.get("paired_ratio") for r in results.of_kind("bandwidth"))
    lines = [f"- **{label(ceiling)}**: in-process single-thread copy of the same scattered blocks "
             f"({'; '.join(sorted(notes)) or 'C loop'}); the reference of the same-host transports and NIXL"
             + (". The ratios of process_vm, shm and auto are paired: the initiator runs one memcpy pass of the same "
                "blocks (1 thread, then 2 threads) right before each of its passes and the ratio is the median of "
                "the per-pass quotients (robust to a machine that drifts); the memcpy columns are the separate "
                "in-process measurement, before and after the suites" if paired else ""),
             "- **memcpy 2t**: the same copy split over two threads (both cores)",
             "- **process_vm / shm / tcp**: the library with `transfer_backend` forced; shm moves pool-allocated "
             "caches (`host_mem_pool_cfg` + `allocate_blocks_cache`), the others registered page-aligned memory",
             f"- **auto**: the library's own choice on registered memory (route: {routes.get('auto', '?')})",
             "- **raw tcp socket**: two processes, loopback TCP, best of sendmsg/recvmsg_into batches and one "
             "send/recv per block; the reference of tcp and Mooncake",
             "- **nixl**: NIXL 1.5.1, UCX over CMA, initiator progress thread off, initialize_xfer+transfer+poll "
             "per pass; **mooncake**: Mooncake TE 0.3.13.post1, tcp, batch_transfer_sync_read/write"]
    return lines


def _plan_lines(results: Results) -> List[str]:
    lines = []
    for rec in results.of_kind("plan"):
        status = "met" if rec["median_ms"] < rec["target_ms"] else "NOT met"
        lines.append(f"- plan_blocks, {rec['tensors']} tensors × {rec['blocks']} blocks ({rec['ops']} ops): median "
                     f"{rec['median_ms']:.3f} ms, p99 {rec['p99_ms']:.3f} ms (target < {rec['target_ms']:.0f} ms: "
                     f"{status})")
    return lines


def _problems(results: Results) -> List[str]:
    return [f"- **{r['mechanism']}**: {r.get('message', '')}" for r in results.of_kind("error")] + \
           [f"- {r['message']}" for r in results.of_kind("note")]


def markdown(results: Results, title: str, meta: Dict[str, Any]) -> str:
    """The whole report: transfer tables, target checks, latency, planning, notes."""
    out = [f"# {title}", "", _meta_line(meta), ""]
    for placement, direction in results.pairs():
        name = "READ direction (pull)" if direction == "pull" else "WRITE direction (push)"
        out += [f"### {name}, {placement}, GB/s (min-max) ×ratio to its reference", ""]
        out += transfer_table(results, placement, direction) + [""]
        peers = peer_table(results, placement, direction)
        if peers:
            out += [f"Ratios to the peers ({direction}, {placement}; medians of separate runs):", ""] + peers + [""]
    out += ["Columns:", ""] + _legend(results) + [""]
    for direction in ("pull", "push"):
        if any(k[1] == direction for k in results.bw):
            out += [f"### Targets: ratio and status, {direction}, host/host", ""]
            out += target_table(results, direction) + [""]
    out += ["### Per-call latency and link set-up", ""] + latency_table(results) + [""]
    out += ["### Planning overhead", ""] + (_plan_lines(results) or ["- not measured"]) + [""]
    out += ["### Machine load during each step (cores busy: this benchmark / everything else)", ""]
    out += cpu_table(results) + [""]
    problems = _problems(results)
    if problems:
        out += ["### Notes and failures", ""] + problems + [""]
    return "\n".join(out)


def _meta_line(meta: Dict[str, Any]) -> str:
    keys = ("date", "host", "cpu", "python", "numpy", "library", "total_mib", "passes", "warmup", "rounds", "mode",
            "load_before", "load_after", "wall_s")
    return "; ".join(f"{k}: {meta[k]}" for k in keys if k in meta)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def write_jsonl(path: str, records: Iterable[Dict[str, Any]]) -> None:
    """One JSON object per line, floats to 5 significant digits."""
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(_rounded(rec), sort_keys=True) + "\n")
