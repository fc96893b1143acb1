"""The records of one ``bench`` run, indexed: bandwidth by cell, each mechanism's references and its ratios to them."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["COLUMN_ORDER", "MEMCPY_1T", "MEMCPY_2T", "RAW_PVM", "RAW_TCP", "RAW_TCP_N", "SAME_HOST", "TLS", "Results",
           "label"]

SAME_HOST = ("process_vm", "shm", "auto")
MEMCPY_1T, MEMCPY_2T, RAW_TCP, RAW_TCP_N, TLS = "memcpy.c_1t", "memcpy.c_2t", "raw_tcp", "raw_tcp_n", "tcp+tls"
RAW_PVM = "pvm.c_2t"  # the kernel's process_vm copy alone: a C loop on two threads, with a child process
REFERENCES = (MEMCPY_1T, "memcpy.np_1t", MEMCPY_2T, RAW_PVM, RAW_TCP, RAW_TCP_N)
COLUMN_ORDER = (MEMCPY_1T, "memcpy.np_1t", MEMCPY_2T, RAW_PVM, "process_vm", "shm", "auto", "nixl", RAW_TCP, RAW_TCP_N,
                "tcp", TLS, "mooncake")
_LABELS = {MEMCPY_1T: "memcpy 1t", "memcpy.np_1t": "memcpy 1t (numpy)", MEMCPY_2T: "memcpy 2t",
           RAW_PVM: "raw process_vm 2t",
           RAW_TCP: "raw tcp socket", RAW_TCP_N: "raw tcp, N streams"}


def label(mechanism: str, streams: Optional[int] = None) -> str:
    """The column title of a mechanism (``streams`` names the N of the parallel socket reference)."""
    if mechanism == RAW_TCP_N and streams:
        return f"raw tcp, {streams} streams"
    return _LABELS.get(mechanism, mechanism)


def base_mechanism(name: str) -> str:
    """``"auto[host/device]"`` (a suite name) -> ``"auto"`` (its column)."""
    return name.split("[", 1)[0]


class Results:
    """Index of the records of one run: bandwidth by (mechanism, direction, placement, size)."""

    def __init__(self, records: Sequence[Dict[str, Any]]) -> None:
        self.records = list(records)
        self.bw: Dict[Tuple[str, str, str, int], Dict[str, Any]] = {}
        for rec in self.records:
            if rec.get("kind") == "bandwidth":
                key = (base_mechanism(rec["mechanism"]), rec.get("direction", "copy"),
                       rec.get("placement", "host/host"), int(rec["block_bytes"]))
                self.bw[key] = rec

    def of_kind(self, kind: str) -> List[Dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def by_suite(self, kind: str) -> Dict[str, Dict[str, Any]]:
        """The records of one kind (latency, link, floor) by suite name."""
        return {r["mechanism"]: r for r in self.of_kind(kind)}

    def get(self, mechanism: str, direction: str, placement: str, size: int) -> Optional[Dict[str, Any]]:
        rec = self.bw.get((mechanism, direction, placement, size))
        if rec is None and mechanism in REFERENCES:  # references serve both directions and every placement
            for other in ("copy", "pull", "push"):
                rec = rec or self.bw.get((mechanism, other, "host/host", size))
        return rec

    def median(self, mechanism: str, direction: str, placement: str, size: int) -> Optional[float]:
        rec = self.get(mechanism, direction, placement, size)
        return float(rec["median_gbps"]) if rec else None

    def has(self, mechanism: str) -> bool:
        return any(k[0] == mechanism for k in self.bw)

    def ceiling_name(self) -> str:
        """The one-thread memcpy ceiling (the C loop, or the numpy fallback without a compiler)."""
        return MEMCPY_1T if self.has(MEMCPY_1T) else "memcpy.np_1t"

    def streams(self) -> Optional[int]:
        """N of the parallel raw socket reference, when it was measured."""
        return next((int(r.get("streams", 0)) for r in self.records
                     if r.get("kind") == "bandwidth" and r.get("mechanism") == RAW_TCP_N), None)

    def column_label(self, mechanism: str) -> str:
        return label(mechanism, self.streams())

    def references(self, mechanism: str) -> List[str]:
        """What a mechanism's cell is a ratio to, the main reference first."""
        if mechanism == "nixl" and not any(k[0].startswith("memcpy") for k in self.bw):
            return [RAW_TCP]  # across simulated hosts: the library's nixl transport, against the socket
        if mechanism in SAME_HOST or mechanism in ("nixl", RAW_PVM):
            ceilings = ([MEMCPY_2T] if self.has(MEMCPY_2T) else []) + [self.ceiling_name()]
            return ceilings[:1] if mechanism == RAW_PVM else ceilings  # the raw loop: against the main ceiling
        if mechanism in ("tcp", "mooncake"):
            return [RAW_TCP]
        if mechanism == TLS:
            return ["tcp"]
        return []

    def reference(self, mechanism: str) -> Optional[str]:
        """The main reference of a mechanism (memcpy 2t for the same-host ones where it was measured)."""
        refs = self.references(mechanism)
        return refs[0] if refs else None

    def ratio(self, mechanism: str, direction: str, placement: str, size: int,
              against: Optional[str] = None) -> Optional[float]:
        """Throughput ratio to ``against`` (default the main reference).

        Against memcpy, the paired ratio when the initiator timed memcpy passes right next to the transfer
        passes (the median of the per-pass quotients); otherwise the quotient of the medians.
        """
        ref = against or self.reference(mechanism)
        rec = self.get(mechanism, direction, placement, size)
        if rec is not None and ref == self.ceiling_name() and rec.get("paired_ratio"):
            return float(rec["paired_ratio"])
        if rec is not None and ref == MEMCPY_2T and rec.get("paired_ratio_2t"):
            return float(rec["paired_ratio_2t"])
        mine = self.median(mechanism, direction, placement, size)
        theirs = self.median(ref, direction, placement, size) if ref else None
        if mine is None or not theirs:
            return None
        return mine / theirs

    def sizes(self) -> List[int]:
        return sorted({k[3] for k in self.bw})

    def pairs(self) -> List[Tuple[str, str]]:
        """(placement, direction) of the transfer tables, pull first."""
        found = {(k[2], k[1]) for k in self.bw if k[1] in ("pull", "push")}
        return sorted(found, key=lambda p: (p[0] != "host/host", p[0], p[1] != "pull"))

    def columns(self, placement: str, direction: str) -> List[str]:
        """Mechanisms measured for (placement, direction), plus the in-process and socket references."""
        present = {k[0] for k in self.bw if (k[2], k[1]) == (placement, direction) or k[0] in REFERENCES}
        return [m for m in COLUMN_ORDER if m in present]
