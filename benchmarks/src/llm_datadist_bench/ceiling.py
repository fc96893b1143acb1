"""The machine's ceiling for ``bench``: memcpy and raw process_vm of the same scattered blocks (C loops), plan cost."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from llm_datadist_bench.common import Buffer, block_order, fill_pattern, gbps, record, verify_blocks
from llm_datadist_bench.results import RAW_PVM

__all__ = ["Copier", "TwoThreads", "load_copier", "measure_memcpy", "measure_plan", "measure_raw_pvm", "split_ops"]

RAW_PVM_IOVECS = 1024  # pieces per system call, as many as the library's process_vm transport batches

_C_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
void copy_ops(const uint64_t *dst, const uint64_t *src, const uint64_t *sizes, size_t n) {
    for (size_t i = 0; i < n; i++)
        memcpy((void *)(uintptr_t)dst[i], (const void *)(uintptr_t)src[i], (size_t)sizes[i]);
}
/* Bytes moved between this process and ``pid`` (-errno on failure; short at the first partial call). */
long long pvm_ops(long pid, int write, const uint64_t *local, const uint64_t *remote, const uint64_t *sizes,
                  size_t n) {
    struct iovec l[RAW_PVM_IOVECS], r[RAW_PVM_IOVECS];
    long long moved = 0;
    size_t i = 0;
    while (i < n) {
        size_t k = 0, want = 0;
        for (; k < RAW_PVM_IOVECS && i < n; k++, i++) {
            l[k].iov_base = (void *)(uintptr_t)local[i];
            r[k].iov_base = (void *)(uintptr_t)remote[i];
            l[k].iov_len = r[k].iov_len = (size_t)sizes[i];
            want += (size_t)sizes[i];
        }
        ssize_t got = write ? process_vm_writev((pid_t)pid, l, k, r, k, 0)
                            : process_vm_readv((pid_t)pid, l, k, r, k, 0);
        if (got < 0)
            return -(long long)errno;
        moved += got;
        if ((size_t)got != want)
            return moved;
    }
    return moved;
}
""".replace("RAW_PVM_IOVECS", str(RAW_PVM_IOVECS))


class Copier:
    """Copies ``sizes[i]`` bytes from ``src[i]`` to ``dst[i]``: a C loop of memcpy, or a numpy fallback."""

    def __init__(self, fn: Optional[Callable[..., None]], note: str,
                 pvm: Optional[Callable[..., int]] = None) -> None:
        self._fn = fn
        self._pvm = pvm
        self.native = fn is not None
        self.name = "memcpy.c" if fn is not None else "memcpy.np"
        self.note = note

    def copy(self, dst: np.ndarray, src: np.ndarray, sizes: np.ndarray) -> None:
        """One pass over the ops (uint64 arrays). ctypes releases the GIL for the C loop."""
        if self._fn is None:
            raise RuntimeError("no native copy loop; use copy_fancy")
        self._fn(dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, int(sizes.shape[0]))

    @property
    def cross_process(self) -> bool:
        """Whether the raw process_vm loop was built (it needs the C compiler, like the memcpy loop)."""
        return self._pvm is not None

    def pvm(self, pid: int, write: bool, local: np.ndarray, remote: np.ndarray, sizes: np.ndarray) -> None:
        """``process_vm_readv`` (or ``writev``) of the ops with ``pid``, in C; OSError unless every byte moved."""
        if self._pvm is None:
            raise RuntimeError("no native process_vm loop")
        n = int(sizes.shape[0])
        moved = self._pvm(pid, int(write), local.ctypes.data, remote.ctypes.data, sizes.ctypes.data, n)
        if moved < 0:
            raise OSError(-moved, f"process_vm_{'writev' if write else 'readv'}: {os.strerror(-moved)}")
        want = int(sizes.sum())
        if moved != want:
            raise OSError(f"process_vm_{'writev' if write else 'readv'} moved {moved} of {want} bytes")


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
        dll = ctypes.CDLL(lib)
        fn = dll.copy_ops
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        fn.restype = None
        pvm = dll.pvm_ops
        pvm.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                        ctypes.c_size_t]
        pvm.restype = ctypes.c_longlong
        return Copier(fn, f"C memcpy loop built with {compiler} -O2", pvm)
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
    """Runs ``fn`` on two halves of the ops at once: this thread and one persistent helper thread."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self._fn = fn
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._job: Optional[tuple] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="bench-memcpy-2t", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            job = self._job
            if job is None:
                return
            try:
                self._fn(*job)
            except BaseException as exc:  # handed to run(), which raises it in the caller's thread
                self._error = exc
            self._done.release()

    def run(self, halves: List[tuple]) -> None:
        self._job = halves[1]
        self._go.release()
        try:
            self._fn(*halves[0])
        finally:
            self._done.acquire()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        self._job = None
        self._go.release()
        self._thread.join(5.0)


def measure_memcpy(copier: Copier, sizes: Sequence[int], total_bytes: int, passes: int, warmup: int,
                   seed: int, on_step: Optional[Callable[[], None]] = None) -> List[Dict[str, Any]]:
    """memcpy of the scattered blocks in one process: 1 thread and 2 threads (C loop), or numpy fancy index."""
    src_buf, dst_buf = Buffer(total_bytes), Buffer(total_bytes)
    fill_pattern(src_buf.array, 0)
    two = TwoThreads(copier.copy) if copier.native else None
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


class _Holder:
    """A child process holding ``nbytes`` of pattern-filled memory for the raw process_vm loop (a descendant,
    so a Yama ``ptrace_scope=1`` host allows it as well)."""

    def __init__(self, nbytes: int) -> None:
        code = "import sys; from llm_datadist_bench.ceiling import hold; hold(int(sys.argv[1]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(nbytes)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.close()
            raise OSError(f"the memory holder did not start (said {line.strip()[:80]!r})")
        self.pid, self.addr = self.proc.pid, int(line)

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def hold(nbytes: int) -> None:
    """The holder's body: fill ``nbytes`` with the pattern (salt 0), print its address, wait for stdin to close."""
    buf = Buffer(nbytes)
    fill_pattern(buf.array, 0)
    print(buf.addr, flush=True)
    sys.stdin.read()
    buf.close()


