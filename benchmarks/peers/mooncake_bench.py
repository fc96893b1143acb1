"""Mooncake Transfer Engine (tcp) on the bench's scattered blocks: sync batch reads (pull) and writes (push)."""
# Run from the peers' own environment (benchmarks/peers/setup_peers.sh), never the project's:
#     .venv-peers/bin/python benchmarks/peers/mooncake_bench.py --orders ORDERS.npz --sizes 16384,... --total-bytes N
# Configuration: TransferEngine().initialize(host, "P2PHANDSHAKE", "tcp", ""), one
# batch_transfer_sync_read/write per pass, MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER raised to 32768 (the largest value
# it accepts) so that a whole batch queues. The wheel needs Debian's libibverbs1 to import.
from __future__ import annotations

import os
import sys

os.environ.setdefault("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "32768")
os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
os.environ.setdefault("GLOG_minloglevel", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _peer_common as common  # noqa: E402

NAME = "mooncake"
HOST = os.environ.get("BENCH_PEER_HOST", "127.0.0.1")  # this host's address (another one on simulated hosts)


def _engine():
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    rc = engine.initialize(HOST, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"TransferEngine.initialize failed: {rc}")
    return engine


def _register(engine, buf: common.Buffer) -> None:
    rc = engine.register_memory(buf.addr, buf.array.nbytes)
    if rc != 0:
        raise RuntimeError(f"register_memory failed: {rc}")


def target_main(conn, total_bytes: int) -> None:
    def body() -> None:
        engine = _engine()
        buf = common.Buffer(total_bytes)
        common.fill(buf.array, 0)
        _register(engine, buf)
        conn.send(("ready", f"{HOST}:{engine.get_rpc_port()}", buf.addr))
        common.target_loop(conn, buf)

    common.target_guard(conn, body)


def _addrs(base: int, blocks: np.ndarray, block: int) -> list:
    return (np.uint64(base) + blocks.astype(np.uint64) * np.uint64(block)).tolist()


def _move(fn, session: str, local: list, remote: list, lengths: list) -> None:
    rc = fn(session, local, remote, lengths)
    if rc != 0:
        raise RuntimeError(f"mooncake batch transfer failed: {rc}")


def initiator(args, ready, conn, orders, sizes) -> None:
    engine = _engine()
    buf = common.Buffer(args.total_bytes)
    _register(engine, buf)
    session, remote_base = ready[1], int(ready[2])
    for block in sizes:
        src, dst = orders[block]
        nbytes = len(src) * block
        lengths = [block] * len(src)
        for direction in args.directions.split(","):
            if direction == "pull":
                buf.array[:] = 0
                local, remote = _addrs(buf.addr, dst, block), _addrs(remote_base, src, block)
                samples = common.timed(lambda: _move(engine.batch_transfer_sync_read, session, local, remote, lengths),
                                       args.passes, args.warmup, nbytes)
                problem = common.verify(buf.array, block, src, dst, 0)
            else:
                common.fill(buf.array, 1 << 40)
                local, remote = _addrs(buf.addr, src, block), _addrs(remote_base, dst, block)
                samples = common.timed(lambda: _move(engine.batch_transfer_sync_write, session, local, remote,
                                                     lengths), args.passes, args.warmup, nbytes)
                conn.send(("verify", block, src.tolist(), dst.tolist(), 1 << 40))
                problem = conn.recv()[1]
                conn.send(("fill", 0))
                conn.recv()
            if problem:
                raise RuntimeError(f"{direction} at {block} B moved the wrong bytes: {problem}")
            common.bandwidth(NAME, direction, block, nbytes, samples, config="tcp, P2PHANDSHAKE, sync batch",
                             version="0.3.13.post1", verified=True)


if __name__ == "__main__":
    sys.exit(common.run(NAME, target_main, initiator))
