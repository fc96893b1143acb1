"""A real two-process layer-wise push (transfer_cache_async, layer synchronizer): the prefill process releases
layers one by one and the decode process sees layer k arrive only after it was released, byte for byte."""
from __future__ import annotations

import multiprocessing
import os
import time

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


class Decode:
    """The decode side (this process): a listening instance with a destination cache full of SENTINEL."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = _port()
        self.dd = LLMDataDist(LLMRole.DECODER, DECODE)
        self.dd.init(_config(self.port, ra=(mode == "key")))
        self.arrays = [np.full((ROWS, ROW), SENTINEL, np.uint8) for _ in range(TENSORS)]
        desc = CacheDesc(TENSORS, [ROWS, ROW], DataType.DT_UINT8, Placement.DEVICE)
        addrs = [int(a.ctypes.data) for a in self.arrays]
        if mode == "key":
            self.dd.cache_manager.register_blocks_cache(desc, addrs, BlocksCacheKey(DECODE, 5))
        else:  # normal mode: the destination of raw layer-wise pushes opts in to peers' writes
            self.dd.cache_manager.register_cache(desc, addrs, remote_accessible=True)

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
        parent.send(("start", decode.start_args()))
        released = []
        while True:
            message = _recv(parent)
            if message[0] == "done":
                return decode, released, message[1], message[2]
            layer = message[1]
            assert released == list(range(layer)), "layers are synchronized once each, in order"
            assert all(decode.arrived(k) for k in range(layer)), "an earlier layer is missing"
            time.sleep(0.05)  # give a premature write the time to show up
            assert all(decode.untouched(k) for k in range(layer, LAYERS)), f"layer {layer} arrived before release"
            parent.send(("release", layer, layer != fail_at))
            released.append(layer)
    finally:
        parent.send(("exit", None))
        proc.join(WAIT_S)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        decode.dd.finalize()


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
