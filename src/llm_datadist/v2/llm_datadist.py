"""LLMDataDist: the instance lifecycle, links and the entry to the CacheManager (placeholder)."""
from __future__ import annotations


class LLMDataDist:  # replaced by the real implementation
    pass
