"""LLMRole, LLMConfig (alias LlmConfig), the options builder for ``LLMDataDist.init``, and LLMClusterInfo."""
from __future__ import annotations

import json
import socket
from enum import IntEnum
from typing import Any, Dict, List, Optional, Tuple, Union

from llm_datadist.status import LLMException, LLMStatusCode
from llm_datadist.utils.addresses import parse_ip_port, rank_table_addresses
from llm_datadist.utils.utils import (
    check_int32,
    check_isinstance,
    check_uint16,
    check_uint32,
    check_uint64,
    raise_if_false,
)

__all__ = ["LLMRole", "LLMConfig", "LlmConfig", "LLMClusterInfo", "role_option_value", "ip_to_int", "int_to_ip"]


class LLMRole(IntEnum):
    """Role label of an LLMDataDist instance; it restricts no operation."""

    PROMPT = 1
    DECODER = 2
    MIX = 3

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


_ROLE_OPTION_VALUES = {LLMRole.PROMPT: "Prompt", LLMRole.DECODER: "Decoder", LLMRole.MIX: "Mix"}


def role_option_value(role: LLMRole) -> str:
    """Return the ``llm.Role`` option value of ``role``: "Prompt", "Decoder" or "Mix"."""
    return _ROLE_OPTION_VALUES[LLMRole(role)]


def ip_to_int(ip: Union[str, int], option: str = "ip") -> int:
    """Convert an IPv4 string to the library's int form (first octet in the least-significant byte).

    Args:
        ip: a dotted IPv4 string (``socket.inet_aton`` syntax) or an int, returned as is.
        option: what the ip is, named in the message.

    Returns:
        The little-endian integer form, e.g. ``"1.2.3.4"`` → ``0x04030201``.

    Raises:
        LLMException: LLM_PARAM_INVALID (a RuntimeError, as the official library raises) when the string is
            not an IPv4 address.
    """
    if isinstance(ip, int):
        return ip
    try:
        packed = socket.inet_aton(ip)
    except (OSError, ValueError, UnicodeError):
        raise LLMException(f"Can not parse ip str:{ip} ({option} must be an IPv4 address)",
                           status_code=LLMStatusCode.LLM_PARAM_INVALID) from None
    return int.from_bytes(packed, "little")


def int_to_ip(value: int) -> str:
    """Convert the library's little-endian int form of an IPv4 address back to a dotted string."""
    return socket.inet_ntoa((value & 0xFFFFFFFF).to_bytes(4, "little"))


_DIGITS = frozenset("0123456789")

# Option keys, in the order generate_options() writes them.
_KEY_DEVICE_ID = "ge.exec.deviceId"
_KEY_SESSION_DEVICE_ID = "ge.session_device_id"
_KEY_SYNC_TIMEOUT = "llm.SyncKvCacheWaitTime"
_KEY_DEPLOY_RES_PATH = "llm.deployResPath"
_KEY_MEM_POOL = "llm.MemPoolConfig"
_KEY_HOST_MEM_POOL = "llm.HostMemPoolConfig"
_KEY_LISTEN_IP_INFO = "llm.listenIpInfo"
_KEY_ENABLE_CACHE_MANAGER = "llm.EnableCacheManager"
_KEY_REMOTE_ACCESSIBLE = "llm.EnableRemoteCacheAccessible"
_KEY_TRAFFIC_CLASS = "llm.RdmaTrafficClass"
_KEY_SERVICE_LEVEL = "llm.RdmaServiceLevel"
_KEY_LOCAL_COMM_RES = "llm.LocalCommRes"
_KEY_LINK_TOTAL_TIME = "llm.LinkTotalTime"
_KEY_LINK_RETRY_COUNT = "llm.LinkRetryCount"
_KEY_TRANSFER_BACKEND = "llm.TransferBackend"
_KEY_GLOBAL_RESOURCE = "llm.GlobalResourceConfig"
_KEY_LINK_SECRET = "llm.LinkSecret"
_KEY_TLS_CERT = "llm.TlsCertFile"
_KEY_TLS_KEY = "llm.TlsKeyFile"
_KEY_TLS_CA = "llm.TlsCaFile"
_KEY_METRICS_PORT = "llm.MetricsPort"
_KEY_BUF_POOL = "llm.BufPoolCfg"
_KEY_CLUSTER_INFO = "llm.ClusterInfo"
_KEY_OUTPUT_MAX_SIZE = "llm.OutputMaxSize"
_KEY_SWITCH_ROLE = "llm.EnableSwitchRole"
_KEY_MEM_UTILIZATION = "llm.MemoryUtilization"

