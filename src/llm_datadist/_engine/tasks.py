"""Layer-wise asynchronous pushes (transfer_cache_async): tasks on the engine's executor, planned by the one planner."""
from __future__ import annotations

import logging
import threading
import time
from typing import List, Optional, Sequence, Set, Tuple

from llm_datadist._engine import planner, transfers
from llm_datadist._engine import protocol as proto
from llm_datadist._engine import stats as st
from llm_datadist._engine.context import EngineCore
from llm_datadist._engine.errors import CacheNotExist, EngineError, Finalized, ParamInvalid, status_of
from llm_datadist._engine.link import Link, check_view_accessible
from llm_datadist._engine.executor import Executor
from llm_datadist._engine.planner import Side, side_of
from llm_datadist._engine.registry import CacheEntry
from llm_datadist._engine.requests import TENSORS_PER_LAYER, ConfigJob, TaskJob
from llm_datadist._transport.base import CopyPlan, StaleMemory, TransportError
from llm_datadist.status import LLMStatusCode

__all__ = ["LayerTask", "TaskSet"]

_log = logging.getLogger(__name__)

CANCEL_JOIN_S = 2.0  # how long finalize waits, in total, for running tasks to notice the cancellation
_PAIR = range(TENSORS_PER_LAYER)


# ---- planning one (layer, destination) ----------------------------------------------------------------
def _raw_target(job: TaskJob, src: Side, cfg: ConfigJob, layer: int, link: Link, deadline: float,
                fresh: bool) -> Side:
    k = layer - cfg.src_layers.start
    bases = cfg.dst_addrs[TENSORS_PER_LAYER * k:TENSORS_PER_LAYER * (k + 1)]
    if len(bases) != TENSORS_PER_LAYER:
        raise ParamInvalid(f"dst_addrs has no address for layer {layer}")
    stride = job.dst_block_size if (job.dst_blocks and not job.src_blocks) else src.stride
    return transfers.raw_destination(link, bases, stride, deadline, fresh)


def _key_target(job: TaskJob, src: Side, cfg: ConfigJob, layer: int,
                view: proto.CacheView) -> Tuple[Side, Sequence[int], int]:
    """Key mode: the destination geometry comes from the peer's table (src layer i -> dst layer i)."""
    check_view_accessible(view, "destination")
    assert cfg.dst_layers is not None
    dst_layer = cfg.dst_layers[layer - cfg.src_layers.start]
    dst = side_of(view)
    dst_t = planner.layer_tensors(dst_layer, TENSORS_PER_LAYER, dst.num_tensors, f"remote {view.cache_id}")
    if job.src_blocks or job.dst_blocks:
        if not view.is_blocks:
            raise ParamInvalid(f"remote cache {view.cache_id} is not a blocks cache, block indices can not be used")
        if job.dst_block_size and job.dst_block_size != dst.stride:
            raise ParamInvalid(f"dst_block_memory_size {job.dst_block_size} differs from the block size "
                               f"{dst.stride} of remote cache {view.cache_id}")
        return dst, dst_t, cfg.src_batch_index
    if view.is_blocks and not src.is_blocks:
        raise ParamInvalid(f"remote cache {view.cache_id} is a blocks cache; dst_block_indices are needed")
    return dst, dst_t, (0 if view.is_blocks else view.slot)  # blocks to blocks without indices: block 0


def plan_to(job: TaskJob, src: Side, cfg: ConfigJob, layer: int, dst: Side, dst_t: Sequence[int],
            dst_slot: int) -> CopyPlan:
    """Plan one (layer, destination): blocks, a slot cut into blocks, or a slot."""
    src_t = planner.layer_tensors(layer, TENSORS_PER_LAYER, src.num_tensors, "source")
    if job.src_blocks:
        if job.dst_block_size and job.dst_block_size != src.stride:
            raise ParamInvalid(f"dst_block_memory_size {job.dst_block_size} differs from the source block size "
                               f"{src.stride}")
        ops = planner.blocks_ops(src, src_t, job.src_blocks, dst, dst_t, job.dst_blocks)
    elif job.dst_blocks:
        chunk = job.dst_block_size or dst.stride
        ops = planner.chunk_ops(src, src_t, cfg.src_batch_index, dst, dst_t, job.dst_blocks, chunk)
    else:
        if src.stride > dst.stride:
            raise ParamInvalid(f"source slot of {src.stride} bytes exceeds the remote slot of {dst.stride} bytes")
        ops = planner.slot_ops(src, src_t, cfg.src_batch_index, dst, dst_t, dst_slot, src.stride)
    return planner.oriented(ops, src, dst, local_is_dst=False)


