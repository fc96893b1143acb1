"""CacheManager: registration, allocation, pulls, pushes and local copies, validated in the official order."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

from llm_datadist._engine.api import UINT64_MAX, EngineApi, KeyId, LayerSel, ErrorBoundary
from llm_datadist._engine.api import requests as rq
from llm_datadist.status import LLMException, LLMStatusCode
from llm_datadist.utils.utils import (check_int64, check_isinstance, check_uint32, check_uint64, raise_if_false,
                                      raise_if_true)
from llm_datadist.v2.llm_types import (BlocksCacheKey, Cache, CacheDesc, CacheKey, CacheKeyByIdAndIndex, MemInfo,
                                       Memtype, Placement)
from llm_datadist.v2.llm_utils import (cache_key_source, check_cache_key, check_tensor_num_per_layer, layer_range_arg,
                                       spec_of)
from llm_datadist.v2.tensors import registration_addresses

__all__ = ["CacheManager"]


class CacheManager:
    """Manages the caches of one LLMDataDist instance (obtained through ``LLMDataDist.cache_manager``)."""

    def __init__(self, datadist, engine: EngineApi) -> None:
        self._datadist = datadist
        self._engine = engine
        opts = engine.opts
        self._device_pool = bool(opts.mem_pool_cfg)
        self._host_pool = bool(opts.host_mem_pool_cfg)
        self._remote_accessible_mode = opts.remote_cache_accessible
        self._is_call_linked = False
        self._initialized = True
        self._registered_tensors: Dict[int, list] = {}  # cache id -> tensors kept alive while registered

    def _set_is_call_linked(self) -> None:
        self._is_call_linked = True

    def _finalize(self) -> None:
        self._initialized = False
        self._registered_tensors.clear()

    def _owned(self, *caches) -> None:
        """A Cache of another instance names a cache id of that instance: refuse it instead of moving bytes of
        whatever cache has the same id here (CPU caches of ``create_cpu_cache`` belong to no instance)."""
        for cache in caches:
            owner = getattr(cache, "_cache_manager", None)
            raise_if_true(owner is not None and owner is not self,
                          "cache {} belongs to another LLMDataDist instance", cache.cache_id)

    def _live_engine(self) -> EngineApi:
        if not self._initialized:
            raise LLMException("cache manager is not initialized (the LLMDataDist was finalized)",
                               status_code=LLMStatusCode.LLM_FAILED)
        return self._engine

    # -- registration ---------------------------------------------------------------------------
    @staticmethod
    def _default_remote_accessible(desc: CacheDesc, remote_accessible: Optional[bool]) -> bool:
        """None: DEVICE caches are remote accessible, HOST caches are not.

        Registration is allowed at any time, also after a rank-table ``link``, and new registrations are
        visible to linked peers at once; this replaces the official "you can not register remote accessible
        cache after link" rule and its False default (see docs/compatibility.md).
        """
        if remote_accessible is not None:
            return remote_accessible
        return desc.placement != Placement.HOST

    @staticmethod
    def _check_addrs(addrs, desc: CacheDesc, check_count: bool) -> None:
        raise_if_false(len(addrs) > 0, "addrs can not be empty")
        if check_count:
            raise_if_false(len(addrs) == desc.num_tensors, "addrs size {} must be equal to num_tensors {}",
                           len(addrs), desc.num_tensors)
        raise_if_true(any(addr == 0 for addr in addrs), "addrs can not contain 0")

    def _addresses(self, addrs, cache_desc: CacheDesc):
        """Int addresses from ``addrs`` (ints, or numpy arrays / torch tensors checked against the desc)."""
        if cache_desc is None:
            check_isinstance("addrs", addrs, list, int, allow_none=False)
            return addrs, None
        return registration_addresses(addrs, cache_desc, self._engine.opts.device_id)

    def _keep_tensors(self, cache_id: int, tensors: Optional[list]) -> None:
        if tensors is not None:
            self._registered_tensors[cache_id] = tensors

    def register_cache(self, cache_desc: CacheDesc, addrs: List[int], cache_keys: Sequence[CacheKey] = (),
                       remote_accessible: Optional[bool] = None) -> Cache:
        """Register user memory as a continuous cache; keys bind batch slots in order.

        Args:
            cache_desc: the geometry of the cache.
            addrs: one address (int) per tensor, or (an addition to the official API) the tensors themselves:
                numpy arrays or torch tensors, checked for contiguity, dtype and byte size against
                ``cache_desc`` and kept alive while registered.
            cache_keys: CacheKeys bound to batch slots 0, 1, ...
            remote_accessible: whether peers may access it one-sidedly (None: DEVICE yes, HOST no).

        Returns:
            The registered Cache (``tensor_addrs`` are ints).

        Raises:
            TypeError: wrong argument types.
            LLMException: LLM_PARAM_INVALID for a bad address list or a tensor that does not match the desc.
        """
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("addrs", addrs, list, allow_none=False)
        check_isinstance("cache_keys", cache_keys, (list, tuple), CacheKey, allow_none=False)
        check_isinstance("remote_accessible", remote_accessible, bool)
        addrs, tensors = self._addresses(addrs, cache_desc)
        ra = self._default_remote_accessible(cache_desc, remote_accessible)
        self._check_addrs(addrs, cache_desc, check_count=True)
        engine = self._live_engine()
        with ErrorBoundary("register_cache"):
            info = engine.register(rq.Register(spec_of(cache_desc, False), tuple(addrs), tuple(_key_ids(cache_keys)),
                                               None, ra, _writable(remote_accessible)))
        self._keep_tensors(info.cache_id, tensors)
        return Cache(info.cache_id, cache_desc, list(addrs), self, True, False)

    def register_blocks_cache(self, cache_desc: CacheDesc, addrs: List[int],
                              blocks_cache_key: Optional[BlocksCacheKey] = None,
                              remote_accessible: Optional[bool] = None) -> Cache:
        """Register user memory as a blocks (PagedAttention) cache, optionally named by a BlocksCacheKey.

        Args:
            cache_desc: the geometry of the cache (dim 0 = number of blocks).
            addrs: one address (int) per tensor, or the tensors themselves (numpy arrays or torch tensors,
                checked and kept alive as in :meth:`register_cache`).
            blocks_cache_key: the key peers address this cache by.
            remote_accessible: whether peers may access it one-sidedly (None: DEVICE yes, HOST no).

        Returns:
            The registered Cache (``tensor_addrs`` are ints).

        Raises:
            TypeError: wrong argument types.
            LLMException: LLM_PARAM_INVALID for a bad address list or a tensor that does not match the desc.
        """
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("addrs", addrs, list, allow_none=False)
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey)
        check_isinstance("remote_accessible", remote_accessible, bool)
        addrs, tensors = self._addresses(addrs, cache_desc)
        ra = self._default_remote_accessible(cache_desc, remote_accessible)
        self._check_addrs(addrs, cache_desc, check_count=False)
        engine = self._live_engine()
        model_id = None if blocks_cache_key is None else blocks_cache_key.model_id
        with ErrorBoundary("register_blocks_cache"):
            info = engine.register(rq.Register(spec_of(cache_desc, True), tuple(addrs), (), model_id, ra,
                                               _writable(remote_accessible)))
        self._keep_tensors(info.cache_id, tensors)
        return Cache(info.cache_id, cache_desc, list(addrs), self, True, True)

    def unregister_cache(self, cache_id: int) -> None:
        """Remove a cache and all of its keys; an unknown id is a no-op."""
        check_isinstance("cache_id", cache_id, int, allow_none=False)
        check_int64("cache_id", cache_id)
        with ErrorBoundary("unregister_cache"):
            self._live_engine().unregister(cache_id)
        self._registered_tensors.pop(cache_id, None)

    # -- pool allocation (deprecated upstream, fully supported here) ------------------------------
    def _check_pool(self, desc: CacheDesc) -> None:
        raise_if_false(desc.num_tensors > 0, "num_tensors must be > 0")
        placement = Placement.DEVICE if desc.placement is None else desc.placement
        raise_if_false((self._device_pool and placement == Placement.DEVICE)
                       or (self._host_pool and placement == Placement.HOST),
                       "you should config memory pool firstly for placement {}", placement)

    def allocate_cache(self, cache_desc: CacheDesc, cache_keys: Sequence[CacheKey] = ()) -> Cache:
        """Allocate a continuous cache from the pool of its placement; key i binds batch slot i."""
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("cache_keys", cache_keys, (list, tuple), CacheKey, allow_none=False)
        self._check_pool(cache_desc)
        engine = self._live_engine()
        with ErrorBoundary("allocate_cache"):
            info = engine.allocate(rq.Allocate(spec_of(cache_desc, False), tuple(_key_ids(cache_keys))))
        return Cache(info.cache_id, cache_desc, list(info.tensor_addrs), self, False, False)

    def allocate_blocks_cache(self, cache_desc: CacheDesc, blocks_cache_key: Optional[BlocksCacheKey] = None) -> Cache:
        """Allocate a blocks cache from the pool of its placement."""
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey)
        self._check_pool(cache_desc)
        engine = self._live_engine()
        model_id = None if blocks_cache_key is None else blocks_cache_key.model_id
        with ErrorBoundary("allocate_blocks_cache"):
            info = engine.allocate(rq.Allocate(spec_of(cache_desc, True), (), model_id))
        return Cache(info.cache_id, cache_desc, list(info.tensor_addrs), self, False, True)

    def deallocate_cache(self, cache: Cache) -> None:
        """Drop the cache-id reference; memory returns to the pool once no key is bound (deferred free)."""
        check_isinstance("cache", cache, Cache)
        raise_if_true(cache.is_blocks_cache, "cache can not be blocks cache")
        self._owned(cache)
        with ErrorBoundary("deallocate_cache"):
            self._live_engine().deallocate(cache.cache_id)
        cache._invalidate()

    def deallocate_blocks_cache(self, cache: Cache) -> None:
        """Free a pool-allocated blocks cache at once (its BlocksCacheKey becomes free)."""
        check_isinstance("cache", cache, Cache)
        raise_if_false(cache.is_blocks_cache, "cache should be blocks cache")
        self._owned(cache)
        with ErrorBoundary("deallocate_blocks_cache"):
            self._live_engine().deallocate(cache.cache_id)
        cache._invalidate()

    def remove_cache_key(self, cache_key: CacheKey) -> None:
        """Unbind a key on this side; an unbound key is a no-op."""
        check_isinstance("cache_key", cache_key, CacheKey)
        key = _key_id(cache_key)
        with ErrorBoundary("remove_cache_key"):
            engine = self._live_engine()
            if key is not None:
                engine.remove_key(key)
            elif not (self._device_pool or self._host_pool):
                engine.remove_key(KeyId("req", UINT64_MAX, cache_key.model_id))

    # -- pulls ----------------------------------------------------------------------------------
    def _layers(self, kwargs: Dict) -> LayerSel:
        tpl = kwargs.get("tensor_num_per_layer", 2)
        check_tensor_num_per_layer(tpl)
        src = layer_range_arg("src_layer_range", kwargs.get("src_layer_range"))
        dst = layer_range_arg("dst_layer_range", kwargs.get("dst_layer_range"))
        return LayerSel(src, dst, tpl)

    def pull_cache(self, cache_key: Union[CacheKey, CacheKeyByIdAndIndex], cache: Cache, batch_index: int = 0,
                   size: int = -1, **kwargs) -> None:
        """Pull a remote slot into slot ``batch_index`` of a local continuous cache (synchronous)."""
        if self._remote_accessible_mode:
            check_isinstance("cache_key", cache_key, CacheKeyByIdAndIndex, allow_none=False)
        else:
            check_isinstance("cache_key", cache_key, (CacheKey, CacheKeyByIdAndIndex), allow_none=False)
        check_isinstance("cache", cache, Cache, allow_none=False)
        check_uint32("batch_index", batch_index)
        check_int64("size", size)
        raise_if_true(cache.is_blocks_cache, "pull_cache does not support blocks cache, use pull_blocks")
        raise_if_false(size == -1 or size > 0, "size must be -1 or > 0, but got {}", size)
        layers = self._layers(kwargs)
        check_cache_key(cache_key)
        source = cache_key_source(cache_key)
        self._owned(cache)
        with ErrorBoundary("pull_cache"):
            self._live_engine().transfer(rq.PullCache(source, cache.cache_id, batch_index, size, layers))

    def pull_blocks(self, src_cache_key, dst_cache: Cache, src_blocks: Sequence[int] = (),
                    dst_blocks: Sequence[int] = (), **kwargs) -> None:
        """Pull remote blocks (BlocksCacheKey) or a remote slot (CacheKey, id+index) into local blocks."""
        check_isinstance("src_cache_key", src_cache_key, (CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey),
                         allow_none=False)
        check_isinstance("dst_cache", dst_cache, Cache, allow_none=False)
        check_isinstance("src_blocks", src_blocks, (list, tuple), int, allow_none=False)
        check_isinstance("dst_blocks", dst_blocks, (list, tuple), int, allow_none=False)
        raise_if_false(dst_cache.is_blocks_cache, "pull_blocks needs a blocks destination cache")
        raise_if_false(len(dst_blocks) > 0, "dst_blocks can not be empty")
        layers = self._layers(kwargs)
        if isinstance(src_cache_key, BlocksCacheKey):
            raise_if_false(len(src_blocks) > 0, "src_blocks can not be empty")
        else:
            check_cache_key(src_cache_key)
            raise_if_false(len(src_blocks) == 0,
                           "src_blocks should be empty when src_cache_key is not instance of BlocksCacheKey")
        source = cache_key_source(src_cache_key)
        self._owned(dst_cache)
        with ErrorBoundary("pull_blocks"):
            self._live_engine().transfer(rq.PullBlocks(source, dst_cache.cache_id, tuple(src_blocks),
                                                       tuple(dst_blocks), layers))

    # -- pushes (remote-cache-accessible mode) ----------------------------------------------------
    def _push_layers(self, src_cache: Cache, src_range, dst_range, tensor_num_per_layer: int) -> LayerSel:
        check_tensor_num_per_layer(tensor_num_per_layer)
        src = layer_range_arg("src_layer_range", src_range)
        dst = layer_range_arg("dst_layer_range", dst_range)
        layers = src_cache.cache_desc.num_tensors // tensor_num_per_layer
        src = src if src is not None else range(0, layers)
        dst = dst if dst is not None else range(0, layers)
        raise_if_false(len(src) == len(dst), "src_layer_range {} and dst_layer_range {} differ in length", src, dst)
        raise_if_false(len(src) > 0, "the cache has no complete layer of {} tensors", tensor_num_per_layer)
        return LayerSel(src, dst, tensor_num_per_layer)

    def push_cache(self, dst_cache_key: CacheKeyByIdAndIndex, src_cache: Cache, src_batch_index: int = 0,
                   src_layer_range: Optional[range] = None, dst_layer_range: Optional[range] = None,
                   size: int = -1, tensor_num_per_layer: int = 2) -> None:
        """Write a local slot into a remote slot (synchronous; remote-cache-accessible mode only)."""
        raise_if_false(self._remote_accessible_mode,
                       "push_cache is only supported while enable_remote_cache_accessible is True")
        check_isinstance("dst_cache_key", dst_cache_key, CacheKeyByIdAndIndex, allow_none=False)
        check_isinstance("src_cache", src_cache, Cache, allow_none=False)
        check_uint32("src_batch_index", src_batch_index)
        raise_if_true(src_cache.is_blocks_cache, "push_cache does not support blocks cache, use push_blocks")
        layers = self._push_layers(src_cache, src_layer_range, dst_layer_range, tensor_num_per_layer)
        check_int64("size", size)
        raise_if_false(size == -1, "push_cache only supports size -1, but got {}", size)
        dest = cache_key_source(dst_cache_key)
        self._owned(src_cache)
        with ErrorBoundary("push_cache"):
            self._live_engine().transfer(rq.PushCache(dest, src_cache.cache_id, src_batch_index, layers))

    def push_blocks(self, dst_cache_key: BlocksCacheKey, src_cache: Cache, src_blocks: Sequence[int] = (),
                    dst_blocks: Sequence[int] = (), src_layer_range: Optional[range] = None,
                    dst_layer_range: Optional[range] = None, tensor_num_per_layer: int = 2) -> None:
        """Write local blocks into a remote blocks cache (synchronous; remote-cache-accessible mode only)."""
        raise_if_false(self._remote_accessible_mode,
                       "push_blocks is only supported while enable_remote_cache_accessible is True")
        check_isinstance("dst_cache_key", dst_cache_key, BlocksCacheKey, allow_none=False)
        check_isinstance("src_cache", src_cache, Cache, allow_none=False)
        check_isinstance("src_blocks", src_blocks, (list, tuple), int, allow_none=False)
        check_isinstance("dst_blocks", dst_blocks, (list, tuple), int, allow_none=False)
        raise_if_false(src_cache.is_blocks_cache, "push_blocks needs a blocks source cache")
        raise_if_false(len(dst_blocks) > 0, "dst_blocks can not be empty")
        layers = self._push_layers(src_cache, src_layer_range, dst_layer_range, tensor_num_per_layer)
        dest = cache_key_source(dst_cache_key)
        self._owned(src_cache)
        with ErrorBoundary("push_blocks"):
            self._live_engine().transfer(rq.PushBlocks(dest, src_cache.cache_id, tuple(src_blocks),
                                                       tuple(dst_blocks), layers))

    # -- local copies -----------------------------------------------------------------------------
    def copy_cache(self, dst: Cache, src: Cache, dst_batch_index: int = 0, src_batch_index: int = 0,
                   offset: int = 0, size: int = -1, req_id: Optional[int] = None) -> None:
        """Copy one slot of ``src`` into one slot of ``dst`` (note: destination first)."""
        check_isinstance("dst", dst, Cache)
        check_isinstance("src", src, Cache)
        check_uint32("dst_batch_index", dst_batch_index)
        check_uint32("src_batch_index", src_batch_index)
        check_uint64("offset", offset)
        check_int64("size", size)
        raise_if_true(dst.is_blocks_cache or src.is_blocks_cache, "copy_cache does not support blocks cache")
        raise_if_false(size == -1 or size > 0, "size must be -1 or > 0, but got {}", size)
        if req_id is not None:
            check_uint64("req_id", req_id)
        raise_if_false(dst.cache_desc.data_type == src.cache_desc.data_type,
                       "copy_cache needs caches of one data type, but got {} and {}",
                       dst.cache_desc.data_type, src.cache_desc.data_type)
        self._owned(dst, src)
        with ErrorBoundary("copy_cache"):
            self._live_engine().copy(rq.CopyCache(dst.cache_id, src.cache_id, dst_batch_index, src_batch_index,
                                                  offset, size))

    def copy_blocks(self, cache: Cache, copy_block_info: Dict[int, List[int]]) -> None:
        """Copy block ``src`` to every block listed for it, in every tensor of one blocks cache."""
        check_isinstance("cache", cache, Cache)
        raise_if_false(cache.is_blocks_cache, "copy_blocks needs a blocks cache")
        check_isinstance("copy_block_info", copy_block_info, dict, allow_none=False)
        for src, dsts in copy_block_info.items():
            check_isinstance("copy_block_info key", src, int, allow_none=False)
            check_isinstance("copy_block_info value", dsts, list, int, allow_none=False)
        pairs = tuple((src, dst) for src, dsts in copy_block_info.items() for dst in dsts)
        self._owned(cache)
        with ErrorBoundary("copy_blocks"):
            self._live_engine().copy(rq.CopyBlocks(cache.cache_id, cache.cache_id, pairs))

    def swap_blocks(self, src_cache: Cache, dst_cache: Cache, src_to_dst: Dict[int, int]) -> None:
        """Copy blocks between a HOST and a DEVICE blocks cache (swap in / swap out)."""
        check_isinstance("src_cache", src_cache, Cache)
        check_isinstance("dst_cache", dst_cache, Cache)
        raise_if_false(src_cache.is_blocks_cache and dst_cache.is_blocks_cache, "swap_blocks needs blocks caches")
        check_isinstance("src_to_dst", src_to_dst, dict, allow_none=False)
        for src, dst in src_to_dst.items():
            check_isinstance("src_to_dst key", src, int, allow_none=False)
            check_isinstance("src_to_dst value", dst, int, allow_none=False)
        src_desc, dst_desc = src_cache.cache_desc, dst_cache.cache_desc
        block_size = src_desc.size // src_desc.batch_size
        raise_if_false(block_size == dst_desc.size // dst_desc.batch_size, "block sizes of the caches differ")
        raise_if_false(src_desc.num_tensors == dst_desc.num_tensors, "num_tensors of the caches differ")
        for src, dst in src_to_dst.items():
            raise_if_false(0 <= src < src_desc.batch_size, "src block {} out of range", src)
            raise_if_false(0 <= dst < dst_desc.batch_size, "dst block {} out of range", dst)
        direction = (src_desc.placement, dst_desc.placement)
        raise_if_false(direction in ((Placement.HOST, Placement.DEVICE), (Placement.DEVICE, Placement.HOST)),
                       "swap_blocks only supports HOST to DEVICE or DEVICE to HOST")
        raise_if_true(len(src_cache.tensor_addrs) != src_desc.num_tensors
                      or len(dst_cache.tensor_addrs) != dst_desc.num_tensors, "a cache was released")
        engine = self._live_engine()
        self._owned(src_cache, dst_cache)
        with ErrorBoundary("swap_blocks"):
            engine.copy(rq.SwapBlocks(src_cache.cache_id, tuple(src_cache.tensor_addrs), dst_cache.cache_id,
                                      tuple(dst_cache.tensor_addrs), block_size,
                                      (src_desc.batch_size, dst_desc.batch_size),
                                      (int(src_desc.placement), int(dst_desc.placement)),
                                      tuple(src_to_dst.items())))

    def remap_registered_memory(self, mem_infos: Union[MemInfo, List[MemInfo]]) -> None:
        """Validate and re-register ranges after a device memory error (re-exposes registered ranges)."""
        infos = [mem_infos] if isinstance(mem_infos, MemInfo) else mem_infos
        raise_if_false(isinstance(infos, list), "mem_infos must be a MemInfo or a list of MemInfo")
        for info in infos:
            raise_if_false(isinstance(info, MemInfo), "mem_infos elements must be MemInfo")
            raise_if_false(info.mem_type == Memtype.MEM_TYPE_DEVICE, "only device memory can be remapped")
            raise_if_false(info.addr is not None and info.addr != 0, "addr can not be 0")
            raise_if_false(info.size is not None and info.size > 0, "size must be > 0")
        with ErrorBoundary("remap_registered_memory"):
            self._live_engine().remap([(info.addr, info.size) for info in infos])

    def transfer_cache_async(self, src_cache: Cache, layer_synchronizer, transfer_configs,
                             src_block_indices=None, dst_block_indices=None, dst_block_memory_size=None):
        """Layer-wise asynchronous push; returns a CacheTask."""
        from llm_datadist.v2.transfer_async import transfer_cache_async

        return transfer_cache_async(self, src_cache, layer_synchronizer, transfer_configs, src_block_indices,
                                    dst_block_indices, dst_block_memory_size)


def _writable(remote_accessible: Optional[bool]) -> Optional[bool]:
    """An explicit remote_accessible=True also accepts peers' writes in normal mode (layer-wise pushes)."""
    return True if remote_accessible is True else None


def _key_id(key: CacheKey) -> Optional[KeyId]:
    if key.prefix_id != UINT64_MAX:
        return KeyId("prefix", key.prefix_id, key.model_id)
    if key.req_id == UINT64_MAX:
        return None  # placeholder: the slot stays unbound and binds nothing
    return KeyId("req", key.req_id, key.model_id)


def _key_ids(keys: Sequence[CacheKey]) -> List[Optional[KeyId]]:
    return [_key_id(key) for key in keys]