_DEFAULT_MEM_UTILIZATION = 0.95


def _bool_str(value: bool) -> str:
    return "1" if value else "0"


def _convert_cluster_info(cluster_info: str) -> str:
    """Parse a legacy cluster-info JSON and turn ``listen_ip_info[*].ip`` strings into little-endian ints."""
    try:
        info = json.loads(cluster_info)
    except ValueError:
        raise LLMException(
            f"cluster_info is not a valid json string: {cluster_info}", status_code=LLMStatusCode.LLM_PARAM_INVALID
        ) from None
    entries = info.get("listen_ip_info", []) if isinstance(info, dict) else []
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(entry, dict) and isinstance(entry.get("ip"), str):
            entry["ip"] = ip_to_int(entry["ip"], f"cluster_info listen_ip_info[{index}].ip")
    return json.dumps(info)


class LLMConfig:
    """Builder of the ``Dict[str, str]`` options passed to ``LLMDataDist.init``.

    Every attribute is a validating property. ``generate_options()`` (alias ``gen_options()``) returns the one
    internal dict of the config, rewritten on each call for the attributes currently set.
    """

    def __init__(self) -> None:
        self._options: Dict[str, str] = {}
        self._ge_options: Dict[str, str] = {}
        self._device_id: Union[int, List[int], Tuple[int, ...], None] = None
        self._sync_kv_timeout: Union[int, str, None] = None
        self._deploy_res_path = ""
        self._mem_pool_cfg = ""
        self._host_mem_pool_cfg = ""
        self._buf_pool_cfg = ""
        self._listen_ip_info = ""
        self._enable_cache_manager: Optional[bool] = None
        self._enable_remote_cache_accessible: Optional[bool] = None
        self._rdma_traffic_class: Optional[int] = None
        self._rdma_service_level: Optional[int] = None
        self._local_comm_res: Optional[str] = None
        self._link_total_time: Optional[int] = None
        self._link_retry_count: Optional[int] = None
        self._transfer_backend: Optional[str] = None
        self._global_resource_config: Optional[str] = None
        self._link_secret: Optional[str] = None
        self._tls_cert_file: Optional[str] = None
        self._tls_key_file: Optional[str] = None
        self._tls_ca_file: Optional[str] = None
        self._metrics_port: Optional[int] = None
        self._cluster_info = ""
        self._cluster_info_option = ""
        self._output_max_size: Optional[int] = None
        self._enable_switch_role = False
        self._mem_utilization = _DEFAULT_MEM_UTILIZATION

    # ---- generation ----------------------------------------------------------------------------
    def generate_options(self) -> Dict[str, str]:
        """Write the options of every attribute set so far and return the internal dict.

        The same dict object is returned on every call; keys are never removed.

        Returns:
            The options dict for ``LLMDataDist.init``.
        """
        options = self._options
        options.update(self._ge_options)
        self._write_device_options(options)
        if self._sync_kv_timeout is not None:
            options[_KEY_SYNC_TIMEOUT] = str(self._sync_kv_timeout)
        if self._deploy_res_path:
            options[_KEY_DEPLOY_RES_PATH] = self._deploy_res_path
        self._write_memory_options(options)
        self._write_connection_options(options)
        self._write_legacy_options(options)
        options[_KEY_MEM_UTILIZATION] = str(self._mem_utilization)
        return options

    def gen_options(self) -> Dict[str, str]:
        """Alias of :meth:`generate_options`.

        Returns:
            The options dict for ``LLMDataDist.init``.
        """
        return self.generate_options()

    def _write_device_options(self, options: Dict[str, str]) -> None:
        device_id = self._device_id
        if device_id is None:
            return
        if isinstance(device_id, int):
            options[_KEY_DEVICE_ID] = str(int(device_id))
            options[_KEY_SESSION_DEVICE_ID] = str(int(device_id))
        else:
            options[_KEY_DEVICE_ID] = ";".join(str(int(item)) for item in device_id)
            options[_KEY_SESSION_DEVICE_ID] = str(int(device_id[0]))

    def _write_memory_options(self, options: Dict[str, str]) -> None:
        if self._mem_pool_cfg:
            options[_KEY_MEM_POOL] = self._mem_pool_cfg
        if self._host_mem_pool_cfg:
            options[_KEY_HOST_MEM_POOL] = self._host_mem_pool_cfg

    def _write_connection_options(self, options: Dict[str, str]) -> None:
        if self._listen_ip_info:
            options[_KEY_LISTEN_IP_INFO] = self._listen_ip_info
        if self._enable_cache_manager is not None:
            options[_KEY_ENABLE_CACHE_MANAGER] = _bool_str(self._enable_cache_manager)
        if self._enable_remote_cache_accessible is not None:
            options[_KEY_REMOTE_ACCESSIBLE] = _bool_str(self._enable_remote_cache_accessible)
        if self._rdma_traffic_class is not None:
            options[_KEY_TRAFFIC_CLASS] = str(int(self._rdma_traffic_class))
        if self._rdma_service_level is not None:
            options[_KEY_SERVICE_LEVEL] = str(int(self._rdma_service_level))
        if self._local_comm_res is not None:
            options[_KEY_LOCAL_COMM_RES] = self._local_comm_res
        if self._link_total_time is not None:
            options[_KEY_LINK_TOTAL_TIME] = str(int(self._link_total_time))
        if self._link_retry_count is not None:
            options[_KEY_LINK_RETRY_COUNT] = str(int(self._link_retry_count))
        if self._transfer_backend is not None:
            options[_KEY_TRANSFER_BACKEND] = self._transfer_backend
        if self._global_resource_config is not None:
            options[_KEY_GLOBAL_RESOURCE] = self._global_resource_config
        if self._link_secret is not None:
            options[_KEY_LINK_SECRET] = self._link_secret
        for key, value in ((_KEY_TLS_CERT, self._tls_cert_file), (_KEY_TLS_KEY, self._tls_key_file),
                           (_KEY_TLS_CA, self._tls_ca_file)):
            if value is not None:
                options[key] = value
        if self._metrics_port is not None:
            options[_KEY_METRICS_PORT] = str(self._metrics_port)

    def _write_legacy_options(self, options: Dict[str, str]) -> None:
        if self._buf_pool_cfg:
            options[_KEY_BUF_POOL] = self._buf_pool_cfg
        if self._cluster_info_option:
            options[_KEY_CLUSTER_INFO] = self._cluster_info_option
        if self._output_max_size is not None:
            options[_KEY_OUTPUT_MAX_SIZE] = str(int(self._output_max_size))
        if self._enable_switch_role:
            options[_KEY_SWITCH_ROLE] = "1"

    @property
    def options(self) -> Dict[str, str]:
        """The internal options dict (as filled by the last ``generate_options()`` call)."""
        return self._options

    # ---- device / timeouts ---------------------------------------------------------------------
    @property
    def device_id(self) -> Union[int, List[int], Tuple[int, ...], None]:
        """Device id(s) of this process: an int, or a list/tuple of ints (one device is supported)."""
        return self._device_id

    @device_id.setter
    def device_id(self, device_id: Union[int, List[int], Tuple[int, ...]]) -> None:
        check_isinstance("device_id", device_id, [int, list, tuple], allow_none=False)
        ids = [device_id] if isinstance(device_id, int) else device_id
        check_isinstance("device_id", ids, [list, tuple], int)
        raise_if_false(len(ids) > 0, "device_id can not be an empty list")
        for item in ids:
            raise_if_false(item >= 0, "device_id must be >= 0, but got {}", item)
            check_int32("device_id", item)
        self._device_id = device_id

    @property
    def sync_kv_timeout(self) -> Union[int, str, None]:
        """Timeout in milliseconds of pulls, pushes and layer transfers (int or digit string)."""
        return self._sync_kv_timeout

    @sync_kv_timeout.setter
    def sync_kv_timeout(self, sync_kv_timeout: Union[int, str]) -> None:
        check_isinstance("sync_kv_timeout", sync_kv_timeout, [int, str], allow_none=False)
        if isinstance(sync_kv_timeout, str):
            raise_if_false(
                len(sync_kv_timeout) > 0 and set(sync_kv_timeout) <= _DIGITS,
                "sync_kv_timeout must be digit, but got {!r}",
                sync_kv_timeout,
            )
        value = int(sync_kv_timeout)
        raise_if_false(value > 0, "sync_kv_timeout must be bigger than 0, but got {}", sync_kv_timeout)
        check_int32("sync_kv_timeout", value)
        self._sync_kv_timeout = sync_kv_timeout if isinstance(sync_kv_timeout, str) else value

    @property
    def ge_options(self) -> Dict[str, str]:
        """Extra raw options, merged verbatim first; the getter returns the live dict."""
        return self._ge_options

    @ge_options.setter
    def ge_options(self, ge_options: Dict[str, str]) -> None:
        check_isinstance("ge_options", ge_options, dict, allow_none=False)
        check_isinstance("ge_options keys", list(ge_options.keys()), list, str)
        check_isinstance("ge_options values", list(ge_options.values()), list, str)
        self._ge_options = ge_options

    # ---- plain string options ------------------------------------------------------------------
    @staticmethod
    def _check_str(name: str, value: Any) -> str:
        check_isinstance(name, value, str)
        return "" if value is None else value

    @staticmethod
    def _check_optional_str(name: str, value: Any) -> Optional[str]:
        check_isinstance(name, value, str)
        return value

    @property
    def listen_ip_info(self) -> str:
        """``"ip:port"`` this instance listens on (makes it a link server)."""
        return self._listen_ip_info

    @listen_ip_info.setter
    def listen_ip_info(self, listen_ip_info: str) -> None:
        value = self._check_str("listen_ip_info", listen_ip_info)
        if value:
            parse_ip_port("listen_ip_info", value)
        self._listen_ip_info = value

    @property
    def deploy_res_path(self) -> str:
        """Legacy deployment resource path."""
        return self._deploy_res_path

    @deploy_res_path.setter
    def deploy_res_path(self, deploy_res_path: str) -> None:
        self._deploy_res_path = self._check_str("deploy_res_path", deploy_res_path)

    @property
    def mem_pool_cfg(self) -> str:
        """Device memory pool JSON ``{"memory_size": n, "page_shift": k}`` (to be deprecated)."""
        return self._mem_pool_cfg

    @mem_pool_cfg.setter
    def mem_pool_cfg(self, mem_pool_cfg: str) -> None:
        self._mem_pool_cfg = self._check_str("mem_pool_cfg", mem_pool_cfg)

    @property
    def host_mem_pool_cfg(self) -> str:
        """Host memory pool JSON ``{"memory_size": n, "page_shift": k}`` (to be deprecated)."""
        return self._host_mem_pool_cfg

    @host_mem_pool_cfg.setter
    def host_mem_pool_cfg(self, host_mem_pool_cfg: str) -> None:
        self._host_mem_pool_cfg = self._check_str("host_mem_pool_cfg", host_mem_pool_cfg)

    @property
    def buf_pool_cfg(self) -> str:
        """Legacy buffer pool configuration."""
        return self._buf_pool_cfg

    @buf_pool_cfg.setter
    def buf_pool_cfg(self, buf_pool_cfg: str) -> None:
        self._buf_pool_cfg = self._check_str("buf_pool_cfg", buf_pool_cfg)

    @property
    def cluster_info(self) -> str:
        """Legacy offline cluster-info JSON; ``listen_ip_info[*].ip`` strings are emitted as ints."""
        return self._cluster_info

    @cluster_info.setter
    def cluster_info(self, cluster_info: str) -> None:
        value = self._check_str("cluster_info", cluster_info)
        self._cluster_info_option = _convert_cluster_info(value) if value else ""
        self._cluster_info = value

    # ---- options emitted once explicitly set ---------------------------------------------------
    @property
    def local_comm_res(self) -> str:
        """Local communication resources (rank-table JSON, or ``""``); implies the cache manager mode."""
        return "" if self._local_comm_res is None else self._local_comm_res

    @local_comm_res.setter
    def local_comm_res(self, local_comm_res: str) -> None:
        value = self._check_optional_str("local_comm_res", local_comm_res)
        rank_table_addresses("local_comm_res", value)
        self._local_comm_res = value

    @property
    def transfer_backend(self) -> str:
        """Transfer backend name (``"hixl"`` is the alias of the default choice)."""
        return "" if self._transfer_backend is None else self._transfer_backend

    @transfer_backend.setter
    def transfer_backend(self, transfer_backend: str) -> None:
        self._transfer_backend = self._check_optional_str("transfer_backend", transfer_backend)

    @property
    def global_resource_config(self) -> str:
        """Backend resource configuration JSON."""
        return "" if self._global_resource_config is None else self._global_resource_config

    @global_resource_config.setter
    def global_resource_config(self, global_resource_config: str) -> None:
        self._global_resource_config = self._check_optional_str("global_resource_config", global_resource_config)

    @property
    def link_secret(self) -> str:
        """Shared secret authenticating link handshakes (our extension, option ``llm.LinkSecret``)."""
        return "" if self._link_secret is None else self._link_secret

    @link_secret.setter
    def link_secret(self, link_secret: str) -> None:
        self._link_secret = self._check_optional_str("link_secret", link_secret)

    @property
    def tls_cert_file(self) -> str:
        """PEM certificate (chain) of this instance for mutual TLS (our extension, option ``llm.TlsCertFile``).

        With ``tls_key_file`` and ``tls_ca_file`` on both sides, link handshakes and the tcp data plane run
        over TLS; a peer must present a certificate signed by the CA.
        """
        return "" if self._tls_cert_file is None else self._tls_cert_file

    @tls_cert_file.setter
    def tls_cert_file(self, path: str) -> None:
        self._tls_cert_file = self._check_optional_str("tls_cert_file", path)

    @property
    def tls_key_file(self) -> str:
        """PEM private key of ``tls_cert_file`` (option ``llm.TlsKeyFile``)."""
        return "" if self._tls_key_file is None else self._tls_key_file

    @tls_key_file.setter
    def tls_key_file(self, path: str) -> None:
        self._tls_key_file = self._check_optional_str("tls_key_file", path)

    @property
    def tls_ca_file(self) -> str:
        """PEM CA certificate(s) that sign the peers' certificates (option ``llm.TlsCaFile``)."""
        return "" if self._tls_ca_file is None else self._tls_ca_file

    @tls_ca_file.setter
    def tls_ca_file(self, path: str) -> None:
        self._tls_ca_file = self._check_optional_str("tls_ca_file", path)

    @property
    def metrics_port(self) -> Optional[int]:
        """Port of the process's Prometheus endpoint (our extension, option ``llm.MetricsPort``; overrides
        ``LLM_DATADIST_METRICS_PORT``): the first init that asks starts ``/metrics`` there (``0``: a free port),
        the process's last finalize stops it. Needs prometheus_client; see docs/observability.md."""
        return self._metrics_port

    @metrics_port.setter
    def metrics_port(self, port: int) -> None:
        check_isinstance("metrics_port", port, int, allow_none=False)
        raise_if_false(0 <= port <= 65535, "metrics_port must be in [0, 65535], but got {}", port)
        self._metrics_port = port

    @property
    def enable_cache_manager(self) -> bool:
        """Whether the v2 CacheManager mode is enabled."""
        return bool(self._enable_cache_manager)

    @enable_cache_manager.setter
    def enable_cache_manager(self, enable_cache_manager: bool) -> None:
        check_isinstance("enable_cache_manager", enable_cache_manager, bool)
        self._enable_cache_manager = enable_cache_manager

    @property
    def enable_remote_cache_accessible(self) -> bool:
        """Whether peers access registered caches one-sidedly (enables push APIs)."""
        return bool(self._enable_remote_cache_accessible)

    @enable_remote_cache_accessible.setter
    def enable_remote_cache_accessible(self, enable_remote_cache_accessible: bool) -> None:
        check_isinstance("enable_remote_cache_accessible", enable_remote_cache_accessible, bool)
        self._enable_remote_cache_accessible = enable_remote_cache_accessible

    @property
    def rdma_traffic_class(self) -> Optional[int]:
        """RDMA traffic class (uint32; documented range [0, 255], not enforced)."""
        return self._rdma_traffic_class

    @rdma_traffic_class.setter
    def rdma_traffic_class(self, rdma_traffic_class: int) -> None:
        check_uint32("rdma_traffic_class", rdma_traffic_class)
        self._rdma_traffic_class = rdma_traffic_class

    @property
    def rdma_service_level(self) -> Optional[int]:
        """RDMA service level (uint32; documented range [0, 7], not enforced)."""
        return self._rdma_service_level

    @rdma_service_level.setter
    def rdma_service_level(self, rdma_service_level: int) -> None:
        check_uint32("rdma_service_level", rdma_service_level)
        self._rdma_service_level = rdma_service_level

    @property
    def link_total_time(self) -> int:
        """Total link time in seconds (0 = environment default)."""
        return 0 if self._link_total_time is None else self._link_total_time

    @link_total_time.setter
    def link_total_time(self, link_total_time: int) -> None:
        check_isinstance("link_total_time", link_total_time, int, allow_none=False)
        raise_if_false(
            0 <= link_total_time <= 2**32 - 1,
            "link_total_time must be in [0, 4294967295], but got {}",
            link_total_time,
        )
        self._link_total_time = link_total_time

    @property
    def link_retry_count(self) -> int:
        """Number of link attempts, in [1, 100]."""
        return 1 if self._link_retry_count is None else self._link_retry_count

    @link_retry_count.setter
    def link_retry_count(self, link_retry_count: int) -> None:
        check_isinstance("link_retry_count", link_retry_count, int, allow_none=False)
        raise_if_false(
            1 <= link_retry_count <= 100, "link_retry_count must be in [1, 100], but got {}", link_retry_count
        )
        self._link_retry_count = link_retry_count

    # ---- legacy --------------------------------------------------------------------------------
    @property
    def output_max_size(self) -> Optional[int]:
        """Legacy maximum output size."""
        return self._output_max_size

    @output_max_size.setter
    def output_max_size(self, output_max_size: int) -> None:
        check_isinstance("output_max_size", output_max_size, int)
        self._output_max_size = output_max_size

    @property
    def enable_switch_role(self) -> bool:
        """Legacy switch-role enablement (emitted only when True)."""
        return self._enable_switch_role

    @enable_switch_role.setter
    def enable_switch_role(self, enable_switch_role: bool) -> None:
        check_isinstance("enable_switch_role", enable_switch_role, bool)
        self._enable_switch_role = bool(enable_switch_role)

    @property
    def mem_utilization(self) -> float:
        """Legacy memory utilization ratio in [0.0, 1.0] (always emitted, default 0.95)."""
        return self._mem_utilization

    @mem_utilization.setter
    def mem_utilization(self, mem_utilization: float) -> None:
        check_isinstance("mem_utilization", mem_utilization, float, allow_none=False)
        raise_if_false(
            0.0 <= mem_utilization <= 1.0, "mem_utilization must be in [0.0, 1.0], but got {}", mem_utilization
        )
        self._mem_utilization = mem_utilization


