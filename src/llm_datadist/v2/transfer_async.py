"""CacheManager.transfer_cache_async: the official synchronous checks in order, then a background task."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from llm_datadist._engine.api import TENSORS_PER_LAYER, ConfigJob, TaskJob, ErrorBoundary
from llm_datadist.utils.utils import check_isinstance, check_uint64, raise_if_false, raise_if_true
from llm_datadist.v2.llm_types import (BlocksCacheKey, Cache, CacheKeyByIdAndIndex, CacheTask, LayerSynchronizer,
                                       Placement, TransferConfig, TransferWithCacheKeyConfig)
from llm_datadist.v2.llm_utils import cache_key_source

__all__ = ["transfer_cache_async"]

AnyConfig = Union[TransferConfig, TransferWithCacheKeyConfig]


def _check_indices(name: str, indices: Optional[Sequence[int]]) -> List[int]:
    """Block indices: None or a list/tuple of uint64 ints (TypeError / ValueError)."""
    check_isinstance(name, indices, (list, tuple), int)
    if indices is None:
        return []
    for index in indices:
        check_uint64(f"{name} element", index)
    return [int(index) for index in indices]


def _check_block_args(src_block_indices, dst_block_indices, dst_block_memory_size):
    """The block arguments: their types first, then their combinations."""
    dst_blocks = _check_indices("dst_block_indices", dst_block_indices)
    src_blocks = _check_indices("src_block_indices", src_block_indices)
    if dst_block_memory_size is not None:
        check_uint64("dst_block_memory_size", dst_block_memory_size)
    if src_blocks:
        raise_if_false(len(dst_blocks) > 0, "transfer from blocks to cache is not supported")
        raise_if_false(len(src_blocks) == len(dst_blocks), "src_block_indices size {} and dst_block_indices size {} "
                       "must be equal", len(src_blocks), len(dst_blocks))
    elif dst_blocks:
        raise_if_true(dst_block_memory_size is None,
                      "dst_block_memory_size is required when dst_block_indices is given for a continuous source")
    return src_blocks, dst_blocks


def _check_config_types(transfer_configs: Any, remote_accessible_mode: bool) -> None:
    """The config class depends on the remote-cache-accessible mode."""
    if not remote_accessible_mode:
        check_isinstance("transfer_configs", transfer_configs, (list, tuple), TransferConfig, allow_none=False)
        return
    try:
        check_isinstance("transfer_configs", transfer_configs, (list, tuple), TransferWithCacheKeyConfig,
                         allow_none=False)
    except TypeError as exc:
        raise TypeError(f"While enable_remote_cache_accessible is True, {exc}") from None


def _checked_job(cfg: AnyConfig, num_layers: int, src_is_blocks: bool) -> ConfigJob:
    """The checks of one config and the job made of what was checked (a missing src_layer_range is filled in
    place, as upstream)."""
    layers = cfg.src_layer_range
    if layers is None:
        layers = cfg.src_layer_range = range(0, num_layers)
    if src_is_blocks:
        raise_if_false(cfg.src_batch_index == 0, "src_batch_index must be 0 when the source is a blocks cache, "
                       "but got {}", cfg.src_batch_index)
    raise_if_false(0 <= layers.start < layers.stop <= num_layers,
                   "src_layer_range {} must satisfy 0 <= start < stop <= {} (layers of the source cache)",
                   layers, num_layers)
    if isinstance(cfg, TransferConfig):
        raise_if_false(len(cfg.dst_addrs) == TENSORS_PER_LAYER * len(layers),
                       "dst_addrs size {} must be {} (2 tensors for each of the {} layers of {})",
                       len(cfg.dst_addrs), TENSORS_PER_LAYER * len(layers), len(layers), layers)
        return ConfigJob(dst_cluster_id=cfg.dst_cluster_id, src_layers=layers, src_batch_index=cfg.src_batch_index,
                         dst_addrs=tuple(int(a) for a in cfg.dst_addrs))
    key = cfg.cache_key
    check_isinstance("cache_key", key, (BlocksCacheKey, CacheKeyByIdAndIndex), allow_none=False)
    assert key is not None  # check_isinstance(allow_none=False) raised for None
    dst_layers = cfg.dst_layer_range if cfg.dst_layer_range is not None else layers
    raise_if_false(len(dst_layers) == len(layers), "src_layer_range {} and dst_layer_range {} differ in length",
                   layers, dst_layers)
    raise_if_true(isinstance(key, BlocksCacheKey) and cfg.src_batch_index != 0,
                  "src_batch_index must be 0 when cache_key is a BlocksCacheKey, but got {}", cfg.src_batch_index)
    return ConfigJob(dst_cluster_id=key.cluster_id, src_layers=layers, src_batch_index=cfg.src_batch_index,
                     dest=cache_key_source(key), dst_layers=dst_layers)


def transfer_cache_async(cache_manager, src_cache: Cache, layer_synchronizer: LayerSynchronizer,
                         transfer_configs: Sequence[AnyConfig], src_block_indices: Optional[Sequence[int]] = None,
                         dst_block_indices: Optional[Sequence[int]] = None,
                         dst_block_memory_size: Optional[int] = None) -> CacheTask:
    """Push ``src_cache`` layer by layer to every destination while the model computes the next layer.

    Args:
        cache_manager: the CacheManager of the source instance.
        src_cache: a DEVICE cache of this instance (continuous, or blocks with ``src_block_indices``).
        layer_synchronizer: asked once per needed source layer, in ascending order, before it is sent.
        transfer_configs: TransferConfig (raw destination addresses) when remote-cache-accessible mode is off,
            TransferWithCacheKeyConfig (destination resolved from the peer's cache table) when it is on.
        src_block_indices: source blocks (blocks source); ``dst_block_indices[j]`` receives block j.
        dst_block_indices: destination blocks (blocks source, or a continuous source cut into pieces).
        dst_block_memory_size: destination block size in bytes (needed for a continuous source with blocks).

    Returns:
        A CacheTask; ``synchronize``/``get_results`` report one status per config, in order;
        a config that never ran reports LLM_FAILED.

    Raises:
        TypeError / ValueError: wrong argument types / out-of-range numbers.
        LLMException: LLM_PARAM_INVALID for invalid combinations, LLM_FAILED once finalized.
    """
    check_isinstance("src_cache", src_cache, Cache, allow_none=False)
    raise_if_true(src_cache.cache_desc.placement == Placement.HOST,
                  "transfer_cache_async does not support a HOST source cache")
    src_blocks, dst_blocks = _check_block_args(src_block_indices, dst_block_indices, dst_block_memory_size)
    check_isinstance("layer_synchronizer", layer_synchronizer, LayerSynchronizer, allow_none=False)
    ra_mode = cache_manager._remote_accessible_mode
    _check_config_types(transfer_configs, ra_mode)
    if not dst_blocks:
        raise_if_false(not dst_block_memory_size, "dst_block_memory_size must be None or 0 without dst_block_indices, "
                       "but got {}", dst_block_memory_size)
    num_tensors = src_cache.cache_desc.num_tensors
    raise_if_false(num_tensors % TENSORS_PER_LAYER == 0, "num_tensors {} of the source cache must be even",
                   num_tensors)
    num_layers = num_tensors // TENSORS_PER_LAYER
    src_is_blocks = src_cache.is_blocks_cache or bool(src_blocks)
    configs = tuple(_checked_job(cfg, num_layers, src_is_blocks) for cfg in transfer_configs)
    raise_if_true(bool(src_blocks) and not src_cache.is_blocks_cache,
                  "src_block_indices need a blocks source cache")
    cache_manager._owned(src_cache)
    engine = cache_manager._live_engine()
    job = TaskJob(src_cache_id=src_cache.cache_id, configs=configs, synchronizer=layer_synchronizer,
                  src_blocks=tuple(src_blocks), dst_blocks=tuple(dst_blocks),
                  dst_block_size=int(dst_block_memory_size or 0), timeout_s=engine.opts.sync_kv_timeout_ms / 1000.0)
    with ErrorBoundary("transfer_cache_async"):
        task = engine.start_layerwise(job)
    return CacheTask(task, len(job.configs))
