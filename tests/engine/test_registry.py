"""Tests of the cache registry: ids, key tables, reference counting, key consumption by pulls."""
from __future__ import annotations

import threading
from typing import List, Optional

import pytest

from llm_datadist._engine.errors import CacheNotExist, ParamInvalid
from llm_datadist._engine.registry import NS_PREFIX, NS_REQ, UINT64_MAX, CacheEntry, KeyId, Registry, key_id

PH = key_id(UINT64_MAX, 0)  # placeholder CacheKey(req_id=UINT64_MAX)


def req(ident: int, model_id: int = 0) -> KeyId:
    return key_id(ident, model_id)


def prefix(ident: int, model_id: int = 0) -> KeyId:
    return key_id(UINT64_MAX, model_id, prefix_id=ident)


class Recorder:
    def __init__(self) -> None:
        self.released: List[int] = []

    def __call__(self, entry: CacheEntry) -> None:
        assert entry.released
        self.released.append(entry.cache_id)


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def reg(rec):
    return Registry(rec)


def entry(reg: Registry, dim0: int = 4, num_tensors: int = 2, blocks: bool = False, owned: bool = True,
          cache_id: Optional[int] = None) -> CacheEntry:
    cid = reg.new_id() if cache_id is None else cache_id
    addrs = tuple(0x10000 * (cid * 8 + t + 1) for t in range(num_tensors))
    return CacheEntry(cid, addrs, tensor_nbytes=dim0 * 256, dim0=dim0, is_blocks=blocks, owned=owned,
                      data_type=1, shape=(dim0, 16, 16))


def allocated(reg, keys=(), **kw) -> CacheEntry:
    e = entry(reg, **kw)
    reg.add_allocated(e, keys)
    return e


def registered(reg, keys=(), **kw) -> CacheEntry:
    e = entry(reg, owned=False, **kw)
    reg.add_registered(e, keys)
    return e


# -- keys and entries ---------------------------------------------------------------------------
def test_key_id_namespaces():
    assert key_id(5, 1) == KeyId(NS_REQ, 5, 1)
    assert key_id(UINT64_MAX, 2, prefix_id=7) == KeyId(NS_PREFIX, 7, 2)
    assert key_id(5, 2, prefix_id=7).namespace == NS_PREFIX  # a valid prefix id selects the prefix table
    assert PH.is_placeholder and PH.namespace == NS_REQ
    assert not prefix(UINT64_MAX - 1).is_placeholder
    assert req(1).consumable and not prefix(1).consumable
    assert key_id(-1, 0).is_placeholder


def test_entry_geometry():
    e = CacheEntry(1, [0x1000, 0x2000, 0x3000], tensor_nbytes=1000, dim0=3, shape=[3, 5])
    assert e.num_tensors == 3 and e.stride == 333 and e.tensor_addrs == (0x1000, 0x2000, 0x3000)
    assert e.shape == (3, 5) and e.is_registered
    with pytest.raises(ParamInvalid):
        CacheEntry(1, [1], tensor_nbytes=10, dim0=0)


def test_ids_start_at_one_shared_and_never_reused(reg):
    """Ids from 1, shared by allocate and register, never reused."""
    a = allocated(reg)
    r = registered(reg)
    assert (a.cache_id, r.cache_id) == (1, 2)
    reg.release_id(1)
    reg.unregister(2)
    assert allocated(reg).cache_id == 3
    reg.clear()
    assert reg.new_id() == 4


def test_add_with_unissued_or_duplicate_id(reg):
    with pytest.raises(ParamInvalid):
        reg.add_allocated(entry(reg, cache_id=99))
    e = allocated(reg)
    with pytest.raises(ParamInvalid):
        reg.add_registered(entry(reg, owned=False, cache_id=e.cache_id))
    assert len(reg) == 1


