"""Layer-wise asynchronous pushes (transfer_cache_async): one daemon worker thread per task, and their registry."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from llm_datadist._engine import protocol as proto
from llm_datadist._engine.errors import CacheNotExist, EngineError, Finalized, ParamInvalid
from llm_datadist._engine.link import check_view_accessible
from llm_datadist._engine.types import SourceSpec
from llm_datadist._transport.base import CopyPlan, RemoteRejected, TransportError
from llm_datadist.status import LLMStatusCode

__all__ = ["ConfigJob", "TaskJob", "LayerTask", "start_task", "cancel_tasks", "running_tasks"]

_log = logging.getLogger(__name__)

TENSORS_PER_LAYER = 2  # transfer_cache_async always moves K and V of a layer (API-SPEC §9.14)
CANCEL_JOIN_S = 2.0  # how long finalize waits, in total, for running tasks to notice the cancellation
_U64 = np.uint64


@dataclasses.dataclass(frozen=True)
class ConfigJob:
    """One destination of a task. Raw mode: ``dst_addrs`` (2 per layer); key mode: ``dest`` + ``dst_layers``."""

    dst_cluster_id: int
    src_layers: range
    src_batch_index: int = 0
    dst_addrs: Tuple[int, ...] = ()
    dest: Optional[SourceSpec] = None
    dst_layers: Optional[range] = None


@dataclasses.dataclass(frozen=True)
class TaskJob:
    """Everything the worker needs, validated by the facade.

    ``dst_block_size`` is ``dst_block_memory_size`` (0 when not given). ``timeout_s`` bounds each
    (layer, destination) transfer, table lookups included.
    """

    src_cache_id: int
    configs: Tuple[ConfigJob, ...]
    synchronizer: Any
    src_blocks: Tuple[int, ...] = ()
    dst_blocks: Tuple[int, ...] = ()
    dst_block_size: int = 0
    timeout_s: float = 1.0

    def layers(self) -> List[int]:
        """Every source layer some destination needs, ascending."""
        return sorted({layer for cfg in self.configs for layer in cfg.src_layers})


# ---- planning (vectorised; ``local`` = source side, ``remote`` = destination side) ----------------
def _src_bases(src, layer: int) -> np.ndarray:
    first = layer * TENSORS_PER_LAYER
    if first + TENSORS_PER_LAYER > src.num_tensors:
        raise ParamInvalid(f"layer {layer} is outside the {src.num_tensors // TENSORS_PER_LAYER} layers of "
                           f"cache {src.cache_id}")
    return np.asarray(src.tensor_addrs[first:first + TENSORS_PER_LAYER], dtype=_U64)


def _blocks(values: Sequence[int], limit: int, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=_U64)
    if arr.size and int(arr.max()) >= limit:
        raise ParamInvalid(f"{what} index {int(arr.max())} out of range, the cache has {limit}")
    return arr


def _slot_base(src, layer: int, batch_index: int) -> np.ndarray:
    """Source addresses of one batch slot; a blocks source without src_block_indices is read as slot 0,
    i.e. its block 0 (D28, as the official library)."""
    if batch_index >= src.dim0:
        raise ParamInvalid(f"src_batch_index {batch_index} >= batch size {src.dim0} of cache {src.cache_id}")
    return _src_bases(src, layer) + _U64(batch_index * src.stride)


def slot_plan(src, layer: int, batch_index: int, dst_bases: np.ndarray) -> CopyPlan:
    """Continuous to continuous: one source slot (one stride) per tensor to ``dst_bases``."""
    s = _slot_base(src, layer, batch_index)
    return CopyPlan(s, dst_bases, np.full(s.shape, src.stride, dtype=_U64)).merged()


def chunk_plan(src, layer: int, batch_index: int, dst_bases: np.ndarray, dst_blocks: Sequence[int],
               chunk: int, dst_limit: int) -> CopyPlan:
    """Continuous to blocks: the source slot cut into ``chunk``-byte pieces, piece j -> block ``dst_blocks[j]``."""
    if chunk <= 0:
        raise ParamInvalid("dst_block_memory_size must be > 0 for a continuous source with dst_block_indices")
    d_blk = _blocks(dst_blocks, dst_limit, "destination block")
    pieces = -(-src.stride // chunk)
    if d_blk.size > pieces:
        raise ParamInvalid(f"{d_blk.size} destination blocks of {chunk} bytes exceed the source slot of "
                           f"{src.stride} bytes ({pieces} pieces)")
    offsets = np.arange(d_blk.size, dtype=_U64) * _U64(chunk)
    sizes = np.minimum(_U64(chunk), _U64(src.stride) - offsets)
    s = np.add.outer(_slot_base(src, layer, batch_index), offsets).ravel()
    d = np.add.outer(dst_bases, d_blk * _U64(chunk)).ravel()
    return CopyPlan(s, d, np.tile(sizes, dst_bases.size)).merged()


def block_plan(src, layer: int, src_blocks: Sequence[int], dst_bases: np.ndarray, dst_blocks: Sequence[int],
               dst_limit: int) -> CopyPlan:
    """Blocks to blocks: ``src_blocks[j]`` -> ``dst_blocks[j]``, block size = the source block size."""
    if not (src.is_blocks or src.is_mix):
        raise ParamInvalid(f"cache {src.cache_id} is not a blocks cache; src_block_indices need one")
    s_blk = _blocks(src_blocks, src.dim0, "source block")
    d_blk = _blocks(dst_blocks, dst_limit, "destination block")
    if s_blk.size != d_blk.size or s_blk.size == 0:
        raise ParamInvalid(f"src_block_indices ({s_blk.size}) and dst_block_indices ({d_blk.size}) must be "
                           f"non-empty and of equal length")
    bs = _U64(src.stride)
    s = np.add.outer(_src_bases(src, layer), s_blk * bs).ravel()
    d = np.add.outer(dst_bases, d_blk * bs).ravel()
    return CopyPlan(s, d, np.full(s.shape, bs, dtype=_U64)).merged()


def _raw_plan(job: TaskJob, src, cfg: ConfigJob, layer: int) -> CopyPlan:
    k = layer - cfg.src_layers.start
    bases = np.asarray(cfg.dst_addrs[TENSORS_PER_LAYER * k:TENSORS_PER_LAYER * (k + 1)], dtype=_U64)
    if bases.size != TENSORS_PER_LAYER:
        raise ParamInvalid(f"dst_addrs has no address for layer {layer}")
    unlimited = 1 << 63
    if job.src_blocks:
        if job.dst_block_size and job.dst_block_size != src.stride:
            raise ParamInvalid(f"dst_block_memory_size {job.dst_block_size} differs from the source block size "
                               f"{src.stride}")
        return block_plan(src, layer, job.src_blocks, bases, job.dst_blocks, unlimited)
    if job.dst_blocks:
        return chunk_plan(src, layer, cfg.src_batch_index, bases, job.dst_blocks, job.dst_block_size, unlimited)
    return slot_plan(src, layer, cfg.src_batch_index, bases)


def _key_plan(job: TaskJob, src, cfg: ConfigJob, layer: int, view: proto.CacheView) -> CopyPlan:
    """Key mode: the destination geometry comes from the peer's cache table (D18 layer mapping)."""
    check_view_accessible(view, "destination")
    dst_layer = cfg.dst_layers[layer - cfg.src_layers.start]
    first = dst_layer * TENSORS_PER_LAYER
    if first + TENSORS_PER_LAYER > view.num_tensors:
        raise ParamInvalid(f"dst layer {dst_layer} is outside the {view.num_tensors // TENSORS_PER_LAYER} layers "
                           f"of remote cache {view.cache_id}")
    bases = np.asarray(view.tensor_addrs[first:first + TENSORS_PER_LAYER], dtype=_U64)
    if job.src_blocks or job.dst_blocks:
        if not view.is_blocks:
            raise ParamInvalid(f"remote cache {view.cache_id} is not a blocks cache, block indices can not be used")
        if job.dst_block_size and job.dst_block_size != view.stride:
            raise ParamInvalid(f"dst_block_memory_size {job.dst_block_size} differs from the block size "
                               f"{view.stride} of remote cache {view.cache_id}")
        if job.src_blocks:
            if src.stride != view.stride:
                raise ParamInvalid(f"block size differs: source {src.stride} bytes, remote {view.stride} bytes")
            return block_plan(src, layer, job.src_blocks, bases, job.dst_blocks, view.dim0)
        return chunk_plan(src, layer, cfg.src_batch_index, bases, job.dst_blocks, view.stride, view.dim0)
    if view.is_blocks and not src.is_blocks:
        raise ParamInvalid(f"remote cache {view.cache_id} is a blocks cache; dst_block_indices are needed")
    if src.stride > view.stride:
        raise ParamInvalid(f"source slot of {src.stride} bytes exceeds the remote slot of {view.stride} bytes")
    slot = 0 if view.is_blocks else view.slot  # blocks to blocks without indices: block 0 to block 0 (D28)
    return slot_plan(src, layer, cfg.src_batch_index, bases + _U64(slot * view.stride))


