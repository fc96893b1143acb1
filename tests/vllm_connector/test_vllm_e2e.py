"""End to end with a real vLLM (CPU build): prefill and decode instances in separate processes generate exactly
the greedy tokens of a single instance, in pull and push mode, and blocks are freed when decodes vanish.

Prompt lengths cover a prompt shorter than a block (32 tokens), exact multiples, and longer prompts.
"""
from __future__ import annotations

import random
import time
import uuid
from typing import Any, Dict, List, Optional

import pytest

from vllm_harness import CALL_TIMEOUT_S, run_fake_decode

pytestmark = pytest.mark.timeout(600)

LENGTHS = [5, 31, 32, 33, 64, 100, 200]
MAX_TOKENS = 8
BLOCK_BYTES = 2 * 32 * 2 * 32 * 4  # per layer and block: 2 KV heads x 32 tokens x (K+V of 32) x float32
LAYERS = 2


def make_prompts(lengths: List[int], seed: int) -> List[List[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(length)] for length in lengths]


def reference(cluster, prompts: List[List[int]]) -> List[List[int]]:
    """Greedy tokens of one instance computing everything itself."""
    return cluster["prefill1"].call("generate", prompts=prompts, max_tokens=MAX_TOKENS)["tokens"]


def prefill(instance, prompts: List[List[int]], extra: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    params = [{"do_remote_decode": True, **(extra or {})} for _ in prompts]
    out = instance.call("generate", prompts=prompts, max_tokens=1, params=params)
    assert all(p is not None and p["do_remote_prefill"] for p in out["kv_transfer_params"])
    return out["kv_transfer_params"]


def decode(cluster, prompts: List[List[int]], params: List[Dict[str, Any]]) -> List[List[int]]:
    return cluster["decode"].call("generate", prompts=prompts, max_tokens=MAX_TOKENS, params=params)["tokens"]


def poll(predicate, timeout_s: float = 30.0, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(interval_s)


def released(instance, request_ids: List[str]) -> Dict[str, str]:
    log = instance.call("connector_state")["release_log"]
    return {rid: why for rid, why, _ in log if rid in request_ids}


def test_pull_matches_single_instance(vllm_cluster):
    prompts = make_prompts(LENGTHS, seed=1)
    expected = reference(vllm_cluster, prompts)
    params = prefill(vllm_cluster["prefill1"], prompts)
    assert [p["remote_num_tokens"] for p in params] == LENGTHS
    assert [len(p["remote_block_ids"]) for p in params] == [-(-n // 32) for n in LENGTHS]
    assert decode(vllm_cluster, prompts, params) == expected

    stats = vllm_cluster["decode"].call("connector_state")["load_stats"][-len(prompts):]
    assert [s[1] for s in stats] == ["pull"] * len(prompts)
    assert sorted(s[2] for s in stats) == sorted(-(-n // 32) * LAYERS * BLOCK_BYTES for n in LENGTHS)
    prefill1 = vllm_cluster["prefill1"]
    state = prefill1.call("step_until_free")
    assert state["free"] == state["total"]
    ids = [p["remote_request_id"] for p in params]
    assert released(prefill1, ids) == {rid: "released by the decode" for rid in ids}


def test_corrupted_kv_changes_tokens(vllm_cluster):
    """Control run: noise written over the pulled blocks changes every prompt's tokens, so the KV is used."""
    prompts = make_prompts(LENGTHS, seed=2)
    expected = reference(vllm_cluster, prompts)
    params = prefill(vllm_cluster["prefill1"], prompts)
    corrupted = decode(vllm_cluster, prompts, [dict(p, test_corrupt_kv=True) for p in params])
    assert all(got != want for got, want in zip(corrupted, expected)), (corrupted, expected)
    params = prefill(vllm_cluster["prefill1"], prompts)
    assert decode(vllm_cluster, prompts, params) == expected


def _push_params(endpoint, transfer_ids):
    decode_params = [{"do_remote_prefill": True, "transfer_mode": "push", "transfer_id": tid,
                      "remote_endpoints": [endpoint]} for tid in transfer_ids]
    prefill_extra = [{"do_remote_decode": True, "transfer_mode": "push", "transfer_id": tid} for tid in transfer_ids]
    return decode_params, prefill_extra


def test_push_layer_by_layer_matches_single_instance(vllm_cluster):
    """The decode is ready first, so the prefill pushes each layer during its forward (transfer_cache_async)."""
    prompts = make_prompts(LENGTHS, seed=3)
    expected = reference(vllm_cluster, prompts)
    prefill1, dec = vllm_cluster["prefill1"], vllm_cluster["decode"]
    before = prefill1.call("connector_state")["push_counts"]
    tids = [uuid.uuid4().hex for _ in prompts]
    decode_params, prefill_params = _push_params(prefill1.endpoint, tids)
    dec.send("generate", prompts=prompts, max_tokens=MAX_TOKENS, params=decode_params)
    poll(lambda: set(tids) <= set(prefill1.call("connector_state")["push_ready"]))
    prefill1.call("generate", prompts=prompts, max_tokens=1, params=prefill_params)
    assert dec.recv(CALL_TIMEOUT_S)["tokens"] == expected
    after = prefill1.call("connector_state")["push_counts"]
    assert after["layerwise"] - before["layerwise"] == len(prompts)
    assert after["failed"] == before["failed"]


def test_push_after_prefill_matches_single_instance(vllm_cluster):
    """The prefill finishes first; the decode's hand-off then triggers one push of all layers."""
    prompts = make_prompts(LENGTHS, seed=4)
    expected = reference(vllm_cluster, prompts)
    prefill1 = vllm_cluster["prefill1"]
    before = prefill1.call("connector_state")["push_counts"]
    tids = [uuid.uuid4().hex for _ in prompts]
    decode_params, prefill_params = _push_params(prefill1.endpoint, tids)
    prefill1.call("generate", prompts=prompts, max_tokens=1, params=prefill_params)
    assert decode(vllm_cluster, prompts, decode_params) == expected
    after = prefill1.call("connector_state")["push_counts"]
    assert after["after_forward"] - before["after_forward"] == len(prompts)


def test_two_prefills_one_decode(vllm_cluster):
    prompts = make_prompts(LENGTHS + [48, 96], seed=5)
    expected = reference(vllm_cluster, prompts)
    first = prefill(vllm_cluster["prefill1"], prompts[0::2])
    second = prefill(vllm_cluster["prefill2"], prompts[1::2])
    assert first[0]["remote_endpoints"] != second[0]["remote_endpoints"]
    params = [None] * len(prompts)
    params[0::2], params[1::2] = first, second
    assert decode(vllm_cluster, prompts, params) == expected


def test_many_requests_at_once(vllm_cluster):
    rng = random.Random(6)
    prompts = make_prompts([rng.randrange(1, 130) for _ in range(32)], seed=6)
    expected = reference(vllm_cluster, prompts)
    params = prefill(vllm_cluster["prefill1"], prompts)
    assert decode(vllm_cluster, prompts, params) == expected


def test_lease_frees_blocks_nobody_claims(vllm_cluster):
    prefill1 = vllm_cluster["prefill1"]
    params = prefill(prefill1, make_prompts([40, 70], seed=7), {"lease_s": 0.3})
    state = prefill1.call("step_until_free")
    assert state["free"] == state["total"]
    ids = [p["remote_request_id"] for p in params]
    assert released(prefill1, ids) == {rid: "lease expired" for rid in ids}


def test_decode_death_frees_claimed_blocks(vllm_cluster):
    """A decode that claimed blocks is killed: the prefill frees them when its link goes down (the link-down event),
    long before the 30 s lease, and the freed blocks serve new requests."""
    prefill1 = vllm_cluster["prefill1"]
    prompts = make_prompts([60, 90, 200], seed=8)
    params = prefill(prefill1, prompts)
    ids = [p["remote_request_id"] for p in params]
    fake = run_fake_decode(prefill1.endpoint, prefill1.geometry, ids)
    try:
        claimed = fake.stdout.readline()
        assert all(isinstance(v, list) and v for v in __import__("json").loads(claimed)["claimed"].values()), claimed
        held = prefill1.call("free_blocks")
        assert held["free"] < held["total"]
        killed_at = time.monotonic()
        fake.kill()
    finally:
        fake.wait(30)
    state = prefill1.call("step_until_free")
    assert state["free"] == state["total"]
    log = [entry for entry in prefill1.call("connector_state")["release_log"] if entry[0] in ids]
    assert {entry[1] for entry in log} == {"decode disconnected"}
    print(f"blocks released {max(e[2] for e in log) - killed_at:.4f} s after the decode was killed")
    expected = reference(vllm_cluster, prompts)
    assert decode(vllm_cluster, prompts, prefill(prefill1, prompts)) == expected


def test_prefill_death_before_pull_recomputes_or_fails(vllm_cluster):
    """The prefill dies after handing out its params: the loads fail fast; the decode configured with
    kv_load_failure_policy=recompute computes the prompts itself, the one with "fail" fails the requests."""
    prompts = make_prompts([20, 64, 150], seed=9)
    expected = reference(vllm_cluster, prompts)
    params = prefill(vllm_cluster["prefill2"], prompts)
    more_params = prefill(vllm_cluster["prefill2"], prompts)
    vllm_cluster["prefill2"].kill()
    assert decode(vllm_cluster, prompts, params) == expected
    log = vllm_cluster["decode"].log_tail(20000)
    assert "KV load failed" in log and "Recovered from KV load failure" in log
    failed = vllm_cluster["decode_fail"].call("generate", prompts=prompts, max_tokens=MAX_TOKENS, params=more_params)
    assert failed["finish"] == ["error"] * len(prompts), failed
