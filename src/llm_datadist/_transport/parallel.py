"""Helper threads that run byte-balanced parts of one large copy (or one transfer's streams) at once."""
from __future__ import annotations

import functools
import os
import queue
import threading
from typing import Callable, List, Sequence

from llm_datadist._transport.base import CopyPlan


# Splitting a batch across threads. A copy runs in the kernel with the GIL released, so k threads move k
# slices at once when the machine has k cores to spare. A slice handed to a (persistent) helper thread costs
# a queue hand-off and a wake-up, some tens of microseconds, which at 10 GB/s is the time to copy a few hundred
# KiB: so a batch is split only from PARALLEL_MIN_BYTES on (1 MiB per extra thread), and into at most
# COPY_THREADS parts, one per core the process may run on (capped at 4: memory bandwidth, not cores, is the
# limit beyond). LLM_DATADIST_COPY_THREADS overrides the thread count (1 turns the split off).
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_ENV_THREADS = os.environ.get("LLM_DATADIST_COPY_THREADS", "")
COPY_THREADS = int(_ENV_THREADS) if _ENV_THREADS.isdigit() and int(_ENV_THREADS) > 0 else max(1, min(4, _cores()))
SPLIT_BYTES_PER_THREAD = 1 << 20
PARALLEL_MIN_BYTES = 2 * SPLIT_BYTES_PER_THREAD  # the smallest batch worth two threads


class _Helpers:
    """Daemon threads that run slices of split copies, kept while some transport or engine uses them.

    Started on first use (never more than a split needs); ``acquire``/``release`` count the users and the last
    release stops the threads, so nothing outlives the instances that needed it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._users = 0

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users:
                return
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(5.0)

    def run(self, jobs: Sequence[Callable[[], object]]) -> None:
        """Run every job, the first on the calling thread, the others on helpers; re-raise the first error."""
        done = threading.Semaphore(0)
        errors: List[BaseException] = []

        def wrap(job: Callable[[], object]) -> Callable[[], None]:
            def slice_job() -> None:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                    errors.append(exc)
                finally:
                    done.release()
            return slice_job

        with self._lock:
            while len(self._threads) < len(jobs) - 1:
                thread = threading.Thread(target=self._work, name=f"llm-dd-copy-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        for job in jobs[1:]:
            self._queue.put(wrap(job))
        wrap(jobs[0])()
        for _ in jobs:
            done.acquire()
        if errors:
            raise errors[0]

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job()


_HELPERS = _Helpers()
acquire_helpers = _HELPERS.acquire
release_helpers = _HELPERS.release
run_parallel = _HELPERS.run


def _run_part(job: Callable[[CopyPlan], object], plan: CopyPlan, start: int, stop: int) -> None:
    job(plan.part(start, stop))


def run_split(plan: CopyPlan, threads: int, job: Callable[[CopyPlan], object]) -> int:
    """Run ``job`` on up to ``threads`` byte-balanced parts of the plan at once; returns the plan's bytes.

    A plan is split into ``min(threads, total // SPLIT_BYTES_PER_THREAD)`` parts from PARALLEL_MIN_BYTES on;
    a smaller one runs whole on the calling thread.
    """
    total = plan.total_bytes
    parts = min(threads, len(plan), total // SPLIT_BYTES_PER_THREAD) if total >= PARALLEL_MIN_BYTES else 1
    if parts <= 1:
        job(plan)
        return total
    edges = plan.cuts(parts)
    _HELPERS.run([functools.partial(_run_part, job, plan, a, b) for a, b in zip(edges[:-1], edges[1:])])
    return total
