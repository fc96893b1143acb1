"""What ``llm-datadist doctor`` and the benchmark (the separate ``llm-datadist-bench`` distribution) ask the
engine and the transports about this machine. Nothing here takes part in moving bytes.

The facade reaches this module only as ``llm_datadist._engine.api.diagnostics`` (the facade imports no other
engine module); the benchmark, another distribution, imports it directly. Every import of the transports or the
engine's internals happens inside the function that needs it, so importing this module costs nothing.
"""
from __future__ import annotations

import os
from typing import List, Tuple

__all__ = ["transport_report", "tcp_streams_per_transfer", "cross_host_choice", "process_vm_status",
           "read_process_memory", "memory_kinds", "plan_blocks_timing"]


def transport_report() -> List[Tuple[str, str]]:
    """(transport name, why it is unavailable here or "") for every transport this build has."""
    from llm_datadist._transport import transport_report as report

    return report()


def tcp_streams_per_transfer(same_machine: bool = False) -> int:
    """How many data connections the tcp transport opens for one large transfer (to a peer on this machine,
    or on another host)."""
    from llm_datadist._transport import tcp

    return tcp.streams_per_transfer(same_machine)


def cross_host_choice() -> str:
    """How auto mode moves bytes between hosts here (nixl or tcp) and why, UCX settings included."""
    from llm_datadist._transport import nixl_env, unavailable_reason

    reason = unavailable_reason("nixl")
    if reason:
        return f"tcp (nixl: {reason})"
    ucx = {k: v for k, v in nixl_env.ucx_defaults().items() if k != "UCX_LOG_LEVEL"}
    ucx.update({k: v for k, v in os.environ.items() if k in ("UCX_TLS", "UCX_MODULES", "UCX_NET_DEVICES")})
    settings = ", ".join(f"{k}={v}" for k, v in sorted(ucx.items())) or "UCX picks its transports"
    preferred = nixl_env.preferred_reason()
    why = preferred or nixl_env.NOT_PREFERRED
    return f"{'nixl' if preferred else 'tcp'} ({why}; nixl runs with {settings})"


def process_vm_status() -> Tuple[bool, int]:
    """(process_vm_readv works on our own process, threads large copies are split across)."""
    from llm_datadist._transport import parallel, pvm

    return pvm.self_permitted(), parallel.COPY_THREADS


def read_process_memory(pid: int, addr: int, nbytes: int) -> bytes:
    """``nbytes`` at ``addr`` of process ``pid`` with process_vm_readv (doctor's probe of a sibling process)."""
    from llm_datadist._transport import pvm

    return pvm.peek(pid, addr, nbytes)


def memory_kinds() -> List[str]:
    """The memory kinds this build has a backend for (``host`` always; ``cuda`` once registered)."""
    from llm_datadist._engine import memory

    return [memory.HOST] + sorted(memory.device_backends())


def plan_blocks_timing(num_tensors: int, pool_blocks: int, picked: int, block_bytes: int, iters: int,
                       seed: int = 0) -> Tuple[int, List[float]]:
    """Plan a ``picked``-block pull over ``num_tensors`` tensors ``iters`` times (scattered block ids, two fake
    caches); returns (ops in the plan, seconds per planning). The bench's planning row."""
    import time

    import numpy as np

    from llm_datadist._engine import planner
    from llm_datadist._engine.types import LayerSel

    src = planner.Side(tuple((1 << 32) + t * pool_blocks * block_bytes for t in range(num_tensors)), block_bytes,
                       pool_blocks, True)
    dst = planner.Side(tuple((1 << 40) + t * pool_blocks * block_bytes for t in range(num_tensors)), block_bytes,
                       pool_blocks, True)
    rng = np.random.default_rng(seed)
    s_blk = rng.choice(pool_blocks, picked, replace=False).tolist()
    d_blk = rng.choice(pool_blocks, picked, replace=False).tolist()
    layers = LayerSel()
    ops = 0
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        src_t, dst_t = planner.tensor_pairs(num_tensors, num_tensors, layers, num_tensors)
        plan = planner.oriented(planner.blocks_ops(src, src_t, s_blk, dst, dst_t, d_blk), src, dst, True)
        times.append(time.perf_counter() - start)
        ops = len(plan)
    return ops, times
