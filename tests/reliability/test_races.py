"""Release races on every transport: a transfer that races an unregister/deallocate fails cleanly or is exact.

* Owner side: the owner keeps releasing its cache, overwriting the freed memory with garbage, and registering
  (allocating) it again with the next generation under the same key, while the decoder pulls continuously.
  Every pull fails with LLM_KV_CACHE_NOT_EXIST or returns blocks of ONE generation (never garbage, never a mix,
  never older than a generation seen before).
* Puller side: the decoder unregisters its destination while a large pull into it runs, then fills it with a
  sentinel: nothing may overwrite the sentinel afterwards.
* Pushes (remote-cache-accessible mode): the decoder unregisters the destination while the owner pushes into
  it; after unregister returns (or raised LLM_TIMEOUT) nothing writes into it.

loopback runs both instances in this process; process_vm, shm and tcp put the owner in a peer process. shm only
covers pool memory, so there the remote caches are pool-allocated (deallocate instead of unregister).
"""
from __future__ import annotations

import threading
from typing import Dict, List

import numpy as np
import pytest

from llm_datadist import BlocksCacheKey, LLMException, LLMRole, LLMStatusCode
from tests.reliability import kv, local
from tests.reliability.procs import LocalPeer, free_port, server, wait_for

TRANSPORTS = ["loopback", "process_vm", "shm", "tcp"]
P, D = 81, 82
RUNS = 10
NOT_EXIST = int(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST)


class Owner:
    """The owner instance (cluster P), in this process for loopback, else in a peer process."""

    def __init__(self, transport: str, spawn, env: dict, ra: bool, pool_bytes: int) -> None:
        config = {"host_mem_pool_cfg": local.pool_cfg(pool_bytes)} if pool_bytes else {}
        if transport == "loopback":
            self.peer = LocalPeer()
            self.port = free_port()
            cfg = {"enable_cache_manager": True, "listen_ip_info": f"127.0.0.1:{self.port}", **config}
            if ra:
                cfg["enable_remote_cache_accessible"] = True
            self.peer.call("init", role=1, cluster_id=P, config=cfg)
        else:
            self.peer, self.port = server(spawn, P, env, ra=ra, config=config)
        self.pool = transport == "shm"

    def call(self, op: str, **args) -> dict:
        return self.peer.call(op, **args)

    def close(self) -> None:
        if isinstance(self.peer, LocalPeer):
            self.peer.close()


@pytest.fixture
def setup(request, spawn, make_dd, transport_env):
    """``setup(transport, ra=False, owner_pool=0, decoder_pool=0) -> (owner, decoder)``, linked decoder -> owner."""
    made: List[Owner] = []

    def make(transport: str, ra: bool = False, owner_pool: int = 0, decoder_pool: int = 0):
        env = transport_env(transport)
        owner = Owner(transport, spawn, env, ra, owner_pool)
        made.append(owner)
        attrs = {"enable_remote_cache_accessible": True} if ra else {}
        if decoder_pool:
            attrs["host_mem_pool_cfg"] = local.pool_cfg(decoder_pool)
        dd = make_dd(LLMRole.DECODER, D, **attrs)
        local.link(dd, P, owner.port)
        return owner, dd

    yield make
    for owner in made:
        owner.close()


def _route(dd) -> str:
    return dd._engine.route(P, every=True)  # test-only probe: which transports carried the transfers


# -- owner side ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_owner_churn_never_yields_garbage_or_a_mix(setup, transport, figures):
    nt, nb, bb, picked = 2, 32, 16 << 10, 16
    owner, dd = setup(transport, owner_pool=4 << 20)
    owner.call("blocks", name="kv", num_tensors=nt, num_blocks=nb, block_bytes=bb, pool=owner.pool)
    cache, arrays = local.blocks(dd.cache_manager, nt, nb, bb)
    key = BlocksCacheKey(P, 0)
    rng = np.random.default_rng(7)
    codes: Dict[int, int] = {}
    good, cycles, last_gen, gens = 0, 0, 0, set()
    for _run in range(RUNS):
        owner.call("churn_start", name="kv", pause=0.002)
        for _ in range(30):
            src = rng.choice(nb, picked, replace=False).tolist()
            dst = rng.permutation(nb)[:picked].tolist()
            local.mark(arrays)
            try:
                dd.cache_manager.pull_blocks(key, cache, src, dst)
            except LLMException as exc:
                codes[int(exc.status_code)] = codes.get(int(exc.status_code), 0) + 1
                continue
            gen = kv.one_generation(arrays, dst, src)
            assert gen is not None, f"a successful pull returned garbage or a mix (run {_run})"
            assert gen >= last_gen, f"generation {gen} after {last_gen}: an old view was trusted"
            last_gen, good = gen, good + 1
            gens.add(gen)
        result = owner.call("stop", loop="kv")
        assert not result["errors"] and not result["codes"], result
        cycles += result["count"]
    assert set(codes) <= {NOT_EXIST}, codes
    final = owner.call("check_blocks", name="kv", gen=0)["gen"]
    local.mark(arrays)
    dd.cache_manager.pull_blocks(key, cache, list(range(nb)), list(range(nb)))  # quiet now: must succeed
    assert kv.one_generation(arrays, list(range(nb)), list(range(nb))) == final
    assert good > 0 and cycles >= RUNS
    figures.add(f"owner churn [{transport}] ({_route(dd)})",
                f"{RUNS} runs, {cycles} owner cycles, {good} exact pulls of {len(gens)} generations, "
                f"{codes.get(NOT_EXIST, 0)} LLM_KV_CACHE_NOT_EXIST")


