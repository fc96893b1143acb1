"""Choose the transfer backend: both sides listen, link, and move blocks both ways over the chosen transport.

``transfer_backend = "hixl"`` (the official name; here the default choice by locality) or one of our
transports (``tcp``, ``process_vm``; ``--backend``) with ``local_comm_res = ""`` and a
``listen_ip_info`` on both sides. The prompt links to the decoder and pulls the decoder's block 2; the decoder
pushes its blocks 0 and 1 into the prompt. Every endpoint is client and server: the decoder links to the prompt
too (as the official sample does), which makes a second link; either carries transfers both ways. The prompt
checks every byte.

Run: ``python examples/transfer_backend.py [--backend hixl|tcp|process_vm] [--torch]``
(``shm`` moves only pool-allocated caches, so it can not serve these registered tensors.)
"""
from __future__ import annotations

import sys

import common
from llm_datadist import BlocksCacheKey, CacheDesc, LLMRole, Placement

PROMPT_ID, DECODER_ID = 0, 1
NUM_TENSORS, BLOCKS, BLOCK_ELEMS = 2, 3, 2048
PULLED, PUSHED = [2], [0, 1]
PROMPT_SEED, DECODER_SEED = 1100, 1200


def _desc() -> CacheDesc:
    return CacheDesc(NUM_TENSORS, [BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)


def _init(role: LLMRole, cluster_id: int, backend: str):
    return common.init_datadist(role, cluster_id, listen=True, local_comm_res="", transfer_backend=backend)


def prompt(ch, args) -> None:
    datadist, port = _init(LLMRole.PROMPT, PROMPT_ID, args.backend)
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (BLOCKS, BLOCK_ELEMS), seed=PROMPT_SEED)
    cache = cm.register_blocks_cache(_desc(), kv, BlocksCacheKey(PROMPT_ID, 0))
    ch.send("listening", port)
    decoder = common.cluster(DECODER_ID, ch.recv("listening"), local_port=port)
    common.expect_success("link_clusters", datadist.link_clusters([decoder], common.LINK_TIMEOUT_MS))
    ch.send("linked")
    cm.pull_blocks(BlocksCacheKey(DECODER_ID, 0), cache, src_blocks=PULLED, dst_blocks=PULLED)
    ch.recv("pushed")
    for t, tensor in enumerate(kv):
        expected = common.pattern(DECODER_SEED + t, (BLOCKS, BLOCK_ELEMS))
        common.check_rows(f"tensor {t}", tensor, PULLED + PUSHED, expected, PULLED + PUSHED)
    common.expect_success("unlink_clusters", datadist.unlink_clusters([decoder], common.LINK_TIMEOUT_MS))
    ch.barrier("unlinked")
    ch.barrier("decoder unlinked")  # the decoder's own unlink reaches this instance before it finalizes
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(ch, args) -> None:
    datadist, port = _init(LLMRole.DECODER, DECODER_ID, args.backend)
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (BLOCKS, BLOCK_ELEMS), seed=DECODER_SEED)
    cache = cm.register_blocks_cache(_desc(), kv, BlocksCacheKey(DECODER_ID, 0))
    prompt_port = ch.recv("listening")
    ch.send("listening", port)
    ch.recv("linked")
    prompt_cluster = common.cluster(PROMPT_ID, prompt_port, local_port=port)
    common.expect_success("link_clusters", datadist.link_clusters([prompt_cluster], common.LINK_TIMEOUT_MS))
    cm.push_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, src_blocks=PUSHED, dst_blocks=PUSHED)
    ch.send("pushed")
    ch.barrier("unlinked")  # the prompt's unlink removed its link on both sides; ours is left
    common.expect_success("unlink_clusters", datadist.unlink_clusters([prompt_cluster], common.LINK_TIMEOUT_MS))
    ch.barrier("decoder unlinked")
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


def _backend_option(parser) -> None:
    parser.add_argument("--backend", default="hixl", help="transfer_backend: hixl (default choice), tcp or "
                                                          "process_vm")


if __name__ == "__main__":
    ARGS = common.parse_args(__doc__.splitlines()[0], _backend_option)
    sys.exit(common.run_roles(f"transfer_backend ({ARGS.backend})", ("prompt", prompt), [("decoder", decoder)],
                              ARGS))
