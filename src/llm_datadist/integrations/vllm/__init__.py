"""vLLM KV connector on llm_datadist: kv_connector "LLMDataDistConnector", module "llm_datadist.integrations.vllm".

Importing this package does not import vLLM or torch; ``LLMDataDistConnector`` is resolved on first access
(as vLLM's connector factory does with ``getattr``). Install the extra with ``pip install 'llm-datadist[vllm]'``.
"""
from __future__ import annotations

from typing import Any

from llm_datadist.integrations.vllm.config import ConnectorConfig

__all__ = ["ConnectorConfig", "LLMDataDistConnector"]


def __getattr__(name: str) -> Any:
    if name == "LLMDataDistConnector":
        from llm_datadist.integrations.vllm.connector import LLMDataDistConnector

        return LLMDataDistConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
