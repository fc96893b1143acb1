"""Engine options: the frozen result of parsing LLMDataDist.init options, and values derived from them."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Everything the engine reads from the options, parsed once at init."""

    cluster_id: int
    role: int
    cache_manager_mode: bool
    remote_cache_accessible: bool
    local_comm_res: Optional[str]
    device_id: int
    sync_kv_timeout_ms: int
    listen_ip: Optional[str]
    listen_port: Optional[int]
    mem_pool_cfg: str
    host_mem_pool_cfg: str
    transfer_backend: Optional[str]
    link_total_time_s: int
    link_retry_count: int
    link_secret: Optional[bytes]


def link_timeout_s(opts: EngineOptions) -> float:
    """Rank-table link timeout: link_total_time, else HCCL_CONNECT_TIMEOUT, else 120 s."""
    if opts.link_total_time_s > 0:
        return float(opts.link_total_time_s)
    env = os.environ.get("HCCL_CONNECT_TIMEOUT", "")
    return float(env) if env.isdigit() and int(env) > 0 else 120.0
