"""Open LLM-DataDist: KV-cache transfer for prefill/decode disaggregated serving, with the official API."""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, List

os.environ.setdefault("AUTO_USE_UC_MEMORY", "0")

from llm_datadist.utils import log as _log_setup  # noqa: E402,F401 - sets up the package loggers once
from llm_datadist.configs import LLMClusterInfo, LlmConfig, LLMConfig, LLMRole  # noqa: E402
from llm_datadist.data_type import DataType  # noqa: E402
from llm_datadist.status import LLMException, LLMStatusCode, Status  # noqa: E402
from llm_datadist.v2.llm_datadist import LLMDataDist  # noqa: E402
from llm_datadist.v2.llm_types import (  # noqa: E402
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    CacheTask,
    KvCache,
    LayerSynchronizer,
    MemInfo,
    Memtype,
    Placement,
    RegisterMemStatus,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

v2_list = [
    "LLMClusterInfo", "LLMStatusCode", "LLMException", "LLMRole", "LlmConfig", "LLMConfig", "DataType", "Status",
    "CacheDesc", "CacheKey", "CacheKeyByIdAndIndex", "KvCache", "Cache", "BlocksCacheKey", "LLMDataDist", "Placement",
    "RegisterMemStatus", "LayerSynchronizer", "TransferConfig", "CacheTask", "TransferWithCacheKeyConfig", "Memtype",
    "MemInfo",
]

# V1-era classes live in the separate ``llm_datadist_v1`` package and are resolved on first access.
_V1_PACKAGE = "llm_datadist_v1"
_V1_NAMES = ("TensorDesc", "Tensor", "KvCacheManager")


def _v1_available() -> bool:
    try:
        return importlib.util.find_spec(_V1_PACKAGE) is not None
    except (ImportError, ValueError):
        return False


# The official list ends with the V1 names; they are listed only when ``llm_datadist_v1`` is installed, so that
# ``from llm_datadist import *`` works everywhere.
__all__: List[str] = v2_list + (list(_V1_NAMES) if _v1_available() else [])


def __getattr__(name: str) -> Any:
    if name in _V1_NAMES:
        try:
            module = importlib.import_module(_V1_PACKAGE)
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"llm_datadist.{name} is a V1 API class provided by the separate '{_V1_PACKAGE}' package, "
                f"which is not installed; use the v2 CacheManager API instead "
                f"(LLMConfig.enable_cache_manager = True).",
                name=_V1_PACKAGE,
            ) from exc
        if not hasattr(module, name):
            raise ImportError(f"cannot import name {name!r} from {_V1_PACKAGE!r}", name=_V1_PACKAGE)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
