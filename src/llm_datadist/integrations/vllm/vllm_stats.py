"""The connector's statistics in vLLM's KV connector metrics classes (imports vLLM; the logic is in ``stats``)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from prometheus_client import Counter, Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from llm_datadist.integrations.vllm.stats import ConnectorStats, PromExporter

__all__ = ["LLMDataDistKVConnectorStats", "LLMDataDistPromMetrics"]


class LLMDataDistKVConnectorStats(ConnectorStats, KVConnectorStats):
    """vLLM's ``KVConnectorStats`` with the connector's transfers, bytes, durations and failures by direction
    (``ConnectorStats`` comes first: its methods replace the base's abstract ones)."""

    def __init__(self, data: Optional[Mapping[str, Any]] = None) -> None:
        ConnectorStats.__init__(self, data)


class LLMDataDistPromMetrics(KVConnectorPromMetrics):
    """Registers the connector's metrics (``stats.PromExporter``) in vLLM's Prometheus registry."""

    def __init__(self, vllm_config: Any, metric_types: Dict[Any, Any], labelnames: List[str],
                 per_engine_labelvalues: Dict[int, List[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.exporter = PromExporter(metric_types.get(Counter, Counter), metric_types.get(Histogram, Histogram),
                                     labelnames, per_engine_labelvalues)

    def observe(self, transfer_stats_data: Dict[str, Any], engine_idx: int = 0) -> None:
        self.exporter.observe(transfer_stats_data, engine_idx)