def measure_raw_pvm(copier: Copier, sizes: Sequence[int], total_bytes: int, passes: int, warmup: int,
                    seed: int) -> List[Dict[str, Any]]:
    """The kernel's cross-process copy with no library code: ``process_vm_readv`` (pull) and ``writev`` (push)
    of the same scattered blocks between this process and a child, a C loop of 1024 pieces per call on two
    threads. What a same-host transport can reach for caches in private memory; empty without a C compiler."""
    if not copier.cross_process:
        return []
    try:
        holder = _Holder(total_bytes)
    except OSError as exc:
        return [record("note", "raw process_vm", message=f"raw process_vm not measured: {exc}")]
    local, check = Buffer(total_bytes), Buffer(total_bytes)
    fill_pattern(local.array, 0)
    two = TwoThreads(copier.pvm)
    out: List[Dict[str, Any]] = []
    try:
        # every pull first: a push overwrites the child's pattern, which the pulls are checked against
        for direction, write in (("pull", False), ("push", True)):
            for block in sizes:
                problem = _raw_one(copier, two, holder, local, check, block, total_bytes, passes, warmup, seed,
                                   write, out)
                if problem:
                    out.append(record("note", "raw process_vm", message=f"raw process_vm {direction} failed: "
                                                                        f"{problem}"))
                    return out
    finally:
        two.close()
        holder.close()
        local.close()
        check.close()
    return out


def _raw_one(copier: Copier, two: TwoThreads, holder: _Holder, local: Buffer, check: Buffer, block: int,
             total_bytes: int, passes: int, warmup: int, seed: int, write: bool,
             out: List[Dict[str, Any]]) -> Optional[str]:
    """One block size, one direction; appends the record, returns why it failed (None when it ran)."""
    n = total_bytes // block
    order = block_order(n, seed)
    if write:  # local blocks s -> the child's blocks d
        remote_ops, local_ops, lens = _ops(local.addr, holder.addr, block, order)
    else:  # the child's blocks s -> local blocks d (into a buffer not filled with the pattern)
        local_ops, remote_ops, lens = _ops(holder.addr, check.addr, block, order)
    halves = [(holder.pid, write, *part) for part in split_ops(local_ops, remote_ops, lens, 2)]
    try:
        samples = _timed_passes(lambda: two.run(halves), passes, warmup, n * block)
        problem = _verify_raw(copier, holder, check, block, order, write, n)
    except OSError as exc:
        return str(exc)
    extra = {"problem": problem} if problem else {}
    out.append(record("bandwidth", RAW_PVM, direction="push" if write else "pull", placement="host/host",
                      block_bytes=block, total_bytes=n * block, passes=passes, threads=2, samples_gbps=samples,
                      verified=problem is None, note=f"C loop, {RAW_PVM_IOVECS} pieces per call, two threads, "
                                                     f"with a child process", **extra))
    return None


def _verify_raw(copier: Copier, holder: _Holder, dest: Buffer, block: int, order, write: bool,
                n: int) -> Optional[str]:
    """Sampled byte check: pulled blocks in ``dest``; pushed blocks read back from the child into ``dest``."""
    if write:  # the child's buffer now holds local block s[i] at block d[i]: read it all back, in order
        whole = np.arange(n, dtype=np.uint64) * np.uint64(block)
        copier.pvm(holder.pid, False, np.uint64(dest.addr) + whole, np.uint64(holder.addr) + whole,
                   np.full(n, block, dtype=np.uint64))
    return verify_blocks(dest.array, block, order[0], order[1], 0)


def measure_plan(tensors: int = 188, blocks: int = 64, block: int = 16 * 1024, iters: int = 200,
                 seed: int = 0) -> Dict[str, Any]:
    """Time the engine's planner for one model-shaped pull (two fake caches, scattered block ids)."""
    # the one private module of the library the bench may import (it is another distribution; see __init__)
    from llm_datadist._engine.diagnostics import plan_blocks_timing

    ops, times = plan_blocks_timing(tensors, blocks * 4, blocks, block, iters, seed)
    times.sort()
    return record("plan", "planner.blocks_ops", tensors=tensors, blocks=blocks, ops=ops, iters=iters,
                  median_ms=times[len(times) // 2] * 1e3, p99_ms=times[int(len(times) * 0.99) - 1] * 1e3,
                  min_ms=times[0] * 1e3, target_ms=2.0)