# ---- the task ---------------------------------------------------------------------------------
class LayerTask:
    """A running transfer_cache_async; the CacheTask's waiter (``join``/``results``)."""

    def __init__(self, engine: EngineCore, job: TaskJob, tasks: TaskSet) -> None:
        self._engine = engine
        self._job = job
        self._tasks = tasks
        self._results: List[Optional[LLMStatusCode]] = [None] * len(job.configs)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._cancel = threading.Event()
        # one call of the statistics per destination config, from now (queued) to its last layer or its failure
        self._calls: List[Optional[st.Call]] = [engine.stats.begin(cfg.dst_cluster_id, st.PUSH) for cfg in job.configs]

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
            call, self._calls[index] = self._calls[index], None
        self._engine.stats.end(call, None if code == LLMStatusCode.LLM_SUCCESS else code)

    def run(self) -> None:
        try:
            self._run_layers()
        except BaseException:  # noqa: BLE001 - nothing may be lost in a worker thread
            _log.exception("transfer_cache_async of cache %d failed unexpectedly", self._job.src_cache_id)
            with self._lock:
                self._results = [LLMStatusCode.LLM_FAILED if r is None else r for r in self._results]
        finally:
            with self._lock:
                unfinished, self._calls = self._calls, []
            for call in unfinished:  # cancelled at finalize, or stopped before these configs' layers
                self._engine.stats.abandon(call)
            self._tasks.forget(self)
            self._done.set()

    def _run_layers(self) -> None:
        job = self._job
        try:
            entry = self._engine.registry.pin(job.src_cache_id)
        except EngineError as exc:
            _log.debug("transfer_cache_async: %s", exc)  # reported in the results
            for index in range(len(job.configs)):
                self._set(index, exc.code)
            return
        try:
            src = side_of(entry)
            for layer in job.layers():
                if self._cancel.is_set():
                    _log.info("transfer_cache_async of cache %d cancelled before layer %d (finalize)",
                              job.src_cache_id, layer)
                    return
                needing = [i for i, cfg in enumerate(job.configs) if layer in cfg.src_layers]
                if not self._synchronize(layer, needing):
                    return
                for index in needing:
                    code = self._send_logged(entry, src, index, layer)
                    if code != LLMStatusCode.LLM_SUCCESS:
                        self._set(index, code)
                        return
                    if layer == job.configs[index].src_layers[-1]:
                        self._set(index, LLMStatusCode.LLM_SUCCESS)
        finally:
            self._engine.registry.unpin(entry)

    def _synchronize(self, layer: int, needing: List[int]) -> bool:
        try:
            ready = self._job.synchronizer.synchronize_layer(layer, None)
        except Exception:  # noqa: BLE001 - a user callback failure stops the task, never the thread silently
            _log.exception("synchronize_layer(%d) raised; the task stops", layer)
            ready = False
        if ready:
            return True
        _log.debug("synchronize_layer(%d) reported failure; the task stops", layer)
        for index in needing:
            self._set(index, LLMStatusCode.LLM_PARAM_INVALID)
        return False

    def _send_logged(self, entry: CacheEntry, src: Side, index: int, layer: int) -> LLMStatusCode:
        cfg = self._job.configs[index]
        prev = st.set_current(self._calls[index])
        try:
            self._send(entry, src, cfg, layer)
            return LLMStatusCode.LLM_SUCCESS
        except (EngineError, TransportError) as exc:
            code = status_of(exc)
            _log.debug("transfer_cache_async layer %d to cluster %d failed (%s): %s", layer, cfg.dst_cluster_id,
                       code, exc)
            return code
        except Exception:  # noqa: BLE001 - recorded as LLM_FAILED, never lost
            _log.exception("transfer_cache_async layer %d to cluster %d failed", layer, cfg.dst_cluster_id)
            return LLMStatusCode.LLM_FAILED
        finally:
            st.set_current(prev)

    def _send(self, entry: CacheEntry, src: Side, cfg: ConfigJob, layer: int) -> None:
        deadline = time.monotonic() + self._job.timeout_s
        engine = self._engine
        if entry.released:
            raise CacheNotExist(f"cache {entry.cache_id} was released during the transfer")
        if engine.closed:
            raise Finalized("the instance was finalized during the transfer")
        link = transfers.link_to(engine, cfg.dst_cluster_id)
        if cfg.dest is not None:
            if engine.opts.remote_cache_accessible and not (entry.remote_accessible or entry.owned):
                raise ParamInvalid(f"local cache {entry.cache_id} is not remote accessible")

            def make_plan(view: proto.CacheView) -> CopyPlan:
                dst, dst_t, dst_slot = _key_target(self._job, src, cfg, layer, view)
                return plan_to(self._job, src, cfg, layer, dst, dst_t, dst_slot)

            transfers.move(engine, link, cfg.dest, make_plan, True, deadline)
            return
        for fresh in (False, True):  # a table snapshot may be stale: its guards fail, one fresh try follows
            dst = _raw_target(self._job, src, cfg, layer, link, deadline, fresh)
            plan = plan_to(self._job, src, cfg, layer, dst, _PAIR, 0)
            transfers.check_inside(plan, dst)
            try:
                transfers.send(link, plan, True, deadline)
                return
            except (StaleMemory, CacheNotExist):
                if fresh:
                    raise


# ---- the tasks of one engine (finalize cancels and joins them) --------------------------------
class TaskSet:
    """Running layer-wise tasks of one engine, on its executor."""

    def __init__(self, engine: EngineCore, executor: Executor) -> None:
        self._engine = engine
        self._executor = executor
        self._lock = threading.Lock()
        self._running: Set[LayerTask] = set()

    def start(self, job: TaskJob) -> LayerTask:
        """Queue the worker of a validated job and return it."""
        if self._engine.closed:
            raise Finalized("the instance is finalized")
        task = LayerTask(self._engine, job, self)
        with self._lock:
            self._running.add(task)
        try:
            self._executor.submit(task.run)
        except RuntimeError as exc:
            self.forget(task)
            raise Finalized("the instance is finalized") from exc
        return task

    def forget(self, task: LayerTask) -> None:
        with self._lock:
            self._running.discard(task)

    def running(self) -> List[LayerTask]:
        with self._lock:
            return list(self._running)

    def cancel_all(self, timeout_s: float = CANCEL_JOIN_S) -> int:
        """Cancel every running task and wait for them (bounded); returns how many still run."""
        tasks = self.running()
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

