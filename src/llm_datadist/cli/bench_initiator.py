"""The initiator (decode) side of one ``bench`` suite: link set-up, bandwidth passes and per-call latency."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from llm_datadist.cli.bench_ceiling import TwoThreads, load_copier, split_ops
from llm_datadist.cli.bench_common import (Buffer, SuiteSpec, block_order, fill_pattern, gbps, placement_kinds, record,
                                           verify_blocks)
from llm_datadist.cli.bench_worker import (LAT_BLOCK, LAT_BLOCKS, MODEL_BLOCK, MODEL_BLOCKS, MODEL_TENSORS,
                                           BenchError, CacheSide, make_instance, recv_reply, report_failure)

__all__ = ["initiator_main"]

OWNER_SALT = 0  # the owner fills its caches with this pattern salt
PUSH_SALT = 1 << 40  # the initiator's push source pattern
LAT_MODEL, MODEL_MODEL = 1000, 1001  # model ids of the latency caches (bandwidth caches use the size index)


class _Run:
    """State of the initiator: its instance, caches, the owner pipe and the parent pipe."""

    def __init__(self, spec: SuiteSpec, peer, parent) -> None:
        self.spec = spec
        self.peer = peer
        self.parent = parent
        self.datadist = None
        self.side: Optional[CacheSide] = None
        self.port = 0
        self.info = None
        self.paired = None  # (Copier, TwoThreads, scratch source, scratch destination): interleaved memcpy passes

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
        try:  # private and read-only: the routes the engine chose for this link
            return str(self.datadist._engine.route(self.spec.owner_id, every=True)) or "unknown"
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
    """One 16 KiB block per pull_blocks call, then one model-shaped request (56 tensors x 32 blocks of 64 KiB)."""
    spec = run.spec
    cache, bufs = run.side.get(LAT_MODEL)
    rng = np.random.default_rng(spec.seed)
    picks = rng.integers(0, LAT_BLOCKS, size=(spec.latency_iters + 20, 2)).tolist()
    times = [_pull(run, LAT_MODEL, cache, [s], [d]) for s, d in picks][20:]
    problem = verify_blocks(bufs[0].array, LAT_BLOCK, np.array([picks[-1][0]]), np.array([picks[-1][1]]), OWNER_SALT)
    run.emit(_latency_record(spec, "latency_16k", times, LAT_BLOCK, problem))
    run.side.release(LAT_MODEL)
    run.owner("release", LAT_MODEL)
    run.owner("prepare", MODEL_MODEL, MODEL_TENSORS, MODEL_BLOCKS, MODEL_BLOCK, OWNER_SALT)
    cache, bufs = run.side.create(MODEL_MODEL, MODEL_TENSORS, MODEL_BLOCKS, MODEL_BLOCK, None)
    s_blk, d_blk = block_order(MODEL_BLOCKS, spec.seed)
    src, dst = s_blk.tolist(), d_blk.tolist()
    times = [_pull(run, MODEL_MODEL, cache, src, dst) for _ in range(spec.model_iters + 1)][1:]
    problem = None
    for t in (0, MODEL_TENSORS - 1):
        problem = problem or verify_blocks(bufs[t].array, MODEL_BLOCK, s_blk, d_blk, OWNER_SALT + t)
    nbytes = MODEL_TENSORS * MODEL_BLOCKS * MODEL_BLOCK
    run.emit(_latency_record(spec, "latency_model", times, nbytes, problem, tensors=MODEL_TENSORS,
                             blocks=MODEL_BLOCKS, piece_bytes=MODEL_BLOCK), units=1, note="latency")
    run.side.release(MODEL_MODEL)
    run.owner("release", MODEL_MODEL)


def _latency_record(spec: SuiteSpec, kind: str, times: List[float], nbytes: int, problem: Optional[str],
                    **extra: Any) -> Dict[str, Any]:
    if problem:
        raise BenchError(f"{kind}: wrong bytes after pull_blocks: {problem}")
    return record(kind, spec.name, bytes=nbytes, samples_us=[t * 1e6 for t in times], verified=True, **extra)


def _paired_memcpy(run: _Run, block: int, s_blk: np.ndarray, d_blk: np.ndarray) -> Dict[str, Callable[[], float]]:
    """Timed passes of the C memcpy loop (1 and 2 threads) over the same scattered blocks in this process."""
    if run.paired is None:
        return {}
    copier, two, src, dst = run.paired
    bs = np.uint64(block)
    d_ops = np.uint64(dst.addr) + d_blk.astype(np.uint64) * bs
    s_ops = np.uint64(src.addr) + s_blk.astype(np.uint64) * bs
    sizes = np.full(len(s_blk), block, dtype=np.uint64)
    halves = split_ops(d_ops, s_ops, sizes, 2)

    def timed(fn: Callable[[], None]) -> Callable[[], float]:
        def run_once() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return run_once

    out = {"": timed(lambda: copier.copy(d_ops, s_ops, sizes))}
    if len(halves) == 2:
        out["_2t"] = timed(lambda: two.run(halves))
    return out


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
            samples, paired = _passes(spec, lambda: _pull(run, model_id, cache, src, dst), n * block, memcpy)
            problem = verify_blocks(bufs[0].array, block, s_blk, d_blk, OWNER_SALT)
        else:
            run.side.release(model_id)
            cache, bufs = run.side.create(model_id, 1, n, block, PUSH_SALT)
            samples, paired = _passes(spec, lambda: _push(run, model_id, cache, src, dst), n * block, memcpy)
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
    run.datadist, _ = make_instance(spec, spec.initiator_id, owner=False)
    run.side = CacheSide(run.datadist, spec.initiator_id, placement_kinds(spec.placement)[0], spec.pool)
    if spec.paired and spec.placement == "host/host":
        copier = load_copier()
        if copier.native:
            scratch = Buffer(spec.total_bytes)
            fill_pattern(scratch.array, 7)
            run.paired = (copier, TwoThreads(copier), scratch, Buffer(spec.total_bytes))
    msg = recv_reply(run.peer, time.monotonic() + spec.timeout_s, "owner")
    run.port = int(msg[1])
    _measure_link(run)
    for index, block in enumerate(spec.sizes):
        _bandwidth_size(run, index, block)
    _measure_latency(run)
    run.peer.send(("stop",))
    _unlink(run)
    run.side.release_all()
    run.datadist.finalize()
    if run.paired is not None:
        run.paired[1].close()
        run.paired[2].close()
        run.paired[3].close()


def initiator_main(spec: SuiteSpec, peer, parent) -> None:
    """Process entry: drive the owner over ``peer``, report records and progress to ``parent``."""
    run = _Run(spec, peer, parent)
    try:
        _body(run)
        parent.send(("done",))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent and the owner, then exit 1
        report_failure(exc, parent, peer)
        sys.exit(1)
