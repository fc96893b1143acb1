"""``LLMDataDistConnector``: vLLM's KVConnectorBase_V1 over llm_datadist (a facade over the two role objects).

Lifecycle (pull mode, the default):
  prefill  request with ``kv_transfer_params={"do_remote_decode": True}`` runs its prompt; the worker keeps
           the blocks (a hold with a lease); ``request_finished`` returns the params for the decode.
  decode   ``get_num_new_matched_tokens`` reports the prompt tokens as loaded asynchronously; the worker
           links once per prefill (``link_clusters``), claims the hold (a notification over the link), moves
           every layer of the request's blocks with one ``pull_blocks`` that carries the release (the prefill
           learns of it once the bytes are here), and reports the request
           finished receiving. A failure reports the request's blocks as load errors, so vLLM's
           ``kv_load_failure_policy`` applies (``recompute`` or ``fail``).
  prefill  frees the blocks on release, at once when the claiming decode's link goes down, or at lease expiry.
Push mode (``transfer_mode: "push"``, same ``transfer_id`` given to both sides by the proxy): the decode sends
its block ids first; the prefill pushes each layer while the next ones compute (``transfer_cache_async``), and its
last push carries the notification that the push is done.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorHandshakeMetadata,
                                                               KVConnectorMetadata, KVConnectorRole, SupportsHMA)

from llm_datadist.integrations.vllm.compat import fingerprint_of
from llm_datadist.integrations.vllm.config import ConnectorConfig
from llm_datadist.integrations.vllm.kv_groups import group_windows
from llm_datadist.integrations.vllm.metadata import StepMetadata, WorkerEndpoint
from llm_datadist.integrations.vllm.scheduler import SchedulerSide
from llm_datadist.integrations.vllm.vllm_stats import LLMDataDistKVConnectorStats, LLMDataDistPromMetrics
from llm_datadist.integrations.vllm.worker import WorkerSide

if TYPE_CHECKING:
    import torch

__all__ = ["LLMDataDistConnector"]


class LLMDataDistConnector(KVConnectorBase_V1, SupportsHMA):
    """Prefill/decode KV transfer through llm_datadist; options in ``kv_connector_extra_config``.

    It supports vLLM's hybrid KV cache manager (``SupportsHMA``): the blocks of every KV cache group move to the
    layers of that group, and a sliding-window group moves only the blocks its window still needs (``kv_groups``).
    KV caches it can not move (Mamba state, cross-attention, ...) are refused here, at start-up.
    """

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self.config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config)
        block_size = vllm_config.cache_config.block_size
        # raises UnsupportedKVCache (naming the layers and what is supported) for a cache it can not move
        windows = group_windows(kv_cache_config, block_size) if kv_cache_config is not None else ()
        self._scheduler: Optional[SchedulerSide] = None
        self._worker: Optional[WorkerSide] = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self.config, block_size,
                                            vllm_config.parallel_config.tensor_parallel_size)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else 0
            self._worker = WorkerSide(self.config, transfer.is_kv_producer, transfer.is_kv_consumer, block_size,
                                      num_blocks, get_tensor_model_parallel_rank(),
                                      vllm_config.parallel_config.tensor_parallel_size, _total_kv_heads(vllm_config),
                                      fingerprint_of(vllm_config, kv_cache_config), windows)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> Optional[str]:
        """Head-major blocks ("HND"): a group of consecutive KV heads is one contiguous range of a block, so a
        decode of another tensor-parallel size can pull just the heads it owns. None for MLA (one latent "head")."""
        model = getattr(vllm_config, "model_config", None)
        if model is None or getattr(model, "use_mla", False):
            return None
        return "HND"

    # -- worker side ------------------------------------------------------------------------------
    @property
    def worker(self) -> WorkerSide:
        """The worker-side state (only on the worker role)."""
        assert self._worker is not None, "worker-side method called on the scheduler-side connector"
        return self._worker

    def register_kv_caches(self, kv_caches: Dict[str, torch.Tensor]) -> None:
        """Register every layer in one llm_datadist blocks cache; producers start listening."""
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> Optional[KVConnectorHandshakeMetadata]:
        """The worker's llm_datadist address and cluster id, for the scheduler's kv_transfer_params."""
        return self.worker.endpoint()

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Bind the step's metadata; runs before the forward, so layer-wise pushes start here."""
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, StepMetadata):
            self.worker.begin_step(connector_metadata)

    def _step_metadata(self) -> Optional[StepMetadata]:
        meta = self._connector_metadata
        return meta if isinstance(meta, StepMetadata) else None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Queue this step's loads; they run in the background between scheduler steps."""
        meta = self._step_metadata()
        if meta is not None and meta.loads:
            self.worker.start_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: a loading request waits in WAITING_FOR_REMOTE_KVS instead."""
        return  # loads are asynchronous: the request waits in WAITING_FOR_REMOTE_KVS until they finish

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Mark the layer written, releasing its layer-wise push."""
        self.worker.layer_saved(layer_name)

    def wait_for_save(self) -> None:
        """After the forward: hold the completed prompts' blocks for their decodes, finish pushes."""
        self.worker.end_step(self._step_metadata())

    def get_finished(self, finished_req_ids: Set[str]) -> Tuple[Optional[Set[str]], Optional[Set[str]]]:
        """(released and finished sends, ended loads); failed loads come with their blocks as errors."""
        sending, receiving = self.worker.get_finished(finished_req_ids)
        return sending or None, receiving or None

    def get_transfer_results(self, finished_req_ids: Set[str]) -> Any:
        """``get_finished`` with the failed loads of several KV cache groups as ``failed_recving``: vLLM can not map
        block ids back to requests there."""
        results = super().get_transfer_results(finished_req_ids)
        failed = self.worker.take_failed_requests()
        if failed:
            results.failed_recving = set(failed)
            results.finished_recving = set(results.finished_recving) | failed
        return results

    def get_block_ids_with_load_errors(self) -> Set[int]:
        """Local blocks of the loads that failed, for vLLM's kv_load_failure_policy."""
        return self.worker.take_failed_blocks()

    # -- statistics (vLLM's KV connector metrics: its log line and /metrics) -------------------------
    def get_kv_connector_stats(self) -> Optional[LLMDataDistKVConnectorStats]:
        """What this worker moved since the last step (see ``stats``); None on the scheduler side or when idle."""
        data = self._worker.take_stats() if self._worker is not None else None
        return LLMDataDistKVConnectorStats(data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[Dict[str, Any]] = None) -> LLMDataDistKVConnectorStats:
        """The stats from their plain ``data`` (in vLLM's frontend)."""
        return LLMDataDistKVConnectorStats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Dict[Any, Any], labelnames: List[str],
                           per_engine_labelvalues: Dict[int, List[object]]) -> LLMDataDistPromMetrics:
        """The connector's metrics in vLLM's /metrics (``vllm:llm_datadist_kv_*``)."""
        return LLMDataDistPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        """Finalize llm_datadist (its links go down, so prefills free our claims)."""
        if self._worker is not None:
            self._worker.close()

    # -- scheduler side ---------------------------------------------------------------------------
    @property
    def scheduler(self) -> SchedulerSide:
        """The scheduler-side state (only on the scheduler role)."""
        assert self._scheduler is not None, "scheduler-side method called on the worker-side connector"
        return self._scheduler

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        """Keep the scheduler's KV cache manager (block ids of completed prompts)."""
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.bind_kv_cache_manager(kv_cache_manager)

    def set_xfer_handshake_metadata(self, metadata: Dict[int, KVConnectorHandshakeMetadata]) -> None:
        """Learn each worker's llm_datadist address (by TP rank)."""
        self.scheduler.set_endpoints({rank: meta for rank, meta in metadata.items()
                                      if isinstance(meta, WorkerEndpoint)})

    def on_new_request(self, request: Any) -> None:
        """A decode request's prefill hold is renewed from now on, while it waits in the queue and loads."""
        self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Tuple[int, bool]:
        """A decode request with remote-prefill params loads its prompt asynchronously."""
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Record the decode blocks a request's KV goes into (once per request)."""
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        """This step's loads, completed prompts to hold or push, and requests not kept."""
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: Any) -> Tuple[bool, Optional[Dict[str, Any]]]:
        """Keep a finished prefill request's blocks and return the params its decode needs."""
        return self.scheduler.request_finished(request, list(block_ids))

    def request_finished_all_groups(self, request: Any,
                                    block_ids: Tuple[List[int], ...]) -> Tuple[bool, Optional[Dict[str, Any]]]:
        """``request_finished`` with the blocks of every KV cache group (vLLM's hybrid KV cache manager). The blocks
        the decode claims are those of the hold (every group); the params name the first group's."""
        first = next((list(group) for group in block_ids if group), [])
        return self.scheduler.request_finished(request, first)


def _total_kv_heads(vllm_config: Any) -> int:
    """The model's KV heads as vLLM shares them over TP ranks (an MLA latent is one head); 0 when unknown."""
    model = getattr(vllm_config, "model_config", None)
    if model is None:
        return 0
    if getattr(model, "use_mla", False):
        return 1
    try:
        return int(model.get_total_num_kv_heads())
    except (AttributeError, TypeError, ValueError):
        return 0
