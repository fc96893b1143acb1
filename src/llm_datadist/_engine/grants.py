"""Write grants a writer holds on one link: granted once per destination generation, reused by later writes.

A one-sided write (process_vm, shm, loopback) needs the owner to hold the destination caches while it runs, so an
unregister on the owner waits for the write instead of freeing memory under it: the owner pins them for a grant
(``WriteGrant`` -> ``Granted``) until the writer sends ``WriteRelease``. Asking for every write costs a round trip
per push, which a layer-wise push pays once per layer. So the writer keeps each grant for the guard words it was
given (one generation of the destination caches) and reuses it; it gives a grant back when

- the owner asks (``RevokeGrant``: the owner wants to free one of the caches; the grant goes back as soon as the
  writes using it end, and no new write takes it),
- it was not used for ``IDLE_S`` (the engine's reporter thread calls :meth:`HeldGrants.expire` each second),
- the link holds ``MAX_HELD`` grants and a new one is needed (the least recently used idle one goes back), or
- the link ends (the owner drops every grant of a link when it closes).

The grant is never skipped: each write runs under a grant the owner confirmed and has not taken back.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["HeldGrants", "Held", "IDLE_S", "MAX_HELD"]

IDLE_S = 5.0  # a grant unused this long goes back to its owner
MAX_HELD = 64  # grants one link keeps (the owner allows 256 per link)
GuardKey = Tuple[Tuple[int, int], ...]  # (slot, value) of each destination cache, sorted


class Held:
    """One grant: its id, the writes using it now, and whether the owner took it back."""

    __slots__ = ("grant_id", "key", "active", "revoked", "released", "last_used")

    def __init__(self, grant_id: int, key: GuardKey) -> None:
        self.grant_id = grant_id
        self.key = key
        self.active = 1
        self.revoked = False
        self.released = False
        self.last_used = time.monotonic()


class HeldGrants:
    """The grants one link's writer holds. ``release(grant_id)`` sends the owner a WriteRelease (never raises)."""

    def __init__(self, release: Callable[[int], None]) -> None:
        self._release = release
        self._lock = threading.Lock()
        self._by_key: Dict[GuardKey, Held] = {}
        self._by_id: Dict[int, Held] = {}

    def take(self, key: GuardKey) -> Optional[Held]:
        """A held grant for exactly these guard words, marked in use; None when there is none to reuse."""
        with self._lock:
            held = self._by_key.get(key)
            if held is None or held.revoked:
                return None
            held.active += 1
            held.last_used = time.monotonic()
            return held

    def add(self, grant_id: int, key: GuardKey) -> Held:
        """A grant the owner just gave for ``key``, in use by the caller's write (give it back with :meth:`done`)."""
        held = Held(grant_id, key)
        with self._lock:
            self._by_id[grant_id] = held
            old = self._by_key.get(key)
            self._by_key[key] = held
            due = []
            if old is not None:  # two writers asked at once: the older grant serves no new write
                self._retire(old)
                if self._due(old):
                    due.append(old.grant_id)
            due += self._over_cap()
        self._send(due)
        return held

    def done(self, held: Held, failed: bool = False) -> None:
        """The caller's write under ``held`` ended; a grant taken back meanwhile (or whose write ``failed``: the
        destination may have changed) goes to its owner once no write uses it."""
        with self._lock:
            held.active -= 1
            held.last_used = time.monotonic()
            if failed:
                self._retire(held)
            due = self._due(held)
        if due:
            self._send([held.grant_id])

    def revoke(self, grant_id: int) -> None:
        """The owner wants the grant back: no new write takes it; it goes back when its writes end."""
        with self._lock:
            held = self._by_id.get(grant_id)
            if held is None:
                return  # already given back
            self._retire(held)
            due = self._due(held)
        if due:
            self._send([grant_id])

    def expire(self, idle_s: Optional[float] = None) -> None:
        """Give back the grants no write used for ``idle_s`` (default IDLE_S) seconds."""
        idle_s = IDLE_S if idle_s is None else idle_s
        now = time.monotonic()
        with self._lock:
            stale = [h for h in self._by_key.values() if h.active == 0 and now - h.last_used >= idle_s]
            for held in stale:
                self._retire(held)
            due = [h.grant_id for h in stale if self._due(h)]
        self._send(due)

    def held(self) -> int:
        with self._lock:
            return len(self._by_id)

    # -- internals (lock held unless stated) -----------------------------------------------------------
    def _retire(self, held: Held) -> None:
        held.revoked = True
        if self._by_key.get(held.key) is held:
            del self._by_key[held.key]

    def _due(self, held: Held) -> bool:
        """Whether the grant must go back now (taken back, unused, not sent yet); marks it sent."""
        if held.revoked and held.active == 0 and not held.released:
            held.released = True
            self._by_id.pop(held.grant_id, None)
            return True
        return False

    def _over_cap(self) -> List[int]:
        """Idle grants beyond MAX_HELD, least recently used first, retired; returns those due."""
        if len(self._by_key) <= MAX_HELD:
            return []
        idle = sorted((h for h in self._by_key.values() if h.active == 0), key=lambda h: h.last_used)
        out = []
        for held in idle[:len(self._by_key) - MAX_HELD]:
            self._retire(held)
            if self._due(held):
                out.append(held.grant_id)
        return out

    def _send(self, grant_ids: List[int]) -> None:
        for grant_id in grant_ids:  # outside the lock: a send may block on a full socket
            self._release(grant_id)
