"""Forged tcp data-plane requests with a real token: everything outside what the owner serves is refused.

A raw client links by hand (so it holds a real per-link token), learns the owner's cache views, and sends READ
and WRITE frames a well-behaved client never would. Every refusal is checked on the wire (status, no payload)
and on the owner (its bytes unchanged); a valid request on the same connection afterwards still works. Block
indices far beyond any cache, given to the public API, are refused the same way (LLM_PARAM_INVALID, nothing moved).
"""
from __future__ import annotations

import mmap

import numpy as np
import pytest

from llm_datadist import BlocksCacheKey, LLMException, LLMRole
from llm_datadist._engine import protocol as proto
from llm_datadist._transport import tcp_wire as dwire
from llm_datadist.status import LLMStatusCode
from tests.reliability import kv, local, wire
from tests.reliability.procs import server

P = 31
NT, NB, BB = 2, 8, 256
U64_MAX = (1 << 64) - 1


@pytest.fixture
def owner(spawn):
    """An owner in pull mode with a HOST cache (model 0), a DEVICE cache (model 1), both with the default
    remote_accessible, and a cache registered remote_accessible=True (model 2, the only one peers may write)."""
    peer, port = server(spawn, P)
    for model, placement, ra in ((0, 0, None), (1, 1, None), (2, 0, True)):
        peer.call("blocks", name=f"m{model}", num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=model,
                  placement=placement, remote_accessible=ra)
    link = wire.RawLink(port, 901)
    conn = wire.DataConn(link.data_port)
    assert conn.hello(link.token)
    yield peer, link, conn
    conn.close()
    link.close()


def _expect_served(conn: wire.DataConn, view, gen: int = 1) -> None:
    """The control request: a valid READ of the whole first tensor, with its guard, returns its exact bytes."""
    status, data = conn.read([(view.tensor_addrs[0], view.tensor_nbytes)], wire.guard_of(view))
    assert status == dwire.ST_OK
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(NB, BB), kv.content(gen, 0, NB, BB))


def _registered_intervals(link: wire.RawLink):
    """The owner's readable memory (every tensor of the three caches), coalesced into sorted (start, end)."""
    ranges = sorted((a, a + v.tensor_nbytes) for v in (link.blocks_view(P, m) for m in range(3))
                    for a in v.tensor_addrs)
    merged = [list(ranges[0])]
    for a, e in ranges[1:]:
        if a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([a, e])
    return [tuple(m) for m in merged]


def _registered_interval(link: wire.RawLink, addr: int):
    return next((s, e) for s, e in _registered_intervals(link) if s <= addr < e)


def test_reads_outside_registered_memory_are_refused_and_return_nothing(owner):
    _peer, link, conn = owner
    view = link.blocks_view(P, 0)
    # Where the owner's allocator puts the caches is its own business: two tensors may be adjacent, and a
    # range past one tensor may lie in another (and must then be served). The boundaries tested are those of
    # the registered memory as a whole: the coalesced interval that holds tensor 0, and past the last one.
    start, end = _registered_interval(link, view.tensor_addrs[0])
    beyond = max(e for _, e in _registered_intervals(link)) + 4096
    bad = {
        "one byte before": [(start - 1, 16)],
        "across the end": [(end - 8, 16)],
        "past the end": [(beyond, 64)],
        "huge size": [(start, 1 << 63)],
        "size 2**64-1": [(start, U64_MAX)],
        "wraps the address space": [(U64_MAX - 7, 16)],
        "address 0": [(0, 64)],
        "one bad range among many": [(start + 64 * i, 64) for i in range(32)] + [(end, 64)],
    }
    for what, ranges in bad.items():
        status, data = conn.read(ranges, wire.guard_of(view))
        assert (status, data) == (dwire.ST_REJECTED, b""), what
    _expect_served(conn, view)  # the connection survived every refusal


def test_the_guard_table_is_never_served(owner):
    _peer, link, conn = owner
    view = link.blocks_view(P, 0)
    slot, _value, word_addr = view.guard
    table = word_addr - 8 * slot - mmap.PAGESIZE  # slots follow a one-page header (magic, the instance nonce)
    for ranges in ([(word_addr, 8)], [(table, 64)], [(table, mmap.PAGESIZE + 8 * (slot + 1))]):
        assert conn.read(ranges) == (dwire.ST_REJECTED, b"")
    _expect_served(conn, view)


