"""Argument checks of every public API (``llm_datadist.utils.utils``): types, integer ranges, semantic checks."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

from llm_datadist.status import LLMException, LLMStatusCode

__all__ = [
    "check_isinstance",
    "check_inner",
    "check_dict",
    "check_uint8",
    "check_uint16",
    "check_int32",
    "check_uint32",
    "check_int64",
    "check_uint64",
    "check_list_int32",
    "check_list_int64",
    "check_list_uint64",
    "check_positive_or_set_default",
    "check_layer_range",
    "raise_if_false",
    "raise_if_true",
    "UINT8_MAX",
    "UINT16_MAX",
    "INT32_MIN",
    "INT32_MAX",
    "UINT32_MAX",
    "INT64_MIN",
    "INT64_MAX",
    "UINT64_MAX",
]

UINT8_MAX = 2**8 - 1
UINT16_MAX = 2**16 - 1
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

ClassSpec = Union[type, Sequence[type]]
_PLAIN_INTS = frozenset((int, bool))
_log = logging.getLogger(__name__)


def _as_tuple(classes: ClassSpec) -> Tuple[type, ...]:
    if isinstance(classes, type):
        return (classes,)
    return tuple(classes)


def _names(classes: Tuple[type, ...]) -> str:
    return str([cls.__name__ for cls in classes])


def _check_items(arg_name: str, arg_value: Any, inner_class: ClassSpec) -> None:
    accepted = _as_tuple(inner_class)
    if accepted == (int,) and set(map(type, arg_value)) <= _PLAIN_INTS:
        return  # fast path for long block lists: one C-level pass instead of a Python loop
    for item in arg_value:
        if not isinstance(item, accepted):
            raise TypeError(f"{arg_name} inner type only support {_names(accepted)}, but got {type(item).__name__}")


def check_inner(arg_name: str, arg_value: Any, inner_class: ClassSpec) -> None:
    """Check that every element of an iterable is an instance of ``inner_class``.

    Args:
        arg_name: the argument name used in the message.
        arg_value: the iterable to check.
        inner_class: one class or a sequence of accepted classes.

    Raises:
        TypeError: ``"<arg_name> inner type only support [...], but got <type>"``.
    """
    _check_items(arg_name, arg_value, inner_class)


def check_dict(arg_name: str, arg_value: dict, k_class: ClassSpec, v_class: ClassSpec,
               v_inner_class: Optional[ClassSpec] = None) -> None:
    """Check the key and value types of a dict (and the element types of its values).

    Args:
        arg_name: the argument name used in the message.
        arg_value: the dict to check.
        k_class: the accepted class(es) of the keys.
        v_class: the accepted class(es) of the values.
        v_inner_class: when given, the accepted class(es) of the elements of every value.

    Raises:
        TypeError: ``"<arg_name> dict key only support [...], but got <type>"``, the same for ``dict value``,
            or ``"<arg_name> dict value inner type only support [...], but got <type>"``.
    """
    keys, values = _as_tuple(k_class), _as_tuple(v_class)
    for key, value in arg_value.items():
        if not isinstance(key, keys):
            raise TypeError(f"{arg_name} dict key only support {_names(keys)}, but got {type(key).__name__}")
        if not isinstance(value, values):
            raise TypeError(f"{arg_name} dict value only support {_names(values)}, but got {type(value).__name__}")
        if v_inner_class is not None:
            _check_items(f"{arg_name} dict value", value, v_inner_class)


def check_isinstance(
    arg_name: str,
    arg_value: Any,
    classes: ClassSpec,
    inner_class: Optional[ClassSpec] = None,
    extra_fmt: str = "",
    allow_none: bool = True,
) -> Any:
    """Check the type of an argument (and of its elements).

    ``None`` passes silently when ``allow_none`` is true (the default), as in the official library.
    ``bool`` is an ``int``, so booleans pass integer checks.

    Args:
        arg_name: the argument name used in the message.
        arg_value: the value to check.
        classes: one class or a sequence of accepted classes.
        inner_class: when given, one class or a sequence of classes every element of ``arg_value`` must be.
        extra_fmt: a prefix of the message (e.g. the mode the check applies in).
        allow_none: whether ``None`` is accepted.

    Returns:
        ``arg_value``, unchanged.

    Raises:
        TypeError: ``"<extra_fmt><arg_name> only support [...], but got <type>"`` or
            ``"<arg_name> inner type only support [...], but got <type>"``.
    """
    if arg_value is None and allow_none:
        return arg_value
    accepted = _as_tuple(classes)
    if not isinstance(arg_value, accepted):
        raise TypeError(f"{extra_fmt}{arg_name} only support {_names(accepted)}, but got {type(arg_value).__name__}")
    if inner_class is not None:
        _check_items(arg_name, arg_value, inner_class)
    return arg_value


def _check_int_range(arg_name: str, arg_value: Any, low: int, high: int, kind: str) -> None:
    check_isinstance(arg_name, arg_value, int, allow_none=False)
    if not low <= arg_value <= high:
        raise ValueError(f"{arg_name}'s value is out of range, {arg_value} is not a {kind} value.")


def check_uint8(arg_name: str, arg_value: Any) -> None:
    """Check that ``value`` is an int in [0, 2**8-1]: TypeError if not an int (None included), else ValueError."""
    _check_int_range(arg_name, arg_value, 0, UINT8_MAX, "uint8")


def check_uint16(arg_name: str, arg_value: Any) -> None:
    """Check that ``value`` is an int in [0, 2**16-1]: TypeError if not an int (None included), else ValueError."""
    _check_int_range(arg_name, arg_value, 0, UINT16_MAX, "uint16")


def check_int32(arg_name: str, arg_value: Any) -> None:
    """Check that ``value`` is an int in [-2**31, 2**31-1]: TypeError if not an int, else ValueError."""
    _check_int_range(arg_name, arg_value, INT32_MIN, INT32_MAX, "int32")


def check_uint32(arg_name: str, arg_value: Any) -> None:
    """Check that ``value`` is an int in [0, 2**32-1]: TypeError if not an int (None included), else ValueError."""
    _check_int_range(arg_name, arg_value, 0, UINT32_MAX, "uint32")


def check_int64(arg_name: str, arg_value: Any) -> None:
    """Check that ``value`` is an int in [-2**63, 2**63-1]: TypeError if not an int, else ValueError."""
    _check_int_range(arg_name, arg_value, INT64_MIN, INT64_MAX, "int64")


def check_uint64(arg_name: str, arg_value: Any) -> None:
    """Check that ``value`` is an int in [0, 2**64-1]: TypeError if not an int (None included), else ValueError."""
    _check_int_range(arg_name, arg_value, 0, UINT64_MAX, "uint64")


def _check_each(checker, arg_name: str, arg_value: Any) -> None:
    for item in arg_value:
        checker(arg_name, item)


def check_list_int32(arg_name: str, arg_value: Any) -> None:
    """Check every element of an iterable with :func:`check_int32` (TypeError / ValueError)."""
    _check_each(check_int32, arg_name, arg_value)


def check_list_int64(arg_name: str, arg_value: Any) -> None:
    """Check every element of an iterable with :func:`check_int64` (TypeError / ValueError)."""
    _check_each(check_int64, arg_name, arg_value)


def check_list_uint64(arg_name: str, arg_value: Any) -> None:
    """Check every element of an iterable with :func:`check_uint64` (TypeError / ValueError)."""
    _check_each(check_uint64, arg_name, arg_value)


def check_positive_or_set_default(arg_name: str, arg_value: Any, default: Any = -1) -> Any:
    """Return ``default`` for ``None``, else check that the value is a non-negative int64 and return it.

    Args:
        arg_name: the argument name used in messages.
        arg_value: the value, or ``None``.
        default: what ``None`` stands for.

    Returns:
        ``arg_value``, or ``default`` when it is ``None``.

    Raises:
        TypeError: not an int.
        ValueError: out of the int64 range, or negative (``"<arg_name>'s value:<v> is invalid, should be >= 0"``).
    """
    if arg_value is None:
        return default
    check_int64(arg_name, arg_value)
    if arg_value < 0:
        raise ValueError(f"{arg_name}'s value:{arg_value} is invalid, should be >= 0")
    return arg_value


def _format(msg: str, args: Iterable[Any]) -> str:
    args = tuple(args)
    return msg.format(*args) if args else msg


def raise_if_false(
    condition: Any, msg: str, *args: Any, status_code: LLMStatusCode = LLMStatusCode.LLM_PARAM_INVALID
) -> None:
    """Raise LLMException when ``condition`` is false, after logging the message at ERROR level.

    Args:
        condition: the condition that must hold.
        msg: the message; formatted with ``msg.format(*args)`` when ``args`` are given.
        *args: optional format arguments, only evaluated on failure.
        status_code: the status carried by the exception (LLM_PARAM_INVALID by default).

    Raises:
        LLMException: when ``condition`` is false.
    """
    if condition:
        return
    text = _format(msg, args)
    _log.debug("%s", text)  # raised to the caller
    raise LLMException(text, status_code=status_code)


def raise_if_true(
    condition: Any, msg: str, *args: Any, status_code: LLMStatusCode = LLMStatusCode.LLM_PARAM_INVALID
) -> None:
    """Raise LLMException when ``condition`` is true, after logging the message at ERROR level.

    Args:
        condition: the condition that must not hold.
        msg: the message; formatted with ``msg.format(*args)`` when ``args`` are given.
        *args: optional format arguments, only evaluated on failure.
        status_code: the status carried by the exception (LLM_PARAM_INVALID by default).

    Raises:
        LLMException: when ``condition`` is true.
    """
    raise_if_false(not condition, msg, *args, status_code=status_code)


def check_layer_range(name: str, value: Any, allow_none: bool = True) -> None:
    """Check a layer range: a ``range`` with step 1 and ``0 <= start < stop``.

    Args:
        name: the argument name used in messages.
        value: the value to check.
        allow_none: whether ``None`` is accepted.

    Raises:
        TypeError: ``value`` is not a range (or is None while ``allow_none`` is false).
        LLMException: LLM_PARAM_INVALID for a step other than 1, a negative start or an empty range.
    """
    check_isinstance(name, value, range, allow_none=allow_none)
    if value is None:
        return
    raise_if_false(value.step == 1, "{}'s step must be 1, but got {}", name, value)
    raise_if_false(0 <= value.start < value.stop, "{} must satisfy 0 <= start < stop, but got {}", name, value)
