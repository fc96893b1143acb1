"""The two processes of one ``bench`` suite: instance set-up, cache memory of each placement, the owner side."""
from __future__ import annotations

import ctypes
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from llm_datadist_bench.common import (MIB, Buffer, SuiteSpec, bind, fill_pattern, placement_kinds,
                                       verify_blocks)
from llm_datadist.cli.instance import init_datadist
from llm_datadist.cli.ipc import recv_message

__all__ = ["BenchError", "CacheSide", "make_instance", "owner_main", "recv_reply", "report_failure"]

MODEL_TENSORS, MODEL_BLOCKS, MODEL_BLOCK = 56, 32, 64 * 1024
LAT_BLOCKS, LAT_BLOCK = 64, 16 * 1024
LAYER_TENSORS, LAYER_BLOCKS = 56, 16  # one 16 KiB block per layer: 56 tensors of LAYER_BLOCKS x LAT_BLOCK


class BenchError(RuntimeError):
    """A failed benchmark step; the message is what the user sees."""


def pool_bytes(spec: SuiteSpec) -> int:
    """Host pool size for pool-allocated suites: the largest cache plus page rounding slack."""
    largest = max(spec.total_bytes, MODEL_TENSORS * MODEL_BLOCKS * MODEL_BLOCK)
    return largest + 64 * MIB


def make_instance(spec: SuiteSpec, cluster_id: int, owner: bool):
    """An initialized LLMDataDist in remote-cache-accessible mode; returns (datadist, listen port or 0).

    A listening side retries on another port when ``init`` fails (the port was taken meanwhile); an unavailable
    transport (LLM_FEATURE_NOT_ENABLED) fails at once. Failures raise BenchError.
    """
    if spec.transport is None:
        os.environ.pop("LLM_DATADIST_TRANSPORT", None)  # "auto" means the library's own choice
    listen = owner or spec.transport is not None  # transfer_backend needs listen_ip_info on both sides
    host = spec.owner_host if owner else spec.initiator_host
    return init_datadist(owner, cluster_id, listen, host, lambda address: _config(spec, owner, address), BenchError)


def _config(spec: SuiteSpec, owner: bool, listen: str):
    """The LLMConfig of one side: cache manager, remote-cache-accessible, forced transport, pool, TLS files."""
    import json

    from llm_datadist import LLMConfig

    config = LLMConfig()
    config.device_id = 0
    config.enable_cache_manager = True
    config.enable_remote_cache_accessible = True
    config.sync_kv_timeout = int(spec.timeout_s * 1000)
    config.link_total_time = max(1, int(spec.timeout_s))
    if listen:
        config.listen_ip_info = listen
    if spec.transport:
        config.transfer_backend = spec.transport
    if spec.pool:
        config.host_mem_pool_cfg = json.dumps({"memory_size": pool_bytes(spec)})
    for name, value in (spec.tls.config(owner) if spec.tls else {}).items():
        setattr(config, name, value)
    return config


