"""Validation conventions: the argument checks of ``llm_datadist.utils.utils``."""
from __future__ import annotations

import logging

import pytest

from llm_datadist import LLMException, LLMStatusCode
from llm_datadist.utils import utils
from llm_datadist.utils.utils import (
    check_dict,
    check_inner,
    check_int32,
    check_int64,
    check_isinstance,
    check_layer_range,
    check_list_int32,
    check_list_int64,
    check_list_uint64,
    check_positive_or_set_default,
    check_uint8,
    check_uint16,
    check_uint32,
    check_uint64,
    raise_if_false,
    raise_if_true,
)

#: The public helpers of the official ``llm_datadist.utils.utils`` module, with their parameter names.
OFFICIAL_HELPERS = {
    "check_inner": ["arg_name", "arg_value", "inner_class"],
    "check_dict": ["arg_name", "arg_value", "k_class", "v_class", "v_inner_class"],
    "check_isinstance": ["arg_name", "arg_value", "classes", "inner_class", "extra_fmt", "allow_none"],
    "check_uint64": ["arg_name", "arg_value"],
    "check_int64": ["arg_name", "arg_value"],
    "check_positive_or_set_default": ["arg_name", "arg_value", "default"],
    "check_int32": ["arg_name", "arg_value"],
    "check_uint32": ["arg_name", "arg_value"],
    "check_list_int32": ["arg_name", "arg_value"],
    "check_list_int64": ["arg_name", "arg_value"],
    "check_list_uint64": ["arg_name", "arg_value"],
    "check_uint16": ["arg_name", "arg_value"],
    "check_uint8": ["arg_name", "arg_value"],
}


def test_check_isinstance_none_and_messages():
    check_isinstance("x", None, int)  # None passes by default
    with pytest.raises(TypeError, match=r"x only support \['int'\], but got NoneType"):
        check_isinstance("x", None, int, allow_none=False)
    with pytest.raises(TypeError, match=r"shape only support \['tuple', 'list'\], but got str"):
        check_isinstance("shape", "ab", [tuple, list], int)
    with pytest.raises(TypeError, match=r"shape inner type only support \['int'\], but got float"):
        check_isinstance("shape", [1, 2.0], (tuple, list), int)
    check_isinstance("flag", True, int)  # bool is an int
    check_isinstance("shape", [1, 2], [list], [int])


@pytest.mark.parametrize(
    "checker, low, high, kind",
    [
        (check_uint8, 0, 2**8 - 1, "uint8"),
        (check_uint16, 0, 2**16 - 1, "uint16"),
        (check_int32, -(2**31), 2**31 - 1, "int32"),
        (check_uint32, 0, 2**32 - 1, "uint32"),
        (check_int64, -(2**63), 2**63 - 1, "int64"),
        (check_uint64, 0, 2**64 - 1, "uint64"),
    ],
)
def test_range_checks(checker, low, high, kind):
    checker("v", low)
    checker("v", high)
    with pytest.raises(ValueError, match=f"v's value is out of range, {high + 1} is not a {kind} value."):
        checker("v", high + 1)
    with pytest.raises(ValueError):
        checker("v", low - 1)
    for bad in (None, 1.0, "1"):
        with pytest.raises(TypeError):
            checker("v", bad)


def test_every_official_helper_with_its_signature():
    import inspect

    for name, params in OFFICIAL_HELPERS.items():
        assert name in utils.__all__, name
        assert list(inspect.signature(getattr(utils, name)).parameters) == params, name
    sig = inspect.signature(check_isinstance).parameters
    assert (sig["inner_class"].default, sig["extra_fmt"].default, sig["allow_none"].default) == (None, "", True)
    assert inspect.signature(check_dict).parameters["v_inner_class"].default is None
    assert inspect.signature(check_positive_or_set_default).parameters["default"].default == -1


def test_check_isinstance_returns_the_value_and_prefixes_extra_fmt():
    value = [1, 2]
    assert check_isinstance("v", value, list, int) is value
    assert check_isinstance("v", None, int) is None
    with pytest.raises(TypeError, match=r"^In mode X, v only support \['list'\], but got tuple$"):
        check_isinstance("v", (1,), list, None, "In mode X, ")
    with pytest.raises(TypeError, match=r"v inner type only support \['int'\], but got str"):
        check_isinstance("v", [1, "2"], [list], int, "ignored for elements: ")


