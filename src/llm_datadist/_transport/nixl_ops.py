"""Plans as NIXL descriptor rows: range checks against registered regions, ops split at region boundaries."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from llm_datadist._transport.base import CopyPlan, RemoteRejected

_U64 = np.uint64
_TOP = 1 << 62  # no address or size of a real mapping reaches this


class Regions:
    """A sorted snapshot of ranges ``[start, end)`` (registered regions of one side)."""

    __slots__ = ("starts", "ends")

    def __init__(self, ranges: Sequence[Tuple[int, int]] = ()) -> None:
        items = sorted((int(a), int(a) + int(n)) for a, n in ranges if n > 0)
        self.starts = np.array([a for a, _ in items], dtype=_U64)
        self.ends = np.array([e for _, e in items], dtype=_U64)

    def inside(self, addrs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Mask: each range lies inside one region."""
        if self.starts.shape[0] == 0:
            return np.zeros(addrs.shape[0], dtype=bool)
        idx = np.searchsorted(self.starts, addrs, side="right").astype(np.int64) - 1
        found = idx >= 0
        ends = self.ends[np.maximum(idx, 0)]
        return found & (addrs < ends) & (sizes <= ends - np.minimum(addrs, ends))

    def cover(self, addr: int, size: int) -> Optional[List[int]]:
        """Cut points splitting ``[addr, addr + size)`` into pieces that each lie in one region (None: gap)."""
        cuts, pos, end = [], addr, addr + size
        starts, ends = self.starts.tolist(), self.ends.tolist()
        while pos < end:
            best = max((e for s, e in zip(starts, ends) if s <= pos < e), default=None)
            if best is None:
                return None
            pos = min(end, best)
            cuts.append(pos)
        return cuts


def rows(plan: CopyPlan, local: Regions, remote: Regions, device_local: int = 0,
         device_remote: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Nx3 (address, length, device) rows of both sides for NIXL; zero-length ops dropped.

    Raises:
        RemoteRejected: a remote range outside the peer's learned regions, or a local range outside ours.
    """
    keep = plan.sizes > 0
    laddr, raddr, sizes = plan.local[keep], plan.remote[keep], plan.sizes[keep]
    if ((laddr >= _TOP) | (raddr >= _TOP) | (sizes >= _TOP) | (laddr == 0) | (raddr == 0)).any():
        raise RemoteRejected("an op of the plan has an impossible address or size")
    lok, rok = local.inside(laddr, sizes), remote.inside(raddr, sizes)
    bad = np.flatnonzero(~(lok & rok))
    if bad.size:
        laddr, raddr, sizes = _split(laddr, raddr, sizes, bad, local, remote)
    n = sizes.shape[0]
    lrows, rrows = np.empty((n, 3), dtype=_U64), np.empty((n, 3), dtype=_U64)
    lrows[:, 0], lrows[:, 1], lrows[:, 2] = laddr, sizes, device_local
    rrows[:, 0], rrows[:, 1], rrows[:, 2] = raddr, sizes, device_remote
    return lrows, rrows


def _split(laddr, raddr, sizes, bad, local: Regions, remote: Regions):
    """Ops that cross region boundaries cut into pieces; an op over unregistered memory is refused."""
    pieces: List[Tuple[int, int, int]] = []
    for i in bad.tolist():
        lo, ro, n = int(laddr[i]), int(raddr[i]), int(sizes[i])
        rcuts = remote.cover(ro, n)
        if rcuts is None:
            raise RemoteRejected(f"op {i}: remote range {ro:#x}+{n} is outside the peer's registered memory")
        lcuts = local.cover(lo, n)
        if lcuts is None:
            raise RemoteRejected(f"op {i}: local range {lo:#x}+{n} is not registered with this transport")
        start = 0
        for cut in sorted(set([c - ro for c in rcuts] + [c - lo for c in lcuts])):
            pieces.append((lo + start, ro + start, cut - start))
            start = cut
    good = np.ones(sizes.shape[0], dtype=bool)
    good[bad] = False
    extra = np.array(pieces, dtype=_U64).reshape(-1, 3)
    return (np.concatenate([laddr[good], extra[:, 0]]), np.concatenate([raddr[good], extra[:, 1]]),
            np.concatenate([sizes[good], extra[:, 2]]))
