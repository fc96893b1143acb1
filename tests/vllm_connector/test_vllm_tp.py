"""Heterogeneous tensor parallelism: the head/rank map, head-major layouts, and worker-level transfers between
prefill and decode ranks of different TP sizes, each rank a process with the KV tensors vLLM's CPU backend gives it.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest

from llm_datadist.integrations.vllm.block_layout import layout_of
from llm_datadist.integrations.vllm.tp_map import HeadSlice, heads_of, plan_for, sub_block_pairs

from vllm_harness import VllmInstance
from waiting import wait_until
from fake_tensor import FakeTensor

BLOCK_SIZE, HEAD_SIZE, LAYERS = 32, 32, 2
HEAD_BYTES = BLOCK_SIZE * 2 * HEAD_SIZE * 4  # one KV head of one block: 32 tokens x (K+V of 32) x float32


# -- the head/rank map -------------------------------------------------------------------------------
def test_heads_of_split_and_replicated_ranks():
    assert [list(heads_of(r, 2, 4)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(heads_of(r, 4, 2)) for r in range(4)] == [[0], [0], [1], [1]]  # vLLM replicates: r // (T / H)
    assert list(heads_of(0, 1, 2)) == [0, 1]
    with pytest.raises(ValueError, match="can not be split"):
        heads_of(0, 3, 2)
    with pytest.raises(ValueError, match="not one of 2"):
        heads_of(2, 2, 4)


def test_plan_same_tp_is_block_for_block():
    for rank in range(2):
        plan = plan_for(rank, 2, 2, 4)
        assert plan.pulls == {rank: (HeadSlice(0, 0, 2),)} and plan.same_shape
        assert plan.sharers == {0: 1, 1: 1} and plan.release_only == ()


def test_plan_decode_merges_heads_of_several_prefill_ranks():
    plan = plan_for(0, 1, 2, 2)  # prefill TP 2 -> decode TP 1
    assert plan.pulls == {0: (HeadSlice(0, 0, 1),), 1: (HeadSlice(0, 1, 1),)}
    assert (plan.src_heads, plan.dst_heads, plan.sharers, plan.same_shape) == (1, 2, {0: 1, 1: 1}, False)
    plan = plan_for(1, 2, 4, 8)  # prefill TP 4 -> decode TP 2: decode rank 1 has heads 4..7 of ranks 2 and 3
    assert plan.pulls == {2: (HeadSlice(0, 0, 2),), 3: (HeadSlice(0, 2, 2),)}


def test_plan_decode_splits_a_prefill_rank():
    plans = [plan_for(rank, 2, 1, 2) for rank in range(2)]  # prefill TP 1 -> decode TP 2
    assert [p.pulls for p in plans] == [{0: (HeadSlice(0, 0, 1),)}, {0: (HeadSlice(1, 0, 1),)}]
    assert all(p.sharers == {0: 2} and p.src_heads == 2 and p.dst_heads == 1 for p in plans)


def test_plan_replicated_heads_pull_from_one_rank_and_release_the_others():
    plan = plan_for(0, 1, 2, 1)  # one KV head (or MLA) on 2 prefill ranks -> 1 decode rank
    assert plan.pulls == {0: (HeadSlice(0, 0, 1),)} and plan.release_only == (1,) and plan.same_shape
    plans = [plan_for(rank, 2, 2, 1) for rank in range(2)]  # both sides replicate: rank r from rank r
    assert [p.pulls for p in plans] == [{0: (HeadSlice(0, 0, 1),)}, {1: (HeadSlice(0, 0, 1),)}]
    plans = [plan_for(rank, 4, 2, 2) for rank in range(4)]  # decode replicates heads of a split prefill
    assert [list(p.pulls) for p in plans] == [[0], [0], [1], [1]] and plans[0].sharers == {0: 2, 1: 2}
    plans = [plan_for(rank, 1, 4, 2) for rank in range(1)]  # prefill replicates: ranks 1 and 3 are not pulled
    assert plans[0].pulls == {0: (HeadSlice(0, 0, 1),), 2: (HeadSlice(0, 1, 1),)}
    assert plans[0].release_only == (1, 3)


def test_sub_block_pairs_keep_neighbours_together():
    src, dst = sub_block_pairs([5, 6], [1, 2], (HeadSlice(1, 0, 1),), 2, 1)  # head 1 of a 2-head block
    assert (src, dst) == ([11, 13], [1, 2])
    src, dst = sub_block_pairs([5, 6], [1, 2], (HeadSlice(0, 0, 2),), 2, 2)  # whole blocks, sub-block by sub-block
    assert (src, dst) == ([10, 11, 12, 13], [2, 3, 4, 5])


# -- head-major layouts ------------------------------------------------------------------------------
def test_layout_of_head_major_blocks_are_sub_blocks_per_head():
    base = np.zeros((LAYERS, 10, 2, BLOCK_SIZE, 2 * HEAD_SIZE), np.float32)  # vLLM CPU: [blocks, heads, N, K+V]
    layout = layout_of({f"l{i}": FakeTensor(base[i]) for i in range(LAYERS)}, 10, heads=2)
    assert (layout.heads, layout.sub_block_nbytes, layout.num_sub_blocks) == (2, HEAD_BYTES, 20)
    assert layout.sub_blocks([3, 7]) == [6, 7, 14, 15]
    token_major = np.zeros((10, BLOCK_SIZE, 2, 2 * HEAD_SIZE), np.float32)  # NHD: heads are not contiguous
    assert layout_of({"l0": FakeTensor(token_major)}, 10, heads=2).heads == 1


# -- worker-level transfers, one process per rank ------------------------------------------------------
@pytest.fixture(scope="module")
def rank_procs(vllm_python, tmp_path_factory):
    """Three rank processes (the vLLM venv's Python: the connector's worker imports vLLM), reused by every case."""
    log_dir = str(tmp_path_factory.mktemp("tp-ranks"))
    procs = [VllmInstance(vllm_python, f"rank{i}", log_dir, script="tp_rank.py") for i in range(3)]
    yield procs
    for proc in procs:
        proc.close()


def _call_all(procs: List[VllmInstance], op: str, args: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    for proc, arg in zip(procs, args):
        proc.send(op, **arg)
    return [proc.recv() for proc in procs]


@pytest.mark.parametrize("prefill_tp, decode_tp, total_heads", [
    (1, 1, 2),  # the same TP size: block for block
    (2, 1, 2),  # the decode merges one head of each prefill rank
    (1, 2, 2),  # each decode rank takes one head of the prefill's blocks
    (2, 1, 1),  # one KV head replicated on both prefill ranks: pull from one, release the other
    (1, 2, 1),  # one KV head replicated on both decode ranks: both pull it from the one prefill rank
], ids=["tp1-to-tp1", "tp2-to-tp1", "tp1-to-tp2", "tp2-to-tp1-replicated", "tp1-to-tp2-replicated"])
def test_decode_ranks_pull_their_heads(rank_procs, prefill_tp, decode_tp, total_heads):
    prefills, decodes = rank_procs[:prefill_tp], rank_procs[prefill_tp:prefill_tp + decode_tp]
    try:
        started = _call_all(prefills + decodes, "start",
                            [{"role": "prefill", "tp_rank": r, "tp_size": prefill_tp, "total_heads": total_heads}
                             for r in range(prefill_tp)] +
                            [{"role": "decode", "tp_rank": r, "tp_size": decode_tp, "total_heads": total_heads}
                             for r in range(decode_tp)])
        for state, tp in zip(started, [prefill_tp] * prefill_tp + [decode_tp] * decode_tp):
            heads = max(1, total_heads // tp)  # what vLLM's CPU backend registers on a rank of this TP size
            assert state["shape"] == [64, heads, BLOCK_SIZE, 2 * HEAD_SIZE]
            assert state["stride"] == [heads * BLOCK_SIZE * 2 * HEAD_SIZE, BLOCK_SIZE * 2 * HEAD_SIZE, 2 * HEAD_SIZE, 1]
            assert state["layout_heads"] == heads
        endpoints = [state["endpoint"] for state in started[:prefill_tp]]
        remote_blocks, local_blocks, num_tokens = [5, 9, 2], [1, 7, 3], 70  # a partial last block moves whole
        _call_all(prefills, "hold", [{"request_id": "req", "block_ids": remote_blocks, "num_tokens": num_tokens}]
                  * prefill_tp)
        loads = _call_all(decodes, "load", [{"request_id": "dec", "endpoints": endpoints, "remote_request_id": "req",
                                             "remote_block_ids": remote_blocks, "local_block_ids": local_blocks,
                                             "num_tokens": num_tokens}] * decode_tp)
        decode_heads = max(1, total_heads // decode_tp)
        assert [load["failed_blocks"] for load in loads] == [[]] * decode_tp
        assert [load["nbytes"] for load in loads] == [3 * LAYERS * decode_heads * HEAD_BYTES] * decode_tp
        pairs = [list(pair) for pair in zip(remote_blocks, local_blocks)]
        assert [result["wrong"] for result in _call_all(decodes, "verify", [{"pairs": pairs}] * decode_tp)] == \
            [[]] * decode_tp
        for prefill in prefills:  # every prefill rank frees the request once its decode ranks are done with it
            assert wait_until(lambda: prefill.call("state")["held"] == [])
            assert prefill.call("state")["release_log"] == [["req", "released by the decode"]]
    finally:
        _call_all(prefills + decodes, "stop", [{}] * (prefill_tp + decode_tp))
