"""Prefix caching on both sides: a decode pulls only the blocks its own prefix cache does not have, a request whose
prompt the decode has cached pulls nothing and still frees the prefill's blocks, and a prefill's own prefix-cache
hits give its decode the KV of the whole prompt.

The scheduler side's answers with local hits, given vLLM's block objects (prefix_hits_in_vllm.py); then end to end
with a real vLLM (CPU build, the tiny model): one prefill and one decode, both with prefix caching on (vLLM's
default), requests one at a time, prefill then decode. The bytes come from the connector's statistics: the decode's
per-request load records and the pulled bytes vLLM's metrics got through ``get_kv_connector_stats``.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
from typing import Any, Dict, List, Tuple

import pytest

from vllm_harness import HERE, start_instances, vllm_env

pytestmark = pytest.mark.timeout(600)

BLOCK_SIZE = 32
MAX_TOKENS = 8
PULLED = "vllm:llm_datadist_kv_bytes_total/pulled"


def _block_bytes(model_dir: str) -> int:
    """KV bytes of one block: every layer's K and V, float32."""
    with open(os.path.join(model_dir, "config.json")) as handle:
        config = json.load(handle)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * BLOCK_SIZE * config["num_key_value_heads"] * head_dim * 4


def test_scheduler_loads_only_what_the_local_hit_lacks(vllm_python):
    """The decode's local hit (vLLM passes it as num_computed_tokens) is not loaded again: the load starts after
    the hit blocks (vLLM's hashed ones) and maps the prefill's blocks from there. When only the last prompt token
    is left (vLLM recomputes it), nothing is loaded and the prefill is only told to release."""
    out = subprocess.run([vllm_python, os.path.join(HERE, "prefix_hits_in_vllm.py")], capture_output=True,
                         text=True, env=vllm_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["matched"] == {"136/0": [136, True], "136/96": [40, True], "129/128": [0, False],
                                 "128/96": [32, True], "33/32": [0, False], "1/0": [0, False],
                                 "no params": [0, False]}
    # local blocks 10-12 are the hit; the prefill's blocks 4 and 5 go into 20 and 21
    assert result["partly"] == [[10, 11, 12, 20, 21], 136, 3, [[4, 5], [20, 21]]]
    assert result["whole"] == [[], 0, "p-1"]  # a release-only job for the prefill's request
    assert result["loaded_once"] == [False, False]


@pytest.fixture(scope="module")
def cached_pair(vllm_python, tiny_model, tmp_path_factory):
    """A prefill and a decode with prefix caching on; the prefill's lease is long, so only a release frees its
    blocks within the test."""
    specs = {
        "prefill": {"role": "kv_producer", "extra": {"lease_s": 600}, "prefix_caching": True},
        "decode": {"role": "kv_consumer", "extra": {"link_timeout_ms": 3000}, "prefix_caching": True,
                   "log_stats": True},
    }
    instances = start_instances(vllm_python, tiny_model, str(tmp_path_factory.mktemp("vllm-prefix-logs")), specs)
    yield instances
    for instance in instances.values():
        instance.close()


def _disaggregated(pair, prompt: List[int]) -> Tuple[Dict[str, Any], Dict[str, Any], List[Any]]:
    """One request through the prefill, then the decode: (prefill's reply, decode's reply, the decode's new load
    records (request id, mode, bytes, ...))."""
    prefill, decode = pair["prefill"], pair["decode"]
    before = len(decode.call("connector_state")["load_stats"])
    first = prefill.call("generate", prompts=[prompt], max_tokens=1, params=[{"do_remote_decode": True}])
    params = first["kv_transfer_params"][0]
    assert params is not None and params["do_remote_prefill"], first
    second = decode.call("generate", prompts=[prompt], max_tokens=MAX_TOKENS, params=[params])
    loads = decode.call("connector_state")["load_stats"][before:]
    return first, second, loads


def _pulled_metric(pair) -> float:
    return pair["decode"].call("kv_metrics")["metrics"].get(PULLED, 0.0)


def test_prefix_hits_on_both_sides(cached_pair, tiny_model):
    block = _block_bytes(tiny_model)
    rng = random.Random(11)
    shared = [rng.randrange(1, 500) for _ in range(3 * BLOCK_SIZE)]  # three full blocks
    first = shared + [rng.randrange(1, 500) for _ in range(40)]  # 136 tokens: 4 full blocks and 8 tokens
    second = shared + [rng.randrange(1, 500) for _ in range(40)]
    cached = first[:4 * BLOCK_SIZE + 1]  # every block the decode can reuse is cached; only the last token is new
    multiple = first[:4 * BLOCK_SIZE]  # an exact multiple of the block size
    prompts = [first, second, cached, multiple]
    prefill, decode = cached_pair["prefill"], cached_pair["decode"]
    expected = prefill.call("generate", prompts=prompts, max_tokens=MAX_TOKENS)["tokens"]
    assert prefill.call("reset_prefix_cache")["reset"]  # the disaggregated runs start from empty caches

    # 1. nothing cached anywhere: the decode pulls all 5 blocks
    out_p, out_d, loads = _disaggregated(cached_pair, first)
    assert out_d["tokens"] == [expected[0]]
    assert out_p["cached"] == [0]
    assert [entry[2] for entry in loads] == [5 * block]
    first_blocks = out_p["kv_transfer_params"][0]["remote_block_ids"]
    pulled_before = _pulled_metric(cached_pair)
    assert pulled_before == 5 * block

    # 2. the shared prefix is cached on both sides: the prefill computes only the new 40 tokens in new blocks, the
    # decode pulls only the 2 blocks after its 3 cached ones (the prefill's blocks 3 and 4 into its own)
    out_p, out_d, loads = _disaggregated(cached_pair, second)
    assert out_d["tokens"] == [expected[1]]
    assert out_p["cached"] == [3 * BLOCK_SIZE]
    second_blocks = out_p["kv_transfer_params"][0]["remote_block_ids"]
    assert second_blocks[:3] == first_blocks[:3] and not set(second_blocks[3:]) & set(first_blocks)
    assert [entry[2] for entry in loads] == [2 * block]
    assert _pulled_metric(cached_pair) - pulled_before == 2 * block
    print(f"shared 96-token prefix: the second 136-token request pulled {2 * block} of {5 * block} bytes")

    # 3. the decode has all 4 full blocks of a 129-token prompt; vLLM recomputes the last token, so nothing is
    # pulled, and the prefill's blocks are released at once (its lease is 600 s)
    pulled_before = _pulled_metric(cached_pair)
    out_p, out_d, loads = _disaggregated(cached_pair, cached)
    assert out_d["tokens"] == [expected[2]]
    assert out_p["cached"] == [4 * BLOCK_SIZE]
    assert loads == []
    assert _pulled_metric(cached_pair) == pulled_before
    remote_id = out_p["kv_transfer_params"][0]["remote_request_id"]
    state = prefill.call("step_until_free")
    assert state["free"] == state["total"], state
    prefill_state = prefill.call("connector_state")
    assert remote_id not in prefill_state["held"]
    assert [why for rid, why, _ in prefill_state["release_log"] if rid == remote_id] == ["released by the decode"]
    print(f"fully cached 129-token prompt: pulled 0 of {5 * block} bytes")

    # 4. a 128-token prompt the decode has cached whole: vLLM's hit stops one block short (the last token is
    # recomputed), so the last block is pulled, the first 3 are not
    pulled_before = _pulled_metric(cached_pair)
    out_p, out_d, loads = _disaggregated(cached_pair, multiple)
    assert out_d["tokens"] == [expected[3]]
    assert out_p["cached"] == [3 * BLOCK_SIZE]
    assert [entry[2] for entry in loads] == [block]
    assert _pulled_metric(cached_pair) - pulled_before == block
    print(f"cached 128-token prompt (4 blocks): pulled {block} of {4 * block} bytes")

    state = prefill.call("step_until_free")
    assert state["free"] == state["total"], state
    assert prefill.call("connector_state")["held"] == []
    assert not decode.call("kv_metrics")["metrics"].get("vllm:llm_datadist_kv_failures_total/pulled")
