"""A peer process killed (SIGKILL) or stopped (SIGSTOP) under load, per transport between processes.

Every pull returns within sync_kv_timeout + 1 s: exact bytes, or LLM_TIMEOUT / LLM_LINK_FAILED /
LLM_NOT_YET_LINK; none hangs. After a kill, a new owner with the same cluster id links again; after SIGCONT
the link works again (or is dropped cleanly and links again). loopback is not here: its two instances share
one process, which a signal would stop or kill as a whole.
"""
from __future__ import annotations

import threading
import time
from typing import List, Tuple

import numpy as np
import pytest

from llm_datadist import BlocksCacheKey, CacheDesc, CacheKeyByIdAndIndex, DataType, LLMException, LLMRole, Placement
from llm_datadist import LLMStatusCode as Code
from tests.reliability import kv, local
from tests.reliability.procs import server, wait_for

TRANSPORTS = ["process_vm", "shm", "tcp"]
P, D = 91, 92
TIMEOUT_MS = 1000
BOUND_S = TIMEOUT_MS / 1000 + 1.0  # every call returns within sync_kv_timeout + 1 s
ALLOWED = {Code.LLM_TIMEOUT, Code.LLM_LINK_FAILED, Code.LLM_NOT_YET_LINK}
NT, NB, BB = 4, 64, 64 << 10  # 16 MiB per full pull
SLOT = 64 << 10


def _owner(spawn, env, pool: bool, gen: int = 1, port: int = 0):
    config = {"host_mem_pool_cfg": local.pool_cfg(40 << 20)} if pool else {}
    if port:
        config["listen_ip_info"] = f"127.0.0.1:{port}"
    peer, port = server(spawn, P, env, config=config)
    peer.call("blocks", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, pool=pool, gen=gen)
    slots = peer.call("continuous", name="slots", num_tensors=NT, batch=4, slot_bytes=SLOT, pool=pool, gen=gen)
    return peer, port, slots["cache_id"]


class Timed:
    """Each call timed; failures must carry one of the allowed codes."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, float, float]] = []  # (outcome, start, duration)

    def run(self, fn) -> str:
        start = time.monotonic()
        try:
            fn()
            outcome = "ok"
        except LLMException as exc:
            assert exc.status_code in ALLOWED, exc
            outcome = exc.status_code.name
        self.calls.append((outcome, start, time.monotonic() - start))
        return outcome

    @property
    def slowest(self) -> float:
        return max(duration for _o, _s, duration in self.calls)


def _pull_blocks(dd, cache, arrays, gen: int):
    def pull() -> None:
        src, dst = list(range(NB)), list(range(NB))[::-1]
        local.mark(arrays)
        dd.cache_manager.pull_blocks(BlocksCacheKey(P, 0), cache, src, dst)
        assert kv.one_generation(arrays, dst, src) == gen, "a pull from a dying or stopped peer was not exact"
    return pull


def _pull_slot(dd, cache, arrays, cache_id: int, gen: int):
    def pull() -> None:  # by cache id: the owner resolves it on every pull, so it needs the owner running
        local.mark(arrays)
        dd.cache_manager.pull_cache(CacheKeyByIdAndIndex(P, cache_id, 2), cache, 0)
        assert kv.one_generation(arrays, [0], [2]) == gen
    return pull


def _decoder(make_dd):
    dd = make_dd(LLMRole.DECODER, D, sync_kv_timeout=TIMEOUT_MS)
    blocks = local.blocks(dd.cache_manager, NT, NB, BB)
    slot_arrays = [np.empty((1, SLOT), np.uint8) for _ in range(NT)]
    slot_cache = dd.cache_manager.register_cache(CacheDesc(NT, [1, SLOT], DataType.DT_UINT8, Placement.HOST),
                                                 [a.ctypes.data for a in slot_arrays])
    return dd, blocks, (slot_cache, slot_arrays)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_owner_fails_pulls_in_time_and_a_new_one_links(spawn, make_dd, transport_env, transport, figures):
    env = transport_env(transport)
    pool = transport == "shm"
    peer, port, _slots = _owner(spawn, env, pool)
    dd, (cache, arrays), _ = _decoder(make_dd)
    local.link(dd, P, port)
    timed = Timed()
    pull = _pull_blocks(dd, cache, arrays, 1)
    stop = threading.Event()

    def loop() -> None:
        failures = 0
        while not stop.is_set() and failures < 3:
            failures += timed.run(pull) != "ok"

    worker = threading.Thread(target=loop, name="pulls-until-kill")
    worker.start()
    assert wait_for(lambda: sum(o == "ok" for o, _s, _d in timed.calls) >= 2, 20.0)
    killed = time.monotonic()
    peer.kill()
    worker.join(30)
    stop.set()
    assert not worker.is_alive(), "pulls hung after the owner was killed"
    first_failure = next((start + took for outcome, start, took in timed.calls if outcome != "ok"), None)
    assert first_failure is not None and first_failure - killed <= BOUND_S, (first_failure, killed)
    assert timed.slowest <= BOUND_S, timed.slowest
    codes = sorted({o for o, _s, _d in timed.calls if o != "ok"})

    assert dd.unlink_clusters([local.cluster(P, port)], 3000, force=True)[0] == Code.LLM_SUCCESS
    _owner(spawn, env, pool, gen=2, port=port)  # a new owner process: same cluster id, same port
    local.link(dd, P, port)
    _pull_blocks(dd, cache, arrays, 2)()
    figures.add(f"SIGKILL [{transport}]", f"first failure {first_failure - killed:.2f} s after the kill "
                                           f"({', '.join(codes)}), slowest call {timed.slowest:.2f} s; relinked")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stopped_owner_never_hangs_a_pull_and_serves_again_after_sigcont(spawn, make_dd, transport_env,
                                                                          transport, figures):
    env = transport_env(transport)
    pool = transport == "shm"
    peer, port, slots_id = _owner(spawn, env, pool)
    dd, (cache, arrays), (slot_cache, slot_arrays) = _decoder(make_dd)
    local.link(dd, P, port)
    blocks_pull = _pull_blocks(dd, cache, arrays, 1)
    slot_pull = _pull_slot(dd, slot_cache, slot_arrays, slots_id, 1)
    blocks_pull()
    slot_pull()
    timed = Timed()
    peer.stop()
    try:
        outcomes = [(timed.run(blocks_pull), timed.run(slot_pull)) for _ in range(3)]
    finally:
        peer.cont()
    assert timed.slowest <= BOUND_S, timed.slowest
    assert all(slot == Code.LLM_TIMEOUT.name for _b, slot in outcomes), outcomes  # the owner must answer these
    if transport == "tcp":  # two-sided: the stopped owner serves no bytes either
        assert all(blocks == Code.LLM_TIMEOUT.name for blocks, _s in outcomes), outcomes
    after = Timed()
    if after.run(blocks_pull) == Code.LLM_NOT_YET_LINK.name:  # dropped cleanly: it links again
        local.link(dd, P, port)
    blocks_pull()
    slot_pull()
    blocks_seen = sorted({b for b, _s in outcomes})
    figures.add(f"SIGSTOP [{transport}]", f"blocks pulls while stopped: {', '.join(blocks_seen)}; id pulls: "
                                          f"LLM_TIMEOUT; slowest call {timed.slowest:.2f} s; works after SIGCONT")
