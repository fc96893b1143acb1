"""Tests of the memory pools behind mem_pool_cfg / host_mem_pool_cfg: parsing, pages, exhaustion."""
from __future__ import annotations

import errno
import json
import os
import random
import struct
import threading

import pytest

from llm_datadist._engine.errors import EngineError, OutOfMemory, ParamInvalid
from llm_datadist._engine.memory import (PAGE_SIZE, CpuDevice, HostMemory, is_mapped, map_shared, read_bytes,
                                         write_bytes)
from llm_datadist._engine.pool import MemPool, PoolConfig, parse_pool_config
from llm_datadist.status import LLMStatusCode

KIB = 1024


def _pool(memory_size: int, page_shift: int = 12, backend=None) -> MemPool:
    return MemPool(PoolConfig(memory_size, page_shift), backend or HostMemory())


@pytest.fixture
def pool():
    p = _pool(64 * 4 * KIB, 12)
    yield p
    p.close()


def _check_invariants(p: MemPool, live: dict) -> None:
    """No overlaps, full coverage, coalesced free list, counters consistent."""
    blocks = [(a, p.allocation_size(a), "used") for a in live] + [(a, n, "free") for a, n in p.free_blocks()]
    blocks.sort()
    pos = p.addr
    for i, (addr, size, kind) in enumerate(blocks):
        assert addr == pos, "gap or overlap"
        assert addr % p.page_size == 0 and size % p.page_size == 0 and size > 0
        if kind == "free" and i:
            assert blocks[i - 1][2] != "free", "adjacent free blocks were not coalesced"
        pos += size
    assert pos == p.addr + p.total
    stats = p.stats()
    assert stats["used"] + stats["free_bytes"] == stats["total"] == p.total
    assert stats["num_allocations"] == len(live)
    assert stats["largest_free"] == max((n for _, n in p.free_blocks()), default=0)


# -- config -------------------------------------------------------------------------------------
def test_parse_pool_config_valid():
    assert parse_pool_config('{"memory_size": 1024}') == PoolConfig(1024, 16)
    cfg = parse_pool_config(json.dumps({"memory_size": 1 << 30, "page_shift": 21}))
    assert (cfg.memory_size, cfg.page_shift, cfg.page_size) == (1 << 30, 21, 2 << 20)
    assert parse_pool_config(b'{"memory_size": 5, "page_shift": 10}') == PoolConfig(5, 10)
    assert parse_pool_config('{"memory_size": 5, "page_shift": 30}').page_shift == 30
    assert parse_pool_config('{"memory_size": 5, "other": "ignored"}').memory_size == 5
    limit = ((1 << 32) - 2) << 10
    assert parse_pool_config(json.dumps({"memory_size": limit, "page_shift": 10})).memory_size == limit


@pytest.mark.parametrize("text", [
    "", "not json", "[]", "1", "null", '"{}"', "{}", '{"page_shift": 16}',
    '{"memory_size": 0}', '{"memory_size": -1}', '{"memory_size": 1.5}', '{"memory_size": 1024.0}',
    '{"memory_size": "1024"}', '{"memory_size": true}', '{"memory_size": null}', '{"memory_size": [1]}',
    '{"memory_size": NaN}', '{"memory_size": 18446744073709551616}',
    '{"memory_size": 1024, "page_shift": 9}', '{"memory_size": 1024, "page_shift": 31}',
    '{"memory_size": 1024, "page_shift": -1}', '{"memory_size": 1024, "page_shift": 16.0}',
    '{"memory_size": 1024, "page_shift": true}', '{"memory_size": 1024, "page_shift": "16"}',
    '{"memory_size": 1024, "page_shift": null}',
    json.dumps({"memory_size": ((1 << 32) - 1) << 10, "page_shift": 10}),
])
def test_parse_pool_config_invalid(text):
    with pytest.raises(ParamInvalid) as info:
        parse_pool_config(text)
    assert info.value.code == LLMStatusCode.LLM_PARAM_INVALID
    assert "memory pool config" in str(info.value)


@pytest.mark.parametrize("value", [None, 1024, {"memory_size": 1024}])
def test_parse_pool_config_not_a_string(value):
    with pytest.raises(ParamInvalid):
        parse_pool_config(value)  # type: ignore[arg-type]


