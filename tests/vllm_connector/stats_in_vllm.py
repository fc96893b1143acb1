"""Run with the Python of .venv-vllm by test_vllm_stats.py: the connector's stats through vLLM's own plumbing.

Two workers' stats are aggregated as vLLM's KVOutputAggregator does, the scheduler's payload goes through vLLM's
msgpack (SchedulerStats), and the frontend's KVConnectorLogging and KVConnectorProm take it. Prints one JSON line.
"""
from __future__ import annotations

import json

from prometheus_client import REGISTRY
from vllm.config import KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorProm
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

BLOCKS_BYTES = 3 * 32768


def main() -> None:
    config = KVTransferConfig(kv_connector="LLMDataDistConnector",
                              kv_connector_module_path="llm_datadist.integrations.vllm", kv_role="kv_both")
    cls = KVConnectorFactory.get_connector_class(config)
    scheduler_side = cls.__new__(cls)
    scheduler_side._worker = None  # the scheduler role has no worker part

    worker0, worker1 = cls.build_kv_connector_stats(), cls.build_kv_connector_stats()
    for _ in range(2):
        worker0.record_transfer("pulled", BLOCKS_BYTES, 0.002)
    worker0.record_failure("pulled", "claim_refused")
    worker1.record_transfer("pulled", BLOCKS_BYTES, 0.002)
    worker1.record_transfer("served", BLOCKS_BYTES, None)
    assert isinstance(worker0, type(worker1))  # vLLM's aggregator asserts this
    step = worker0.aggregate(worker1)

    wire = MsgpackEncoder().encode(SchedulerStats(kv_connector_stats=step.to_dict()))
    payload = MsgpackDecoder(SchedulerStats).decode(wire).kv_connector_stats

    logging_ = KVConnectorLogging(config)
    logging_.observe(payload)
    lines = []
    logging_.log(log_fn=lambda fmt, *args: lines.append(fmt % args))

    prom = KVConnectorProm(VllmConfig(kv_transfer_config=config), ["model_name", "engine"], {0: ["tiny", "0"]})
    prom.observe(payload, 0)

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, {"model_name": "tiny", "engine": "0", **labels})

    print(json.dumps({
        "type": type(step).__name__,
        "scheduler_side": scheduler_side.get_kv_connector_stats(),
        "log": lines[0] if lines else None,
        "bytes_pulled": value("vllm:llm_datadist_kv_bytes_total", direction="pulled"),
        "bytes_served": value("vllm:llm_datadist_kv_bytes_total", direction="served"),
        "seconds_count": value("vllm:llm_datadist_kv_transfer_seconds_count", direction="pulled"),
        "failures": value("vllm:llm_datadist_kv_failures_total", direction="pulled", reason="claim_refused"),
    }))


if __name__ == "__main__":
    main()
