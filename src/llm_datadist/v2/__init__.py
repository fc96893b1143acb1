"""The v2 (CacheManager mode) API: data types, LLMDataDist and CacheManager."""
