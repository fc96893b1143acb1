"""Tensors or arrays given to register_cache/register_blocks_cache instead of addresses: detection and checks."""
from __future__ import annotations

import logging
import sys
from typing import Any, List, Optional, Tuple

from llm_datadist.data_type import DataType
from llm_datadist.status import LLMException, LLMStatusCode
from llm_datadist.v2.llm_types import CacheDesc, Placement

__all__ = ["registration_addresses", "dtype_of_name"]

_log = logging.getLogger(__name__)

#: numpy ``dtype.name`` and torch ``str(dtype)`` (without "torch.") -> DataType.
_DTYPES_BY_NAME = {
    "float16": DataType.DT_FLOAT16, "half": DataType.DT_FLOAT16, "bfloat16": DataType.DT_BF16,
    "float32": DataType.DT_FLOAT, "float": DataType.DT_FLOAT, "float64": DataType.DT_DOUBLE,
    "double": DataType.DT_DOUBLE, "int8": DataType.DT_INT8, "int16": DataType.DT_INT16,
    "short": DataType.DT_INT16, "int32": DataType.DT_INT32, "int": DataType.DT_INT32,
    "int64": DataType.DT_INT64, "long": DataType.DT_INT64, "uint8": DataType.DT_UINT8,
    "uint16": DataType.DT_UINT16, "uint32": DataType.DT_UINT32, "uint64": DataType.DT_UINT64,
    "bool": DataType.DT_BOOL,
}
_ACCEPTED = "['int', 'numpy.ndarray', 'torch.Tensor']"


def dtype_of_name(name: str) -> Optional[DataType]:
    """The DataType of a numpy dtype name or a torch dtype string (``"torch.float16"``), or None."""
    return _DTYPES_BY_NAME.get(name[len("torch."):] if name.startswith("torch.") else name)


def _invalid(message: str) -> LLMException:
    _log.debug("%s", message)  # raised to the caller
    return LLMException(message, status_code=LLMStatusCode.LLM_PARAM_INVALID)


def _torch_tensor_class() -> Optional[type]:
    """``torch.Tensor`` if torch is already imported (never imports it)."""
    torch = sys.modules.get("torch")
    tensor = getattr(torch, "Tensor", None) if torch is not None else None
    return tensor if isinstance(tensor, type) else None


def _kind(item: Any, numpy_array: Optional[type], torch_tensor: Optional[type]) -> str:
    if isinstance(item, int):
        return "int"
    if numpy_array is not None and isinstance(item, numpy_array):
        return "ndarray"
    if torch_tensor is not None and isinstance(item, torch_tensor):
        return "tensor"
    raise TypeError(f"addrs inner type only support {_ACCEPTED}, but got {type(item).__name__}")


class _View:
    """What the checks need from one numpy array or torch tensor."""

    def __init__(self, item: Any, kind: str) -> None:
        self.item = item
        self.is_numpy = kind == "ndarray"
        if self.is_numpy:
            self.contiguous = bool(item.flags["C_CONTIGUOUS"])
            self.dtype = item.dtype.name
            self.native_order = bool(item.dtype.isnative)
            self.writeable = bool(item.flags["WRITEABLE"])
            self.nbytes = int(item.nbytes)
            self.device = "cpu"
            self.addr = int(item.ctypes.data)
            self.strided = True
        else:
            self.strided = str(item.layout) == "torch.strided"
            self.contiguous = self.strided and bool(item.is_contiguous())
            self.dtype = str(item.dtype)
            self.native_order = True
            self.writeable = True
            self.nbytes = int(item.numel()) * int(item.element_size())
            self.device = str(item.device)
            self.addr = int(item.data_ptr()) if self.strided else 0


def _memory_kind(placement: Placement, device_id: int) -> str:
    """Where caches of ``placement`` live in this process: "host" or "cuda"."""
    from llm_datadist._engine.api import memory_kind

    return memory_kind(int(placement), device_id)


