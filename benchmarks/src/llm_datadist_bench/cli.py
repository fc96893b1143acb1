"""``llm-datadist bench``: transfer bandwidth and latency side by side with the machine's ceiling and the peers."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from llm_datadist.cli.progress import Progress, format_duration
from llm_datadist_bench.common import (DEFAULT_SIZES, MIB, QUICK_SIZES, SuiteSpec, TlsFiles, format_size,
                                       merge_samples, parse_cpus, parse_sizes, record)
from llm_datadist_bench.run_meta import loadavg, run_meta, watched
from llm_datadist_bench.tls import TLS_SUITE

__all__ = ["main", "build_parser"]

PROG = "llm-datadist bench"
TRANSPORTS = ("process_vm", "shm", "tcp")
DIRECTIONS = ("pull", "push")
PEER_NAMES = ("nixl", "mooncake")
TLS_MAX_PASSES = 5  # measured passes of the tcp+tls suite (each pass moves the same bytes as the other suites')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Two processes move scattered blocks with pull_blocks/push_blocks over every transport "
                               "and 'auto'; the same run measures the ceiling (memcpy of the same blocks, a raw "
                               "loopback socket) and, with --peers, NIXL and Mooncake. Writes results.md, "
                               "results.jsonl and bench.png to --out.")
    parser.add_argument("--quick", action="store_true", help="3 sizes, 32 MiB per pass, 3 passes (seconds)")
    parser.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"),
                        help="measure nothing: print, per table cell, how the ratios changed from run A to run B")
    parser.add_argument("--out", default="bench-out", help="output folder (default %(default)s)")
    parser.add_argument("--sizes", help="block sizes, e.g. 16K,64K,2M (default 16K..2M, 8 sizes)")
    parser.add_argument("--transports", help=f"comma list of {', '.join(TRANSPORTS)}, {TLS_SUITE}, auto (default: "
                                             f"every available one, {TLS_SUITE} where openssl exists, and auto)")
    parser.add_argument("--directions", default="pull,push", help="pull, push or both (default %(default)s)")
    parser.add_argument("--passes", type=int, help="measured passes per point (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, help="warm-up passes per point (default 2; quick 1)")
    parser.add_argument("--total-mib", type=int, help="MiB moved per pass (default 128; quick 32)")
    parser.add_argument("--peers", nargs="?", const="nixl,mooncake", default="",
                        help="also run the peer engines (nixl, mooncake; default both) from --peer-python")
    parser.add_argument("--peer-python", help="interpreter that has the peers (default .venv-peers/bin/python)")
    parser.add_argument("--peer-scripts", help="folder of the peer drivers (default benchmarks/peers)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat everything this many times and pool the samples (a noisy machine; default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scattered block order")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per step before giving up")
    parser.add_argument("--tcp-streams", type=int, metavar="N",
                        help="streams of the parallel raw socket reference (default: as many data connections as "
                             "the library's tcp transport uses for one large transfer)")
    parser.add_argument("--owner-cpus", help="bind the owner (prefill) process to these CPUs, e.g. 0 or 0-3")
    parser.add_argument("--initiator-cpus", help="bind the initiator (decode) process to these CPUs, e.g. 1 (to "
                                                 "compare with a serving engine bound the same way)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    hosts = parser.add_argument_group("across simulated hosts (--hosts netns; root, Linux network namespaces)")
    hosts.add_argument("--hosts", choices=("local", "netns"), default="local",
                       help="local (default): two processes of this host; netns: the cross-host transports, a "
                            "raw socket and (--peers mooncake) Mooncake between two simulated hosts")
    hosts.add_argument("--rate", default="1gbit",
                       help="netns: also run with the links limited to these tc tbf rates (comma list, e.g. "
                            "1gbit,10gbit; 'none' for no limited run; default %(default)s)")
    hosts.add_argument("--mtu", type=int, help="netns: MTU of the simulated links (default the kernel's, 1500)")
    hosts.add_argument("--scale", type=int, default=0, metavar="N",
                       help="netns: instead of the suites, link one decode to N prefills and one prefill to N "
                            "decodes (one host each) and report link set-up, memory and threads per link and "
                            "the aggregate throughput of concurrent pulls")
    return parser


def _options(args: argparse.Namespace) -> Dict[str, Any]:
    """Validated settings (raises ValueError with a user-facing message)."""
    sizes = parse_sizes(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    total = (args.total_mib or (32 if args.quick else 128)) * MIB
    passes = args.passes or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    directions = tuple(d.strip() for d in args.directions.split(",") if d.strip())
    if not directions or set(directions) - set(DIRECTIONS):
        raise ValueError(f"--directions takes pull and/or push, not {args.directions!r}")
    if passes <= 0 or warmup < 0 or total <= 0 or args.rounds <= 0:
        raise ValueError("--passes, --rounds and --total-mib must be > 0, --warmup >= 0")
    if args.tcp_streams is not None and not 1 <= args.tcp_streams <= 64:
        raise ValueError(f"--tcp-streams takes 1 to 64, not {args.tcp_streams}")
    too_big = [format_size(s) for s in sizes if s > total or s % 8]
    if too_big:
        raise ValueError(f"block sizes {', '.join(too_big)} exceed --total-mib or are not multiples of 8 bytes")
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    if set(peers) - set(PEER_NAMES):
        raise ValueError(f"--peers takes {', '.join(PEER_NAMES)}, not {args.peers!r}")
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    owner_cpus, initiator_cpus = parse_cpus(args.owner_cpus), parse_cpus(args.initiator_cpus)
    if set(owner_cpus + initiator_cpus) - cpus:
        raise ValueError(f"--owner-cpus/--initiator-cpus name CPUs this process may not use (it may use "
                         f"{sorted(cpus)})")
    return dict(sizes=sizes, total=total, passes=passes, warmup=warmup, directions=directions, peers=peers,
                transports=[] if args.hosts == "netns" else _backends(args.transports),
                streams=args.tcp_streams or library_tcp_streams(), owner_cpus=owner_cpus,
                initiator_cpus=initiator_cpus)


def _backends(text: Optional[str]) -> List[str]:
    # the one private module of the library the bench may import (it is another distribution; see __init__)
    from llm_datadist._engine.diagnostics import transport_report

    working = {name for name, reason in transport_report() if not reason}
    available = [t for t in TRANSPORTS if t in working]
    if not text:
        return available + ([TLS_SUITE] if "tcp" in available else []) + ["auto"]
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TRANSPORTS + (TLS_SUITE, "auto")]
    if unknown:
        raise ValueError(f"unknown transport(s) {', '.join(unknown)}; choose from {', '.join(TRANSPORTS)}, "
                         f"{TLS_SUITE}, auto")
    return chosen


def library_tcp_streams() -> int:
    """How many data connections the library's tcp transport opens for one large transfer between two processes
    of this machine (the bench's suites, netns hosts included, all run on this machine's cores)."""
    # the one private module of the library the bench may import (it is another distribution; see __init__)
    from llm_datadist._engine.diagnostics import tcp_streams_per_transfer

    return max(1, tcp_streams_per_transfer(same_machine=True))


def _cuda_note() -> Optional[str]:
    """None when torch sees a CUDA device (device placements run), else why they are skipped."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "torch is not installed: no CUDA, host/device and device/device placements skipped"
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except Exception as exc:  # noqa: BLE001 - a broken CUDA stack means host only
        return f"torch CUDA check failed ({exc}): device placements skipped"
    return "torch sees no CUDA device: host/device and device/device placements skipped"


