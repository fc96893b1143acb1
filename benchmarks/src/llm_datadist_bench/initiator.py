"""The initiator (decode) side of one ``bench`` suite: link set-up, bandwidth passes, per-call latency and its floor."""
from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from llm_datadist_bench.ceiling import Copier, TwoThreads, load_copier, split_ops
from llm_datadist_bench.common import (Buffer, SuiteSpec, bind, block_order, gbps, placement_kinds, record,
                                       verify_blocks)
from llm_datadist_bench.floor import ReadvFloor
from llm_datadist_bench.worker import (LAT_BLOCK, LAT_BLOCKS, LAYER_BLOCKS, LAYER_TENSORS, MODEL_BLOCK,
                                       MODEL_BLOCKS, MODEL_TENSORS, BenchError, CacheSide, make_instance,
                                       recv_reply, report_failure)

if TYPE_CHECKING:
    from llm_datadist import LLMClusterInfo, LLMDataDist

__all__ = ["initiator_main"]

OWNER_SALT = 0  # the owner fills its caches with this pattern salt
PUSH_SALT = 1 << 40  # the initiator's push source pattern
LAT_MODEL, MODEL_MODEL, LAYER_MODEL = 1000, 1001, 1002  # latency caches (bandwidth caches use the size index)
LAT_WARMUP = 20  # untimed calls before every latency series
FLOOR_CALLS = 64  # distinct scatter lists the floor cycles over


class _Paired:
    """memcpy of the same blocks inside the initiator, timed next to each pass: a C loop on 1 and 2 threads."""

    def __init__(self, copier: Copier, nbytes: int) -> None:
        self.copier = copier
        self.two = TwoThreads(copier.copy)
        self.src, self.dst = Buffer(nbytes), Buffer(nbytes)

    def ensure(self, nbytes: int) -> None:
        """Scratch buffers of at least ``nbytes`` (the model-shaped request may exceed one pass)."""
        if self.src.nbytes < nbytes:
            self.src.close()
            self.dst.close()
            self.src, self.dst = Buffer(nbytes), Buffer(nbytes)

    def passes(self, block: int, s_blk: np.ndarray, d_blk: np.ndarray,
               tensors: int = 1) -> Dict[str, Callable[[], float]]:
        """Timed copies (seconds) of ``tensors`` caches of ``len(s_blk)`` blocks in the scattered order."""
        tensor_bytes = np.uint64(len(s_blk) * block)
        self.ensure(int(tensor_bytes) * tensors)
        bs = np.uint64(block)
        bases = np.arange(tensors, dtype=np.uint64)[:, None] * tensor_bytes
        d_ops = (np.uint64(self.dst.addr) + bases + d_blk.astype(np.uint64)[None, :] * bs).ravel()
        s_ops = (np.uint64(self.src.addr) + bases + s_blk.astype(np.uint64)[None, :] * bs).ravel()
        sizes = np.full(len(s_ops), block, dtype=np.uint64)
        halves = split_ops(d_ops, s_ops, sizes, 2)
        out = {"": _timed(lambda: self.copier.copy(d_ops, s_ops, sizes))}
        if len(halves) == 2:
            out["_2t"] = _timed(lambda: self.two.run(halves))
        return out

    def close(self) -> None:
        self.two.close()
        self.src.close()
        self.dst.close()


def _timed(fn: Callable[[], None]) -> Callable[[], float]:
    def run_once() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run_once


