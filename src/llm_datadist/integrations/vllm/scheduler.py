"""Scheduler side of the connector: which tokens a decode loads, which blocks a prefill keeps, and the params."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from llm_datadist.integrations.vllm.block_layout import blocks_for_tokens
from llm_datadist.integrations.vllm.config import ConnectorConfig, connector_logger
from llm_datadist.integrations.vllm.datadist import prefill_cluster_id
from llm_datadist.integrations.vllm.kv_groups import flatten_groups
from llm_datadist.integrations.vllm.metadata import (HoldJob, LoadJob, StepMetadata, TransferParams, WorkerEndpoint,
                                                     endpoints_param)

__all__ = ["SchedulerSide"]

_log = connector_logger(__name__)


class SchedulerSide:
    """Bookkeeping only: no sockets, no transfers (those live in the worker side)."""

    def __init__(self, config: ConnectorConfig, block_size: int, tp_size: int) -> None:
        self._config = config
        self._block_size = block_size
        self._endpoints: Dict[int, WorkerEndpoint] = {}
        port = config.listen_port
        if port:
            self._endpoints = {rank: WorkerEndpoint(config.host, port + rank, prefill_cluster_id(config.host,
                                                                                                 port + rank))
                               for rank in range(tp_size)}
        self._kv_cache_manager: Any = None
        self._loads: List[LoadJob] = []
        self._wanted: List[Tuple[str, TransferParams]] = []  # decode requests taken in since the last step
        self._not_kept: List[str] = []
        self._producing: Dict[str, Any] = {}  # request id -> Request whose prompt is not fully computed yet

    def bind_kv_cache_manager(self, manager: Any) -> None:
        """Keep vLLM's KV cache manager (it gives the blocks of completed prompts)."""
        self._kv_cache_manager = manager

    def set_endpoints(self, endpoints: Dict[int, WorkerEndpoint]) -> None:
        """The llm_datadist address and cluster id each worker (TP rank) reported at start-up."""
        if endpoints:
            self._endpoints = dict(endpoints)

    # -- decode side ------------------------------------------------------------------------------
    def _decode_params(self, request: Any) -> Optional[TransferParams]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return None
        try:
            return TransferParams.parse(params, self._config.mode)
        except ValueError as exc:
            _log.warning("request %s: ignoring kv_transfer_params, the prompt is computed here: %s",
                         request.request_id, exc)
            return None

    def on_new_request(self, request: Any) -> None:
        """A decode request taken in: its worker renews the prefill's hold from now until its load ends (it may
        wait in the queue for free blocks longer than a lease)."""
        transfer = self._decode_params(request)
        if transfer is not None:
            self._wanted.append((request.request_id, transfer))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Tuple[int, bool]:
        """A decode request with remote-prefill params loads every prompt token not computed locally
        (``num_computed_tokens``: its local prefix-cache hit, whole blocks).

        When only the last prompt token is left, nothing is loaded: vLLM computes that token again anyway (it
        needs its logits), so its block would be pulled for nothing. ``update_state_after_alloc`` then only
        releases the prefill's blocks.
        """
        if self._decode_params(request) is None:
            return 0, False
        count = request.num_prompt_tokens - num_computed_tokens
        return (count, True) if count > 1 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Prefill: remember requests to hold; decode: queue the load into the allocated blocks."""
        params = request.kv_transfer_params
        if not params:
            return
        if params.get("do_remote_decode"):
            self._producing[request.request_id] = request
            return
        transfer = self._decode_params(request)
        if transfer is None:
            return
        params["do_remote_prefill"] = False  # load once, even if vLLM calls this again after the load
        if num_external_tokens <= 0:  # fully cached here: only let the prefill free its blocks
            self._loads.append(LoadJob(request.request_id, transfer, (), 0))
            return
        groups = blocks.get_block_ids()
        if len(groups) > 1:  # a hybrid model: the blocks of every KV cache group (kv_groups)
            needed = blocks_for_tokens(request.num_prompt_tokens, self._block_size)
            block_ids, sizes = flatten_groups(groups, needed)
            # a local prefix-cache hit covers the same tokens in every group (a sliding window may have nulled some)
            first_block = max(sum(1 for block in group if block.block_hash is not None and not block.is_null)
                              for group in blocks.blocks)
            self._loads.append(LoadJob(request.request_id, transfer, block_ids, request.num_prompt_tokens,
                                       first_block, sizes))
            return
        block_ids = tuple(groups[0])
        first_block = len(block_ids) - len(blocks.get_unhashed_block_ids())
        self._loads.append(LoadJob(request.request_id, transfer, block_ids, request.num_prompt_tokens,
                                   max(0, first_block)))

    # -- prefill side -----------------------------------------------------------------------------
    def _mode_of(self, params: Dict[str, Any]) -> str:
        return str(params.get("transfer_mode") or self._config.mode)

    def _completed_prompts(self, scheduler_output: Any) -> List[HoldJob]:
        computed: Dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            computed[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num in zip(cached.req_ids, cached.num_computed_tokens):
            computed[req_id] = num
        holds = []
        for req_id, request in list(self._producing.items()):
            scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            if req_id not in computed or computed[req_id] + scheduled < request.num_prompt_tokens:
                continue
            del self._producing[req_id]
            needed = blocks_for_tokens(request.num_prompt_tokens, self._block_size)
            block_ids, sizes = flatten_groups(self._kv_cache_manager.get_block_ids(req_id), needed)
            params = request.kv_transfer_params
            holds.append(HoldJob(req_id, block_ids, request.num_prompt_tokens, self._mode_of(params),
                                 str(params.get("transfer_id") or ""), _lease_of(req_id, params), sizes))
        return holds

    def build_connector_meta(self, scheduler_output: Any) -> StepMetadata:
        """Hand the worker this step's loads, completed prompts and requests not kept."""
        meta = StepMetadata(loads=self._loads, holds=self._completed_prompts(scheduler_output),
                            not_kept=self._not_kept, wanted=self._wanted)
        self._loads, self._not_kept, self._wanted = [], [], []
        return meta

    def request_finished(self, request: Any, block_ids: List[int]) -> Tuple[bool, Optional[Dict[str, Any]]]:
        """Prefill: keep a finished request's blocks for its decode and say where they are."""
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill"):  # a decode request that finished before its load started
            transfer = self._decode_params(request)
            params["do_remote_prefill"] = False
            if transfer is not None:
                self._loads.append(LoadJob(request.request_id, transfer, (), 0))
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        self._producing.pop(request.request_id, None)
        finished_ok = request.status in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)
        if not finished_ok or not block_ids or not self._endpoints:
            if finished_ok and block_ids:
                _log.error("request %s: no llm_datadist address known for this prefill; its blocks are freed "
                           "now and its decode will recompute", request.request_id)
            self._not_kept.append(request.request_id)
            return False, None
        mode = self._mode_of(params)
        needed = blocks_for_tokens(request.num_prompt_tokens, self._block_size)
        out: Dict[str, Any] = {
            "do_remote_prefill": True, "do_remote_decode": False, "transfer_mode": mode,
            "remote_endpoints": endpoints_param(self._endpoints), "remote_request_id": request.request_id,
            "remote_block_ids": list(block_ids[:needed]), "remote_num_tokens": request.num_prompt_tokens,
        }
        if mode == "push":
            out["transfer_id"] = str(params.get("transfer_id") or "")
        return True, out


def _lease_of(request_id: str, params: Dict[str, Any]) -> float:
    """A request's own ``lease_s`` (the proxy may shorten or lengthen it); 0 means the connector's."""
    raw = params.get("lease_s")
    try:
        lease = float(raw) if raw is not None else 0.0
    except (TypeError, ValueError):
        lease = 0.0
    if lease < 0 or (raw is not None and lease == 0):
        _log.warning("request %s: ignoring kv_transfer_params lease_s=%r (must be > 0)", request_id, raw)
        return 0.0
    return lease