class _HostView:
    """Host memory the library allocated (pool): a numpy view, nothing to free here."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.addr = addr
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))

    def close(self) -> None:
        self.array = np.zeros(0, dtype=np.uint8)


class _DeviceBuffer:
    """CUDA memory through torch (only when torch sees a GPU); host copies for filling and checks."""

    def __init__(self, nbytes: int) -> None:
        import torch

        self._tensor = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
        self.addr = int(self._tensor.data_ptr())
        self.nbytes = nbytes

    @property
    def array(self) -> np.ndarray:
        return self._tensor.cpu().numpy()

    def fill(self, salt: int) -> None:
        import torch

        host = np.empty(self.nbytes, dtype=np.uint8)
        fill_pattern(host, salt)
        self._tensor.copy_(torch.from_numpy(host))

    def zero(self) -> None:
        self._tensor.zero_()

    def close(self) -> None:
        self._tensor = None


def _fill(buf, salt: Optional[int]) -> None:
    if isinstance(buf, _DeviceBuffer):
        buf.zero() if salt is None else buf.fill(salt)
    elif salt is None:
        buf.array[:] = 0
    else:
        fill_pattern(buf.array, salt)


class CacheSide:
    """The caches one process creates for the benchmark, by model id (BlocksCacheKey model_id)."""

    def __init__(self, datadist, cluster_id: int, kind: str, pool: bool) -> None:
        self._dd = datadist
        self._cluster = cluster_id
        self._kind = kind
        self._pool = pool
        self._caches: Dict[int, Tuple[Any, List[Any]]] = {}

    def create(self, model_id: int, tensors: int, blocks: int, block: int, salt: Optional[int]):
        """A blocks cache of ``tensors`` x ``blocks`` x ``block`` bytes, filled (salt) or zeroed (None)."""
        from llm_datadist import BlocksCacheKey, CacheDesc, DataType, Placement

        placement = Placement.DEVICE if self._kind == "device" else Placement.HOST
        desc = CacheDesc(num_tensors=tensors, shape=[blocks, block], data_type=DataType.DT_UINT8,
                         placement=placement)
        key = BlocksCacheKey(self._cluster, model_id)
        cm = self._dd.cache_manager
        if self._pool:
            cache = cm.allocate_blocks_cache(desc, key)
            bufs: List[Any] = [_HostView(addr, blocks * block) for addr in cache.tensor_addrs]
        else:
            bufs = [_DeviceBuffer(blocks * block) if self._kind == "device" else Buffer(blocks * block, False)
                    for _ in range(tensors)]
            cache = cm.register_blocks_cache(desc, [b.addr for b in bufs], key, remote_accessible=True)
        for t, buf in enumerate(bufs):
            _fill(buf, None if salt is None else salt + t)
        self._caches[model_id] = (cache, bufs)
        return cache, bufs

    def get(self, model_id: int):
        return self._caches[model_id]

    def release(self, model_id: int) -> None:
        """Deallocate or unregister the cache, then free its memory."""
        entry = self._caches.pop(model_id, None)
        if entry is None:
            return
        cache, bufs = entry
        if self._pool:
            self._dd.cache_manager.deallocate_blocks_cache(cache)
        else:
            self._dd.cache_manager.unregister_cache(cache.cache_id)
        for buf in bufs:
            buf.close()

    def release_all(self) -> None:
        for model_id in list(self._caches):
            self.release(model_id)


def recv_reply(conn, deadline: float, who: str):
    """The next message from ``who``; BenchError on timeout, EOF, an error or an abort."""
    return recv_message(conn, deadline, who, BenchError, ("error", "abort"))


def _owner_verify(side: CacheSide, model_id: int, block: int, src: List[int], dst: List[int],
                  salt: int) -> Optional[str]:
    _cache, bufs = side.get(model_id)
    for t, buf in enumerate(bufs):
        problem = verify_blocks(buf.array, block, np.array(src), np.array(dst), salt + t)
        if problem:
            return f"tensor {t}: {problem}"
    return None


def _owner_loop(spec: SuiteSpec, side: CacheSide, peer) -> None:
    deadline_s = spec.timeout_s
    while True:
        msg = recv_reply(peer, time.monotonic() + deadline_s, "initiator")
        op = msg[0]
        if op == "prepare":
            _, model_id, tensors, blocks, block, salt = msg
            side.create(model_id, tensors, blocks, block, salt)
            peer.send(("ok",))
        elif op == "release":
            side.release(msg[1])
            peer.send(("ok",))
        elif op == "addr":
            peer.send(("ok", [int(buf.addr) for buf in side.get(msg[1])[1]]))
        elif op == "verify":
            _, model_id, block, src, dst, salt = msg
            peer.send(("ok", _owner_verify(side, model_id, block, src, dst, salt)))
        elif op == "stop":
            return


def owner_main(spec: SuiteSpec, peer, parent) -> None:
    """Process entry: the passive side (the prefill role); serves cache preparation and checks for the initiator."""
    datadist = None
    try:
        bind(spec.owner_cpus)
        datadist, port = make_instance(spec, spec.owner_id, owner=True)
        kind = placement_kinds(spec.placement)[1]
        side = CacheSide(datadist, spec.owner_id, kind, spec.pool)
        peer.send(("ready", port, os.getpid()))
        _owner_loop(spec, side, peer)
        side.release_all()
        datadist.finalize()
        parent.send(("done",))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent and the peer, then exit 1
        report_failure(exc, parent, peer)
        sys.exit(1)


def report_failure(exc: BaseException, parent, peer) -> None:
    """Send a one-line (or traceback) description to the parent and an abort to the peer."""
    from llm_datadist import LLMException

    if isinstance(exc, (BenchError, LLMException)):
        text = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted"
    else:
        text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    for conn, msg in ((parent, ("error", text)), (peer, ("abort", text))):
        try:
            conn.send(msg)
        except (OSError, ValueError):
            pass

