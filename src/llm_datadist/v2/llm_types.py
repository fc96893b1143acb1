"""Public data classes of the v2 API: placements, cache descriptors, cache keys, caches and transfer configs."""
from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum, IntEnum
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

from llm_datadist.data_type import DataType, dtype_size
from llm_datadist.status import LLMStatusCode
from llm_datadist.utils.utils import (
    INT64_MAX, UINT64_MAX, check_int32, check_int64, check_isinstance, check_layer_range, check_uint32, check_uint64,
    raise_if_false,
)

__all__ = [
    "Placement", "Memtype", "RegisterMemStatus", "CacheDesc", "CacheKey", "CacheKeyByIdAndIndex", "BlocksCacheKey",
    "Cache", "KvCache", "MemInfo", "LayerSynchronizer", "TransferConfig", "TransferWithCacheKeyConfig", "CacheTask",
]


class Placement(IntEnum):
    """Where a cache lives: host memory or device memory."""

    HOST = 0
    DEVICE = 1

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class Memtype(Enum):
    """Kind of memory of a MemInfo (note the numbering is the inverse of Placement)."""

    MEM_TYPE_DEVICE = 0
    MEM_TYPE_HOST = 1


class RegisterMemStatus(Enum):
    """State of the memory exchange of a two-sided link."""

    OK = 0
    PREPARING = 1
    FAILED = 2


# ---- CacheDesc -----------------------------------------------------------------------------------
class CacheDesc:
    """Description of a cache: ``num_tensors`` tensors of one shape and data type."""

    def __init__(self, num_tensors: int, shape: Union[List[int], Tuple[int, ...]], data_type: DataType,
                 placement: Placement = Placement.DEVICE, batch_dim_index: int = 0, seq_len_dim_index: int = -1,
                 kv_tensor_format: Optional[str] = None) -> None:
        check_uint32("num_tensors", num_tensors)
        check_isinstance("shape", shape, [tuple, list], int, allow_none=False)
        check_isinstance("data_type", data_type, DataType, allow_none=False)
        check_isinstance("placement", placement, Placement)
        check_isinstance("batch_dim_index", batch_dim_index, int, allow_none=False)
        check_int32("seq_len_dim_index", seq_len_dim_index)
        check_isinstance("kv_tensor_format", kv_tensor_format, str)
        ndim = len(shape)
        raise_if_false(0 <= batch_dim_index < ndim, "batch_dim_index {} is out of [0, {})", batch_dim_index, ndim)
        raise_if_false(seq_len_dim_index == -1 or 0 <= seq_len_dim_index < ndim,
                       "seq_len_dim_index {} is neither -1 nor in [0, {})", seq_len_dim_index, ndim)
        for dim in shape:
            check_int64("shape element", dim)
        self._num_tensors = num_tensors
        self._shape = shape
        self._data_type = data_type
        self._placement = Placement.DEVICE if placement is None else placement
        self._batch_dim_index = batch_dim_index
        self._batch_size = shape[batch_dim_index]
        self._seq_len_dim_index = seq_len_dim_index
        self._kv_tensor_format = kv_tensor_format
        self._size: Optional[int] = None
        self._is_blocks = False

    @property
    def num_tensors(self) -> int:
        """Number of tensors of the cache."""
        return self._num_tensors

    @property
    def shape(self) -> Union[List[int], Tuple[int, ...]]:
        """Shape of every tensor (the caller's list object)."""
        return self._shape

    @property
    def data_type(self) -> DataType:
        """Element type."""
        return self._data_type

    @property
    def placement(self) -> Placement:
        """Where the cache lives."""
        return self._placement

    @property
    def batch_dim(self) -> int:
        """Index of the batch dimension (transfers always use dim 0 as batch/blocks)."""
        return self._batch_dim_index

    @property
    def batch_size(self) -> int:
        """``shape[batch_dim_index]``, computed at construction."""
        return self._batch_size

    @property
    def seq_len_dim_index(self) -> int:
        """Index of the sequence-length dimension, or -1."""
        return self._seq_len_dim_index

    @property
    def kv_tensor_format(self) -> Optional[str]:
        """Optional tensor format label."""
        return self._kv_tensor_format

    @property
    def size(self) -> int:
        """Bytes of ONE tensor: ``prod(shape) * element size``.

        Raises:
            LLMException: LLM_PARAM_INVALID when a dimension is not positive or the size overflows int64.
        """
        if self._size is None:
            total = dtype_size(self._data_type)
            for dim in self._shape:
                raise_if_false(dim > 0, "shape dim must be > 0, but got shape {}", list(self._shape))
                total *= dim
            raise_if_false(total <= INT64_MAX, "tensor size of shape {} overflows", list(self._shape))
            self._size = total
        return self._size

    def update_dim(self, dim_index: int, dim_value: int) -> None:
        """Change one dimension of the shape in place (``batch_size`` is not recomputed).

        Args:
            dim_index: index of the dimension, in ``[0, len(shape))``.
            dim_value: the new value (int64).

        Raises:
            TypeError: non-int arguments.
            ValueError: ``dim_value`` out of int64 range.
            LLMException: LLM_PARAM_INVALID for an out-of-range ``dim_index``.
        """
        check_isinstance("dim_index", dim_index, int, allow_none=False)
        check_int64("dim_value", dim_value)
        raise_if_false(
            0 <= dim_index < len(self._shape), "dim_index must be in [0, {}), but got {}", len(self._shape), dim_index
        )
        if isinstance(self._shape, list):
            self._shape[dim_index] = dim_value
        else:
            self._shape = self._shape[:dim_index] + (dim_value,) + self._shape[dim_index + 1 :]
        self._size = None

    def __repr__(self) -> str:
        return (
            f"CacheDesc(num_tensors={self._num_tensors}, shape={self._shape}, data_type={self._data_type!s}, "
            f"placement={self._placement!s}, batch_dim_index={self._batch_dim_index}, "
            f"seq_len_dim_index={self._seq_len_dim_index},kv_tensor_format={self._kv_tensor_format})"
        )


