"""``llm-datadist bench --hosts netns``: the cross-host suites between two simulated hosts, unlimited and rate limited.

Host 0 runs the owner (prefill) side, host 1 the initiator (decode) side of every mechanism: each cross-host
transport of the library, a raw TCP socket moving the same scattered blocks (the reference of the ratios)
and, with ``--peers mooncake``, Mooncake Transfer Engine over tcp. The same run repeats with the hosts' links
limited by ``tc ... tbf`` (``--rate``), with a smaller workload so that it stays short.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from llm_datadist.cli.netns import CROSS_HOST_TRANSPORTS, SimulatedHosts, unavailable_reason
from llm_datadist_bench.common import MIB, SuiteSpec, format_size, parse_sizes, record
from llm_datadist_bench.netns_procs import start_child, start_process
from llm_datadist_bench.run_meta import loadavg, run_meta, watched

__all__ = ["Condition", "conditions", "netns_suites", "run_netns"]

PROG = "llm-datadist bench --hosts netns"
LIMITED_SIZES = "64K,1M"
LIMITED_TOTAL_MIB = 32
LIMITED_PASSES = 3


@dataclasses.dataclass(frozen=True)
class Condition:
    """One network condition of the run and the workload measured under it."""

    name: str
    rate: Optional[str]
    sizes: Tuple[int, ...]
    total_bytes: int
    passes: int
    warmup: int
    latency_iters: int
    model_iters: int
    link_repeats: int


def conditions(args: argparse.Namespace, opts: Dict[str, Any]) -> List[Condition]:
    """The unlimited link with the full workload, then each ``--rate`` with the smaller one."""
    quick = args.quick
    out = [Condition("unlimited", None, opts["sizes"], opts["total"], opts["passes"], opts["warmup"],
                     100 if quick else 1000, 3 if quick else 20, 2 if quick else 5)]
    rates = [r.strip() for r in (args.rate or "").split(",") if r.strip() and r.strip() != "none"]
    sizes = tuple(s for s in parse_sizes(LIMITED_SIZES) if s <= opts["total"]) or opts["sizes"][:1]
    for rate in rates:
        out.append(Condition(f"tbf {rate}", rate, sizes, min(opts["total"], LIMITED_TOTAL_MIB * MIB),
                             min(opts["passes"], LIMITED_PASSES), min(opts["warmup"], 1), 50, 2, 2))
    return out


def netns_suites(text: Optional[str]) -> List[str]:
    """The library suites of the run: every cross-host transport this machine has, or the ``--transports`` subset.

    Raises:
        ValueError: an unknown name, or a chosen transport that is not available here (with the reason).
    """
    # the one private module of the library the bench may import (it is another distribution; see __init__)
    from llm_datadist._engine.diagnostics import transport_report

    reasons = dict(transport_report())
    if not text:
        missing = [n for n in CROSS_HOST_TRANSPORTS if reasons.get(n)]
        for name in missing:
            print(f"{PROG}: the {name} suite is left out: {reasons[name]}", file=sys.stderr)
        return [n for n in CROSS_HOST_TRANSPORTS if n not in missing]
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in CROSS_HOST_TRANSPORTS]
    if unknown:
        raise ValueError(f"with --hosts netns, --transports takes {', '.join(CROSS_HOST_TRANSPORTS)}, not "
                         f"{', '.join(unknown)}")
    missing = [t for t in chosen if reasons.get(t)]
    if missing:
        raise ValueError("; ".join(f"{t} is not available here: {reasons[t]}" for t in missing))
    return chosen


def _suite_start(hosts: SimulatedHosts) -> Callable[[SuiteSpec], tuple]:
    """Start the owner on host 0 and the initiator on host 1, joined by a socket of their own."""

    def start(spec: SuiteSpec):
        owner_end, initiator_end = socket.socketpair()
        try:
            owner, owner_conn = start_child(hosts, 0, "owner", spec, [owner_end])
            initiator, initiator_conn = start_child(hosts, 1, "initiator", spec, [initiator_end])
        finally:
            owner_end.close()
            initiator_end.close()
        return {"owner": owner, "initiator": initiator}, {"owner": owner_conn, "initiator": initiator_conn}

    return start


def _suite_spec(name: str, cond: Condition, args: argparse.Namespace, hosts: SimulatedHosts,
                directions: Sequence[str], index: int) -> SuiteSpec:
    base = 1000 + (os.getpid() % 100000) * 2 + 100 * index
    return SuiteSpec(name=name, transport=name, pool=False, placement="host/host", sizes=cond.sizes,
                     directions=tuple(directions), passes=cond.passes, warmup=cond.warmup,
                     total_bytes=cond.total_bytes, seed=args.seed, latency_iters=cond.latency_iters,
                     model_iters=cond.model_iters, link_repeats=cond.link_repeats, timeout_s=args.timeout,
                     owner_id=base, initiator_id=base + 1, paired=False, owner_host=hosts[0].ip,
                     initiator_host=hosts[1].ip)


def _raw(hosts: SimulatedHosts, cond: Condition, args: argparse.Namespace, progress) -> List[Dict[str, Any]]:
    """The raw socket across the same link: server on host 0, measuring client on host 1."""
    from llm_datadist_bench.runner import collect_children, stop_children

    server, server_conn = start_child(hosts, 0, "raw-server", (cond.total_bytes, args.seed, hosts[0].ip))
    procs, conns = {"raw-server": server}, [server_conn]
    records: List[Dict[str, Any]] = []
    error = None
    try:
        if not server_conn.poll(60):
            raise RuntimeError("the raw TCP server did not start")
        port = server_conn.recv()
        if isinstance(port, tuple):  # ("error", text)
            raise RuntimeError(port[1])
        job = ((hosts[0].ip, int(port)), cond.sizes, cond.total_bytes, cond.passes, cond.warmup, args.seed)
        client, client_conn = start_child(hosts, 1, "raw-client", job)
        procs["raw-client"] = client
        conns.append(client_conn)
        error = collect_children({"raw-client": client}, {"raw-client": client_conn}, records, progress,
                                 args.timeout * 4 + 60.0)
    except (OSError, EOFError, RuntimeError) as exc:
        error = str(exc)
    finally:
        stop_children(procs, 10.0)
        for conn in conns:
            conn.close()
    if error:
        records.append(record("error", "raw_tcp", message=error.strip().splitlines()[0], detail=error))
    return records


def _mooncake(hosts: SimulatedHosts, cond: Condition, args: argparse.Namespace, directions: Sequence[str],
              workdir: str, progress) -> List[Dict[str, Any]]:
    """Mooncake TE over tcp: its target on host 0, its initiator on host 1, from the peers' interpreter."""
    from llm_datadist_bench.peers import (PEERS, _importable, _read_lines, default_peer_python,
                                          find_peer_scripts, write_orders)
    from llm_datadist_bench.runner import stop_children

    python = args.peer_python or default_peer_python()
    scripts = find_peer_scripts(args.peer_scripts)
    missing = "peer driver scripts (benchmarks/peers) not found" if scripts is None else \
        _importable(python, PEERS["mooncake"][1])
    if missing or scripts is None:
        progress.update(len(cond.sizes) * len(directions), note="mooncake missing")
        return [record("error", "mooncake", message=f"mooncake not available: {missing} (install it with "
                                                    f"benchmarks/peers/setup_peers.sh)")]
    orders = os.path.join(workdir, f"orders-{cond.total_bytes}.npz")
    write_orders(orders, cond.sizes, cond.total_bytes, args.seed)
    script = os.path.join(scripts, PEERS["mooncake"][0])
    common = [python, script, "--orders", orders, "--sizes", ",".join(map(str, cond.sizes)), "--total-bytes",
              str(cond.total_bytes), "--passes", str(cond.passes), "--warmup", str(cond.warmup), "--directions",
              ",".join(directions)]
    target_end, initiator_end = socket.socketpair()
    records: List[Dict[str, Any]] = []
    err_path = os.path.join(workdir, "mooncake.stderr")
    with open(err_path, "w+") as err:
        try:
            target = start_process(hosts, 0, common + ["--role", "target", "--conn-fd", str(target_end.fileno())],
                                   [target_end], env=dict(os.environ, BENCH_PEER_HOST=hosts[0].ip), stderr=err,
                                   stdout=err)
            initiator = start_process(hosts, 1, common + ["--role", "initiator", "--conn-fd",
                                                          str(initiator_end.fileno())],
                                      [initiator_end], env=dict(os.environ, BENCH_PEER_HOST=hosts[1].ip),
                                      stderr=err, stdout=subprocess.PIPE, text=True)
        finally:
            target_end.close()
            initiator_end.close()
        reader = threading.Thread(target=_read_lines, args=(initiator.popen, records, progress, "mooncake"),
                                  daemon=True)
        reader.start()
        initiator.join(120.0 + len(cond.sizes) * len(directions) * (cond.passes + cond.warmup) * 10.0)
        timed_out = initiator.is_alive()
        stop_children({"initiator": initiator, "target": target}, 0.0 if timed_out else 10.0)
        reader.join(10)
        err.seek(0)
        tail = err.read()[-2000:]
    if timed_out:
        records.append(record("error", "mooncake", message="mooncake driver timed out", detail=tail))
    elif initiator.exitcode not in (0, None) and not any(r.get("kind") == "error" for r in records):
        records.append(record("error", "mooncake", message=f"mooncake driver exited {initiator.exitcode}",
                              detail=tail))
    return records


