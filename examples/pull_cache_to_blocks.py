"""Pull one batch slot of a continuous cache into blocks of a PagedAttention cache (rank-table link).

The prompt registers a continuous cache with ``CacheKey(1, req_id=0)`` bound to slot 0; the decoder has a
blocks cache whose block is a quarter of a slot, and pulls the slot with ``pull_blocks(CacheKey(...), cache,
src_blocks=[], dst_blocks=[...])``: the slot is cut into block-sized chunks, chunk i lands in ``dst_blocks[i]``.

Run: ``python examples/pull_cache_to_blocks.py [--torch]``
"""
from __future__ import annotations

import sys

import common
from llm_datadist import CacheDesc, CacheKey, LLMRole, Placement

PROMPT_ID, DECODER_ID = 1, 2
RANKS = {PROMPT_ID: 0, DECODER_ID: 1}  # cluster id -> rank in the comm domain
NUM_TENSORS, BLOCK_ELEMS, CHUNKS = 2, 512, 4
SLOT_ELEMS = BLOCK_ELEMS * CHUNKS
PROMPT_SLOTS, DECODER_BLOCKS = 2, 8
DST_BLOCKS = [6, 1, 3, 0]
SEED = 300
KEY = CacheKey(prompt_cluster_id=PROMPT_ID, req_id=0, model_id=0)


def prompt(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.PROMPT, PROMPT_ID)
    kv = common.kv_tensors(NUM_TENSORS, (PROMPT_SLOTS, SLOT_ELEMS), seed=SEED)
    desc = CacheDesc(NUM_TENSORS, [PROMPT_SLOTS, SLOT_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = datadist.cache_manager.register_cache(desc, kv, [KEY])
    comm_id = common.link_comm_with(ch, datadist, RANKS, names_it=True)
    ch.barrier("pulled")
    datadist.unlink(comm_id)
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.DECODER, DECODER_ID)
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (DECODER_BLOCKS, BLOCK_ELEMS))
    desc = CacheDesc(NUM_TENSORS, [DECODER_BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = cm.register_blocks_cache(desc, kv)
    comm_id = common.link_comm_with(ch, datadist, RANKS, names_it=False)

    cm.pull_blocks(KEY, cache, src_blocks=[], dst_blocks=DST_BLOCKS)
    ch.barrier("pulled")
    for t, tensor in enumerate(kv):
        slot0 = common.pattern(SEED + t, (PROMPT_SLOTS, SLOT_ELEMS))[0]
        chunks = slot0.reshape(CHUNKS, BLOCK_ELEMS)  # chunk i of slot 0 -> DST_BLOCKS[i]
        common.check_rows(f"tensor {t}", tensor, DST_BLOCKS, chunks, range(CHUNKS))
        common.check_untouched(f"tensor {t}", tensor, [b for b in range(DECODER_BLOCKS) if b not in DST_BLOCKS])

    datadist.unlink(comm_id)
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    ARGS = common.parse_args(__doc__.splitlines()[0])
    sys.exit(common.run_roles("pull_cache_to_blocks", ("decoder", decoder), [("prompt", prompt)], ARGS))
