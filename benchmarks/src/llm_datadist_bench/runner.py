"""Runs one ``bench`` suite: spawns the owner and the initiator, follows progress, collects records or the error."""
from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any, Callable, Dict, List, Optional

from llm_datadist_bench.common import CpuWatch, SuiteSpec, record
from llm_datadist_bench.initiator import initiator_main
from llm_datadist_bench.worker import BenchError, owner_main
from llm_datadist.cli.ipc import child_messages

__all__ = ["collect_children", "run_suite", "stop_children"]


def _start(spec: SuiteSpec):
    ctx = multiprocessing.get_context("spawn")
    owner_peer, init_peer = ctx.Pipe()
    owner_parent, owner_child = ctx.Pipe(duplex=False)
    init_parent, init_child = ctx.Pipe(duplex=False)
    procs = {
        "owner": ctx.Process(target=owner_main, args=(spec, owner_peer, owner_child), name=f"bench-owner-{spec.name}"),
        "initiator": ctx.Process(target=initiator_main, args=(spec, init_peer, init_child),
                                 name=f"bench-initiator-{spec.name}"),
    }
    saved = {name: os.environ.get(name) for name, _ in spec.env}
    os.environ.update(dict(spec.env))  # a spawned child starts with the parent's environment at start()
    try:
        for proc in procs.values():
            proc.daemon = True
            proc.start()
    except BaseException:
        stop_children(procs, grace=0.0)
        raise
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    for conn in (owner_peer, init_peer, owner_child, init_child):
        conn.close()
    return procs, {"owner": owner_parent, "initiator": init_parent}


def stop_children(procs: Dict[str, Any], grace: float) -> None:
    """Wait up to ``grace`` seconds for the processes to end, then terminate, then kill what is left."""
    end = time.monotonic() + grace
    for proc in procs.values():
        if proc.pid is not None:
            proc.join(max(0.0, end - time.monotonic()))
    for proc in procs.values():
        if proc.pid is not None and proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.pid is not None and proc.is_alive():
            proc.kill()
            proc.join(2.0)


def collect_children(procs, conns, records: List[Dict[str, Any]], progress, limit: float) -> Optional[str]:
    """Read records and progress from every child until each says done (at most ``limit`` seconds).

    Returns an error text (a child failed, went away or took too long) or None.
    """
    done: set = set()
    try:
        for role, msg in child_messages(conns, procs, time.monotonic() + limit, done, BenchError,
                                        lambda: f"timed out after {limit:.0f} s"):
            if msg[0] == "error":
                return f"{role}: {msg[1]}"
            if msg[0] == "record":
                records.append(msg[1])
            elif msg[0] == "progress":
                progress.update(msg[1], note=msg[2])
            elif msg[0] == "done":
                done.add(role)
    except BenchError as exc:
        return str(exc)
    return None


def run_suite(spec: SuiteSpec, progress, start: Optional[Callable] = None) -> List[Dict[str, Any]]:
    """All records of one suite; a failure becomes an ``error`` record (the other suites still run).

    ``start(spec) -> (processes, connections)`` starts the owner and the initiator (default: two local
    processes; the simulated-hosts bench starts them on two hosts).
    """
    records: List[Dict[str, Any]] = []
    watch = CpuWatch()
    procs, conns = (start or _start)(spec)
    try:
        error = collect_children(procs, conns, records, progress, spec.timeout_s * 4 + 60.0)
    except KeyboardInterrupt:
        stop_children(procs, grace=0.0)
        raise
    stop_children(procs, grace=10.0 if error is None else 1.0)
    for conn in conns.values():
        conn.close()
    records.append(record("cpu", spec.name, placement=spec.placement, **watch.stop()))
    if error is not None:
        first = error.strip().splitlines()[0] if error.strip() else error
        records.append(record("error", spec.name, placement=spec.placement, transport=spec.transport or "auto",
                              message=first, detail=error))
        got = sum(1 for r in records if r.get("kind") == "bandwidth")
        progress.update(max(0, spec.work_units() - got - 1), note=f"{spec.name} failed")
    return records
