"""Shared pieces of ``llm-datadist bench``: sizes, scattered block orders, aligned buffers, statistics, records."""
from __future__ import annotations

import dataclasses
import mmap
import os
import resource
import time
import re
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "DEFAULT_SIZES", "QUICK_SIZES", "MIB", "Buffer", "CpuWatch", "SuiteSpec", "TlsFiles", "block_order", "derive",
    "expected_words", "fill_pattern", "format_size", "gbps", "merge_samples", "parse_size", "parse_sizes",
    "placement_kinds", "record", "summarize", "verify_blocks",
]

KIB = 1024
MIB = 1024 * KIB
DEFAULT_SIZES = (16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, MIB, 2 * MIB)
QUICK_SIZES = (16 * KIB, 256 * KIB, 2 * MIB)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": 1024 * MIB}


def parse_size(text: str) -> int:
    """``"16K"``, ``"16KiB"``, ``"2M"``, ``"65536"`` -> bytes (binary units); ValueError otherwise."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 16K, 256K, 2M)")
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"size must be > 0: {text!r}")
    return value


def parse_sizes(text: str) -> Tuple[int, ...]:
    """A comma-separated list of sizes, sorted and de-duplicated."""
    return tuple(sorted({parse_size(part) for part in text.split(",") if part.strip()}))


def format_size(nbytes: int) -> str:
    """``16384`` -> ``"16K"``, ``2097152`` -> ``"2M"`` (the official tables' spelling)."""
    for unit, factor in (("G", 1024 * MIB), ("M", MIB), ("K", KIB)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return str(nbytes)


def gbps(nbytes: float, seconds: float) -> float:
    """GB/s with GB = 1e9 bytes."""
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """Median, min and max of a list of samples (empty -> zeros)."""
    if not samples:
        return {"median": 0.0, "min": 0.0, "max": 0.0}
    return {"median": float(statistics.median(samples)), "min": float(min(samples)), "max": float(max(samples))}


_LIST_FIELDS = ("samples_gbps", "paired_ratios", "paired_ratios_2t", "paired_memcpy_gbps", "paired_memcpy_2t_gbps",
                "paired_memcpy_2t_us", "samples_us", "samples_ms", "first_pull_samples_ms")


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def derive(rec: Dict[str, Any]) -> Dict[str, Any]:
    """(Re)compute the statistics of a record from its sample lists, in place; returns it."""
    if "samples_gbps" in rec:
        stats = summarize(rec["samples_gbps"])
        rec.update(median_gbps=stats["median"], min_gbps=stats["min"], max_gbps=stats["max"])
    for field, out in (("paired_ratios", "paired_ratio"), ("paired_ratios_2t", "paired_ratio_2t")):
        if rec.get(field):
            rec[out] = _median(rec[field])
    if rec.get("samples_us"):
        us = sorted(rec["samples_us"])
        rec.update(median_us=us[len(us) // 2], p99_us=us[min(len(us) - 1, int(len(us) * 0.99))], min_us=us[0],
                   mean_us=float(sum(us) / len(us)), iters=len(us))
        if rec.get("bytes"):
            rec["median_gbps"] = gbps(rec["bytes"], rec["median_us"] / 1e6)
    if rec.get("samples_ms"):
        rec["median_ms"] = _median(rec["samples_ms"])
    if rec.get("first_pull_samples_ms"):
        rec["first_pull_ms"] = _median(rec["first_pull_samples_ms"])
    return rec


def record(kind: str, mechanism: str, **fields: Any) -> Dict[str, Any]:
    """One JSON-lines record; statistics (median/min/max, p99, paired ratios) come from its sample lists."""
    rec: Dict[str, Any] = {"kind": kind, "mechanism": mechanism}
    rec.update(fields)
    return derive(rec)


def block_order(num_blocks: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Scattered order: op i copies source block ``src[i]`` to destination block ``dst[i]`` (two permutations)."""
    rng = np.random.default_rng([seed, num_blocks])
    return rng.permutation(num_blocks).astype(np.int64), rng.permutation(num_blocks).astype(np.int64)


class Buffer:
    """Page-aligned anonymous memory (transparent huge pages advised, pages touched) as a uint8 array."""

    def __init__(self, nbytes: int, prefault: bool = True) -> None:
        self.nbytes = int(nbytes)
        # MAP_PRIVATE: mmap(-1) defaults to MAP_SHARED, which is shmem and gets no transparent huge pages
        self._mm: Optional[mmap.mmap] = mmap.mmap(-1, max(self.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None and self.nbytes >= 2 * MIB:
            try:
                self._mm.madvise(advice)
            except (OSError, AttributeError):
                pass
        self.array = np.frombuffer(self._mm, dtype=np.uint8, count=self.nbytes)
        if prefault:
            self.array.fill(0)

    @property
    def addr(self) -> int:
        return int(self.array.ctypes.data)

    def close(self) -> None:
        """Release the mapping (the array must not be used afterwards)."""
        if self._mm is not None:
            self.array = np.zeros(0, dtype=np.uint8)
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere: leave it to the GC
                pass
            self._mm = None


def expected_words(block: int, block_bytes: int, salt: int) -> np.ndarray:
    """The uint64 words :func:`fill_pattern` writes into ``block``."""
    words = block_bytes // 8
    return np.arange(block * words, (block + 1) * words, dtype=np.uint64) + np.uint64(salt)


def fill_pattern(array: np.ndarray, salt: int) -> None:
    """Word ``i`` of the buffer holds ``i + salt`` (verifiable after any scattered copy)."""
    words = array.view(np.uint64)
    words[:] = np.arange(words.shape[0], dtype=np.uint64)
    words += np.uint64(salt)


def verify_blocks(array: np.ndarray, block_bytes: int, src: np.ndarray, dst: np.ndarray, salt: int,
                  samples: int = 16) -> Optional[str]:
    """Check that destination block ``dst[i]`` holds source block ``src[i]`` for a sample of ops; None if OK."""
    n = len(src)
    picks = sorted({0, n - 1, *np.linspace(0, n - 1, min(samples, n)).astype(int).tolist()})
    words = array.view(np.uint64).reshape(-1, block_bytes // 8)
    for i in picks:
        got = words[int(dst[i])]
        want = expected_words(int(src[i]), block_bytes, salt)
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0])
            return (f"block {int(dst[i])} (op {i}) word {bad}: got {int(got[bad])}, "
                    f"expected {int(want[bad])} from source block {int(src[i])}")
    return None


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS suite: one CA and a certificate with its key for each of the two processes."""

    ca: str
    owner_cert: str
    owner_key: str
    initiator_cert: str
    initiator_key: str

    def config(self, owner: bool) -> Dict[str, str]:
        """The ``LLMConfig`` attributes of one side."""
        cert, key = (self.owner_cert, self.owner_key) if owner else (self.initiator_cert, self.initiator_key)
        return {"tls_cert_file": cert, "tls_key_file": key, "tls_ca_file": self.ca}


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    """One two-process run: a transport (None = auto) on one placement pair, every size and direction."""

    name: str
    transport: Optional[str]
    pool: bool
    placement: str
    sizes: Tuple[int, ...]
    directions: Tuple[str, ...]
    passes: int
    warmup: int
    total_bytes: int
    seed: int
    latency_iters: int
    model_iters: int
    link_repeats: int
    timeout_s: float
    owner_id: int
    initiator_id: int
    paired: bool = True  # a memcpy pass in the initiator right before each pass (ratios robust to drift)
    owner_host: str = "127.0.0.1"  # the owner listens here and the initiator links to it
    initiator_host: str = "127.0.0.1"
    tls: Optional[TlsFiles] = None  # both sides configured for mutual TLS
    call_shapes: Tuple[str, ...] = ("16k", "layers", "model")  # the per-call latency series to run
    env: Tuple[Tuple[str, str], ...] = ()  # environment both processes start with (e.g. counting turned off)
    owner_cpus: Tuple[int, ...] = ()  # CPUs the owner process is bound to (empty: not bound)
    initiator_cpus: Tuple[int, ...] = ()  # CPUs the initiator process is bound to (empty: not bound)

    def work_units(self) -> int:
        """Progress units: one per (size, direction), plus latency and link."""
        return len(self.sizes) * len(self.directions) + 2


def bind(cpus: Tuple[int, ...]) -> None:
    """Bind this process (and the threads it starts later) to ``cpus`` (no-op when empty)."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def parse_cpus(text: Optional[str]) -> Tuple[int, ...]:
    """``"1"``, ``"0,2"`` or ``"0-3"`` as a tuple of CPU numbers (ValueError on anything else)."""
    out: List[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(set(out)))


def placement_kinds(placement: str) -> Tuple[str, str]:
    """``"host/device"`` -> (initiator placement, owner placement)."""
    local, _, remote = placement.partition("/")
    return local, remote or local


def merge_samples(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Pool the samples of records that measure the same thing (ceiling before and after, several rounds)."""
    merged: Dict[tuple, Dict[str, Any]] = {}
    out: List[Dict[str, Any]] = []
    for rec in records:
        if not any(field in rec for field in _LIST_FIELDS):
            out.append(rec)
            continue
        key = (rec["kind"], rec["mechanism"], rec.get("direction"), rec.get("placement"), rec.get("block_bytes"))
        if key not in merged:
            merged[key] = dict(rec)
            out.append(merged[key])
            continue
        target = merged[key]
        for field in _LIST_FIELDS:
            if field in rec:
                target[field] = list(target.get(field, [])) + list(rec[field])
        target["rounds"] = target.get("rounds", 1) + 1
        derive(target)
    return out


def _busy_seconds() -> Optional[float]:
    """CPU seconds all cores spent busy (or stolen) since boot, from /proc/stat; None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class CpuWatch:
    """How many cores the benchmark and everything else on the machine kept busy during a step.

    Children count once they have been waited for, so stop the watch after joining them.
    """

    def __init__(self) -> None:
        self._start = (time.monotonic(), _busy_seconds(), _own_seconds())

    def stop(self) -> Dict[str, float]:
        wall, busy, own = time.monotonic(), _busy_seconds(), _own_seconds()
        t0, busy0, own0 = self._start
        elapsed = max(wall - t0, 1e-9)
        out = {"wall_s": round(elapsed, 2), "cores_ours": round((own - own0) / elapsed, 2)}
        if busy is not None and busy0 is not None:
            out["cores_all"] = round((busy - busy0) / elapsed, 2)
            out["cores_others"] = round(max(0.0, out["cores_all"] - out["cores_ours"]), 2)
        return out