def test_keys_bind_to_slots_and_placeholders_skip(reg):
    """A placeholder at position i leaves slot i unbound; other slots are bound."""
    e = allocated(reg, [req(10), PH, req(12)])
    assert reg.lookup_key(req(10)) == (e, 0)
    assert reg.lookup_key(req(12)) == (e, 2)
    assert reg.slot_key(e.cache_id, 1) is None and reg.slot_key(e.cache_id, 3) is None
    assert reg.slot_key(999, 0) is None
    with pytest.raises(CacheNotExist):
        reg.lookup_key(PH)
    with pytest.raises(CacheNotExist):
        reg.lookup_key(req(11))


def test_several_placeholders_are_allowed_everywhere(reg):
    """Placeholders are exempt from duplicate and already-bound checks and never collide with blocks keys."""
    b = entry(reg, blocks=True)
    reg.add_blocks(b, 0, replace=False)
    e1 = allocated(reg, [PH, PH, req(1)])
    e2 = allocated(reg, [PH, None, PH])
    e3 = registered(reg, [PH, PH])
    assert reg.lookup_blocks(0) is b
    assert not e2.slot_keys and not e3.slot_keys and e1.slot_keys == {2: req(1)}
    b2 = entry(reg, blocks=True)
    reg.add_blocks(b2, 1, replace=False)  # a blocks key after placeholders of model 1 is fine too
    allocated(reg, [key_id(UINT64_MAX, 1)])


def test_more_keys_than_batch_size(reg):
    """More keys than shape[0] → PARAM_INVALID; fewer is fine."""
    with pytest.raises(ParamInvalid, match="exceeds"):
        allocated(reg, [req(i) for i in range(5)], dim0=4)
    with pytest.raises(ParamInvalid):
        registered(reg, [PH] * 3, dim0=2)
    assert len(reg) == 0
    allocated(reg, [req(1)], dim0=4)
    with pytest.raises(CacheNotExist):
        reg.lookup_key(req(0))


def test_key_bound_elsewhere_is_rejected_without_partial_binding(reg):
    """A key bound to another cache raises; nothing of the failed request is bound."""
    first = allocated(reg, [req(1)])
    with pytest.raises(ParamInvalid, match="already bound to cache"):
        allocated(reg, [req(2), req(1)])
    with pytest.raises(ParamInvalid):
        registered(reg, [req(1)])
    with pytest.raises(CacheNotExist):
        reg.lookup_key(req(2))
    assert reg.entries() == [first]
    allocated(reg, [prefix(1), req(1, model_id=1)])  # other namespace / other model: distinct keys


def test_duplicate_key_in_one_request_last_one_wins(reg):
    """A duplicate key binds to the highest slot containing it; earlier slots stay unbound."""
    e = allocated(reg, [req(7), req(8), req(7), PH])
    assert reg.lookup_key(req(7)) == (e, 2)
    assert reg.lookup_key(req(8)) == (e, 1)
    assert reg.slot_key(e.cache_id, 0) is None
    r = registered(reg, [prefix(3), prefix(3)])
    assert reg.lookup_key(prefix(3)) == (r, 1)


def test_keys_given_as_plain_tuples_and_bad_keys(reg):
    e = allocated(reg, [("req", 4, 0)])
    assert reg.lookup_key(req(4)) == (e, 0)
    with pytest.raises(ParamInvalid):
        allocated(reg, ["bad"])


def test_blocks_cache_cannot_bind_cache_keys(reg):
    with pytest.raises(ParamInvalid):
        allocated(reg, [req(1)], blocks=True)
    with pytest.raises(ParamInvalid):
        reg.add_blocks(entry(reg), 0, replace=False)  # not a blocks entry


def test_get_unknown(reg):
    with pytest.raises(CacheNotExist):
        reg.get(1)
    e = allocated(reg)
    assert reg.get(e.cache_id) is e and e.cache_id in reg and 5 not in reg


# -- reference counting of allocated continuous caches ------------------------------------------
def test_release_without_keys_frees_at_once(reg, rec):
    e = allocated(reg, [PH])
    assert reg.release_id(e.cache_id) is True
    assert rec.released == [e.cache_id] and e.released
    with pytest.raises(CacheNotExist):
        reg.get(e.cache_id)
    assert reg.release_id(e.cache_id) is False  # already freed → no-op
    assert reg.release_id(12345) is False
    assert rec.released == [e.cache_id]


