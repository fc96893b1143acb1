"""The connector's control messages over the notifications of a worker's llm_datadist links.

A decode worker links to a prefill worker once (``link_clusters``) and says ``Hello`` with its compatibility
fingerprint (``compat``); claims, renewals, releases and push hand-offs are then notifications over that link,
authenticated as the link is. Claims are bound to the link they arrived over: when it goes down (the decode died,
unlinked or restarted), the prefill frees what that decode had claimed at once. A decode renews the requests it
still wants (queued or loading) every renewal interval, so a prefill's lease can be short.

Every callback here runs on the llm_datadist instance's one notification thread, in arrival order.
"""
from __future__ import annotations

import itertools
import threading
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

from llm_datadist import LLMDataDist, LLMException, notifications
from llm_datadist.integrations.vllm import messages as msg
from llm_datadist.integrations.vllm.compat import IncompatiblePeer, describe, mismatches
from llm_datadist.integrations.vllm.config import connector_logger

__all__ = ["Owner", "PrefillHandler", "Control"]

_log = connector_logger(__name__)
Owner = Tuple[int, int]  # (decode cluster id, link id): who claimed, over which link


class PrefillHandler(Protocol):
    """What a prefill worker does with decodes' messages (called on the notification thread)."""

    def on_claim(self, owner: Owner, message: msg.Claim) -> msg.ClaimReply:
        """Bind a hold to the owner and answer with its blocks, or say why not."""
        ...

    def on_release(self, owner: Owner, message: msg.Release) -> None:
        """The decode is done with these requests."""
        ...

    def on_renew(self, owner: Owner, message: msg.Renew) -> None:
        """The decode still wants these requests: extend their leases."""
        ...

    def on_push_ready(self, owner: Owner, message: msg.PushReady) -> None:
        """A decode's destination blocks for a push."""
        ...

    def on_decode_gone(self, owner: Owner) -> None:
        """The link the owner's messages came over is gone."""
        ...


_Reply = Union[msg.ClaimReply, msg.HelloReply]


class _Wait:
    __slots__ = ("cluster_id", "event", "reply", "refused")

    def __init__(self, cluster_id: int) -> None:
        self.cluster_id = cluster_id
        self.event = threading.Event()
        self.reply: Optional[_Reply] = None
        self.refused = ""  # the prefill's refusal (it speaks another protocol version)


