"""Swap the link roles: the decoder pulls from the listening prompt, then both switch roles and push back.

``local_comm_res = ""`` turns on the cache-manager and remote-cache-accessible modes. Phase 1: the prompt
listens, the decoder links, pulls blocks and unlinks. Phase 2: the prompt ``switch_role(DECODER)`` (stops
listening), the decoder ``switch_role(PROMPT, {"llm.listenIpInfo": ...})`` (starts listening), the prompt
links to it and the decoder pushes its blocks (one tensor per layer) into the prompt. Both sides check the
bytes they received.

Run: ``python examples/switch_role.py [--torch]``
"""
from __future__ import annotations

import sys

import common
from llm_datadist import BlocksCacheKey, CacheDesc, LLMConfig, LLMException, LLMRole, Placement

PROMPT_ID, DECODER_ID = 0, 1
NUM_TENSORS, BLOCKS, BLOCK_ELEMS = 2, 3, 1024
PULL_SRC, PULL_DST = [0, 1], [0, 2]
PROMPT_SEED, DECODER_SEED = 800, 900


def _desc() -> CacheDesc:
    return CacheDesc(NUM_TENSORS, [BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)


def prompt(ch, args) -> None:
    datadist, port = common.init_datadist(LLMRole.PROMPT, PROMPT_ID, listen=True, local_comm_res="")
    kv = common.kv_tensors(NUM_TENSORS, (BLOCKS, BLOCK_ELEMS), seed=PROMPT_SEED)
    cache = datadist.cache_manager.register_blocks_cache(_desc(), kv, BlocksCacheKey(PROMPT_ID, 0))
    ch.send("listening", port)
    ch.recv("decoder unlinked")

    datadist.switch_role(LLMRole.DECODER)  # stop listening
    ch.send("prompt switched")
    decoder_port = ch.recv("decoder listening")
    common.expect_success("link_clusters", datadist.link_clusters([common.cluster(DECODER_ID, decoder_port)],
                                                                  common.LINK_TIMEOUT_MS))
    ch.send("prompt linked")
    ch.recv("pushed")
    for t, tensor in enumerate(kv):
        expected = common.pattern(DECODER_SEED + t, (BLOCKS, BLOCK_ELEMS))
        expected_rows = common.rows(expected).copy()
        expected_rows[PULL_DST] = common.rows(common.pattern(PROMPT_SEED + t, (BLOCKS, BLOCK_ELEMS)))[PULL_SRC]
        common.check_rows(f"tensor {t} after the push", tensor, range(BLOCKS), expected_rows, range(BLOCKS))
    ch.barrier("checked")
    common.expect_success("unlink_clusters", datadist.unlink_clusters([common.cluster(DECODER_ID, decoder_port)],
                                                                      common.LINK_TIMEOUT_MS, force=True))
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.DECODER, DECODER_ID, local_comm_res="")
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (BLOCKS, BLOCK_ELEMS), seed=DECODER_SEED)
    cache = cm.register_blocks_cache(_desc(), kv, BlocksCacheKey(DECODER_ID, 0))
    port = ch.recv("listening")
    prompt_cluster = common.cluster(PROMPT_ID, port)
    common.expect_success("link_clusters", datadist.link_clusters([prompt_cluster], common.LINK_TIMEOUT_MS))
    cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, src_blocks=PULL_SRC, dst_blocks=PULL_DST)
    for t, tensor in enumerate(kv):
        expected = common.pattern(PROMPT_SEED + t, (BLOCKS, BLOCK_ELEMS))
        common.check_rows(f"tensor {t} after the pull", tensor, PULL_DST, expected, PULL_SRC)
    common.expect_success("unlink_clusters", datadist.unlink_clusters([prompt_cluster], common.LINK_TIMEOUT_MS))
    ch.send("decoder unlinked")

    ch.recv("prompt switched")
    for attempt in range(common.INIT_ATTEMPTS):  # listen on a free port, another one if it was just taken
        listen_port = common.free_port()
        config = LLMConfig()
        config.listen_ip_info = f"{common.LOCALHOST}:{listen_port}"
        try:
            datadist.switch_role(LLMRole.PROMPT, config.generate_options())
            break
        except LLMException:
            if attempt == common.INIT_ATTEMPTS - 1:
                raise
    ch.send("decoder listening", listen_port)
    ch.recv("prompt linked")
    cm.push_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, src_blocks=list(range(BLOCKS)), dst_blocks=list(range(BLOCKS)),
                   src_layer_range=range(0, NUM_TENSORS), dst_layer_range=range(0, NUM_TENSORS),
                   tensor_num_per_layer=1)
    ch.send("pushed")
    ch.barrier("checked")
    common.expect_success("unlink_clusters", datadist.unlink_clusters([prompt_cluster], common.LINK_TIMEOUT_MS,
                                                                      force=True))
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    ARGS = common.parse_args(__doc__.splitlines()[0])
    sys.exit(common.run_roles("switch_role", ("prompt", prompt), [("decoder", decoder)], ARGS))
