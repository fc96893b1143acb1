"""One connector worker (``WorkerSide``, TP 1) for the lease tests, driven by JSON-line commands on stdin (run with the
vLLM venv's Python); replies go to stdout, one JSON object a line.

The KV tensors are laid out as vLLM's CPU backend lays them out (``[num_blocks, kv_heads, block_size, 2 * head]`` per
layer, one buffer for all layers). A prefill fills a request's blocks with a pattern naming layer, head and block; a
decode checks the blocks it loaded against it. Both sides carry the same compatibility fingerprint.

Commands: start, hold, tick, want, load, claim, stop_renewing, verify, state, stop, quit.
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

from llm_datadist.integrations.vllm import messages as msg  # noqa: E402
from llm_datadist.integrations.vllm.config import ConnectorConfig  # noqa: E402
from llm_datadist.integrations.vllm.metadata import HoldJob, LoadJob, StepMetadata, TransferParams  # noqa: E402
from llm_datadist.integrations.vllm.worker import WorkerSide  # noqa: E402

BLOCK_SIZE, HEAD_SIZE, HEADS, LAYERS, NUM_BLOCKS = 32, 32, 2, 2, 16
FINGERPRINT = msg.Fingerprint("tiny", "0123456789abcdef", "float32", "float32", BLOCK_SIZE, LAYERS, HEADS, HEAD_SIZE,
                              "LBHNC", "FullAttentionSpec(layers=2)", "0.32", msg.SCHEMA_VERSION)
STATE: Dict[str, Any] = {}


def pattern(layer: int, head: int, block: int) -> torch.Tensor:
    base = ((layer * 16 + head) * 64 + block) * 4096
    return (base + torch.arange(BLOCK_SIZE * 2 * HEAD_SIZE, dtype=torch.float32)).view(BLOCK_SIZE, 2 * HEAD_SIZE)


def start(role: str, extra: Dict[str, Any]) -> dict:
    buffer = torch.zeros(LAYERS, NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, dtype=torch.float32)
    kv_caches = {f"model.layers.{i}.self_attn.attn": buffer[i] for i in range(LAYERS)}
    worker = WorkerSide(ConnectorConfig.from_extra(dict({"link_timeout_ms": 5000}, **extra)), role == "prefill",
                        role == "decode", BLOCK_SIZE, NUM_BLOCKS, 0, 1, HEADS, FINGERPRINT)
    worker.register_kv_caches(kv_caches)
    STATE.update(worker=worker, buffer=buffer)
    endpoint = worker.endpoint()
    return {"endpoint": [endpoint.host, endpoint.port, endpoint.cluster_id] if endpoint else None}


def hold(request_id: str, block_ids: List[int], num_tokens: int) -> dict:
    """Write the request's blocks (as a forward would), then keep them for a decode (as the step's end does)."""
    worker, buffer = STATE["worker"], STATE["buffer"]
    for layer in range(LAYERS):
        for block in block_ids:
            for head in range(HEADS):
                buffer[layer, block, head] = pattern(layer, head, block)
    worker.begin_step(StepMetadata())
    worker.end_step(StepMetadata(holds=[HoldJob(request_id, tuple(block_ids), num_tokens, "pull")]))
    return tick()


def tick() -> dict:
    """An engine step's ``get_finished`` (a prefill ends expired holds there), then the state."""
    STATE["worker"].get_finished(set())
    return state()


def _params(endpoint: List[Any], remote_request_id: str) -> TransferParams:
    host, port, cluster_id = endpoint
    return TransferParams("pull", ((str(host), int(port), int(cluster_id)),), remote_request_id)


def want(request_id: str, endpoint: List[Any], remote_request_id: str) -> dict:
    """The decode's scheduler took the request in; it waits in the queue (no blocks yet)."""
    STATE["worker"].begin_step(StepMetadata(wanted=[(request_id, _params(endpoint, remote_request_id))]))
    return state()


def load(request_id: str, endpoint: List[Any], remote_request_id: str, remote_block_ids: List[int],
         local_block_ids: List[int], num_tokens: int) -> dict:
    """The request got its blocks: queue its pull as the decode's step does and wait until it is reported."""
    worker = STATE["worker"]
    params = _params(endpoint, remote_request_id)
    job = LoadJob(request_id, TransferParams(params.mode, params.endpoints, params.request_id,
                                             tuple(remote_block_ids)), tuple(local_block_ids), num_tokens)
    worker.begin_step(StepMetadata(loads=[job]))
    worker.start_loads(StepMetadata(loads=[job]))
    done: List[str] = []

    def finished() -> bool:
        done.extend(worker.get_finished(set())[1])
        return request_id in done

    if not wait_until(finished, timeout_s=60.0):
        raise TimeoutError(f"the load of {request_id} never ended")
    return dict(state(), failed_blocks=sorted(worker.take_failed_blocks()))


def claim(endpoint: List[Any], remote_request_id: str) -> dict:
    """Claim a request on the prefill as a load starts to (and then do nothing more with it)."""
    worker = STATE["worker"]
    cluster_id, _ = worker.loader.peer_lease(tuple(endpoint))
    reply = worker.control.claim(cluster_id, remote_request_id)
    return {"claimed": reply.ok, "block_ids": list(reply.block_ids), "reason": reply.reason}


def stop_renewing() -> dict:
    """A decode that hangs: its link stays up, its renewals stop."""
    STATE["worker"].renewer.close()
    return state()


def verify(pairs: List[List[int]]) -> dict:
    """For each (prefill block, local block): which (layer, head) of the local block differ from the pattern."""
    buffer = STATE["buffer"]
    wrong = [[layer, head, local] for remote, local in pairs for layer in range(LAYERS) for head in range(HEADS)
             if not torch.equal(buffer[layer, local, head], pattern(layer, head, remote))]
    return {"wrong": wrong}


def state() -> dict:
    worker = STATE["worker"]
    renewer = worker.renewer
    return {"held": worker.holds.held_ids(), "release_log": [[r, why] for r, why, _ in worker.holds.release_log],
            "renewal_rounds": renewer.rounds if renewer is not None else 0,
            "renewal_interval_s": renewer.interval_s if renewer is not None else 0.0,
            "wanted": renewer.wanted() if renewer is not None else []}


def stop() -> dict:
    worker = STATE.pop("worker", None)
    if worker is not None:
        worker.close()
    STATE.clear()
    return {}


COMMANDS = {"start": start, "hold": hold, "tick": tick, "want": want, "load": load, "claim": claim,
            "stop_renewing": stop_renewing, "verify": verify, "state": state, "stop": stop}


if __name__ == "__main__":
    run(COMMANDS, _REPLY, stop)