LlmConfig = LLMConfig


class LLMClusterInfo:
    """Addressing of one peer for ``link_clusters``/``unlink_clusters``."""

    def __init__(self) -> None:
        self._remote_cluster_id: Optional[int] = None
        self._remote_role_type: Union[LLMRole, int, None] = None
        self._local_ip_info_list: List[Tuple[int, int]] = []
        self._remote_ip_info_list: List[Tuple[int, int]] = []

    @property
    def remote_cluster_id(self) -> Optional[int]:
        """Cluster id of the peer (uint64)."""
        return self._remote_cluster_id

    @remote_cluster_id.setter
    def remote_cluster_id(self, remote_cluster_id: int) -> None:
        check_uint64("remote_cluster_id", remote_cluster_id)
        self._remote_cluster_id = remote_cluster_id

    @property
    def remote_role_type(self) -> Union[LLMRole, int, None]:
        """Role of the peer (informational only)."""
        return self._remote_role_type

    @remote_role_type.setter
    def remote_role_type(self, remote_role_type: Union[LLMRole, int, None]) -> None:
        check_isinstance("remote_role_type", remote_role_type, [LLMRole, int])
        self._remote_role_type = remote_role_type

    @property
    def local_ip_info_list(self) -> List[Tuple[int, int]]:
        """Local ``(ip_int, port)`` pairs."""
        return self._local_ip_info_list

    @property
    def remote_ip_info_list(self) -> List[Tuple[int, int]]:
        """Remote ``(ip_int, port)`` pairs."""
        return self._remote_ip_info_list

    @staticmethod
    def _ip_info(ip: Union[str, int], port: int, which: str) -> Tuple[int, int]:
        check_isinstance("ip", ip, [str, int], allow_none=False)
        check_uint16("port", port)
        return ip_to_int(ip, f"the ip of {which}"), port

    def append_local_ip_info(self, ip: Union[str, int], port: int) -> None:
        """Add a local address.

        Args:
            ip: IPv4 string, or an int in the library's little-endian form.
            port: uint16 port (0 allowed).

        Raises:
            TypeError: wrong ip or port type.
            ValueError: port out of range.
            LLMException: LLM_PARAM_INVALID (a RuntimeError) for an unparseable ip string.
        """
        self._local_ip_info_list.append(self._ip_info(ip, port, "append_local_ip_info"))

    def append_remote_ip_info(self, ip: Union[str, int], port: int) -> None:
        """Add a remote (server) address.

        Args:
            ip: IPv4 string, or an int in the library's little-endian form.
            port: uint16 port.

        Raises:
            TypeError: wrong ip or port type.
            ValueError: port out of range.
            LLMException: LLM_PARAM_INVALID (a RuntimeError) for an unparseable ip string.
        """
        self._remote_ip_info_list.append(self._ip_info(ip, port, "append_remote_ip_info"))