# ---- keys ----------------------------------------------------------------------------------------
def _collect_args(cls_name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any], positional: Sequence[str],
                  limit: int) -> Dict[str, Any]:
    """Merge positional and keyword arguments of a key constructor, with the official checks."""
    raise_if_false(len(args) + len(kwargs) <= limit, "{}: Param num is over limit {}", cls_name, limit)
    accepted = set(positional) | {"prompt_cluster_id"}
    for key in kwargs:
        raise_if_false(key in accepted, "{}: Unsupported param:{}", cls_name, key)
    values: Dict[str, Any] = {}
    for name, value in zip(positional, args):
        values[name] = value
    for key, value in kwargs.items():
        if key in values:
            raise TypeError(f"{cls_name} got multiple values for argument '{key}'")
        values[key] = value
    raise_if_false("cluster_id" in values or "prompt_cluster_id" in values,
                   "{}: cluster_id or prompt_cluster_id is required", cls_name)
    return values


class CacheKey:
    """Names one batch slot of a continuous cache: ``(cluster_id, req_id, model_id, prefix_id)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        values = _collect_args("CacheKey", args, kwargs, ("cluster_id", "req_id", "model_id", "prefix_id"), 4)
        raise_if_false("req_id" in values, "CacheKey: req_id is required")
        cluster_id = values.get("cluster_id", values.get("prompt_cluster_id"))
        if "prompt_cluster_id" in values:
            check_uint64("prompt_cluster_id", values["prompt_cluster_id"])
        check_uint64("cluster_id", cluster_id)
        req_id = values["req_id"]
        model_id = values.get("model_id", 0)
        prefix_id = values.get("prefix_id", UINT64_MAX)
        check_uint64("req_id", req_id)
        check_uint64("model_id", model_id)
        check_uint64("prefix_id", prefix_id)
        self._cluster_id: int = cast(int, cluster_id)  # checked just above: never None here
        self._req_id = req_id
        self._model_id = model_id
        self._prefix_id = prefix_id

    @property
    def cluster_id(self) -> int:
        """Cluster that owns the cache."""
        return self._cluster_id

    @property
    def prompt_cluster_id(self) -> int:
        """Alias of :attr:`cluster_id`."""
        return self._cluster_id

    @property
    def req_id(self) -> int:
        """Request id (UINT64_MAX = placeholder / invalid)."""
        return self._req_id

    @property
    def model_id(self) -> int:
        """Model id (default 0)."""
        return self._model_id

    @property
    def prefix_id(self) -> int:
        """Prefix id (default UINT64_MAX = no prefix)."""
        return self._prefix_id

    def __repr__(self) -> str:
        return (
            f"CacheKey(cluster_id={self._cluster_id}, req_id={self._req_id}, "
            f"prefix_id={self._prefix_id}, model_id={self._model_id})"
        )


class CacheKeyByIdAndIndex:
    """Addresses slot ``batch_index`` of cache ``cache_id`` on cluster ``cluster_id``."""

    def __init__(self, cluster_id: int, cache_id: int, batch_index: int = 0) -> None:
        check_uint64("cluster_id", cluster_id)
        check_int64("cache_id", cache_id)
        check_uint32("batch_index", batch_index)
        self._cluster_id = cluster_id
        self._cache_id = cache_id
        self._batch_index = batch_index

    @property
    def cluster_id(self) -> int:
        """Cluster that owns the cache."""
        return self._cluster_id

    @property
    def cache_id(self) -> int:
        """Id of the cache on that cluster."""
        return self._cache_id

    @property
    def batch_index(self) -> int:
        """Batch slot (0 for blocks caches)."""
        return self._batch_index

    def __repr__(self) -> str:
        return (
            f"CacheKeyByIdAndIndex(cluster_id={self._cluster_id}, cache_id={self._cache_id}, "
            f"batch_index={self._batch_index})"
        )


class BlocksCacheKey:
    """Names a whole blocks cache on cluster ``cluster_id`` by ``model_id``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        values = _collect_args("BlocksCacheKey", args, kwargs, ("cluster_id", "model_id"), 2)
        self._key_name = "cluster_id" if "cluster_id" in values else "prompt_cluster_id"
        cluster_id = values[self._key_name]
        model_id = values.get("model_id", 0)
        check_isinstance(f"The first param {self._key_name}", cluster_id, int, allow_none=False)
        check_isinstance("The second param model_id", model_id, int, allow_none=False)
        self._cluster_id = cluster_id
        self._model_id = model_id

    @property
    def cluster_id(self) -> int:
        """Cluster that owns the blocks cache."""
        return self._cluster_id

    @property
    def prompt_cluster_id(self) -> int:
        """Alias of :attr:`cluster_id`."""
        return self._cluster_id

    @property
    def model_id(self) -> int:
        """Model id (default 0)."""
        return self._model_id

    def __repr__(self) -> str:
        return f"BlocksCacheKey({self._key_name}={self._cluster_id}, model_id={self._model_id})"