class _Run:
    """State of the initiator: its instance, caches, the owner pipe and the parent pipe."""

    def __init__(self, spec: SuiteSpec, peer, parent, datadist: LLMDataDist, side: CacheSide) -> None:
        self.spec = spec
        self.peer = peer
        self.parent = parent
        self.datadist = datadist
        self.side = side
        self.port = 0
        self.info: Optional[LLMClusterInfo] = None
        self.owner_pid = 0
        self.paired: Optional[_Paired] = None  # memcpy passes interleaved with the transfers

    def owner(self, *msg) -> tuple:
        self.peer.send(msg)
        return recv_reply(self.peer, time.monotonic() + self.spec.timeout_s, "owner")

    def emit(self, rec: Dict[str, Any], units: int = 0, note: str = "") -> None:
        rec.setdefault("suite", self.spec.name)
        rec.setdefault("placement", self.spec.placement)
        self.parent.send(("record", rec))
        if units:
            self.parent.send(("progress", units, note))

    def key(self, model_id: int):
        from llm_datadist import BlocksCacheKey

        return BlocksCacheKey(self.spec.owner_id, model_id)

    def route(self) -> str:
        engine = self.datadist._engine  # private and read-only: the routes the engine chose for this link
        if engine is None:
            return "unknown"
        try:
            return str(engine.route(self.spec.owner_id, every=True)) or "unknown"
        except Exception:  # noqa: BLE001 - informational only
            return "unknown"


def _link(run: _Run) -> float:
    from llm_datadist import LLMClusterInfo, LLMStatusCode

    info = LLMClusterInfo()
    info.remote_cluster_id = run.spec.owner_id
    info.append_local_ip_info(run.spec.initiator_host, 0)
    info.append_remote_ip_info(run.spec.owner_host, run.port)
    start = time.perf_counter()
    code, codes = run.datadist.link_clusters([info], int(run.spec.timeout_s * 1000))
    elapsed = time.perf_counter() - start
    if code != LLMStatusCode.LLM_SUCCESS:
        raise BenchError(f"link_clusters to {run.spec.owner_host}:{run.port} failed: {code.name} "
                         f"{[c.name for c in codes]}")
    run.info = info
    return elapsed


def _unlink(run: _Run) -> None:
    if run.info is not None:
        run.datadist.unlink_clusters([run.info], int(run.spec.timeout_s * 1000))
        run.info = None


def _pull(run: _Run, model_id: int, cache, src: List[int], dst: List[int]) -> float:
    start = time.perf_counter()
    run.datadist.cache_manager.pull_blocks(run.key(model_id), cache, src, dst)
    return time.perf_counter() - start


def _push(run: _Run, model_id: int, cache, src: List[int], dst: List[int]) -> float:
    start = time.perf_counter()
    run.datadist.cache_manager.push_blocks(run.key(model_id), cache, src, dst, tensor_num_per_layer=1)
    return time.perf_counter() - start


def _measure_link(run: _Run) -> None:
    """Link set-up (link_clusters) and the first pull after it (route connect + cache table), repeated."""
    spec = run.spec
    run.owner("prepare", LAT_MODEL, 1, LAT_BLOCKS, LAT_BLOCK, OWNER_SALT)
    cache, _ = run.side.create(LAT_MODEL, 1, LAT_BLOCKS, LAT_BLOCK, None)
    link_ms, first_ms = [], []
    for i in range(max(1, spec.link_repeats)):
        if i:
            _unlink(run)
        link_ms.append(_link(run) * 1e3)
        first_ms.append(_pull(run, LAT_MODEL, cache, [i % LAT_BLOCKS], [i % LAT_BLOCKS]) * 1e3)
    run.emit(record("link", spec.name, samples_ms=link_ms, first_pull_samples_ms=first_ms, route=run.route()),
             units=1, note="link")


def _measure_latency(run: _Run) -> None:
    """One 16 KiB block per call, one 16 KiB block of each of 56 layers per call, one model-shaped request."""
    _small_latency(run)
    if "layers" in run.spec.call_shapes:
        _layers_latency(run)
    if "model" in run.spec.call_shapes:
        _model_latency(run)
    run.parent.send(("progress", 1, "latency"))


def _picks(run: _Run, blocks: int) -> List[List[int]]:
    rng = np.random.default_rng([run.spec.seed, blocks])
    return rng.integers(0, blocks, size=(run.spec.latency_iters + LAT_WARMUP, 2)).tolist()


