"""Output of ``bench --hosts netns``: per network condition the usual tables (ratios to the raw socket), JSON lines."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from llm_datadist_bench.common import merge_samples
from llm_datadist_bench.report import (Results, cpu_table, latency_table, peer_table, transfer_table,
                                       write_jsonl)
from llm_datadist_bench.raw_socket import best_raw_tcp

__all__ = ["condition_results", "ratio_range", "summary_lines", "write_netns"]


def condition_results(records: Sequence[Dict[str, Any]], condition: str) -> Results:
    """The records of one condition, rounds pooled, with the best raw-socket variant per size."""
    return Results(best_raw_tcp(merge_samples([dict(r) for r in records if r.get("condition") == condition])))


def ratio_range(results: Results, mechanism: str, direction: str, against: str) -> Optional[str]:
    """``"×0.81-0.97"`` over the sizes measured for both, or None."""
    ratios = [results.ratio(mechanism, direction, "host/host", size, against=against) for size in results.sizes()]
    values = [v for v in ratios if v is not None]
    if not values:
        return None
    return f"×{min(values):.2f}" if len(values) == 1 else f"×{min(values):.2f}-{max(values):.2f}"


def summary_lines(results: Results, condition: str, transports: Sequence[str]) -> List[str]:
    """One line per (transport, reference, direction) measured: the range of ratios over block sizes."""
    lines = []
    for mech in transports:
        for ref, title in (("raw_tcp", "the raw socket"), ("mooncake", "Mooncake TE (tcp)")):
            for direction in ("pull", "push"):
                span = ratio_range(results, mech, direction, ref)
                if span:
                    lines.append(f"- {condition}: {mech} {direction} / {title}: {span}")
    return lines


def _legend(meta: Dict[str, Any]) -> List[str]:
    hosts = ", ".join(f"{name} ({ip})" for name, ip in zip(meta.get("hostnames", []), meta.get("addresses", [])))
    return [
        f"- **hosts**: two simulated hosts, {hosts or 'two network namespaces'}: a network namespace each, joined "
        f"by veth pairs to a bridge in a third namespace (MTU {meta.get('mtu')}), every process in its own pid, "
        "mount, IPC and UTS namespaces with its own hostname, so the library sees two hosts and routes over the "
        "network; host 0 runs the owner (prefill) side, host 1 the initiator (decode) side",
        "- **tbf RATE**: both hosts' links limited with `tc qdisc ... tbf rate RATE burst 1mb latency 100ms`, "
        "both directions; a smaller workload (sizes, MiB per pass and passes in the section title)",
        "- **raw tcp socket**: the same scattered blocks over one TCP connection across the same link, best of "
        "sendmsg/recvmsg_into batches and one send/recv per block: the reference of every ratio",
        "- **tcp**: the library with `transfer_backend` tcp (`pull_blocks` / `push_blocks`, one call per pass, "
        "remote-cache-accessible mode), registered page-aligned memory",
    ] + ([
        "- **nixl**: the library with `transfer_backend` nixl (the same calls as tcp): NIXL over UCX, which runs "
        "over TCP between the namespaces (`UCX_TLS=tcp,self`: no RDMA device here)",
    ] if "nixl" in meta.get("transports", ()) else []) + [
        "- **mooncake**: Mooncake TE 0.3.13.post1, protocol tcp, P2PHANDSHAKE, batch_transfer_sync_read/write, "
        "its target on host 0 and its initiator on host 1",
    ]


def _section(results: Results, title: str) -> List[str]:
    out = [f"## {title}", ""]
    for direction in ("pull", "push"):
        if not any(k[1] == direction for k in results.bw):
            continue
        name = "READ direction (pull)" if direction == "pull" else "WRITE direction (push)"
        out += [f"### {name}, GB/s (min-max) ×ratio to the raw socket", ""]
        out += transfer_table(results, "host/host", direction) + [""]
        peers = peer_table(results, "host/host", direction)
        if peers:
            out += [f"Ratios to Mooncake ({direction}; medians of separate runs on the same link):", ""] + peers + [""]
    if results.of_kind("link") or results.of_kind("latency_16k"):
        out += ["### Per-call latency and link set-up", ""] + latency_table(results) + [""]
    return out


def _title(cond: Dict[str, Any]) -> str:
    return (f"{cond['name']}: {', '.join(cond['sizes'])}, {cond['total_mib']} MiB per pass, {cond['passes']} "
            f"passes (+{cond['warmup']} warm-up)")


def markdown(records: Sequence[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The whole report of one run."""
    keys = ("date", "host", "cpu", "python", "numpy", "library", "mtu", "rounds", "mode", "load_before", "load_after",
            "wall_s")
    out = [f"# llm-datadist bench --hosts netns, {meta.get('mode')} run, {meta.get('date')}", "",
           "; ".join(f"{k}: {meta[k]}" for k in keys if k in meta), ""]
    summary: List[str] = []
    sections: List[str] = []
    cpu: List[Dict[str, Any]] = []
    for cond in meta["conditions"]:
        results = condition_results(records, cond["name"])
        summary += summary_lines(results, cond["name"], meta.get("transports", ()))
        sections += _section(results, _title(cond))
        cpu += results.of_kind("cpu")
    out += ["Ratios (range over block sizes):", ""] + (summary or ["- none measured"]) + [""] + sections
    out += ["## Columns", ""] + _legend(meta) + [""]
    out += ["## Machine load during each step (cores busy: this benchmark / everything else)", ""]
    out += cpu_table(Results(cpu)) + [""]
    problems = [f"- **{r['mechanism']}** ({r.get('condition', '?')}): {r.get('message', '')}"
                for r in records if r.get("kind") == "error"]
    if problems:
        out += ["## Notes and failures", ""] + problems + [""]
    return "\n".join(out)


def write_netns(out: str, records: List[Dict[str, Any]], meta: Dict[str, Any]) -> List[str]:
    """Write ``results.md`` and ``results.jsonl`` into ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    text = markdown(records, meta)
    md, jsonl = os.path.join(out, "results.md"), os.path.join(out, "results.jsonl")
    with open(md, "w") as f:
        f.write(text + "\n")
    write_jsonl(jsonl, [dict(kind="meta", mechanism="run", **meta)] + list(records))
    print(text)
    return [md, jsonl]