# ---- caches --------------------------------------------------------------------------------------
class Cache:
    """Handle of a cache created by a CacheManager (users do not construct it)."""

    def __init__(self, cache_id: int, cache_desc: CacheDesc, tensor_addrs: List[int], cache_manager: Any = None,
                 is_registered: bool = False, is_blocks_cache: bool = False) -> None:
        check_int64("cache_id", cache_id)
        self._cache_id = cache_id
        self._cache_desc = cache_desc
        self._tensor_addrs = list(tensor_addrs)
        self._cache_manager = cache_manager
        self._is_registered = is_registered
        self._is_blocks_cache = is_blocks_cache
        self._valid = True

    @property
    def cache_id(self) -> int:
        """Id of the cache in its CacheManager (-1 for ``create_cpu_cache``)."""
        return self._cache_id

    @property
    def cache_desc(self) -> CacheDesc:
        """The CacheDesc the cache was created with."""
        return self._cache_desc

    @property
    def tensor_addrs(self) -> List[int]:
        """One address per tensor; ``[]`` after deallocation."""
        return self._tensor_addrs

    @property
    def is_blocks_cache(self) -> bool:
        """Whether the cache is a blocks (PagedAttention) cache."""
        return self._is_blocks_cache

    def _invalidate(self) -> None:
        """Mark the cache released: no addresses, not valid."""
        self._tensor_addrs = []
        self._valid = False

    @classmethod
    def create_cpu_cache(cls, cache_desc: CacheDesc, addrs: List[int]) -> Cache:
        """Describe host memory as a blocks cache, for ``swap_blocks`` only.

        Args:
            cache_desc: a HOST CacheDesc.
            addrs: one address per tensor (a list of int).

        Returns:
            A Cache with ``cache_id == -1`` and ``is_blocks_cache == True``, not registered.

        Raises:
            TypeError: wrong argument types (a tuple of addresses included).
            AttributeError: ``cache_desc`` is None.
            LLMException: LLM_PARAM_INVALID when the placement is not HOST or the address count is wrong.
        """
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        if cache_desc is None:
            raise AttributeError("cache_desc can not be None")
        check_isinstance("addrs", addrs, list, int, allow_none=False)
        raise_if_false(cache_desc.placement == Placement.HOST, "cpu cache placement must be Placement.HOST")
        raise_if_false(
            len(addrs) == cache_desc.num_tensors,
            "addrs size {} must be equal to num_tensors {}",
            len(addrs),
            cache_desc.num_tensors,
        )
        return cls(-1, cache_desc, addrs, None, False, True)

    def __repr__(self) -> str:
        return (
            f"Cache(cache_id = {self._cache_id}, device_tensor_addrs = {len(self._tensor_addrs)}, "
            f"is_blocks_cache = {self._is_blocks_cache})"
        )


