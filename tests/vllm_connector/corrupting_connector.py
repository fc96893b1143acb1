"""Test connector: LLMDataDistConnector that overwrites loaded KV with noise for flagged requests (control runs).

A decode request whose kv_transfer_params carry ``"test_corrupt_kv": True`` gets its loaded blocks replaced by
large random values right after the load completes, before the decode reads them. Everything else is the
product connector unchanged.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from llm_datadist.integrations.vllm.connector import LLMDataDistConnector

FLAG = "test_corrupt_kv"


class CorruptingConnector(LLMDataDistConnector):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flagged: Dict[str, bool] = {}
        self._to_corrupt: Dict[str, Tuple[int, ...]] = {}

    def update_state_after_alloc(self, request, blocks, num_external_tokens) -> None:
        params = request.kv_transfer_params or {}
        if params.get(FLAG) and params.get("do_remote_prefill"):
            self._flagged[request.request_id] = True
        super().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        meta = super().build_connector_meta(scheduler_output)
        meta.corrupt = [job.request_id for job in meta.loads if self._flagged.pop(job.request_id, False)]
        return meta

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._connector_metadata
        for job in meta.loads:
            if job.request_id in getattr(meta, "corrupt", ()):
                self._to_corrupt[job.request_id] = job.local_block_ids
        super().start_load_kv(forward_context, **kwargs)

    def get_finished(self, finished_req_ids):
        sending, receiving = super().get_finished(finished_req_ids)
        generator = torch.Generator().manual_seed(7)
        for request_id in receiving or ():
            blocks = self._to_corrupt.pop(request_id, None)
            if blocks:
                index = torch.tensor(blocks, dtype=torch.long)
                for tensor in self.worker.kv_caches.values():
                    noise = torch.randn(tensor[index].shape, generator=generator, dtype=tensor.dtype) * 100.0
                    tensor[index] = noise
        return sending, receiving
