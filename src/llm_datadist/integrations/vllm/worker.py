"""Worker side of the connector: registers vLLM's KV cache, serves decodes (prefill), loads requests (decode)."""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Dict, Hashable, Mapping, Optional, Set, Tuple

from llm_datadist.integrations.vllm import messages as msg
from llm_datadist.integrations.vllm.block_layout import KVLayout, layout_of
from llm_datadist.integrations.vllm.config import ConnectorConfig, connector_logger
from llm_datadist.integrations.vllm.control import Control, Owner
from llm_datadist.integrations.vllm.datadist import (new_cluster_id, placement_of, prefill_cluster_id, register_layout,
                                                     start_datadist)
from llm_datadist.integrations.vllm.holds import HoldTable
from llm_datadist.integrations.vllm.loader import Loader
from llm_datadist.integrations.vllm.metadata import StepMetadata, WorkerEndpoint
from llm_datadist.integrations.vllm.pusher import Pusher
from llm_datadist.integrations.vllm.renewal import Renewer
from llm_datadist.integrations.vllm.stats import SERVED, ServedCounter, TransferRecorder, collect_step
from llm_datadist.integrations.vllm.tp_map import heads_per_rank

__all__ = ["WorkerSide", "PUSH_OWNER"]

PUSH_OWNER = "push"  # the hold owner while a push runs (decode links, as (cluster id, link id), own claimed pulls)

_log = connector_logger(__name__)


class _CudaReady:
    """Completes the KV writes queued on the current CUDA stream so far (recorded at construction)."""

    def __init__(self, torch: Any) -> None:
        self._event = torch.cuda.Event()
        self._event.record()

    def synchronize(self) -> None:
        """Block until the recorded KV writes are complete."""
        self._event.synchronize()


@dataclasses.dataclass
class _Shared:
    """A hold several decode ranks pull (a decode of more TP ranks): freed after ``sharers`` of them released."""

    sharers: int
    claimed: Set[Hashable] = dataclasses.field(default_factory=set)
    released: Set[Hashable] = dataclasses.field(default_factory=set)


def _shared_owner(request_id: str) -> Tuple[str, str]:
    return ("tp-shared", request_id)