def _suites(opts: Dict[str, Any], args: argparse.Namespace, placements: Sequence[str],
            tls: Optional[TlsFiles]) -> List[SuiteSpec]:
    quick = args.quick
    base = 1000 + (os.getpid() % 100000) * 2
    suites = []
    for placement in placements:
        names = opts["transports"] if placement == "host/host" else ["auto"]
        for name in names:
            if name == TLS_SUITE and tls is None:
                continue
            transport = {"auto": None, TLS_SUITE: "tcp"}.get(name, name)
            suffix = "" if placement == "host/host" else f"[{placement}]"
            suites.append(SuiteSpec(
                name=name + suffix, transport=transport, pool=name == "shm", placement=placement,
                sizes=opts["sizes"], directions=opts["directions"], passes=opts["passes"], warmup=opts["warmup"],
                total_bytes=opts["total"], seed=args.seed, latency_iters=100 if quick else 1000,
                model_iters=2 if quick else 20, link_repeats=2 if quick else 5, timeout_s=args.timeout,
                owner_id=base, initiator_id=base + 1, paired=transport != "tcp", owner_cpus=opts.get("owner_cpus", ()),
                initiator_cpus=opts.get("initiator_cpus", ())))
            if name == TLS_SUITE:
                suites[-1] = _lighter_tls(suites[-1], tls, quick)
    auto = next((s for s in suites if s.name == "auto"), None)
    if auto is not None:  # what counting costs: the one-block pull with statistics on and off, back to back
        for label, value in (("on", "1"), ("off", "0")):
            suites.append(dataclasses.replace(
                auto, name=f"auto[stats {label}]", sizes=(), call_shapes=("16k",), link_repeats=1,
                env=(("LLM_DATADIST_STATS", value),), owner_id=auto.owner_id + 2, initiator_id=auto.owner_id + 3))
    return suites


