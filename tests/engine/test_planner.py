"""The planner's three shapes: the same ops whether the plan comes out as Python ints (few ops) or arrays."""
from __future__ import annotations

import numpy as np
import pytest

from llm_datadist._engine import planner
from llm_datadist._engine.errors import ParamInvalid
from llm_datadist._transport.base import SMALL_OPS

BS = 4096


def _side(tensors: int, count: int, base: int, stride: int = BS) -> planner.Side:
    return planner.Side(bases=tuple(base + t * count * stride for t in range(tensors)), stride=stride, count=count,
                        is_blocks=True)


def _ops(ops):
    return [tuple(int(x) for x in column) for column in ops]


@pytest.mark.parametrize("blocks", [1, SMALL_OPS // 2, SMALL_OPS // 2 + 1, 200])
def test_blocks_ops_are_the_same_on_both_sides_of_the_small_limit(blocks):
    rng = np.random.default_rng(blocks)
    src, dst = _side(2, 300, 1 << 30), _side(2, 400, 1 << 34)
    s_blk, d_blk = rng.integers(0, 300, blocks).tolist(), rng.integers(0, 400, blocks).tolist()
    ops = planner.blocks_ops(src, range(2), s_blk, dst, range(2), d_blk)
    assert isinstance(ops[0], list) == (2 * blocks <= SMALL_OPS)
    want_s = [src.bases[t] + b * BS for t in range(2) for b in s_blk]
    want_d = [dst.bases[t] + b * BS for t in range(2) for b in d_blk]
    assert _ops(ops) == [tuple(want_s), tuple(want_d), tuple([BS] * len(want_s))]


@pytest.mark.parametrize("tensors", [1, SMALL_OPS, SMALL_OPS + 1])
def test_slot_ops_in_both_forms(tensors):
    src, dst = _side(tensors, 4, 1 << 30, 1000), _side(tensors, 8, 1 << 34, 1200)
    ops = planner.slot_ops(src, range(tensors), 3, dst, range(tensors), 5, 600, 100)
    assert isinstance(ops[0], list) == (tensors <= SMALL_OPS)
    assert _ops(ops) == [tuple(src.bases[t] + 3100 for t in range(tensors)),
                         tuple(dst.bases[t] + 6100 for t in range(tensors)), tuple([600] * tensors)]


@pytest.mark.parametrize("tensors", [1, 40])
def test_chunk_ops_cut_a_slot_with_a_partial_last_piece(tensors):
    src, dst = _side(tensors, 2, 1 << 30, 10000), _side(tensors, 50, 1 << 34, 3000)
    ops = planner.chunk_ops(src, range(tensors), 1, dst, range(tensors), [7, 2, 9, 4], 3000)
    assert isinstance(ops[0], list) == (4 * tensors <= SMALL_OPS)
    want_s = [src.bases[t] + 10000 + j * 3000 for t in range(tensors) for j in range(4)]
    want_d = [dst.bases[t] + b * 3000 for t in range(tensors) for b in (7, 2, 9, 4)]
    assert _ops(ops) == [tuple(want_s), tuple(want_d), tuple([3000, 3000, 3000, 1000] * tensors)]


@pytest.mark.parametrize("blocks", [[5, 300], [-1, 2], list(range(299)) + [300]])
def test_block_indices_out_of_range_are_refused(blocks):
    src, dst = _side(1, 300, 1 << 30), _side(1, 400, 1 << 34)
    with pytest.raises(ParamInvalid, match="out of range"):
        planner.blocks_ops(src, range(1), blocks, dst, range(1), list(range(len(blocks))))
    with pytest.raises(ParamInvalid, match="integers"):
        planner.blocks_ops(src, range(1), ["a"] * len(blocks), dst, range(1), list(range(len(blocks))))