def _small_latency(run: _Run) -> None:
    spec = run.spec
    cache, bufs = run.side.get(LAT_MODEL)
    picks = _picks(run, LAT_BLOCKS)
    times = [_pull(run, LAT_MODEL, cache, [s], [d]) for s, d in picks][LAT_WARMUP:]
    problem = verify_blocks(bufs[0].array, LAT_BLOCK, np.array([picks[-1][0]]), np.array([picks[-1][1]]), OWNER_SALT)
    run.emit(_latency_record(spec, "latency_16k", times, LAT_BLOCK, problem))
    _floor(run, "floor_16k", LAT_MODEL, LAT_BLOCKS, picks)
    run.side.release(LAT_MODEL)
    run.owner("release", LAT_MODEL)


def _layers_latency(run: _Run) -> None:
    spec = run.spec
    run.owner("prepare", LAYER_MODEL, LAYER_TENSORS, LAYER_BLOCKS, LAT_BLOCK, OWNER_SALT)
    cache, bufs = run.side.create(LAYER_MODEL, LAYER_TENSORS, LAYER_BLOCKS, LAT_BLOCK, None)
    picks = _picks(run, LAYER_BLOCKS)
    times = [_pull(run, LAYER_MODEL, cache, [s], [d]) for s, d in picks][LAT_WARMUP:]
    last_src, last_dst = np.array([picks[-1][0]]), np.array([picks[-1][1]])
    problem = None
    for t in (0, LAYER_TENSORS - 1):
        problem = problem or verify_blocks(bufs[t].array, LAT_BLOCK, last_src, last_dst, OWNER_SALT + t)
    run.emit(_latency_record(spec, "latency_layers", times, LAYER_TENSORS * LAT_BLOCK, problem,
                             tensors=LAYER_TENSORS, blocks=1, piece_bytes=LAT_BLOCK))
    _floor(run, "floor_layers", LAYER_MODEL, LAYER_BLOCKS, picks)
    run.side.release(LAYER_MODEL)
    run.owner("release", LAYER_MODEL)


def _floor(run: _Run, kind: str, model_id: int, blocks: int, picks: List[List[int]]) -> None:
    """The same pieces in one process_vm_readv call from Python, owner to a scratch buffer (same host only)."""
    spec = run.spec
    if spec.placement != "host/host" or spec.owner_host != spec.initiator_host or not run.owner_pid:
        return
    addrs = run.owner("addr", model_id)[1]
    tensor_bytes = blocks * LAT_BLOCK
    scratch = Buffer(len(addrs) * tensor_bytes)
    try:
        calls = [[(scratch.addr + t * tensor_bytes + d * LAT_BLOCK, addr + s * LAT_BLOCK, LAT_BLOCK)
                  for t, addr in enumerate(addrs)] for s, d in picks[:FLOOR_CALLS]]
        floor = ReadvFloor()
        samples = floor.measure(run.owner_pid, calls, spec.latency_iters, LAT_WARMUP)
        if samples is None:
            run.emit(record("note", spec.name, message=floor.problem))
            return
        s, d = picks[(LAT_WARMUP + spec.latency_iters - 1) % len(calls)]
        words = scratch.array.reshape(len(addrs), tensor_bytes)
        for t in {0, len(addrs) - 1}:
            problem = verify_blocks(words[t], LAT_BLOCK, np.array([s]), np.array([d]), OWNER_SALT + t)
            if problem:
                raise BenchError(f"{kind}: process_vm_readv read the wrong bytes: {problem}")
        run.emit(record(kind, spec.name, bytes=len(addrs) * LAT_BLOCK, iovecs=len(addrs), samples_us=samples,
                        verified=True))
    finally:
        scratch.close()


def _model_series(run: _Run, cache, src: List[int], dst: List[int], copy,
                  iters: int) -> Tuple[List[float], List[float]]:
    """``iters`` timed pulls of the model-shaped request (after one warm-up), each right after a timed 2-thread
    memcpy of the same blocks: (pull seconds, memcpy µs)."""
    times: List[float] = []
    memcpy_us: List[float] = []
    for i in range(iters + 1):
        copied = copy() if copy is not None else None
        took = _pull(run, MODEL_MODEL, cache, src, dst)
        if i:  # the first call warms up
            times.append(took)
            if copied is not None:
                memcpy_us.append(copied * 1e6)
    return times, memcpy_us