def _run_condition(hosts: SimulatedHosts, cond: Condition, args: argparse.Namespace, opts: Dict[str, Any],
                   transports: Sequence[str], progress, workdir: str, round_no: int) -> List[Dict[str, Any]]:
    from llm_datadist_bench.runner import run_suite

    for host in hosts.hosts:
        hosts.clear_traffic_control(host)
        if cond.rate:
            hosts.rate_limit(host, cond.rate)
    records = watched(f"raw tcp socket [{cond.name}]", round_no, lambda: _raw(hosts, cond, args, progress))
    for index, name in enumerate(transports):
        spec = _suite_spec(name, cond, args, hosts, opts["directions"], index)
        records += [dict(r, round=round_no, mechanism=f"{name} [{cond.name}]") if r.get("kind") == "cpu" else r
                    for r in run_suite(spec, progress, start=_suite_start(hosts))]
    if "mooncake" in opts["peers"]:
        records += watched(f"mooncake [{cond.name}]", round_no,
                            lambda: _mooncake(hosts, cond, args, opts["directions"], workdir, progress))
    return [dict(r, condition=cond.name) for r in records]


def _units(conds: Sequence[Condition], transports: Sequence[str], opts: Dict[str, Any], rounds: int) -> int:
    per = 0
    for cond in conds:
        per += len(cond.sizes) * (1 + len(transports) * len(opts["directions"])) + 2 * len(transports)
        per += len(cond.sizes) * len(opts["directions"]) if "mooncake" in opts["peers"] else 0
    return per * rounds


