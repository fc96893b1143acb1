"""LLMDataDist instances for the CLI's worker processes (remote-cache-accessible mode, loopback)."""
from __future__ import annotations

import json
import socket
from typing import Any, Callable, Optional, Tuple, Type

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
    from llm_datadist import LLMConfig

    def configure(listen_ip_info: str):
        config = LLMConfig()
        config.device_id = 0
        config.enable_cache_manager = True
        config.enable_remote_cache_accessible = True
        config.sync_kv_timeout = sync_timeout_ms
        config.link_total_time = max(1, link_total_s)
        if listen_ip_info:
            config.listen_ip_info = listen_ip_info
        if transport:
            config.transfer_backend = transport
        if host_pool_bytes:
            config.host_mem_pool_cfg = json.dumps({"memory_size": host_pool_bytes})
        return config

    return init_datadist(prompt, cluster_id, listen, host, configure, error)


def init_datadist(prompt: bool, cluster_id: int, listen: bool, host: str, configure: Callable[[str], Any],
                  error: Type[Exception]) -> Tuple[object, int]:
    """``init`` an LLMDataDist with ``configure(listen_ip_info)`` ("" when not listening); (instance, port or 0).

    A listening instance takes a free port on ``host`` and retries on another when ``init`` fails (the port was
    taken meanwhile); an unavailable transport (LLM_FEATURE_NOT_ENABLED) fails at once. Failures raise ``error``.
    """
    from llm_datadist import LLMDataDist, LLMException, LLMRole

    last: Optional[Exception] = None
    for _ in range(INIT_ATTEMPTS):
        port = free_port(host) if listen else 0
        datadist = LLMDataDist(LLMRole.PROMPT if prompt else LLMRole.DECODER, cluster_id)
        try:
            datadist.init(configure(f"{host}:{port}" if listen else "").generate_options())
            return datadist, port
        except LLMException as exc:
            last = exc
            if not listen or exc.status_code.name == "LLM_FEATURE_NOT_ENABLED":
                break
    raise error(f"LLMDataDist.init failed: {last}")
