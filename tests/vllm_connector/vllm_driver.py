"""One offline vLLM instance driven by JSON-line commands on stdin (run with the vLLM venv's Python).

Replies go to the original stdout, one JSON object per line; everything vLLM prints goes to stderr.
Commands: start, generate, free_blocks, step_until_free, connector_state, reset_prefix_cache, kv_metrics, quit.
"""
from __future__ import annotations

import os
import sys
import time

_REPLY = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                  TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: command_loop
from command_loop import serve  # noqa: E402

LLM = None


def _engine_core():
    return LLM.llm_engine.engine_core.engine_core


def _connector():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


def start(model: str, role: str = "", extra: dict = None, module: str = "llm_datadist.integrations.vllm",
          name: str = "LLMDataDistConnector", num_blocks: int = 256, policy: str = "recompute",
          max_model_len: int = 2048, tp: int = 1, block_size: int = 32, prefix_caching: bool = False,
          log_stats: bool = False) -> dict:
    global LLM
    from vllm import LLM as _LLM
    from vllm.config import KVTransferConfig

    kwargs = {}
    if role:
        kwargs["kv_transfer_config"] = KVTransferConfig(kv_connector=name, kv_connector_module_path=module,
                                                        kv_role=role, kv_connector_extra_config=extra or {},
                                                        kv_load_failure_policy=policy)
    began = time.monotonic()
    LLM = _LLM(model=model, dtype="float32", enforce_eager=True, block_size=block_size,
               enable_prefix_caching=prefix_caching, disable_log_stats=not log_stats,
               distributed_executor_backend="uni" if tp == 1 else "mp", tensor_parallel_size=tp,
               num_gpu_blocks_override=num_blocks, max_model_len=max_model_len, seed=0, **kwargs)
    state = {"init_s": time.monotonic() - began}
    if role and tp == 1:  # at TP > 1 the workers (and their connectors) run in processes of their own
        worker = _connector().worker
        endpoint = worker.endpoint()
        state["endpoint"] = [endpoint.host, endpoint.port, endpoint.cluster_id] if endpoint else None
        geometry = worker.geometry
        state["geometry"] = [geometry.num_regions, geometry.block_nbytes, geometry.block_size, geometry.layers,
                             geometry.heads]
    return state


def generate(prompts: list, max_tokens: int = 8, params: list = None) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = params or [None] * len(prompts)
    sampling = []
    for extra in params:
        args = {"kv_transfer_params": extra} if extra is not None else None
        sampling.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=args))
    began = time.monotonic()
    outputs = LLM.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "cached": [o.num_cached_tokens for o in outputs],  # prompt tokens the instance did not compute
            "kv_transfer_params": [o.kv_transfer_params for o in outputs],
            "finish": [o.outputs[0].finish_reason for o in outputs], "elapsed_s": time.monotonic() - began}


def free_blocks() -> dict:
    pool = _engine_core().scheduler.kv_cache_manager.block_pool
    return {"free": pool.get_num_free_blocks(), "total": pool.num_gpu_blocks - 1}


def step_until_free(timeout_s: float = 10.0) -> dict:
    """Step the engine (empty steps let the connector report released blocks) until every block is free."""
    core = _engine_core()
    deadline = time.monotonic() + timeout_s
    while True:
        state = free_blocks()
        if state["free"] >= state["total"] or time.monotonic() > deadline:
            state["now"] = time.monotonic()
            return state
        if core.scheduler.has_requests():
            core.step()
        else:
            time.sleep(0.005)


def connector_state() -> dict:
    worker = _connector().worker
    log = list(worker.holds.release_log)
    stats = list(worker.loader.stats) if worker.loader is not None else []
    pusher = worker.pusher
    pushes = dict(pusher.counts) if pusher is not None else {}
    ready = pusher.ready_transfer_ids() if pusher is not None else []
    return {"held": worker.holds.held_ids(), "release_log": log, "load_stats": stats, "push_counts": pushes,
            "push_ready": ready}


def reset_prefix_cache() -> dict:
    """Forget every cached prefix (the blocks of finished requests)."""
    return {"reset": bool(LLM.reset_prefix_cache())}


def kv_metrics() -> dict:
    """The connector's counters in vLLM's metrics (``start(log_stats=True)``), by name and direction."""
    from prometheus_client import REGISTRY

    values: dict = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name.startswith("vllm:llm_datadist_kv_") and sample.name.endswith("_total"):
                key = f"{sample.name}/{sample.labels.get('direction', '')}"
                values[key] = values.get(key, 0) + sample.value
    return {"metrics": values}


COMMANDS = {"start": start, "generate": generate, "free_blocks": free_blocks, "step_until_free": step_until_free,
            "connector_state": connector_state, "reset_prefix_cache": reset_prefix_cache, "kv_metrics": kv_metrics}


def main() -> None:
    serve(COMMANDS, _REPLY.write)
    if LLM is not None:
        try:
            _connector().shutdown()
        except Exception:  # noqa: BLE001
            pass
    _REPLY.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
