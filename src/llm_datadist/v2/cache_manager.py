"""CacheManager: registration, allocation, pulls, pushes and local copies (placeholder)."""
from __future__ import annotations


class CacheManager:  # replaced by the real implementation
    pass
