"""Prefill side of push mode: each layer's blocks go to the decode while the next layers compute.

The decode sends ``PushReady`` (its block ids) as a notification over its llm_datadist link. When it is there
before the step that completes the prompt starts, a layer-wise ``transfer_cache_async`` runs during the forward,
gated by ``save_kv_layer``; when it comes later, the whole request is pushed at once. Either way the decode gets
``PushDone`` (a successful one attached to the last push, so it arrives after the bytes), and the blocks are
released when the push ends.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from llm_datadist import (BlocksCacheKey, Cache, LayerSynchronizer, LLMDataDist, LLMException, LLMStatusCode,
                          TransferWithCacheKeyConfig, notifications)
from llm_datadist.integrations.vllm import messages as msg
from llm_datadist.integrations.vllm.block_layout import KVLayout
from llm_datadist.integrations.vllm.config import ConnectorConfig, connector_logger
from llm_datadist.integrations.vllm.control import Owner
from llm_datadist.integrations.vllm.kv_groups import grouped_block_pairs
from llm_datadist.integrations.vllm.metadata import HoldJob
from llm_datadist.integrations.vllm.stats import PUSHED, TransferRecorder

__all__ = ["StepGate", "Pusher"]

_log = connector_logger(__name__)
_STOP = object()


class StepGate(LayerSynchronizer):
    """Layer readiness of one forward step; library layer j covers cache tensors 2j and 2j+1, which are ready once
    every vLLM layer writing them is saved (``KVLayout.writers``: several, where KV cache groups share a tensor)."""

    def __init__(self, layout: KVLayout, timeout_s: float) -> None:
        self._events = [threading.Event() for _ in layout.layer_names]
        self._ready: List[Optional[Any]] = [None] * len(layout.layer_names)
        self._layout = layout
        self._timeout_s = timeout_s

    def layer_done(self, layer: int, ready: Optional[Any] = None) -> None:
        """vLLM saved ``layer`` (``ready.synchronize()`` completes its writes, e.g. a CUDA event)."""
        self._ready[layer] = ready
        self._events[layer].set()

    def finish(self) -> None:
        """The forward is over: every layer is written."""
        for event in self._events:
            event.set()

    def synchronize_layer(self, layer_index: int, timeout_in_millis: Optional[int]) -> bool:
        """Wait (bounded by the transfer timeout) until both tensors of library layer j are written."""
        regions = range(2 * layer_index, min(2 * layer_index + 2, self._layout.num_regions))
        deadline = time.monotonic() + self._timeout_s
        for vllm_layer in sorted({layer for region in regions for layer in self._layout.writers(region)}):
            if not self._events[vllm_layer].wait(max(0.0, deadline - time.monotonic())):
                return False
            ready = self._ready[vllm_layer]
            if ready is not None:
                ready.synchronize()
        return True


@dataclasses.dataclass
class _Push:
    hold: HoldJob
    owner: Optional[Owner] = None  # the decode (cluster id, link id) that sent the hand-off
    ready: Optional[msg.PushReady] = None
    task: Any = None


class Pusher:
    """Push states by transfer id, and one daemon thread that completes pushes and answers decodes."""

    def __init__(self, config: ConnectorConfig, datadist: LLMDataDist, cache: Cache, layout: KVLayout,
                 block_size: int, claim: Callable[[str], bool], release: Callable[[str, str], None],
                 push_done: Callable[[int, msg.PushDone], None], windows: Sequence[int] = ()) -> None:
        self._config = config
        self._windows = tuple(windows)  # per KV cache group: blocks from the prompt's end (kv_groups; 0: all)
        self._datadist = datadist
        self._cache = cache
        self._layout = layout
        self._block_size = block_size
        self._claim = claim
        self._release = release
        self._push_done = push_done  # a failed push's PushDone (a successful one goes with the last push)
        self._lock = threading.Lock()
        self._early: Dict[str, Tuple[Owner, msg.PushReady, float]] = {}  # decode ready first
        self._waiting: Dict[str, _Push] = {}  # computed, decode not ready yet
        self._step: List[_Push] = []  # pushes whose prompt completes in the running forward
        self._layer_index = {name: i for i, name in enumerate(layout.layer_names)}
        self._gate: Optional[StepGate] = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self.counts: Dict[str, int] = {"layerwise": 0, "after_forward": 0, "failed": 0}
        self.recorder = TransferRecorder()  # since the last step, for vLLM's metrics (WorkerSide.take_stats)
        self._thread = threading.Thread(target=self._run, name="llm-dd-vllm-push", daemon=True)
        self._thread.start()

    # -- forward hooks (model runner thread) --------------------------------------------------------
    def begin_step(self, holds: List[HoldJob]) -> None:
        """Before the forward: start a layer-wise push for every completed prompt whose decode is ready."""
        pushes = [hold for hold in holds if hold.mode == "push"]
        self._gate = None
        if not pushes:
            return
        gate = StepGate(self._layout, self._config.transfer_timeout_ms / 1000.0)
        self._gate = gate
        for hold in pushes:
            with self._lock:
                early = self._early.pop(hold.transfer_id, None)
            state = _Push(hold)
            if early is not None:
                state.owner, state.ready = early[0], early[1]
                state.task = self._start_layerwise(state, gate)
            self._step.append(state)

    def layer_saved(self, layer_name: str, ready: Optional[Any] = None) -> None:
        """``save_kv_layer``: the layer's KV of this step is written (or will be after ``ready``)."""
        index = self._layer_index.get(layer_name)
        if self._gate is not None and index is not None:
            self._gate.layer_done(index, ready)

    def end_step(self) -> None:
        """After the forward: complete running pushes, push at once where the decode is ready, wait otherwise."""
        if self._gate is not None:
            self._gate.finish()
            self._gate = None
        step, self._step = self._step, []
        for state in step:
            if state.ready is None:  # the decode's hand-off had not arrived at the start of the forward
                with self._lock:
                    early = self._early.pop(state.hold.transfer_id, None)
                    if early is None:
                        self._waiting[state.hold.transfer_id] = state
                        continue
                state.owner, state.ready = early[0], early[1]
            self._queue.put(state)

    # -- control messages (notification thread) -----------------------------------------------------
    def on_push_ready(self, owner: Owner, message: msg.PushReady) -> None:
        """A decode's block ids: push now if the prompt is computed, else keep them for its step."""
        with self._lock:
            state = self._waiting.pop(message.transfer_id, None)
            if state is None:
                self._early[message.transfer_id] = (owner, message, time.monotonic())
                return
        state.owner, state.ready = owner, message
        self._queue.put(state)

    def on_closed(self, owner: Owner) -> None:
        """Forget the hand-offs of a decode whose link went down."""
        with self._lock:
            for tid in [tid for tid, early in self._early.items() if early[0] == owner]:
                del self._early[tid]

    def request_ids_of(self, transfer_ids: List[str]) -> List[str]:
        """The prefill requests of these pushes that wait for their decode's hand-off (renewed by transfer id)."""
        with self._lock:
            return [self._waiting[tid].hold.request_id for tid in transfer_ids if tid in self._waiting]

    def ready_transfer_ids(self) -> List[str]:
        """Transfers whose decode is ready but whose prompt has not been computed yet."""
        with self._lock:
            return list(self._early)

    def drop(self, request_ids: List[str]) -> None:
        """These requests' blocks are freed (lease expired, or not kept): never push them any more."""
        if not request_ids:
            return
        gone = set(request_ids)
        with self._lock:
            for tid in [tid for tid, state in self._waiting.items() if state.hold.request_id in gone]:
                del self._waiting[tid]

    def expire(self, older_than_s: float) -> None:
        """Forget decode hand-offs that no prefill request claimed for ``older_than_s`` seconds."""
        limit = time.monotonic() - older_than_s
        with self._lock:
            for tid in [tid for tid, early in self._early.items() if early[2] < limit]:
                del self._early[tid]

    # -- transfers ----------------------------------------------------------------------------------
    @staticmethod
    def _ready(state: _Push) -> msg.PushReady:
        if state.ready is None:  # pushes are queued once the decode is ready; a failure to report, never a crash
            raise ValueError(f"transfer {state.hold.transfer_id}: the decode's hand-off has not arrived")
        return state.ready

    def _pairs(self, state: _Push) -> Tuple[List[int], List[int]]:
        """Source and destination blocks of the registered caches (every head of each block: the decode has this
        rank's heads per block, its PushReady geometry says so)."""
        ready = self._ready(state)
        src, dst = grouped_block_pairs(state.hold.block_ids, ready.dst_block_ids, ready.num_tokens, self._block_size,
                                       ready.first_block, state.hold.group_sizes, ready.group_sizes, self._windows)
        return self._layout.sub_blocks(src), self._layout.sub_blocks(dst)

    def _dest(self, state: _Push) -> BlocksCacheKey:
        if state.owner is None:
            raise ValueError(f"transfer {state.hold.transfer_id}: no decode sent its hand-off")
        return BlocksCacheKey(state.owner[0], self._config.model_id)

    def _start_layerwise(self, state: _Push, gate: StepGate) -> Any:
        layers = self._layout.num_regions // 2
        if layers == 0:
            return None
        try:
            src, dst = self._pairs(state)
            if not src:
                return None
            config = TransferWithCacheKeyConfig(self._dest(state), range(0, layers), range(0, layers))
            return self._datadist.cache_manager.transfer_cache_async(self._cache, gate, [config], src, dst)
        except (LLMException, ValueError, TypeError) as exc:
            _log.info("transfer %s: layer-wise push not started (%s); pushing after the forward",
                      state.hold.transfer_id, exc)
            return None

    def _push_rest(self, state: _Push, first_region: int, done: msg.PushDone) -> None:
        """Push the regions from ``first_region`` on with ``done`` attached (the decode gets it after the bytes);
        with nothing left to push, ``done`` alone (the layer-wise push's bytes are in place already)."""
        src, dst = self._pairs(state)
        regions = range(first_region, self._layout.num_regions)
        if src and len(regions):
            notifications.push_blocks(self._datadist, self._dest(state), self._cache, src, dst, msg.encode(done),
                                      src_layer_range=regions, dst_layer_range=regions, tensor_num_per_layer=1,
                                      timeout_ms=self._config.link_timeout_ms)
        else:
            notifications.send(self._datadist, self._dest(state).cluster_id, msg.encode(done),
                               self._config.link_timeout_ms)

    def _nbytes(self, state: _Push) -> int:
        src, _ = self._pairs(state)
        return len(src) * self._layout.num_regions * self._layout.sub_block_nbytes

    def _complete(self, state: _Push) -> Tuple[bool, str]:
        """Finish the push and tell the decode; (ok, reason) where a failure has not been told yet."""
        try:
            first_region = 0
            if state.task is not None:
                code = state.task.synchronize(self._config.transfer_timeout_ms * 2)
                if code != LLMStatusCode.LLM_SUCCESS:
                    return False, f"layer-wise push failed: {LLMStatusCode(code).name}"
                first_region = 2 * (self._layout.num_regions // 2)
            done = msg.PushDone(state.hold.transfer_id, True, "", self._nbytes(state))
            self._push_rest(state, first_region, done)
            return True, ""
        except notifications.NotificationNotDelivered as exc:  # pushed, but the decode was not told: it times out
            _log.warning("transfer %s: pushed, but PushDone not delivered: %s", state.hold.transfer_id, exc)
            return True, ""
        except (LLMException, ValueError, TypeError) as exc:
            return False, str(exc)

    def _run(self) -> None:
        while True:
            state = self._queue.get()
            if state is _STOP:
                return
            began = time.monotonic()
            claimed = self._claim(state.hold.request_id)
            if claimed:
                try:
                    ok, reason = self._complete(state)
                except Exception as exc:  # noqa: BLE001 - this thread must answer every decode
                    _log.exception("transfer %s: unexpected push failure", state.hold.transfer_id)
                    ok, reason = False, repr(exc)
            else:
                ok, reason = False, "the prefill no longer holds the request's blocks (lease expired)"
                if state.task is not None:
                    state.task.synchronize(self._config.transfer_timeout_ms * 2)
            self.counts["failed" if not ok else "layerwise" if state.task is not None else "after_forward"] += 1
            if ok:
                self.recorder.transfer(PUSHED, self._nbytes(state), time.monotonic() - began)
            else:
                self.recorder.failure(PUSHED, "push_failed" if claimed else "lease_expired")
            if not ok:
                _log.warning("transfer %s: push to cluster %s failed: %s", state.hold.transfer_id,
                             state.owner[0] if state.owner is not None else "?", reason)
                if state.owner is not None:
                    self._push_done(state.owner[0], msg.PushDone(state.hold.transfer_id, False, reason, 0))
            self._release(state.hold.request_id, "pushed" if ok else "push failed")

    def close(self) -> None:
        """Stop the push thread (queued pushes are abandoned); idempotent."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(2.0)
