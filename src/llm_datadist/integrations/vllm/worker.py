"""Worker side of the connector: registers vLLM's KV cache, serves decodes (prefill), loads requests (decode)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Set, Tuple

from llm_datadist.integrations.vllm import protocol as proto
from llm_datadist.integrations.vllm.block_layout import KVLayout, layout_of
from llm_datadist.integrations.vllm.config import ConnectorConfig, connector_logger
from llm_datadist.integrations.vllm.datadist import new_cluster_id, placement_of, register_layout, start_datadist
from llm_datadist.integrations.vllm.holds import HoldTable
from llm_datadist.integrations.vllm.loader import Loader
from llm_datadist.integrations.vllm.metadata import StepMetadata, WorkerEndpoint
from llm_datadist.integrations.vllm.pusher import Pusher
from llm_datadist.integrations.vllm.side_channel import ControlServer, ServerConnection, ServerHandler

__all__ = ["WorkerSide", "PUSH_OWNER"]

PUSH_OWNER = "push"  # the hold owner while a push runs (decode connections own claimed pulls)

_log = connector_logger(__name__)


class _CudaReady:
    """Completes the KV writes queued on the current CUDA stream so far (recorded at construction)."""

    def __init__(self, torch: Any) -> None:
        self._event = torch.cuda.Event()
        self._event.record()

    def synchronize(self) -> None:
        """Block until the recorded KV writes are complete."""
        self._event.synchronize()


class WorkerSide(ServerHandler):
    """One per vLLM worker (TP rank). Producers listen; consumers link lazily to the prefills they load from."""

    def __init__(self, config: ConnectorConfig, producer: bool, consumer: bool, block_size: int, num_blocks: int,
                 tp_rank: int) -> None:
        self._config = config
        self._producer = producer
        self._consumer = consumer
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._tp_rank = tp_rank
        self.cluster_id = new_cluster_id()
        self.layout: Optional[KVLayout] = None
        self.kv_caches: Dict[str, Any] = {}
        self.holds = HoldTable()
        self._datadist: Any = None
        self._datadist_port = 0
        self._server: Optional[ControlServer] = None
        self.loader: Optional[Loader] = None
        self.pusher: Optional[Pusher] = None
        self._geometry: Optional[proto.Geometry] = None
        self._failed_blocks: Set[int] = set()
        self._closed = False

    # -- start-up -----------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Mapping[str, Any]) -> None:
        """Register every layer's KV tensor in one llm_datadist blocks cache, then start listening/loading."""
        layout = layout_of(kv_caches, self._num_blocks)
        self.layout, self.kv_caches = layout, dict(kv_caches)
        self._geometry = proto.Geometry(layout.num_regions, layout.block_nbytes, self._block_size,
                                        len(layout.layer_names))
        first = next(iter(kv_caches.values()))
        device_id = int(first.device.index or 0) if layout.device_type != "cpu" else 0
        self._datadist, self._datadist_port = start_datadist(self._config, self._producer, self.cluster_id,
                                                             device_id)
        placement = placement_of(self._config, layout.device_type)
        cache = register_layout(self._datadist, layout, placement, self.cluster_id, self._config.model_id)
        if self._producer:
            port = self._config.side_channel_port + self._tp_rank if self._config.side_channel_port else 0
            self._server = ControlServer(self._config.host, port, self._config.link_secret, self,
                                         self._config.link_timeout_s)
            self.pusher = Pusher(self._config, self._datadist, cache, layout, self._block_size,
                                  self._claim_push, self._release_push)
        if self._consumer:
            self.loader = Loader(self._config, self._datadist, cache, layout, self._geometry, self.cluster_id,
                                 self._tp_rank)
        _log.info("llm_datadist connector: %d layers x %d regions of %d blocks x %d bytes registered (%s, %s); "
                  "cluster %d%s", len(layout.layer_names), layout.regions_per_layer, layout.num_blocks,
                  layout.block_nbytes, layout.device_type, placement.name, self.cluster_id,
                  f", control channel {self._config.host}:{self._server.port}, datadist port "
                  f"{self._datadist_port}" if self._server else "")

    def endpoint(self) -> Optional[WorkerEndpoint]:
        """The control-channel address (producers only), for the scheduler's kv_transfer_params."""
        if self._server is None:
            return None
        return WorkerEndpoint(self._config.host, self._server.port)

    # -- ServerHandler (connection threads) ---------------------------------------------------------
    def welcome(self) -> proto.Welcome:
        """This prefill's llm_datadist identity and KV geometry."""
        assert self._geometry is not None
        return proto.Welcome(self.cluster_id, self._config.host, self._datadist_port, self._geometry)

    def on_claim(self, conn: ServerConnection, message: proto.Claim) -> proto.ClaimReply:
        """Bind the hold to the decode's connection (after its KV writes are complete)."""
        hold, reason = self.holds.claim(message.request_id, conn.conn_id)
        if hold is None:
            return proto.ClaimReply(message.seq, False, reason=reason)
        if hold.ready is not None:
            hold.ready.synchronize()
        return proto.ClaimReply(message.seq, True, block_ids=list(hold.block_ids))

    def on_release(self, conn: ServerConnection, message: proto.Release) -> None:
        """Free the holds this connection claimed and now releases."""
        for request_id in message.request_ids:
            self.holds.release(request_id, "released by the decode", owner=conn.conn_id)

    def on_push_ready(self, conn: ServerConnection, message: proto.PushReady) -> None:
        """Pass a push hand-off to the pusher."""
        if self.pusher is not None:
            self.pusher.on_push_ready(conn, message)

    def on_closed(self, conn: ServerConnection) -> None:
        """Free every hold the closed connection had claimed."""
        released = self.holds.release_owner(conn.conn_id, "decode disconnected")
        if released:
            _log.info("decode cluster %s disconnected: freeing the blocks of %d claimed requests",
                      conn.peer_cluster_id, len(released))
        if self.pusher is not None:
            self.pusher.on_closed(conn)

    def _claim_push(self, request_id: str) -> bool:
        return self.holds.claim(request_id, PUSH_OWNER)[0] is not None

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
                self.holds.hold(hold.request_id, list(hold.block_ids), hold.lease_s or self._config.lease_s, ready)
        if self.pusher is not None:
            self.pusher.end_step()

    def get_finished(self, finished_req_ids: Set[str]) -> Tuple[Set[str], Set[str]]:
        """(finished sending: released and finished requests, finished receiving: ended loads)."""
        expired = self.holds.expire()
        if self.pusher is not None:
            self.pusher.drop(expired)
            self.pusher.expire(self._config.lease_s)
        sending = self.holds.take_freeable(set(finished_req_ids))
        receiving: Set[str] = set()
        if self.loader is not None:
            receiving, failed = self.loader.take_finished()
            self._failed_blocks.update(failed)
        return sending, receiving

    def take_failed_blocks(self) -> Set[int]:
        """Local blocks of loads that failed, reported once (after ``get_finished`` named their requests)."""
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def close(self) -> None:
        """Stop serving and loading, then finalize llm_datadist; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.loader is not None:
            self.loader.close()
        if self.pusher is not None:
            self.pusher.close()
        if self._server is not None:
            self._server.close()
        if self._datadist is not None:
            self._datadist.finalize()
