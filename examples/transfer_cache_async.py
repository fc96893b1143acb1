"""Layer-wise asynchronous push with ``transfer_cache_async`` (the official sample's flow).

Remote-cache-accessible mode. The decoder listens and registers a blocks cache under ``BlocksCacheKey(1, 0)``;
the prompt registers a blocks cache of 2 tensors (one layer: K and V), links to the decoder and calls
``transfer_cache_async(cache, synchronizer, [TransferWithCacheKeyConfig(BlocksCacheKey(1, 0), range(0, 1),
range(0, 1))])`` without ``src_block_indices``: the source is then treated like a continuous cache at batch
slot 0, so block 0 of each tensor lands in the decoder's block 0. The synchronizer is asked for layer 0 before
it is sent; the decoder checks every byte.

Run: ``python examples/transfer_cache_async.py [--torch]``
"""
from __future__ import annotations

import sys
import threading
from typing import List, Optional

import common
from llm_datadist import (BlocksCacheKey, CacheDesc, LayerSynchronizer, LLMRole, LLMStatusCode, Placement,
                          TransferWithCacheKeyConfig)

PROMPT_ID, DECODER_ID = 0, 1
NUM_TENSORS, BLOCKS, BLOCK_ELEMS = 2, 3, 1024
SEED = 1000


class ComputedLayers(LayerSynchronizer):
    """Tells the transfer when a layer's KV is computed (here: at once) and records which layers it asked for."""

    def __init__(self) -> None:
        self.asked: List[int] = []
        self._lock = threading.Lock()

    def synchronize_layer(self, layer_index: int, timeout_in_millis: Optional[int]) -> bool:
        with self._lock:
            self.asked.append(layer_index)
        return True


def _desc() -> CacheDesc:
    return CacheDesc(NUM_TENSORS, [BLOCKS, BLOCK_ELEMS], common.DATA_TYPE, Placement.DEVICE)


def prompt(ch, args) -> None:
    datadist, _ = common.init_datadist(LLMRole.PROMPT, PROMPT_ID, enable_remote_cache_accessible=True)
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (BLOCKS, BLOCK_ELEMS), seed=SEED)
    cache = cm.register_blocks_cache(_desc(), kv, BlocksCacheKey(PROMPT_ID, 0))
    decoder_port = ch.recv("registered")
    decoder_cluster = common.cluster(DECODER_ID, decoder_port)
    common.expect_success("link_clusters", datadist.link_clusters([decoder_cluster], common.LINK_TIMEOUT_MS))

    synchronizer = ComputedLayers()
    config = TransferWithCacheKeyConfig(BlocksCacheKey(DECODER_ID, 0), range(0, 1), range(0, 1))
    task = cm.transfer_cache_async(cache, synchronizer, [config])
    results = task.get_results()
    if results != [LLMStatusCode.LLM_SUCCESS] or task.synchronize() != LLMStatusCode.LLM_SUCCESS:
        raise RuntimeError(f"transfer_cache_async failed: {results}")
    if synchronizer.asked != [0]:
        raise RuntimeError(f"the synchronizer was asked for layers {synchronizer.asked}, expected [0]")
    ch.send("transferred")
    ch.barrier("checked")
    common.expect_success("unlink_clusters", datadist.unlink_clusters([decoder_cluster], common.LINK_TIMEOUT_MS,
                                                                      force=True))
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(ch, args) -> None:
    datadist, port = common.init_datadist(LLMRole.DECODER, DECODER_ID, listen=True,
                                          enable_remote_cache_accessible=True)
    cm = datadist.cache_manager
    kv = common.kv_tensors(NUM_TENSORS, (BLOCKS, BLOCK_ELEMS))
    cache = cm.register_blocks_cache(_desc(), kv, BlocksCacheKey(DECODER_ID, 0))
    ch.send("registered", port)
    ch.recv("transferred")
    for t, tensor in enumerate(kv):
        expected = common.pattern(SEED + t, (BLOCKS, BLOCK_ELEMS))
        common.check_rows(f"tensor {t}", tensor, [0], expected, [0])
        common.check_untouched(f"tensor {t}", tensor, [1, 2])
    ch.barrier("checked")
    common.expect_success("unlink_clusters", datadist.unlink_clusters([common.cluster(PROMPT_ID, 0)],
                                                                      common.LINK_TIMEOUT_MS, force=True))
    cm.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    ARGS = common.parse_args(__doc__.splitlines()[0])
    sys.exit(common.run_roles("transfer_cache_async", ("decoder", decoder), [("prompt", prompt)], ARGS))
