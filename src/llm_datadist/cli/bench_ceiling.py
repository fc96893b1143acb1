"""The machine's ceiling for ``bench``: memcpy of the same scattered blocks (C loop, 1 and 2 threads), plan cost."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from llm_datadist.cli.bench_common import Buffer, block_order, fill_pattern, gbps, record, verify_blocks

__all__ = ["Copier", "TwoThreads", "load_copier", "measure_memcpy", "measure_plan", "split_ops"]

_C_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>
void copy_ops(const uint64_t *dst, const uint64_t *src, const uint64_t *sizes, size_t n) {
    for (size_t i = 0; i < n; i++)
        memcpy((void *)(uintptr_t)dst[i], (const void *)(uintptr_t)src[i], (size_t)sizes[i]);
}
"""


class Copier:
    """Copies ``sizes[i]`` bytes from ``src[i]`` to ``dst[i]``: a C loop of memcpy, or a numpy fallback."""

    def __init__(self, fn: Optional[Callable[..., None]], note: str) -> None:
        self._fn = fn
        self.native = fn is not None
        self.name = "memcpy.c" if fn is not None else "memcpy.np"
        self.note = note

    def copy(self, dst: np.ndarray, src: np.ndarray, sizes: np.ndarray) -> None:
        """One pass over the ops (uint64 arrays). ctypes releases the GIL for the C loop."""
        if self._fn is None:
            raise RuntimeError("no native copy loop; use copy_fancy")
        self._fn(dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, int(sizes.shape[0]))


def load_copier(workdir: Optional[str] = None) -> Copier:
    """Compile the memcpy loop with the system ``cc`` into a temporary directory and load it with ctypes."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return Copier(None, "no C compiler found: memcpy ceiling measured with a numpy fancy-index copy "
                            "(slower than memcpy; ratios to it are optimistic)")
    tmp = tempfile.mkdtemp(prefix="llmdd-bench-", dir=workdir)
    try:
        src, lib = os.path.join(tmp, "copy.c"), os.path.join(tmp, "copy.so")
        with open(src, "w") as f:
            f.write(_C_SOURCE)
        proc = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", lib, src], capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            return Copier(None, f"{compiler} failed ({proc.stderr.strip()[:200]}): memcpy ceiling measured with "
                                f"a numpy fancy-index copy (ratios to it are optimistic)")
        fn = ctypes.CDLL(lib).copy_ops
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        fn.restype = None
        return Copier(fn, f"C memcpy loop built with {compiler} -O2")
    except (OSError, subprocess.SubprocessError) as exc:
        return Copier(None, f"building the C loop failed ({exc}): numpy fancy-index copy instead")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loaded library stays mapped


def _ops(src_base: int, dst_base: int, block: int, order) -> tuple:
    s_blk, d_blk = order
    bs = np.uint64(block)
    src = np.uint64(src_base) + s_blk.astype(np.uint64) * bs
    dst = np.uint64(dst_base) + d_blk.astype(np.uint64) * bs
    return np.ascontiguousarray(dst), np.ascontiguousarray(src), np.full(len(src), block, dtype=np.uint64)


def split_ops(dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, parts: int) -> List[tuple]:
    bounds = np.linspace(0, len(sizes), parts + 1).astype(int)
    return [(dst[a:b], src[a:b], sizes[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _timed_passes(run: Callable[[], None], passes: int, warmup: int, nbytes: int) -> List[float]:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        samples.append(gbps(nbytes, time.perf_counter() - start))
    return samples


class TwoThreads:
    """Runs two halves of the ops at once: this thread and one persistent helper thread."""

    def __init__(self, copier: Copier) -> None:
        self._copier = copier
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._job: Optional[tuple] = None
        self._thread = threading.Thread(target=self._loop, name="bench-memcpy-2t", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            job = self._job
            if job is None:
                return
            self._copier.copy(*job)
            self._done.release()

    def run(self, halves: List[tuple]) -> None:
        self._job = halves[1]
        self._go.release()
        self._copier.copy(*halves[0])
        self._done.acquire()

    def close(self) -> None:
        self._job = None
        self._go.release()
        self._thread.join(5.0)


def measure_memcpy(copier: Copier, sizes: Sequence[int], total_bytes: int, passes: int, warmup: int,
                   seed: int, on_step: Optional[Callable[[], None]] = None) -> List[Dict[str, Any]]:
    """memcpy of the scattered blocks in one process: 1 thread and 2 threads (C loop), or numpy fancy index."""
    src_buf, dst_buf = Buffer(total_bytes), Buffer(total_bytes)
    fill_pattern(src_buf.array, 0)
    two = TwoThreads(copier) if copier.native else None
    out: List[Dict[str, Any]] = []
    try:
        for block in sizes:
            n = total_bytes // block
            order = block_order(n, seed)
            nbytes = n * block
            out.extend(_memcpy_one(copier, two, src_buf, dst_buf, block, order, nbytes, passes, warmup))
            if on_step:
                on_step()
    finally:
        if two is not None:
            two.close()
        src_buf.close()
        dst_buf.close()
    return out


def _memcpy_one(copier: Copier, two: Optional[TwoThreads], src_buf: Buffer, dst_buf: Buffer, block: int,
                order, nbytes: int, passes: int, warmup: int) -> List[Dict[str, Any]]:
    common = dict(direction="copy", placement="host/host", block_bytes=block, total_bytes=nbytes, passes=passes)
    if not copier.native:
        s_blk, d_blk = order
        src2d, dst2d = src_buf.array.reshape(-1, block), dst_buf.array.reshape(-1, block)

        def fancy() -> None:
            dst2d[d_blk] = src2d[s_blk]

        samples = _timed_passes(fancy, passes, warmup, nbytes)
        problem = verify_blocks(dst_buf.array, block, s_blk, d_blk, 0)
        return [record("bandwidth", "memcpy.np_1t", samples_gbps=samples, threads=1, note=copier.note,
                       verified=problem is None, **common)]
    dst, src, lens = _ops(src_buf.addr, dst_buf.addr, block, order)
    samples_1t = _timed_passes(lambda: copier.copy(dst, src, lens), passes, warmup, nbytes)
    problem = verify_blocks(dst_buf.array, block, order[0], order[1], 0)
    halves = split_ops(dst, src, lens, 2)
    samples_2t = _timed_passes(lambda: two.run(halves), passes, warmup, nbytes) \
        if two is not None and len(halves) == 2 else []
    out = [record("bandwidth", "memcpy.c_1t", samples_gbps=samples_1t, threads=1, note=copier.note,
                  verified=problem is None, **common)]
    if samples_2t:
        out.append(record("bandwidth", "memcpy.c_2t", samples_gbps=samples_2t, threads=2, note=copier.note,
                          **common))
    return out


def measure_plan(tensors: int = 188, blocks: int = 64, block: int = 16 * 1024, iters: int = 200,
                 seed: int = 0) -> Dict[str, Any]:
    """Time the engine's planner for one model-shaped pull (two fake caches, scattered block ids)."""
    from llm_datadist._engine.api import plan_blocks_timing

    ops, times = plan_blocks_timing(tensors, blocks * 4, blocks, block, iters, seed)
    times.sort()
    return record("plan", "planner.blocks_ops", tensors=tensors, blocks=blocks, ops=ops, iters=iters,
                  median_ms=times[len(times) // 2] * 1e3, p99_ms=times[int(len(times) * 0.99) - 1] * 1e3,
                  min_ms=times[0] * 1e3, target_ms=2.0)