class KvCache:
    """Legacy cache handle of the V1 KvCacheManager: tensor addresses per device."""

    def __init__(self, cache_id: int, cache_desc: CacheDesc, per_device_tensor_addrs: list,
                 kv_cache_manager: Any = None) -> None:
        check_int64("cache_id", cache_id)
        check_isinstance("per_device_tensor_addrs", per_device_tensor_addrs, list, [int, list], allow_none=False)
        if all(isinstance(item, int) for item in per_device_tensor_addrs):
            per_device_tensor_addrs = [per_device_tensor_addrs]
        for device_addrs in per_device_tensor_addrs:
            check_isinstance("per_device_tensor_addrs", device_addrs, list, int, allow_none=False)
        self._cache_id = cache_id
        self._cache_desc = cache_desc
        self._per_device_tensor_addrs = [list(device_addrs) for device_addrs in per_device_tensor_addrs]
        self._kv_cache_manager = kv_cache_manager
        self._valid = True

    @property
    def cache_id(self) -> int:
        """Id of the cache."""
        return self._cache_id

    @property
    def cache_desc(self) -> CacheDesc:
        """The CacheDesc of the cache."""
        return self._cache_desc

    @property
    def per_device_tensor_addrs(self) -> List[List[int]]:
        """Tensor addresses, one list per device."""
        return self._per_device_tensor_addrs

    @classmethod
    def create_cpu_cache(cls, cache_desc: CacheDesc, addrs: list) -> KvCache:
        """Describe host memory as a KvCache with ``cache_id == -1``.

        Args:
            cache_desc: a HOST CacheDesc.
            addrs: a flat list (one device) or a list of lists, ``num_tensors`` addresses per device.

        Returns:
            The KvCache.

        Raises:
            TypeError: wrong argument types.
            LLMException: LLM_PARAM_INVALID for a non-HOST placement or a wrong address count.
        """
        check_isinstance("cache_desc", cache_desc, CacheDesc, allow_none=False)
        raise_if_false(cache_desc.placement == Placement.HOST, "cpu cache placement must be Placement.HOST")
        cache = cls(-1, cache_desc, addrs)
        for device_addrs in cache.per_device_tensor_addrs:
            raise_if_false(len(device_addrs) == cache_desc.num_tensors, "addrs size must be equal to num_tensors")
        return cache

    def _invalidate(self) -> None:
        """Mark the cache released."""
        self._per_device_tensor_addrs = []
        self._valid = False

    def __del__(self) -> None:
        manager = getattr(self, "_kv_cache_manager", None)
        if manager is not None and getattr(self, "_valid", False):
            try:
                manager.deallocate_cache(self)
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass

    def __repr__(self) -> str:
        return f"KvCache(cache_id = {self._cache_id}, per_device_tensor_addrs = {self._per_device_tensor_addrs})"


class MemInfo:
    """A registered memory range, for ``remap_registered_memory``."""

    def __init__(self, mem_type: Memtype, addr: int, size: int) -> None:
        check_isinstance("mem_type", mem_type, Memtype, allow_none=False)
        check_isinstance("addr", addr, int)
        check_isinstance("size", size, int)
        self._mem_type = mem_type
        self._addr = addr
        self._size = size

    @property
    def mem_type(self) -> Memtype:
        """Kind of memory."""
        return self._mem_type

    @property
    def addr(self) -> int:
        """Start address."""
        return self._addr

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self._size

    def __repr__(self) -> str:
        return f"MemInfo(mem_type={self._mem_type!s}, addr={self._addr}, size={self._size})"


