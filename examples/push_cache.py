"""Push a batch slot of a continuous cache into a peer's cache (remote-cache-accessible mode).

``local_comm_res = ""`` turns on the cache-manager and remote-cache-accessible modes. The prompt listens and
registers a continuous cache; the decoder links to it and writes its slot 0 into the prompt's slot 1 with
``push_cache(CacheKeyByIdAndIndex(prompt, cache_id, 1), ...)``; the prompt checks every byte.

Run: ``python examples/push_cache.py [--torch]``
"""
from __future__ import annotations

import sys

import common
from llm_datadist import CacheDesc, CacheKeyByIdAndIndex, LLMRole, Placement

PROMPT_ID, DECODER_ID = 0, 1
NUM_TENSORS, SLOTS, SLOT_ELEMS = 2, 3, 1024
SRC_SLOT, DST_SLOT = 0, 1
SEED = 600


def prompt(ch, args) -> None:
    datadist, port = common.init_datadist(LLMRole.PROMPT, PROMPT_ID, listen=True, local_comm_res="")
    kv = common.kv_tensors(NUM_TENSORS, (SLOTS, SLOT_ELEMS))
    desc = CacheDesc(NUM_TENSORS, [SLOTS, SLOT_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = datadist.cache_manager.register_cache(desc, kv)
    ch.send("registered", (port, cache.cache_id))
    ch.recv("pushed")
    for t, tensor in enumerate(kv):
        expected = common.pattern(SEED + t, (SLOTS, SLOT_ELEMS))
        common.check_rows(f"tensor {t}", tensor, [DST_SLOT], expected, [SRC_SLOT])
        common.check_untouched(f"tensor {t}", tensor, [s for s in range(SLOTS) if s != DST_SLOT])
    ch.barrier("checked")
    common.expect_success("unlink_clusters", datadist.unlink_clusters([common.cluster(DECODER_ID, 0)],
                                                                      common.LINK_TIMEOUT_MS, force=True))
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.DECODER, DECODER_ID, local_comm_res="")
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (SLOTS, SLOT_ELEMS), seed=SEED)
    desc = CacheDesc(NUM_TENSORS, [SLOTS, SLOT_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = cm.register_cache(desc, kv)
    port, prompt_cache_id = ch.recv("registered")
    common.expect_success("link_clusters", datadist.link_clusters([common.cluster(PROMPT_ID, port)],
                                                                  common.LINK_TIMEOUT_MS))
    cm.push_cache(CacheKeyByIdAndIndex(cluster_id=PROMPT_ID, cache_id=prompt_cache_id, batch_index=DST_SLOT),
                  cache, src_batch_index=SRC_SLOT)
    ch.send("pushed")
    ch.barrier("checked")
    common.expect_success("unlink_clusters", datadist.unlink_clusters([common.cluster(PROMPT_ID, port)],
                                                                      common.LINK_TIMEOUT_MS, force=True))
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    ARGS = common.parse_args(__doc__.splitlines()[0])
    sys.exit(common.run_roles("push_cache", ("prompt", prompt), [("decoder", decoder)], ARGS))
