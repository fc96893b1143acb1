"""Serving peer for two-process transport tests: ``python peer_server.py NAME NBYTES``, commands on stdin.

The peer is what an engine would be to a transport: a guard table, shared segments registered as regions,
a generation guard per segment, and a credential granted for link 1. It prints one JSON line describing
itself, then answers one JSON line per command (reset, add NBYTES, invalidate K, revoke, quit).
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import sys
import time
from typing import List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "src"))

from llm_datadist._engine.guards import Guards  # noqa: E402
from llm_datadist._transport import transport_class  # noqa: E402
from llm_datadist._transport.base import Region, Segment as SegmentRef, TransportContext  # noqa: E402

HOST_ID = "transport-test-host"
LINK_ID = 1


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """The deterministic content of a peer segment (tests compute the same bytes)."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


class Segment:
    """A memfd-backed shared segment mapped here, filled with ``pattern(nbytes, seed)``, with a guard."""

    def __init__(self, nbytes: int, seed: int, guards: Guards) -> None:
        self.fd = os.memfd_create(f"peer-{seed}", 0)
        os.ftruncate(self.fd, nbytes)
        self.map = mmap.mmap(self.fd, nbytes)
        self.array = np.frombuffer(self.map, dtype=np.uint8)
        self.seed = seed
        self.pristine = pattern(nbytes, seed)
        self.reset()
        st = os.fstat(self.fd)
        self.region = Region(addr=self.array.ctypes.data, nbytes=nbytes,
                             segment=SegmentRef(f"/proc/{os.getpid()}/fd/{self.fd}", 0, st.st_dev, st.st_ino, nbytes))
        self.guard = guards.acquire()
        self.descriptor = b""

    def reset(self) -> None:
        self.array[:] = self.pristine

    def close(self) -> None:
        self.array = np.zeros(0, dtype=np.uint8)  # drop the view so the mapping can close
        self.map.close()
        os.close(self.fd)

    def info(self) -> dict:
        return {"addr": self.region.addr, "nbytes": self.region.nbytes, "seed": self.seed,
                "descriptor": self.descriptor.hex(), "guard": [self.guard.slot, self.guard.value, self.guard.addr]}


class Peer:
    """A transport serving segments, as an engine drives it."""

    def __init__(self, name: str, nbytes: int) -> None:
        self.guards = Guards(capacity=64)
        ctx = TransportContext(host_id=HOST_ID, pid=os.getpid(), bind_host="127.0.0.1", guards=self.guards)
        self.transport = transport_class(name)(ctx)
        self.transport.register(self.guards.region)
        self.segments: List[Segment] = []
        self.credential = self.transport.grant(LINK_ID)
        self.add(nbytes)

    def add(self, nbytes: int) -> dict:
        seg = Segment(nbytes, len(self.segments) + 1, self.guards)
        seg.descriptor = self.transport.register(seg.region)
        self.segments.append(seg)
        return seg.info()

    def hello(self) -> dict:
        return {"pid": os.getpid(), "local_info": self.transport.local_info().hex(), "nonce": self.guards.nonce.hex(),
                "credential": self.credential.hex(), **self.segments[0].info()}

    def command(self, words: List[str]) -> dict:
        if words[0] == "reset":
            for seg in self.segments:
                seg.reset()
            return {"ok": True}
        if words[0] == "add":  # a region registered after the peer connected
            return self.add(int(words[1]))
        if words[0] == "invalidate":  # the owner releases segment k: its generation changes
            seg = self.segments[int(words[1])]
            self.guards.invalidate(seg.guard)
            self.transport.fence(time.monotonic() + 10)
            return {"ok": True}
        if words[0] == "recut":  # segment k registered again over part of its memory: other bounds, same bytes
            seg = self.segments[int(words[1])]
            offset, nbytes = int(words[2]), int(words[3])
            self.transport.deregister(seg.region)
            ref = dataclasses.replace(seg.region.segment, offset=offset) if seg.region.segment else None
            seg.region = dataclasses.replace(seg.region, addr=seg.array.ctypes.data + offset, nbytes=nbytes,
                                             segment=ref)
            seg.descriptor = self.transport.register(seg.region)
            return seg.info()
        if words[0] == "revoke":
            self.transport.revoke(LINK_ID)
            return {"ok": True}
        raise ValueError(words)

    def close(self) -> None:
        self.transport.close()
        self.transport.close()
        for seg in self.segments:
            seg.close()
        self.guards.close()


def main() -> None:
    peer = Peer(sys.argv[1], int(sys.argv[2]))
    print(json.dumps(peer.hello()), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        print(json.dumps(peer.command(words)), flush=True)
    peer.close()


if __name__ == "__main__":
    main()
