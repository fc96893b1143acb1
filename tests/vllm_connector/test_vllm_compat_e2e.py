"""End to end with a real vLLM (CPU build): a prefill whose block size differs from the decode's is refused at first
contact, and the decode's request fails with the field and both values named, while a matching prefill still
serves the same decode."""
from __future__ import annotations

import random
from typing import List

import pytest

from vllm_harness import start_instances

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def mixed(vllm_python, tiny_model, tmp_path_factory):
    """Two prefills, of block size 32 and 64, and a decode of block size 32 that fails a request whose load
    fails (no recompute could hide it)."""
    small = {"num_blocks": 64, "max_model_len": 1024}
    specs = {
        "prefill32": dict(small, role="kv_producer", extra={}),
        "prefill64": dict(small, role="kv_producer", extra={}, block_size=64, num_blocks=32),
        "decode": dict(small, role="kv_consumer", extra={"link_timeout_ms": 3000}, policy="fail"),
    }
    instances = start_instances(vllm_python, tiny_model, str(tmp_path_factory.mktemp("vllm-compat")), specs)
    yield instances
    for instance in instances.values():
        instance.close()


def _prompts(seed: int) -> List[List[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(length)] for length in (40, 100)]


def _handoff(prefill, prompts):
    out = prefill.call("generate", prompts=prompts, max_tokens=1, params=[{"do_remote_decode": True}] * len(prompts))
    return out["kv_transfer_params"]


def test_a_block_size_mismatch_fails_the_load_and_names_both_values(mixed):
    prompts = _prompts(21)
    expected = mixed["prefill32"].call("generate", prompts=prompts, max_tokens=MAX_TOKENS)["tokens"]
    dec = mixed["decode"]
    assert dec.call("generate", prompts=prompts, max_tokens=MAX_TOKENS,
                    params=_handoff(mixed["prefill32"], prompts))["tokens"] == expected

    params = _handoff(mixed["prefill64"], prompts)
    failed = dec.call("generate", prompts=prompts, max_tokens=MAX_TOKENS, params=params)
    assert failed["finish"] == ["error"] * len(prompts), failed
    log = dec.log_tail(20000)
    assert "KV load failed" in log and "block_size: prefill 64, decode 32" in log, log[-3000:]
    # the decode still released the refused prefill's blocks: they are free without waiting for the lease
    state = mixed["prefill64"].call("step_until_free")
    assert state["free"] == state["total"]
    released = {rid: why for rid, why, _ in mixed["prefill64"].call("connector_state")["release_log"]}
    assert {released.get(p["remote_request_id"]) for p in params} == {"released by the decode"}

    # and the matching prefill still serves the same decode
    assert dec.call("generate", prompts=prompts, max_tokens=MAX_TOKENS,
                    params=_handoff(mixed["prefill32"], prompts))["tokens"] == expected
