"""Write grants a writer keeps for reuse (_engine/grants.py): one owner round trip per destination generation, not
per push; given back when the owner asks (its release waits for it, never for a timeout), when unused, beyond the
per-link cap, after a failed write; never used once taken back."""
from __future__ import annotations

import threading

import pytest

from llm_datadist import BlocksCacheKey
from llm_datadist._engine import grants
from llm_datadist._engine.grants import HeldGrants
from waiting import wait_until

P_ID = 1  # the conftest pair's ids
KEY_A = ((3, 0xAAAA),)
KEY_B = ((3, 0xBBBB), (4, 0x4444))


@pytest.fixture
def held():
    released = []
    return HeldGrants(released.append), released


def test_a_grant_is_reused_for_its_generation_only(held):
    book, released = held
    assert book.take(KEY_A) is None
    first = book.add(11, KEY_A)
    book.done(first)
    again = book.take(KEY_A)
    assert again is first and book.take(KEY_B) is None
    book.done(again)
    assert released == [] and book.held() == 1


def test_a_revoked_grant_goes_back_when_its_last_write_ends(held):
    book, released = held
    grant = book.add(11, KEY_A)
    second = book.take(KEY_A)
    book.revoke(11)
    assert book.take(KEY_A) is None  # no new write takes it
    book.done(grant)
    assert released == []  # one write still runs under it
    book.done(second)
    assert released == [11] and book.held() == 0
    book.revoke(11)  # asked again after it went back: nothing more
    assert released == [11]


def test_idle_failed_and_excess_grants_go_back(held, monkeypatch):
    book, released = held
    book.done(book.add(11, KEY_A))
    book.expire(idle_s=3600)
    assert released == []
    book.expire(idle_s=0)
    assert released == [11]
    book.done(book.add(12, KEY_B), failed=True)  # the destination may have changed: not reused
    assert released == [11, 12] and book.take(KEY_B) is None
    monkeypatch.setattr(grants, "MAX_HELD", 2)
    for grant_id in (21, 22, 23):
        book.done(book.add(grant_id, ((grant_id, 1),)))
    assert released == [11, 12, 21] and book.held() == 2


def test_concurrent_takers_and_a_revocation_release_exactly_once(held):
    book, released = held
    grant = book.add(7, KEY_A)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            taken = book.take(KEY_A)
            if taken is not None:
                book.done(taken)

    workers = [threading.Thread(target=writer) for _ in range(4)]
    for w in workers:
        w.start()
    book.revoke(7)
    stop.set()
    for w in workers:
        w.join()
    book.done(grant)
    assert released == [7]


def _owner_grants(pair) -> int:
    return sum(len(link.grants) for link in pair.p._engine.links.links())


def _writer_grants(pair) -> int:
    return sum(link.held_grants.held() for link in pair.d._engine.links.links())


def test_pushes_share_one_grant_and_the_owner_frees_its_cache_at_once(pd_ra, new_cache):
    """20 pushes into one destination cost one grant; the owner's unregister asks for it back and returns as soon
    as the writer gave it back (before grants were kept, it needed none)."""
    dst, dst_arrays = new_cache(pd_ra.p_cm, 2, (8, 64), blocks=True, blocks_key=BlocksCacheKey(P_ID, 0),
                                remote_accessible=True)
    src, src_arrays = new_cache(pd_ra.d_cm, 2, (8, 64), blocks=True, remote_accessible=True)
    for i in range(20):
        pd_ra.d_cm.push_blocks(BlocksCacheKey(P_ID, 0), src, [i % 8], [(i * 3) % 8])
    assert all((dst_arrays[t][(19 * 3) % 8] == src_arrays[t][19 % 8]).all() for t in range(2))
    assert _owner_grants(pd_ra) == 1 and _writer_grants(pd_ra) == 1
    pd_ra.p_cm.unregister_cache(dst.cache_id)  # raises LLMException(LLM_TIMEOUT) if the grant never came back
    assert _owner_grants(pd_ra) == 0
    assert wait_until(lambda: _writer_grants(pd_ra) == 0)
    # a new cache under the same key is a new generation: a new grant
    new_cache(pd_ra.p_cm, 2, (8, 64), blocks=True, blocks_key=BlocksCacheKey(P_ID, 0), remote_accessible=True)
    pd_ra.d_cm.push_blocks(BlocksCacheKey(P_ID, 0), src, [0], [0])
    assert _owner_grants(pd_ra) == 1


def test_an_unused_grant_goes_back_by_itself(pd_ra, new_cache, monkeypatch):
    monkeypatch.setattr(grants, "IDLE_S", 0.0)
    new_cache(pd_ra.p_cm, 1, (4, 64), blocks=True, blocks_key=BlocksCacheKey(P_ID, 0), remote_accessible=True)
    src, _ = new_cache(pd_ra.d_cm, 1, (4, 64), blocks=True, remote_accessible=True)
    pd_ra.d_cm.push_blocks(BlocksCacheKey(P_ID, 0), src, [0], [1], tensor_num_per_layer=1)
    assert wait_until(lambda: _owner_grants(pd_ra) == 0 and _writer_grants(pd_ra) == 0)  # the reporter's second
