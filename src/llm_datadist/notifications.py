"""Notifications between linked peers: an extension of llm_datadist (not part of the official API).

Small messages (at most ``MAX_PAYLOAD_BYTES``) travel over the control connection of an existing link, so they are
authenticated exactly like the link (its shared secret, its TLS). Every call takes an initialized
``LLMDataDist``; the official classes are unchanged::

    from llm_datadist import notifications

    notifications.send(datadist, peer_cluster_id, b"hello")            # returns once the peer queued it
    for note in notifications.poll(datadist, timeout_ms=100):          # or set_callback(datadist, fn)
        print(note.cluster_id, note.payload)
    notifications.on_link_down(datadist, lambda down: print(down.cluster_id, "is gone:", down.cause))

    # attached to a transfer: the receiver gets the notification only after the pushed bytes are in its cache
    notifications.push_blocks(datadist, BlocksCacheKey(peer, 0), cache, [0, 1], [4, 5], b"blocks 4-5 ready")
    # the owner is told after this side has the pulled bytes (so it may free them)
    notifications.pull_blocks(datadist, BlocksCacheKey(peer, 0), cache, [4, 5], [0, 1], b"done with 4-5")

Delivery: a sent notification is queued by the receiver before ``send`` returns; when the receiver's queue is full
``send`` raises ``LLMException(LLM_LINK_BUSY)``, so a notification is never dropped without its sender learning
of it; it is lost only with its link. Notifications from one thread arrive in the order it sent them. The receiver
polls them or has them passed to one callback (on one dispatcher thread, in arrival order). A link that goes away
becomes a ``LinkDown`` event (polled, or passed to its own callback on the same thread), always after the
notifications that arrived over that link. Queue, callbacks and events belong to the initialized instance:
``finalize`` drops them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from llm_datadist._engine import api
from llm_datadist._engine.api import ErrorBoundary
from llm_datadist.status import LLMException
from llm_datadist.utils.utils import check_isinstance, check_uint64, raise_if_false
from llm_datadist.v2.llm_datadist import LLMDataDist
from llm_datadist.v2.llm_types import BlocksCacheKey, Cache, CacheKey, CacheKeyByIdAndIndex

__all__ = [
    "MAX_PAYLOAD_BYTES", "Notification", "LinkDown", "NotificationNotDelivered", "send", "poll", "set_callback",
    "on_link_down", "poll_link_down", "set_queue_limit", "queued", "push_blocks", "push_cache", "pull_blocks",
    "pull_cache", "listen_address",
]

MAX_PAYLOAD_BYTES = 64 * 1024
_PLAIN, _AFTER_PUSH, _AFTER_PULL = 0, 1, 2  # the wire's Notify.after
Payload = Union[bytes, bytearray, memoryview]


@dataclasses.dataclass(frozen=True)
class Notification:
    """A received notification.

    Attributes:
        cluster_id: the sender's cluster id (as its link proved it).
        payload: the bytes it sent.
        link_id: the link it arrived over (a ``LinkDown`` with this ``link_id`` follows when that link ends).
        after: ``"push"`` when it was sent with a push into this instance's caches (the bytes are in place),
            ``"pull"`` when sent after a pull from them (the sender has the bytes), ``""`` for a plain ``send``.
    """

    cluster_id: int
    payload: bytes
    link_id: int
    after: str = ""


@dataclasses.dataclass(frozen=True)
class LinkDown:
    """A link of this instance went away.

    Attributes:
        cluster_id: the peer's cluster id.
        link_id: the link (as in ``Notification.link_id``).
        cause: ``"lost"`` (the connection broke: the peer died or the network failed), ``"peer_unlinked"``,
            ``"unlinked"`` (this side unlinked) or ``"replaced"`` (the peer linked again and its new link
            replaced this one: a restarted peer).
        linked: whether another link to that cluster is still up (e.g. it linked to this instance too).
    """

    cluster_id: int
    link_id: int
    cause: str
    linked: bool


class NotificationNotDelivered(LLMException):
    """A transfer of ``push_blocks``/``push_cache``/``pull_blocks``/``pull_cache`` completed (every byte moved) but
    its notification was not delivered; ``status_code`` says why (as for ``send``)."""


def _engine(datadist: LLMDataDist) -> api.EngineApi:
    check_isinstance("datadist", datadist, LLMDataDist, allow_none=False)
    return datadist._require_engine()  # RuntimeError when it is not initialized, as the official methods


def _payload(payload: Payload) -> bytes:
    check_isinstance("payload", payload, (bytes, bytearray, memoryview), allow_none=False)
    data = bytes(payload)
    raise_if_false(len(data) <= MAX_PAYLOAD_BYTES, "a notification carries at most {} bytes, but got {}",
                   MAX_PAYLOAD_BYTES, len(data))
    return data


def _timeout_s(engine: api.EngineApi, timeout_ms: Optional[int]) -> float:
    if timeout_ms is None:
        return engine.opts.sync_kv_timeout_ms / 1000.0
    check_isinstance("timeout_ms", timeout_ms, int, allow_none=False)
    if timeout_ms <= 0:
        raise ValueError(f"timeout_ms must be > 0, but got {timeout_ms}")
    return timeout_ms / 1000.0


def _wait_ms(timeout_ms: int) -> float:
    check_isinstance("timeout_ms", timeout_ms, int, allow_none=False)
    if timeout_ms < 0:
        raise ValueError(f"timeout_ms must be >= 0, but got {timeout_ms}")
    return timeout_ms / 1000.0


def _count(max_count: int) -> int:
    check_isinstance("max_count", max_count, int, allow_none=False)
    if max_count <= 0:
        raise ValueError(f"max_count must be > 0, but got {max_count}")
    return max_count


def _notification(note: Any) -> Notification:
    return Notification(note.cluster_id, note.payload, note.link_id, note.after)


def _link_down(down: Any) -> LinkDown:
    return LinkDown(down.cluster_id, down.link_id, down.cause, down.linked)


# -- messages ---------------------------------------------------------------------------------------------
def send(datadist: LLMDataDist, cluster_id: int, payload: Payload, timeout_ms: Optional[int] = None) -> None:
    """Send ``payload`` to the linked cluster ``cluster_id``; returns once the peer has queued it.

    Args:
        datadist: an initialized instance linked to ``cluster_id`` (either side may have made the link).
        cluster_id: the peer.
        payload: at most ``MAX_PAYLOAD_BYTES`` bytes.
        timeout_ms: how long to wait for the peer's answer; default the instance's ``sync_kv_timeout``.

    Raises:
        TypeError / ValueError: an argument of the wrong type or range.
        RuntimeError: ``datadist`` is not initialized.
        LLMException: ``LLM_PARAM_INVALID`` (payload too large), ``LLM_NOT_YET_LINK`` (no link to the cluster, or
            it is unlinking), ``LLM_LINK_BUSY`` (the peer's notification queue is full: retry later),
            ``LLM_TIMEOUT`` (no answer in time; the notification may still arrive), ``LLM_LINK_FAILED`` (the link
            broke: the notification is lost).
    """
    engine = _engine(datadist)
    check_uint64("cluster_id", cluster_id)
    data = _payload(payload)
    timeout_s = _timeout_s(engine, timeout_ms)
    with ErrorBoundary("send notification"):
        engine.notify(cluster_id, data, timeout_s, _PLAIN)


def poll(datadist: LLMDataDist, max_count: int = 64, timeout_ms: int = 0) -> List[Notification]:
    """Take up to ``max_count`` received notifications, oldest first.

    Waits up to ``timeout_ms`` for the first one (0: return at once, possibly with an empty list). While a
    callback is set (``set_callback``), notifications go to it instead.
    """
    engine = _engine(datadist)
    count, wait_s = _count(max_count), _wait_ms(timeout_ms)
    return [_notification(note) for note in engine.notices.poll(count, wait_s)]


def set_callback(datadist: LLMDataDist, fn: Optional[Callable[[Notification], None]]) -> None:
    """Pass every received notification (those already queued first) to ``fn(notification)``; None: poll again.

    ``fn`` runs on one dispatcher thread of the instance, one notification at a time in arrival order; while it
    runs, further notifications queue (and count against the queue limit). An exception it raises is logged.
    ``fn`` may call ``send`` (e.g. to answer), and must not call ``finalize`` of the same instance.
    """
    engine = _engine(datadist)
    if fn is not None and not callable(fn):
        raise TypeError(f"fn only support callable or None, but got {type(fn).__name__}")
    engine.notices.set_callback(None if fn is None else (lambda note: fn(_notification(note))))


def set_queue_limit(datadist: LLMDataDist, max_count: Optional[int] = None, max_bytes: Optional[int] = None) -> None:
    """Bound the queue of received notifications not yet taken (defaults: 4096 notifications, 64 MiB of payload).

    A notification that would exceed a bound is refused: its sender's ``send`` raises ``LLM_LINK_BUSY``.
    """
    engine = _engine(datadist)
    if max_count is not None:
        _count(max_count)
    if max_bytes is not None:
        check_isinstance("max_bytes", max_bytes, int, allow_none=False)
        if max_bytes < MAX_PAYLOAD_BYTES:
            raise ValueError(f"max_bytes must be >= {MAX_PAYLOAD_BYTES}, but got {max_bytes}")
    engine.notices.set_limits(max_count, max_bytes)


def queued(datadist: LLMDataDist) -> Tuple[int, int]:
    """(notifications, payload bytes) received and not yet taken."""
    return _engine(datadist).notices.queued()


# -- link-down events ---------------------------------------------------------------------------------------
def on_link_down(datadist: LLMDataDist, fn: Optional[Callable[[LinkDown], None]]) -> None:
    """Pass every link-down event (those already queued first) to ``fn(event)``; None: poll them again.

    ``fn`` runs on the dispatcher thread of ``set_callback``, after the notifications that arrived over the link
    that went down. A peer that dies (even SIGKILL) is reported as soon as its connection breaks.
    """
    engine = _engine(datadist)
    if fn is not None and not callable(fn):
        raise TypeError(f"fn only support callable or None, but got {type(fn).__name__}")
    engine.notices.set_link_down_callback(None if fn is None else (lambda down: fn(_link_down(down))))


def poll_link_down(datadist: LLMDataDist, max_count: int = 64, timeout_ms: int = 0) -> List[LinkDown]:
    """Take up to ``max_count`` link-down events, oldest first, waiting up to ``timeout_ms`` for the first one.

    Without a callback the latest 4096 events are kept.
    """
    engine = _engine(datadist)
    count, wait_s = _count(max_count), _wait_ms(timeout_ms)
    return [_link_down(down) for down in engine.notices.poll_link_down(count, wait_s)]


# -- notifications attached to transfers --------------------------------------------------------------------------
def _transfer_then_notify(name: str, datadist: LLMDataDist, cluster_id: int, payload: Payload,
                          timeout_ms: Optional[int], after: int, transfer: Callable[[], None]) -> None:
    """Check the payload and the timeout, run ``transfer`` (it raises as the cache_manager call does), then send
    the payload; a notification that fails after a transfer that succeeded raises NotificationNotDelivered."""
    engine = _engine(datadist)
    data = _payload(payload)
    timeout_s = _timeout_s(engine, timeout_ms)
    transfer()
    try:
        with ErrorBoundary(name):
            engine.notify(cluster_id, data, timeout_s, after)
    except LLMException as exc:
        raise NotificationNotDelivered(f"{name}: the transfer completed but its notification was not delivered: "
                                       f"{exc}", status_code=exc.status_code) from exc


def push_blocks(datadist: LLMDataDist, dst_cache_key: BlocksCacheKey, src_cache: Cache, src_blocks: Sequence[int],
                dst_blocks: Sequence[int], payload: Payload, *, src_layer_range: Optional[range] = None,
                dst_layer_range: Optional[range] = None, tensor_num_per_layer: int = 2,
                timeout_ms: Optional[int] = None) -> None:
    """``cache_manager.push_blocks``, then ``payload`` to the destination cluster, which receives it only after the
    pushed bytes are in its cache (``Notification.after == "push"``).

    The payload is checked before any byte moves; a failed push sends nothing and raises as ``push_blocks`` does.
    A push that succeeded but whose notification failed raises ``NotificationNotDelivered`` (an ``LLMException``
    with the notification's status, as ``send`` raises it).
    """
    _transfer_then_notify("push_blocks notification", datadist, dst_cache_key.cluster_id, payload, timeout_ms,
                          _AFTER_PUSH, lambda: datadist.cache_manager.push_blocks(
                              dst_cache_key, src_cache, src_blocks, dst_blocks, src_layer_range, dst_layer_range,
                              tensor_num_per_layer))


def push_cache(datadist: LLMDataDist, dst_cache_key: CacheKeyByIdAndIndex, src_cache: Cache, payload: Payload, *,
               src_batch_index: int = 0, src_layer_range: Optional[range] = None,
               dst_layer_range: Optional[range] = None, size: int = -1, tensor_num_per_layer: int = 2,
               timeout_ms: Optional[int] = None) -> None:
    """``cache_manager.push_cache``, then ``payload`` to the destination cluster after the bytes are in place."""
    _transfer_then_notify("push_cache notification", datadist, dst_cache_key.cluster_id, payload, timeout_ms,
                          _AFTER_PUSH, lambda: datadist.cache_manager.push_cache(
                              dst_cache_key, src_cache, src_batch_index, src_layer_range, dst_layer_range, size,
                              tensor_num_per_layer))


def pull_blocks(datadist: LLMDataDist, src_cache_key: Union[BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex],
                dst_cache: Cache, src_blocks: Sequence[int], dst_blocks: Sequence[int], payload: Payload, *,
                timeout_ms: Optional[int] = None, **kwargs: Any) -> None:
    """``cache_manager.pull_blocks`` (``kwargs``: its layer ranges), then ``payload`` to the owner, which receives
    it only after this side has every pulled byte (``Notification.after == "pull"``): the owner may free them.

    Errors as ``push_blocks``.
    """
    _transfer_then_notify("pull_blocks notification", datadist, src_cache_key.cluster_id, payload, timeout_ms,
                          _AFTER_PULL, lambda: datadist.cache_manager.pull_blocks(
                              src_cache_key, dst_cache, src_blocks, dst_blocks, **kwargs))


def pull_cache(datadist: LLMDataDist, cache_key: Union[CacheKey, CacheKeyByIdAndIndex], cache: Cache,
               payload: Payload, *, batch_index: int = 0, size: int = -1, timeout_ms: Optional[int] = None,
               **kwargs: Any) -> None:
    """``cache_manager.pull_cache``, then ``payload`` to the owner once this side has the bytes."""
    _transfer_then_notify("pull_cache notification", datadist, cache_key.cluster_id, payload, timeout_ms,
                          _AFTER_PULL, lambda: datadist.cache_manager.pull_cache(
                              cache_key, cache, batch_index, size, **kwargs))


# -- where peers link to ------------------------------------------------------------------------------------
def listen_address(datadist: LLMDataDist) -> Optional[Tuple[str, int]]:
    """(ip, port) this instance listens on, or None; with ``listen_ip_info`` "ip:0" the port the system chose
    (so a server needs no free-port search that another process could race)."""
    return _engine(datadist).listen_address()