# -- puller side -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unregistering_the_destination_mid_pull_stops_every_write(setup, transport, figures):
    nt, nb, bb = 4, 64, 64 << 10  # 16 MiB per pull
    owner, dd = setup(transport, owner_pool=20 << 20)
    owner.call("blocks", name="big", num_tensors=nt, num_blocks=nb, block_bytes=bb, pool=owner.pool)
    key = BlocksCacheKey(P, 0)
    src, dst = list(range(nb)), list(range(nb))[::-1]
    cm = dd.cache_manager
    kept, outcomes, in_flight = [], {}, 0
    for _run in range(RUNS):
        cache, arrays = local.blocks(cm, nt, nb, bb)
        result: Dict[str, object] = {}

        def pull() -> None:
            try:
                cm.pull_blocks(key, cache, src, dst)
                result["pull"] = "ok"
            except LLMException as exc:
                result["pull"] = exc.status_code.name

        worker = threading.Thread(target=pull, name="race-pull")
        first = arrays[0][dst[0]:dst[0] + 1]
        worker.start()
        wait_for(lambda: not local.untouched([first]) or not worker.is_alive(), 10.0, 0.0002)
        in_flight += worker.is_alive()
        try:
            cm.unregister_cache(cache.cache_id)
            outcome = "returned"
        except LLMException as exc:
            outcome = exc.status_code.name
            assert exc.status_code == LLMStatusCode.LLM_TIMEOUT, exc
        local.mark(arrays)  # from now on nothing may write here
        worker.join(30)
        assert not worker.is_alive(), "the pull hung"
        with pytest.raises(LLMException) as stale:
            cm.pull_blocks(key, cache, [0], [0])  # the unregistered cache takes no more pulls
        assert stale.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
        assert local.untouched(arrays), f"run {_run}: bytes arrived after unregister {outcome}"
        kept.append(arrays)
        label = f"unregister {outcome}, pull {result.get('pull')}"
        outcomes[label] = outcomes.get(label, 0) + 1
    assert all(local.untouched(arrays) for arrays in kept)  # checked again after every later run
    figures.add(f"destination unregistered mid-pull [{transport}]",
                f"{RUNS} runs, {in_flight} with the pull in flight; " +
                ", ".join(f"{n}x {label}" for label, n in sorted(outcomes.items())))


# -- pushes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unregistering_a_push_destination_stops_every_write(setup, transport, figures):
    nt, nb, bb = 2, 32, 32 << 10
    pool = transport == "shm"  # shm writes only into pool memory: deallocate instead of unregister
    owner, dd = setup(transport, ra=True, owner_pool=4 << 20, decoder_pool=4 << 20 if pool else 0)
    owner.call("blocks", name="src", num_tensors=nt, num_blocks=nb, block_bytes=bb, remote_accessible=True,
               pool=pool, gen=5)
    cm = dd.cache_manager
    dkey = BlocksCacheKey(D, 0)
    blocks = list(range(nb))
    kept, outcomes, pushes, push_codes = [], {}, 0, {}
    for _run in range(RUNS):
        cache, arrays = local.blocks(cm, nt, nb, bb, key=dkey, remote_accessible=True, pool=pool)
        owner.call("push_start", name="src", cluster_id=D, model_id=0, src_blocks=blocks, dst_blocks=blocks)
        last = [a[-1:] for a in arrays]
        for _push in range(1 + _run % 3):  # let 1-3 pushes land, so the release meets the next one in flight
            local.mark(last)
            assert wait_for(lambda: kv.one_generation(last, [0], [nb - 1]) == 5, 10.0, 0.0005), "no push arrived"
        try:
            if pool:
                cm.deallocate_blocks_cache(cache)
            else:
                cm.unregister_cache(cache.cache_id)
            outcome = "returned"
        except LLMException as exc:
            outcome = exc.status_code.name
            assert exc.status_code == LLMStatusCode.LLM_TIMEOUT, exc
        local.mark(arrays)  # from now on nothing may write here
        result = owner.call("stop", loop="push-src")
        assert not result["errors"] and not result["alive"], result
        assert set(result["codes"]) <= {str(NOT_EXIST)}, result["codes"]
        assert local.untouched(arrays), f"run {_run}: a push wrote after the release {outcome}"
        pushes += result["count"]
        for code, n in result["codes"].items():
            push_codes[code] = push_codes.get(code, 0) + n
        if not pool:
            kept.append(arrays)  # pool memory is handed out again next run; registered memory stays ours
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert all(local.untouched(arrays) for arrays in kept)
    figures.add(f"push destination released [{transport}] ({owner.call('route', cluster_id=D)['route']})",
                f"{RUNS} runs, {pushes} pushes, {sum(push_codes.values())} refused after the release; "
                + ", ".join(f"{n}x {label}" for label, n in outcomes.items()))
