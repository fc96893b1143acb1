"""A real two-process layer-wise push (transfer_cache_async, layer synchronizer): the prefill process releases
layers one by one and the decode process sees layer k arrive only after it was released, byte for byte.

"Not before its release" is proven without timing: every layer's destination pages are read-only until the test
releases that layer, so a premature write fails in the kernel (and fails the task) instead of landing unseen.
"""
from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os

import numpy as np
import pytest
from ports import free_port as _port

from llm_datadist import (BlocksCacheKey, CacheDesc, DataType, LayerSynchronizer, LLMClusterInfo, LLMConfig,
                          LLMDataDist, LLMRole, LLMStatusCode, Placement, TransferConfig,
                          TransferWithCacheKeyConfig)

S = LLMStatusCode
PREFILL, DECODE = 31, 32
LAYERS = 4
TENSORS = 2 * LAYERS
ROWS, ROW = 4, 4096  # slots (continuous) or blocks, and bytes of each
SENTINEL = 0xEE
WAIT_S = 30.0


def pattern(tensor: int) -> np.ndarray:
    """What the prefill computes for one tensor (both processes can rebuild it)."""
    data = np.random.default_rng(7000 + tensor).integers(0, 256, (ROWS, ROW), dtype=np.uint8)
    data[data == SENTINEL] = 0x11
    return data


def _config(listen_port=None, ra=False) -> dict:
    config = LLMConfig()
    config.enable_cache_manager = True
    config.device_id = 0
    config.sync_kv_timeout = 5000
    if ra:
        config.enable_remote_cache_accessible = True
    if listen_port is not None:
        config.listen_ip_info = f"127.0.0.1:{listen_port}"
    return config.generate_options()


