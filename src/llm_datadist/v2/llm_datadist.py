"""LLMDataDist: instance lifecycle, one-sided and rank-table links, role switching."""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple  # noqa: F401

from llm_datadist._engine import api
from llm_datadist._engine.api import ErrorBoundary
from llm_datadist import metrics
from llm_datadist.configs import LLMClusterInfo, LLMRole, int_to_ip
from llm_datadist.status import LLMException, LLMStatusCode
from llm_datadist.utils.utils import (check_int32, check_isinstance, check_uint32, check_uint64, raise_if_false,
                                      raise_if_true)
from llm_datadist.v2 import config as cfg
from llm_datadist.v2.llm_types import RegisterMemStatus

if TYPE_CHECKING:
    from llm_datadist.v2.cache_manager import CacheManager

__all__ = ["LLMDataDist"]

_log = logging.getLogger(__name__)
_LIVE: weakref.WeakSet[LLMDataDist] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
_NOT_INITIALIZED = "llm datadist is not initialized"


class LLMDataDist:
    """One LLM-DataDist instance (several may live in one process, each fully independent)."""

    def __init__(self, role: LLMRole, cluster_id: int) -> None:
        check_isinstance("role", role, LLMRole)
        check_uint64("cluster_id", cluster_id)
        self._role = role
        self._cluster_id = cluster_id
        self._engine: Optional[api.EngineApi] = None
        self._cache_manager: Optional[CacheManager] = None
        self._cm_mode = False
        self._options: Dict[str, str] = {}
        self._lock = threading.RLock()

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def role(self) -> LLMRole:
        return self._role

    def _require_engine(self) -> api.EngineApi:
        engine = self._engine
        if engine is None:
            raise RuntimeError(_NOT_INITIALIZED)
        return engine

    # -- lifecycle ------------------------------------------------------------------------------
    def init(self, options: Dict[str, str]) -> None:
        """Initialize the instance from the options of ``LLMConfig.generate_options()``.

        Raises:
            TypeError: ``options`` is not a dict.
            LLMException: invalid option values (LLM_PARAM_INVALID), an unavailable transfer backend
                (LLM_FEATURE_NOT_ENABLED) or a listen address that can not be bound.
        """
        with self._lock:
            if self._engine is not None:
                return
            check_isinstance("options", options, dict, allow_none=False)
            cfg.check_flow_graph_mem(options)
            opts = cfg.parse_options(options, self._role, self._cluster_id)
            metrics_port = metrics.requested_port(options)  # LLMConfig.metrics_port or LLM_DATADIST_METRICS_PORT
            with ErrorBoundary("init"):
                engine = api.open_engine(opts)
            self._options = cfg.complete_options(options, self._role)
            self._cm_mode = opts.cache_manager_mode
            self._engine = engine
            if self._cm_mode:
                from llm_datadist.v2.cache_manager import CacheManager

                self._cache_manager = CacheManager(self, engine)
            with _LIVE_LOCK:
                _LIVE.add(self)
            metrics.instance_up(metrics_port)  # the process's first such init starts /metrics (never raises)
            _log.info("LLMDataDist cluster %d initialized (role %s)", self._cluster_id, self._role)

    def finalize(self) -> None:
        """Unlink everything, release registrations and pools, stop threads. Idempotent."""
        with self._lock:
            engine, self._engine = self._engine, None
            if engine is None:
                return
            if self._cache_manager is not None:
                self._cache_manager._finalize()
            self._cache_manager = None
            with _LIVE_LOCK:
                _LIVE.discard(self)
            try:
                with ErrorBoundary("finalize"):
                    engine.close()
            finally:
                metrics.instance_down()  # the process's last instance stops the metrics endpoint

    @property
    def cache_manager(self):
        """The CacheManager of this instance (CacheManager mode only)."""
        self._require_engine()
        raise_if_false(self._cm_mode, "cache_manager is not supported when llm.EnableCacheManager is not configured: "
                       "{}.", cfg.ENABLE_CACHE_MANAGER_HINT)
        return self._cache_manager

    @property
    def kv_cache_manager(self):
        """Legacy V1 KvCacheManager: not available (needs the absent llm_datadist_v1 package)."""
        self._require_engine()
        raise_if_true(self._cm_mode, "kv_cache_manager is not supported when llm.EnableCacheManager is configured.")
        raise LLMException("kv_cache_manager needs the V1 package llm_datadist_v1, which is not available; "
                           f"{cfg.ENABLE_CACHE_MANAGER_HINT} and use the cache_manager",
                           status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)

    def check_link_status(self, remote_cluster_id: int) -> None:
        """Legacy mode only: raise LLMException(LLM_NOT_YET_LINK) if the cluster is not linked."""
        engine = self._require_engine()
        raise_if_true(self._cm_mode, "check_link_status is not supported when llm.EnableCacheManager is configured.")
        check_uint64("remote_cluster_id", remote_cluster_id)
        with ErrorBoundary("check_link_status"):
            engine.check_linked(remote_cluster_id)

    # -- one-sided links ------------------------------------------------------------------------
    def _cluster_args(self, clusters, timeout: int, for_link: bool):
        check_int32("timeout", timeout)
        raise_if_false(timeout > 0, "timeout must be > 0, but got {}", timeout)
        check_isinstance("clusters", clusters, (list, tuple), LLMClusterInfo, allow_none=False)
        parsed = []
        for cluster in clusters:
            cluster_id = cluster.remote_cluster_id
            if not for_link or cluster_id is not None:
                check_uint64("remote_cluster_id", cluster_id)
            parsed.append((cluster_id, [(int_to_ip(ip), port) for ip, port in cluster.remote_ip_info_list]))
        return api.requests.peers(parsed)

    def link_clusters(self, clusters, timeout: int = 3000) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        """Link to listening peers (client side). Failures are returned as codes, never raised.

        A cluster may omit ``remote_cluster_id`` and the local ip: the peer's id is learned
        from the handshake and the local address from the socket.
        """
        engine = self._require_engine()
        peers = self._cluster_args(clusters, timeout, for_link=True)
        return engine.link_clusters(api.requests.LinkClusters(peers, timeout / 1000.0))

    def unlink_clusters(self, clusters, timeout: int = 3000, force: bool = False):
        """Unlink peers: tell the server (normal) or drop only the local side (``force``)."""
        engine = self._require_engine()
        check_isinstance("force", force, bool, allow_none=False)
        peers = self._cluster_args(clusters, timeout, for_link=False)
        return engine.unlink_clusters(api.requests.UnlinkClusters(peers, timeout / 1000.0, force))

    def switch_role(self, role: LLMRole, switch_options: Optional[Dict[str, str]] = None) -> None:
        """Change the role label and start, move or stop listening; no link may exist."""
        engine = self._require_engine()
        check_isinstance("role", role, LLMRole, allow_none=False)
        check_isinstance("switch_options", switch_options, dict)
        options = dict(switch_options or {})
        if not self._cm_mode:
            raise_if_true(role == self._role, "role is already {}", role)
            raise_if_true(role == LLMRole.PROMPT and cfg.OPT_LISTEN_IP_INFO not in options,
                          "switching to PROMPT needs llm.listenIpInfo")
        listen = cfg.parse_listen_ip_info(options[cfg.OPT_LISTEN_IP_INFO]) if cfg.OPT_LISTEN_IP_INFO in options \
            else None
        with ErrorBoundary("switch_role"):
            engine.set_role(int(role), listen)
        self._role = role

    # -- rank-table (two-sided) links -----------------------------------------------------------
    def link(self, comm_name: str, cluster_rank_info: Dict[int, int], rank_table: str) -> int:
        """Join a comm domain; returns a comm_id at once, poll query_register_mem_status until OK."""
        engine = self._require_engine()
        raise_if_false(self._cm_mode, "link is not supported when llm.EnableCacheManager is not configured: {}.",
                       cfg.ENABLE_CACHE_MANAGER_HINT)
        check_isinstance("comm_name", comm_name, str, allow_none=False)
        raise_if_false(0 < len(comm_name) < 128, "comm_name length must be in [1, 127], but got {}", len(comm_name))
        check_isinstance("cluster_rank_info", cluster_rank_info, dict, allow_none=False)
        for key, value in cluster_rank_info.items():
            check_isinstance("cluster_rank_info key", key, int, allow_none=False)
            check_isinstance("cluster_rank_info value", value, int, allow_none=False)
        raise_if_true(len(cluster_rank_info) > 4, "cluster num must not be bigger than 4")
        for key, value in cluster_rank_info.items():
            check_uint64("cluster id", key)
            check_uint32("rank", value)
        raise_if_false(len(cluster_rank_info) > 1, "cluster num must be bigger than 1")
        ranks = list(cluster_rank_info.values())
        raise_if_false(all(a <= b for a, b in zip(ranks, ranks[1:])), "rank in cluster_rank_info must be ordered")
        check_isinstance("rank_table", rank_table, str)
        with ErrorBoundary("link"):
            comm_id = engine.comm_link(comm_name, dict(cluster_rank_info), rank_table)
        if self._cache_manager is not None:
            self._cache_manager._set_is_call_linked()
        return comm_id

    def _check_comm_id(self, comm_id: int) -> api.EngineApi:
        engine = self._require_engine()
        raise_if_false(self._cm_mode, "comm links are not supported when llm.EnableCacheManager is not configured: "
                       "{}.", cfg.ENABLE_CACHE_MANAGER_HINT)
        check_isinstance("comm_id", comm_id, int, allow_none=False)
        check_uint64("comm_id", comm_id)
        return engine

    def unlink(self, comm_id: int) -> None:
        """Leave a comm domain: stop its preparation and drop its links."""
        engine = self._check_comm_id(comm_id)
        with ErrorBoundary("unlink"):
            engine.comm_unlink(comm_id)

    def query_register_mem_status(self, comm_id: int) -> RegisterMemStatus:
        """PREPARING while the domain links, then OK, or FAILED after the link timeout."""
        engine = self._check_comm_id(comm_id)
        with ErrorBoundary("query_register_mem_status"):
            status = engine.comm_status(comm_id)
        try:
            return RegisterMemStatus(status)
        except ValueError:
            return RegisterMemStatus.FAILED


def _finalize_all_at_exit() -> None:
    with _LIVE_LOCK:
        instances = list(_LIVE)
    for instance in instances:
        try:
            instance.finalize()
        except LLMException as exc:
            _log.warning("finalize at exit failed: %s", exc)
        except Exception as exc:  # noqa: BLE001 - exit must go on
            _log.warning("finalize at exit failed: %s", exc)


atexit.register(_finalize_all_at_exit)
