"""End to end with a real vLLM (CPU build) across tensor-parallel sizes: an instance of TP 2 and one of TP 1 (both
``kv_both``) prefill for each other; the decode's greedy tokens equal those of one instance computing alone.

The tiny model has 2 KV heads: at TP 2 each rank holds one, so TP 2 -> TP 1 merges the heads of two prefill ranks
and TP 1 -> TP 2 splits the prefill's blocks between two decode ranks.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List

import pytest

from vllm_harness import start_instances

pytestmark = pytest.mark.timeout(900)

LENGTHS = [5, 32, 33, 100]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tp_pair(vllm_python, tiny_model, tmp_path_factory):
    """A TP 2 instance and a TP 1 instance, each both prefill and decode; a failed load fails its request (no
    recompute could hide it)."""
    log_dir = str(tmp_path_factory.mktemp("vllm-tp-logs"))
    common = {"role": "kv_both", "extra": {"link_timeout_ms": 5000}, "num_blocks": 64, "max_model_len": 1024,
              "policy": "fail"}
    specs = {"tp2": dict(common, tp=2), "tp1": dict(common)}
    # one core per TP 2 worker (vLLM's CPU workers refuse to start without a binding on a 2-core host)
    instances = start_instances(vllm_python, tiny_model, log_dir, specs, envs={"tp2": {"VLLM_CPU_OMP_THREADS_BIND":
                                                                                       "0|1"}})
    yield instances
    for instance in instances.values():
        instance.close()


def _prompts(seed: int) -> List[List[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(length)] for length in LENGTHS]


def _disaggregated(prefill, decode, prompts: List[List[int]]) -> List[List[int]]:
    params = [{"do_remote_decode": True} for _ in prompts]
    out = prefill.call("generate", prompts=prompts, max_tokens=1, params=params)
    handoff: List[Dict[str, Any]] = out["kv_transfer_params"]
    assert all(p is not None and p["do_remote_prefill"] for p in handoff)
    return decode.call("generate", prompts=prompts, max_tokens=MAX_TOKENS, params=handoff)["tokens"]


@pytest.mark.parametrize("prefill_name, decode_name", [("tp2", "tp1"), ("tp1", "tp2")],
                         ids=["prefill-TP2-decode-TP1", "prefill-TP1-decode-TP2"])
def test_mismatched_tp_matches_single_instance(tp_pair, prefill_name, decode_name):
    prompts = _prompts(seed=11 if prefill_name == "tp2" else 12)
    expected = tp_pair["tp1"].call("generate", prompts=prompts, max_tokens=MAX_TOKENS)["tokens"]
    assert _disaggregated(tp_pair[prefill_name], tp_pair[decode_name], prompts) == expected
    state = tp_pair[prefill_name].call("step_until_free")  # every prefill rank released its blocks
    assert state["free"] == state["total"]
