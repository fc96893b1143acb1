"""What every bench run records about itself (machine, library state, load) and the CPU watch around a step.

Shared by the local run (``cli``) and the simulated-hosts runs (``netns_run``, ``netns_scale``), so that those
import it instead of each other.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
from typing import Any, Callable, Dict, Iterable, List

import numpy as np

from llm_datadist_bench.common import MIB, CpuWatch, format_size, record

__all__ = ["library_state", "loadavg", "run_meta", "watched"]


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def library_state() -> str:
    """The checkout's commit and whether library or bench files differ from it (the numbers belong to that
    state)."""
    import llm_datadist

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(llm_datadist.__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "src/llm_datadist",
                                "benchmarks/src"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if head.returncode != 0:
        return "installed package (not a git checkout)"
    changed = len([line for line in dirty.stdout.splitlines() if line.strip()])
    return f"git {head.stdout.strip()}" + (f" + {changed} uncommitted library files" if changed else "")


def run_meta(args: argparse.Namespace, opts: Dict[str, Any]) -> Dict[str, Any]:
    """The ``meta`` record of a run: when, where, with what, and the workload's settings."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                host=f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs", cpu=cpu,
                python=platform.python_version(), numpy=np.__version__, total_mib=opts["total"] // MIB,
                passes=opts["passes"], warmup=opts["warmup"], rounds=args.rounds,
                mode="quick" if args.quick else "full",
                sizes=[format_size(s) for s in opts["sizes"]], transports=opts["transports"],
                directions=list(opts["directions"]), library=library_state(), load_before=loadavg(),
                tcp_streams=opts.get("streams", 1), owner_cpus=list(opts.get("owner_cpus", ())),
                initiator_cpus=list(opts.get("initiator_cpus", ())))


def watched(step: str, round_no: int, fn: Callable[[], Iterable[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Run one step and append how busy the machine was meanwhile (ours and everything else)."""
    watch = CpuWatch()
    out = fn()
    return list(out) + [record("cpu", step, round=round_no, **watch.stop())]
