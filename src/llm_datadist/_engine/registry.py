"""Per-instance cache registry: cache entries, key tables and reference counting."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from llm_datadist._engine.errors import CacheNotExist, ParamInvalid

__all__ = ["UINT64_MAX", "NS_REQ", "NS_PREFIX", "KeyId", "key_id", "CacheEntry", "Registry"]

_log = logging.getLogger(__name__)

UINT64_MAX = (1 << 64) - 1
NS_REQ = "req"
NS_PREFIX = "prefix"


class KeyId(NamedTuple):
    """Identity of a CacheKey inside one instance: (namespace, req_id or prefix_id, model_id)."""

    namespace: str
    ident: int
    model_id: int

    @property
    def is_placeholder(self) -> bool:
        """``req_id == prefix_id == UINT64_MAX``: leaves its slot unbound and binds nothing."""
        return self.namespace == NS_REQ and self.ident == UINT64_MAX

    @property
    def consumable(self) -> bool:
        """Normal-namespace keys are consumed by pulls; prefix keys never are."""
        return self.namespace == NS_REQ


def _valid_id(value: int) -> bool:
    return 0 <= value < UINT64_MAX


def key_id(req_id: int, model_id: int = 0, prefix_id: int = UINT64_MAX) -> KeyId:
    """The KeyId of a CacheKey: a valid prefix_id selects the prefix namespace, else the normal one."""
    if _valid_id(prefix_id):
        return KeyId(NS_PREFIX, prefix_id, model_id)
    return KeyId(NS_REQ, req_id if _valid_id(req_id) else UINT64_MAX, model_id)


@dataclasses.dataclass(eq=False)
class CacheEntry:
    """One cache of this instance. Mutated only by the Registry, under its lock.

    ``stride`` is the bytes of one batch slot (continuous) or one block (blocks) of one tensor.
    ``context`` is free for the engine (e.g. the pool the memory came from).
    """

    cache_id: int
    tensor_addrs: Tuple[int, ...]
    tensor_nbytes: int
    dim0: int
    placement: int = 0
    is_blocks: bool = False
    is_mix: bool = False
    owned: bool = False
    remote_accessible: bool = False
    writable: bool = False  # peers may write into it (pushes, layer-wise pushes)
    data_type: int = 0
    shape: Tuple[int, ...] = ()
    device_id: int = 0
    kind: str = "host"  # memory kind of its tensors (the backend that owns the memory)
    guard: Any = None  # the Guard (generation word) peers check before trusting a view of this cache
    context: Any = None
    # state, owned by the Registry
    id_ref: bool = True
    slot_keys: Dict[int, KeyId] = dataclasses.field(default_factory=dict)
    pulled: Dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> bitmask of pulled tensors
    blocks_model_id: Optional[int] = None
    released: bool = False
    pins: int = 0
    release_pending: bool = False
    freed: threading.Event = dataclasses.field(default_factory=threading.Event)  # set once memory is released
    side_cache: Any = None  # the planner's Side of this cache, made on first use

    def __post_init__(self) -> None:
        self.tensor_addrs = tuple(int(a) for a in self.tensor_addrs)
        self.shape = tuple(int(d) for d in self.shape)
        if self.dim0 <= 0 or self.tensor_nbytes < 0:
            raise ParamInvalid(f"cache shape[0] must be > 0 and tensor size >= 0, got dim0={self.dim0}, "
                               f"tensor_nbytes={self.tensor_nbytes}")

    @property
    def num_tensors(self) -> int:
        return len(self.tensor_addrs)

    @property
    def stride(self) -> int:
        return self.tensor_nbytes // self.dim0

    @property
    def is_registered(self) -> bool:
        return not self.owned

    def describe(self) -> Dict[str, Any]:
        """A plain description for peers (encodable by msgpack/JSON)."""
        return {
            "cache_id": self.cache_id, "addrs": list(self.tensor_addrs), "tensor_nbytes": self.tensor_nbytes,
            "stride": self.stride, "dim0": self.dim0, "num_tensors": self.num_tensors,
            "placement": self.placement, "is_blocks": self.is_blocks, "is_mix": self.is_mix,
            "owned": self.owned, "remote_accessible": self.remote_accessible, "data_type": self.data_type,
            "shape": list(self.shape), "blocks_model_id": self.blocks_model_id,
            "keys": [[k.namespace, k.ident, k.model_id, slot] for slot, k in sorted(self.slot_keys.items())],
        }


class Registry:
    """Cache table of one instance, under one RLock.

    ``on_invalidate(entry)`` is called under the lock the moment an entry leaves the table (its generation
    word changes there, before the call that removed it returns). ``reguard(old_guard) -> new_guard`` gives a
    live entry a new generation when it loses a key (unbound, or a blocks key moved to another cache), so a
    peer's view that found this cache through that key fails its check instead of reading the wrong cache.
    ``on_release(entry)`` is called exactly once
    per entry whose memory must be released (owned: back to the pool; registered: deregister from transports),
    outside the lock and after the last :meth:`unpin`; ``entry.freed`` is set after it.
    """

    def __init__(self, on_release: Optional[Callable[[CacheEntry], None]] = None,
                 on_invalidate: Optional[Callable[[CacheEntry], None]] = None,
                 reguard: Optional[Callable[[Any], Any]] = None) -> None:
        self._on_release = on_release
        self._on_invalidate = on_invalidate
        self._reguard = reguard
        self._lock = threading.RLock()
        self._next_id = 1
        self._entries: Dict[int, CacheEntry] = {}
        self._keys: Dict[KeyId, Tuple[int, int]] = {}  # key -> (cache_id, slot)
        self._blocks: Dict[int, int] = {}  # model_id -> cache_id
        self._by_slot: Dict[int, CacheEntry] = {}  # guard slot -> live entry
        self._version = 0
        self._snap: Optional[Tuple[int, Tuple[Dict[str, Any], ...]]] = None

    # -- creation --------------------------------------------------------------------------------
    @property
    def lock(self) -> threading.RLock:
        """The registry lock, for callers that need several calls to be atomic."""
        return self._lock  # type: ignore[return-value]

    def new_id(self) -> int:
        """Next cache id: from 1, shared by allocate and register, never reused."""
        with self._lock:
            cache_id = self._next_id
            self._next_id += 1
            return cache_id

    def _plan_keys(self, entry: CacheEntry, keys: Sequence[Optional[KeyId]]) -> Dict[KeyId, int]:
        """Check keys of a new entry; returns key -> slot (last occurrence wins). Lock held."""
        keys = list(keys)
        if len(keys) > entry.dim0:
            raise ParamInvalid(f"cache_keys size {len(keys)} exceeds batch size (shape[0]) {entry.dim0}")
        plan: Dict[KeyId, int] = {}
        for slot, key in enumerate(keys):
            if key is None:
                continue
            if not isinstance(key, KeyId):
                if not (isinstance(key, tuple) and len(key) == 3):
                    raise ParamInvalid(f"invalid cache key {key!r}")
                key = KeyId(*key)
            if not key.is_placeholder:
                plan[key] = slot
        if plan and entry.is_blocks:
            raise ParamInvalid("a blocks cache can not bind CacheKeys")
        for key in plan:
            bound = self._keys.get(key)
            if bound is not None:
                raise ParamInvalid(f"cache key {_key_str(key)} is already bound to cache {bound[0]}")
        return plan

    def _insert(self, entry: CacheEntry, owned: bool) -> None:
        if entry.cache_id in self._entries or not 1 <= entry.cache_id < self._next_id:
            raise ParamInvalid(f"cache id {entry.cache_id} was not issued by new_id or is in use")
        entry.owned = owned
        entry.id_ref, entry.released, entry.release_pending, entry.pins = True, False, False, 0
        entry.slot_keys, entry.pulled, entry.blocks_model_id = {}, {}, None
        self._entries[entry.cache_id] = entry
        if entry.guard is not None:
            self._by_slot[entry.guard.slot] = entry

    def _add_keyed(self, entry: CacheEntry, keys: Sequence[Optional[KeyId]], owned: bool) -> None:
        with self._lock:
            plan = self._plan_keys(entry, keys)
            self._insert(entry, owned)
            for key, slot in plan.items():
                self._keys[key] = (entry.cache_id, slot)
                entry.slot_keys[slot] = key
            self._bump()

    def add_allocated(self, entry: CacheEntry, keys: Sequence[Optional[KeyId]] = ()) -> None:
        """Add a pool-allocated cache, binding ``keys[i]`` to slot i (None/placeholder: unbound).

        Raises:
            ParamInvalid: more keys than shape[0], or a key already bound to any cache.
        """
        self._add_keyed(entry, keys, owned=True)

    def add_registered(self, entry: CacheEntry, keys: Sequence[Optional[KeyId]] = ()) -> None:
        """Add a user-registered cache; same key checks as :meth:`add_allocated` (spec recommendation)."""
        self._add_keyed(entry, keys, owned=False)

    def add_blocks(self, entry: CacheEntry, model_id: Optional[int], replace: bool) -> None:
        """Add a blocks cache (``entry.owned`` says allocated or registered) keyed by ``model_id``.

        Args:
            entry: a blocks (or V1 mix) entry.
            model_id: the BlocksCacheKey's model id, or None for an unkeyed cache.
            replace: True for register_blocks_cache (the newest registration wins); False for
                allocate_blocks_cache (an already-bound model id raises ParamInvalid).
        """
        if not (entry.is_blocks or entry.is_mix):
            raise ParamInvalid("add_blocks needs a blocks cache entry")
        with self._lock:
            old_id = self._blocks.get(model_id) if model_id is not None else None
            if old_id is not None and not replace:
                raise ParamInvalid(f"BlocksCacheKey model_id {model_id} is already bound to cache {old_id}")
            self._insert(entry, entry.owned)
            if model_id is not None:
                if old_id is not None:
                    self._entries[old_id].blocks_model_id = None
                    self._new_generation(self._entries[old_id])
                    _log.info("blocks key model_id %s moves from cache %s to cache %s",
                              model_id, old_id, entry.cache_id)
                self._blocks[model_id] = entry.cache_id
                entry.blocks_model_id = model_id
            self._bump()

    # -- lookups ---------------------------------------------------------------------------------
    def get(self, cache_id: int) -> CacheEntry:
        """The live entry of ``cache_id`` (CacheNotExist if unknown or released)."""
        with self._lock:
            entry = self._entries.get(cache_id)
        if entry is None:
            raise CacheNotExist(f"cache {cache_id} does not exist")
        return entry

    def lookup_key(self, key: KeyId) -> Tuple[CacheEntry, int]:
        """(entry, slot) bound to ``key``; CacheNotExist if unbound (placeholders are never bound)."""
        with self._lock:
            loc = self._keys.get(key)
            if loc is not None:
                return self._entries[loc[0]], loc[1]
        raise CacheNotExist(f"cache key {_key_str(key)} is not bound")

    def lookup_blocks(self, model_id: int) -> CacheEntry:
        """The blocks cache bound to BlocksCacheKey ``model_id`` (CacheNotExist if none)."""
        with self._lock:
            cache_id = self._blocks.get(model_id)
            if cache_id is not None:
                return self._entries[cache_id]
        raise CacheNotExist(f"no blocks cache is bound to model_id {model_id}")

    def by_guard(self, slot: int, value: int) -> CacheEntry:
        """The live entry whose generation is (slot, value); CacheNotExist when it was released."""
        with self._lock:
            entry = self._by_slot.get(slot)
            if entry is not None and entry.guard is not None and entry.guard.value == value:
                return entry
        raise CacheNotExist(f"the cache of generation slot {slot} was released")

    def slot_key(self, cache_id: int, slot: int) -> Optional[KeyId]:
        """The key bound to a slot, or None (also for unknown caches)."""
        with self._lock:
            entry = self._entries.get(cache_id)
            return entry.slot_keys.get(slot) if entry is not None else None

    def entries(self) -> List[CacheEntry]:
        """Live entries in id order."""
        with self._lock:
            return [self._entries[i] for i in sorted(self._entries)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, cache_id: object) -> bool:
        with self._lock:
            return cache_id in self._entries

    @property
    def version(self) -> int:
        """Bumped on every visible change (entries, keys)."""
        with self._lock:
            return self._version

    def snapshot(self) -> Tuple[int, Tuple[Dict[str, Any], ...]]:
        """(version, descriptions of every cache in id order); cached per version, do not mutate."""
        with self._lock:
            if self._snap is None or self._snap[0] != self._version:
                self._snap = (self._version, tuple(e.describe() for e in self.entries()))
            return self._snap

    # -- reference counting ----------------------------------------------------------------------
    def release_id(self, cache_id: int) -> bool:
        """Drop the cache-id reference (deallocate_cache / deallocate_blocks_cache).

        Unknown id, registered cache, or reference already dropped → no-op. A blocks cache is freed at
        once (its BlocksCacheKey unbound); a continuous cache is freed when no key remains bound.
        Returns whether the entry was removed now.
        """
        with self._lock:
            entry = self._entries.get(cache_id)
            if entry is None or not entry.owned or not entry.id_ref:
                return False
            entry.id_ref = False
            if entry.slot_keys and not entry.is_blocks:
                self._bump()
                return False
            dropped = self._drop(entry)
        self._fire(dropped)
        return True

    def remove_key(self, key: KeyId) -> bool:
        """Unbind a key (remove_cache_key). Unbound key or key of a registered cache → no-op.

        Returns whether the key was unbound. Frees the cache if its id reference was already dropped and
        this was its last key.
        """
        with self._lock:
            loc = self._keys.get(key) if key is not None else None
            if loc is None:
                return False
            entry = self._entries[loc[0]]
            if not entry.owned:
                return False
            dropped = self._unbind(entry, loc[1])
        self._fire(dropped)
        return True

    def note_pulled(self, cache_id: int, slot: int, tensor_lo: int, tensor_hi: int) -> bool:
        """Record a successful pull of tensors ``[tensor_lo, tensor_hi)`` of a slot, per (cache, slot).

        When every tensor of the slot has been pulled and the slot holds a consumable key of an allocated
        continuous cache, the key is consumed (and the cache freed if nothing else holds it). Prefix keys,
        registered caches and blocks caches are never consumed. Returns whether a key was consumed.
        """
        with self._lock:
            entry = self._entries.get(cache_id)
            if entry is None:
                return False
            if not (0 <= tensor_lo < tensor_hi <= entry.num_tensors and 0 <= slot < entry.dim0):
                raise ParamInvalid(f"pulled range tensors [{tensor_lo}, {tensor_hi}) of slot {slot} is outside "
                                   f"cache {cache_id} ({entry.num_tensors} tensors, {entry.dim0} slots)")
            key = entry.slot_keys.get(slot)
            if key is None or not key.consumable or not entry.owned or entry.is_blocks:
                return False
            mask = entry.pulled.get(slot, 0) | (((1 << tensor_hi) - 1) ^ ((1 << tensor_lo) - 1))
            if mask != (1 << entry.num_tensors) - 1:
                entry.pulled[slot] = mask
                return False
            dropped = self._unbind(entry, slot)
        self._fire(dropped)
        return True

    def unregister(self, cache_id: int) -> bool:
        """Remove an entry with all of its keys and release it (unknown id → no-op). Returns whether found."""
        with self._lock:
            entry = self._entries.get(cache_id)
            if entry is None:
                return False
            dropped = self._drop(entry)
        self._fire(dropped)
        return True

    def clear(self) -> int:
        """Remove and release every entry (finalize). Ids keep counting. Returns how many were released."""
        with self._lock:
            dropped: List[CacheEntry] = []
            for entry in self.entries():
                dropped.extend(self._drop(entry))
        self._fire(dropped)
        return len(dropped)

    # -- pinning (in-flight transfers) -----------------------------------------------------------
    def pin(self, cache_id: int) -> CacheEntry:
        """Hold an entry's memory during a transfer: its release waits for :meth:`unpin`."""
        with self._lock:
            entry = self.get(cache_id)
            entry.pins += 1
            return entry

    def pin_entry(self, entry: CacheEntry) -> CacheEntry:
        """Pin a live entry found by other means (:meth:`by_guard`); CacheNotExist if released since."""
        with self._lock:
            if self._entries.get(entry.cache_id) is not entry:
                raise CacheNotExist(f"cache {entry.cache_id} was released")
            entry.pins += 1
            return entry

    def unpin(self, entry: CacheEntry) -> None:
        """Undo one :meth:`pin`; runs a release that was deferred by it."""
        with self._lock:
            if entry.pins <= 0:
                raise ParamInvalid(f"cache {entry.cache_id} is not pinned")
            entry.pins -= 1
            due = entry.pins == 0 and entry.release_pending
            if due:
                entry.release_pending = False
        if due:
            self._call_release(entry)

    @contextlib.contextmanager
    def pinned(self, cache_id: int) -> Iterator[CacheEntry]:
        """``with registry.pinned(cache_id) as entry:`` pin for the duration of the block."""
        entry = self.pin(cache_id)
        try:
            yield entry
        finally:
            self.unpin(entry)

    # -- internals (lock held unless stated) -----------------------------------------------------
    def _bump(self) -> None:
        self._version += 1

    def _unbind(self, entry: CacheEntry, slot: int) -> List[CacheEntry]:
        key = entry.slot_keys.pop(slot)
        entry.pulled.pop(slot, None)
        del self._keys[key]
        self._bump()
        if not entry.id_ref and not entry.slot_keys:
            return self._drop(entry)
        self._new_generation(entry)
        return []

    def new_generation(self, entry: CacheEntry) -> None:
        """A live entry's memory changed under it (remapped pages): every view and read of it so far must fail."""
        with self._lock:
            if self._entries.get(entry.cache_id) is entry:
                self._new_generation(entry)
                self._bump()

    def _new_generation(self, entry: CacheEntry) -> None:
        """The entry stays but a key no longer leads to it: views that relied on the key must fail."""
        if self._reguard is None or entry.guard is None:
            return
        if self._by_slot.get(entry.guard.slot) is entry:
            del self._by_slot[entry.guard.slot]
        entry.guard = self._reguard(entry.guard)
        self._by_slot[entry.guard.slot] = entry

    def _drop(self, entry: CacheEntry) -> List[CacheEntry]:
        """Remove an entry and all of its keys; returns it for release unless already released."""
        if self._entries.get(entry.cache_id) is not entry:
            return []
        del self._entries[entry.cache_id]
        if entry.guard is not None and self._by_slot.get(entry.guard.slot) is entry:
            del self._by_slot[entry.guard.slot]
        if self._on_invalidate is not None:
            self._on_invalidate(entry)
        for key in entry.slot_keys.values():
            self._keys.pop(key, None)
        entry.slot_keys, entry.pulled = {}, {}
        if entry.blocks_model_id is not None and self._blocks.get(entry.blocks_model_id) == entry.cache_id:
            del self._blocks[entry.blocks_model_id]
        entry.blocks_model_id = None
        entry.id_ref = False
        entry.released = True
        if entry.pins > 0:
            entry.release_pending = True
        self._bump()
        return [entry] if entry.pins == 0 else []

    def _fire(self, entries: Iterable[CacheEntry]) -> None:
        """Call on_release for each entry (outside the lock)."""
        for entry in entries:
            self._call_release(entry)

    def _call_release(self, entry: CacheEntry) -> None:
        try:
            if self._on_release is not None:
                self._on_release(entry)
        except Exception:  # noqa: BLE001 - a release failure must not stop the others
            _log.exception("releasing cache %s failed", entry.cache_id)
        finally:
            entry.freed.set()


def _key_str(key: KeyId) -> str:
    if key.namespace == NS_PREFIX:
        return f"(prefix_id={key.ident}, model_id={key.model_id})"
    return f"(req_id={key.ident}, model_id={key.model_id})"
