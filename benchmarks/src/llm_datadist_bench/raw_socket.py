"""The TCP reference for ``bench``: raw loopback sockets (one stream, or N in parallel) moving the same blocks."""
from __future__ import annotations

import multiprocessing
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from llm_datadist_bench.common import Buffer, block_order, fill_pattern, gbps, record, verify_blocks

__all__ = ["best_raw_tcp", "measure_raw_tcp", "raw_tcp_client", "server_main", "VARIANTS"]

_REQ = struct.Struct("<QQQQ")  # block bytes, variant (0 = stop), part, parts: ops [part/parts, (part+1)/parts)
VARIANTS = {1: "batch", 2: "b1"}  # sendmsg/recvmsg_into scatter lists, or one send/recv per block
IOV_MAX = 1024
BATCH_BYTES = 64 << 20
SOCK_BUF_BYTES = 4 << 20
ONE, PARALLEL = "raw_tcp", "raw_tcp_n"  # mechanism families: one stream; N streams at once


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF_BYTES)
        except OSError:
            pass


def _block_views(buf: Buffer, block: int, blocks: np.ndarray) -> List[memoryview]:
    whole = buf.array.data
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


def _part(blocks: np.ndarray, part: int, parts: int) -> np.ndarray:
    bounds = np.linspace(0, len(blocks), parts + 1).astype(int)
    return blocks[bounds[part]:bounds[part + 1]]


