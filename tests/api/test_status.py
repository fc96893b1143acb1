"""Status codes, LLMException and Status."""
from __future__ import annotations

from enum import IntEnum

import pytest

from llm_datadist import LLMException, LLMStatusCode, Status
from llm_datadist.status import code_2_status


def test_status_code_values():
    assert LLMStatusCode.LLM_SUCCESS == 0
    assert LLMStatusCode.LLM_FAILED == 0xFFFFFFFF
    assert LLMStatusCode.LLM_PARAM_INVALID == 0x5010B005
    assert LLMStatusCode.LLM_KV_CACHE_NOT_EXIST == 0x5010B002
    assert LLMStatusCode.LLM_NOT_YET_LINK == 0x5010B007
    assert LLMStatusCode.LLM_ALREADY_LINK == 0x5010B008
    assert LLMStatusCode.LLM_EXIST_LINK == 0x5010B018
    assert LLMStatusCode.LLM_FEATURE_NOT_ENABLED == 0x5010B019
    assert LLMStatusCode.LLM_TIMEOUT == 0x5010B01A
    assert LLMStatusCode.LLM_OUT_OF_MEMORY == 0x5010B01C
    assert LLMStatusCode.LLM_UNKNOWN_ERROR == -1


def test_status_code_str():
    assert str(LLMStatusCode.LLM_SUCCESS) == "LLMStatusCode.LLM_SUCCESS"
    assert f"{LLMStatusCode.LLM_TIMEOUT}" == "LLMStatusCode.LLM_TIMEOUT"


def test_legacy_member_spellings():
    assert LLMStatusCode.LLM_SEQ_LENOVERLIMIT == 0x5010B011
    assert LLMStatusCode.LLM_WAIT_PROCESS_TIMEOUT == 0x5010B001


def test_unknown_native_status_is_failed():
    assert code_2_status(0x5010B014) is LLMStatusCode.LLM_FAILED
    assert code_2_status(0x5010B005) is LLMStatusCode.LLM_PARAM_INVALID
    assert code_2_status(-1) is LLMStatusCode.LLM_FAILED


def test_exception_default_status_is_success():
    assert LLMException("x").status_code == LLMStatusCode.LLM_SUCCESS


def test_exception_is_runtime_error():
    assert issubclass(LLMException, RuntimeError)
    with pytest.raises(RuntimeError):
        raise LLMException("boom", status_code=LLMStatusCode.LLM_FAILED)


def test_status_is_ok():
    assert Status(LLMStatusCode.LLM_SUCCESS).is_ok()
    assert Status(0).is_ok()
    status = Status(5)
    assert not status.is_ok()
    assert status.status_code == 5


def test_exception_with_status_code_keyword():
    exc = LLMException("pull failed", status_code=LLMStatusCode.LLM_TIMEOUT)
    assert isinstance(exc, RuntimeError)
    assert exc.status_code is LLMStatusCode.LLM_TIMEOUT
    assert "pull failed" in str(exc)


def test_status_code_members():
    assert issubclass(LLMStatusCode, IntEnum)
    names = [
        "LLM_SUCCESS", "LLM_FAILED", "LLM_PARAM_INVALID", "LLM_WAIT_PROCESS_TIMEOUT", "LLM_TIMEOUT",
        "LLM_NOT_YET_LINK", "LLM_ALREADY_LINK", "LLM_LINK_FAILED", "LLM_REPEAT_REQUEST",
        "LLM_CLUSTER_NUM_EXCEED_LIMIT", "LLM_PROCESSING_LINK", "LLM_DEVICE_OUT_OF_MEMORY", "LLM_LINK_BUSY",
        "LLM_EXIST_LINK", "LLM_KV_CACHE_NOT_EXIST", "LLM_FEATURE_NOT_ENABLED", "LLM_OUT_OF_MEMORY",
    ]
    for name in names:
        member = getattr(LLMStatusCode, name)
        if name not in ("LLM_SUCCESS", "LLM_FAILED"):
            assert 0x5010B000 < member < 0x5010B100, name
    # small comm ids (1, 2, ...) never collide with a status code (MindIE compares them)
    assert not any(1 <= int(code) <= 4096 for code in LLMStatusCode)
