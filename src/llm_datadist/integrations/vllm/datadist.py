"""The worker's llm_datadist instance: creation (with port retry), KV registration and links to prefills."""
from __future__ import annotations

import secrets
import socket
from typing import Optional, Tuple

from llm_datadist import (BlocksCacheKey, Cache, CacheDesc, DataType, LLMClusterInfo, LLMConfig, LLMDataDist,
                          LLMException, LLMRole, LLMStatusCode, Placement)
from llm_datadist.integrations.vllm.block_layout import KVLayout
from llm_datadist.integrations.vllm.config import ConnectorConfig, connector_logger

__all__ = ["new_cluster_id", "start_datadist", "register_layout", "placement_of", "link_prefill", "unlink_prefill"]

_log = connector_logger(__name__)
_INIT_ATTEMPTS = 5  # a port found free may be taken before llm_datadist binds it


def new_cluster_id() -> int:
    """A random 62-bit cluster id: unique among the decodes and prefills that link to each other."""
    return secrets.randbits(62) | 1


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_datadist(config: ConnectorConfig, producer: bool, cluster_id: int,
                   device_id: int) -> Tuple[LLMDataDist, int]:
    """An initialized instance in remote-cache-accessible mode; producers listen. Returns (instance, port or 0).

    Raises:
        LLMException: ``init`` failed (an unavailable transport fails at once, a taken port is retried).
    """
    last: Optional[LLMException] = None
    for _ in range(_INIT_ATTEMPTS if producer and not config.datadist_port else 1):
        options = LLMConfig()
        options.device_id = device_id
        options.enable_cache_manager = True
        options.enable_remote_cache_accessible = True
        options.sync_kv_timeout = config.transfer_timeout_ms
        options.link_total_time = max(1, config.link_timeout_ms // 1000)
        if config.link_secret:
            options.link_secret = config.link_secret
        if config.transport:
            options.transfer_backend = config.transport
        port = 0
        if producer:
            port = config.datadist_port or _free_port(config.host)
            options.listen_ip_info = f"{config.host}:{port}"
        datadist = LLMDataDist(LLMRole.PROMPT if producer else LLMRole.DECODER, cluster_id)
        try:
            datadist.init(options.generate_options())
            return datadist, port
        except LLMException as exc:
            last = exc
            if exc.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED:
                break
    assert last is not None
    raise last


def placement_of(config: ConnectorConfig, device_type: str) -> Placement:
    """The llm_datadist placement of KV tensors on ``device_type`` ("cpu", "cuda", ...)."""
    if config.placement == "host":
        return Placement.HOST
    if config.placement == "device" or device_type != "cpu":
        return Placement.DEVICE
    return Placement.HOST if _cuda_present() else Placement.DEVICE  # without CUDA, DEVICE is host memory


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def register_layout(datadist: LLMDataDist, layout: KVLayout, placement: Placement, cluster_id: int,
                    model_id: int) -> Cache:
    """Register every region of every layer as one blocks cache of ``[num_blocks, block_nbytes]`` bytes."""
    desc = CacheDesc(layout.num_regions, [layout.num_blocks, layout.block_nbytes], DataType.DT_UINT8, placement)
    return datadist.cache_manager.register_blocks_cache(desc, list(layout.region_addrs),
                                                        BlocksCacheKey(cluster_id, model_id), True)


def _cluster(remote_cluster_id: int, host: str, port: int) -> LLMClusterInfo:
    info = LLMClusterInfo()
    info.remote_cluster_id = remote_cluster_id
    info.append_remote_ip_info(host, port)
    return info


def link_prefill(datadist: LLMDataDist, remote_cluster_id: int, host: str, port: int, timeout_ms: int) -> None:
    """Link to a prefill's llm_datadist listener (an existing link is kept).

    Raises:
        ConnectionError: the link failed.
    """
    _, codes = datadist.link_clusters([_cluster(remote_cluster_id, host, port)], timeout_ms)
    code = codes[0] if codes else LLMStatusCode.LLM_FAILED
    if code not in (LLMStatusCode.LLM_SUCCESS, LLMStatusCode.LLM_ALREADY_LINK):
        raise ConnectionError(f"link_clusters to prefill cluster {remote_cluster_id} at {host}:{port} failed: "
                              f"{LLMStatusCode(code).name}")


def unlink_prefill(datadist: LLMDataDist, remote_cluster_id: int, host: str, port: int, timeout_ms: int) -> None:
    """Drop a link (forced: the peer may be gone); never raises."""
    try:
        datadist.unlink_clusters([_cluster(remote_cluster_id, host, port)], timeout_ms, force=True)
    except (LLMException, TypeError, ValueError) as exc:
        _log.debug("unlink of cluster %s failed: %s", remote_cluster_id, exc)