# ---- D24: raw destination ranges must lie inside the peer's accessible caches ---------------------
def accessible_ranges(table: proto.Table) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted, merged [start, end) ranges of every remote-accessible (or pool-owned) tensor of a peer table."""
    starts: List[int] = []
    ends: List[int] = []
    for view in table.caches:
        if view.remote_accessible or view.owned:
            starts.extend(int(a) for a in view.tensor_addrs)
            ends.extend(int(a) + int(view.tensor_nbytes) for a in view.tensor_addrs)
    if not starts:
        return np.zeros(0, dtype=_U64), np.zeros(0, dtype=_U64)
    order = np.argsort(np.asarray(starts, dtype=_U64), kind="stable")
    s = np.asarray(starts, dtype=_U64)[order]
    e = np.asarray(ends, dtype=_U64)[order]
    reach = np.maximum.accumulate(e)
    heads = np.flatnonzero(np.concatenate(([True], s[1:] > reach[:-1])))
    return s[heads], np.maximum.reduceat(e, heads)


def inside(plan: CopyPlan, ranges: Tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether every destination op ``[remote, remote + size)`` lies inside one of the merged ranges."""
    starts, ends = ranges
    if len(plan) == 0:
        return True
    if starts.size == 0:
        return False
    idx = np.searchsorted(starts, plan.remote, side="right").astype(np.int64) - 1
    ok = idx >= 0
    limit = ends[np.clip(idx, 0, None)]
    return bool(np.all(ok & (plan.remote + plan.sizes <= limit)))


