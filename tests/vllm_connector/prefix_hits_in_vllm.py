"""Run with the Python of .venv-vllm by test_vllm_prefix_cache.py: the decode scheduler side with local prefix-cache
hits, given vLLM's own block objects (KVCacheBlocks of KVCacheBlock, the hit blocks hashed). Prints one JSON line.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import BlockHash, KVCacheBlock, make_block_hash_with_group_id

from llm_datadist.integrations.vllm.block_layout import block_pairs
from llm_datadist.integrations.vllm.config import ConnectorConfig
from llm_datadist.integrations.vllm.scheduler import SchedulerSide

BLOCK_SIZE = 32
PARAMS = {"do_remote_prefill": True, "remote_endpoints": [["127.0.0.1", 7100, 1]], "remote_request_id": "p-1",
          "remote_block_ids": [1, 2, 3, 4, 5]}


def _request(num_tokens: int) -> SimpleNamespace:
    return SimpleNamespace(request_id=f"r-{num_tokens}", num_prompt_tokens=num_tokens, kv_transfer_params=dict(PARAMS))


def _blocks(block_ids, hits: int) -> KVCacheBlocks:
    """A request's blocks as vLLM's scheduler gives them: the first ``hits`` came from the prefix cache (hashed),
    the others were allocated for the load (not hashed until it ends)."""
    blocks = [KVCacheBlock(block_id) for block_id in block_ids]
    for i, block in enumerate(blocks[:hits]):
        block.set_block_hash(make_block_hash_with_group_id(BlockHash(bytes([i + 1]) * 32), 0))
    return KVCacheBlocks((blocks,))


def main() -> None:
    side = SchedulerSide(ConnectorConfig(), BLOCK_SIZE, 1)
    # (prompt tokens, local hit) -> what the connector loads
    matched = {f"{n}/{hit}": list(side.get_num_new_matched_tokens(_request(n), hit))
               for n, hit in ((136, 0), (136, 96), (129, 128), (128, 96), (33, 32), (1, 0))}
    matched["no params"] = list(side.get_num_new_matched_tokens(SimpleNamespace(kv_transfer_params=None), 0))

    # 136 tokens, 3 blocks hit locally: the load fills the 2 blocks after them, from the prefill's blocks 4 and 5
    partly = _request(136)
    side.update_state_after_alloc(partly, _blocks([10, 11, 12, 20, 21], hits=3), 40)
    # 129 tokens, all 4 full blocks hit: nothing to load (get_num_new_matched_tokens said 0), only the release
    whole = _request(129)
    side.update_state_after_alloc(whole, _blocks([10, 11, 12, 13, 22], hits=4), 0)
    loads = side.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                                      scheduled_cached_reqs=SimpleNamespace(req_ids=[],
                                                                                            num_computed_tokens=[])))
    jobs = {job.request_id: job for job in loads.loads}
    job = jobs[partly.request_id]
    print(json.dumps({
        "matched": matched,
        "partly": [list(job.local_block_ids), job.num_tokens, job.first_block,
                   list(block_pairs(job.params.block_ids, job.local_block_ids, job.num_tokens, BLOCK_SIZE,
                                    job.first_block))],
        "whole": [list(jobs[whole.request_id].local_block_ids), jobs[whole.request_id].num_tokens,
                  jobs[whole.request_id].params.request_id],
        "loaded_once": [partly.kv_transfer_params["do_remote_prefill"], whole.kv_transfer_params["do_remote_prefill"]],
    }))


if __name__ == "__main__":
    main()
