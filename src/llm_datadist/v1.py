"""The C++ "V1" LlmDataDist API in Python, over the v2 engine: status codes are returned, never raised."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from llm_datadist._engine.api import CacheSpec, EngineApi, EngineError, LayerSel, SourceSpec, status_of
from llm_datadist._engine.api import requests as rq
from llm_datadist.configs import LLMRole
from llm_datadist.data_type import DataType, dtype_size
from llm_datadist.status import LLMException, LLMStatusCode
from llm_datadist.utils import addresses

if TYPE_CHECKING:
    from llm_datadist.v2.llm_datadist import LLMDataDist as V2DataDist

__all__ = [
    "LlmDataDist", "LlmRole", "CachePlacement", "CacheDesc", "CacheIndex", "Cache", "IpInfo", "ClusterInfo",
    "KvCacheExtParam", "RegisterCfg", "DataType", "LLMStatusCode", "OPTION_LISTEN_IP_INFO", "OPTION_DEVICE_ID",
    "OPTION_SYNC_CACHE_WAIT_TIME", "OPTION_BUF_POOL_CFG", "OPTION_ENABLE_SET_ROLE", "OPTION_LOCAL_COMM_RES",
    "OPTION_TRANSFER_BACKEND", "OPTION_GLOBAL_RESOURCE_CONFIG",
]

_log = logging.getLogger(__name__)
S = LLMStatusCode

# ---- option keys -------------------------------------------------------------------------------
OPTION_LISTEN_IP_INFO = "llm.ListenIpInfo"
OPTION_DEVICE_ID = "llm.DeviceId"
OPTION_SYNC_CACHE_WAIT_TIME = "llm.SyncKvCacheWaitTime"
OPTION_BUF_POOL_CFG = "llm.BufPoolCfg"
OPTION_ENABLE_SET_ROLE = "llm.EnableSwitchRole"
OPTION_LOCAL_COMM_RES = "llm.LocalCommRes"
OPTION_TRANSFER_BACKEND = "llm.TransferBackend"
OPTION_GLOBAL_RESOURCE_CONFIG = "llm.GlobalResourceConfig"

# C++ status constant names (the values are LLMStatusCode members).
LLM_SUCCESS = S.LLM_SUCCESS
LLM_FAILED = S.LLM_FAILED
LLM_WAIT_PROC_TIMEOUT = S.LLM_WAIT_PROCESS_TIMEOUT
LLM_KV_CACHE_NOT_EXIST = S.LLM_KV_CACHE_NOT_EXIST
LLM_PARAM_INVALID = S.LLM_PARAM_INVALID
LLM_NOT_YET_LINK = S.LLM_NOT_YET_LINK
LLM_ALREADY_LINK = S.LLM_ALREADY_LINK
LLM_LINK_FAILED = S.LLM_LINK_FAILED
LLM_UNLINK_FAILED = S.LLM_UNLINK_FAILED
LLM_DEVICE_OUT_OF_MEMORY = S.LLM_DEVICE_OUT_OF_MEMORY
LLM_EXIST_LINK = S.LLM_EXIST_LINK
LLM_FEATURE_NOT_ENABLED = S.LLM_FEATURE_NOT_ENABLED
LLM_TIMEOUT = S.LLM_TIMEOUT
LLM_LINK_BUSY = S.LLM_LINK_BUSY
LLM_OUT_OF_MEMORY = S.LLM_OUT_OF_MEMORY

# Codes V1 Initialize passes through (C++ TransRetToLlmCodes); any other becomes LLM_FAILED.
_INIT_CODES = {int(S.LLM_SUCCESS), int(S.LLM_FAILED)} | {0x5010B000 + n for n in list(range(1, 20)) + [24, 25, 27, 28]}
_UINT64_MAX = 2**64 - 1


class LlmRole(IntEnum):
    """Role of an instance; a label only: no operation is restricted by role."""

    kPrompt = 1
    kDecoder = 2
    kMix = 3
    kEnd = 4


class CachePlacement(IntEnum):
    """Where a cache lives (kDevice is host memory on a machine without CUDA)."""

    kHost = 0
    kDevice = 1


# ---- V1 data structures (mutable, like the C++ structs) --------------------------------------------
@dataclasses.dataclass
class CacheDesc:
    """Cache geometry; ``data_type=None`` is DT_UNDEFINED."""

    placement: int = CachePlacement.kDevice
    num_tensors: int = 0
    data_type: Optional[DataType] = None
    shape: List[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CacheIndex:
    """A remote cache slot: (cluster_id, cache_id, batch_index)."""

    cluster_id: int = 0
    cache_id: int = 0
    batch_index: int = 0


@dataclasses.dataclass
class Cache:
    """A cache handle; transfers only read ``cache_id`` (push also reads ``cache_desc``)."""

    cache_id: int = -1
    tensor_addrs: List[int] = dataclasses.field(default_factory=list)
    cache_desc: CacheDesc = dataclasses.field(default_factory=CacheDesc)


@dataclasses.dataclass
class IpInfo:
    """An IPv4 address string and a port."""

    ip: str = ""
    port: int = 0


@dataclasses.dataclass
class ClusterInfo:
    """A peer to link: its cluster id and ip infos (exactly one remote; the local one is optional)."""

    remote_cluster_id: int = 0
    remote_role_type: int = 0
    local_ip_infos: List[IpInfo] = dataclasses.field(default_factory=list)
    remote_ip_infos: List[IpInfo] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class KvCacheExtParam:
    """Inclusive layer ranges (first, second); (-1, -1) means every layer."""

    src_layer_range: Tuple[int, int] = (-1, -1)
    dst_layer_range: Tuple[int, int] = (-1, -1)
    tensor_num_per_layer: int = 2


@dataclasses.dataclass
class RegisterCfg:
    """Reserved."""


# ---- status plumbing ----------------------------------------------------------------------------
class _Fail(Exception):
    """A V1 failure carrying the status to return."""

    def __init__(self, code: LLMStatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _require(condition: Any, message: str, code: LLMStatusCode = S.LLM_PARAM_INVALID) -> None:
    if not condition:
        raise _Fail(code, message)


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, (int, np.integer)) and low <= int(value) <= high


def _code_of(exc: BaseException) -> LLMStatusCode:
    return exc.code if isinstance(exc, _Fail) else status_of(exc)


def _api(*outputs: Callable[[], Any], needs_init: bool = True):
    """Wrap a V1 method: no exception escapes; failures return (code, *default outputs)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            try:
                if needs_init and self._dd is None:
                    raise _Fail(S.LLM_FAILED, "LlmDataDist is not initialized")
                return fn(self, *args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - V1 returns codes, never raises
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                code = _code_of(exc)
                if isinstance(exc, (_Fail, LLMException, EngineError)) or status_of(exc) != S.LLM_FAILED:
                    _log.debug("%s failed (%s): %s", fn.__name__, code, exc)  # the caller gets the code
                else:
                    _log.exception("%s failed unexpectedly", fn.__name__)  # the code alone would lose the traceback
                code = self._post_code(fn.__name__, code)
                return code if not outputs else (code, *[make() for make in outputs])

        return wrapper

    return decorate


# ---- option parsing -----------------------------------------------------------------------------
def parse_ip_port(text: Any) -> Tuple[str, int]:
    """"ip:port" or "[ipv6]:port" -> (ip, port); raises LLMException(LLM_PARAM_INVALID) naming the option."""
    return addresses.parse_ip_port(OPTION_LISTEN_IP_INFO, text, allow_ipv6=True)


def _parse_device_ids(value: Any) -> List[int]:
    _require(isinstance(value, str) and value.strip(), f"{OPTION_DEVICE_ID} is required")
    items = [item.strip() for item in value.split(";")]
    _require(all(item.isdigit() for item in items), f"{OPTION_DEVICE_ID} must be non-negative integers, "
             f"got {value!r}")
    return [int(item) for item in items]


def _ipv4(info: Any, field: str) -> Tuple[str, int]:
    _require(isinstance(info, IpInfo), f"ip infos must be IpInfo, got {type(info).__name__}")
    ip = addresses.parse_ip(f"{field}.ip", info.ip, allow_ipv6=False)
    port = int(info.port) if isinstance(info.port, np.integer) else info.port
    _require(isinstance(port, int) and not isinstance(port, bool), f"{field}.port must be an int, got {port!r}")
    return ip, addresses.parse_port(f"{field}.port", port)


def _v2_options(options: Dict[str, str]) -> Dict[str, str]:
    """Translate V1 options into the v2 init options (CacheManager + remote-cache-accessible mode, always)."""
    devices = _parse_device_ids(options.get(OPTION_DEVICE_ID))
    opts = {k: v for k, v in options.items() if k not in (OPTION_DEVICE_ID, OPTION_LISTEN_IP_INFO,
                                                          OPTION_BUF_POOL_CFG)}
    opts.update({"ge.exec.deviceId": str(devices[0]), "ge.session_device_id": str(devices[0]),
                 "llm.EnableCacheManager": "1", "llm.EnableRemoteCacheAccessible": "1"})
    if OPTION_LISTEN_IP_INFO in options:
        ip, port = parse_ip_port(options[OPTION_LISTEN_IP_INFO])
        opts.update({"llm.ListenIp": ip, "llm.ListenPort": str(port)})
        if ":" not in ip:
            opts["llm.listenIpInfo"] = f"{ip}:{port}"
    if options.get(OPTION_BUF_POOL_CFG):
        opts["llm.MemPoolConfig"] = options[OPTION_BUF_POOL_CFG]
    if OPTION_TRANSFER_BACKEND in options and options.get(OPTION_GLOBAL_RESOURCE_CONFIG):
        try:
            json.loads(options[OPTION_GLOBAL_RESOURCE_CONFIG])
        except (TypeError, ValueError):
            raise _Fail(S.LLM_PARAM_INVALID, f"{OPTION_GLOBAL_RESOURCE_CONFIG} is not valid JSON") from None
    return opts


# ---- argument helpers ---------------------------------------------------------------------------
def _check_type(name: str, value: Any, cls) -> None:
    _require(isinstance(value, cls), f"{name} must be {getattr(cls, '__name__', cls)}, got {type(value).__name__}")


def _check_ints(name: str, values: Any, allow_empty: bool = False) -> List[int]:
    _require(isinstance(values, (list, tuple)) and all(_is_int(v, 0, _UINT64_MAX) for v in values),
             f"{name} must be a list of non-negative ints")
    _require(allow_empty or len(values) > 0, f"{name} can not be empty")
    return [int(v) for v in values]


def _ranges(ext: Any, push: bool) -> Tuple[range, range, int]:
    """Validate a KvCacheExtParam; returns (src, dst, N) with ranges as half-open (None-like = (-1,-1))."""
    _check_type("ext_param", ext, KvCacheExtParam)
    n = ext.tensor_num_per_layer
    _require(_is_int(n, 1, 255), f"tensor_num_per_layer must be in [1, 255], got {n!r}")
    pairs = []
    for name, pair in (("src_layer_range", ext.src_layer_range), ("dst_layer_range", ext.dst_layer_range)):
        _require(isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v, -1, 2**31 - 1) for v in pair)
                 and pair[0] <= pair[1], f"{name} must be (first, second) with -1 <= first <= second, got {pair!r}")
        pairs.append(range(int(pair[0]), int(pair[1]) + 1))
    src, dst = pairs
    if push:
        _require(len(src) == len(dst), f"src range {ext.src_layer_range} and dst range {ext.dst_layer_range} "
                 f"must have the same size")
    return src, dst, int(n)


