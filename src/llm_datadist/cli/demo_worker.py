"""The demo's worker processes: model cache shapes, the verifiable data pattern, and the prefill/decode bodies."""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
import traceback
from typing import Dict, List, Optional, Tuple

import numpy as np

from llm_datadist.cli.instance import LOCALHOST, make_datadist
from llm_datadist.cli.ipc import recv_message
from llm_datadist.utils.log import set_log_level

__all__ = ["CacheShape", "DemoConfig", "DemoError", "Pattern", "child_main"]

_U64 = np.uint64


@dataclasses.dataclass(frozen=True)
class CacheShape:
    """One registered blocks cache of a model: ``num_tensors`` tensors of ``block_size × kv_heads × head_dim``."""

    name: str
    num_tensors: int
    kv_heads: int
    head_dim: int
    dtype: str  # "fp16" or "bf16"

    def block_bytes(self, block_size: int) -> int:
        return block_size * self.kv_heads * self.head_dim * 2


class DemoError(RuntimeError):
    """A failed demo step; the message is what the user sees."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything both processes need, picklable for the spawn start method."""

    model: str
    caches: Tuple[CacheShape, ...]
    block_size: int
    blocks_per_request: int
    requests: int
    prefill_blocks: int
    decode_blocks: int
    link_style: str
    transport: Optional[str]
    prefill_id: int
    decode_id: int
    comm_name: str
    rank_table: str
    timeout_s: float
    sync_timeout_ms: int
    corrupt_request: int
    seed: int
    host_placement: bool
    verbose: bool = False

    @property
    def request_bytes(self) -> int:
        return self.blocks_per_request * sum(c.num_tensors * c.block_bytes(self.block_size) for c in self.caches)


# ---------------------------------------------------------------------------------------------------------------
# The data pattern: every 8-byte word of every block is derived from (request, cache, tensor, block in request)
# ---------------------------------------------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