class WorkerSide:
    """One per vLLM worker (TP rank). Producers listen; consumers link lazily to the prefills they load from.

    It is the prefill side's ``control.PrefillHandler``: decodes' claims, releases and push hand-offs arrive as
    notifications over their links, and a decode's link going down frees what it claimed.
    """

    def __init__(self, config: ConnectorConfig, producer: bool, consumer: bool, block_size: int, num_blocks: int,
                 tp_rank: int, tp_size: int = 1, total_kv_heads: int = 0,
                 fingerprint: Optional[msg.Fingerprint] = None, windows: Tuple[int, ...] = ()) -> None:
        self._config = config
        self._windows = windows  # per KV cache group: blocks a decode needs from the prompt's end (kv_groups)
        self._fingerprint = fingerprint  # what a peer must match (compat); None: no check
        self.renewer: Optional[Renewer] = None
        self._producer = producer
        self._consumer = consumer
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._tp_rank = tp_rank
        self._tp_size = tp_size
        self._total_kv_heads = total_kv_heads  # the model's KV heads (an MLA latent is one); 0: not known
        self._port = config.listen_port + tp_rank if producer and config.listen_port else 0
        self.cluster_id = prefill_cluster_id(config.host, self._port) if self._port else new_cluster_id()
        self.layout: Optional[KVLayout] = None
        self.kv_caches: Dict[str, Any] = {}
        self.holds = HoldTable()
        self._datadist: Any = None
        self._datadist_port = 0
        self.control: Optional[Control] = None
        self.loader: Optional[Loader] = None
        self.pusher: Optional[Pusher] = None
        self._geometry: Optional[msg.Geometry] = None
        self._failed_blocks: Set[int] = set()
        self._failed_requests: Set[str] = set()  # failed loads of several KV cache groups (reported by request)
        self._shared: Dict[str, _Shared] = {}  # request id -> releases of a hold several decode ranks claimed
        self._shared_lock = threading.Lock()
        self._closed = False
        self.recorder = TransferRecorder()  # holds that expired unclaimed, for vLLM's metrics
        self._served = ServedCounter()  # per-step deltas of llm_datadist's served counters

    # -- start-up -----------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Mapping[str, Any]) -> None:
        """Register every layer's KV tensor in one llm_datadist blocks cache, then start listening/loading."""
        heads = heads_per_rank(self._tp_size, self._total_kv_heads) if self._total_kv_heads else 1
        layout = layout_of(kv_caches, self._num_blocks, heads)
        if layout.heads != heads:
            _log.warning("llm_datadist connector: the KV blocks of this rank are not head-major (HND) with %d heads; "
                         "only a prefill or decode of the same tensor-parallel size can exchange KV with it", heads)
        self.layout, self.kv_caches = layout, dict(kv_caches)
        self._geometry = msg.Geometry(layout.num_regions, layout.sub_block_nbytes, self._block_size,
                                      len(layout.layer_names), layout.heads)
        first = next(iter(kv_caches.values()))
        device_id = int(first.device.index or 0) if layout.device_type != "cpu" else 0
        self._datadist, self._datadist_port = start_datadist(self._config, self._producer, self.cluster_id,
                                                             device_id, self._port)
        placement = placement_of(self._config, layout.device_type)
        cache = register_layout(self._datadist, layout, placement, self.cluster_id, self._config.model_id)
        if self._consumer:
            self.loader = Loader(self._config, self._datadist, cache, layout, self._geometry, self.cluster_id,
                                 self._tp_rank, self._tp_size, self._total_kv_heads, self._windows)
        self.control = Control(self._datadist, self._geometry, self._config.link_timeout_ms,
                               server=self if self._producer else None,
                               on_push_done=self.loader.on_push_done if self.loader else None,
                               on_prefill_lost=self.loader.on_prefill_lost if self.loader else None,
                               fingerprint=self._fingerprint, lease_s=self._config.lease_s)
        if self.loader is not None:
            self.loader.control = self.control
            self.renewer = Renewer(self._config.lease_renew_s, self.loader.endpoints_of, self.loader.peer_lease,
                                   self.control.renew)
            self.renewer.start()
        if self._producer:
            self.pusher = Pusher(self._config, self._datadist, cache, layout, self._block_size,
                                  self._claim_push, self._release_push, self.control.push_done, self._windows)
        _log.info("llm_datadist connector: %d layers x %d regions of %d blocks x %d bytes (%d KV heads) registered "
                  "(%s, %s); TP rank %d of %d; cluster %d%s", len(layout.layer_names), layout.regions_per_layer,
                  layout.num_blocks, layout.block_nbytes, layout.heads, layout.device_type, placement.name,
                  self._tp_rank, self._tp_size, self.cluster_id,
                  f", listening on {self._config.host}:{self._datadist_port}" if self._producer else "")

    def endpoint(self) -> Optional[WorkerEndpoint]:
        """The llm_datadist address and cluster id (producers only), for the scheduler's kv_transfer_params."""
        if not self._producer or not self._datadist_port:
            return None
        return WorkerEndpoint(self._config.host, self._datadist_port, self.cluster_id)

    @property
    def geometry(self) -> Optional[msg.Geometry]:
        """This worker's KV geometry (after ``register_kv_caches``)."""
        return self._geometry

    # -- control.PrefillHandler (notification thread) -------------------------------------------------
    def on_claim(self, owner: Owner, message: msg.Claim) -> msg.ClaimReply:
        """Bind the hold to the decode's link (after its KV writes are complete); a hold that several decode ranks
        pull is bound to all of them."""
        if message.sharers > 1:
            hold, reason = self._claim_shared(owner, message.request_id, message.sharers)
        else:
            hold, reason = self.holds.claim(message.request_id, owner)
        if hold is None:
            return msg.ClaimReply(message.seq, False, reason=reason)
        if hold.ready is not None:
            hold.ready.synchronize()
        return msg.ClaimReply(message.seq, True, block_ids=list(hold.block_ids), group_sizes=list(hold.group_sizes))

    def _claim_shared(self, owner: Owner, request_id: str, sharers: int) -> Tuple[Any, str]:
        with self._shared_lock:
            hold, reason = self.holds.claim(request_id, _shared_owner(request_id))
            if hold is not None:
                self._shared.setdefault(request_id, _Shared(sharers)).claimed.add(owner)
            return hold, reason

    def _release_share(self, owner: Hashable, request_id: str, why: str, claimers_only: bool = False) -> bool:
        """Count one decode rank's release of a shared hold (True: the hold is shared and the owner counted); the
        last one frees it."""
        with self._shared_lock:
            shared = self._shared.get(request_id)
            if shared is None or (claimers_only and owner not in shared.claimed):
                return False
            shared.released.add(owner)
            if len(shared.released) < shared.sharers:
                return True
            del self._shared[request_id]
        self.holds.release(request_id, why, owner=_shared_owner(request_id))
        return True

    def on_renew(self, owner: Owner, message: msg.Renew) -> None:
        """The decode still wants these requests (queued or loading): extend their leases."""
        request_ids = list(message.request_ids)
        if message.transfer_ids and self.pusher is not None:
            request_ids += self.pusher.request_ids_of(message.transfer_ids)
        self.holds.renew(request_ids)

    def on_release(self, owner: Owner, message: msg.Release) -> None:
        """Free the holds this decode link claimed and now releases."""
        for request_id in message.request_ids:
            if not self._release_share(owner, request_id, "released by the decode"):
                self.holds.release(request_id, "released by the decode", owner=owner)

    def on_push_ready(self, owner: Owner, message: msg.PushReady) -> None:
        """Pass a push hand-off to the pusher."""
        if self.pusher is not None:
            self.pusher.on_push_ready(owner, message)

    def on_decode_gone(self, owner: Owner) -> None:
        """Free every hold the decode claimed over the link that went down."""
        released = self.holds.release_owner(owner, "decode disconnected")
        with self._shared_lock:  # a shared hold stays for the decode ranks still pulling it: count this one out
            shared_ids = list(self._shared)
        for request_id in shared_ids:
            self._release_share(owner, request_id, "decode disconnected", claimers_only=True)
        if released:
            _log.info("decode cluster %s disconnected: freeing the blocks of %d claimed requests", owner[0],
                      len(released))
        if self.pusher is not None:
            self.pusher.on_closed(owner)

    def _claim_push(self, request_id: str) -> bool:
        return self.holds.claim(request_id, PUSH_OWNER, leased=False)[0] is not None

    def _release_push(self, request_id: str, why: str) -> None:
        self.holds.release(request_id, why, owner=PUSH_OWNER)

    # -- steps (model runner thread) ----------------------------------------------------------------
    def _ready_marker(self) -> Optional[Any]:
        if self.layout is None or self.layout.device_type != "cuda":
            return None
        import torch

        return _CudaReady(torch)

    def begin_step(self, meta: StepMetadata) -> None:
        """Before the forward: drop holds vLLM did not keep, start layer-wise pushes."""
        for request_id in meta.not_kept:
            self.holds.drop(request_id)
        if self.renewer is not None:  # decode requests taken in: renew their holds while they wait in the queue
            for request_id, params in meta.wanted:
                self.renewer.add(request_id, params)
        if self.pusher is not None:
            self.pusher.drop(meta.not_kept)
        if self.pusher is not None and meta.holds:
            self.pusher.begin_step(meta.holds)

    def start_loads(self, meta: StepMetadata) -> None:
        """Queue this step's loads (they run between scheduler steps)."""
        if self.loader is None:
            if meta.loads:
                _log.error("this vLLM instance is not a KV consumer (kv_role), %d loads ignored", len(meta.loads))
            return
        if self.renewer is not None:  # renew the holds of loading requests until their loads end
            for job in meta.loads:
                if job.num_tokens:
                    self.renewer.add(job.request_id, job.params)
                else:
                    self.renewer.remove([job.request_id])
        for job in meta.loads:
            self.loader.submit(job)

    def layer_saved(self, layer_name: str) -> None:
        """``save_kv_layer``: the layer's KV of this step is written."""
        if self.pusher is not None:
            self.pusher.layer_saved(layer_name, self._ready_marker())

    def end_step(self, meta: Optional[StepMetadata]) -> None:
        """After the forward: the completed prompts' blocks are now held for their decodes (and pushed)."""
        if meta is not None and meta.holds:
            ready = self._ready_marker()
            for hold in meta.holds:
                self.holds.hold(hold.request_id, list(hold.block_ids), hold.lease_s or self._config.lease_s, ready,
                                hold.group_sizes)
        if self.pusher is not None:
            self.pusher.end_step()

    def get_finished(self, finished_req_ids: Set[str]) -> Tuple[Set[str], Set[str]]:
        """(finished sending: released and finished requests, finished receiving: ended loads)."""
        expired = self.holds.expire()
        if expired:
            self.recorder.failure(SERVED, "lease_expired", len(expired))
        if self.pusher is not None:
            self.pusher.drop(expired)
            self.pusher.expire(self._config.lease_s)
        sending = self.holds.take_freeable(set(finished_req_ids))
        if self._shared:
            self._forget_unheld_shares()
        receiving: Set[str] = set()
        if self.loader is not None:
            receiving, failed = self.loader.take_finished()
            self._failed_blocks.update(failed)
            self._failed_requests.update(self.loader.take_failed_requests())
            if self.renewer is not None and receiving:
                self.renewer.remove(list(receiving))
        return sending, receiving

    def _forget_unheld_shares(self) -> None:
        held = set(self.holds.held_ids())
        with self._shared_lock:
            for request_id in [rid for rid in self._shared if rid not in held]:
                del self._shared[request_id]

    def take_stats(self) -> Optional[Dict[str, Any]]:
        """What this worker moved since the last call (``stats.ConnectorStats.data``): its loads and pushes, and
        what decodes pulled from it (llm_datadist's served counters); None when nothing happened."""
        parts = [self.recorder] + [part.recorder for part in (self.loader, self.pusher) if part is not None]
        return collect_step(parts, self._served if self._producer else None, self._datadist)

    def take_failed_requests(self) -> Set[str]:
        """Requests of several KV cache groups whose load failed, reported once (after ``get_finished`` named them)."""
        failed, self._failed_requests = self._failed_requests, set()
        return failed

    def take_failed_blocks(self) -> Set[int]:
        """Local blocks of loads that failed, reported once (after ``get_finished`` named their requests)."""
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def close(self) -> None:
        """Stop serving and loading, then finalize llm_datadist; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.renewer is not None:
            self.renewer.close()
        if self.loader is not None:
            self.loader.close()
        if self.pusher is not None:
            self.pusher.close()
        if self.control is not None:
            self.control.close()
        if self._datadist is not None:
            self._datadist.finalize()