def _serve(sock: socket.socket, buf: Buffer, total_bytes: int, seed: int, stop: Callable[[], None]) -> None:
    """One connection: send the requested part of the source blocks, per request, until EOF or stop."""
    views: Dict[Tuple[int, int, int], List[memoryview]] = {}
    try:
        _tune(sock)
        while True:
            head = sock.recv(_REQ.size, socket.MSG_WAITALL)
            if len(head) < _REQ.size:
                return  # the client closed this stream
            block, variant, part, parts = _REQ.unpack(head)
            if variant == 0:
                stop()
                return
            key = (block, part, parts)
            if key not in views:
                views.clear()
                src = _part(block_order(total_bytes // block, seed)[0], part, parts)
                views[key] = _block_views(buf, block, src)
            _send_all(sock, views[key], variant, block)
    except OSError:
        return  # the client went away mid-transfer; it reports the failure
    finally:
        sock.close()


def server_main(conn, total_bytes: int, seed: int, host: str = "127.0.0.1") -> None:
    """Child process: serve the source blocks in scattered order to every connection until one says stop.

    Listens on ``host`` (an ephemeral port, sent over ``conn``); one thread per connection.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(64)
    buf = Buffer(total_bytes)
    fill_pattern(buf.array, 0)
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept below
        except OSError:
            pass

    conn.send(listener.getsockname()[1])
    handlers: List[threading.Thread] = []
    try:
        while not stopped.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                break
            handler = threading.Thread(target=_serve, args=(sock, buf, total_bytes, seed, stop),
                                       name="bench-raw-tcp-serve", daemon=True)
            handler.start()
            handlers.append(handler)
    finally:
        listener.close()
        for handler in handlers:
            handler.join(10.0)


def _client_passes(sock: socket.socket, views: List[memoryview], block: int, variant: int, passes: int,
                   warmup: int, nbytes: int) -> List[float]:
    samples = []
    for i in range(warmup + passes):
        start = time.perf_counter()
        sock.sendall(_REQ.pack(block, variant, 0, 1))
        _recv_all(sock, views, variant, block)
        if i >= warmup:
            samples.append(gbps(nbytes, time.perf_counter() - start))
    return samples


def _parallel_passes(socks: List[socket.socket], parts: List[List[memoryview]], block: int, variant: int,
                     passes: int, warmup: int, nbytes: int, timeout_s: float) -> List[float]:
    """Every pass: each stream requests and receives its part at once (one thread per stream)."""
    n = len(socks)
    start, end = threading.Barrier(n + 1, timeout=timeout_s), threading.Barrier(n + 1, timeout=timeout_s)
    errors: List[BaseException] = []

    def stream(p: int) -> None:
        for _ in range(warmup + passes):
            try:
                start.wait()
            except threading.BrokenBarrierError:
                return
            try:
                socks[p].sendall(_REQ.pack(block, variant, p, n))
                _recv_all(socks[p], parts[p], variant, block)
            except BaseException as exc:  # noqa: BLE001 - reported by the measuring thread
                errors.append(exc)
            try:
                end.wait()
            except threading.BrokenBarrierError:
                return

    threads = [threading.Thread(target=stream, args=(p,), name=f"bench-raw-tcp-{p}", daemon=True) for p in range(n)]
    for thread in threads:
        thread.start()
    samples: List[float] = []
    try:
        for i in range(warmup + passes):
            begin = time.perf_counter()
            start.wait()
            end.wait()
            if errors:
                raise RuntimeError(f"raw tcp, {n} streams: {errors[0]}")
            if i >= warmup:
                samples.append(gbps(nbytes, time.perf_counter() - begin))
    finally:
        start.abort()
        end.abort()
        for thread in threads:
            thread.join(timeout_s)
    return samples


def measure_raw_tcp(sizes: Sequence[int], total_bytes: int, passes: int, warmup: int, seed: int,
                    on_step: Optional[Callable[[], None]] = None, streams: int = 1) -> List[Dict[str, Any]]:
    """Per size, both variants (``raw_tcp.batch``, ``raw_tcp.b1``), the server in a spawned process.

    With ``streams`` > 1 also the same blocks over that many connections at once (``raw_tcp_n.*``).
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=server_main, args=(child, total_bytes, seed), name="bench-raw-tcp", daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(60):
            raise RuntimeError("the raw TCP server did not start")
        return raw_tcp_client(("127.0.0.1", parent.recv()), sizes, total_bytes, passes, warmup, seed, on_step,
                              streams)
    finally:
        proc.join(5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)


def raw_tcp_client(address, sizes: Sequence[int], total_bytes: int, passes: int, warmup: int, seed: int,
                   on_step: Optional[Callable[[], None]] = None, streams: int = 1) -> List[Dict[str, Any]]:
    """The measuring side: pull every size from the server at ``address`` (host, port), then stop it.

    Args:
        address: (host, port) of :func:`server_main`.
        sizes, total_bytes, passes, warmup, seed: the workload (as the transfer suites).
        on_step: called after each size.
        streams: above 1, each size is also moved over this many connections at once.
    """
    out: List[Dict[str, Any]] = []
    dst = Buffer(total_bytes)
    socks: List[socket.socket] = []
    try:
        for _ in range(1 + (streams if streams > 1 else 0)):
            socks.append(socket.create_connection(tuple(address), timeout=120))
            _tune(socks[-1])
        for block in sizes:
            out.extend(_measure_size(socks[0], dst, block, total_bytes, passes, warmup, seed))
            if streams > 1:
                out.extend(_measure_parallel(socks[1:], dst, block, total_bytes, passes, warmup, seed))
            if on_step:
                on_step()
        socks[0].sendall(_REQ.pack(0, 0, 0, 1))
    finally:
        for sock in socks:
            sock.close()
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
        out.append(record("bandwidth", f"{ONE}.{label}", samples_gbps=samples, verified=True, streams=1, **common))
    return out


def _measure_parallel(socks: List[socket.socket], dst: Buffer, block: int, total_bytes: int, passes: int,
                      warmup: int, seed: int) -> List[Dict[str, Any]]:
    n = total_bytes // block
    s_blk, d_blk = block_order(n, seed)
    parts = [_block_views(dst, block, _part(d_blk, p, len(socks))) for p in range(len(socks))]
    common = dict(direction="pull", placement="host/host", block_bytes=block, total_bytes=n * block, passes=passes,
                  streams=len(socks))
    out = []
    for variant, label in VARIANTS.items():
        dst.array[:] = 0
        samples = _parallel_passes(socks, parts, block, variant, passes, warmup, n * block, 120.0)
        problem = verify_blocks(dst.array, block, s_blk, d_blk, 0)
        if problem:
            raise RuntimeError(f"raw tcp, {len(socks)} streams, {label} moved the wrong bytes: {problem}")
        out.append(record("bandwidth", f"{PARALLEL}.{label}", samples_gbps=samples, verified=True, **common))
    return out


def best_raw_tcp(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Add ``raw_tcp`` (and ``raw_tcp_n``) per size: the variant with the best median (rounds pooled first)."""
    best: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for rec in records:
        family, _, variant = rec.get("mechanism", "").partition(".")
        if rec.get("kind") == "bandwidth" and family in (ONE, PARALLEL) and variant:
            key = (family, rec["block_bytes"])
            if key not in best or rec["median_gbps"] > best[key]["median_gbps"]:
                best[key] = rec
    extra = [record("bandwidth", family, **{k: v for k, v in rec.items() if k not in ("kind", "mechanism")},
                    best_of=rec["mechanism"]) for (family, _size), rec in best.items()]
    return records + extra