def test_deferred_free_until_last_key_removed(reg, rec):
    """Deallocate with bound keys defers the free until every key is removed."""
    e = allocated(reg, [req(1), req(2)])
    assert reg.release_id(e.cache_id) is False
    assert not e.id_ref and rec.released == []
    assert reg.get(e.cache_id) is e and reg.lookup_key(req(1)) == (e, 0)
    assert reg.release_id(e.cache_id) is False  # second deallocate: no-op
    assert reg.remove_key(req(1)) is True
    assert rec.released == []
    with pytest.raises(CacheNotExist):
        reg.lookup_key(req(1))
    assert reg.remove_key(req(2)) is True
    assert rec.released == [e.cache_id]
    with pytest.raises(CacheNotExist):
        reg.get(e.cache_id)


def test_remove_key_before_release(reg, rec):
    e = allocated(reg, [req(1)])
    assert reg.remove_key(req(1)) is True
    assert rec.released == [] and reg.get(e.cache_id) is e  # id reference still held
    assert reg.release_id(e.cache_id) is True
    assert rec.released == [e.cache_id]


def test_remove_key_noops(reg, rec):
    """Removing an unbound, consumed or placeholder key is a no-op."""
    e = allocated(reg, [req(1)])
    assert reg.remove_key(req(99)) is False
    assert reg.remove_key(PH) is False
    assert reg.remove_key(None) is False  # type: ignore[arg-type]
    assert reg.note_pulled(e.cache_id, 0, 0, 2) is True
    assert reg.remove_key(req(1)) is False
    assert rec.released == []


def test_prefix_keys_only_removed_explicitly(reg, rec):
    """Pulls never consume prefix keys; remove_cache_key does."""
    e = allocated(reg, [prefix(5), req(5)])
    assert reg.note_pulled(e.cache_id, 0, 0, 2) is False
    assert reg.lookup_key(prefix(5)) == (e, 0)
    reg.release_id(e.cache_id)
    assert reg.note_pulled(e.cache_id, 1, 0, 2) is True  # consumes req(5), prefix key keeps it alive
    assert rec.released == []
    assert reg.remove_key(prefix(5)) is True
    assert rec.released == [e.cache_id]


# -- pulls: key consumption per (cache, slot) ------------------------------------------------------
def test_full_pull_consumes_key_then_frees_deferred_cache(reg, rec):
    e = allocated(reg, [req(1), req(2)], num_tensors=4)
    reg.release_id(e.cache_id)
    assert reg.note_pulled(e.cache_id, 0, 0, 4) is True
    with pytest.raises(CacheNotExist):
        reg.lookup_key(req(1))
    assert rec.released == []
    assert reg.note_pulled(e.cache_id, 1, 0, 4) is True
    assert rec.released == [e.cache_id]
    assert reg.note_pulled(e.cache_id, 1, 0, 4) is False  # cache gone: nothing to consume


def test_partial_pulls_tracked_per_slot(reg):
    """A key is consumed when every tensor of ITS slot was pulled at least once."""
    e = allocated(reg, [req(1), req(2)], num_tensors=6)
    cid = e.cache_id
    assert reg.note_pulled(cid, 0, 0, 2) is False
    assert reg.note_pulled(cid, 1, 2, 6) is False  # other slot: must not count for slot 0
    assert reg.note_pulled(cid, 0, 0, 4) is False  # overlaps are fine
    assert reg.lookup_key(req(1)) == (e, 0)
    assert reg.note_pulled(cid, 0, 4, 6) is True
    assert reg.lookup_key(req(2)) == (e, 1)
    assert reg.note_pulled(cid, 1, 0, 2) is True


def test_pull_by_id_and_index_of_keyed_slot_consumes(reg):
    """The engine reports an id+index pull of a keyed slot the same way; the key is consumed."""
    e = allocated(reg, [PH, req(3)])
    assert reg.note_pulled(e.cache_id, 0, 0, 2) is False  # unkeyed slot: nothing consumed
    assert reg.note_pulled(e.cache_id, 1, 0, 2) is True
    with pytest.raises(CacheNotExist):
        reg.lookup_key(req(3))


