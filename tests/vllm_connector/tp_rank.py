"""One TP rank's connector worker (``WorkerSide``) over KV tensors laid out as vLLM's CPU backend lays them out,
driven by JSON-line commands on stdin (run with the vLLM venv's Python); replies go to stdout, one JSON object a line.

The tensors are those vLLM 0.32's CPU backend registers (its only layout, LBHNC, i.e. HND): every layer a view
``[num_blocks, kv_heads of the rank, block_size, 2 * head_size]`` (K and V of a token side by side) of one buffer
holding all layers. A prefill fills the blocks of a request with a pattern that names the layer, the model's KV head
and the block; a decode checks every head of the blocks it loaded against it.

Commands: start, hold, load, verify, state, stop, quit.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

_REPLY = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: waiting

import torch  # noqa: E402
from command_loop import run  # noqa: E402
from waiting import wait_until  # noqa: E402

from llm_datadist.integrations.vllm.config import ConnectorConfig  # noqa: E402
from llm_datadist.integrations.vllm.metadata import HoldJob, LoadJob, StepMetadata, TransferParams  # noqa: E402
from llm_datadist.integrations.vllm.tp_map import heads_of  # noqa: E402
from llm_datadist.integrations.vllm.worker import WorkerSide  # noqa: E402

BLOCK_SIZE = 32
HEAD_SIZE = 32
LAYERS = 2
STATE: Dict[str, Any] = {}


def pattern(layer: int, head: int, block: int) -> torch.Tensor:
    """The values of one head of one block of a layer (exact in float32)."""
    base = ((layer * 16 + head) * 64 + block) * 4096
    return (base + torch.arange(BLOCK_SIZE * 2 * HEAD_SIZE, dtype=torch.float32)).view(BLOCK_SIZE, 2 * HEAD_SIZE)


def start(role: str, tp_rank: int, tp_size: int, total_heads: int, num_blocks: int = 64) -> dict:
    heads = heads_of(tp_rank, tp_size, total_heads)
    buffer = torch.zeros(LAYERS, num_blocks, len(heads), BLOCK_SIZE, 2 * HEAD_SIZE, dtype=torch.float32)
    kv_caches = {f"model.layers.{i}.self_attn.attn": buffer[i] for i in range(LAYERS)}
    config = ConnectorConfig.from_extra({"link_timeout_ms": 5000, "lease_s": 60})
    worker = WorkerSide(config, role == "prefill", role == "decode", BLOCK_SIZE, num_blocks, tp_rank, tp_size,
                        total_heads)
    worker.register_kv_caches(kv_caches)
    STATE.update(worker=worker, buffer=buffer, heads=list(heads), layers=kv_caches)
    endpoint = worker.endpoint()
    layer0 = buffer[0]
    return {"endpoint": [endpoint.host, endpoint.port, endpoint.cluster_id] if endpoint else None,
            "shape": list(layer0.shape), "stride": list(layer0.stride()), "layout_heads": worker.layout.heads}


def hold(request_id: str, block_ids: List[int], num_tokens: int) -> dict:
    """Write the request's blocks (as a forward would), then keep them for a decode (as the step's end does)."""
    worker, buffer = STATE["worker"], STATE["buffer"]
    for layer in range(LAYERS):
        for block in block_ids:
            for local, head in enumerate(STATE["heads"]):
                buffer[layer, block, local] = pattern(layer, head, block)
    worker.begin_step(StepMetadata())
    worker.end_step(StepMetadata(holds=[HoldJob(request_id, tuple(block_ids), num_tokens, "pull")]))
    return {}


def load(request_id: str, endpoints: List[List[Any]], remote_request_id: str, remote_block_ids: List[int],
         local_block_ids: List[int], num_tokens: int) -> dict:
    """Queue a pull as the decode's step does and wait until the worker reports it finished."""
    worker = STATE["worker"]
    params = TransferParams("pull", tuple((str(h), int(p), int(c)) for h, p, c in endpoints), remote_request_id,
                            tuple(remote_block_ids))
    worker.start_loads(StepMetadata(loads=[LoadJob(request_id, params, tuple(local_block_ids), num_tokens)]))
    done: List[str] = []

    def finished() -> bool:
        done.extend(worker.get_finished(set())[1])
        return request_id in done

    if not wait_until(finished, timeout_s=60.0):
        raise TimeoutError(f"the load of {request_id} never ended")
    stats = list(worker.loader.stats)
    return {"failed_blocks": sorted(worker.take_failed_blocks()), "nbytes": stats[-1][2] if stats else 0}


def verify(pairs: List[List[int]]) -> dict:
    """For each (prefill block, local block): which (layer, head) of the local block differ from the pattern."""
    buffer = STATE["buffer"]
    wrong = []
    for remote, local in pairs:
        for layer in range(LAYERS):
            for index, head in enumerate(STATE["heads"]):
                if not torch.equal(buffer[layer, local, index], pattern(layer, head, remote)):
                    wrong.append([layer, head, local])
    return {"wrong": wrong}


def state() -> dict:
    worker = STATE["worker"]
    return {"held": worker.holds.held_ids(), "release_log": [[r, why] for r, why, _ in worker.holds.release_log]}


def stop() -> dict:
    worker = STATE.pop("worker", None)
    if worker is not None:
        worker.close()
    STATE.clear()
    return {}


COMMANDS = {"start": start, "hold": hold, "load": load, "verify": verify, "state": state, "stop": stop}


if __name__ == "__main__":
    run(COMMANDS, _REPLY, stop)