def test_check_inner():
    check_inner("blocks", [1, 2, True], int)
    check_inner("blocks", (), int)
    check_inner("mixed", [1, "a"], [int, str])
    with pytest.raises(TypeError, match=r"blocks inner type only support \['int'\], but got float"):
        check_inner("blocks", [1, 2.0], int)
    with pytest.raises(TypeError, match=r"names inner type only support \['str'\], but got int"):
        check_inner("names", ("a", 1), str)


def test_check_dict():
    check_dict("opts", {}, str, str)
    check_dict("opts", {"a": "b"}, str, str)
    check_dict("blocks", {0: [1, 2], 1: []}, int, list, int)
    check_dict("either", {1: "x", "k": 2}, [int, str], [int, str])
    with pytest.raises(TypeError, match=r"opts dict key only support \['str'\], but got int"):
        check_dict("opts", {1: "b"}, str, str)
    with pytest.raises(TypeError, match=r"opts dict value only support \['str'\], but got int"):
        check_dict("opts", {"a": 1}, str, str)
    with pytest.raises(TypeError, match=r"blocks dict value inner type only support \['int'\], but got str"):
        check_dict("blocks", {0: [1, "2"]}, int, list, int)
    with pytest.raises(TypeError, match=r"blocks dict value only support \['list'\], but got int"):
        check_dict("blocks", {0: 1}, int, list, int)


@pytest.mark.parametrize(
    "checker, low, high",
    [(check_list_int32, -(2**31), 2**31 - 1), (check_list_int64, -(2**63), 2**63 - 1),
     (check_list_uint64, 0, 2**64 - 1)],
)
def test_list_range_checks(checker, low, high):
    checker("ids", [])
    checker("ids", [low, 0, high])
    checker("ids", (low, high))
    with pytest.raises(ValueError, match=f"ids's value is out of range, {high + 1} is not a"):
        checker("ids", [0, high + 1])
    with pytest.raises(ValueError, match=f"{low - 1} is not a"):
        checker("ids", [low - 1])
    with pytest.raises(TypeError, match=r"ids only support \['int'\], but got str"):
        checker("ids", [0, "1"])
    with pytest.raises(TypeError):
        checker("ids", [None])


def test_check_positive_or_set_default():
    assert check_positive_or_set_default("size", None) == -1
    assert check_positive_or_set_default("size", None, 7) == 7
    assert check_positive_or_set_default("size", 0) == 0
    assert check_positive_or_set_default("size", 2**63 - 1) == 2**63 - 1
    with pytest.raises(ValueError, match=r"^size's value:-1 is invalid, should be >= 0$"):
        check_positive_or_set_default("size", -1)
    with pytest.raises(ValueError, match="is not a int64 value"):
        check_positive_or_set_default("size", 2**63)
    with pytest.raises(TypeError):
        check_positive_or_set_default("size", 1.0)


def test_raise_if_false_and_true(caplog):
    raise_if_false(True, "never")
    raise_if_true(False, "never")
    with caplog.at_level(logging.DEBUG, logger="llm_datadist"):
        with pytest.raises(LLMException, match="bad value 3") as info:
            raise_if_false(False, "bad value {}", 3)
    assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.DEBUG, "bad value 3")]  # raised only
    with pytest.raises(LLMException) as info:
        raise_if_true(True, "busy", status_code=LLMStatusCode.LLM_LINK_BUSY)
    assert info.value.status_code == LLMStatusCode.LLM_LINK_BUSY
    with pytest.raises(LLMException, match=r"\{literal\}"):
        raise_if_false(False, "{literal}")


def test_check_layer_range():
    check_layer_range("r", None)
    check_layer_range("r", range(0, 2))
    with pytest.raises(TypeError):
        check_layer_range("r", None, allow_none=False)
    with pytest.raises(TypeError):
        check_layer_range("r", (0, 1))
    for bad in (range(0, 4, 2), range(1, 1), range(2, 1), range(-1, 2)):
        with pytest.raises(LLMException):
            check_layer_range("r", bad)
