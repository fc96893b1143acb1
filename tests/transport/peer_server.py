"""Serving peer for two-process transport tests: run as ``python peer_server.py NAME NBYTES``."""
from __future__ import annotations

import json
import mmap
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "src"))

from llm_datadist._transport import transport_class  # noqa: E402
from llm_datadist._transport.base import Region, TransportContext  # noqa: E402

HOST_ID = "transport-test-host"


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """The deterministic content of a peer segment (tests compute the same bytes)."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


class Segment:
    """A memfd-backed shared segment mapped here, filled with ``pattern(nbytes, seed)``."""

    def __init__(self, nbytes: int, seed: int) -> None:
        self.fd = os.memfd_create(f"peer-{seed}", 0)
        os.ftruncate(self.fd, nbytes)
        self.map = mmap.mmap(self.fd, nbytes)
        self.array = np.frombuffer(self.map, dtype=np.uint8)
        self.seed = seed
        self.pristine = pattern(nbytes, seed)
        self.reset()
        self.region = Region(addr=self.array.ctypes.data, nbytes=nbytes,
                             shm_name=f"/proc/{os.getpid()}/fd/{self.fd}")

    def reset(self) -> None:
        self.array[:] = self.pristine

    def info(self) -> dict:
        return {"addr": self.region.addr, "nbytes": self.region.nbytes, "seed": self.seed}


def main() -> None:
    name, nbytes = sys.argv[1], int(sys.argv[2])
    ctx = TransportContext(host_id=HOST_ID, pid=os.getpid(), bind_host="127.0.0.1")
    transport = transport_class(name)(ctx)
    segments = [Segment(nbytes, seed=1)]
    transport.register(segments[0].region)
    out = {"pid": os.getpid(), "descriptor": transport.local_info().hex(), **segments[0].info()}
    print(json.dumps(out), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "reset":
            for seg in segments:
                seg.reset()
            reply = {"ok": True}
        elif cmd[0] == "add":  # a second region, registered after the peer connected
            seg = Segment(int(cmd[1]), seed=len(segments) + 1)
            segments.append(seg)
            transport.register(seg.region)
            reply = seg.info()
        elif cmd[0] == "sleep":
            time.sleep(float(cmd[1]))
            reply = {"ok": True}
        else:
            break
        print(json.dumps(reply), flush=True)
    transport.close()
    transport.close()


if __name__ == "__main__":
    main()