def _lighter_tls(spec: SuiteSpec, tls: Optional[TlsFiles], quick: bool) -> SuiteSpec:
    """TLS moves bytes several times slower: the same blocks per pass (a fair ratio to tcp), fewer passes and calls."""
    return dataclasses.replace(spec, tls=tls, passes=min(spec.passes, TLS_MAX_PASSES),
                               warmup=min(spec.warmup, 1), latency_iters=min(spec.latency_iters, 200),
                               model_iters=min(spec.model_iters, 5),
                               call_shapes=("16k",) if quick else ("16k", "layers", "model"))


def _certificates(opts: Dict[str, Any], workdir: str) -> tuple:
    """(TLS files, None) for the tcp+tls suite, or (None, why it does not run / None when not asked for)."""
    if TLS_SUITE not in opts["transports"]:
        return None, None
    from llm_datadist_bench.tls import make_certificates

    return make_certificates(workdir)


def _ceiling(opts: Dict[str, Any], args: argparse.Namespace, progress: Progress, copier) -> List[Dict[str, Any]]:
    from llm_datadist_bench.ceiling import measure_memcpy, measure_raw_pvm

    def step() -> None:
        progress.update(1, note="memcpy ceiling")

    out = measure_memcpy(copier, opts["sizes"], opts["total"], opts["passes"], opts["warmup"], args.seed, step)
    if set(opts["transports"]) & {"auto", "process_vm", "shm"}:  # a same-host suite: its kernel ceiling too
        out += measure_raw_pvm(copier, opts["sizes"], opts["total"], opts["passes"], opts["warmup"], args.seed)
    return out


def _run_all(opts: Dict[str, Any], args: argparse.Namespace, suites: List[SuiteSpec], progress: Progress,
             workdir: str) -> List[Dict[str, Any]]:
    from llm_datadist_bench.ceiling import load_copier, measure_plan
    from llm_datadist_bench.peers import default_peer_python, find_peer_scripts, run_peers
    from llm_datadist_bench.runner import run_suite
    from llm_datadist_bench.raw_socket import best_raw_tcp, measure_raw_tcp

    records: List[Dict[str, Any]] = [measure_plan(seed=args.seed)]
    copier = load_copier()
    python = args.peer_python or default_peer_python()
    scripts = find_peer_scripts(args.peer_scripts)
    for round_no in range(1, args.rounds + 1):
        records += watched("memcpy ceiling", round_no, lambda: _ceiling(opts, args, progress, copier))
        streams = opts["streams"] if any(s.transport == "tcp" for s in suites) else 1
        records += watched("raw tcp socket", round_no, lambda: measure_raw_tcp(
            opts["sizes"], opts["total"], opts["passes"], opts["warmup"], args.seed,
            lambda: progress.update(1, note="raw tcp socket"), streams))  # noqa: B023 - called at once
        for spec in suites:
            records += [dict(r, round=round_no) if r.get("kind") == "cpu" else r for r in run_suite(spec, progress)]
        if opts["peers"]:
            records += watched("peers", round_no, lambda: run_peers(
                opts["peers"], python, scripts, workdir, opts["sizes"], opts["total"], opts["passes"], opts["warmup"],
                args.seed, opts["directions"], progress))
    if not args.quick:  # one more ceiling round after the transports: the machine drifts
        records += watched("memcpy ceiling", args.rounds + 1, lambda: _ceiling(opts, args, progress, copier))
    return best_raw_tcp(merge_samples(records))


