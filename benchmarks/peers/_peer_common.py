"""Shared harness of the peer drivers: arguments, the scattered block orders, buffers, a target process, JSON lines."""
from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional

import numpy as np


def parse_args(name: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=name, description=f"{name}: the bench's scattered-block suite")
    parser.add_argument("--orders", required=True, help="npz with src_<block>/dst_<block> block orders")
    parser.add_argument("--sizes", required=True, help="comma-separated block sizes in bytes")
    parser.add_argument("--total-bytes", type=int, required=True, help="bytes moved per pass")
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--directions", default="pull,push")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole driver")
    parser.add_argument("--role", choices=("both", "target", "initiator"), default="both",
                        help="both (default): spawn the target here; target or initiator: this side only, talking "
                             "to the other over the inherited socket --conn-fd (the two sides on different hosts)")
    parser.add_argument("--conn-fd", type=int, help="with --role target/initiator: the socket to the other side")
    return parser.parse_args()


def emit(rec: Dict[str, Any]) -> None:
    """One JSON record on stdout (the bench reads these)."""
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


def bandwidth(mechanism: str, direction: str, block: int, nbytes: int, samples: List[float], **extra: Any) -> None:
    emit(dict(kind="bandwidth", mechanism=mechanism, direction=direction, placement="host/host", block_bytes=block,
              total_bytes=nbytes, passes=len(samples), samples_gbps=samples, **extra))


class Buffer:
    """Page-aligned anonymous memory with transparent huge pages advised (as the bench's own buffers)."""

    def __init__(self, nbytes: int) -> None:
        self._mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shmem: THP works
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            try:
                self._mm.madvise(advice)
            except OSError:
                pass
        self.array = np.frombuffer(self._mm, dtype=np.uint8)
        self.array.fill(0)
        self.addr = int(self.array.ctypes.data)


def fill(array: np.ndarray, salt: int) -> None:
    words = array.view(np.uint64)
    words[:] = np.arange(words.shape[0], dtype=np.uint64)
    words += np.uint64(salt)


def verify(array: np.ndarray, block: int, src: np.ndarray, dst: np.ndarray, salt: int) -> Optional[str]:
    """Destination block dst[i] must hold source block src[i] (a sample of ops); None when right."""
    words = array.view(np.uint64).reshape(-1, block // 8)
    per = block // 8
    for i in sorted({0, len(src) // 2, len(src) - 1}):
        want = np.arange(int(src[i]) * per, (int(src[i]) + 1) * per, dtype=np.uint64) + np.uint64(salt)
        if not np.array_equal(words[int(dst[i])], want):
            return f"op {i}: block {int(dst[i])} does not hold source block {int(src[i])}"
    return None


def load_orders(path: str, sizes: List[int]) -> Dict[int, tuple]:
    data = np.load(path)
    return {block: (data[f"src_{block}"], data[f"dst_{block}"]) for block in sizes}


def timed(move: Callable[[], None], passes: int, warmup: int, nbytes: int) -> List[float]:
    for _ in range(warmup):
        move()
    samples = []
    for _ in range(passes):
        start = time.perf_counter()
        move()
        samples.append(nbytes / (time.perf_counter() - start) / 1e9)
    return samples


def target_loop(conn, buf: Buffer) -> None:
    """Serve the initiator's requests on the target's buffer until "stop"."""
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] == "fill":
            fill(buf.array, msg[1])
            conn.send(("ok",))
        elif msg[0] == "verify":
            _, block, src, dst, salt = msg
            conn.send(("ok", verify(buf.array, block, np.asarray(src), np.asarray(dst), salt)))


def run(name: str, target_main: Callable, initiator: Callable) -> int:
    """Spawn the target, run the initiator here; every failure becomes one ``error`` record and exit 1.

    With ``--role target`` this process is the target only; with ``--role initiator`` the initiator only,
    the target being another process (on another host) at the end of ``--conn-fd``.
    """
    args = parse_args(name)
    proc = None
    if args.role == "target":
        target_main(Connection(args.conn_fd), args.total_bytes)
        return 0
    if args.role == "initiator":
        mine = Connection(args.conn_fd)
    else:
        ctx = multiprocessing.get_context("spawn")
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=target_main, args=(theirs, args.total_bytes), daemon=True)
        proc.start()
        theirs.close()
    code = 0
    try:
        if not mine.poll(60):
            raise RuntimeError(f"the {name} target did not start")
        ready = mine.recv()
        if ready[0] != "ready":
            raise RuntimeError(f"the {name} target failed: {ready[1]}")
        sizes = [int(s) for s in args.sizes.split(",") if s]
        initiator(args, ready, mine, load_orders(args.orders, sizes), sizes)
    except BaseException as exc:  # noqa: BLE001 - reported as a record
        emit({"kind": "error", "mechanism": name, "message": f"{type(exc).__name__}: {exc}",
              "detail": traceback.format_exc()})
        code = 1
    finally:
        try:
            mine.send(("stop",))
        except (OSError, ValueError):
            pass
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
    return code


def target_guard(conn, body: Callable[[], None]) -> None:
    """Run a target body, telling the initiator about a failure before it happens to wait."""
    try:
        body()
    except BaseException as exc:  # noqa: BLE001
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except (OSError, ValueError):
            pass
        raise