# ---- layer-wise transfer -------------------------------------------------------------------------
class LayerSynchronizer(ABC):
    """Tells ``transfer_cache_async`` when each layer of the source cache is ready."""

    @abstractmethod
    def synchronize_layer(self, layer_index: int, timeout_in_millis: Optional[int]) -> bool:
        """Wait until layer ``layer_index`` is computed.

        Args:
            layer_index: the source layer about to be sent.
            timeout_in_millis: always None for now.

        Returns:
            True when the layer is ready, False on failure (the task then stops).
        """


class TransferConfig:
    """One destination of ``transfer_cache_async`` by raw addresses (remote-accessible mode off)."""

    def __init__(self, dst_cluster_id: int, dst_addrs: Union[List[int], Tuple[int, ...]],
                 src_layer_range: Optional[range] = None, src_batch_index: int = 0) -> None:
        self.dst_cluster_id = dst_cluster_id
        self.dst_addrs = dst_addrs
        self.src_layer_range = src_layer_range
        self.src_batch_index = src_batch_index
        self.dst_layer_range = None

    @property
    def dst_cluster_id(self) -> int:
        """Destination cluster id (uint64)."""
        return self._dst_cluster_id

    @dst_cluster_id.setter
    def dst_cluster_id(self, dst_cluster_id: int) -> None:
        check_uint64("dst_cluster_id", dst_cluster_id)
        self._dst_cluster_id = dst_cluster_id

    @property
    def dst_addrs(self) -> Union[List[int], Tuple[int, ...]]:
        """Destination addresses, two per transferred layer."""
        return self._dst_addrs

    @dst_addrs.setter
    def dst_addrs(self, dst_addrs: Union[List[int], Tuple[int, ...]]) -> None:
        check_isinstance("dst_addrs", dst_addrs, [list, tuple], int, allow_none=False)
        for addr in dst_addrs:
            check_uint64("dst_addrs element", addr)
        self._dst_addrs = dst_addrs

    @property
    def src_layer_range(self) -> Optional[range]:
        """Source layers to send (None = all, filled in when the task starts)."""
        return self._src_layer_range

    @src_layer_range.setter
    def src_layer_range(self, src_layer_range: Optional[range]) -> None:
        check_layer_range("src_layer_range", src_layer_range)
        self._src_layer_range = src_layer_range

    @property
    def src_batch_index(self) -> int:
        """Source batch slot (uint32)."""
        return self._src_batch_index

    @src_batch_index.setter
    def src_batch_index(self, src_batch_index: int) -> None:
        check_uint32("src_batch_index", src_batch_index)
        self._src_batch_index = src_batch_index

    def __repr__(self) -> str:
        return (
            f"TransferConfig(dst_cluster_id={self._dst_cluster_id}, dst_addrs={self._dst_addrs}, "
            f"src_layer_range={self._src_layer_range}, src_batch_index={self._src_batch_index})"
        )