def _layer_sel(src: range, dst: range, n: int) -> LayerSel:
    """Ranges apply only when both start at a layer >= 0 (as the official library does)."""
    if src.start >= 0 and dst.start >= 0:
        return LayerSel(src, dst, n)
    return LayerSel(None, None, n)


def _spec(desc: Any, is_blocks: bool = False) -> CacheSpec:
    _check_type("cache_desc", desc, CacheDesc)
    _require(_is_int(desc.placement, 0, 1), f"invalid placement {desc.placement!r}")
    _require(_is_int(desc.num_tensors, 1, 2**32 - 1), f"num_tensors must be > 0, got {desc.num_tensors!r}")
    _require(desc.data_type is not None, "data_type is undefined")
    data_type = desc.data_type if isinstance(desc.data_type, DataType) else DataType(desc.data_type)
    _require(isinstance(desc.shape, (list, tuple)) and 1 <= len(desc.shape) < 32
             and all(_is_int(d, 1, 2**63 - 1) for d in desc.shape), f"invalid shape {desc.shape!r}")
    return CacheSpec(num_tensors=int(desc.num_tensors), shape=tuple(int(d) for d in desc.shape),
                     data_type=data_type.value, elem_size=dtype_size(data_type), placement=int(desc.placement),
                     is_blocks=is_blocks)


