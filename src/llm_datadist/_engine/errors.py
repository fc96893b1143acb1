"""Internal error taxonomy of the engine, mapped once to LLMException at the facade boundary."""
from __future__ import annotations

import logging
from typing import Optional

from llm_datadist.status import LLMException, LLMStatusCode, code_2_status

_log = logging.getLogger(__name__)


class EngineError(Exception):
    """Base of every engine failure; ``code`` is the public status it maps to."""

    code: LLMStatusCode = LLMStatusCode.LLM_FAILED

    def __init__(self, message: str = "", code: Optional[int] = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code_2_status(code)


# Parameter errors ------------------------------------------------------------------------------
class ParamInvalid(EngineError):
    code = LLMStatusCode.LLM_PARAM_INVALID


class FeatureNotEnabled(EngineError):
    code = LLMStatusCode.LLM_FEATURE_NOT_ENABLED


# Memory errors ---------------------------------------------------------------------------------
class OutOfMemory(EngineError):
    code = LLMStatusCode.LLM_OUT_OF_MEMORY


class CacheNotExist(EngineError):
    code = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


# Link errors -----------------------------------------------------------------------------------
class NotLinked(EngineError):
    code = LLMStatusCode.LLM_NOT_YET_LINK


class AlreadyLinked(EngineError):
    code = LLMStatusCode.LLM_ALREADY_LINK


class LinkFailed(EngineError):
    code = LLMStatusCode.LLM_LINK_FAILED


class UnlinkFailed(EngineError):
    code = LLMStatusCode.LLM_UNLINK_FAILED


class ExistLink(EngineError):
    code = LLMStatusCode.LLM_EXIST_LINK


class Timeout(EngineError):
    code = LLMStatusCode.LLM_TIMEOUT


class Finalized(EngineError):
    code = LLMStatusCode.LLM_FAILED


_BY_CODE = {cls.code: cls for cls in (ParamInvalid, FeatureNotEnabled, OutOfMemory, CacheNotExist, NotLinked,
                                      AlreadyLinked, LinkFailed, UnlinkFailed, ExistLink, Timeout)}


def error_for_code(code: int, message: str) -> EngineError:
    """Rebuild an engine error from a status code that travelled over the wire."""
    status = code_2_status(code)
    cls = _BY_CODE.get(status, EngineError)
    return cls(message, code=status)


def _transport_code(exc: BaseException) -> LLMStatusCode:
    from llm_datadist._transport import base

    if isinstance(exc, base.StaleMemory):
        return LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    if isinstance(exc, base.RemoteRejected):
        return LLMStatusCode.LLM_PARAM_INVALID
    if isinstance(exc, base.TransferTimeout):
        return LLMStatusCode.LLM_TIMEOUT
    return LLMStatusCode.LLM_LINK_FAILED  # ConnectFailed, TransportClosed, anything else of a transport


def status_of(exc: BaseException) -> LLMStatusCode:
    """The public status of any failure: the one boundary between engine errors and status codes (v1, v2)."""
    from llm_datadist._transport.base import TransportError

    if isinstance(exc, EngineError):
        return exc.code
    if isinstance(exc, TransportError):
        return _transport_code(exc)
    if isinstance(exc, LLMException):
        return code_2_status(exc.status_code)
    if isinstance(exc, (TypeError, ValueError)):
        return LLMStatusCode.LLM_PARAM_INVALID
    return LLMStatusCode.LLM_FAILED


def to_llm_exception(func_name: str, exc: BaseException) -> LLMException:
    """Convert an engine or transport failure to the public exception, with a clear message.

    It is raised, so it is logged at DEBUG only (the caller decides what to log).
    """
    code = status_of(exc)
    message = f"{func_name} failed, error code is {code}, {exc}"
    _log.debug(message)
    return LLMException(message, status_code=code)


class ErrorBoundary:
    """Turn EngineError/TransportError raised inside the block into LLMException (raise ... from).

    A class rather than a generator context manager: it is on every call's path.
    """

    __slots__ = ("_name",)

    def __init__(self, func_name: str) -> None:
        self._name = func_name

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and isinstance(exc, _mapped()):
            raise to_llm_exception(self._name, exc) from exc


_MAPPED: tuple = ()


def _mapped() -> tuple:
    global _MAPPED
    if not _MAPPED:
        from llm_datadist._transport.base import TransportError

        _MAPPED = (EngineError, TransportError)
    return _MAPPED