def test_note_pulled_rejects_bad_ranges(reg):
    e = allocated(reg, [req(1)], num_tensors=2, dim0=2)
    for slot, lo, hi in ((0, 0, 3), (0, -1, 1), (0, 1, 1), (2, 0, 1), (-1, 0, 1)):
        with pytest.raises(ParamInvalid):
            reg.note_pulled(e.cache_id, slot, lo, hi)
    assert reg.note_pulled(424242, 0, 0, 1) is False


def test_many_tensors_bitmask(reg):
    e = allocated(reg, [req(1)], num_tensors=190, dim0=1)
    for lo in range(0, 188, 2):
        assert reg.note_pulled(e.cache_id, 0, lo, lo + 2) is False
    assert reg.note_pulled(e.cache_id, 0, 188, 190) is True


# -- registered caches: never consumed, never freed --------------------------------------------
def test_registered_cache_keys_are_permanent(reg, rec):
    r = registered(reg, [req(1), prefix(2)])
    assert reg.release_id(r.cache_id) is False and r.id_ref  # deallocate: no-op
    assert reg.remove_key(req(1)) is False  # a registered cache keeps its memory
    assert reg.note_pulled(r.cache_id, 0, 0, 2) is False  # pulls never consume a registered cache's key
    assert reg.lookup_key(req(1)) == (r, 0)
    assert rec.released == []
    assert reg.unregister(r.cache_id) is True
    assert rec.released == [r.cache_id]
    with pytest.raises(CacheNotExist):
        reg.lookup_key(prefix(2))
    assert reg.unregister(r.cache_id) is False  # unknown id → no-op
    assert reg.unregister(-5) is False
    assert rec.released == [r.cache_id]


def test_unregister_allocated_cache_releases_once(reg, rec):
    e = allocated(reg, [req(1)])
    reg.release_id(e.cache_id)
    assert reg.unregister(e.cache_id) is True
    assert reg.remove_key(req(1)) is False
    assert rec.released == [e.cache_id]


# -- blocks caches: one per model id, freed at once ------------------------------------------
def test_allocated_blocks_key_conflict_and_immediate_free(reg, rec):
    b = entry(reg, blocks=True)
    reg.add_blocks(b, 7, replace=False)
    assert reg.lookup_blocks(7) is b and b.blocks_model_id == 7
    with pytest.raises(ParamInvalid, match="already bound"):
        reg.add_blocks(entry(reg, blocks=True), 7, replace=False)  # the model id is bound already
    assert reg.note_pulled(b.cache_id, 0, 0, 2) is False  # pulls never unbind blocks keys
    assert reg.release_id(b.cache_id) is True  # immediate
    assert rec.released == [b.cache_id]
    with pytest.raises(CacheNotExist):
        reg.lookup_blocks(7)
    b2 = entry(reg, blocks=True)
    reg.add_blocks(b2, 7, replace=False)
    assert reg.lookup_blocks(7) is b2


def test_registered_blocks_newest_wins(reg, rec):
    old = entry(reg, blocks=True, owned=False)
    reg.add_blocks(old, 0, replace=True)
    new = entry(reg, blocks=True, owned=False)
    reg.add_blocks(new, 0, replace=True)
    assert reg.lookup_blocks(0) is new and old.blocks_model_id is None
    assert reg.release_id(new.cache_id) is False  # registered: deallocate is a no-op
    reg.unregister(old.cache_id)
    assert reg.lookup_blocks(0) is new  # removing the older one does not drop the newer binding
    unkeyed = entry(reg, blocks=True, owned=False)
    reg.add_blocks(unkeyed, None, replace=True)
    assert unkeyed.blocks_model_id is None
    reg.unregister(new.cache_id)
    with pytest.raises(CacheNotExist):
        reg.lookup_blocks(0)
    assert rec.released == [old.cache_id, new.cache_id]