# -- allocation ---------------------------------------------------------------------------------
def test_allocations_are_rounded_aligned_and_usable(pool):
    a = pool.allocate(1)
    b = pool.allocate(4 * KIB + 1)
    assert a % pool.page_size == 0 and b % pool.page_size == 0
    assert pool.allocation_size(a) == 4 * KIB and pool.allocation_size(b) == 8 * KIB
    assert pool.used == 12 * KIB and pool.num_allocations == 2
    assert is_mapped(b, 8 * KIB)
    write_bytes(b + 8 * KIB - 4, b"tail")
    assert read_bytes(b + 8 * KIB - 4, 4) == b"tail"
    assert pool.contains(a, 12 * KIB) and not pool.contains(a, pool.total + 1)
    assert not pool.contains(pool.addr - 1, 1) and not pool.contains("x", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("page_shift", [12, 16, 21, 24])
def test_absolute_alignment_to_large_pages(page_shift):
    page = 1 << page_shift
    p = _pool(4 * page, page_shift)
    try:
        assert p.addr % page == 0 and p.total == 4 * page
        addrs = [p.allocate(1) for _ in range(4)]
        assert all(a % page == 0 for a in addrs)
        region = p.region
        assert region.addr == p.addr and region.nbytes == p.total
        assert region.segment is not None and region.segment.path and region.segment.offset >= 0
    finally:
        p.close()


def test_total_is_rounded_down_to_pages():
    p = _pool(10 * KIB + 5, 12)
    try:
        assert p.total == 8 * KIB
        p.allocate(8 * KIB)
        with pytest.raises(OutOfMemory):
            p.allocate(1)
    finally:
        p.close()
    tiny = _pool(100, 12)
    try:
        assert tiny.total == 0 and tiny.largest_free == 0
        with pytest.raises(OutOfMemory):
            tiny.allocate(1)
    finally:
        tiny.close()


def test_out_of_memory_then_success_after_free(pool):
    """Exhausting the pool raises LLM_OUT_OF_MEMORY at once; after a free the same request succeeds."""
    big = pool.allocate(pool.total - 8 * KIB)
    with pytest.raises(OutOfMemory) as info:
        pool.allocate(16 * KIB)
    assert info.value.code == LLMStatusCode.LLM_OUT_OF_MEMORY
    assert "exhausted" in str(info.value)
    pool.free(big)
    assert pool.allocate(16 * KIB) % pool.page_size == 0


@pytest.mark.parametrize("nbytes", [0, -1, True, 1.5, None])
def test_allocate_rejects_bad_sizes(pool, nbytes):
    with pytest.raises(ParamInvalid):
        pool.allocate(nbytes)  # type: ignore[arg-type]


def test_coalescing_with_both_neighbours(pool):
    a, b, c, d = (pool.allocate(4 * KIB) for _ in range(4))
    rest = pool.allocate(pool.total - 16 * KIB)
    pool.free(a)
    pool.free(c)
    assert len(pool.free_blocks()) == 2
    pool.free(b)  # merges with a (before) and c (after)
    assert pool.free_blocks() == [(a, 12 * KIB)]
    pool.free(rest)
    assert len(pool.free_blocks()) == 2
    pool.free(d)
    assert pool.free_blocks() == [(pool.addr, pool.total)]
    _check_invariants(pool, {})


def test_first_fit_reuses_holes(pool):
    a = pool.allocate(8 * KIB)
    pool.allocate(4 * KIB)
    pool.free(a)
    assert pool.allocate(4 * KIB) == a
    assert pool.allocate(4 * KIB) == a + 4 * KIB


def test_free_errors_never_corrupt(pool):
    a = pool.allocate(8 * KIB)
    before = pool.stats()
    for bad in (a + 4 * KIB, a + 1, 0, -1, pool.addr + pool.total, "x", None):
        with pytest.raises(ParamInvalid):
            pool.free(bad)  # type: ignore[arg-type]
    assert pool.stats() == before
    pool.free(a)
    with pytest.raises(ParamInvalid):
        pool.free(a)  # double free
    _check_invariants(pool, {})


def test_allocate_many_is_all_or_nothing(pool):
    keep = pool.allocate(4 * KIB)
    before = pool.stats()
    with pytest.raises(OutOfMemory):
        pool.allocate_many([16 * KIB, 16 * KIB, pool.total])
    assert pool.stats() == before
    with pytest.raises(ParamInvalid):
        pool.allocate_many([4 * KIB, 0])
    assert pool.stats() == before
    addrs = pool.allocate_many([4 * KIB, 5 * KIB, 1])
    assert len(set(addrs)) == 3 and pool.num_allocations == 4
    assert pool.allocate_many([]) == []
    pool.free_many(addrs)
    pool.free(keep)
    _check_invariants(pool, {})


def test_free_many_checks_everything_first(pool):
    a, b = pool.allocate(4 * KIB), pool.allocate(4 * KIB)
    before = pool.stats()
    with pytest.raises(ParamInvalid):
        pool.free_many([a, b + 1])
    with pytest.raises(ParamInvalid):
        pool.free_many([a, a])
    assert pool.stats() == before
    pool.free_many([b, a])
    assert pool.num_allocations == 0 and len(pool.free_blocks()) == 1


def test_random_alloc_free_stress_keeps_invariants():
    rng = random.Random(1234)
    p = _pool(256 * 4 * KIB, 12)
    live = {}
    try:
        for step in range(3000):
            if live and (rng.random() < 0.45 or p.free_bytes < 4 * KIB):
                addr = rng.choice(list(live))
                p.free(addr)
                del live[addr]
            else:
                size = rng.randint(1, 12 * 4 * KIB)
                try:
                    addr = p.allocate(size)
                except OutOfMemory:
                    assert p.largest_free < -(-size // p.page_size) * p.page_size
                    continue
                assert addr not in live
                live[addr] = size
            if step % 25 == 0:
                _check_invariants(p, live)
        for addr in list(live):
            p.free(addr)
        assert p.free_blocks() == [(p.addr, p.total)] and p.used == 0
    finally:
        p.close()


def test_thread_safety():
    p = _pool(512 * 4 * KIB, 12)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        mine = []
        try:
            for _ in range(400):
                if mine and rng.random() < 0.5:
                    p.free(mine.pop(rng.randrange(len(mine))))
                else:
                    try:
                        mine.append(p.allocate(rng.randint(1, 8 * 4 * KIB)))
                    except OutOfMemory:
                        pass
            p.free_many(mine)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert p.free_blocks() == [(p.addr, p.total)] and p.num_allocations == 0
    finally:
        p.close()


# -- sharing, backends, lifecycle ---------------------------------------------------------------
def test_region_can_be_mapped_by_a_peer(pool):
    addr = pool.allocate(8 * KIB)
    write_bytes(addr, b"pooled")
    region = pool.region
    assert region.kind == "host"
    segment = region.segment
    peer_addr, closer = map_shared(segment.path, segment.offset + region.nbytes)
    try:
        peer = peer_addr + segment.offset + (addr - region.addr)
        assert read_bytes(peer, 6) == b"pooled"
        write_bytes(peer + 100, b"back")
        assert read_bytes(addr + 100, 4) == b"back"
    finally:
        closer()


def test_device_pool_on_cpu_device():
    p = MemPool(PoolConfig(16 * KIB, 12), CpuDevice(2))
    try:
        assert p.region.device_id == 2 and p.region.kind == "host"
        assert p.allocate(1) == p.addr
    finally:
        p.close()


def _present_pages(addr: int, nbytes: int) -> list:
    """Bit 63 of /proc/self/pagemap for each page of the range: a page table entry exists (no privilege needed)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE_SIZE * 8)
        data = f.read(8 * (nbytes // PAGE_SIZE))
    return [(entry >> 63) & 1 for entry in struct.unpack(f"<{len(data) // 8}Q", data)]


def test_prefault_pool():
    npages = 64 * KIB // PAGE_SIZE
    lazy = MemPool(PoolConfig(64 * KIB, 12), HostMemory())  # the control: nothing mapped until it is touched
    try:
        assert _present_pages(lazy.addr, 64 * KIB) == [0] * npages
    finally:
        lazy.close()
    p = MemPool(PoolConfig(64 * KIB, 12), HostMemory(), prefault=True)
    try:
        assert _present_pages(p.addr, 64 * KIB) == [1] * npages
        assert os.fstat(p._segment.fd).st_blocks * 512 >= 64 * KIB  # the backing pages are reserved too
    finally:
        p.close()


def test_prefault_pool_out_of_memory_leaks_nothing(monkeypatch):
    def no_memory(fd, offset, length):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(os, "posix_fallocate", no_memory)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OutOfMemory) as info:
        MemPool(PoolConfig(64 * KIB, 12), HostMemory(), prefault=True)
    assert info.value.code == LLMStatusCode.LLM_OUT_OF_MEMORY
    assert len(os.listdir("/proc/self/fd")) == fds


def test_close_twice_and_use_after_close():
    fds = len(os.listdir("/proc/self/fd"))
    p = _pool(16 * KIB, 12)
    a = p.allocate(4 * KIB)
    assert "MemPool(" in repr(p)
    p.close()
    p.close()
    assert p.closed and "closed" in repr(p)
    with pytest.raises(EngineError, match="closed"):
        p.allocate(1)
    with pytest.raises(EngineError, match="closed"):
        p.allocate_many([1])
    p.free(a)  # memory already gone: no-op
    p.free_many([a])
    assert p.num_allocations == 0 and p.free_blocks() == []
    assert len(os.listdir("/proc/self/fd")) == fds
