"""DataType (GE data-type ids), element sizes and the legacy numpy dtype maps (built lazily)."""
from __future__ import annotations

from enum import Enum
from typing import Any, Dict, List

__all__ = ["DataType", "dtype_size"]


class DataType(Enum):
    """Element type of a cache; the values are GE data-type ids (a plain Enum: no int equality)."""

    DT_FLOAT = 0
    DT_FLOAT16 = 1
    DT_BF16 = 27
    DT_INT8 = 2
    DT_INT16 = 6
    DT_UINT16 = 7
    DT_UINT8 = 4
    DT_INT32 = 3
    DT_INT64 = 9
    DT_UINT32 = 8
    DT_UINT64 = 10
    DT_BOOL = 12
    DT_DOUBLE = 11
    DT_STRING = 13


_ELEMENT_SIZES: Dict[DataType, int] = {
    DataType.DT_FLOAT: 4,
    DataType.DT_FLOAT16: 2,
    DataType.DT_BF16: 2,
    DataType.DT_INT8: 1,
    DataType.DT_INT16: 2,
    DataType.DT_UINT16: 2,
    DataType.DT_UINT8: 1,
    DataType.DT_INT32: 4,
    DataType.DT_INT64: 8,
    DataType.DT_UINT32: 4,
    DataType.DT_UINT64: 8,
    DataType.DT_BOOL: 1,
    DataType.DT_DOUBLE: 8,
    DataType.DT_STRING: 16,
}


def dtype_size(dt: Any) -> int:
    """Return the size in bytes of one element of ``dt``.

    Args:
        dt: a :class:`DataType`, or its integer GE id.

    Returns:
        The element size (DT_STRING counts 16 bytes, the size of a string handle).

    Raises:
        ValueError: ``dt`` is not a known data type.
    """
    if not isinstance(dt, DataType):
        try:
            dt = DataType(dt)
        except ValueError:
            raise ValueError(f"The data type {dt} is not supported.") from None
    return _ELEMENT_SIZES[dt]


class _NumpyDtypeMap(dict):
    """A dict keyed by numpy scalar types that also finds ``np.dtype`` objects and dtype strings."""

    @staticmethod
    def _normalize(key: Any) -> Any:
        import numpy as np

        try:
            return np.dtype(key).type
        except TypeError:
            return key

    def __missing__(self, key: Any) -> Any:
        normalized = self._normalize(key)
        if normalized is not key and dict.__contains__(self, normalized):
            return dict.__getitem__(self, normalized)
        raise ValueError(f"The data type {key} is not supported.")

    def __contains__(self, key: Any) -> bool:
        return dict.__contains__(self, key) or dict.__contains__(self, self._normalize(key))

    def get(self, key: Any, default: Any = None) -> Any:
        """Return the DataType for ``key`` (a numpy type, dtype or dtype string), else ``default``."""
        return self[key] if key in self else default


def _build_numpy_maps() -> Dict[str, Any]:
    import numpy as np

    to_np: Dict[DataType, Any] = {
        DataType.DT_FLOAT: np.float32,
        DataType.DT_FLOAT16: np.float16,
        DataType.DT_BF16: np.float16,  # numpy has no bfloat16: lossy, no reverse entry
        DataType.DT_INT8: np.int8,
        DataType.DT_INT16: np.int16,
        DataType.DT_UINT16: np.uint16,
        DataType.DT_UINT8: np.uint8,
        DataType.DT_INT32: np.int32,
        DataType.DT_INT64: np.int64,
        DataType.DT_UINT32: np.uint32,
        DataType.DT_UINT64: np.uint64,
        DataType.DT_BOOL: np.bool_,
        DataType.DT_DOUBLE: np.float64,
        DataType.DT_STRING: np.bytes_,
    }
    from_np = _NumpyDtypeMap((np_type, dt) for dt, np_type in to_np.items() if dt is not DataType.DT_BF16)
    valid: List[Any] = list(from_np.keys())
    return {"dtype_to_np_dtype": to_np, "np_dtype_to_dtype": from_np, "valid_np_dtypes": valid}


_LAZY_NAMES = ("dtype_to_np_dtype", "np_dtype_to_dtype", "valid_np_dtypes")


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        maps = _build_numpy_maps()
        globals().update(maps)
        return maps[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
