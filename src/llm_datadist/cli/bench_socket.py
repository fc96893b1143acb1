"""The TCP reference for ``bench``: a raw loopback socket between two processes moving the same scattered blocks."""
from __future__ import annotations

import multiprocessing
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from llm_datadist.cli.bench_common import Buffer, block_order, fill_pattern, gbps, record, verify_blocks

__all__ = ["best_raw_tcp", "measure_raw_tcp", "raw_tcp_client", "server_main", "VARIANTS"]

_REQ = struct.Struct("<QQ")  # block bytes, variant (0 = stop)
VARIANTS = {1: "batch", 2: "b1"}  # sendmsg/recvmsg_into scatter lists, or one send/recv per block
IOV_MAX = 1024
BATCH_BYTES = 64 << 20
SOCK_BUF_BYTES = 4 << 20


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF_BYTES)
        except OSError:
            pass


def _block_views(buf: Buffer, block: int, blocks: np.ndarray) -> List[memoryview]:
    whole = memoryview(buf.array)
    return [whole[b * block:(b + 1) * block] for b in blocks.tolist()]


def _chunks(views: List[memoryview], block: int) -> List[List[memoryview]]:
    per = max(1, min(IOV_MAX, BATCH_BYTES // block))
    return [views[i:i + per] for i in range(0, len(views), per)]


def _send_all(sock: socket.socket, views: List[memoryview], variant: int, block: int) -> None:
    if variant == 2:
        for view in views:
            sock.sendall(view)
        return
    for chunk in _chunks(views, block):
        sent = sock.sendmsg(chunk)
        total = len(chunk) * block
        if sent < total:  # a blocking sendmsg rarely stops early; finish the rest
            rest = b"".join(bytes(v) for v in chunk)[sent:]
            sock.sendall(rest)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _recv_all(sock: socket.socket, views: List[memoryview], variant: int, block: int) -> None:
    if variant == 2:
        for view in views:
            _recv_exact(sock, view)
        return
    for chunk in _chunks(views, block):
        got = sock.recvmsg_into(chunk, 0, socket.MSG_WAITALL)[0]
        total = len(chunk) * block
        while got < total:  # finish a short read block by block
            i, off = divmod(got, block)
            _recv_exact(sock, chunk[i][off:])
            got = (i + 1) * block
            for view in chunk[i + 1:]:
                _recv_exact(sock, view)
                got += block


def server_main(conn, total_bytes: int, seed: int, host: str = "127.0.0.1") -> None:
    """Child process: serve the source blocks in scattered order to one client until told to stop.

    Listens on ``host`` (an ephemeral port, sent over ``conn``).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(1)
    buf = Buffer(total_bytes)
    fill_pattern(buf.array, 0)
    conn.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    _tune(sock)
    views_by_block: Dict[int, List[memoryview]] = {}
    try:
        while True:
            block, variant = _REQ.unpack(sock.recv(_REQ.size, socket.MSG_WAITALL))
            if variant == 0:
                break
            if block not in views_by_block:
                views_by_block.clear()
                views_by_block[block] = _block_views(buf, block, block_order(total_bytes // block, seed)[0])
            _send_all(sock, views_by_block[block], variant, block)
    finally:
        sock.close()
        listener.close()


def _client_passes(sock: socket.socket, views: List[memoryview], block: int, variant: int, passes: int,
                   warmup: int, nbytes: int) -> List[float]:
    samples = []
    for i in range(warmup + passes):
        start = time.perf_counter()
        sock.sendall(_REQ.pack(block, variant))
        _recv_all(sock, views, variant, block)
        if i >= warmup:
            samples.append(gbps(nbytes, time.perf_counter() - start))
    return samples


def measure_raw_tcp(sizes: Sequence[int], total_bytes: int, passes: int, warmup: int, seed: int,
                    on_step: Optional[Callable[[], None]] = None) -> List[Dict[str, Any]]:
    """Per size, both variants (``raw_tcp.batch``, ``raw_tcp.b1``), the server in a spawned process."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=server_main, args=(child, total_bytes, seed), name="bench-raw-tcp", daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(60):
            raise RuntimeError("the raw TCP server did not start")
        return raw_tcp_client(("127.0.0.1", parent.recv()), sizes, total_bytes, passes, warmup, seed, on_step)
    finally:
        proc.join(5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)


def raw_tcp_client(address, sizes: Sequence[int], total_bytes: int, passes: int, warmup: int, seed: int,
                   on_step: Optional[Callable[[], None]] = None) -> List[Dict[str, Any]]:
    """The measuring side: pull every size from the server at ``address`` (host, port), then stop it."""
    out: List[Dict[str, Any]] = []
    dst = Buffer(total_bytes)
    try:
        sock = socket.create_connection(tuple(address), timeout=120)
        _tune(sock)
        for block in sizes:
            out.extend(_measure_size(sock, dst, block, total_bytes, passes, warmup, seed))
            if on_step:
                on_step()
        sock.sendall(_REQ.pack(0, 0))
        sock.close()
    finally:
        dst.close()
    return out


def _measure_size(sock: socket.socket, dst: Buffer, block: int, total_bytes: int, passes: int, warmup: int,
                  seed: int) -> List[Dict[str, Any]]:
    n = total_bytes // block
    s_blk, d_blk = block_order(n, seed)
    views = _block_views(dst, block, d_blk)
    common = dict(direction="pull", placement="host/host", block_bytes=block, total_bytes=n * block, passes=passes)
    out = []
    for variant, label in VARIANTS.items():
        dst.array[:] = 0
        samples = _client_passes(sock, views, block, variant, passes, warmup, n * block)
        problem = verify_blocks(dst.array, block, s_blk, d_blk, 0)
        if problem:
            raise RuntimeError(f"raw tcp {label} moved the wrong bytes: {problem}")
        out.append(record("bandwidth", f"raw_tcp.{label}", samples_gbps=samples, verified=True, **common))
    return out


def best_raw_tcp(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Add ``raw_tcp`` per size: the variant with the best median (after the rounds are pooled)."""
    best: Dict[int, Dict[str, Any]] = {}
    for rec in records:
        if rec.get("kind") == "bandwidth" and rec["mechanism"].startswith("raw_tcp."):
            size = rec["block_bytes"]
            if size not in best or rec["median_gbps"] > best[size]["median_gbps"]:
                best[size] = rec
    extra = [record("bandwidth", "raw_tcp", **{k: v for k, v in rec.items() if k not in ("kind", "mechanism")},
                    best_of=rec["mechanism"]) for rec in best.values()]
    return records + extra