# ---- the task ---------------------------------------------------------------------------------
class LayerTask:
    """A running transfer_cache_async; the CacheTask's waiter (``join``/``results``)."""

    def __init__(self, engine, job: TaskJob) -> None:
        self._engine = engine
        self._job = job
        self._results: List[Optional[LLMStatusCode]] = [None] * len(job.configs)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._ranges: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._thread = threading.Thread(target=self._run, name=f"llm-dd-layers-{job.src_cache_id}", daemon=True)

    # waiter interface -----------------------------------------------------------------------
    def join(self, timeout_s: Optional[float]) -> bool:
        """Wait until the task finished (``None``: no limit); True once it has."""
        return self._done.wait(timeout_s)

    def results(self) -> List[Optional[LLMStatusCode]]:
        """One status per config, in order; None for a config none of whose layers ran to its end."""
        with self._lock:
            return list(self._results)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop before the next layer (finalize); results of unfinished configs stay unset."""
        self._cancel.set()

    # worker ---------------------------------------------------------------------------------
    def _set(self, index: int, code: LLMStatusCode) -> None:
        with self._lock:
            self._results[index] = LLMStatusCode(code)

    def _run(self) -> None:
        try:
            self._run_layers()
        except BaseException:  # noqa: BLE001 - nothing may be lost in a worker thread
            _log.exception("transfer_cache_async of cache %d failed unexpectedly", self._job.src_cache_id)
            with self._lock:
                self._results = [LLMStatusCode.LLM_FAILED if r is None else r for r in self._results]
        finally:
            _forget(self._engine, self)
            self._done.set()

    def _run_layers(self) -> None:
        job = self._job
        try:
            src = self._engine.registry.pin(job.src_cache_id)
        except EngineError as exc:
            _log.error("transfer_cache_async: %s", exc)
            for index in range(len(job.configs)):
                self._set(index, exc.code)
            return
        try:
            for layer in job.layers():
                if self._cancel.is_set():
                    _log.warning("transfer_cache_async of cache %d cancelled before layer %d (finalize)",
                                 job.src_cache_id, layer)
                    return
                needing = [i for i, cfg in enumerate(job.configs) if layer in cfg.src_layers]
                if not self._synchronize(layer, needing):
                    return
                for index in needing:
                    code = self._send_logged(src, index, layer)
                    if code != LLMStatusCode.LLM_SUCCESS:
                        self._set(index, code)
                        return
                    if layer == job.configs[index].src_layers[-1]:
                        self._set(index, LLMStatusCode.LLM_SUCCESS)
        finally:
            self._engine.registry.unpin(src)

    def _synchronize(self, layer: int, needing: List[int]) -> bool:
        try:
            ready = self._job.synchronizer.synchronize_layer(layer, None)
        except Exception:  # noqa: BLE001 - a user callback failure stops the task, never the thread silently
            _log.exception("synchronize_layer(%d) raised; the task stops", layer)
            ready = False
        if ready:
            return True
        _log.error("synchronize_layer(%d) reported failure; the task stops", layer)
        for index in needing:
            self._set(index, LLMStatusCode.LLM_PARAM_INVALID)
        return False

    def _send_logged(self, src, index: int, layer: int) -> LLMStatusCode:
        cfg = self._job.configs[index]
        try:
            self._send(src, cfg, layer)
            return LLMStatusCode.LLM_SUCCESS
        except (EngineError, TransportError) as exc:
            code = LLMStatusCode(exc.code)
            _log.error("transfer_cache_async layer %d to cluster %d failed (%s): %s", layer, cfg.dst_cluster_id,
                       code, exc)
            return code
        except Exception:  # noqa: BLE001 - recorded as LLM_FAILED, never lost
            _log.exception("transfer_cache_async layer %d to cluster %d failed", layer, cfg.dst_cluster_id)
            return LLMStatusCode.LLM_FAILED

    def _send(self, src, cfg: ConfigJob, layer: int) -> None:
        deadline = time.monotonic() + self._job.timeout_s
        if src.released:
            raise CacheNotExist(f"cache {src.cache_id} was released during the transfer")
        engine = self._engine
        if engine.closed:
            raise Finalized("the instance was finalized during the transfer")
        link = engine.link_for_transfer(cfg.dst_cluster_id)
        if cfg.dest is not None:
            if engine.opts.remote_cache_accessible and not (src.remote_accessible or src.owned):
                raise ParamInvalid(f"local cache {src.cache_id} is not remote accessible")
            plan = self._write_key(link, src, cfg, layer, deadline)
        else:
            plan = _raw_plan(self._job, src, cfg, layer)
            self._check_raw(link, plan, deadline)
            link.write(plan, deadline)
        _log.debug("layer %d of cache %d -> cluster %d: %d ops, %d bytes", layer, src.cache_id,
                   cfg.dst_cluster_id, len(plan), plan.total_bytes)

    def _write_key(self, link, src, cfg: ConfigJob, layer: int, deadline: float) -> CopyPlan:
        """Key mode: resolve from the peer's table snapshot; a rejected write refreshes it and retries once (D13)."""
        view = link.resolve_from_table(cfg.dest, deadline)
        plan = _key_plan(self._job, src, cfg, layer, view)
        try:
            link.write(plan, deadline)
            return plan
        except RemoteRejected:
            link.invalidate_table()
            fresh = link.resolve_from_table(cfg.dest, deadline)
            if fresh.cache_id == view.cache_id and list(fresh.tensor_addrs) == list(view.tensor_addrs):
                raise
        plan = _key_plan(self._job, src, cfg, layer, fresh)
        link.write(plan, deadline)
        return plan

    def _check_raw(self, link, plan: CopyPlan, deadline: float) -> None:
        """D24: raw addresses are written only inside the peer's accessible caches (table cached, refreshed once)."""
        cluster = link.cluster_id
        ranges = self._ranges.get(cluster)
        if ranges is not None and inside(plan, ranges):
            return
        ranges = accessible_ranges(link.call(proto.TableRequest(), deadline))
        self._ranges[cluster] = ranges
        if not inside(plan, ranges):
            raise ParamInvalid(f"a destination address range is not inside any remote accessible cache of "
                               f"cluster {cluster}")


