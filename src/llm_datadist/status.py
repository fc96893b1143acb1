"""Status codes, the LLMException type and the Status value of the official API."""
from __future__ import annotations

from enum import IntEnum

__all__ = ["LLMStatusCode", "LLMException", "Status", "code_2_status", "handle_llm_status"]

_BASE = 0x5010B000


class LLMStatusCode(IntEnum):
    """Status codes with the official numeric values (GE error-number layout 0x5010B000 + n)."""

    LLM_SUCCESS = 0
    LLM_FAILED = 0xFFFFFFFF
    LLM_WAIT_PROCESS_TIMEOUT = _BASE + 1
    LLM_KV_CACHE_NOT_EXIST = _BASE + 2
    LLM_REPEAT_REQUEST = _BASE + 3
    LLM_REQUEST_ALREADY_COMPLETED = _BASE + 4
    LLM_PARAM_INVALID = _BASE + 5
    LLM_ENGINE_FINALIZED = _BASE + 6
    LLM_NOT_YET_LINK = _BASE + 7
    LLM_ALREADY_LINK = _BASE + 8
    LLM_LINK_FAILED = _BASE + 9
    LLM_UNLINK_FAILED = _BASE + 10
    LLM_NOTIFY_PROMPT_UNLINK_FAILED = _BASE + 11
    LLM_CLUSTER_NUM_EXCEED_LIMIT = _BASE + 12
    LLM_PROCESSING_LINK = _BASE + 13
    LLM_DEVICE_OUT_OF_MEMORY = _BASE + 14
    LLM_PREFIX_ALREADY_EXIST = _BASE + 15
    LLM_PREFIX_NOT_EXIST = _BASE + 16
    LLM_SEQ_LENOVERLIMIT = _BASE + 17
    LLM_NO_FREE_BLOCK = _BASE + 18
    LLM_BLOCKS_OUT_OF_MEMORY = _BASE + 19
    LLM_EXIST_LINK = _BASE + 24
    LLM_FEATURE_NOT_ENABLED = _BASE + 25
    LLM_TIMEOUT = _BASE + 26
    LLM_LINK_BUSY = _BASE + 27
    LLM_OUT_OF_MEMORY = _BASE + 28
    LLM_DEVICE_MEM_ERROR = 507053
    LLM_SUSPECT_REMOTE_ERROR = 507057
    LLM_UNKNOWN_ERROR = -1

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


_BY_VALUE = {int(member): member for member in LLMStatusCode if member is not LLMStatusCode.LLM_UNKNOWN_ERROR}


def code_2_status(code: int) -> LLMStatusCode:
    """Map a raw status value to its enum member; anything unknown becomes LLM_FAILED."""
    return _BY_VALUE.get(int(code), LLMStatusCode.LLM_FAILED)


class LLMException(RuntimeError):
    """The exception every library failure raises; ``status_code`` tells what went wrong."""

    def __init__(self, *args: object, status_code: LLMStatusCode = LLMStatusCode.LLM_SUCCESS) -> None:
        super().__init__(*args)
        self._status_code = status_code

    @property
    def status_code(self) -> LLMStatusCode:
        return self._status_code


class Status:
    """A status value as returned by the official API: ``is_ok()`` and ``status_code``."""

    def __init__(self, status_code: int) -> None:
        self._status_code = status_code

    @property
    def status_code(self) -> int:
        return self._status_code

    def is_ok(self) -> bool:
        return self._status_code == LLMStatusCode.LLM_SUCCESS

    def __repr__(self) -> str:
        return f"Status({self._status_code!s})"


def handle_llm_status(ret: int, func_name: str, other_info: str = "") -> None:
    """Raise LLMException for a non-success raw status, as the official wrapper does."""
    if ret == LLMStatusCode.LLM_SUCCESS:
        return
    status = code_2_status(ret)
    raise LLMException(f"{func_name} failed, error code is {status}, {other_info}", status_code=status)