class PipeSynchronizer(LayerSynchronizer):
    """Asks the decode process for every layer and waits until it is released (bounded)."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def synchronize_layer(self, layer_index, timeout_in_millis):
        self.conn.send(("want", layer_index))
        if not self.conn.poll(WAIT_S):
            return False
        verb, layer, ok = self.conn.recv()
        return verb == "release" and layer == layer_index and ok


def prefill_main(conn, decode_port: int, mode: str) -> None:
    """The prefill process: register the computed cache, link, then push layer by layer."""
    dd = LLMDataDist(LLMRole.PROMPT, PREFILL)
    try:
        dd.init(_config(ra=(mode == "key")))
        arrays = [pattern(t) for t in range(TENSORS)]
        blocks = mode == "key"
        desc = CacheDesc(TENSORS, [ROWS, ROW], DataType.DT_UINT8, Placement.DEVICE)
        addrs = [int(a.ctypes.data) for a in arrays]
        cm = dd.cache_manager
        src = cm.register_blocks_cache(desc, addrs) if blocks else cm.register_cache(desc, addrs)
        info = LLMClusterInfo()
        info.remote_cluster_id = DECODE
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info("127.0.0.1", decode_port)
        code, _ = dd.link_clusters([info], 5000)
        conn.send(("linked", int(code), os.getpid()))
        verb, args = conn.recv()
        assert verb == "start"
        if mode == "key":
            cfg = TransferWithCacheKeyConfig(BlocksCacheKey(DECODE, 5), range(0, LAYERS), range(0, LAYERS))
            task = cm.transfer_cache_async(src, PipeSynchronizer(conn), [cfg], [0, 1, 2, 3], args["dst_blocks"])
        else:
            cfg = TransferConfig(DECODE, args["dst_addrs"], None, args["src_batch_index"])
            task = cm.transfer_cache_async(src, PipeSynchronizer(conn), [cfg])
        conn.send(("done", int(task.synchronize(int(WAIT_S * 1000))), [int(c) for c in task.get_results(0)]))
        conn.poll(WAIT_S)
    except BaseException as exc:  # noqa: BLE001 - report to the decode side instead of dying silently
        conn.send(("error", repr(exc), 0))
    finally:
        dd.finalize()


def _recv(conn):
    assert conn.poll(WAIT_S), "the prefill process went silent"
    message = conn.recv()
    assert message[0] != "error", message
    return message


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_LIBC.process_vm_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                                    ctypes.c_ulong]
_LIBC.process_vm_writev.restype = ctypes.c_ssize_t
LAYER_BYTES = 2 * ROWS * ROW  # the two tensors of a layer, in pages of their own


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _peer_write_refused(addr: int) -> bool:
    """Whether a process_vm_writev (the route a same-host peer writes with) into ``addr`` is refused."""
    byte = ctypes.c_uint8(SENTINEL)
    local, remote = _Iovec(ctypes.addressof(byte), 1), _Iovec(addr, 1)
    return _LIBC.process_vm_writev(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) == -1


class Decode:
    """The decode side (this process): a listening instance with a destination cache full of SENTINEL, each
    layer's two tensors in pages of their own, read-only until that layer is released."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = _port()
        self.dd = LLMDataDist(LLMRole.DECODER, DECODE)
        self.dd.init(_config(self.port, ra=(mode == "key")))
        self.maps = [mmap.mmap(-1, LAYER_BYTES) for _ in range(LAYERS)]
        self.arrays = []
        for layer_map in self.maps:
            pages = np.frombuffer(layer_map, np.uint8)
            pages[:] = SENTINEL
            self.arrays += [pages[:ROWS * ROW].reshape(ROWS, ROW), pages[ROWS * ROW:].reshape(ROWS, ROW)]
        desc = CacheDesc(TENSORS, [ROWS, ROW], DataType.DT_UINT8, Placement.DEVICE)
        addrs = [int(a.ctypes.data) for a in self.arrays]
        if mode == "key":
            self.dd.cache_manager.register_blocks_cache(desc, addrs, BlocksCacheKey(DECODE, 5))
        else:  # normal mode: the destination of raw layer-wise pushes opts in to peers' writes
            self.dd.cache_manager.register_cache(desc, addrs, remote_accessible=True)

    def writable(self, layer: int, yes: bool) -> None:
        """Open or close a layer's destination pages to writes (mprotect)."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if yes else 0)
        assert _LIBC.mprotect(self.arrays[2 * layer].ctypes.data, LAYER_BYTES, prot) == 0, ctypes.get_errno()

    def close_all(self) -> None:
        for layer in range(LAYERS):
            self.writable(layer, False)
        # the control: what a peer's premature write would meet is a refusal, not a silent landing
        assert _peer_write_refused(self.arrays[0].ctypes.data), "read-only pages took a process_vm write"

    def start_args(self) -> dict:
        if self.mode == "key":
            return {"dst_blocks": [3, 2, 1, 0]}  # source block i -> destination block 3 - i
        # source slot 1 -> destination slot 2, addresses pre-offset by the caller (as TransferConfig wants)
        return {"dst_addrs": [int(a.ctypes.data) + 2 * ROW for a in self.arrays], "src_batch_index": 1}

    def expected(self, tensor: int) -> np.ndarray:
        """The destination tensor once its layer arrived."""
        out = np.full((ROWS, ROW), SENTINEL, np.uint8)
        src = pattern(tensor)
        if self.mode == "key":
            out[[3, 2, 1, 0]] = src[[0, 1, 2, 3]]
        else:
            out[2] = src[1]
        return out

    def arrived(self, layer: int) -> bool:
        return all((self.arrays[t] == self.expected(t)).all() for t in (2 * layer, 2 * layer + 1))

    def untouched(self, layer: int) -> bool:
        return all((self.arrays[t] == SENTINEL).all() for t in (2 * layer, 2 * layer + 1))


def _run(mode: str, fail_at=None):
    decode = Decode(mode)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=prefill_main, args=(child, decode.port, mode), daemon=True)
    proc.start()
    try:
        _verb, code, _pid = _recv(parent)
        assert code == S.LLM_SUCCESS
        decode.close_all()
        parent.send(("start", decode.start_args()))
        released = []
        while True:
            message = _recv(parent)
            if message[0] == "done":
                return decode, released, message[1], message[2]
            layer = message[1]
            assert released == list(range(layer)), "layers are synchronized once each, in order"
            assert all(decode.arrived(k) for k in range(layer)), "an earlier layer is missing"
            assert all(decode.untouched(k) for k in range(layer, LAYERS)), f"layer {layer} arrived before release"
            if layer != fail_at:
                decode.writable(layer, True)  # a write before this line would have failed the task
            parent.send(("release", layer, layer != fail_at))
            released.append(layer)
    finally:
        parent.send(("exit", None))
        proc.join(WAIT_S)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        decode.dd.finalize()
        for layer in range(LAYERS):
            decode.writable(layer, True)


@pytest.mark.parametrize("mode", ["raw", "key"])
def test_layer_k_arrives_only_after_release_and_bytes_are_exact(mode):
    decode, released, code, results = _run(mode)
    assert released == list(range(LAYERS))
    assert (code, results) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
    for t in range(TENSORS):
        assert (decode.arrays[t] == decode.expected(t)).all(), f"tensor {t} differs"


def test_synchronizer_failure_stops_the_push():
    decode, released, code, results = _run("raw", fail_at=2)
    assert released == [0, 1, 2]
    assert (code, results) == (S.LLM_PARAM_INVALID, [S.LLM_PARAM_INVALID])
    assert decode.arrived(0) and decode.arrived(1)
    assert decode.untouched(2) and decode.untouched(3)
