"""Generation-stamped KV content, its verification, and the owner/pusher loops the race tests run."""
from __future__ import annotations

import ctypes
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np

from llm_datadist import BlocksCacheKey, CacheDesc, DataType, LLMException, Placement

GEN_SHIFT = 36  # word = gen << 36 | tensor << 28 | block << 12 | word index (low 12 bits)
MAX_GEN = 1 << 24  # real generations stay below this; garbage decodes far above it
GARBAGE = np.uint64(0xBAD0_0000_0000_0000)


def check_geometry(num_tensors: int, num_blocks: int, block_bytes: int) -> None:
    if not (num_tensors < 256 and num_blocks < 65536 and block_bytes % 8 == 0 and block_bytes > 0):
        raise ValueError("content needs < 256 tensors, < 65536 blocks and blocks of a multiple of 8 bytes")


def _block_words(num_blocks: int, block_bytes: int) -> np.ndarray:
    words = block_bytes // 8
    blocks = np.arange(num_blocks, dtype=np.uint64)[:, None] << np.uint64(12)
    return blocks | (np.arange(words, dtype=np.uint64)[None, :] & np.uint64(0xFFF))


def tensor_base(gen: int, tensor: int) -> np.uint64:
    return np.uint64((gen << GEN_SHIFT) | (tensor << 28))


def content(gen: int, tensor: int, num_blocks: int, block_bytes: int) -> np.ndarray:
    """The uint8 (num_blocks, block_bytes) content of one tensor in generation ``gen``."""
    words = _block_words(num_blocks, block_bytes) | tensor_base(gen, tensor)
    return words.view(np.uint8).reshape(num_blocks, block_bytes)


def fill(arrays: Sequence[np.ndarray], gen: int) -> None:
    """Write generation ``gen`` into every tensor (uint8 (num_blocks, block_bytes) arrays)."""
    num_blocks, block_bytes = arrays[0].shape
    check_geometry(len(arrays), num_blocks, block_bytes)
    words = _block_words(num_blocks, block_bytes)
    for t, array in enumerate(arrays):
        np.bitwise_or(words, tensor_base(gen, t), out=array.view(np.uint64))


def garble(arrays: Sequence[np.ndarray], cycle: int) -> None:
    """Overwrite every tensor with garbage words that no generation ever holds."""
    for array in arrays:
        array.view(np.uint64)[:] = GARBAGE | np.uint64(cycle & 0xFFFF_FFFF)


def one_generation(arrays: Sequence[np.ndarray], dst_blocks: Sequence[int], src_blocks: Sequence[int]) -> Optional[int]:
    """The generation every pulled block belongs to, or None when they are garbage, a mix, or misplaced.

    ``arrays`` are the destination tensors; block ``dst_blocks[j]`` of tensor t must equal block ``src_blocks[j]``
    of tensor t of one single generation.
    """
    first = arrays[0].view(np.uint64)[dst_blocks[0], 0]
    gen = int(first) >> GEN_SHIFT
    if not 0 < gen < MAX_GEN:
        return None
    block_bytes = arrays[0].shape[1]
    src = np.asarray(src_blocks, dtype=np.int64)
    dst = np.asarray(dst_blocks, dtype=np.int64)
    words = _block_words(int(src.max()) + 1, block_bytes)[src]
    for t, array in enumerate(arrays):
        if not np.array_equal(array.view(np.uint64)[dst], words | tensor_base(gen, t)):
            return None
    return gen


def raw_view(addr: int, nbytes: int) -> np.ndarray:
    """A writable uint8 view of raw memory (pool-allocated tensors)."""
    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(addr))


def blocks_desc(num_tensors: int, num_blocks: int, block_bytes: int,
                placement: Placement = Placement.HOST) -> CacheDesc:
    return CacheDesc(num_tensors, [num_blocks, block_bytes], DataType.DT_UINT8, placement)


class OwnedBlocks:
    """A blocks cache of one instance under a BlocksCacheKey, with generation content.

    ``pool=False`` registers numpy arrays this object keeps; ``pool=True`` allocates from the instance's pool.
    """

    def __init__(self, cm, cluster_id: int, model_id: int, num_tensors: int, num_blocks: int, block_bytes: int,
                 gen: int = 1, pool: bool = False, remote_accessible: Optional[bool] = None,
                 placement: Placement = Placement.HOST) -> None:
        check_geometry(num_tensors, num_blocks, block_bytes)
        self.cm = cm
        self.key = BlocksCacheKey(cluster_id, model_id)
        self.desc = blocks_desc(num_tensors, num_blocks, block_bytes, placement)
        self.pool = pool
        self.remote_accessible = remote_accessible
        self.gen = gen
        self.nbytes = num_blocks * block_bytes
        self.cache = None
        if pool:
            self.cache = cm.allocate_blocks_cache(self.desc, self.key)
            self.arrays = self._views(self.cache.tensor_addrs)
            fill(self.arrays, gen)
        else:
            self.arrays = [np.empty((num_blocks, block_bytes), np.uint8) for _ in range(num_tensors)]
            fill(self.arrays, gen)
            self.cache = self._register()

    def _views(self, addrs: Sequence[int]) -> List[np.ndarray]:
        block_bytes = self.desc.shape[1]
        return [raw_view(a, self.nbytes).reshape(-1, block_bytes) for a in addrs]

    def _register(self):
        return self.cm.register_blocks_cache(self.desc, [a.ctypes.data for a in self.arrays], self.key,
                                             self.remote_accessible)

    @property
    def addrs(self) -> List[int]:
        return [int(a.ctypes.data) for a in self.arrays]

    def release(self) -> None:
        """unregister_cache (registered) or deallocate_blocks_cache (pool)."""
        if self.pool:
            self.cm.deallocate_blocks_cache(self.cache)
        else:
            self.cm.unregister_cache(self.cache.cache_id)

    def renew(self, cycle: int) -> None:
        """One owner cycle: release, garbage into the freed memory, the next generation, register/allocate again.

        With a pool the next generation is written into the freed pages before they are allocated again (the
        pool is first-fit, so the same pages come back); so no pull can find the key bound to half-written memory.
        """
        old = self.addrs
        self.release()
        garble(self.arrays, cycle)
        self.gen += 1
        fill(self.arrays, self.gen)
        if self.pool:
            self.cache = self.cm.allocate_blocks_cache(self.desc, self.key)
            if list(self.cache.tensor_addrs) != old:
                raise AssertionError(f"the pool moved the cache: {old} -> {self.cache.tensor_addrs}")
        else:
            self.cache = self._register()


class Loop:
    """A background loop of ``step(i)`` until ``stop()``; counts steps and failure codes.

    ``pause`` spaces the steps out (a wait on the stop event, so ``stop()`` never waits for it).
    """

    def __init__(self, step, name: str, pause: float = 0.0) -> None:
        self._step = step
        self._pause = pause
        self._stop = threading.Event()
        self.count = 0
        self.codes: Dict[int, int] = {}
        self.errors: List[str] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                self._step(i)
                self.count += 1
            except LLMException as exc:
                code = int(exc.status_code)
                self.codes[code] = self.codes.get(code, 0) + 1
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            if self._pause:
                self._stop.wait(self._pause)

    def stop(self, timeout: float = 30.0) -> dict:
        self._stop.set()
        self._thread.join(timeout)
        return {"count": self.count, "codes": {str(k): v for k, v in self.codes.items()}, "errors": self.errors,
                "alive": self._thread.is_alive()}
