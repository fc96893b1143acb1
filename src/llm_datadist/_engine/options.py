"""Engine options: the options dict of LLMDataDist.init, checked in the official order, into a frozen EngineOptions."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, Optional

from llm_datadist._transport.tls import TlsFiles
from llm_datadist.status import LLMException, LLMStatusCode
from llm_datadist.utils.addresses import parse_ip, parse_ip_port, parse_port, rank_table_addresses

OPT_DEVICE_ID = "ge.exec.deviceId"
OPT_SYNC_TIMEOUT = "llm.SyncKvCacheWaitTime"
OPT_ENABLE_CACHE_MANAGER = "llm.EnableCacheManager"
OPT_REMOTE_CACHE_ACCESSIBLE = "llm.EnableRemoteCacheAccessible"
OPT_LISTEN_IP_INFO = "llm.listenIpInfo"
OPT_LISTEN_IP = "llm.ListenIp"
OPT_LISTEN_PORT = "llm.ListenPort"
OPT_LOCAL_COMM_RES = "llm.LocalCommRes"
OPT_TRANSFER_BACKEND = "llm.TransferBackend"
OPT_MEM_POOL = "llm.MemPoolConfig"
OPT_HOST_MEM_POOL = "llm.HostMemPoolConfig"
OPT_LINK_TOTAL_TIME = "llm.LinkTotalTime"
OPT_LINK_RETRY_COUNT = "llm.LinkRetryCount"
OPT_LINK_SECRET = "llm.LinkSecret"
OPT_TLS_CERT = "llm.TlsCertFile"
OPT_TLS_KEY = "llm.TlsKeyFile"
OPT_TLS_CA = "llm.TlsCaFile"
ENV_TLS = {OPT_TLS_CERT: "LLM_DATADIST_TLS_CERT", OPT_TLS_KEY: "LLM_DATADIST_TLS_KEY",
           OPT_TLS_CA: "LLM_DATADIST_TLS_CA"}
OPT_ROLE = "llm.Role"
OPT_FLOW_GRAPH_MEM = "ge.flowGraphMemMaxSize"
ENV_LINK_SECRET = "LLM_DATADIST_LINK_SECRET"
ENV_TRANSPORT = "LLM_DATADIST_TRANSPORT"
DEFAULT_SYNC_TIMEOUT_MS = 1000
ROLE_NAMES = {1: "Prompt", 2: "Decoder", 3: "Mix"}
_log = logging.getLogger(__name__)
#: What to do when the CacheManager mode is off, in the words a user writes.
ENABLE_CACHE_MANAGER_HINT = ('set LLMConfig.enable_cache_manager = True (option llm.EnableCacheManager = "1") '
                             'before init')


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
    tls: Optional[TlsFiles] = None


def _invalid(message: str, code: LLMStatusCode = LLMStatusCode.LLM_PARAM_INVALID) -> LLMException:
    _log.debug("%s", message)  # raised to the caller
    return LLMException(message, status_code=code)


def parse_listen_ip_info(value: str, option: str = OPT_LISTEN_IP_INFO):
    """Split and check "ip:port" (IPv4, port 0..65535); LLMException(LLM_PARAM_INVALID) naming the option."""
    return parse_ip_port(option, value)


def check_flow_graph_mem(options: Dict[str, str]) -> None:
    if OPT_FLOW_GRAPH_MEM not in options:
        return
    value = options[OPT_FLOW_GRAPH_MEM]
    if not isinstance(value, str):
        raise TypeError(f"{OPT_FLOW_GRAPH_MEM} only support str, but got {type(value).__name__}")
    if "," in value:
        raise _invalid(f"{OPT_FLOW_GRAPH_MEM} only supports one memory pool, but got {value!r}")
    if not value.isdigit():
        raise _invalid(f"{OPT_FLOW_GRAPH_MEM} must be digit, but got {value!r}")


def complete_options(options: Dict[str, str], role: int) -> Dict[str, str]:
    """The copy of the caller's options that ``init`` works on, with the implied defaults added."""
    opts = dict(options)
    opts[OPT_ROLE] = ROLE_NAMES.get(int(role) if role is not None else 0, "Prompt")
    if OPT_LOCAL_COMM_RES in opts:
        opts.setdefault(OPT_ENABLE_CACHE_MANAGER, "1")
        opts.setdefault(OPT_REMOTE_CACHE_ACCESSIBLE, "1")
    cm_mode = opts.get(OPT_ENABLE_CACHE_MANAGER) == "1"
    if OPT_LOCAL_COMM_RES in opts and not cm_mode:
        raise _invalid("llm.LocalCommRes is not supported when llm.EnableCacheManager is not configured: "
                       f"{ENABLE_CACHE_MANAGER_HINT}, or leave it unset.")
    if OPT_TRANSFER_BACKEND in opts:
        if not cm_mode:
            raise _invalid(f"llm.TransferBackend requires llm.EnableCacheManager to be 1: "
                           f"{ENABLE_CACHE_MANAGER_HINT}.")
        opts.setdefault(OPT_REMOTE_CACHE_ACCESSIBLE, "1")
        if opts[OPT_REMOTE_CACHE_ACCESSIBLE] != "1":
            raise _invalid("llm.TransferBackend requires llm.EnableRemoteCacheAccessible to be 1.")
        if OPT_LISTEN_IP_INFO not in opts:
            raise _invalid("llm.TransferBackend requires llm.listenIpInfo to be configured.")
    if cm_mode and OPT_LISTEN_IP_INFO in opts:
        ip, port = parse_listen_ip_info(opts[OPT_LISTEN_IP_INFO])
        opts[OPT_LISTEN_IP] = ip
        opts[OPT_LISTEN_PORT] = str(port)
    return opts


