"""Push PagedAttention blocks into a peer's blocks cache, all layers and then one layer only.

``local_comm_res = ""`` turns on the cache-manager and remote-cache-accessible modes. The prompt listens and
registers its blocks under ``BlocksCacheKey(0, 0)``; the decoder links and writes blocks with ``push_blocks``:
first every tensor (K and V of both layers), then layer 1 only (``src_layer_range``/``dst_layer_range`` with
2 tensors per layer). The prompt checks every byte, including that layer 0 of the second push stayed untouched.

Run: ``python examples/push_blocks.py [--torch]``
"""
from __future__ import annotations

import sys

import common
from llm_datadist import BlocksCacheKey, CacheDesc, LLMRole, Placement

PROMPT_ID, DECODER_ID = 0, 1
NUM_TENSORS, BLOCKS, BLOCK_ELEMS = 4, 6, 1024  # 2 layers of K, V
ALL_SRC, ALL_DST = [0, 1], [0, 2]
LAYER_SRC, LAYER_DST = [2, 3], [5, 4]
SEED = 700


def prompt(ch, args) -> None:
    datadist, port = common.init_datadist(LLMRole.PROMPT, PROMPT_ID, listen=True, local_comm_res="")
    kv = common.kv_tensors(NUM_TENSORS, (BLOCKS, BLOCK_ELEMS))
    desc = CacheDesc(NUM_TENSORS, [BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = datadist.cache_manager.register_blocks_cache(desc, kv, BlocksCacheKey(PROMPT_ID, 0))
    ch.send("registered", port)
    ch.recv("pushed")
    for t, tensor in enumerate(kv):
        expected = common.pattern(SEED + t, (BLOCKS, BLOCK_ELEMS))
        common.check_rows(f"tensor {t}", tensor, ALL_DST, expected, ALL_SRC)
        if t >= 2:  # layer 1 = tensors 2 and 3
            common.check_rows(f"tensor {t} (layer 1)", tensor, LAYER_DST, expected, LAYER_SRC)
            common.check_untouched(f"tensor {t}", tensor, [1, 3])
        else:
            common.check_untouched(f"tensor {t} (layer 0, not in the layer push)", tensor, [1, 3, 4, 5])
    ch.barrier("checked")
    common.expect_success("unlink_clusters", datadist.unlink_clusters([common.cluster(DECODER_ID, 0)],
                                                                      common.LINK_TIMEOUT_MS, force=True))
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.DECODER, DECODER_ID, local_comm_res="")
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (BLOCKS, BLOCK_ELEMS), seed=SEED)
    desc = CacheDesc(NUM_TENSORS, [BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = cm.register_blocks_cache(desc, kv, BlocksCacheKey(DECODER_ID, 0))
    port = ch.recv("registered")
    common.expect_success("link_clusters", datadist.link_clusters([common.cluster(PROMPT_ID, port)],
                                                                  common.LINK_TIMEOUT_MS))
    cm.push_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, src_blocks=ALL_SRC, dst_blocks=ALL_DST)
    cm.push_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, src_blocks=LAYER_SRC, dst_blocks=LAYER_DST,
                   src_layer_range=range(1, 2), dst_layer_range=range(1, 2), tensor_num_per_layer=2)
    ch.send("pushed")
    ch.barrier("checked")
    common.expect_success("unlink_clusters", datadist.unlink_clusters([common.cluster(PROMPT_ID, port)],
                                                                      common.LINK_TIMEOUT_MS, force=True))
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    ARGS = common.parse_args(__doc__.splitlines()[0])
    sys.exit(common.run_roles("push_blocks", ("prompt", prompt), [("decoder", decoder)], ARGS))
