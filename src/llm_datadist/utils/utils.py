"""Argument checks used by every public API: type, integer range and semantic checks."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Tuple, Union

from llm_datadist.status import LLMException, LLMStatusCode
from llm_datadist.utils.log import logger

__all__ = [
    "check_isinstance",
    "check_uint8",
    "check_uint16",
    "check_int32",
    "check_uint32",
    "check_int64",
    "check_uint64",
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


def _as_tuple(classes: ClassSpec) -> Tuple[type, ...]:
    if isinstance(classes, type):
        return (classes,)
    return tuple(classes)


def _names(classes: Tuple[type, ...]) -> str:
    return str([cls.__name__ for cls in classes])


def check_isinstance(
    name: str,
    value: Any,
    classes: ClassSpec,
    inner: Optional[ClassSpec] = None,
    allow_none: bool = True,
) -> None:
    """Check the type of an argument (and of its elements).

    ``None`` passes silently when ``allow_none`` is true (the default), as in the official library.
    ``bool`` is an ``int``, so booleans pass integer checks.

    Args:
        name: the argument name used in the message.
        value: the value to check.
        classes: one class or a sequence of accepted classes.
        inner: when given, one class or a sequence of classes every element of ``value`` must be.
        allow_none: whether ``None`` is accepted.

    Raises:
        TypeError: ``"<name> only support [...], but got <type>"`` or
            ``"<name> inner type only support [...], but got <type>"``.
    """
    if value is None and allow_none:
        return
    accepted = _as_tuple(classes)
    if not isinstance(value, accepted):
        raise TypeError(f"{name} only support {_names(accepted)}, but got {type(value).__name__}")
    if inner is None:
        return
    inner_accepted = _as_tuple(inner)
    if inner_accepted == (int,) and set(map(type, value)) <= _PLAIN_INTS:
        return  # fast path for long block lists: one C-level pass instead of a Python loop
    for item in value:
        if not isinstance(item, inner_accepted):
            raise TypeError(
                f"{name} inner type only support {_names(inner_accepted)}, but got {type(item).__name__}"
            )


def _check_int_range(name: str, value: Any, low: int, high: int, kind: str) -> None:
    check_isinstance(name, value, int, allow_none=False)
    if not low <= value <= high:
        raise ValueError(f"{name}'s value is out of range, {value} is not a {kind} value.")


def check_uint8(name: str, value: Any) -> None:
    """Check that ``value`` is an int in [0, 2**8-1]: TypeError if not an int (None included), else ValueError."""
    _check_int_range(name, value, 0, UINT8_MAX, "uint8")


def check_uint16(name: str, value: Any) -> None:
    """Check that ``value`` is an int in [0, 2**16-1]: TypeError if not an int (None included), else ValueError."""
    _check_int_range(name, value, 0, UINT16_MAX, "uint16")


def check_int32(name: str, value: Any) -> None:
    """Check that ``value`` is an int in [-2**31, 2**31-1]: TypeError if not an int, else ValueError."""
    _check_int_range(name, value, INT32_MIN, INT32_MAX, "int32")


def check_uint32(name: str, value: Any) -> None:
    """Check that ``value`` is an int in [0, 2**32-1]: TypeError if not an int (None included), else ValueError."""
    _check_int_range(name, value, 0, UINT32_MAX, "uint32")


def check_int64(name: str, value: Any) -> None:
    """Check that ``value`` is an int in [-2**63, 2**63-1]: TypeError if not an int, else ValueError."""
    _check_int_range(name, value, INT64_MIN, INT64_MAX, "int64")


def check_uint64(name: str, value: Any) -> None:
    """Check that ``value`` is an int in [0, 2**64-1]: TypeError if not an int (None included), else ValueError."""
    _check_int_range(name, value, 0, UINT64_MAX, "uint64")


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
    logger.error(text)
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
