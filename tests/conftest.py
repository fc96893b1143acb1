"""Shared fixtures: instances that are always finalized, numpy-backed caches, linked P/D pairs, a thread-leak check.

Optional subsystems (nixl, vLLM, network namespaces, torch) skip where they are missing, with the reason, unless
``LLM_DATADIST_REQUIRE`` names them: then their skips are failures (see ``subsystems.py``).

Instances made here run in this process (any number of instances per process) and link to each other over 127.0.0.1.
``Placement.DEVICE`` memory is host memory here (a "CPU device" without CUDA): numpy arrays back every cache.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from llm_datadist import (BlocksCacheKey, Cache, CacheDesc, CacheKey, DataType, LLMClusterInfo, LLMConfig,
                          LLMDataDist, LLMRole, LLMStatusCode, Placement)
import subsystems
from ports import free_port as free_port_below_ephemeral
from waiting import NEVER_HANGS_S, wait_until

#: Byte written into every destination before a transfer; any byte still equal to it was not written.
SENTINEL = 0xEE
#: A small pool (1 MiB, 1 KiB pages) for allocate_* tests.
POOL_BYTES = 1 << 20
POOL_CFG = f'{{"memory_size": {POOL_BYTES}, "page_shift": 10}}'
#: Cluster ids of the prompt (server) and decoder (client) of a pair.
P_ID, D_ID = 1, 2
#: Name prefixes of the library's threads ("llm-dd" in the engine; the transports name theirs differently).
LIB_THREAD_PREFIXES = ("llm-dd", "tcp-data", "pvm-copy")

_NP_DTYPES = {
    DataType.DT_UINT8: np.uint8, DataType.DT_INT8: np.int8, DataType.DT_INT16: np.int16,
    DataType.DT_UINT16: np.uint16, DataType.DT_INT32: np.int32, DataType.DT_UINT32: np.uint32,
    DataType.DT_INT64: np.int64, DataType.DT_UINT64: np.uint64, DataType.DT_FLOAT16: np.float16,
    DataType.DT_BF16: np.uint16, DataType.DT_FLOAT: np.float32, DataType.DT_DOUBLE: np.float64,
    DataType.DT_BOOL: np.bool_,
}


# ----------------------------------------------------------------------------------------------
# Required subsystems: their skips fail
# ----------------------------------------------------------------------------------------------
def pytest_configure(config):
    try:
        subsystems.required()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.addinivalue_line("markers", "torch: needs torch (.ci/run runs these with the Python of .venv-vllm)")


def pytest_report_header(config):
    names = ", ".join(sorted(subsystems.required())) or "none (their tests skip where they are missing)"
    return f"required subsystems ({subsystems.REQUIRE_ENV}): {names}"


def _fail_if_required(report, item: Any = None) -> None:
    """A skip tagged with a required subsystem becomes a failure that says how to get the subsystem; an optional
    one raised inside subsystems.py is reported at the test's own line."""
    if not report.skipped or hasattr(report, "wasxfail") or not isinstance(report.longrepr, tuple):
        return
    path, line, message = report.longrepr
    subsystem = subsystems.subsystem_of(str(message))
    if subsystem is None:
        return
    if subsystem in subsystems.required():
        report.outcome = "failed"
        report.longrepr = subsystems.failure(subsystem, str(message))
    elif item is not None and str(path).endswith("subsystems.py"):
        path, line = item.reportinfo()[:2]
        report.longrepr = (str(path), (line or 0) + 1, message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_required(outcome.get_result(), item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_required(outcome.get_result())


# ----------------------------------------------------------------------------------------------
# Threads: nothing may outlive a test module
# ----------------------------------------------------------------------------------------------
def _leaked(before: set) -> List[threading.Thread]:
    return [t for t in threading.enumerate()
            if t not in before and t.is_alive() and (not t.daemon or t.name.startswith(LIB_THREAD_PREFIXES))]


class _Reaper:
    """Finalizes instances in background threads (finalize waits for the library's threads, ~0.5 s).

    Tests hand their instances over at teardown and go on; the module-end check joins every finalize and
    re-raises the first failure, so nothing is left running and no failure is lost.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._errors: List[BaseException] = []
        self._memory: List[Any] = []

    def _run(self, dd: LLMDataDist) -> None:
        try:
            dd.finalize()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            with self._lock:
                self._errors.append(exc)

    def submit(self, instances: Sequence[LLMDataDist]) -> None:
        for dd in instances:
            thread = threading.Thread(target=self._run, args=(dd,), name="test-finalize")
            thread.start()
            with self._lock:
                self._threads.append(thread)

    def keep(self, memory: Any) -> None:
        """Keep buffers alive until every instance that may know their addresses is finalized."""
        with self._lock:
            self._memory.append(memory)

    def join(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(30.0)
        with self._lock:
            errors, self._errors = self._errors, []
            if not self._threads:
                self._memory = []
        if errors:
            raise errors[0]


REAPER = _Reaper()


@pytest.fixture(autouse=True, scope="module")
def _no_leaked_threads():
    """After each module: every instance finalized without error, and no new non-daemon thread and no
    library thread ("llm-dd…", "tcp-data…", "pvm-copy") still running."""
    before = set(threading.enumerate())
    yield
    REAPER.join()
    wait_until(lambda: not _leaked(before))  # closing threads get a generous deadline to finish
    leaked = _leaked(before)
    assert not leaked, f"threads leaked by this module: {[(t.name, t.daemon) for t in leaked]}"


# ----------------------------------------------------------------------------------------------
# Instances
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def free_port() -> Callable[[], int]:
    return free_port_below_ephemeral


def make_options(**attrs: Any) -> Dict[str, str]:
    """``LLMConfig`` options: cache-manager mode and device 0 unless overridden; ``None`` leaves a field unset."""
    config = LLMConfig()
    settings: Dict[str, Any] = {"enable_cache_manager": True, "device_id": 0}
    settings.update(attrs)
    for name, value in settings.items():
        if value is not None:
            setattr(config, name, value)
    return dict(config.generate_options())


def cluster_info(remote_cluster_id: Optional[int], port: int, ip: str = "127.0.0.1",
                 local_ip: Optional[str] = "127.0.0.1") -> LLMClusterInfo:
    """An LLMClusterInfo for a server at ip:port; ``None`` leaves the remote id or the local ip unset."""
    info = LLMClusterInfo()
    if remote_cluster_id is not None:
        info.remote_cluster_id = remote_cluster_id
    if local_ip is not None:
        info.append_local_ip_info(local_ip, 0)
    info.append_remote_ip_info(ip, port)
    return info


class DDFactory:
    """``make_dd(role, cluster_id, listen=False, init=True, **config_attrs)``; every instance is finalized."""

    def __init__(self) -> None:
        self.made: List[LLMDataDist] = []
        self._ports: Dict[int, int] = {}

    def __call__(self, role: LLMRole = LLMRole.PROMPT, cluster_id: int = P_ID, *, listen: bool = False,
                 init: bool = True, **attrs: Any) -> LLMDataDist:
        dd = LLMDataDist(role, cluster_id)
        self.made.append(dd)
        if listen:
            port = free_port_below_ephemeral()
            attrs["listen_ip_info"] = f"127.0.0.1:{port}"
            self._ports[id(dd)] = port
        if init:
            dd.init(make_options(**attrs))
        return dd

    def port(self, dd: LLMDataDist) -> int:
        """The listen port chosen for ``dd`` (made with ``listen=True``)."""
        return self._ports[id(dd)]

    def close(self) -> None:
        """Hand every instance to the reaper (finalized in the background, joined at module end)."""
        REAPER.submit(self.made)
        self.made = []


@pytest.fixture
def make_dd():
    factory = DDFactory()
    yield factory
    factory.close()


# ----------------------------------------------------------------------------------------------
# Linked pairs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pair:
    """P (PROMPT, listening server) and D (DECODER, client) linked by ``D.link_clusters``; both have pools."""

    p: LLMDataDist
    d: LLMDataDist
    port: int
    ra: bool

    @property
    def p_cm(self):
        return self.p.cache_manager

    @property
    def d_cm(self):
        return self.d.cache_manager

    def info(self) -> LLMClusterInfo:
        """The cluster info D links P with."""
        return cluster_info(self.p.cluster_id, self.port)

    def link(self) -> None:
        """Link D -> P, then wait until P holds its side too (its side may lag behind D's)."""
        ret, rets = self.d.link_clusters([self.info()], 3000)
        assert (ret, rets) == (LLMStatusCode.LLM_SUCCESS, [LLMStatusCode.LLM_SUCCESS])
        assert wait_until(self.linked, NEVER_HANGS_S, interval_s=0.002)

    def linked(self) -> bool:
        """Whether both sides hold the link (reads engine state: a test-only probe)."""
        try:
            self.d._engine.links.get(self.p.cluster_id)
            self.p._engine.links.get(self.d.cluster_id)
        except Exception:  # noqa: BLE001 - any failure means "not linked"
            return False
        return True


@pytest.fixture
def make_pair(make_dd):
    """``make_pair(ra=False, **config_attrs)``: P and D with 1 MiB device and host pools, linked D -> P.

    A pair is cheap (a few ms); its finalize runs in the background after the test.
    """

    def factory(ra: bool = False, **attrs: Any) -> Pair:
        common: Dict[str, Any] = {"mem_pool_cfg": POOL_CFG, "host_mem_pool_cfg": POOL_CFG}
        if ra:
            common["enable_remote_cache_accessible"] = True
        common.update(attrs)
        p = make_dd(LLMRole.PROMPT, P_ID, listen=True, **common)
        d = make_dd(LLMRole.DECODER, D_ID, **common)
        pair = Pair(p, d, make_dd.port(p), ra)
        pair.link()
        return pair

    return factory


@pytest.fixture
def pd(make_pair) -> Pair:
    """A fresh linked pair in normal mode."""
    return make_pair(ra=False)


@pytest.fixture
def pd_ra(make_pair) -> Pair:
    """A fresh linked pair in remote-cache-accessible mode."""
    return make_pair(ra=True)


# ----------------------------------------------------------------------------------------------
# Numpy-backed caches
# ----------------------------------------------------------------------------------------------
class CacheFactory:
    """``new_cache(cm, num_tensors, shape, ...) -> (cache, arrays)``: registers numpy memory.

    Args of the call:
        cm: the CacheManager to register with.
        num_tensors, shape, dtype, placement: the CacheDesc.
        blocks: register_blocks_cache instead of register_cache.
        keys: CacheKeys for register_cache; blocks_key: BlocksCacheKey for register_blocks_cache.
        remote_accessible: passed through (None: the default).
        fill: "random" (a fresh deterministic pattern), "sentinel" (SENTINEL bytes), or an int byte value.

    The arrays stay alive until the module's instances are all finalized (nothing is unregistered at teardown:
    that could race with a background finalize).
    """

    def __init__(self) -> None:
        self._keep: List[List[np.ndarray]] = []
        self._seed = 1000

    def arrays(self, num_tensors: int, shape: Sequence[int], dtype: DataType = DataType.DT_UINT8,
               fill: Any = "random") -> List[np.ndarray]:
        arrays = [np.empty(tuple(shape), dtype=_NP_DTYPES[dtype]) for _ in range(num_tensors)]
        for array in arrays:
            raw = array.view(np.uint8).reshape(-1)
            if isinstance(fill, str) and fill == "random":
                self._seed += 1
                raw[:] = np.random.default_rng(self._seed).integers(0, 256, raw.size, dtype=np.uint8)
                raw[raw == SENTINEL] = 0x11  # random data never looks like "untouched"
            elif isinstance(fill, str) and fill == "sentinel":
                raw[:] = SENTINEL
            else:
                raw[:] = int(fill)
        self._keep.append(arrays)
        return arrays

    def __call__(self, cm, num_tensors: int = 2, shape: Sequence[int] = (4, 16), *,
                 dtype: DataType = DataType.DT_UINT8, placement: Placement = Placement.HOST, blocks: bool = False,
                 keys: Sequence[CacheKey] = (), blocks_key: Optional[BlocksCacheKey] = None,
                 remote_accessible: Optional[bool] = None, fill: Any = "random") -> Tuple[Cache, List[np.ndarray]]:
        arrays = self.arrays(num_tensors, shape, dtype, fill)
        desc = CacheDesc(num_tensors, list(shape), dtype, placement)
        addrs = [int(a.ctypes.data) for a in arrays]
        if blocks:
            cache = cm.register_blocks_cache(desc, addrs, blocks_key, remote_accessible)
        else:
            cache = cm.register_cache(desc, addrs, list(keys), remote_accessible)
        return cache, arrays

    def close(self) -> None:
        REAPER.keep(self._keep)
        self._keep = []


@pytest.fixture
def new_cache():
    factory = CacheFactory()
    yield factory
    factory.close()


def rows(array: np.ndarray) -> np.ndarray:
    """The bytes of a tensor as rows: row i = batch slot or block i (dim 0)."""
    return array.view(np.uint8).reshape(array.shape[0], -1)


def mem_view(addr: int, nbytes: int) -> np.ndarray:
    """A writable uint8 view of raw memory (e.g. pool-allocated tensors)."""
    import ctypes

    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(addr))


@pytest.fixture
def tools():
    """Small helpers for test bodies (kept here so every test file shares one definition)."""
    return _Tools


class _Tools:
    SENTINEL = SENTINEL
    POOL_CFG = POOL_CFG
    POOL_BYTES = POOL_BYTES
    P_ID = P_ID
    D_ID = D_ID
    rows = staticmethod(rows)
    mem_view = staticmethod(mem_view)
    cluster_info = staticmethod(cluster_info)
    make_options = staticmethod(make_options)
