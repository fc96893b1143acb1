"""xPyD: one decoder links to two prompts with ``link_clusters`` and pulls blocks from each.

Every instance's cluster id is ``ip << 16 | port``. Each prompt listens (``listen_ip_info``) and registers
its blocks under ``BlocksCacheKey(<its cluster id>, 0)``; the decoder links both in one ``link_clusters``
call, pulls blocks 0 and 1 of each prompt into blocks of its own cache, checks every byte and unlinks both.

Run: ``python examples/pull_blocks_xpyd.py [--torch]``
"""
from __future__ import annotations

import sys

import common
from llm_datadist import BlocksCacheKey, CacheDesc, LLMRole, Placement

NUM_TENSORS, BLOCK_ELEMS = 2, 2048
PROMPT_BLOCKS, DECODER_BLOCKS = 3, 6
SRC_BLOCKS = [0, 1]
DST_BLOCKS = {0: [0, 2], 1: [5, 1]}  # prompt index -> where its blocks go
SEEDS = {0: 400, 1: 500}


def _prompt(ch, index: int) -> None:
    datadist, port = common.init_datadist(LLMRole.PROMPT, lambda p: common.ip_port_id(common.LOCALHOST, p),
                                          listen=True, local_comm_res="")
    kv = common.kv_tensors(NUM_TENSORS, (PROMPT_BLOCKS, BLOCK_ELEMS), seed=SEEDS[index])
    desc = CacheDesc(NUM_TENSORS, [PROMPT_BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = datadist.cache_manager.register_blocks_cache(desc, kv, BlocksCacheKey(datadist.cluster_id, 0))
    ch.send("listening", (datadist.cluster_id, port))
    ch.recv("done")  # the decoder has pulled and unlinked
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def prompt0(ch, args) -> None:
    _prompt(ch, 0)


def prompt1(ch, args) -> None:
    _prompt(ch, 1)


def decoder(channels, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.DECODER, common.ip_port_id(common.LOCALHOST, 0), local_comm_res="")
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (DECODER_BLOCKS, BLOCK_ELEMS))
    desc = CacheDesc(NUM_TENSORS, [DECODER_BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = cm.register_blocks_cache(desc, kv, BlocksCacheKey(datadist.cluster_id, 0))
    prompts = [ch.recv("listening") for ch in channels]  # (cluster id, port) of each prompt
    clusters = [common.cluster(cluster_id, port) for cluster_id, port in prompts]
    common.expect_success("link_clusters", datadist.link_clusters(clusters, common.LINK_TIMEOUT_MS))

    for index, (cluster_id, _) in enumerate(prompts):
        cm.pull_blocks(BlocksCacheKey(cluster_id, 0), cache, src_blocks=SRC_BLOCKS, dst_blocks=DST_BLOCKS[index])
    for t, tensor in enumerate(kv):
        for index in range(len(prompts)):
            expected = common.pattern(SEEDS[index] + t, (PROMPT_BLOCKS, BLOCK_ELEMS))
            common.check_rows(f"tensor {t} from prompt {index}", tensor, DST_BLOCKS[index], expected, SRC_BLOCKS)
        common.check_untouched(f"tensor {t}", tensor, [3, 4])

    common.expect_success("unlink_clusters", datadist.unlink_clusters(clusters, common.LINK_TIMEOUT_MS))
    for ch in channels:
        ch.send("done")
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    ARGS = common.parse_args(__doc__.splitlines()[0])
    sys.exit(common.run_roles("pull_blocks_xpyd", ("decoder", decoder), [("prompt0", prompt0), ("prompt1", prompt1)],
                              ARGS))
