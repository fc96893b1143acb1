"""Notifications between linked peers, and link-down events, of one engine.

A notification is a small payload (at most ``protocol.MAX_NOTIFY_BYTES``) sent as a ``Notify`` request over the
control connection of an existing link, so it is authenticated exactly like the link (handshake, shared secret,
TLS). The receiver queues it and answers ``Ack``; when its queue is full (``max_count`` notifications or
``max_bytes`` of payload waiting) it answers ``Error(LLM_LINK_BUSY)`` and the sender's call raises: a notification
is never dropped without its sender learning of it, it is lost only with its link.

Delivery: the application polls the queue (``poll``) or sets a callback, which one dispatcher thread calls in
arrival order. A link that goes away (its peer died, unlinked, was replaced by a newer link of the same peer, or
this side unlinked) becomes a ``LinkDown`` event, polled or passed to its own callback; a notification that
arrived over a link is always delivered before that link's ``LinkDown`` (a notification that reaches a link already
reported down is refused).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Deque, List, Optional, Set, Tuple

from llm_datadist._engine import protocol as proto
from llm_datadist._engine.errors import EngineError, Finalized, NotLinked, ParamInvalid
from llm_datadist._engine.link import Link
from llm_datadist.status import LLMStatusCode

__all__ = ["Notice", "LinkDown", "Notices", "QueueFull", "send", "MAX_QUEUED", "MAX_QUEUED_BYTES",
           "MAX_LINK_DOWN_EVENTS", "AFTER_NAMES"]

_log = logging.getLogger(__name__)
MAX_QUEUED = 4096  # notifications waiting in one instance's queue (default limit)
MAX_QUEUED_BYTES = 64 << 20  # payload bytes waiting in one instance's queue (default limit)
MAX_LINK_DOWN_EVENTS = 4096  # link-down events kept for polling (the oldest go beyond it)
JOIN_S = 2.0
AFTER_NAMES = {proto.NOTIFY_PLAIN: "", proto.NOTIFY_AFTER_PUSH: "push", proto.NOTIFY_AFTER_PULL: "pull"}

# link-down causes
LOST, PEER_UNLINKED, UNLINKED, REPLACED = "lost", "peer_unlinked", "unlinked", "replaced"


class QueueFull(EngineError):
    """The receiver's notification queue is full (the sender may retry once the receiver polled)."""

    code = LLMStatusCode.LLM_LINK_BUSY


@dataclasses.dataclass(frozen=True)
class Notice:
    """One received notification: who sent it, over which link, and after which transfer ("", "push", "pull")."""

    cluster_id: int
    link_id: int
    payload: bytes
    after: str = ""


@dataclasses.dataclass(frozen=True)
class LinkDown:
    """A link went away: ``cause`` is "lost", "peer_unlinked", "unlinked" (here) or "replaced" (by a newer link of
    the same peer); ``linked`` says whether another link to that cluster is still up."""

    cluster_id: int
    link_id: int
    cause: str
    linked: bool


NoticeCallback = Callable[[Notice], None]
LinkDownCallback = Callable[[LinkDown], None]


