"""The worker's llm_datadist instance: creation, KV registration, cluster ids and links to prefills."""
from __future__ import annotations

import hashlib
import secrets
from typing import Any, Tuple

from llm_datadist import (BlocksCacheKey, Cache, CacheDesc, DataType, LLMClusterInfo, LLMConfig, LLMDataDist,
                          LLMException, LLMRole, LLMStatusCode, Placement, notifications)
from llm_datadist.integrations.vllm.block_layout import KVLayout
from llm_datadist.integrations.vllm.config import ConnectorConfig, connector_logger

__all__ = ["new_cluster_id", "prefill_cluster_id", "parse_endpoint", "start_datadist", "register_layout",
           "placement_of", "link_prefill", "unlink_prefill"]

_log = connector_logger(__name__)


def new_cluster_id() -> int:
    """A random 62-bit cluster id: unique among the decodes and prefills that link to each other."""
    return secrets.randbits(62) | 1


def prefill_cluster_id(host: str, port: int) -> int:
    """The cluster id of the prefill worker listening on a fixed ``host:port``: a decode given only that address
    (a proxy's ``remote_endpoints`` in push mode) knows whom it links to. An even 62-bit number, so it never equals
    a random id of ``new_cluster_id``."""
    digest = hashlib.sha256(f"llm-datadist-vllm|{host}|{port}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 2) & ~1 or 2


def parse_endpoint(entry: Any) -> Tuple[str, int, int]:
    """(host, port, cluster id) of a ``remote_endpoints`` entry: ``[host, port, cluster_id]``, or ``[host, port]``
    for a prefill on a fixed port (its cluster id is implied).

    Raises:
        ValueError: not such an entry.
    """
    if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3):
        raise ValueError(f"a remote_endpoints entry is [host, port] or [host, port, cluster_id], not {entry!r}")
    host, port = str(entry[0]), int(entry[1])
    cluster_id = int(entry[2]) if len(entry) == 3 and entry[2] else prefill_cluster_id(host, port)
    return host, port, cluster_id


def start_datadist(config: ConnectorConfig, producer: bool, cluster_id: int, device_id: int,
                   port: int = 0) -> Tuple[LLMDataDist, int]:
    """An initialized instance in remote-cache-accessible mode; producers listen on ``config.host:port`` (0: the
    listener binds a free port itself, so no other process can take it first). Returns (instance, port or 0).

    Raises:
        LLMException: ``init`` failed (an unavailable transport, a port in use).
    """
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
    if producer:
        options.listen_ip_info = f"{config.host}:{port}"
    datadist = LLMDataDist(LLMRole.PROMPT if producer else LLMRole.DECODER, cluster_id)
    datadist.init(options.generate_options())
    if not producer:
        return datadist, 0
    address = notifications.listen_address(datadist)
    if address is None:  # never: a producer's init listens or fails
        datadist.finalize()
        raise LLMException(f"llm_datadist does not listen on {config.host}:{port}",
                           status_code=LLMStatusCode.LLM_FAILED)
    return datadist, address[1]


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
    """Register every region of every layer as one blocks cache of ``[num_blocks * heads, block_nbytes / heads]``
    bytes: one block of the cache per KV head of a vLLM block (see ``KVLayout.sub_blocks``)."""
    desc = CacheDesc(layout.num_regions, [layout.num_sub_blocks, layout.sub_block_nbytes], DataType.DT_UINT8,
                     placement)
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