class Pattern:
    """Block contents both sides can compute: ``word[k] = base[cache][k] ^ seed(request, cache, tensor, block)``."""

    def __init__(self, cfg: DemoConfig) -> None:
        rng = np.random.default_rng(cfg.seed + 7919)
        self.bases = [rng.integers(0, 2 ** 64 - 1, c.block_bytes(cfg.block_size) // 8, dtype=_U64, endpoint=True)
                      for c in cfg.caches]
        self.cfg = cfg

    def seeds(self, rid: int, ci: int) -> np.ndarray:
        """(num_tensors, blocks_per_request) seeds, distinct for every request, cache, tensor and block."""
        tensors = np.arange(self.cfg.caches[ci].num_tensors, dtype=_U64)[:, None]
        blocks = np.arange(self.cfg.blocks_per_request, dtype=_U64)[None, :]
        key = (_U64(rid) << _U64(28)) ^ (_U64(ci) << _U64(60)) ^ (tensors << _U64(16)) ^ blocks
        return _splitmix64(key)

    def write(self, arrays: List[np.ndarray], ci: int, rid: int, blocks: np.ndarray) -> None:
        seeds, base = self.seeds(rid, ci), self.bases[ci]
        for t, arr in enumerate(arrays):
            arr[blocks] = base[None, :] ^ seeds[t][:, None]

    def verify(self, arrays: List[np.ndarray], ci: int, rid: int, blocks: np.ndarray,
               positions: Optional[np.ndarray] = None) -> Optional[str]:
        """None when every byte matches, else a description of the first mismatch.

        ``blocks[i]`` must hold block ``positions[i]`` of request ``rid`` (default: block ``i``).
        """
        positions = np.arange(len(blocks)) if positions is None else positions
        seeds, base = self.seeds(rid, ci)[:, positions], self.bases[ci]
        for t, arr in enumerate(arrays):
            got = arr[blocks]
            np.bitwise_xor(got, base, out=got)
            bad = got != seeds[t][:, None]
            if bad.any():
                i, word = divmod(int(np.flatnonzero(bad)[0]), got.shape[1])
                expected = (base[word] ^ seeds[t][i]).tobytes()
                actual = arr[blocks[i], word].tobytes()
                byte = next(k for k in range(8) if expected[k] != actual[k])
                return (f"request {rid}, cache {self.cfg.caches[ci].name!r}, tensor {t}, block {int(positions[i])} "
                        f"of the request (decode block {int(blocks[i])}), byte offset {word * 8 + byte}: expected "
                        f"0x{expected[byte]:02x}, got 0x{actual[byte]:02x}")
        return None

    def sweep(self, arrays: List[np.ndarray], ci: int, owner: np.ndarray, position: np.ndarray) -> Optional[str]:
        """Check a whole cache: block b holds block ``position[b]`` of request ``owner[b]``, or zeros if never pulled.

        Catches writes outside the destination blocks of later pulls.
        """
        untouched = np.flatnonzero(owner < 0)
        for t, arr in enumerate(arrays):
            if untouched.size and arr[untouched].any():
                return f"cache {self.cfg.caches[ci].name!r}, tensor {t}: a block no pull targeted was written"
        for rid in np.unique(owner[owner >= 0]).tolist():
            blocks = np.flatnonzero(owner == rid)
            problem = self.verify(arrays, ci, int(rid), blocks, position[blocks])
            if problem:
                return f"{problem} (found by the final sweep: a later pull wrote outside its destination blocks)"
        return None


# ---------------------------------------------------------------------------------------------------------------
# Both worker processes (public API only, apart from reading the chosen route for the summary)
# ---------------------------------------------------------------------------------------------------------------
def _make_instance(cfg: DemoConfig, role_name: str, cluster_id: int, listen: bool):
    """An initialised LLMDataDist; returns (instance, listen port or 0). Retries taken ports."""
    return make_datadist(role_name == "prefill", cluster_id, listen, cfg.transport, cfg.sync_timeout_ms,
                         int(cfg.timeout_s), DemoError)


def _register(cfg: DemoConfig, datadist, cluster_id: int, num_blocks: int):
    """Allocate one numpy array per tensor (pages touched) and register each cache; returns [(arrays, Cache)]."""
    from llm_datadist import BlocksCacheKey, CacheDesc, DataType, Placement

    placement = Placement.HOST if cfg.host_placement else Placement.DEVICE
    registered = []
    for ci, shape in enumerate(cfg.caches):
        block_bytes = shape.block_bytes(cfg.block_size)
        arrays = [np.empty((num_blocks, block_bytes // 8), dtype=_U64) for _ in range(shape.num_tensors)]
        for arr in arrays:
            arr.fill(0)
        dtype = DataType.DT_FLOAT16 if shape.dtype == "fp16" else DataType.DT_BF16
        desc = CacheDesc(num_tensors=shape.num_tensors, shape=[num_blocks, block_bytes // 2], data_type=dtype,
                         placement=placement)
        cache = datadist.cache_manager.register_blocks_cache(
            desc, [int(arr.ctypes.data) for arr in arrays], BlocksCacheKey(cluster_id, ci), remote_accessible=True)
        registered.append((arrays, cache))
    return registered


def _rank_link(cfg: DemoConfig, datadist, deadline: float) -> int:
    """Rank-table link(): returns the comm_id once query_register_mem_status says OK."""
    from llm_datadist import RegisterMemStatus

    comm_id = datadist.link(cfg.comm_name, {cfg.prefill_id: 0, cfg.decode_id: 1}, cfg.rank_table)
    while True:
        status = datadist.query_register_mem_status(comm_id)
        if status == RegisterMemStatus.OK:
            return comm_id
        if status == RegisterMemStatus.FAILED:
            raise DemoError(f"rank-table link {cfg.comm_name!r} failed (query_register_mem_status: FAILED)")
        if time.monotonic() > deadline:
            raise DemoError(f"rank-table link {cfg.comm_name!r} did not become ready in time")
        time.sleep(0.01)


def _recv(conn, deadline: float, who: str):
    """The next message from the peer process, or DemoError on timeout, EOF or an abort from the peer."""
    return recv_message(conn, deadline, who, DemoError)


def _route(datadist, peer_id: int) -> str:
    try:  # private, read-only: the route the engine chose for this link
        return str(datadist._engine.route(peer_id)) or "unknown"
    except Exception:  # noqa: BLE001 - the summary only
        return "unknown"


def _prefill(cfg: DemoConfig, peer, parent) -> None:
    deadline = time.monotonic() + cfg.timeout_s
    datadist, port = _make_instance(cfg, "prefill", cfg.prefill_id, cfg.link_style == "clusters" or
                                    bool(cfg.transport))
    caches = _register(cfg, datadist, cfg.prefill_id, cfg.prefill_blocks)
    peer.send(("ready", port))
    comm_id = _rank_link(cfg, datadist, deadline) if cfg.link_style == "ranktable" else None
    pattern, rng = Pattern(cfg), np.random.default_rng(cfg.seed)
    free = [int(b) for b in rng.permutation(cfg.prefill_blocks)]
    held: Dict[int, np.ndarray] = {}
    next_rid, write_s = 0, 0.0
    while True:
        while next_rid < cfg.requests and len(free) >= cfg.blocks_per_request:
            blocks = np.array([free.pop() for _ in range(cfg.blocks_per_request)], dtype=np.int64)
            start = time.perf_counter()
            for ci, (arrays, _) in enumerate(caches):
                pattern.write(arrays, ci, next_rid, blocks)
            if next_rid == cfg.corrupt_request:
                row = caches[0][0][cfg.caches[0].num_tensors // 2].view(np.uint8)[blocks[len(blocks) // 2]]
                row[row.size // 2 + 1] ^= 0xFF  # --inject-corruption: one byte inverted
            write_s += time.perf_counter() - start
            held[next_rid] = blocks
            peer.send(("req", next_rid, blocks.tolist()))
            next_rid += 1
        msg = _recv(peer, deadline, "decode")
        if msg[0] == "done":
            free.extend(int(b) for b in held.pop(msg[1]))  # P frees the blocks and reuses them later
        elif msg[0] == "finish":
            break
    if comm_id is not None:
        datadist.unlink(comm_id)
    datadist.finalize()
    parent.send(("done", {"write_s": write_s, "requests": next_rid}))


def _decode_link(cfg: DemoConfig, datadist, peer, deadline: float):
    """Link to the prefill side in the chosen style; returns a callable that undoes the link."""
    from llm_datadist import LLMClusterInfo, LLMStatusCode

    msg = _recv(peer, deadline, "prefill")
    if cfg.link_style == "ranktable":
        comm_id = _rank_link(cfg, datadist, deadline)
        return lambda: datadist.unlink(comm_id)
    info = LLMClusterInfo()
    info.remote_cluster_id = cfg.prefill_id
    info.append_local_ip_info(LOCALHOST, 0)
    info.append_remote_ip_info(LOCALHOST, msg[1])
    code, codes = datadist.link_clusters([info], 10000)
    if code != LLMStatusCode.LLM_SUCCESS:
        raise DemoError(f"link_clusters to {LOCALHOST}:{msg[1]} failed: {code.name} {[c.name for c in codes]}")
    return lambda: datadist.unlink_clusters([info], 10000)


def _decode(cfg: DemoConfig, peer, parent) -> None:
    from llm_datadist import BlocksCacheKey

    deadline = time.monotonic() + cfg.timeout_s
    datadist, _ = _make_instance(cfg, "decode", cfg.decode_id, bool(cfg.transport))
    caches = _register(cfg, datadist, cfg.decode_id, cfg.decode_blocks)
    start = time.perf_counter()
    unlink = _decode_link(cfg, datadist, peer, deadline)
    link_s, stream_start = time.perf_counter() - start, time.perf_counter()
    pattern, rng = Pattern(cfg), np.random.default_rng(cfg.seed + 1)
    latencies: List[float] = []
    owner = np.full(cfg.decode_blocks, -1, dtype=np.int64)  # which request's data each decode block holds
    position = np.zeros(cfg.decode_blocks, dtype=np.int64)
    verify_s, route = 0.0, ""
    for _ in range(cfg.requests):
        msg = _recv(peer, deadline, "prefill")
        rid, src = msg[1], msg[2]
        dst = rng.choice(cfg.decode_blocks, cfg.blocks_per_request, replace=False)  # own, shuffled block ids
        start = time.perf_counter()
        for ci, (_, cache) in enumerate(caches):  # all layers of a cache in one call, as client A does
            datadist.cache_manager.pull_blocks(BlocksCacheKey(cfg.prefill_id, ci), cache, src, dst.tolist())
        latencies.append(time.perf_counter() - start)
        route = route or _route(datadist, cfg.prefill_id)
        start = time.perf_counter()
        for ci, (arrays, _) in enumerate(caches):
            problem = pattern.verify(arrays, ci, rid, dst)
            if problem:
                raise DemoError(f"verification failed: {problem}")
        verify_s += time.perf_counter() - start
        owner[dst], position[dst] = rid, np.arange(cfg.blocks_per_request)
        peer.send(("done", rid))
        parent.send(("progress", latencies[-1]))
    stream_s = time.perf_counter() - stream_start
    for ci, (arrays, _) in enumerate(caches):
        problem = pattern.sweep(arrays, ci, owner, position)
        if problem:
            raise DemoError(f"verification failed: {problem}")
    unlink()
    peer.send(("finish",))
    datadist.finalize()
    parent.send(("result", {"latencies": latencies, "route": route, "link_s": link_s, "stream_s": stream_s,
                            "verify_s": verify_s}))


def child_main(role: str, cfg: DemoConfig, peer, parent) -> None:
    """Process entry point: run one side, report any failure to the parent and the peer, exit non-zero."""
    if cfg.verbose:  # routes and links are logged at INFO
        set_log_level(logging.INFO)
    try:
        (_prefill if role == "prefill" else _decode)(cfg, peer, parent)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the process exits 1
        text = _describe_failure(exc, cfg)
        for conn, msg in ((parent, ("error", role, text)), (peer, ("abort",))):
            try:
                conn.send(msg)
            except (OSError, ValueError):
                pass
        sys.exit(1)



def _describe_failure(exc: BaseException, cfg: DemoConfig) -> str:
    """One clear line for expected failures (demo checks, LLMException), a traceback for anything else."""
    from llm_datadist import LLMException

    if isinstance(exc, DemoError):
        return str(exc)
    if isinstance(exc, LLMException):
        text = f"{exc} [{exc.status_code.name}]" if exc.status_code.name not in str(exc) else str(exc)
        if cfg.transport == "shm":
            text += (" (the shm transport moves only memory of the library's own pools (mem_pool_cfg), and the "
                     "demo registers its own numpy arrays: try --transport process_vm or tcp)")
        elif cfg.transport:
            text += f" (the forced transport {cfg.transport!r} may not work here: try process_vm or tcp)"
        return text
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