def _model_paired(times: List[float], memcpy_us: List[float]) -> Dict[str, Any]:
    if not memcpy_us:
        return {}
    return dict(paired_memcpy_2t_us=memcpy_us,
                paired_ratios_2t=[m / (t * 1e6) for m, t in zip(memcpy_us, times) if t > 0])


def _spinning():
    """A thread that keeps the GIL busy in a Python loop (what a serving engine's loop does) until stopped."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    thread = threading.Thread(target=spin, name="bench-busy-gil", daemon=True)
    thread.start()

    def stopper() -> None:
        stop.set()
        thread.join()

    return stopper


def _model_latency(run: _Run) -> None:
    """56 tensors x 32 blocks of 64 KiB in one pull_blocks call, each call after a 2-thread memcpy of the same;
    then the same series next to a thread that keeps the GIL busy in Python (the memcpy pays the same)."""
    spec = run.spec
    run.owner("prepare", MODEL_MODEL, MODEL_TENSORS, MODEL_BLOCKS, MODEL_BLOCK, OWNER_SALT)
    cache, bufs = run.side.create(MODEL_MODEL, MODEL_TENSORS, MODEL_BLOCKS, MODEL_BLOCK, None)
    s_blk, d_blk = block_order(MODEL_BLOCKS, spec.seed)
    src, dst = s_blk.tolist(), d_blk.tolist()
    copy = None
    if run.paired is not None:
        copy = run.paired.passes(MODEL_BLOCK, s_blk, d_blk, MODEL_TENSORS).get("_2t")
    times, memcpy_us = _model_series(run, cache, src, dst, copy, spec.model_iters)
    stop = _spinning()
    try:
        busy_times, busy_memcpy_us = _model_series(run, cache, src, dst, copy, spec.model_iters)
    finally:
        stop()
    problem = None
    for t in (0, MODEL_TENSORS - 1):
        problem = problem or verify_blocks(bufs[t].array, MODEL_BLOCK, s_blk, d_blk, OWNER_SALT + t)
    nbytes = MODEL_TENSORS * MODEL_BLOCKS * MODEL_BLOCK
    shape = dict(tensors=MODEL_TENSORS, blocks=MODEL_BLOCKS, piece_bytes=MODEL_BLOCK)
    run.emit(_latency_record(spec, "latency_model", times, nbytes, problem, **shape,
                             **_model_paired(times, memcpy_us)))
    run.emit(_latency_record(spec, "latency_model_busy", busy_times, nbytes, problem, **shape,
                             **_model_paired(busy_times, busy_memcpy_us)))
    run.side.release(MODEL_MODEL)
    run.owner("release", MODEL_MODEL)


def _latency_record(spec: SuiteSpec, kind: str, times: List[float], nbytes: int, problem: Optional[str],
                    **extra: Any) -> Dict[str, Any]:
    if problem:
        raise BenchError(f"{kind}: wrong bytes after pull_blocks: {problem}")
    return record(kind, spec.name, bytes=nbytes, samples_us=[t * 1e6 for t in times], verified=True, **extra)


def _paired_memcpy(run: _Run, block: int, s_blk: np.ndarray, d_blk: np.ndarray) -> Dict[str, Callable[[], float]]:
    """Timed passes of the C memcpy loop (1 and 2 threads) over the same scattered blocks in this process."""
    return {} if run.paired is None else run.paired.passes(block, s_blk, d_blk)


def _passes(spec: SuiteSpec, move, nbytes: int, memcpy: Dict[str, Callable[[], float]]):
    """Warm-up, then measured passes; each pass right after one memcpy pass of each kind (paired ratios)."""
    for _ in range(spec.warmup):
        for copy in memcpy.values():
            copy()
        move()
    samples: List[float] = []
    paired: Dict[str, List[float]] = {suffix: [] for suffix in memcpy}
    for _ in range(spec.passes):
        for suffix, copy in memcpy.items():
            paired[suffix].append(gbps(nbytes, copy()))
        samples.append(gbps(nbytes, move()))
    return samples, paired


def _paired_fields(samples: List[float], paired: Dict[str, List[float]]) -> Dict[str, Any]:
    fields: Dict[str, Any] = {}
    for suffix, memcpy in paired.items():
        fields[f"paired_memcpy{suffix}_gbps"] = memcpy
        fields[f"paired_ratios{suffix}"] = [x / m for x, m in zip(samples, memcpy) if m > 0]
    return fields


def _bandwidth_size(run: _Run, index: int, block: int) -> None:
    """Every direction at one block size: 128 MiB (``total_bytes``) per pass in scattered block order."""
    spec = run.spec
    n = spec.total_bytes // block
    s_blk, d_blk = block_order(n, spec.seed)
    src, dst = s_blk.tolist(), d_blk.tolist()
    model_id = index
    run.owner("prepare", model_id, 1, n, block, OWNER_SALT)
    cache, bufs = run.side.create(model_id, 1, n, block, None)
    common = dict(block_bytes=block, total_bytes=n * block, passes=spec.passes, warmup=spec.warmup,
                  transport=spec.transport or "auto", pool=spec.pool)
    memcpy = _paired_memcpy(run, block, s_blk, d_blk)
    for direction in spec.directions:
        if direction == "pull":
            samples, paired = _passes(spec, lambda: _pull(run, model_id, cache, src, dst), n * block, memcpy)  # noqa: B023
            problem = verify_blocks(bufs[0].array, block, s_blk, d_blk, OWNER_SALT)
        else:
            run.side.release(model_id)
            cache, bufs = run.side.create(model_id, 1, n, block, PUSH_SALT)
            samples, paired = _passes(spec, lambda: _push(run, model_id, cache, src, dst), n * block, memcpy)  # noqa: B023
            problem = run.owner("verify", model_id, block, src[:64] + src[-64:], dst[:64] + dst[-64:],
                                PUSH_SALT)[1]
        if problem:
            raise BenchError(f"{direction} at {block} B blocks moved the wrong bytes: {problem}")
        rec = record("bandwidth", spec.name, direction=direction, samples_gbps=samples, route=run.route(),
                     verified=True, **common, **_paired_fields(samples, paired))
        run.emit(rec, units=1, note=f"{spec.name} {direction} {block // 1024}K {rec['median_gbps']:.2f} GB/s")
    run.side.release(model_id)
    run.owner("release", model_id)


def _body(run: _Run) -> None:
    spec = run.spec
    if spec.paired and spec.placement == "host/host":
        copier = load_copier()
        if copier.native:
            run.paired = _Paired(copier, spec.total_bytes)
    msg = recv_reply(run.peer, time.monotonic() + spec.timeout_s, "owner")
    run.port = int(msg[1])
    run.owner_pid = int(msg[2]) if len(msg) > 2 else 0
    _measure_link(run)
    for index, block in enumerate(spec.sizes):
        _bandwidth_size(run, index, block)
    _measure_latency(run)
    run.peer.send(("stop",))
    _unlink(run)
    run.side.release_all()
    run.datadist.finalize()
    if run.paired is not None:
        run.paired.close()


def initiator_main(spec: SuiteSpec, peer, parent) -> None:
    """Process entry: drive the owner over ``peer``, report records and progress to ``parent``."""
    try:
        bind(spec.initiator_cpus)
        datadist, _ = make_instance(spec, spec.initiator_id, owner=False)
        side = CacheSide(datadist, spec.initiator_id, placement_kinds(spec.placement)[0], spec.pool)
        _body(_Run(spec, peer, parent, datadist, side))
        parent.send(("done",))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent and the owner, then exit 1
        report_failure(exc, parent, peer)
        sys.exit(1)
