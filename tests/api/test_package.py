"""The package surface of ``llm_datadist``."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

import llm_datadist

OFFICIAL_ALL = [
    "LLMClusterInfo", "LLMStatusCode", "LLMException", "LLMRole", "LlmConfig", "LLMConfig", "DataType", "Status",
    "CacheDesc", "CacheKey", "CacheKeyByIdAndIndex", "KvCache", "Cache", "BlocksCacheKey", "LLMDataDist",
    "Placement", "RegisterMemStatus", "LayerSynchronizer", "TransferConfig", "CacheTask",
    "TransferWithCacheKeyConfig", "Memtype", "MemInfo", "TensorDesc", "Tensor", "KvCacheManager",
]
V1_NAMES = ["TensorDesc", "Tensor", "KvCacheManager"]
V1_INSTALLED = importlib.util.find_spec("llm_datadist_v1") is not None


def _run(code: str, env: dict = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout


def test_llm_config_alias():
    assert llm_datadist.LLMConfig is llm_datadist.LlmConfig


def test_v2_list():
    assert llm_datadist.v2_list == OFFICIAL_ALL[:23]
    assert len(llm_datadist.v2_list) == 23
    assert not set(V1_NAMES) & set(llm_datadist.v2_list)


def test_all_matches_official_order_minus_unavailable_v1_names():
    """__all__ is the official list; the V1 names are listed only when llm_datadist_v1 is installed."""
    expected = OFFICIAL_ALL if V1_INSTALLED else OFFICIAL_ALL[:23]
    assert llm_datadist.__all__ == expected


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="has no attribute"):
        llm_datadist.NonExistentAttr
    assert "module 'llm_datadist' has no attribute 'NonExistentAttr'" in _attr_error_text()


def _attr_error_text() -> str:
    try:
        llm_datadist.NonExistentAttr  # noqa: B018
    except AttributeError as exc:
        return str(exc)
    return ""


@pytest.mark.skipif(V1_INSTALLED, reason="llm_datadist_v1 is installed")
@pytest.mark.parametrize("name", V1_NAMES)
def test_v1_names_raise_import_error(name):
    with pytest.raises(ImportError, match="llm_datadist_v1"):
        getattr(llm_datadist, name)
    with pytest.raises(ModuleNotFoundError):
        getattr(llm_datadist, name)


def test_star_import_works():
    out = _run(
        "from llm_datadist import *\n"
        "print(LLMDataDist.__name__, LLMConfig is LlmConfig, CacheDesc.__name__, MemInfo.__name__)\n"
        "print('TensorDesc' in dir())\n"
    )
    lines = out.split("\n")
    assert lines[0] == "LLMDataDist True CacheDesc MemInfo"
    assert lines[1] == str(V1_INSTALLED)


def test_auto_use_uc_memory_set_when_unset():
    env = {k: v for k, v in os.environ.items() if k != "AUTO_USE_UC_MEMORY"}
    out = _run("import os, llm_datadist; print(os.environ['AUTO_USE_UC_MEMORY'])", env)
    assert out.strip() == "0"


def test_auto_use_uc_memory_left_untouched():
    env = dict(os.environ, AUTO_USE_UC_MEMORY="1")
    out = _run("import os, llm_datadist; print(os.environ['AUTO_USE_UC_MEMORY'])", env)
    assert out.strip() == "1"


def test_import_is_light():
    out = _run("import sys, llm_datadist; print('torch' in sys.modules, 'numpy' in sys.modules)")
    assert out.split()[0] == "False"


def test_import_surface():
    from llm_datadist import (  # noqa: F401
        BlocksCacheKey,
        Cache,
        CacheDesc,
        CacheKey,
        CacheKeyByIdAndIndex,
        DataType,
        LLMClusterInfo,
        LLMConfig,
        LlmConfig,
        LLMDataDist,
        LLMException,
        LLMRole,
        LLMStatusCode,
        Placement,
        RegisterMemStatus,
    )
    from llm_datadist.v2.llm_types import BlocksCacheKey as TypesBlocksCacheKey
    from llm_datadist.v2.llm_types import Cache as TypesCache
    from llm_datadist.v2.llm_types import CacheDesc as TypesCacheDesc
    from llm_datadist.v2.llm_types import MemInfo, Memtype, TransferWithCacheKeyConfig  # noqa: F401
    from llm_datadist.configs import LlmConfig as ConfigsLlmConfig
    from llm_datadist.status import LLMException as StatusLLMException

    assert TypesBlocksCacheKey is BlocksCacheKey and TypesCache is Cache and TypesCacheDesc is CacheDesc
    assert ConfigsLlmConfig is LLMConfig and StatusLLMException is LLMException
    assert {LLMRole.PROMPT, LLMRole.DECODER, LLMRole.MIX}
    assert {Placement.HOST, Placement.DEVICE}
    assert {RegisterMemStatus.OK, RegisterMemStatus.PREPARING, RegisterMemStatus.FAILED}
    assert callable(LLMDataDist)