class LlmDataDist:
    """A V1 instance: ``LlmDataDist(cluster_id, role)``, then ``Initialize(options)``.

    Every method returns an LLMStatusCode (plus its C++ output parameters as extra return values) and
    never raises. Any number of instances may live in one process, and they link with v2 instances
    running in remote-cache-accessible mode.
    """

    def __init__(self, cluster_id: int, role: int) -> None:
        self._cluster_id = cluster_id
        self._role = role
        self._dd: Optional[V2DataDist] = None
        self._lock = threading.RLock()

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def role(self) -> int:
        return self._role

    def _v2(self) -> V2DataDist:
        dd = self._dd
        if dd is None:
            raise _Fail(S.LLM_FAILED, "not initialized")
        return dd

    def _engine(self) -> EngineApi:
        engine = self._v2()._engine
        if engine is None:
            raise _Fail(S.LLM_FAILED, "not initialized")
        return engine

    @staticmethod
    def _post_code(func: str, code: LLMStatusCode) -> LLMStatusCode:
        if func == "Initialize" and int(code) not in _INIT_CODES:
            return S.LLM_FAILED
        if func == "AllocateCache" and code == S.LLM_OUT_OF_MEMORY:
            return S.LLM_DEVICE_OUT_OF_MEMORY
        return code

    # -- lifecycle ------------------------------------------------------------------------------
    @_api(needs_init=False)
    def Initialize(self, options: Dict[str, str]) -> LLMStatusCode:
        """Start the instance (always CacheManager + remote-cache-accessible mode)."""
        with self._lock:
            if self._dd is not None:
                return S.LLM_SUCCESS
            _require(_is_int(self._role, 1, 3), f"invalid role {self._role!r}")
            _require(_is_int(self._cluster_id, 0, _UINT64_MAX), f"invalid cluster id {self._cluster_id!r}")
            _check_type("options", options, dict)
            opts = _v2_options(options)
            from llm_datadist.v2.llm_datadist import LLMDataDist

            dd = LLMDataDist(LLMRole(int(self._role)), int(self._cluster_id))
            dd.init(opts)
            self._dd = dd
            _log.info("V1 LlmDataDist cluster %d initialized", self._cluster_id)
            return S.LLM_SUCCESS

    def Finalize(self) -> None:
        """Tear down links, registrations and pools (idempotent); never raises."""
        with self._lock:
            dd, self._dd = self._dd, None
            if dd is None:
                return
            try:
                dd.finalize()
            except Exception:  # noqa: BLE001 - void in C++
                _log.exception("Finalize failed")

    @_api()
    def SetRole(self, role: int, options: Optional[Dict[str, str]] = None) -> LLMStatusCode:
        """Change the role label and start, move or stop listening; links must not exist."""
        engine = self._engine()
        _require(_is_int(role, 1, 3), f"invalid role {role!r}")
        options = {} if options is None else options
        _check_type("options", options, dict)
        listen = parse_ip_port(options[OPTION_LISTEN_IP_INFO]) if OPTION_LISTEN_IP_INFO in options else None
        engine.set_role(int(role), listen)
        self._v2()._role = LLMRole(int(role))
        self._role = LlmRole(int(role))
        return S.LLM_SUCCESS

    # -- links ----------------------------------------------------------------------------------
    @staticmethod
    def _clusters(clusters: Any, timeout_in_millis: Any):
        _require(_is_int(timeout_in_millis, 1, 2**31 - 1), f"timeout must be in (0, 2^31), got {timeout_in_millis!r}")
        _require(isinstance(clusters, (list, tuple)) and len(clusters) > 0, "clusters can not be empty")
        parsed = []
        for cluster in clusters:
            _check_type("clusters element", cluster, ClusterInfo)
            _require(_is_int(cluster.remote_cluster_id, 0, _UINT64_MAX), "remote_cluster_id must be a uint64")
            local = [_ipv4(info, f"local_ip_infos[{i}]") for i, info in enumerate(cluster.local_ip_infos)]
            _require(len(local) <= 1, "at most one local ip info is supported")
            remote = [_ipv4(info, f"remote_ip_infos[{i}]") for i, info in enumerate(cluster.remote_ip_infos)]
            parsed.append((int(cluster.remote_cluster_id), remote))
        return rq.peers(parsed)

    @_api(list)
    def LinkLlmClusters(self, clusters: Sequence[ClusterInfo], timeout_in_millis: int = 1000):
        """Link to listening peers; returns (status, [status per cluster])."""
        engine = self._engine()
        peers = self._clusters(clusters, timeout_in_millis)
        code, codes = engine.link_clusters(rq.LinkClusters(peers, timeout_in_millis / 1000.0))
        return code, list(codes)

    @_api(list)
    def UnlinkLlmClusters(self, clusters: Sequence[ClusterInfo], timeout_in_millis: int = 1000,
                          force_flag: bool = False):
        """Unlink peers (``force_flag``: only the local side); returns (status, [status per cluster])."""
        engine = self._engine()
        peers = self._clusters(clusters, timeout_in_millis)
        _check_type("force_flag", force_flag, bool)
        code, codes = engine.unlink_clusters(rq.UnlinkClusters(peers, timeout_in_millis / 1000.0, force_flag))
        return code, list(codes)

    # -- transfers ------------------------------------------------------------------------------
    @_api()
    def PullKvCache(self, src_cache_index: CacheIndex, dst_cache: Cache, batch_index: int = 0, size: int = -1,
                    ext_param: Optional[KvCacheExtParam] = None) -> LLMStatusCode:
        """Pull remote slot ``src_cache_index`` into slot ``batch_index`` of local ``dst_cache``."""
        engine = self._engine()
        _check_type("src_cache_index", src_cache_index, CacheIndex)
        _check_type("dst_cache", dst_cache, Cache)
        _require(_is_int(batch_index, 0, 2**32 - 1), f"invalid batch_index {batch_index!r}")
        _require(_is_int(size, -1, 2**63 - 1) and size != 0, f"size must be -1 or > 0, got {size!r}")
        src, dst, n = _ranges(KvCacheExtParam() if ext_param is None else ext_param, push=False)
        source = SourceSpec("id", int(src_cache_index.cluster_id), cache_id=int(src_cache_index.cache_id),
                            batch_index=int(src_cache_index.batch_index))
        engine.transfer(rq.PullCache(source, int(dst_cache.cache_id), int(batch_index), int(size),
                                     _layer_sel(src, dst, n)))
        return S.LLM_SUCCESS

    @_api()
    def PullKvBlocks(self, src_cache_index: CacheIndex, dst_cache: Cache, src_blocks: Sequence[int],
                     dst_blocks: Sequence[int], ext_param: Optional[KvCacheExtParam] = None) -> LLMStatusCode:
        """Pull remote blocks ``src_blocks[i]`` into local blocks ``dst_blocks[i]`` (caches seen as blocks)."""
        engine = self._engine()
        _check_type("src_cache_index", src_cache_index, CacheIndex)
        _check_type("dst_cache", dst_cache, Cache)
        _require(src_cache_index.batch_index == 0, "src_cache_index.batch_index must be 0 for blocks")
        src, dst, n = _ranges(KvCacheExtParam() if ext_param is None else ext_param, push=False)
        s_blk, d_blk = _check_ints("src_blocks", src_blocks), _check_ints("dst_blocks", dst_blocks, True)
        _require(len(s_blk) == len(d_blk), f"src_blocks ({len(s_blk)}) and dst_blocks ({len(d_blk)}) differ")
        _require(src_cache_index.cluster_id != engine.cluster_id, "a cache can not be transferred with own cluster")
        engine.transfer(rq.BlocksById(int(src_cache_index.cluster_id), int(src_cache_index.cache_id),
                                      int(dst_cache.cache_id), tuple(s_blk), tuple(d_blk), _layer_sel(src, dst, n),
                                      pull=True))
        return S.LLM_SUCCESS

    @staticmethod
    def _push_layers(engine: EngineApi, src_cache: Cache, ext_param: Optional[KvCacheExtParam]) -> LayerSel:
        src, dst, n = _ranges(KvCacheExtParam() if ext_param is None else ext_param, push=True)
        if src.start < 0:
            _require(_is_int(src_cache.cache_desc.num_tensors, 1, 2**32 - 1), "src_cache.cache_desc.num_tensors "
                     "must be > 0 to push every layer")
            info = engine.cache_info(int(src_cache.cache_id))
            _require(info.num_tensors % n == 0, f"num_tensors {info.num_tensors} is not a multiple of "
                     f"tensor_num_per_layer {n}")
            src = range(0, info.num_tensors // n)
            dst = src if dst.start < 0 else range(dst.start, dst.start + len(src))
        elif dst.start < 0:
            dst = src
        return LayerSel(src, dst, n)

    def _check_push_src(self, src_cache: Any, dst_cache_index: Any) -> EngineApi:
        engine = self._engine()
        _check_type("src_cache", src_cache, Cache)
        _check_type("dst_cache_index", dst_cache_index, CacheIndex)
        _check_type("src_cache.cache_desc", src_cache.cache_desc, CacheDesc)
        _require(src_cache.cache_desc.placement == CachePlacement.kDevice, "the push source must be kDevice")
        return engine

    @_api()
    def PushKvCache(self, src_cache: Cache, dst_cache_index: CacheIndex, src_batch_index: int = 0, size: int = -1,
                    ext_param: Optional[KvCacheExtParam] = None) -> LLMStatusCode:
        """Write local slot ``src_batch_index`` into remote slot ``dst_cache_index``, layer range by layer range."""
        engine = self._check_push_src(src_cache, dst_cache_index)
        _require(_is_int(src_batch_index, 0, 2**32 - 1), f"invalid src_batch_index {src_batch_index!r}")
        _require(size == -1, f"PushKvCache only supports size -1, got {size!r}")
        layers = self._push_layers(engine, src_cache, ext_param)
        dest = SourceSpec("id", int(dst_cache_index.cluster_id), cache_id=int(dst_cache_index.cache_id),
                          batch_index=int(dst_cache_index.batch_index))
        engine.transfer(rq.PushCache(dest, int(src_cache.cache_id), int(src_batch_index), layers))
        return S.LLM_SUCCESS

    @_api()
    def PushKvBlocks(self, src_cache: Cache, dst_cache_index: CacheIndex, src_blocks: Sequence[int],
                     dst_blocks: Sequence[int], ext_param: Optional[KvCacheExtParam] = None) -> LLMStatusCode:
        """Write local blocks ``src_blocks[i]`` into blocks ``dst_blocks[i]`` of a remote cache (by id)."""
        engine = self._check_push_src(src_cache, dst_cache_index)
        s_blk, d_blk = _check_ints("src_blocks", src_blocks), _check_ints("dst_blocks", dst_blocks, True)
        _require(len(s_blk) == len(d_blk), f"src_blocks ({len(s_blk)}) and dst_blocks ({len(d_blk)}) differ")
        _require(dst_cache_index.batch_index == 0, "dst_cache_index.batch_index must be 0 for blocks")
        layers = self._push_layers(engine, src_cache, ext_param)
        _require(dst_cache_index.cluster_id != engine.cluster_id, "a cache can not be transferred with own cluster")
        engine.transfer(rq.BlocksById(int(dst_cache_index.cluster_id), int(dst_cache_index.cache_id),
                                      int(src_cache.cache_id), tuple(s_blk), tuple(d_blk), layers, pull=False))
        return S.LLM_SUCCESS

    # -- local copies (legacy semantics) ----------------------------------------------------------
    @_api()
    def CopyKvCache(self, src_cache: Cache, dst_cache: Cache, src_batch_index: int = 0, dst_batch_index: int = 0,
                    offset: int = 0, size: int = -1) -> LLMStatusCode:
        """Copy ``size`` bytes (-1: the rest of the slot) at ``offset`` of one slot into another, per tensor."""
        engine = self._engine()
        _check_type("src_cache", src_cache, Cache)
        _check_type("dst_cache", dst_cache, Cache)
        _require(_is_int(src_batch_index, 0, 2**32 - 1) and _is_int(dst_batch_index, 0, 2**32 - 1),
                 "batch indices must be uint32")
        _require(_is_int(offset, 0, _UINT64_MAX), f"invalid offset {offset!r}")
        _require(_is_int(size, -1, 2**63 - 1) and size != 0, f"size must be -1 or > 0, got {size!r}")
        engine.copy(rq.CopyCache(int(dst_cache.cache_id), int(src_cache.cache_id), int(dst_batch_index),
                                 int(src_batch_index), int(offset), int(size)))
        return S.LLM_SUCCESS

    @_api()
    def CopyKvBlocks(self, src_cache: Cache, dst_cache: Cache, src_blocks: Sequence[int],
                     dst_blocks_list: Sequence[Sequence[int]]) -> LLMStatusCode:
        """Copy block ``src_blocks[i]`` of ``src_cache`` to every block of ``dst_blocks_list[i]`` of ``dst_cache``."""
        engine = self._engine()
        _check_type("src_cache", src_cache, Cache)
        _check_type("dst_cache", dst_cache, Cache)
        s_blk = _check_ints("src_blocks", src_blocks)
        _require(isinstance(dst_blocks_list, (list, tuple)) and len(dst_blocks_list) == len(s_blk),
                 "dst_blocks_list must have one list per src block")
        pairs = [(s, d) for s, dsts in zip(s_blk, dst_blocks_list) for d in _check_ints("dst_blocks", dsts, True)]
        src, dst = engine.cache_info(int(src_cache.cache_id)), engine.cache_info(int(dst_cache.cache_id))
        _require(src.num_tensors == dst.num_tensors, f"num_tensors differ ({src.num_tensors}, {dst.num_tensors})")
        _require(src.stride == dst.stride, f"block sizes differ ({src.stride}, {dst.stride} bytes)")
        _require(all(s < src.dim0 and d < dst.dim0 for s, d in pairs), "block index out of range")
        if pairs:
            engine.copy(rq.CopyBlocks(int(src_cache.cache_id), int(dst_cache.cache_id), tuple(pairs)))
        return S.LLM_SUCCESS

    # -- caches ---------------------------------------------------------------------------------
    @_api(lambda: None)
    def AllocateCache(self, cache_desc: CacheDesc):
        """Allocate a kDevice cache from the OPTION_BUF_POOL_CFG pool; returns (status, Cache)."""
        engine = self._engine()
        spec = _spec(cache_desc)
        _require(spec.placement == CachePlacement.kDevice, "AllocateCache only supports kDevice")
        info = engine.allocate(rq.Allocate(spec))
        desc = CacheDesc(CachePlacement(spec.placement), spec.num_tensors, cache_desc.data_type, list(spec.shape))
        return S.LLM_SUCCESS, Cache(info.cache_id, list(info.tensor_addrs), desc)

    @_api()
    def DeallocateCache(self, cache_id: int) -> LLMStatusCode:
        """Free an allocated cache; an unknown or already freed id is a success."""
        engine = self._engine()
        _require(_is_int(cache_id, -2**63, 2**63 - 1), f"invalid cache_id {cache_id!r}")
        if engine.has_pool():
            engine.deallocate(int(cache_id))
        return S.LLM_SUCCESS

    @_api(lambda: -1)
    def RegisterKvCache(self, cache_desc: CacheDesc, addrs: Sequence[int], cfg: Optional[RegisterCfg] = None):
        """Register user memory as a remote-accessible MIX cache; returns (status, cache_id)."""
        engine = self._engine()
        _check_type("cache_desc", cache_desc, CacheDesc)
        _require(isinstance(addrs, (list, tuple)) and len(addrs) > 0, "addrs can not be empty")
        _require(len(addrs) == cache_desc.num_tensors, f"addrs size {len(addrs)} != num_tensors "
                 f"{cache_desc.num_tensors}")
        _require(all(_is_int(a, 1, _UINT64_MAX) for a in addrs), "addrs must be non-zero addresses")
        _require(cfg is None or isinstance(cfg, RegisterCfg), "cfg must be a RegisterCfg")
        info = engine.register(rq.Register(_spec(cache_desc), tuple(int(a) for a in addrs), (), None, True))
        return S.LLM_SUCCESS, info.cache_id

    @_api()
    def UnregisterKvCache(self, cache_id: int) -> LLMStatusCode:
        """Remove a registration; an unknown id is a success."""
        engine = self._engine()
        _require(_is_int(cache_id, -2**63, 2**63 - 1), f"invalid cache_id {cache_id!r}")
        engine.unregister(int(cache_id))
        return S.LLM_SUCCESS

    # Python-style aliases.
    initialize = Initialize
    finalize = Finalize
    set_role = SetRole
    link_llm_clusters = LinkLlmClusters
    unlink_llm_clusters = UnlinkLlmClusters
    pull_kv_cache = PullKvCache
    pull_kv_blocks = PullKvBlocks
    push_kv_cache = PushKvCache
    push_kv_blocks = PushKvBlocks
    copy_kv_cache = CopyKvCache
    copy_kv_blocks = CopyKvBlocks
    allocate_cache = AllocateCache
    deallocate_cache = DeallocateCache
    register_kv_cache = RegisterKvCache
    unregister_kv_cache = UnregisterKvCache
