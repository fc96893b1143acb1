"""Prefill side: blocks kept for decodes after their requests finished, and when they may be freed.

A hold starts when a request's prefill has been computed. It ends when its decode releases it, when the
decode that claimed it disconnects (died or shut down), or when its lease runs out: a lease of ``lease_s`` seconds
starts at the end of the prefill and starts again at each claim and renewal, so a decode that is queued or loading
keeps the blocks by renewing (a heartbeat) and a decode that stops renewing loses them one lease later. A hold
claimed by a local owner that ends it itself (a running push) does not expire.
vLLM frees the blocks once the request is both released here and reported finished by the engine.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Deque, Dict, Hashable, Iterable, List, Optional, Protocol, Set, Tuple

__all__ = ["Hold", "HoldTable", "RELEASE_LOG_LEN"]

RELEASE_LOG_LEN = 4096


class Ready(Protocol):
    """Completes the KV writes of a request when called (a CUDA event, for example)."""

    def synchronize(self) -> object: ...


@dataclasses.dataclass
class Hold:
    """One request's kept blocks."""

    request_id: str
    block_ids: List[int]
    expires_at: float
    owner: Optional[Hashable] = None
    ready: Optional[Ready] = None  # the KV writes are complete after its ``synchronize()``
    lease_s: float = 0.0  # each claim or renewal extends the hold to this many seconds from then
    leased: bool = True  # False while claimed by an owner that ends the hold itself: it does not expire
    group_sizes: Tuple[int, ...] = ()  # block_ids of each KV cache group, one after the other (empty: one group)


class HoldTable:
    """Thread-safe table of holds; ``take_freeable`` is what the worker reports as finished sending."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds: Dict[str, Hold] = {}
        self._released: Dict[str, float] = {}  # request id -> when it was released
        self._engine_finished: Set[str] = set()
        # (request id, why, monotonic time) of the latest releases, for measurements and logs
        self.release_log: Deque[Tuple[str, str, float]] = collections.deque(maxlen=RELEASE_LOG_LEN)

    def hold(self, request_id: str, block_ids: List[int], lease_s: float, ready: Optional[Ready] = None,
             group_sizes: Tuple[int, ...] = ()) -> None:
        """Keep ``block_ids`` for ``request_id`` for at most ``lease_s`` seconds unless claimed."""
        with self._lock:
            self._holds[request_id] = Hold(request_id, list(block_ids), time.monotonic() + lease_s, None, ready,
                                           lease_s, group_sizes=tuple(group_sizes))
            self._released.pop(request_id, None)

    def claim(self, request_id: str, owner: Hashable, leased: bool = True) -> Tuple[Optional[Hold], str]:
        """Bind a hold to ``owner`` (a decode connection); returns (hold, "") or (None, reason).

        A claim renews the lease; ``leased=False``: the owner ends the hold itself, it does not expire meanwhile.
        """
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None:
                why = "already released" if request_id in self._released else "not held (unknown or expired)"
                return None, f"request {request_id} is {why} on this prefill"
            if hold.owner is not None and hold.owner != owner:
                return None, f"request {request_id} is claimed by another decode"
            hold.owner = owner
            hold.leased = leased
            hold.expires_at = max(hold.expires_at, time.monotonic() + hold.lease_s)
            return hold, ""

    def renew(self, request_ids: Iterable[str]) -> List[str]:
        """Extend these holds' leases to ``lease_s`` from now; returns the ids that are held (the others are not)."""
        now = time.monotonic()
        renewed = []
        with self._lock:
            for request_id in request_ids:
                hold = self._holds.get(request_id)
                if hold is not None:
                    hold.expires_at = max(hold.expires_at, now + hold.lease_s)
                    renewed.append(request_id)
        return renewed

    def release(self, request_id: str, why: str, owner: Optional[Hashable] = None) -> bool:
        """End a hold (only the claiming owner may release a claimed one); True when it was held."""
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or (owner is not None and hold.owner is not None and hold.owner != owner):
                return False
            self._end(request_id, why)
            return True

    def release_owner(self, owner: Hashable, why: str) -> List[str]:
        """End every hold claimed by ``owner`` (its connection closed); returns their request ids."""
        with self._lock:
            ids = [rid for rid, hold in self._holds.items() if hold.owner == owner]
            for rid in ids:
                self._end(rid, why)
            return ids

    def drop(self, request_id: str) -> None:
        """Forget a request whose blocks vLLM freed itself (it was not kept after finishing)."""
        with self._lock:
            self._holds.pop(request_id, None)
            self._released.pop(request_id, None)
            self._engine_finished.discard(request_id)

    def _end(self, request_id: str, why: str) -> None:
        del self._holds[request_id]
        now = time.monotonic()
        self._released[request_id] = now
        self.release_log.append((request_id, why, now))

    def expire(self, now: Optional[float] = None) -> List[str]:
        """End holds whose lease ran out without a claim or renewal (but not those a local owner ends itself);
        returns their request ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            ids = [rid for rid, hold in self._holds.items() if hold.leased and hold.expires_at <= now]
            for rid in ids:
                claimed = self._holds[rid].owner is not None
                self._end(rid, "lease expired (claimed, not renewed)" if claimed else "lease expired")
            return ids

    def take_freeable(self, engine_finished: Set[str]) -> Set[str]:
        """Record requests vLLM reports finished; return (and forget) those that are finished and released."""
        with self._lock:
            self._engine_finished.update(rid for rid in engine_finished
                                         if rid in self._holds or rid in self._released)
            ready = {rid for rid in self._released if rid in self._engine_finished}
            for rid in ready:
                del self._released[rid]
                self._engine_finished.discard(rid)
            return ready

    def held_ids(self) -> List[str]:
        """Request ids currently held."""
        with self._lock:
            return list(self._holds)

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)
