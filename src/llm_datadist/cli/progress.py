"""A tiny dependency-free progress bar on stderr: redrawn in place on a TTY, periodic lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import IO, Optional, Tuple

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``, ``3.04`` -> ``"3.0s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes}m{secs:02d}s"


class Progress:
    """Counts work items toward ``total`` and shows a bar, a count, a rate note and an ETA.

    On a TTY the line is redrawn at most ``1 / min_interval`` times a second with ``\\r``. On anything else
    (a pipe, a CI log) one plain line is written every ``line_interval`` seconds and at the end, so logs stay
    short. ``enabled=False`` makes every method a no-op.
    """

    def __init__(self, total: int, label: str = "", stream: Optional[IO[str]] = None, width: int = 30,
                 enabled: bool = True, min_interval: float = 0.1, line_interval: float = 2.0) -> None:
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = enabled
        self.count = 0
        self.note = ""
        self._tty = _isatty(self.stream)
        self._interval = min_interval if self._tty else line_interval
        self._start = time.monotonic()
        self._last = float("-inf")
        self._first: Optional[Tuple[float, int]] = None  # (time, count) of the first update: the ETA's origin
        self._closed = False
        self._drawn = False

    @property
    def is_tty(self) -> bool:
        return self._tty

    def update(self, n: int = 1, note: Optional[str] = None) -> None:
        """Advance by ``n`` items; ``note`` (e.g. ``"2.1 GB/s"``) replaces the text shown after the count."""
        self.count = min(self.count + n, self.total) if self.total else self.count + n
        if note is not None:
            self.note = note
        now = time.monotonic()
        if self._first is None and n > 0:
            self._first = (now, self.count)
        if self.enabled and not self._closed and now - self._last >= self._interval:
            self._last = now
            self._draw(now)

    def close(self) -> None:
        """Draw the final state once and end the line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._tty or self._drawn or self.count:
            self._draw(time.monotonic())
        if self._tty and self._drawn:
            self._write("\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self, now: Optional[float] = None) -> str:
        """The current line, without ``\\r`` or newline."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        parts = [self.label] if self.label else []
        if self.total:
            frac = self.count / self.total
            filled = int(frac * self.width)
            parts.append("[" + "#" * filled + "-" * (self.width - filled) + "]")
            parts.append(f"{self.count}/{self.total} {frac * 100:3.0f}%")
        else:
            parts.append(str(self.count))
        if self.note:
            parts.append(self.note)
        parts.append(format_duration(elapsed))
        eta = self._eta(now)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        return " ".join(parts)

    def _eta(self, now: float) -> Optional[float]:
        """Remaining time at the rate seen since the first update (start-up time is not a rate)."""
        if not self.total or self._first is None or not 0 < self.count < self.total:
            return None
        since, done = now - self._first[0], self.count - self._first[1]
        if done <= 0 or since <= 0:
            return None
        return since / done * (self.total - self.count)

    def _draw(self, now: float) -> None:
        line = self.render(now)
        if self._tty:
            self._write("\r" + line + "\x1b[K")
        else:
            self._write(line + "\n")
        self._drawn = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream never stops the work
            self.enabled = False


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
