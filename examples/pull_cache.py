"""Pull batch slots of a continuous KV cache by CacheKey over a rank-table link.

The prompt registers a continuous cache of 4 tensors with 2 batch slots and binds ``CacheKey(1, req_id=0)``
and ``CacheKey(1, req_id=1)`` to them; both sides ``link`` one comm domain; the decoder pulls request 1 into
its slot 0 and request 0 into its slot 1, then pulls only the first 256 bytes of request 0 into slot 2, and
checks every byte.

Run: ``python examples/pull_cache.py [--torch]``
"""
from __future__ import annotations

import sys

import common
from llm_datadist import CacheDesc, CacheKey, LLMRole, Placement

PROMPT_ID, DECODER_ID = 1, 2
RANKS = {PROMPT_ID: 0, DECODER_ID: 1}  # cluster id -> rank in the comm domain
NUM_TENSORS, SLOT_ELEMS = 4, 4096
PROMPT_SLOTS, DECODER_SLOTS = 2, 4
PARTIAL_BYTES = 256
SEED = 200


def prompt(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.PROMPT, PROMPT_ID)
    kv = common.kv_tensors(NUM_TENSORS, (PROMPT_SLOTS, SLOT_ELEMS), seed=SEED)
    desc = CacheDesc(NUM_TENSORS, [PROMPT_SLOTS, SLOT_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    keys = [CacheKey(prompt_cluster_id=PROMPT_ID, req_id=0, model_id=0),
            CacheKey(prompt_cluster_id=PROMPT_ID, req_id=1, model_id=0)]
    cache = datadist.cache_manager.register_cache(desc, kv, keys)
    comm_id = common.link_comm_with(ch, datadist, RANKS, names_it=True)
    ch.barrier("pulled")
    datadist.unlink(comm_id)
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.DECODER, DECODER_ID)
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (DECODER_SLOTS, SLOT_ELEMS))
    desc = CacheDesc(NUM_TENSORS, [DECODER_SLOTS, SLOT_ELEMS], common.DATA_TYPE, Placement.DEVICE)
    cache = cm.register_cache(desc, kv)
    comm_id = common.link_comm_with(ch, datadist, RANKS, names_it=False)

    cm.pull_cache(CacheKey(prompt_cluster_id=PROMPT_ID, req_id=1, model_id=0), cache, batch_index=0)
    cm.pull_cache(CacheKey(prompt_cluster_id=PROMPT_ID, req_id=0, model_id=0), cache, batch_index=1)
    cm.pull_cache(CacheKey(prompt_cluster_id=PROMPT_ID, req_id=0, model_id=0), cache, batch_index=2,
                  size=PARTIAL_BYTES)  # only the first bytes of the slot (e.g. the valid tokens)
    ch.barrier("pulled")
    for t, tensor in enumerate(kv):
        expected = common.pattern(SEED + t, (PROMPT_SLOTS, SLOT_ELEMS))
        common.check_rows(f"tensor {t}", tensor, [0, 1], expected, [1, 0])
        partial = common.rows(tensor)[2]
        if partial[:PARTIAL_BYTES].tobytes() != common.rows(expected)[0][:PARTIAL_BYTES].tobytes() \
                or partial[PARTIAL_BYTES:].any():
            raise common.Mismatch(f"tensor {t}: the partial pull wrote other bytes than the first {PARTIAL_BYTES}")
        common.check_untouched(f"tensor {t}", tensor, [3])

    datadist.unlink(comm_id)
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    ARGS = common.parse_args(__doc__.splitlines()[0])
    sys.exit(common.run_roles("pull_cache", ("decoder", decoder), [("prompt", prompt)], ARGS))
