"""Peers side by side: run the NIXL and Mooncake driver scripts with another interpreter and merge their records."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from llm_datadist_bench.common import block_order, record

__all__ = ["PEERS", "default_peer_python", "find_peer_scripts", "run_peers", "write_orders"]

PEERS = {"nixl": ("nixl_bench.py", "nixl._api"), "mooncake": ("mooncake_bench.py", "mooncake.engine")}
# an editable install (pip install -e ./benchmarks) runs from the checkout: benchmarks/src/llm_datadist_bench
_BENCHMARKS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_REPO = os.path.dirname(_BENCHMARKS)


def find_peer_scripts(explicit: Optional[str] = None) -> Optional[str]:
    """The folder with the peer drivers: ``explicit``, ./benchmarks/peers, or the source checkout's."""
    for folder in (explicit, os.path.join(os.getcwd(), "benchmarks", "peers"), os.path.join(_BENCHMARKS, "peers")):
        if folder and os.path.isfile(os.path.join(folder, "_peer_common.py")):
            return folder
    return None


def default_peer_python() -> str:
    """./.venv-peers/bin/python, the checkout's .venv-peers, or this interpreter."""
    for root in (os.getcwd(), _REPO):
        candidate = os.path.join(root, ".venv-peers", "bin", "python")
        if os.path.exists(candidate):
            return candidate
    return sys.executable


def write_orders(path: str, sizes: Sequence[int], total_bytes: int, seed: int) -> None:
    """The scattered block orders of every size, for the drivers (the very same blocks as ours)."""
    arrays: Dict[str, np.ndarray] = {}
    for block in sizes:
        src, dst = block_order(total_bytes // block, seed)
        arrays[f"src_{block}"], arrays[f"dst_{block}"] = src, dst
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stubs match **kwargs against allow_pickle too


def _importable(python: str, module: str) -> Optional[str]:
    """None when ``module`` imports in ``python``, else the reason."""
    env = dict(os.environ, UCX_MODULES=os.environ.get("UCX_MODULES", "cma"), NIXL_LOG_LEVEL="WARN")
    try:
        proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=120,
                              env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run {python}: {exc}"
    if proc.returncode != 0:
        lines = (proc.stderr or "").strip().splitlines()
        return f"{module} does not import in {python}: {lines[-1] if lines else 'exit ' + str(proc.returncode)}"
    return None


def _read_lines(proc: subprocess.Popen, records: List[Dict[str, Any]], progress, name: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if not line.startswith("{"):
            continue  # the engines' own log lines
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "bandwidth":
            rec = record("bandwidth", rec.pop("mechanism"), **{k: v for k, v in rec.items() if k != "kind"})
            rec["suite"] = name
            progress.update(1, note=f"{name} {rec['direction']} {rec['block_bytes'] // 1024}K "
                                    f"{rec['median_gbps']:.2f} GB/s")
        records.append(rec)


def _run_one(name: str, python: str, script: str, orders: str, sizes: Sequence[int], total_bytes: int,
             passes: int, warmup: int, directions: Sequence[str], timeout_s: float, progress) -> List[Dict[str, Any]]:
    cmd = [python, script, "--orders", orders, "--sizes", ",".join(str(s) for s in sizes), "--total-bytes",
           str(total_bytes), "--passes", str(passes), "--warmup", str(warmup), "--directions", ",".join(directions)]
    records: List[Dict[str, Any]] = []
    stderr_path = orders + f".{name}.stderr"
    with open(stderr_path, "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        reader = threading.Thread(target=_read_lines, args=(proc, records, progress, name), daemon=True)
        reader.start()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            records.append(record("error", name, message=f"{name} driver timed out after {timeout_s:.0f} s"))
        reader.join(10)
        err.seek(0)
        tail = err.read()[-2000:]
    if proc.returncode not in (0, None) and not any(r.get("kind") == "error" for r in records):
        records.append(record("error", name, message=f"{name} driver exited {proc.returncode}", detail=tail))
    return records


def run_peers(names: Sequence[str], python: str, scripts: Optional[str], workdir: str, sizes: Sequence[int],
              total_bytes: int, passes: int, warmup: int, seed: int, directions: Sequence[str],
              progress) -> List[Dict[str, Any]]:
    """Records of every requested peer, or an ``error`` record saying why a peer is missing."""
    out: List[Dict[str, Any]] = []
    if scripts is None:
        return [record("error", name, message="peer driver scripts (benchmarks/peers) not found; run from a source "
                                              "checkout or pass --peer-scripts") for name in names]
    orders = os.path.join(workdir, "orders.npz")
    write_orders(orders, sizes, total_bytes, seed)
    for name in names:
        script, module = PEERS[name]
        missing = _importable(python, module)
        if missing:
            out.append(record("error", name, message=f"{name} not available: {missing} (install it with "
                                                     f"benchmarks/peers/setup_peers.sh)"))
            progress.update(len(sizes) * len(directions), note=f"{name} missing")
            continue
        start = time.monotonic()
        timeout_s = 120.0 + len(sizes) * len(directions) * (passes + warmup) * 5.0
        recs = _run_one(name, python, os.path.join(scripts, script), orders, sizes, total_bytes, passes, warmup,
                        directions, timeout_s, progress)
        for rec in recs:
            rec.setdefault("peer_python", python)
        out.extend(recs)
        out.append(record("meta", name, wall_s=time.monotonic() - start, peer_python=python))
    return out
