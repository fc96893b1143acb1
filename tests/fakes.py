"""Test doubles (the one home for them): slow peers and slow thread starts."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator, List, Optional


#: The longest a held call waits for :meth:`Delayed.release` (only a test that forgets to release reaches it).
HOLD_LIMIT_S = 30.0


class Delayed:
    """Make ``getattr(target, name)`` sleep ``seconds`` before running, until :meth:`restore`.

    With ``seconds=None`` each call is held until :meth:`release` instead: a peer that answers only after the
    test has seen what it waits for (no guess at how long "late" must be). With ``first_calls=n`` only the
    first n calls are delayed (later ones run at once).

    Used as a slow peer: wrapping the serving side's registry lookup delays its answer to a pull, without
    touching the requesting side. Also a context manager. ``calls`` counts the delayed calls, ``entered`` is
    set once one started; :meth:`restore` releases held calls and waits (bounded) for calls still delayed, so
    no test leaves a sleeping server thread behind.
    """

    def __init__(self, target: Any, name: str, seconds: Optional[float], first_calls: Optional[int] = None) -> None:
        self._target = target
        self._name = name
        self._original: Callable[..., Any] = getattr(target, name)
        self._own = name in getattr(target, "__dict__", {})  # an instance attribute, not a method
        self._seconds = seconds
        self._first_calls = first_calls
        self._lock = threading.Lock()
        self._active: List[threading.Event] = []
        self._released = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        setattr(target, name, self._wrapper)

    def _wrapper(self, *args: Any, **kwargs: Any) -> Any:
        done = threading.Event()
        with self._lock:
            self.calls += 1
            delay = self._first_calls is None or self.calls <= self._first_calls
            self._active.append(done)
        try:
            if delay:
                self.entered.set()
                if self._seconds is None:
                    self._released.wait(HOLD_LIMIT_S)
                else:
                    time.sleep(self._seconds)
            return self._original(*args, **kwargs)
        finally:
            done.set()

    def release(self) -> None:
        """Let the held calls (``seconds=None``) run."""
        self._released.set()

    def restore(self, wait_s: float = 5.0) -> None:
        """Put the original back, release held calls and wait for delayed calls in flight."""
        self.release()
        if getattr(self._target, self._name, None) == self._wrapper:
            if self._own:
                setattr(self._target, self._name, self._original)
            else:
                delattr(self._target, self._name)  # the class's method shows through again
        deadline = time.monotonic() + wait_s
        with self._lock:
            active = list(self._active)
        for event in active:
            event.wait(max(deadline - time.monotonic(), 0.0))

    def __enter__(self) -> Delayed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


@contextlib.contextmanager
def slow_thread_start(name: str, seconds: float, first_calls: int = 1) -> Iterator[None]:
    """Delay ``Thread.start()`` of the first ``first_calls`` threads named ``name`` by ``seconds``.

    A slow scheduler for one thread: the caller stays inside ``start()`` (the thread object exists but is not
    started yet) for a while, which opens race windows deterministically.
    """
    original = threading.Thread.start
    lock = threading.Lock()
    seen = [0]

    def start(thread: threading.Thread) -> None:
        if thread.name == name:
            with lock:
                seen[0] += 1
                hit = seen[0] <= first_calls
            if hit:
                time.sleep(seconds)
        original(thread)

    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        yield
    finally:
        threading.Thread.start = original  # type: ignore[method-assign]