def run_netns(args: argparse.Namespace, opts: Dict[str, Any]) -> int:
    """The whole simulated-hosts run (or the link-scale run with ``--scale``); the exit status."""
    from llm_datadist.cli.progress import Progress, format_duration

    reason = unavailable_reason()
    if reason is not None:
        print(f"{PROG}: simulated hosts unavailable: {reason}", file=sys.stderr)
        return 2
    if args.scale:
        from llm_datadist_bench.netns_scale import run_scale

        return run_scale(args)
    try:
        transports = netns_suites(args.transports)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    peers = [p for p in opts["peers"] if p != "mooncake"]
    if peers:
        print(f"{PROG}: {', '.join(peers)} is not run across simulated hosts yet (only mooncake)", file=sys.stderr)
    conds = conditions(args, opts)
    meta = _meta(args, opts, conds, transports)
    print(f"{PROG}: conditions {', '.join(c.name for c in conds)}; suites {', '.join(transports)}, raw tcp socket"
          f"{', mooncake' if 'mooncake' in opts['peers'] else ''}", file=sys.stderr)
    progress = Progress(_units(conds, transports, opts, args.rounds), label="bench netns",
                        enabled=not args.no_progress)
    workdir = tempfile.mkdtemp(prefix="llmdd-bench-netns-")
    records: List[Dict[str, Any]] = []
    start = time.monotonic()
    try:
        with SimulatedHosts(2, mtu=args.mtu) as hosts:
            meta.update(addresses=[h.ip for h in hosts.hosts], hostnames=[h.hostname for h in hosts.hosts])
            for round_no in range(1, args.rounds + 1):
                for cond in conds:
                    records += _run_condition(hosts, cond, args, opts, transports, progress, workdir, round_no)
    except KeyboardInterrupt:
        progress.close()
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    progress.close()
    from llm_datadist_bench.netns_report import write_netns

    meta.update(load_after=loadavg(), wall_s=round(time.monotonic() - start, 1))

    files = write_netns(args.out, records, meta)
    print(f"{PROG}: done in {format_duration(meta['wall_s'])}; wrote {', '.join(files)}", file=sys.stderr)
    return 1 if any(r.get("kind") == "error" and r.get("mechanism") in transports for r in records) else 0


def _meta(args: argparse.Namespace, opts: Dict[str, Any], conds: Sequence[Condition],
          transports: Sequence[str]) -> Dict[str, Any]:
    meta = run_meta(args, opts)
    meta.update(hosts="netns", transports=list(transports), mtu=args.mtu or "default (1500)",
                conditions=[dict(name=c.name, rate=c.rate, sizes=[format_size(s) for s in c.sizes],
                                 total_mib=c.total_bytes // MIB, passes=c.passes, warmup=c.warmup) for c in conds],
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return meta
