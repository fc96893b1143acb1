"""Pull PagedAttention blocks over a rank-table link, then swap them out to a host cache and back.

The prompt registers its KV blocks under ``BlocksCacheKey(1, 0)``; both sides ``link`` one comm domain and
poll ``query_register_mem_status``; the decoder pulls scattered blocks, checks every byte, swaps the blocks out
to a ``Placement.HOST`` cache and back in, and checks again.

Run: ``python examples/pull_blocks.py [--torch]``
"""
from __future__ import annotations

import sys

import common
from llm_datadist import BlocksCacheKey, Cache, CacheDesc, LLMRole, Placement

PROMPT_ID, DECODER_ID = 1, 2
RANKS = {PROMPT_ID: 0, DECODER_ID: 1}  # cluster id -> rank in the comm domain
NUM_TENSORS, BLOCK_ELEMS = 4, 1024
PROMPT_BLOCKS, DECODER_BLOCKS = 8, 6
SRC_BLOCKS, DST_BLOCKS = [5, 0, 3], [1, 4, 0]
SEED = 100


def prompt(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.PROMPT, PROMPT_ID)
    kv = common.kv_tensors(NUM_TENSORS, (PROMPT_BLOCKS, BLOCK_ELEMS), seed=SEED)
    desc = CacheDesc(NUM_TENSORS, [PROMPT_BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = datadist.cache_manager.register_blocks_cache(desc, kv, BlocksCacheKey(PROMPT_ID, 0))
    comm_id = common.link_comm_with(ch, datadist, RANKS, names_it=True)
    ch.barrier("pulled")  # the decoder is done with our blocks
    datadist.unlink(comm_id)
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.DECODER, DECODER_ID)
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (DECODER_BLOCKS, BLOCK_ELEMS))
    desc = CacheDesc(NUM_TENSORS, [DECODER_BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = cm.register_blocks_cache(desc, kv)  # no key: nobody pulls from the decoder
    comm_id = common.link_comm_with(ch, datadist, RANKS, names_it=False)

    cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, src_blocks=SRC_BLOCKS, dst_blocks=DST_BLOCKS)
    ch.barrier("pulled")
    untouched = [b for b in range(DECODER_BLOCKS) if b not in DST_BLOCKS]
    for t, tensor in enumerate(kv):
        expected = common.pattern(SEED + t, (PROMPT_BLOCKS, BLOCK_ELEMS))
        common.check_rows(f"tensor {t} after pull_blocks", tensor, DST_BLOCKS, expected, SRC_BLOCKS)
        common.check_untouched(f"tensor {t} after pull_blocks", tensor, untouched)

    # swap out to host memory, clear the device blocks, swap back in
    host = common.kv_tensors(NUM_TENSORS, (DECODER_BLOCKS, BLOCK_ELEMS))
    host_desc = CacheDesc(NUM_TENSORS, [DECODER_BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.HOST)
    host_cache = Cache.create_cpu_cache(host_desc, [int(common.rows(h).ctypes.data) for h in host])
    cm.swap_blocks(cache, host_cache, {b: b for b in DST_BLOCKS})
    saved = [common.rows(tensor).copy() for tensor in kv]
    for tensor in kv:
        common.rows(tensor)[DST_BLOCKS] = 0
    cm.swap_blocks(host_cache, cache, {b: b for b in DST_BLOCKS})
    for t, tensor in enumerate(kv):
        common.check_rows(f"tensor {t} after swap out and in", tensor, range(DECODER_BLOCKS), saved[t],
                          range(DECODER_BLOCKS))

    datadist.unlink(comm_id)
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    ARGS = common.parse_args(__doc__.splitlines()[0])
    sys.exit(common.run_roles("pull_blocks", ("decoder", decoder), [("prompt", prompt)], ARGS))
