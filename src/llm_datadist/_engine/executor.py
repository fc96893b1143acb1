"""A small bounded pool of daemon worker threads, owned by one engine (layer-wise tasks run on it)."""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, List, Optional

_log = logging.getLogger(__name__)


class Executor:
    """Runs submitted callables on at most ``max_workers`` daemon threads, started on demand.

    Daemon threads, unlike ``concurrent.futures``: a process that exits without finalizing is never held up
    by a job blocked in a user callback. Jobs queue when every worker is busy.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self._max = max(1, max_workers)
        self._name = name
        self._queue: queue.SimpleQueue[Optional[Callable[[], None]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._outstanding = 0  # submitted jobs not finished yet
        self._closed = False

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Queue ``fn(*args)``; RuntimeError once the executor is shut down."""
        job = (lambda: fn(*args)) if args else fn
        with self._lock:
            if self._closed:
                raise RuntimeError("executor is shut down")
            self._queue.put(job)
            self._outstanding += 1
            if self._outstanding > len(self._threads) and len(self._threads) < self._max:
                thread = threading.Thread(target=self._work, name=f"{self._name}-w{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job's failure never kills the worker
                _log.exception("%s: job failed", self._name)
            with self._lock:
                self._outstanding -= 1

    @property
    def name(self) -> str:
        """Prefix of the workers' thread names."""
        return self._name

    @property
    def threads(self) -> int:
        with self._lock:
            return sum(1 for t in self._threads if t.is_alive())

    def shutdown(self, timeout_s: float) -> int:
        """Stop the workers after their current job (bounded wait); returns how many are still running."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout_s)
        return sum(1 for t in threads if t.is_alive())
