"""Which KV heads each tensor-parallel rank holds, and where a decode rank pulls its heads from.

vLLM splits a model's ``H`` KV heads evenly over ``T`` TP ranks: with ``T`` dividing ``H``, rank ``r`` holds heads
``[r * H/T, (r + 1) * H/T)``. With fewer heads than ranks (``H`` dividing ``T``; an MLA latent counts as one head),
every head is replicated on ``T/H`` consecutive ranks: rank ``r`` holds head ``r // (T/H)``.

In a head-major (HND) block ``[heads, block_size, head bytes]`` the heads of a rank are equal contiguous ranges, so
a block of ``h`` heads is ``h`` sub-blocks of one head. The connector registers every KV cache in such sub-blocks
(block ``b``'s head ``j`` is sub-block ``b * h + j``), on the prefill and on the decode, so whatever the two TP
sizes, a decode rank moves the heads it owns with ordinary ``pull_blocks`` calls: one per prefill rank it pulls
from, from that rank's sub-blocks into its own. Between equal TP sizes the sub-blocks of a block are neighbours on
both sides, and the library's plan merges them back into whole blocks.

A prefill rank that several decode ranks pull from (the decode has more ranks) is claimed by each of them; the
claim says how many will (``sharers``), and the prefill frees the blocks after the last release. A prefill rank
that no decode rank needs (replicated heads) is released by one decode rank without a pull.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

__all__ = ["HeadSlice", "RankPlan", "check_tp", "heads_per_rank", "heads_of", "plan_for", "sub_block_pairs"]


def check_tp(tp_size: int, total_heads: int) -> None:
    """Raise ValueError unless ``tp_size`` ranks can share ``total_heads`` KV heads as vLLM does."""
    if tp_size < 1 or total_heads < 1:
        raise ValueError(f"TP size {tp_size} and KV head count {total_heads} must be >= 1")
    if total_heads % tp_size and tp_size % total_heads:
        raise ValueError(f"{total_heads} KV heads can not be split over {tp_size} TP ranks (one must divide the "
                         f"other)")


def heads_per_rank(tp_size: int, total_heads: int) -> int:
    """KV heads in each rank's blocks."""
    check_tp(tp_size, total_heads)
    return max(1, total_heads // tp_size)


def heads_of(rank: int, tp_size: int, total_heads: int) -> range:
    """The model's KV heads that ``rank`` holds, in the order of its blocks."""
    per = heads_per_rank(tp_size, total_heads)
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is not one of {tp_size} TP ranks")
    if total_heads >= tp_size:
        return range(rank * per, (rank + 1) * per)
    first = rank // (tp_size // total_heads)
    return range(first, first + 1)


def _source_rank(head: int, decode_rank: int, prefill_tp: int, total_heads: int) -> int:
    if total_heads >= prefill_tp:
        return head // (total_heads // prefill_tp)
    replicas = prefill_tp // total_heads  # ranks head*replicas ... hold the head: spread the decode ranks over them
    return head * replicas + decode_rank % replicas


@dataclasses.dataclass(frozen=True)
class HeadSlice:
    """``count`` consecutive heads: from head ``src_head`` of a prefill rank's block to head ``dst_head`` of the
    decode rank's block."""

    src_head: int
    dst_head: int
    count: int


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """What one decode rank does for every request of a prefill of another (or the same) TP size.

    Attributes:
        pulls: prefill rank -> the head slices pulled from it (prefill ranks in increasing order).
        sharers: prefill rank -> how many decode ranks pull from it (0: none does).
        release_only: prefill ranks no decode rank pulls from that this rank releases.
        src_heads: heads in a prefill rank's block.
        dst_heads: heads in this decode rank's block.
    """

    pulls: Dict[int, Tuple[HeadSlice, ...]]
    sharers: Dict[int, int]
    release_only: Tuple[int, ...]
    src_heads: int
    dst_heads: int

    @property
    def same_shape(self) -> bool:
        """Whether this rank pulls every head of one prefill rank's blocks, block for block."""
        if len(self.pulls) != 1 or self.src_heads != self.dst_heads:
            return False
        (slices,) = self.pulls.values()
        return slices == (HeadSlice(0, 0, self.dst_heads),)


def _pulls(decode_rank: int, decode_tp: int, prefill_tp: int, total_heads: int) -> Dict[int, Tuple[HeadSlice, ...]]:
    src_per = heads_per_rank(prefill_tp, total_heads)
    slices: Dict[int, List[HeadSlice]] = {}
    for dst_head, head in enumerate(heads_of(decode_rank, decode_tp, total_heads)):
        rank = _source_rank(head, decode_rank, prefill_tp, total_heads)
        src_head = head - heads_of(rank, prefill_tp, total_heads).start
        assert 0 <= src_head < src_per
        run = slices.setdefault(rank, [])
        if run and run[-1].src_head + run[-1].count == src_head and run[-1].dst_head + run[-1].count == dst_head:
            run[-1] = HeadSlice(run[-1].src_head, run[-1].dst_head, run[-1].count + 1)
        else:
            run.append(HeadSlice(src_head, dst_head, 1))
    return {rank: tuple(slices[rank]) for rank in sorted(slices)}


def plan_for(decode_rank: int, decode_tp: int, prefill_tp: int, total_heads: int) -> RankPlan:
    """The pulls and releases of ``decode_rank`` (of ``decode_tp``) from a prefill of ``prefill_tp`` ranks.

    Raises:
        ValueError: a TP size that does not divide (or is not divided by) the KV head count, or a rank out of range.
    """
    check_tp(prefill_tp, total_heads)
    heads_of(decode_rank, decode_tp, total_heads)  # checks the decode side
    sharers = {rank: 0 for rank in range(prefill_tp)}
    mine: Dict[int, Tuple[HeadSlice, ...]] = {}
    for rank in range(decode_tp):
        pulls = _pulls(rank, decode_tp, prefill_tp, total_heads)
        for source in pulls:
            sharers[source] += 1
        if rank == decode_rank:
            mine = pulls
    release_only = tuple(rank for rank, count in sharers.items() if count == 0 and rank % decode_tp == decode_rank)
    return RankPlan(mine, sharers, release_only, heads_per_rank(prefill_tp, total_heads),
                    heads_per_rank(decode_tp, total_heads))


def sub_block_pairs(src_blocks: Sequence[int], dst_blocks: Sequence[int], slices: Sequence[HeadSlice],
                    src_heads: int, dst_heads: int) -> Tuple[List[int], List[int]]:
    """Sub-block ids (one head each) of ``slices`` for every (source block, destination block) pair, block-major,
    so neighbouring sub-blocks stay neighbours."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks for {len(dst_blocks)} destination blocks")
    src: List[int] = []
    dst: List[int] = []
    for s_block, d_block in zip(src_blocks, dst_blocks):
        for part in slices:
            s0 = int(s_block) * src_heads + part.src_head
            d0 = int(d_block) * dst_heads + part.dst_head
            src.extend(range(s0, s0 + part.count))
            dst.extend(range(d0, d0 + part.count))
    return src, dst
