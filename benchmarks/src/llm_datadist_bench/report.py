"""``bench`` output: markdown tables in the official shape (GB/s (min-max) ×ratio), targets, latency, JSON lines."""
from __future__ import annotations

import json
import statistics
from typing import Any, Dict, Iterable, List, Optional, Tuple

from llm_datadist_bench.common import format_size
from llm_datadist_bench.results import (COLUMN_ORDER, MEMCPY_2T, RAW_PVM, RAW_TCP, RAW_TCP_N, SAME_HOST, TLS,
                                        Results, label)
from llm_datadist_bench.targets import (TARGET_STATEMENTS, call_target_table, target_rows,
                                        target_table)

__all__ = ["COLUMN_ORDER", "Results", "cpu_table", "label", "latency_table", "markdown", "peer_table",
           "target_rows", "target_table", "transfer_table", "write_jsonl"]


def _cell(results: Results, mechanism: str, direction: str, placement: str, size: int) -> str:
    rec = results.get(mechanism, direction, placement, size)
    if rec is None:
        return "—"
    text = f"{rec['median_gbps']:.2f} ({rec['min_gbps']:.2f}-{rec['max_gbps']:.2f})"
    ratios = []
    for i, ref in enumerate(results.references(mechanism)):
        value = results.ratio(mechanism, direction, placement, size, against=ref)
        if value is not None:
            ratios.append(f"×{value:.2f}" if i == 0 else f"(1t ×{value:.2f})")
    return " ".join([text] + ratios)


def transfer_table(results: Results, placement: str, direction: str) -> List[str]:
    cols = results.columns(placement, direction)
    lines = ["| block size | " + " | ".join(results.column_label(c) for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
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


def _p50_p99(rec: Optional[Dict[str, Any]]) -> str:
    return f"{rec['median_us']:.1f} / {rec['p99_us']:.1f}" if rec and rec.get("samples_us") else "—"


def latency_table(results: Results) -> List[str]:
    """Per suite: small calls next to their system-call floor, link set-up, and the model-shaped request."""
    small, layers = results.by_suite("latency_16k"), results.by_suite("latency_layers")
    floor16, floor56 = results.by_suite("floor_16k"), results.by_suite("floor_layers")
    links, model = results.by_suite("link"), results.by_suite("latency_model")
    suites = sorted(set(links) | set(small) | set(layers) | set(model), key=_suite_order)
    lines = ["Per call, µs p50 / p99; floor = one `process_vm_readv` of the same pieces from Python between the same "
             "two processes, same run:", "",
             "| suite | route | 16 KiB block | floor, 1 × 16 KiB | 56 × 1 × 16 KiB | floor, 56 × 16 KiB | "
             "link_clusters (ms) | first pull after link (ms) |", "|---|---|---|---|---|---|---|---|"]
    for suite in suites:
        k = links.get(suite)
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            suite, (k or {}).get("route", "?"), _p50_p99(small.get(suite)), _p50_p99(floor16.get(suite)),
            _p50_p99(layers.get(suite)), _p50_p99(floor56.get(suite)),
            f"{k['median_ms']:.1f}" if k else "—", f"{k['first_pull_ms']:.1f}" if k else "—"))
    on, off = small.get("auto[stats on]"), small.get("auto[stats off]")
    if on and off and on.get("samples_us") and off.get("samples_us"):
        lines += ["", "What counting costs (llm_datadist.stats is always on; `LLM_DATADIST_STATS=0` turns it off): "
                      "the 16 KiB one-block pull, `auto`, p50 {:.1f} µs with counting, {:.1f} µs without "
                      "(difference {:+.1f} µs, ×{:.3f}); p99 {:.1f} / {:.1f} µs.".format(
                          on["median_us"], off["median_us"], on["median_us"] - off["median_us"],
                          on["median_us"] / off["median_us"], on["p99_us"], off["p99_us"])]
    if model:
        lines += ["", "Model-shaped request, 56 tensors × 32 blocks × 64 KiB (112 MiB) in one `pull_blocks` call; the "
                      "2-thread memcpy of the same blocks runs in the initiator right before each call:", "",
                  "| suite | p50 (ms) | GB/s | memcpy 2t, same blocks, p50 (ms) | ratio to memcpy 2t (paired) | "
                  "next to a busy-GIL thread: p50 (ms) | its ratio to memcpy 2t (paired) | busy / quiet |",
                  "|---|---|---|---|---|---|---|---|"]
        busy = results.by_suite("latency_model_busy")
        for suite in sorted(model, key=_suite_order):
            m, b = model[suite], busy.get(suite) or {}
            memcpy = m.get("paired_memcpy_2t_us") or []
            quiet_ratio, busy_ratio = m.get("paired_ratio_2t"), b.get("paired_ratio_2t")
            lines.append("| {} | {:.2f} | {:.2f} | {} | {} | {} | {} | {} |".format(
                suite, m["median_us"] / 1e3, m["median_gbps"],
                f"{statistics.median(memcpy) / 1e3:.2f}" if memcpy else "—",
                f"×{quiet_ratio:.2f}" if quiet_ratio else "—",
                f"{b['median_us'] / 1e3:.2f}" if b.get("median_us") else "—",
                f"×{busy_ratio:.2f}" if busy_ratio else "—",
                f"×{busy_ratio / quiet_ratio:.2f}" if busy_ratio and quiet_ratio else "—"))
        lines += ["", "The busy-GIL columns repeat the request while a Python thread of the decoding process spins "
                      "(what a serving engine's loop does); its memcpy reference runs next to the same thread, so "
                      "the spinning thread's CPU does not count against the transfer."]
    return lines


