"""One process of ``llm-datadist chaos``: a prefill or a decode driven by JSON lines on stdin.

Run as ``python -m llm_datadist.cli.chaos_worker``; every command line gets one reply line on stdout (library
log lines go to stderr). Each library call a command makes is reported as a record: its kind, the status code
name, its start and end (``time.monotonic()``, the system-wide CLOCK_MONOTONIC, so the driver can compare it
with its own stop and kill times) and whether the bytes it claimed to move were wrong.

Content: word ``w`` of block ``b`` of tensor ``t`` of a cache that owner ``o`` filled in generation ``g`` is
``TAG << 56 | o << 48 | g << 24 | t << 20 | b << 12 | (w & 0xFFF)`` (:func:`pattern`), computed independently
on both sides, so a decode checks every byte it received without asking anyone. Destinations are filled with
``SENTINEL`` (a word no generation holds) before each pull; every block outside the pull must keep it.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

TAG = 0xC5
SENTINEL = np.uint64(0xEEEE_EEEE_EEEE_EEEE)
GARBAGE = np.uint64(0xBAD0_0000_0000_0000)
PUSH_MODEL = 1  # decodes register their push inbox under BlocksCacheKey(decode id, PUSH_MODEL)
POOL_WORKER = re.compile(r"-w\d+$")  # threads of the engine's bounded pools, started on demand


def own_usage() -> Dict[str, Any]:
    """fds, threads (and how many are bounded pool workers) and RSS of this process, from /proc/self."""
    names = [t.name for t in threading.enumerate()]
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task")),
            "pool_threads": sum(1 for n in names if POOL_WORKER.search(n)), "rss_kib": rss}
LINK_TIMEOUT_MS = 2000
UNLINK_TIMEOUT_MS = 2000
PROMPT, DECODER = 1, 2

Record = Dict[str, Any]


def pattern(owner: int, gen: int, tensor: int, blocks: Sequence[int], block_bytes: int) -> np.ndarray:
    """The uint64 words (len(blocks), block_bytes // 8) of ``blocks`` of one tensor: see the module doc."""
    if not (0 <= owner < 256 and 0 < gen < 1 << 24 and 0 <= tensor < 16 and block_bytes % 8 == 0):
        raise ValueError("pattern needs owner < 256, 0 < gen < 2**24, tensor < 16, 8-byte words")
    base = np.uint64((TAG << 56) | (owner << 48) | (gen << 24) | (tensor << 20))
    rows = np.asarray(blocks, dtype=np.uint64)[:, None] << np.uint64(12)
    words = np.arange(block_bytes // 8, dtype=np.uint64)[None, :] & np.uint64(0xFFF)
    return base | rows | words


def describe(word: int) -> str:
    """What a word claims to be, for the report of a wrong block."""
    word = int(word)
    if word == int(SENTINEL):
        return "the sentinel (not written)"
    if word >> 56 != TAG:
        return f"foreign word {word:#018x}"
    return (f"owner {(word >> 48) & 0xFF} gen {(word >> 24) & 0xFFFFFF} tensor {(word >> 20) & 0xF} "
            f"block {(word >> 12) & 0xFF}")


class Worker:
    """The instance of this process and its caches; ``op_<name>(**args)`` is one command."""

    def __init__(self) -> None:
        self.dd: Any = None
        self.role = 0
        self.cluster_id = 0
        self.timeout_ms = 1000
        self.ra = False
        self.nt = self.nb = self.bb = 0
        self.pool = False
        self.cache: Any = None
        self.arrays: List[np.ndarray] = []
        self.gen = 0
        self.linked: Dict[int, Tuple[str, int]] = {}  # decode: prefill id -> the address it is linked at
        self.dst: Any = None
        self.dst_arrays: List[np.ndarray] = []
        self.inbox: Any = None
        self.inbox_arrays: List[np.ndarray] = []
        self.pushed_to: Dict[int, int] = {}  # prefill: decode id -> pushes that succeeded

    # -- library calls, timed --------------------------------------------------------------------------
    @staticmethod
    def call(kind: str, fn: Callable[[], Any], bound_s: float, records: List[Record]) -> Tuple[str, Any]:
        """Run one library call; append its record; returns (status name, result)."""
        from llm_datadist import LLMException

        result, error = None, ""
        t0 = time.monotonic()
        try:
            result = fn()
            status = "LLM_SUCCESS"
        except LLMException as exc:
            status, error = exc.status_code.name, str(exc)
        except Exception as exc:  # noqa: BLE001 - anything else is a finding, reported by name
            status = f"EXCEPTION {type(exc).__name__}"
            error = f"{type(exc).__name__}: {exc}"
        t1 = time.monotonic()
        record: Record = {"kind": kind, "status": status, "t0": t0, "t1": t1, "bound": bound_s}
        if error:
            record["error"] = error[:300]
        records.append(record)
        return status, result

    def _cluster(self, cluster_id: int, ip: str, port: int, local_ip: Optional[str]) -> Any:
        from llm_datadist import LLMClusterInfo

        info = LLMClusterInfo()
        info.remote_cluster_id = cluster_id
        info.append_local_ip_info(local_ip or ip, 0)
        info.append_remote_ip_info(ip, port)
        return info

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000.0

    # -- both roles --------------------------------------------------------------------------------------
    def op_init(self, role: int, cluster_id: int, timeout_ms: int, geometry: Dict[str, int],
                listen: Optional[str] = None, pool_bytes: int = 0, remote_accessible: bool = False) -> Dict[str, Any]:
        from llm_datadist import LLMConfig, LLMDataDist, LLMException, LLMRole

        self.role, self.cluster_id, self.timeout_ms = role, cluster_id, timeout_ms
        self.nt, self.nb, self.bb = geometry["nt"], geometry["nb"], geometry["bb"]
        cfg = LLMConfig()
        cfg.enable_cache_manager = True
        cfg.sync_kv_timeout = timeout_ms
        if listen:
            cfg.listen_ip_info = listen
        if remote_accessible:  # push_blocks needs this mode, and both ends of a link must have the same mode
            cfg.enable_remote_cache_accessible = True
        self.ra = remote_accessible
        if pool_bytes:
            cfg.host_mem_pool_cfg = f'{{"memory_size": {pool_bytes}, "page_shift": 16}}'
            self.pool = True
        dd = LLMDataDist(LLMRole.PROMPT if role == PROMPT else LLMRole.DECODER, cluster_id)
        try:
            dd.init(cfg.generate_options())
        except LLMException as exc:
            return {"ok": False, "status": exc.status_code.name, "error": str(exc)}
        self.dd = dd
        if role == DECODER:
            self.dst, self.dst_arrays = self._register(geometry["dst_nb"], None)
            self.inbox, self.inbox_arrays = self._register(geometry["inbox_nb"], PUSH_MODEL)
        return {"ok": True, "status": "LLM_SUCCESS"}

    def _register(self, num_blocks: int, model_id: Optional[int]):
        from llm_datadist import BlocksCacheKey, CacheDesc, DataType, Placement

        arrays = [np.empty((num_blocks, self.bb), np.uint8) for _ in range(self.nt)]
        for array in arrays:
            array.view(np.uint64)[:] = SENTINEL
        desc = CacheDesc(self.nt, [num_blocks, self.bb], DataType.DT_UINT8, Placement.HOST)
        key = None if model_id is None else BlocksCacheKey(self.cluster_id, model_id)
        # host memory is remote accessible only when asked: the inbox must accept pushes, and in the
        # remote-cache-accessible mode a transfer's local cache must be remote accessible as well
        cache = self.dd.cache_manager.register_blocks_cache(desc, [a.ctypes.data for a in arrays], key, True)
        return cache, arrays

    def op_usage(self) -> Dict[str, Any]:
        return own_usage()

    def op_routes(self) -> Dict[str, Any]:
        """The data routes of this instance's links (a diagnostic probe of the engine, "" if unknown)."""
        peers = list(self.linked) if self.role == DECODER else list(self.pushed_to)
        routes = {}
        for peer in peers:
            try:
                routes[str(peer)] = str(self.dd._engine.route(peer, every=True))
            except Exception:  # noqa: BLE001 - no link now, or the probe changed: not a finding
                routes[str(peer)] = ""
        return {"routes": routes}

    # -- prefill --------------------------------------------------------------------------------------------
    def op_register(self, gen: int) -> Dict[str, Any]:
        """Register (or allocate from the pool) the blocks cache under BlocksCacheKey(own id, 0), content ``gen``."""
        records: List[Record] = []
        self._fill_and_register(gen, records)
        return {"records": records, "gen": self.gen}

    def _fill_and_register(self, gen: int, records: List[Record]) -> None:
        from llm_datadist import BlocksCacheKey, CacheDesc, DataType, Placement

        desc = CacheDesc(self.nt, [self.nb, self.bb], DataType.DT_UINT8, Placement.HOST)
        key = BlocksCacheKey(self.cluster_id, 0)
        cm = self.dd.cache_manager
        if self.pool:
            if not self.arrays:  # learn which pages the first-fit pool hands out, to fill them before the key exists
                scratch = cm.allocate_blocks_cache(desc)
                self.arrays = [_raw_view(a, self.nb * self.bb).reshape(self.nb, self.bb) for a in scratch.tensor_addrs]
                cm.deallocate_blocks_cache(scratch)
            self._fill(self.arrays, gen)
            status, cache = self.call("register", lambda: cm.allocate_blocks_cache(desc, key),
                                      self.timeout_s, records)
            if status == "LLM_SUCCESS" and list(cache.tensor_addrs) != [a.ctypes.data for a in self.arrays]:
                raise RuntimeError("the pool moved the cache: its content was written before it was allocated")
        else:
            arrays = [np.empty((self.nb, self.bb), np.uint8) for _ in range(self.nt)]
            self._fill(arrays, gen)
            status, cache = self.call("register", lambda: cm.register_blocks_cache(
                desc, [a.ctypes.data for a in arrays], key, True if self.ra else None), self.timeout_s, records)
            if status == "LLM_SUCCESS":
                self.arrays = arrays
        if status == "LLM_SUCCESS":
            self.cache, self.gen = cache, gen

    def _fill(self, arrays: Sequence[np.ndarray], gen: int) -> None:
        every = list(range(self.nb))
        for t, array in enumerate(arrays):
            array.view(np.uint64)[:] = pattern(self.cluster_id, gen, t, every, self.bb)

    def op_renew(self, gen: int) -> Dict[str, Any]:
        """Release the cache, overwrite its memory with garbage, register the next generation under the same key."""
        records: List[Record] = []
        cm = self.dd.cache_manager
        if self.cache is not None:
            cache = self.cache
            release = (lambda: cm.deallocate_blocks_cache(cache)) if self.pool else \
                (lambda: cm.unregister_cache(cache.cache_id))
            status, _ = self.call("unregister", release, self.timeout_s + 2.0, records)
            if status != "LLM_SUCCESS":
                return {"records": records, "gen": self.gen}  # still registered: the old generation stays live
            self.cache = None
            for array in self.arrays:  # a pull that still reads this memory finds garbage
                array.view(np.uint64)[:] = GARBAGE | np.uint64(gen)
        self._fill_and_register(gen, records)
        return {"records": records, "gen": self.gen if self.cache is not None else 0}

    def op_push(self, decode_id: int, src: List[int], dst: List[int]) -> Dict[str, Any]:
        """push_blocks of our blocks ``src`` into blocks ``dst`` of the decode's inbox."""
        from llm_datadist import BlocksCacheKey

        records: List[Record] = []
        if self.cache is None:
            return {"records": records, "gen": 0}
        cache, cm = self.cache, self.dd.cache_manager
        status, _ = self.call("push", lambda: cm.push_blocks(BlocksCacheKey(decode_id, PUSH_MODEL), cache, src, dst),
                              self.timeout_s, records)
        if status == "LLM_SUCCESS":
            self.pushed_to[decode_id] = self.pushed_to.get(decode_id, 0) + 1
        return {"records": records, "gen": self.gen}

    # -- decode ------------------------------------------------------------------------------------------
    def _ensure_link(self, cid: int, address: Tuple[str, int], local_ip: Optional[str],
                     records: List[Record]) -> bool:
        if self.linked.get(cid) == address:
            return True
        if cid in self.linked:  # the prefill moved to another port: drop the old link first
            self._unlink(cid, True, records)
        info = self._cluster(cid, address[0], address[1], local_ip)
        status, result = self.call("link", lambda: self._link([info]), LINK_TIMEOUT_MS / 1000.0, records)
        if status == "LLM_SUCCESS" or status == "LLM_ALREADY_LINK":
            self.linked[cid] = address
            return True
        return False

    def _link(self, infos: List[Any]) -> None:
        from llm_datadist import LLMException, LLMStatusCode

        code, codes = self.dd.link_clusters(infos, LINK_TIMEOUT_MS)
        per = codes[0] if codes else code
        if per != LLMStatusCode.LLM_SUCCESS:
            raise LLMException(f"link_clusters: {per}", status_code=LLMStatusCode(per))

    def _unlink(self, cid: int, force: bool, records: List[Record], kind: str = "unlink") -> str:
        from llm_datadist import LLMException, LLMStatusCode

        ip, port = self.linked.pop(cid)
        info = self._cluster(cid, ip, port, self._local_ip)

        def unlink() -> None:
            code, codes = self.dd.unlink_clusters([info], UNLINK_TIMEOUT_MS, force=force)
            per = codes[0] if codes else code
            if per != LLMStatusCode.LLM_SUCCESS:
                raise LLMException(f"unlink_clusters: {per}", status_code=LLMStatusCode(per))

        status, _ = self.call(kind, unlink, UNLINK_TIMEOUT_MS / 1000.0, records)
        if status != "LLM_SUCCESS" and not force:  # the peer did not answer: drop our side at least
            self.call(kind, lambda: self.dd.unlink_clusters([info], UNLINK_TIMEOUT_MS, force=True),
                      UNLINK_TIMEOUT_MS / 1000.0, records)
        return status

    _local_ip: Optional[str] = None

    def op_pull(self, cid: int, ip: str, port: int, src: List[int], dst: List[int],
                local_ip: Optional[str] = None) -> Dict[str, Any]:
        """Link if needed, pull ``src`` blocks of the prefill's cache into ``dst``, check every byte."""
        from llm_datadist import BlocksCacheKey

        records: List[Record] = []
        self._local_ip = local_ip
        if not self._ensure_link(cid, (ip, port), local_ip, records):
            return {"records": records}
        for array in self.dst_arrays:
            array.view(np.uint64)[:] = SENTINEL
        cm, dst_cache = self.dd.cache_manager, self.dst
        status, _ = self.call("pull", lambda: cm.pull_blocks(BlocksCacheKey(cid, 0), dst_cache, src, dst),
                              self.timeout_s, records)
        reply: Dict[str, Any] = {"records": records}
        if status == "LLM_SUCCESS":
            reply["gen"], wrong = self._check_pull(cid, src, dst)
            if wrong:
                records[-1]["wrong"] = wrong
        elif status == "LLM_LINK_FAILED" and cid in self.linked:
            self._unlink(cid, True, records, "unlink")  # a broken link: drop it, the next pull links again
        elif status == "LLM_NOT_YET_LINK":
            self.linked.pop(cid, None)  # the library dropped it (the peer died or unlinked us)
        return reply

    def _check_pull(self, cid: int, src: List[int], dst: List[int]) -> Tuple[int, Optional[str]]:
        """(the generation found, None) when every pulled byte is right and nothing else was written."""
        first = int(self.dst_arrays[0].view(np.uint64)[dst[0], 0])
        gen = (first >> 24) & 0xFFFFFF
        if first >> 56 != TAG or (first >> 48) & 0xFF != cid or gen == 0:
            return gen, f"block {dst[0]} holds {describe(first)}, expected owner {cid}"
        others = np.ones(self.dst_arrays[0].shape[0], dtype=bool)
        others[dst] = False
        for t, array in enumerate(self.dst_arrays):
            words = array.view(np.uint64)
            expected = pattern(cid, gen, t, src, self.bb)
            got = words[dst]
            if not np.array_equal(got, expected):
                row, col = [int(i[0]) for i in np.nonzero(got != expected)]
                return gen, (f"tensor {t} block {dst[row]} word {col}: {describe(got[row, col])}, expected "
                             f"{describe(expected[row, col])}")
            if not bool((words[others] == SENTINEL).all()):
                row = int(np.nonzero(~(words[others] == SENTINEL).all(axis=1))[0][0])
                return gen, f"tensor {t} block {int(np.nonzero(others)[0][row])} outside the pull was written"
        return gen, None

    def op_unlink(self, cid: int) -> Dict[str, Any]:
        records: List[Record] = []
        if cid in self.linked:
            self._unlink(cid, False, records)
        return {"records": records}

    def op_unlink_all(self) -> Dict[str, Any]:
        records: List[Record] = []
        for cid in list(self.linked):
            self._unlink(cid, False, records)
        return {"records": records}

    def op_verify_inbox(self, owner: int, gen: int, src: List[int], dst: List[int]) -> Dict[str, Any]:
        """Whether blocks ``dst`` of the push inbox hold blocks ``src`` of ``owner``'s generation ``gen``; then
        they are reset to the sentinel."""
        wrong = None
        for t, array in enumerate(self.inbox_arrays):
            got = array.view(np.uint64)[dst]
            expected = pattern(owner, gen, t, src, self.bb)
            if not np.array_equal(got, expected):
                row, col = [int(i[0]) for i in np.nonzero(got != expected)]
                wrong = (f"inbox tensor {t} block {dst[row]} word {col}: {describe(got[row, col])}, expected "
                         f"{describe(expected[row, col])}")
                break
        for array in self.inbox_arrays:
            array.view(np.uint64)[dst] = SENTINEL
        return {"wrong": wrong}

    def op_exit(self) -> Dict[str, Any]:
        if self.dd is not None:
            self.dd.finalize()
        _reply({"ok": True})
        os._exit(0)


def _raw_view(addr: int, nbytes: int) -> np.ndarray:
    import ctypes

    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(addr))


_OUT = sys.stdout


def _reply(reply: Dict[str, Any]) -> None:
    _OUT.write(json.dumps(reply) + "\n")
    _OUT.flush()


def main() -> int:
    """Serve commands until stdin closes or ``exit``."""
    global _OUT
    _OUT = sys.stdout
    sys.stdout = sys.stderr  # anything printed by accident stays off the reply channel
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        op, request_id = request.pop("op"), request.pop("id")
        try:
            reply = {"ok": True, **getattr(worker, f"op_{op}")(**request)}
        except Exception as exc:  # noqa: BLE001 - reported to the driver as a finding
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
        reply["id"] = request_id
        _reply(reply)
    if worker.dd is not None:
        worker.dd.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
