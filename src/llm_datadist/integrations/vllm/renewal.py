"""Decode side of the prefill's leases: renew the holds of every request this worker still wants.

A request is wanted from the moment vLLM's scheduler takes it in (``on_new_request``: it may wait in the queue for
free blocks for a long time) until its load ends (pulled, pushed or failed) or it finishes without one. One daemon
thread sends each prefill rank, every ``interval_s``, one ``Renew`` naming all of them (at most a third of the
shortest lease a prefill announced, so two renewals may be lost before a hold expires), and renews requests taken in
since its last round at once (their lease runs from the end of their prefill, and the first round also links to a
new prefill and learns its lease). A decode that dies renews
nothing, but its prefills do not wait for the lease: its links go down and they free its claims at once.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

from llm_datadist import LLMException
from llm_datadist.integrations.vllm.config import connector_logger

if TYPE_CHECKING:  # metadata imports vLLM
    from llm_datadist.integrations.vllm.metadata import TransferParams

__all__ = ["Renewer", "MIN_INTERVAL_S"]

_log = connector_logger(__name__)
Endpoint = Tuple[str, int, int]  # (host, port, cluster id) of a prefill worker's llm_datadist
MIN_INTERVAL_S = 0.05


class Renewer:
    """The wanted requests and the thread that renews them.

    Args:
        interval_s: the renewal interval this decode wants (``lease_renew_s``).
        targets: ``fn(params)``: the prefill ranks this decode rank renews a request on.
        peer: ``fn(endpoint)``: link to a prefill rank (once, checked compatible) and return (cluster id, the
            prefill's lease in seconds, 0 when unknown); raises when it can not.
        renew: ``fn(cluster id, request ids, transfer ids)``: send one renewal; raises when it is not delivered.
    """

    def __init__(self, interval_s: float, targets: Callable[[TransferParams], Sequence[Endpoint]],
                 peer: Callable[[Endpoint], Tuple[int, float]],
                 renew: Callable[[int, List[str], List[str]], None]) -> None:
        self._interval_s = interval_s
        self._targets = targets
        self._peer = peer
        self._renew = renew
        self._lock = threading.Lock()
        self._wanted: Dict[str, TransferParams] = {}  # local request id -> its transfer params
        self._fresh: Dict[str, TransferParams] = {}  # taken in since the last round: renewed at once
        self._kick = threading.Event()
        self._leases: Dict[int, float] = {}  # prefill cluster id -> its announced lease
        self._stop = threading.Event()
        self.rounds = 0  # renewal rounds that had something to renew (tests and logs)
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the renewal thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llm-dd-vllm-renew", daemon=True)
            self._thread.start()

    def add(self, request_id: str, params: TransferParams) -> None:
        """Keep renewing ``request_id``'s hold (idempotent)."""
        with self._lock:
            if request_id in self._wanted:
                return
            self._wanted[request_id] = params
            self._fresh[request_id] = params
        self._kick.set()

    def remove(self, request_ids: Sequence[str]) -> None:
        """Stop renewing these requests (their load ended or they finished without one)."""
        with self._lock:
            for request_id in request_ids:
                self._wanted.pop(request_id, None)
                self._fresh.pop(request_id, None)

    def wanted(self) -> List[str]:
        """The local request ids renewed now."""
        with self._lock:
            return list(self._wanted)

    @property
    def interval_s(self) -> float:
        """The current interval: ours, or a third of the shortest lease a prefill announced, if that is shorter."""
        with self._lock:
            leases = [lease / 3.0 for lease in self._leases.values() if lease > 0]
        return max(MIN_INTERVAL_S, min([self._interval_s] + leases))

    def _run(self) -> None:
        next_full = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            self._kick.wait(max(0.0, next_full - time.monotonic()))
            self._kick.clear()
            if self._stop.is_set():
                return
            full = time.monotonic() >= next_full  # a kick in between renews only the requests taken in since
            if full:
                next_full = time.monotonic() + self.interval_s
            try:
                self.renew_now(only_fresh=not full)
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                _log.exception("lease renewal round failed")

    def renew_now(self, only_fresh: bool = False) -> None:
        """One renewal round: every wanted request (``only_fresh``: those taken in since the last round) on every
        prefill rank it is held on (best effort)."""
        with self._lock:
            wanted = list((self._fresh if only_fresh else self._wanted).values())
            self._fresh = {}
        if not wanted:
            return
        by_endpoint: Dict[Endpoint, Tuple[List[str], List[str]]] = {}
        for params in wanted:
            try:
                targets = self._targets(params)
            except (ValueError, LLMException) as exc:  # the load fails with it: nothing to keep
                _log.debug("no renewal for %s: %s", params.request_id, exc)
                continue
            for endpoint in targets:
                pulls, pushes = by_endpoint.setdefault(endpoint, ([], []))
                (pushes if params.mode == "push" else pulls).append(params.request_id)
        for endpoint, (pulls, pushes) in by_endpoint.items():
            try:
                cluster_id, lease_s = self._peer(endpoint)
                with self._lock:
                    self._leases[cluster_id] = lease_s
                self._renew(cluster_id, pulls, pushes)
            except (ConnectionError, OSError, LLMException, ValueError) as exc:
                _log.info("renewal of %d requests on prefill %s:%d not sent: %s", len(pulls) + len(pushes),
                          endpoint[0], endpoint[1], exc)
        self.rounds += 1

    def close(self) -> None:
        """Stop the thread; idempotent."""
        self._stop.set()
        self._kick.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