def _write(out: str, records: List[Dict[str, Any]], meta: Dict[str, Any]) -> List[str]:
    from llm_datadist_bench.plot import plot
    from llm_datadist_bench.report import Results, markdown, write_jsonl

    os.makedirs(out, exist_ok=True)
    results = Results(records)
    title = f"llm-datadist bench, {meta['mode']} run, {meta['date']}"
    png = os.path.join(out, "bench.png")
    problem = plot(results, png, title)
    if problem:
        records.append(record("note", "plot", message=problem))
        results = Results(records)
    text = markdown(results, title, meta)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    write_jsonl(os.path.join(out, "results.jsonl"), [record("meta", "run", **meta)] + records)
    print(text)
    return [os.path.join(out, n) for n in ("results.md", "results.jsonl")] + ([] if problem else [png])


def _total_units(opts: Dict[str, Any], suites: List[SuiteSpec], args: argparse.Namespace) -> int:
    n_sizes = len(opts["sizes"])
    peers = len(opts["peers"]) * n_sizes * len(opts["directions"])
    per_round = 2 * n_sizes + sum(s.work_units() for s in suites) + peers
    return per_round * args.rounds + (0 if args.quick else n_sizes)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark; 0 when every suite of the library ran, 1 when one failed, 2 on bad options."""
    args = build_parser().parse_args(argv)
    if args.compare:
        from llm_datadist_bench.compare import compare_main

        return compare_main(args.compare[0], args.compare[1])
    try:
        opts = _options(args)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.hosts == "netns":
        from llm_datadist_bench.netns_run import run_netns

        return run_netns(args, opts)
    cuda_note = _cuda_note()
    placements = ["host/host"] + ([] if cuda_note else ["host/device", "device/device"])
    workdir = tempfile.mkdtemp(prefix="llmdd-bench-")
    tls, tls_note = _certificates(opts, workdir)
    suites = _suites(opts, args, placements, tls)
    meta = run_meta(args, opts)
    print(f"{PROG}: {meta['mode']}, sizes {','.join(meta['sizes'])}, {meta['total_mib']} MiB per pass, "
          f"{opts['passes']} passes (+{opts['warmup']} warm-up), suites {', '.join(s.name for s in suites)}"
          f"{', peers ' + ','.join(opts['peers']) if opts['peers'] else ''}", file=sys.stderr)
    progress = Progress(_total_units(opts, suites, args), label="bench", enabled=not args.no_progress)
    start = time.monotonic()
    try:
        records = _run_all(opts, args, suites, progress, workdir)
    except KeyboardInterrupt:
        progress.close()
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    progress.close()
    for mechanism, note in (("placements", cuda_note), (TLS_SUITE, tls_note)):
        if note:
            records.append(record("note", mechanism, message=note))
    meta.update(load_after=loadavg(), wall_s=round(time.monotonic() - start, 1))
    files = _write(args.out, records, meta)
    print(f"{PROG}: done in {format_duration(meta['wall_s'])}; wrote {', '.join(files)}", file=sys.stderr)
    ours = {s.name for s in suites}
    return 1 if any(r.get("kind") == "error" and r.get("mechanism") in ours for r in records) else 0