class TransferWithCacheKeyConfig:
    """One destination of ``transfer_cache_async`` by cache key (remote-accessible mode on)."""

    def __init__(self, cache_key: Union[BlocksCacheKey, CacheKeyByIdAndIndex], src_layer_range: Optional[range] = None,
                 dst_layer_range: Optional[range] = None, src_batch_index: int = 0) -> None:
        check_isinstance("cache_key", cache_key, [BlocksCacheKey, CacheKeyByIdAndIndex], allow_none=False)
        check_layer_range("src_layer_range", src_layer_range, allow_none=False)
        check_layer_range("dst_layer_range", dst_layer_range, allow_none=False)
        assert src_layer_range is not None and dst_layer_range is not None  # checked just above
        raise_if_false(
            len(src_layer_range) == len(dst_layer_range),
            "src_layer_range {} and dst_layer_range {} must have the same length",
            src_layer_range,
            dst_layer_range,
        )
        self._cache_key: Union[BlocksCacheKey, CacheKeyByIdAndIndex, None] = cache_key
        self._src_layer_range: Optional[range] = src_layer_range
        self._dst_layer_range: Optional[range] = dst_layer_range
        self.src_batch_index = src_batch_index
        self.dst_cluster_id = cache_key.cluster_id

    @property
    def cache_key(self) -> Union[BlocksCacheKey, CacheKeyByIdAndIndex, None]:
        """Destination key on the peer."""
        return self._cache_key

    @cache_key.setter
    def cache_key(self, cache_key: Union[BlocksCacheKey, CacheKeyByIdAndIndex, None]) -> None:
        check_isinstance("cache_key", cache_key, [BlocksCacheKey, CacheKeyByIdAndIndex])
        self._cache_key = cache_key
        if cache_key is not None:
            self.dst_cluster_id = cache_key.cluster_id

    @property
    def src_layer_range(self) -> Optional[range]:
        """Source layers to send."""
        return self._src_layer_range

    @src_layer_range.setter
    def src_layer_range(self, src_layer_range: Optional[range]) -> None:
        check_layer_range("src_layer_range", src_layer_range)
        self._src_layer_range = src_layer_range

    @property
    def dst_layer_range(self) -> Optional[range]:
        """Destination layers, mapped one to one onto the source layers."""
        return self._dst_layer_range

    @dst_layer_range.setter
    def dst_layer_range(self, dst_layer_range: Optional[range]) -> None:
        check_layer_range("dst_layer_range", dst_layer_range)
        self._dst_layer_range = dst_layer_range

    @property
    def src_batch_index(self) -> int:
        """Source batch slot (uint32; 0 for a BlocksCacheKey destination)."""
        return self._src_batch_index

    @src_batch_index.setter
    def src_batch_index(self, src_batch_index: int) -> None:
        check_uint32("src_batch_index", src_batch_index)
        raise_if_false(
            not isinstance(self._cache_key, BlocksCacheKey) or src_batch_index == 0,
            "src_batch_index must be 0 when cache_key is a BlocksCacheKey, but got {}",
            src_batch_index,
        )
        self._src_batch_index = src_batch_index

    def __repr__(self) -> str:
        return (
            f"TransferWithCacheKeyConfig(cache_key={self._cache_key}, src_layer_range={self._src_layer_range}, "
            f"dst_layer_range={self._dst_layer_range}, src_batch_index={self._src_batch_index})"
        )


class CacheTask:
    """Handle of a running ``transfer_cache_async``.

    ``waiter`` is provided by the engine: ``join(timeout_s: Optional[float]) -> bool`` (True once finished)
    and ``results() -> List[LLMStatusCode]`` (one status per transfer config, in order).
    """

    def __init__(self, waiter: Any, num_configs: int) -> None:
        self._waiter = waiter
        self._num_configs = num_configs

    def _wait(self, timeout_in_millis: Optional[int]) -> bool:
        if timeout_in_millis is None:
            return bool(self._waiter.join(None))
        check_uint32("timeout_in_millis", timeout_in_millis)
        return bool(self._waiter.join(timeout_in_millis / 1000.0))

    def _results(self) -> List[LLMStatusCode]:
        raw = list(self._waiter.results())[: self._num_configs]
        raw += [None] * (self._num_configs - len(raw))
        return [LLMStatusCode.LLM_FAILED if code is None else code for code in raw]

    def synchronize(self, timeout_in_millis: Optional[int] = None) -> LLMStatusCode:
        """Wait for the task.

        Args:
            timeout_in_millis: uint32 milliseconds, or None to wait until every layer is processed.

        Returns:
            LLM_TIMEOUT if still running after the timeout, else the first failed config's status,
            else LLM_SUCCESS.

        Raises:
            TypeError: non-int timeout.
            ValueError: timeout out of uint32 range.
        """
        if not self._wait(timeout_in_millis):
            return LLMStatusCode.LLM_TIMEOUT
        for code in self._results():
            if code != LLMStatusCode.LLM_SUCCESS:
                return code
        return LLMStatusCode.LLM_SUCCESS

    def get_results(self, timeout_in_millis: Optional[int] = None) -> List[LLMStatusCode]:
        """Wait for the task and return one status per transfer config.

        Args:
            timeout_in_millis: uint32 milliseconds, or None to wait until every layer is processed.

        Returns:
            ``[LLM_TIMEOUT] * n`` if still running after the timeout, else one status per config, in order
            (a config that never ran reports LLM_FAILED).

        Raises:
            TypeError: non-int timeout.
            ValueError: timeout out of uint32 range.
        """
        if not self._wait(timeout_in_millis):
            return [LLMStatusCode.LLM_TIMEOUT] * self._num_configs
        return self._results()
