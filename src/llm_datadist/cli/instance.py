"""LLMDataDist instances for the CLI's worker processes (remote-cache-accessible mode, loopback)."""
from __future__ import annotations

import json
import socket
from typing import Optional, Tuple, Type

LOCALHOST = "127.0.0.1"
INIT_ATTEMPTS = 5  # a free port can be taken by someone else before we bind it


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` (default the loopback address) that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def make_datadist(prompt: bool, cluster_id: int, listen: bool, transport: Optional[str], sync_timeout_ms: int,
                  link_total_s: int, error: Type[Exception], host_pool_bytes: int = 0,
                  host: str = LOCALHOST) -> Tuple[object, int]:
    """An initialized LLMDataDist in remote-cache-accessible mode; returns (instance, listen port or 0).

    A listening instance listens on ``host`` and retries on another port when ``init`` fails (the port
    was taken); an unavailable transport (LLM_FEATURE_NOT_ENABLED) fails at once. Failures raise ``error``.
    """
    from llm_datadist import LLMConfig, LLMDataDist, LLMException, LLMRole

    last: Optional[Exception] = None
    for _ in range(INIT_ATTEMPTS):
        config = LLMConfig()
        config.device_id = 0
        config.enable_cache_manager = True
        config.enable_remote_cache_accessible = True
        config.sync_kv_timeout = sync_timeout_ms
        config.link_total_time = max(1, link_total_s)
        port = free_port(host) if listen else 0
        if listen:
            config.listen_ip_info = f"{host}:{port}"
        if transport:
            config.transfer_backend = transport
        if host_pool_bytes:
            config.host_mem_pool_cfg = json.dumps({"memory_size": host_pool_bytes})
        datadist = LLMDataDist(LLMRole.PROMPT if prompt else LLMRole.DECODER, cluster_id)
        try:
            datadist.init(config.generate_options())
            return datadist, port
        except LLMException as exc:
            last = exc
            if not listen or exc.status_code.name == "LLM_FEATURE_NOT_ENABLED":
                break
    raise error(f"LLMDataDist.init failed: {last}")