def cpu_table(results: Results) -> List[str]:
    """One row per step and round: wall time, cores kept busy by the benchmark and by other processes."""
    lines = ["| step | round | wall (s) | cores busy, benchmark | cores busy, others |", "|---|---|---|---|---|"]
    for rec in results.of_kind("cpu"):
        lines.append(f"| {rec['mechanism']} | {rec.get('round', 1)} | {rec['wall_s']:.1f} | {rec['cores_ours']:.2f} | "
                     f"{rec.get('cores_others', float('nan')):.2f} |")
    return lines


def _suite_order(name: str) -> Tuple[int, str]:
    order = ("process_vm", "shm", "tcp", TLS, "auto")
    return (order.index(name) if name in order else len(order), name)


def _legend(results: Results) -> List[str]:
    routes = {r["mechanism"]: r.get("route", "?") for r in results.of_kind("link")}
    ceiling = results.ceiling_name()
    notes = {str(r["note"]) for r in results.records if r.get("mechanism") == ceiling and r.get("note")}
    paired = any(r.get("paired_ratio_2t") or r.get("paired_ratio") for r in results.of_kind("bandwidth"))
    two = results.has(MEMCPY_2T)
    lines = [f"- **{label(ceiling)}**: in-process single-thread copy of the same scattered blocks "
             f"({'; '.join(sorted(notes)) or 'C loop'}), before and after the suites",
             "- **memcpy 2t**: the same copy split over two threads (both cores): the ceiling every same-host cell "
             "(process_vm, shm, auto, nixl) is a ratio to; the ratio to memcpy 1t follows in brackets" if two else
             "- **memcpy 2t**: not measured (no C compiler): the same-host ratios are to memcpy 1t",
             "- **process_vm / shm / tcp**: the library with `transfer_backend` forced; shm moves pool-allocated "
             "caches (`host_mem_pool_cfg` + `allocate_blocks_cache`), the others registered page-aligned memory",
             f"- **auto**: the library's own choice on registered memory (route: {routes.get('auto', '?')})",
             "- **raw tcp socket**: two processes, one loopback TCP stream, best of sendmsg/recvmsg_into batches and "
             "one send/recv per block; the reference of tcp and Mooncake"]
    if paired:
        lines.insert(2, "- **paired ratios**: the initiator of process_vm, shm and auto runs one memcpy pass of the "
                        "same blocks (1 thread, then 2 threads) right before each transfer pass; their ratios are "
                        "the medians of the per-pass quotients (a machine that drifts slows both sides alike); the "
                        "memcpy columns are the separate in-process measurement")
    if results.has(RAW_PVM):
        lines.insert(2, "- **raw process_vm 2t**: the kernel's cross-process copy with no library code: a C loop of "
                        "`process_vm_readv` (pull) or `process_vm_writev` (push), 1024 pieces per call, over the same "
                        "scattered blocks between this process and a child holding them, on two threads; the most a "
                        "same-host transport reaches for caches in private memory (its ratio is to memcpy 2t)")
    if results.has("tcp") and results.has(RAW_TCP) and not results.has(RAW_TCP_N):
        lines.append("- **raw tcp, N streams**: not a separate column: to a peer on this machine the library's tcp "
                     "uses one data connection per two cores (here one), so the one-stream socket is also the "
                     "reference with the library's stream count")
    if results.has(RAW_TCP_N):
        lines.append(f"- **{results.column_label(RAW_TCP_N)}**: the same blocks split over as many loopback "
                     f"connections at once (one thread per stream on each side), as many as the library's tcp "
                     f"uses for one large transfer; shown next to the one-stream reference, not a ratio base")
    if results.has(TLS):
        lines.append("- **tcp+tls**: `tcp` forced with mutual TLS on both sides (`tls_cert_file`, `tls_key_file`, "
                     "`tls_ca_file`; a CA and two certificates made with openssl for the run); its ratio is to plain "
                     "tcp of the same run, the throughput cost of TLS (the same bytes per pass, at most 5 passes "
                     "and 200 calls: TLS is slow)")
    lines.append("- **nixl**: NIXL 1.5.1, UCX over CMA, initiator progress thread off, initialize_xfer+transfer+poll "
                 "per pass; **mooncake**: Mooncake TE 0.3.13.post1, tcp, batch_transfer_sync_read/write")
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
    notes = list(dict.fromkeys(f"- {r['message']}" for r in results.of_kind("note")))  # once per text
    return [f"- **{r['mechanism']}**: {r.get('message', '')}" for r in results.of_kind("error")] + notes


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
    out += ["### Targets", ""] + [f"- {text}" for text in TARGET_STATEMENTS] + [""]
    for direction in ("pull", "push"):
        if any(k[1] == direction for k in results.bw):
            out += [f"Bandwidth, {direction}, host/host (ratio and status):", ""]
            out += target_table(results, direction) + [""]
    calls = call_target_table(results)
    if calls:
        out += ["Per call (auto):", ""] + calls + [""]
    out += ["### Per-call latency, link set-up, model-shaped request", ""] + latency_table(results) + [""]
    out += ["### Planning overhead", ""] + (_plan_lines(results) or ["- not measured"]) + [""]
    out += ["### Machine load during each step (cores busy: this benchmark / everything else)", ""]
    out += cpu_table(results) + [""]
    problems = _problems(results)
    if problems:
        out += ["### Notes and failures", ""] + problems + [""]
    return "\n".join(out)


def _meta_line(meta: Dict[str, Any]) -> str:
    keys = ("date", "host", "cpu", "python", "numpy", "library", "total_mib", "passes", "warmup", "rounds", "mode",
            "tcp_streams", "owner_cpus", "initiator_cpus", "load_before", "load_after", "wall_s")
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