class Notices:
    """The notification queue, link-down events and their callbacks of one engine (thread-safe)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._notes: Deque[Tuple[int, Notice]] = collections.deque()
        self._downs: Deque[Tuple[int, LinkDown]] = collections.deque(maxlen=MAX_LINK_DOWN_EVENTS)
        self._bytes = 0
        self._seq = 0
        self.max_count = MAX_QUEUED
        self.max_bytes = MAX_QUEUED_BYTES
        self._up: Set[int] = set()  # link ids that are up (their downs are reported)
        self._note_cb: Optional[NoticeCallback] = None
        self._down_cb: Optional[LinkDownCallback] = None
        self._dispatcher: Optional[threading.Thread] = None
        self._closed = False

    # -- links (the link manager calls these) ---------------------------------------------------------
    def link_up(self, link_id: int) -> None:
        """A link was made: notifications over it are accepted until it is down."""
        with self._cond:
            self._up.add(link_id)

    def receive(self, cluster_id: int, link_id: int, link_closed: Callable[[], bool], msg: proto.Notify) -> None:
        """Queue a peer's notification (the Notify handler); QueueFull, NotLinked or Finalized refuse it."""
        with self._cond:
            if self._closed:
                raise Finalized("the receiving instance is finalizing")
            if link_id not in self._up or link_closed():
                raise NotLinked(f"the link from cluster {cluster_id} is going away")
            size = len(msg.payload)
            if len(self._notes) >= self.max_count or self._bytes + size > self.max_bytes:
                raise QueueFull(f"the notification queue of the receiver is full ({len(self._notes)} notifications, "
                                f"{self._bytes} bytes waiting; limits {self.max_count}, {self.max_bytes} bytes): "
                                f"retry once it polled")
            self._seq += 1
            self._notes.append((self._seq, Notice(cluster_id, link_id, bytes(msg.payload),
                                                  AFTER_NAMES.get(msg.after, ""))))
            self._bytes += size
            self._cond.notify_all()

    def link_down(self, cluster_id: int, link_id: int, cause: str, linked: bool, report: bool = True) -> None:
        """A link went away: no notification over it is accepted any more; with ``report`` (it was in the link
        table, this instance is not finalizing) the application gets one LinkDown event."""
        with self._cond:
            if link_id not in self._up:
                return
            self._up.discard(link_id)
            if self._closed or not report:
                return
            self._seq += 1
            self._downs.append((self._seq, LinkDown(cluster_id, link_id, cause, linked)))
            self._cond.notify_all()

    # -- the application --------------------------------------------------------------------------------
    def set_limits(self, max_count: Optional[int], max_bytes: Optional[int]) -> None:
        """Bound the queue (notifications already queued stay; new ones are refused while it is above a limit)."""
        with self._cond:
            if max_count is not None:
                self.max_count = max_count
            if max_bytes is not None:
                self.max_bytes = max_bytes

    def queued(self) -> Tuple[int, int]:
        """(notifications, payload bytes) waiting in the queue."""
        with self._cond:
            return len(self._notes), self._bytes

    def poll(self, max_count: int, timeout_s: float) -> List[Notice]:
        """Take up to ``max_count`` queued notifications, waiting up to ``timeout_s`` for the first one."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._notes and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            out: List[Notice] = []
            while self._notes and len(out) < max_count:
                out.append(self._take_note())
            return out

    def poll_link_down(self, max_count: int, timeout_s: float) -> List[LinkDown]:
        """Take up to ``max_count`` link-down events, waiting up to ``timeout_s`` for the first one."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._downs and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            out: List[LinkDown] = []
            while self._downs and len(out) < max_count:
                out.append(self._downs.popleft()[1])
            return out

    def set_callback(self, fn: Optional[NoticeCallback]) -> None:
        """Deliver notifications (those queued first) to ``fn`` on the dispatcher thread; None: back to polling."""
        with self._cond:
            self._note_cb = fn
            self._start_dispatcher()

    def set_link_down_callback(self, fn: Optional[LinkDownCallback]) -> None:
        """Deliver link-down events (those queued first) to ``fn`` on the dispatcher thread; None: polling."""
        with self._cond:
            self._down_cb = fn
            self._start_dispatcher()

    def _start_dispatcher(self) -> None:
        self._cond.notify_all()
        if self._dispatcher is None and not self._closed and (self._note_cb or self._down_cb):
            self._dispatcher = threading.Thread(target=self._dispatch, name=f"{self._name}-notices", daemon=True)
            self._dispatcher.start()

    def _take_note(self) -> Notice:
        note = self._notes.popleft()[1]
        self._bytes -= len(note.payload)
        return note

    def _next(self) -> Optional[Callable[[], None]]:
        """The next callback call, in arrival order (taken from the queue under the lock)."""
        note_cb, down_cb = self._note_cb, self._down_cb
        if note_cb is not None and self._notes and (down_cb is None or not self._downs
                                                    or self._notes[0][0] < self._downs[0][0]):
            note = self._take_note()
            return lambda: note_cb(note)
        if down_cb is not None and self._downs:
            down = self._downs.popleft()[1]
            return lambda: down_cb(down)
        return None

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                item = self._next()
                while item is None and not self._closed:
                    self._cond.wait()
                    item = self._next()
                if item is None:
                    return
            try:
                item()
            except Exception:  # noqa: BLE001 - one failing callback must not stop the deliveries
                _log.error("%s: a notification callback failed", self._name, exc_info=True)

    def close(self) -> None:
        """Finalize: refuse new notifications, drop the queue, stop the dispatcher (idempotent)."""
        with self._cond:
            self._closed = True
            self._notes.clear()
            self._bytes = 0
            self._cond.notify_all()
            thread, self._dispatcher = self._dispatcher, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_S)


def send(link: Link, payload: bytes, deadline: float, after: int = proto.NOTIFY_PLAIN) -> None:
    """Send one notification over ``link`` and wait for the receiver to queue it.

    Raises:
        ParamInvalid: the payload is larger than MAX_NOTIFY_BYTES.
        NotLinked: the link is unlinking (``Link.call``), or the receiver no longer links back.
        QueueFull (LLM_LINK_BUSY): the receiver's queue is full.
        Timeout: no answer before the deadline (the notification may still arrive).
        LinkFailed: the link broke.
    """
    if len(payload) > proto.MAX_NOTIFY_BYTES:
        raise ParamInvalid(f"a notification carries at most {proto.MAX_NOTIFY_BYTES} bytes, not {len(payload)}")
    proto.expect_reply(link.call(proto.Notify(payload=payload, after=after), deadline), proto.Ack,
                       f"cluster {link.cluster_id}")