class Control:
    """One worker's end of the connector's messages (prefill side, decode side, or both).

    Args:
        datadist: the worker's initialized llm_datadist instance.
        geometry: this worker's KV geometry (a decode's claims carry it, the prefill refuses a different one).
        timeout_ms: bound of each send and of the wait for a claim's or hello's reply.
        fingerprint: what a peer must match (``compat``); None: no compatibility check (test stand-ins).
        lease_s: the prefill side's default lease, told to decodes in the hello reply.
        server: the prefill side's handler (None on a pure decode).
        on_push_done: decode side: ``fn(prefill cluster id, PushDone)``.
        on_prefill_lost: decode side: ``fn(prefill cluster id)`` when a link to a prefill went down.
    """

    def __init__(self, datadist: LLMDataDist, geometry: msg.Geometry, timeout_ms: int,
                 server: Optional[PrefillHandler] = None,
                 on_push_done: Optional[Callable[[int, msg.PushDone], None]] = None,
                 on_prefill_lost: Optional[Callable[[int], None]] = None,
                 fingerprint: Optional[msg.Fingerprint] = None, lease_s: float = 0.0) -> None:
        self._datadist = datadist
        self._geometry = geometry
        self._fingerprint = fingerprint
        self._lease_s = lease_s
        self._refused: Dict[Owner, str] = {}  # prefill side: decode links whose fingerprint differs, and how
        self._timeout_ms = timeout_ms
        self._server = server
        self._on_push_done = on_push_done
        self._on_prefill_lost = on_prefill_lost
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._waits: Dict[int, _Wait] = {}
        self._closed = False
        if fingerprint is not None:
            _log.info("llm_datadist connector: compatibility fingerprint %s", fingerprint)
        notifications.set_callback(datadist, self._on_notification)
        notifications.on_link_down(datadist, self._on_link_down)

    # -- incoming (notification thread) -------------------------------------------------------------
    def _on_notification(self, note: notifications.Notification) -> None:
        try:
            message = msg.decode(note.payload)
        except msg.MessageError as exc:
            _log.warning("message from cluster %d dropped: %s", note.cluster_id, exc)
            self._refuse_version(note)
            return
        owner = (note.cluster_id, note.link_id)
        if isinstance(message, msg.Refusal):
            self._on_refusal(note.cluster_id, message)
        elif isinstance(message, (msg.ClaimReply, msg.HelloReply)):
            with self._lock:
                wait = self._waits.get(message.seq)
            if wait is not None and wait.cluster_id == note.cluster_id:
                wait.reply = message
                wait.event.set()
        elif isinstance(message, msg.PushDone):
            if self._on_push_done is not None:
                self._on_push_done(note.cluster_id, message)
        elif self._server is None:
            _log.warning("%s from cluster %d ignored: this worker is not a KV producer", type(message).__name__,
                         note.cluster_id)
        elif isinstance(message, msg.Hello):
            self._serve_hello(owner, message)
        elif isinstance(message, msg.Claim):
            self._serve_claim(owner, message)
        elif isinstance(message, msg.Release):
            self._server.on_release(owner, message)
        elif isinstance(message, msg.Renew):
            self._server.on_renew(owner, message)
        elif isinstance(message, msg.PushReady):
            refused = self._refused.get(owner) or (self._mismatch(message) if message.geometry != self._geometry
                                                   else "")
            if refused:
                self.push_done(note.cluster_id, msg.PushDone(message.transfer_id, False, refused))
            else:
                self._server.on_push_ready(owner, message)

    def _refuse_version(self, note: notifications.Notification) -> None:
        """Prefill side: answer a message of another schema version with a refusal every version can read."""
        version = note.payload[0] if note.payload else None
        if self._server is None or version in (None, msg.REFUSAL_VERSION, msg.SCHEMA_VERSION):
            return
        reason = (f"protocol: prefill {msg.SCHEMA_VERSION}, decode {version} (the connector's message schema "
                  f"version): run the same llm_datadist version on prefill and decode")
        try:
            notifications.send(self._datadist, note.cluster_id, msg.encode_refusal(reason), self._timeout_ms)
        except LLMException as exc:
            _log.info("refusal to cluster %d not delivered: %s", note.cluster_id, exc)

    def _on_refusal(self, cluster_id: int, refusal: msg.Refusal) -> None:
        """Decode side: the prefill can not read our messages: fail every wait on it with its reason."""
        _log.warning("prefill cluster %d (connector protocol %d) refused our messages: %s", cluster_id,
                     refusal.protocol, refusal.reason)
        with self._lock:
            waits = [wait for wait in self._waits.values() if wait.cluster_id == cluster_id]
        for wait in waits:
            wait.refused = refusal.reason
            wait.event.set()

    def _serve_hello(self, owner: Owner, message: msg.Hello) -> None:
        reason = ""
        if self._fingerprint is not None:
            differences = mismatches(message.fingerprint, self._fingerprint)
            if differences:
                reason = describe(differences, message.fingerprint, self._fingerprint)
                _log.warning("decode cluster %d: %s", owner[0], reason)
        with self._lock:
            if reason:
                self._refused[owner] = reason
            else:
                self._refused.pop(owner, None)
        reply = msg.HelloReply(message.seq, self._fingerprint, self._lease_s, reason)
        try:
            notifications.send(self._datadist, owner[0], msg.encode(reply), self._timeout_ms)
        except LLMException as exc:
            _log.info("hello reply to cluster %d not delivered: %s", owner[0], exc)

    def _mismatch(self, message) -> str:
        return (f"the decode has KV geometry {message.geometry}, this prefill {self._geometry}: run the same model "
                f"and block size")

    def _serve_claim(self, owner: Owner, message: msg.Claim) -> None:
        assert self._server is not None
        refused = self._refused.get(owner)
        if refused:
            reply = msg.ClaimReply(message.seq, False, reason=refused)
        elif message.geometry != self._geometry:
            reply = msg.ClaimReply(message.seq, False, reason=self._mismatch(message))
        else:
            reply = self._server.on_claim(owner, message)
        try:
            notifications.send(self._datadist, owner[0], msg.encode(reply), self._timeout_ms)
        except LLMException as exc:  # the decode times the claim out (or its link is gone: the hold goes too)
            _log.info("claim reply to cluster %d not delivered: %s", owner[0], exc)

    def _on_link_down(self, down: notifications.LinkDown) -> None:
        if self._server is not None:
            with self._lock:
                self._refused.pop((down.cluster_id, down.link_id), None)
            self._server.on_decode_gone((down.cluster_id, down.link_id))
        if down.linked:
            return  # another link to that cluster is up: waits on it go on
        with self._lock:
            waits = [wait for wait in self._waits.values() if wait.cluster_id == down.cluster_id]
        for wait in waits:
            wait.event.set()
        if self._on_prefill_lost is not None:
            self._on_prefill_lost(down.cluster_id)

    # -- decode side ----------------------------------------------------------------------------------
    def _send(self, cluster_id: int, message: msg.Message) -> None:
        try:
            notifications.send(self._datadist, cluster_id, msg.encode(message), self._timeout_ms)
        except LLMException as exc:
            raise ConnectionError(f"prefill cluster {cluster_id}: {type(message).__name__} not delivered "
                                  f"({exc.status_code.name})") from exc

    def _request(self, cluster_id: int, make: Callable[[int], msg.Message], what: str, about: str = "") -> _Reply:
        """Send the message ``make(seq)`` and wait (at most the timeout) for the reply with that seq."""
        seq = next(self._seq)
        wait = _Wait(cluster_id)
        with self._lock:
            self._waits[seq] = wait
        try:
            self._send(cluster_id, make(seq))
            if not wait.event.wait(self._timeout_ms / 1000.0) or wait.reply is None:
                if wait.refused:
                    raise IncompatiblePeer(f"prefill cluster {cluster_id} refused the {what}: {wait.refused}")
                raise ConnectionError(f"prefill cluster {cluster_id} gave no {what} reply{about} "
                                      f"({'link lost' if wait.event.is_set() else 'timed out'})")
            return wait.reply
        finally:
            with self._lock:
                self._waits.pop(seq, None)

    def hello(self, cluster_id: int) -> Optional[msg.HelloReply]:
        """Exchange fingerprints with a linked prefill (once per link, before claims and hand-offs); returns its
        reply (its fingerprint and default lease), None when this side has no fingerprint to check.

        Raises:
            IncompatiblePeer: the two sides differ in a compared field (named, with both values).
            ConnectionError: not delivered, the link went down, or no reply in time.
        """
        fingerprint = self._fingerprint
        if fingerprint is None:
            return None
        reply = self._request(cluster_id, lambda seq: msg.Hello(seq, fingerprint), "hello")
        if not isinstance(reply, msg.HelloReply):
            raise ConnectionError(f"prefill cluster {cluster_id} answered a hello with {type(reply).__name__}")
        if reply.fingerprint is not None:
            differences = mismatches(fingerprint, reply.fingerprint)
            if differences:
                raise IncompatiblePeer(describe(differences, fingerprint, reply.fingerprint))
        if reply.reason:
            raise IncompatiblePeer(reply.reason)
        return reply

    def renew(self, cluster_id: int, request_ids: List[str], transfer_ids: List[str]) -> None:
        """Extend the leases of these requests on a linked prefill (returns once it queued the renewal).

        Raises:
            ConnectionError: not delivered.
        """
        self._send(cluster_id, msg.Renew(list(request_ids), list(transfer_ids)))

    def claim(self, cluster_id: int, request_id: str, sharers: int = 1,
              geometry: Optional[msg.Geometry] = None) -> msg.ClaimReply:
        """Bind ``request_id``'s held blocks on a linked prefill to our link; waits at most the timeout.

        ``sharers`` decode ranks claim it (the prefill frees it after as many releases); ``geometry`` is the one
        the prefill must have (default: ours).

        Raises:
            ConnectionError: not delivered, the link went down, or no reply in time.
        """
        claim_geometry = geometry or self._geometry
        reply = self._request(cluster_id, lambda seq: msg.Claim(seq, request_id, claim_geometry, sharers),
                              "claim", f" for {request_id}")
        if not isinstance(reply, msg.ClaimReply):
            raise ConnectionError(f"prefill cluster {cluster_id} answered a claim with {type(reply).__name__}")
        return reply

    def release(self, cluster_id: int, request_ids: List[str]) -> None:
        """Tell the prefill it may free these requests' blocks (best effort: a link that goes down frees them too)."""
        try:
            self._send(cluster_id, msg.Release(list(request_ids)))
        except ConnectionError as exc:
            _log.info("release of %d requests: %s", len(request_ids), exc)

    def push_ready(self, cluster_id: int, transfer_id: str, dst_block_ids: List[int], num_tokens: int,
                   first_block: int, group_sizes: Sequence[int] = ()) -> None:
        """Hand a prefill the destination blocks of a push (``group_sizes``: of each KV cache group, see
        ``kv_groups``; empty for one group).

        Raises:
            ConnectionError: not delivered.
        """
        self._send(cluster_id, msg.PushReady(transfer_id, list(dst_block_ids), num_tokens, self._geometry,
                                             first_block, list(group_sizes)))

    # -- prefill side ---------------------------------------------------------------------------------
    def push_done(self, cluster_id: int, message: msg.PushDone) -> None:
        """Tell a decode how its push ended (best effort: a decode that is gone has nobody to tell)."""
        try:
            self._send(cluster_id, message)
        except ConnectionError as exc:
            _log.info("push %s: %s", message.transfer_id, exc)

    def close(self) -> None:
        """Stop taking messages and fail every waiting claim; idempotent (finalize drops the callbacks too)."""
        if self._closed:
            return
        self._closed = True
        for unset in (notifications.set_callback, notifications.on_link_down):
            try:
                unset(self._datadist, None)
            except (RuntimeError, LLMException):
                pass  # already finalized
        with self._lock:
            waits = list(self._waits.values())
        for wait in waits:
            wait.event.set()
