"""NIXL (UCX backend) on the bench's scattered blocks: READ for pull, WRITE for push, through NIXL's Python API."""
# Run from the peers' own environment (benchmarks/peers/setup_peers.sh), never the project's:
#     .venv-peers/bin/python benchmarks/peers/nixl_bench.py --orders ORDERS.npz --sizes 16384,... --total-bytes N
# Configuration: UCX_MODULES=cma (UCX picks CMA = process_vm_readv; without it NIXL
# segfaults at exit once libibverbs1 is installed) and the initiator's progress thread off ("noprog", NIXL's best
# configuration on this machine kind; the target keeps its progress thread, which UCX wire-up needs). Each pass is
# initialize_xfer + transfer + poll of one batch.
from __future__ import annotations

import os
import sys

os.environ.setdefault("UCX_MODULES", "cma")
os.environ.setdefault("UCX_LOG_LEVEL", "error")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _peer_common as common  # noqa: E402

NAME = "nixl"
TARGET, INITIATOR = "bench-target", "bench-initiator"


def _agent(name: str, progress_thread: bool):
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"]))


def _register(agent, buf: common.Buffer) -> None:
    agent.register_memory(np.array([[buf.addr, buf.array.nbytes, 0]], dtype=np.uint64), "DRAM")


def target_main(conn, total_bytes: int) -> None:
    def body() -> None:
        agent = _agent(TARGET, progress_thread=True)
        buf = common.Buffer(total_bytes)
        common.fill(buf.array, 0)
        _register(agent, buf)
        conn.send(("ready", agent.get_agent_metadata(), buf.addr))
        common.target_loop(conn, buf)

    common.target_guard(conn, body)


def _descs(agent, base: int, blocks: np.ndarray, block: int):
    arr = np.zeros((len(blocks), 3), dtype=np.uint64)
    arr[:, 0] = np.uint64(base) + blocks.astype(np.uint64) * np.uint64(block)
    arr[:, 1] = block
    return agent.get_xfer_descs(arr, "DRAM")


def _move(agent, op: str, local, remote) -> None:
    handle = agent.initialize_xfer(op, local, remote, TARGET)
    state = agent.transfer(handle)
    while state == "PROC":
        state = agent.check_xfer_state(handle)
    agent.release_xfer_handle(handle)
    if state != "DONE":
        raise RuntimeError(f"NIXL {op} ended in state {state}")


def initiator(args, ready, conn, orders, sizes) -> None:
    import nixl

    agent = _agent(INITIATOR, progress_thread=False)
    buf = common.Buffer(args.total_bytes)
    _register(agent, buf)
    remote_name = agent.add_remote_agent(ready[1])
    if isinstance(remote_name, bytes):
        remote_name = remote_name.decode()
    if remote_name != TARGET:
        raise RuntimeError(f"unexpected remote agent name {remote_name!r}")
    remote_base = int(ready[2])
    version = getattr(nixl, "__version__", "1.5.1")
    for block in sizes:
        src, dst = orders[block]
        nbytes = len(src) * block
        for direction in args.directions.split(","):
            if direction == "pull":
                buf.array[:] = 0
                local, remote = _descs(agent, buf.addr, dst, block), _descs(agent, remote_base, src, block)
                samples = common.timed(lambda: _move(agent, "READ", local, remote), args.passes, args.warmup, nbytes)
                problem = common.verify(buf.array, block, src, dst, 0)
            else:
                common.fill(buf.array, 1 << 40)
                local, remote = _descs(agent, buf.addr, src, block), _descs(agent, remote_base, dst, block)
                samples = common.timed(lambda: _move(agent, "WRITE", local, remote), args.passes, args.warmup, nbytes)
                conn.send(("verify", block, src.tolist(), dst.tolist(), 1 << 40))
                problem = conn.recv()[1]
                conn.send(("fill", 0))
                conn.recv()
            if problem:
                raise RuntimeError(f"{direction} at {block} B moved the wrong bytes: {problem}")
            common.bandwidth(NAME, direction, block, nbytes, samples, verified=True, version=str(version),
                             config="UCX cma, noprog, initialize_xfer per pass")
    agent.remove_remote_agent(TARGET)


if __name__ == "__main__":
    sys.exit(common.run(NAME, target_main, initiator))