def _positive_int(opts: Dict[str, str], key: str, default: int) -> int:
    value = opts.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value.isdigit() or int(value) <= 0:
        raise _invalid(f"{key} must be a positive integer string, but got {value!r}")
    return int(value)


def _device_id(opts: Dict[str, str]) -> int:
    value = opts.get(OPT_DEVICE_ID)
    if value is None or value == "":
        return 0
    first = str(value).split(";")[0].strip()
    if not first.isdigit():
        raise _invalid(f"{OPT_DEVICE_ID} must be a non-negative integer, but got {value!r}")
    return int(first)


def _tls(opts: Dict[str, str]) -> Optional[TlsFiles]:
    """Mutual TLS files: all three (certificate, key, CA) from the options or the environment, or none."""
    files = {key: opts.get(key) or os.environ.get(env) or "" for key, env in ENV_TLS.items()}
    given = [key for key, path in files.items() if path]
    if not given:
        return None
    if len(given) != len(files):
        missing = ", ".join(f"{key} ({ENV_TLS[key]})" for key in files if key not in given)
        raise _invalid(f"TLS needs a certificate, a key and a CA file; missing: {missing}")
    for key, path in files.items():
        if not os.path.isfile(path):
            raise _invalid(f"{key} {path!r} is not a readable file")
    return TlsFiles(cert=files[OPT_TLS_CERT], key=files[OPT_TLS_KEY], ca=files[OPT_TLS_CA])


def _link_secret(opts: Dict[str, str]) -> Optional[bytes]:
    secret = opts.get(OPT_LINK_SECRET) or os.environ.get(ENV_LINK_SECRET) or ""
    return secret.encode() if secret else None


def parse_options(options: Dict[str, str], role: int, cluster_id: int) -> EngineOptions:
    """Validate the completed options (the checks the native layer makes) into EngineOptions."""
    opts = complete_options(options, role)
    cm_mode = opts.get(OPT_ENABLE_CACHE_MANAGER) == "1"
    ra = opts.get(OPT_REMOTE_CACHE_ACCESSIBLE, "0")
    if ra not in ("0", "1"):
        raise _invalid(f"{OPT_REMOTE_CACHE_ACCESSIBLE} must be 0 or 1, but got {ra!r}")
    if OPT_LISTEN_IP in opts:
        parse_ip(OPT_LISTEN_IP, opts[OPT_LISTEN_IP])
    listen_port = parse_port(OPT_LISTEN_PORT, opts[OPT_LISTEN_PORT]) if OPT_LISTEN_PORT in opts else None
    rank_table_addresses(OPT_LOCAL_COMM_RES, opts.get(OPT_LOCAL_COMM_RES))
    if not cm_mode and OPT_LISTEN_IP_INFO in opts:
        ip, listen_port = parse_listen_ip_info(opts[OPT_LISTEN_IP_INFO])
        opts[OPT_LISTEN_IP] = ip
    link_total = opts.get(OPT_LINK_TOTAL_TIME, "0")
    if not str(link_total).isdigit():
        raise _invalid(f"{OPT_LINK_TOTAL_TIME} must be a non-negative integer, but got {link_total!r}")
    retry = opts.get(OPT_LINK_RETRY_COUNT, "1")
    if not str(retry).isdigit() or not 1 <= int(retry) <= 100:
        raise _invalid(f"{OPT_LINK_RETRY_COUNT} must be in [1, 100], but got {retry!r}")
    backend = opts.get(OPT_TRANSFER_BACKEND) or os.environ.get(ENV_TRANSPORT) or None
    return EngineOptions(
        cluster_id=cluster_id, role=int(role) if role is not None else 1, cache_manager_mode=cm_mode,
        remote_cache_accessible=(ra == "1"), local_comm_res=opts.get(OPT_LOCAL_COMM_RES),
        device_id=_device_id(opts),
        sync_kv_timeout_ms=_positive_int(opts, OPT_SYNC_TIMEOUT, DEFAULT_SYNC_TIMEOUT_MS),
        listen_ip=opts.get(OPT_LISTEN_IP), listen_port=listen_port,
        mem_pool_cfg=opts.get(OPT_MEM_POOL, ""), host_mem_pool_cfg=opts.get(OPT_HOST_MEM_POOL, ""),
        transfer_backend=backend, link_total_time_s=int(link_total), link_retry_count=int(retry),
        link_secret=_link_secret(opts), tls=_tls(opts),
    )


def link_timeout_s(opts: EngineOptions) -> float:
    """Rank-table link timeout: link_total_time, else HCCL_CONNECT_TIMEOUT, else 120 s."""
    if opts.link_total_time_s > 0:
        return float(opts.link_total_time_s)
    env = os.environ.get("HCCL_CONNECT_TIMEOUT", "")
    return float(env) if env.isdigit() and int(env) > 0 else 120.0
