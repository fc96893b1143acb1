"""DataType, element sizes and the legacy numpy maps."""
from __future__ import annotations

import subprocess
import sys
from enum import Enum

import numpy as np
import pytest

from llm_datadist import DataType
from llm_datadist import data_type as data_type_module
from llm_datadist.data_type import dtype_size


def test_data_type_values():
    expected = {
        "DT_FLOAT": 0, "DT_FLOAT16": 1, "DT_INT8": 2, "DT_INT32": 3, "DT_UINT8": 4, "DT_INT16": 6,
        "DT_UINT16": 7, "DT_UINT32": 8, "DT_INT64": 9, "DT_UINT64": 10, "DT_DOUBLE": 11, "DT_BOOL": 12,
        "DT_STRING": 13, "DT_BF16": 27,
    }
    assert {member.name: member.value for member in DataType} == expected


def test_data_type_is_plain_enum():
    assert issubclass(DataType, Enum)
    assert DataType.DT_FLOAT != 0
    assert str(DataType.DT_FLOAT16) == "DataType.DT_FLOAT16"


def test_hashable_enum_with_sizes():
    mapping = {DataType.DT_FLOAT16: "fp16", DataType.DT_BF16: "bf16"}
    assert mapping[DataType.DT_BF16] == "bf16"
    sizes = {
        DataType.DT_FLOAT16: 2, DataType.DT_BF16: 2, DataType.DT_FLOAT: 4, DataType.DT_INT8: 1,
        DataType.DT_INT32: 4, DataType.DT_INT64: 8, DataType.DT_UINT8: 1, DataType.DT_INT16: 2,
        DataType.DT_UINT16: 2, DataType.DT_UINT32: 4, DataType.DT_UINT64: 8, DataType.DT_BOOL: 1,
        DataType.DT_DOUBLE: 8, DataType.DT_STRING: 16,
    }
    for dt, size in sizes.items():
        assert dtype_size(dt) == size, dt


def test_dtype_size_accepts_int_ids_and_rejects_unknown():
    assert dtype_size(27) == 2
    with pytest.raises(ValueError, match="not supported"):
        dtype_size(99)


def test_numpy_maps_are_lazy():
    code = (
        "import sys, llm_datadist.data_type as d\n"
        "assert 'numpy' not in sys.modules\n"
        "m = d.dtype_to_np_dtype\n"
        "assert 'numpy' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numpy_maps_content():
    to_np = data_type_module.dtype_to_np_dtype
    from_np = data_type_module.np_dtype_to_dtype
    assert to_np[DataType.DT_FLOAT] is np.float32
    assert to_np[DataType.DT_BF16] is np.float16  # lossy
    assert to_np[DataType.DT_STRING] is np.bytes_
    assert from_np[np.float16] is DataType.DT_FLOAT16  # no reverse bf16 entry
    assert DataType.DT_BF16 not in from_np.values()
    assert from_np[np.dtype("int64")] is DataType.DT_INT64
    assert from_np[np.zeros(2, dtype=np.uint8).dtype] is DataType.DT_UINT8
    assert np.dtype("S5") in from_np
    assert np.float32 in data_type_module.valid_np_dtypes
    with pytest.raises(ValueError, match="not supported"):
        from_np[np.complex64]


def test_unknown_module_attribute():
    with pytest.raises(AttributeError):
        data_type_module.no_such_map  # noqa: B018
