"""Helpers shared by the v2 facade: key checks, layer-range arguments and CacheDesc conversion."""
from __future__ import annotations

from typing import Any, Optional, Union

from llm_datadist._engine.api import UINT64_MAX, CacheSpec, SourceSpec
from llm_datadist.data_type import dtype_size
from llm_datadist.utils.utils import check_isinstance, check_uint32, raise_if_false
from llm_datadist.v2.llm_types import BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex, Placement


def _valid_id(value: int) -> bool:
    return 0 <= value < UINT64_MAX


def check_cache_key(cache_key: Any) -> None:
    """A CacheKey used as a source must name exactly one of req_id and prefix_id."""
    if not isinstance(cache_key, CacheKey):
        return
    req_ok, prefix_ok = _valid_id(cache_key.req_id), _valid_id(cache_key.prefix_id)
    raise_if_false(req_ok or prefix_ok, "one of req id and prefix id should contain valid value")
    raise_if_false(not (req_ok and prefix_ok), "only one of req id and prefix id should contain valid value")


def cache_key_source(key: Union[CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey]) -> SourceSpec:
    """The engine's description of what a key names on its cluster."""
    if isinstance(key, BlocksCacheKey):
        return SourceSpec("blocks", key.cluster_id, model_id=key.model_id)
    if isinstance(key, CacheKeyByIdAndIndex):
        return SourceSpec("id", key.cluster_id, cache_id=key.cache_id, batch_index=key.batch_index)
    if _valid_id(key.prefix_id):
        return SourceSpec("prefix", key.cluster_id, ident=key.prefix_id, model_id=key.model_id)
    return SourceSpec("req", key.cluster_id, ident=key.req_id, model_id=key.model_id)


def check_tensor_num_per_layer(value: Any) -> None:
    check_uint32("tensor_num_per_layer", value)
    raise_if_false(value > 0, "tensor_num_per_layer must be > 0, but got {}", value)


def layer_range_arg(name: str, value: Any) -> Optional[range]:
    """Validate an optional layer range: step 1, ``0 <= start < stop`` (empty ranges rejected, in every API)."""
    check_isinstance(name, value, range)
    if value is None:
        return None
    raise_if_false(value.step == 1, "{}'s step must be 1, but got {}", name, value)
    raise_if_false(value.start >= 0, "{}'s start must be >= 0, but got {}", name, value)
    check_uint32(f"{name} start", value.start)
    check_uint32(f"{name} stop", value.stop - 1 if value.stop > 0 else 0)
    raise_if_false(value.start < value.stop, "{} can not be empty, but got {}", name, value)
    return value


def spec_of(desc: CacheDesc, is_blocks: bool) -> CacheSpec:
    """Copy the geometry of a user's CacheDesc (never mutating it)."""
    placement = Placement.DEVICE if desc.placement is None else desc.placement
    shape = tuple(int(dim) for dim in desc.shape)
    return CacheSpec(num_tensors=desc.num_tensors, shape=shape, data_type=desc.data_type.value,
                     elem_size=dtype_size(desc.data_type), placement=int(placement), is_blocks=is_blocks)