# ---- registry of running tasks (finalize cancels and joins them) ------------------------------
_RUNNING: Dict[int, Set[LayerTask]] = {}
_RUNNING_LOCK = threading.Lock()


def start_task(engine, job: TaskJob) -> LayerTask:
    """Start the worker of a validated job and return it."""
    if engine.closed:
        raise Finalized("the instance is finalized")
    task = LayerTask(engine, job)
    with _RUNNING_LOCK:
        _RUNNING.setdefault(id(engine), set()).add(task)
    try:
        task._thread.start()
    except BaseException:
        _forget(engine, task)
        raise
    return task


def _forget(engine, task: LayerTask) -> None:
    with _RUNNING_LOCK:
        tasks = _RUNNING.get(id(engine))
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del _RUNNING[id(engine)]


def running_tasks(engine) -> List[LayerTask]:
    """Tasks of an engine that have not finished yet."""
    with _RUNNING_LOCK:
        return list(_RUNNING.get(id(engine), ()))


def cancel_tasks(engine, timeout_s: float = CANCEL_JOIN_S) -> int:
    """Cancel every running task of ``engine`` and wait for them (bounded); returns how many still run."""
    with _RUNNING_LOCK:
        tasks = list(_RUNNING.get(id(engine), ()))
    for task in tasks:
        task.cancel()
    deadline = time.monotonic() + timeout_s
    for task in tasks:
        task.join(max(0.0, deadline - time.monotonic()))
    left = sum(1 for task in tasks if not task.done)
    if left:
        _log.warning("%d transfer_cache_async task(s) still running at finalize (blocked in synchronize_layer?)",
                     left)
    return left