# -- snapshot, version, clear -------------------------------------------------------------------
def test_snapshot_and_version(reg):
    v0 = reg.version
    e = allocated(reg, [PH, req(9, 1)])
    b = entry(reg, blocks=True)
    reg.add_blocks(b, 3, replace=False)
    version, caches = reg.snapshot()
    assert version == reg.version > v0
    assert reg.snapshot() is reg.snapshot()  # cached while nothing changes
    assert [c["cache_id"] for c in caches] == [e.cache_id, b.cache_id]
    first = caches[0]
    assert first["keys"] == [["req", 9, 1, 1]] and first["addrs"] == list(e.tensor_addrs)
    assert (first["stride"], first["dim0"], first["num_tensors"], first["is_blocks"]) == (256, 4, 2, False)
    assert caches[1]["blocks_model_id"] == 3 and caches[1]["is_blocks"]
    assert set(first) >= {"tensor_nbytes", "placement", "remote_accessible", "owned", "data_type", "shape"}
    reg.note_pulled(e.cache_id, 1, 0, 1)  # partial: nothing visible changes
    assert reg.version == version
    reg.note_pulled(e.cache_id, 1, 1, 2)
    assert reg.version > version
    assert reg.snapshot()[1][0]["keys"] == []


def test_clear_releases_everything_once(reg, rec):
    a = allocated(reg, [req(1)])
    reg.release_id(a.cache_id)
    r = registered(reg, [req(2)])
    b = entry(reg, blocks=True)
    reg.add_blocks(b, 0, replace=False)
    assert reg.clear() == 3
    assert sorted(rec.released) == [a.cache_id, r.cache_id, b.cache_id]
    assert len(reg) == 0 and reg.clear() == 0
    for key in (req(1), req(2)):
        with pytest.raises(CacheNotExist):
            reg.lookup_key(key)
    assert reg.entries() == [] and reg.snapshot()[1] == ()


def test_on_release_failure_is_logged_not_raised(caplog):
    calls = []

    def boom(entry):
        calls.append(entry.cache_id)
        raise RuntimeError("deregister failed")

    reg = Registry(boom)
    e1, e2 = allocated(reg), allocated(reg)
    assert reg.clear() == 2
    assert calls == [e1.cache_id, e2.cache_id]
    assert "releasing cache" in caplog.text
    Registry().clear()  # no callback at all


def test_on_release_runs_outside_the_lock(reg):
    seen = []

    def check(entry):
        got = []

        def probe():
            ok = reg.lock.acquire(blocking=False)
            got.append(ok)
            if ok:
                reg.lock.release()

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        seen.append(got[0])

    reg._on_release = check
    e = allocated(reg)
    reg.release_id(e.cache_id)
    assert seen == [True]


# -- pinning ------------------------------------------------------------------------------------
def test_pin_defers_release_until_unpin(reg, rec):
    e = allocated(reg, [req(1)])
    with reg.pinned(e.cache_id) as pinned:
        assert pinned is e and e.pins == 1
        pin2 = reg.pin(e.cache_id)
        assert reg.note_pulled(e.cache_id, 0, 0, 2) is True
        reg.release_id(e.cache_id)
        assert rec.released == [] and e.released
        with pytest.raises(CacheNotExist):
            reg.pin(e.cache_id)
        reg.unpin(pin2)
        assert rec.released == []
    assert rec.released == [e.cache_id]
    with pytest.raises(ParamInvalid):
        reg.unpin(e)


# -- concurrency --------------------------------------------------------------------------------
def test_concurrent_lifecycles_release_each_entry_exactly_once(reg, rec):
    errors = []

    def worker(tid):
        try:
            for i in range(150):
                key = req(tid * 1000 + i)
                e = allocated(reg, [key])
                if i % 2:
                    reg.release_id(e.cache_id)
                    reg.note_pulled(e.cache_id, 0, 0, 2)
                else:
                    reg.note_pulled(e.cache_id, 0, 0, 2)
                    reg.remove_key(key)
                    reg.release_id(e.cache_id)
                reg.release_id(e.cache_id)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(reg) == 0
    assert sorted(rec.released) == list(range(1, 6 * 150 + 1))