def _check(index: int, view: _View, desc: CacheDesc, nbytes: int, placement: Placement, memory_kind: str) -> None:
    name = f"tensor {index} of addrs"
    if not view.strided:
        raise _invalid(f"{name} is not a strided (dense) tensor: {view.item.layout}")
    if not view.contiguous:
        raise _invalid(f"{name} is not contiguous, so its bytes are not the dense range the CacheDesc describes: "
                       f"register a contiguous tensor (and use that one)")
    expected = desc.data_type
    actual = dtype_of_name(view.dtype)
    numpy_bf16 = expected is DataType.DT_BF16 and view.is_numpy and view.dtype == "uint16"  # numpy has no bf16
    if actual is not expected and not numpy_bf16:
        raise _invalid(f"{name} has dtype {view.dtype}, but the CacheDesc data_type is {expected}")
    if not view.native_order:
        raise _invalid(f"{name} is not in the native byte order")
    if view.nbytes != nbytes:
        raise _invalid(f"{name} has {view.nbytes} bytes, but the CacheDesc describes {nbytes} bytes per tensor "
                       f"(shape {list(desc.shape)}, {expected}); register a tensor of exactly that size")
    if not view.writeable:
        raise _invalid(f"{name} is read-only; transfers write into registered memory")
    on_cuda = view.device.startswith("cuda")
    if on_cuda != (memory_kind == "cuda"):
        where = "CUDA memory" if memory_kind == "cuda" else "host memory here"
        raise _invalid(f"{name} is on {view.device}, but {placement} caches are {where}")


def registration_addresses(addrs: Any, desc: CacheDesc, device_id: int) -> Tuple[List[int], Optional[list]]:
    """The tensor addresses of a registration, from ints or from tensors/arrays (checked against ``desc``).

    Args:
        addrs: a list of ints (addresses, unchanged behaviour) or of numpy arrays / torch tensors.
        desc: the CacheDesc of the registration.
        device_id: the instance's device id (which device ``Placement.DEVICE`` means).

    Returns:
        ``(addresses, tensors)``: the int addresses, and the tensors to keep alive while registered (None for
        ints).

    Raises:
        TypeError: ``addrs`` is not a list, or holds something else than ints, arrays and tensors.
        LLMException: LLM_PARAM_INVALID for a mix of ints and tensors, or a tensor that is not contiguous,
            has another dtype than ``desc.data_type``, another byte size than ``desc.size``, is read-only or
            lives in the wrong kind of memory (the message names the tensor index).
    """
    if not isinstance(addrs, list):
        raise TypeError(f"addrs only support ['list'], but got {type(addrs).__name__}")
    numpy = sys.modules.get("numpy")
    numpy_array = getattr(numpy, "ndarray", None) if numpy is not None else None
    torch_tensor = _torch_tensor_class()
    kinds = [_kind(item, numpy_array, torch_tensor) for item in addrs]
    if all(kind == "int" for kind in kinds):
        return addrs, None
    if "int" in kinds:
        first_int = kinds.index("int")
        first_tensor = next(i for i, kind in enumerate(kinds) if kind != "int")
        raise _invalid(f"addrs mixes addresses and tensors (element {first_int} is an int, element {first_tensor} "
                       f"a {kinds[first_tensor]}): pass either all addresses or all tensors")
    if len(addrs) != desc.num_tensors:
        raise _invalid(f"addrs has {len(addrs)} tensors, but the CacheDesc has num_tensors {desc.num_tensors}")
    nbytes = desc.size
    placement = Placement.DEVICE if desc.placement is None else desc.placement
    memory_kind = _memory_kind(placement, device_id)
    result = []
    for index, (item, kind) in enumerate(zip(addrs, kinds)):
        view = _View(item, kind)
        _check(index, view, desc, nbytes, placement, memory_kind)
        result.append(view.addr)
    return result, list(addrs)