def test_stale_or_forged_guards_are_refused(owner):
    peer, link, conn = owner
    view = link.blocks_view(P, 0)
    slot, value, _addr = view.guard
    ranges = [(view.tensor_addrs[0], 64)]
    for guards in ([(slot, value ^ 2)], [(slot, 0)], [(2**32 - 1, value)], [(slot, value), (slot + 1, value)]):
        assert conn.read(ranges, guards) == (dwire.ST_STALE, b""), guards
    peer.call("renew", name="m0")  # the owner releases and registers again: a new generation
    assert conn.read(ranges, [(slot, value)]) == (dwire.ST_STALE, b"")
    fresh = link.blocks_view(P, 0)
    assert tuple(fresh.guard) != tuple(view.guard)
    _expect_served(conn, fresh, gen=2)


@pytest.mark.parametrize("model", [0, 1], ids=["host-default", "device-default"])
def test_writes_into_a_pull_mode_default_cache_are_refused_and_move_nothing(owner, model):
    peer, link, conn = owner
    view = link.blocks_view(P, model)
    garbage = b"\xab" * BB
    for ranges in ([(view.tensor_addrs[0], BB)], [(view.tensor_addrs[1] + BB * 3, BB)]):
        assert conn.write(ranges, garbage, wire.guard_of(view)) == dwire.ST_REJECTED
    assert peer.call("check_blocks", name=f"m{model}", gen=1)["gen"] == 1  # every owner byte unchanged
    _expect_served(conn, view)
    # the one-sided route's way in, a write grant over the control link, is refused as well
    reply = link.call(proto.WriteGrant(guards=wire.guard_of(view)))
    assert isinstance(reply, proto.Error) and reply.code == LLMStatusCode.LLM_PARAM_INVALID, reply


def test_writes_with_a_stale_guard_or_outside_a_writable_cache_are_refused(owner):
    """The explicitly remote-accessible cache takes a valid write; a stale one or one past its end does not."""
    peer, link, conn = owner
    view = link.blocks_view(P, 2)
    slot, value, _addr = view.guard
    block = kv.content(7, 0, NB, BB)[5].tobytes()  # block 5 of a generation the owner never had
    start = view.tensor_addrs[0]
    assert conn.write([(start + 2 * BB, BB)], block, [(slot, value ^ 2)]) == dwire.ST_STALE
    assert conn.write([(start + view.tensor_nbytes - 8, BB)], block, [(slot, value)]) == dwire.ST_REJECTED
    assert peer.call("check_blocks", name="m2", gen=1)["gen"] == 1
    assert conn.write([(start + 2 * BB, BB)], block, [(slot, value)]) == dwire.ST_OK  # the write path works
    status, data = conn.read([(start + 2 * BB, BB)], [(slot, value)])
    assert (status, data) == (dwire.ST_OK, block)
    random_guard = link.call(proto.WriteGrant(guards=[(slot ^ 5, 12345)]))
    assert isinstance(random_guard, proto.Error) and random_guard.code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


def test_block_indices_beyond_any_cache_are_refused_by_the_api_and_move_nothing(owner, make_dd):
    peer, _link, _conn = owner
    dd = make_dd(LLMRole.DECODER, 902)
    local.link(dd, P, peer.port)
    cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB)
    for index in (NB, 2**62, 2**63, 2**64 - 1, 2**64, -1):
        for src, dst in (([index], [0]), ([0], [index])):
            with pytest.raises(LLMException) as refused:
                dd.cache_manager.pull_blocks(BlocksCacheKey(P, 0), cache, src, dst)
            assert refused.value.status_code == LLMStatusCode.LLM_PARAM_INVALID, (index, src, dst)
    assert local.untouched(arrays)
    dd.cache_manager.pull_blocks(BlocksCacheKey(P, 0), cache, [NB - 1], [0])
    assert kv.one_generation(arrays, [0], [NB - 1]) == 1
    local.unlink(dd, P, peer.port)
