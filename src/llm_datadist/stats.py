"""Transfer statistics of llm_datadist instances (an extension of the official API): exact counts as plain data.

Always on, per instance::

    from llm_datadist import stats

    snap = stats.snapshot(datadist)          # an LLMDataDist or a V1 LlmDataDist, initialized
    snap.bytes_total("pull")                 # bytes this instance pulled, over every peer and route
    snap.served_bytes_total("pull")          # bytes its peers pulled from it
    snap.latency("pull").quantile(0.99)      # seconds
    snap.to_dict()                           # JSON-ready

    stats.snapshots()                        # every initialized instance of this process

See docs/observability.md for every field, and ``llm_datadist.metrics`` for Prometheus.
"""
from __future__ import annotations

from typing import Any, List

from llm_datadist._engine.api import (LATENCY_BUCKETS_S, CacheStats, EngineApi, Histogram, LinkStats, ServedStats,
                                      StatsSnapshot, TransferStats, all_stats)

__all__ = ["snapshot", "snapshots", "StatsSnapshot", "TransferStats", "ServedStats", "LinkStats", "CacheStats",
           "Histogram", "LATENCY_BUCKETS_S"]


def _engine_of(instance: Any) -> EngineApi:
    """The engine of an LLMDataDist (v2) or a V1 LlmDataDist; RuntimeError when it is not initialized."""
    engine = getattr(instance, "_engine", None)
    if callable(engine):  # V1 LlmDataDist: _engine() raises when not initialized
        try:
            engine = engine()
        except Exception as exc:  # noqa: BLE001 - any failure means: no engine to read
            raise RuntimeError("the instance is not initialized") from exc
    if engine is None:
        raise RuntimeError("the instance is not initialized (call init first)")
    if not hasattr(engine, "stats_snapshot"):
        raise TypeError(f"not an llm_datadist instance: {type(instance).__name__}")
    return engine


def snapshot(instance: Any) -> StatsSnapshot:
    """Everything ``instance`` (an initialized ``LLMDataDist`` or V1 ``LlmDataDist``) counted since ``init``."""
    return _engine_of(instance).stats_snapshot()


def snapshots() -> List[StatsSnapshot]:
    """A snapshot of every initialized instance of this process, oldest first."""
    return all_stats()
