"""Quick transport throughput check: GB/s per transport at 16K/64K/1M blocks vs memcpy and raw TCP."""
# Usage: PYTHONPATH=src python benchmarks/transport_quick.py [--mib 128] [--runs 5] [--sizes 16,64,1024]
# Moves --mib MiB per pass in scattered block order (remote blocks permuted, local blocks in order), with
# the serving peer in a second process for process_vm/shm/tcp; prints round-robin medians. The machine is
# noisy: compare ratios within one run, not absolute figures.
from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from llm_datadist._transport import available_transports, copies, transport_class  # noqa: E402
from llm_datadist._transport.scatter import scatter_io  # noqa: E402
from llm_datadist._transport import tcp_wire as wire  # noqa: E402
from llm_datadist._transport.base import CopyPlan, PeerInfo, Region, TransportContext  # noqa: E402

HOST = "bench-host"
U64 = np.uint64


def _ctx() -> TransportContext:
    return TransportContext(host_id=HOST, pid=os.getpid(), bind_host="127.0.0.1")


def _segment(nbytes: int):
    fd = os.memfd_create("bench", 0)
    os.ftruncate(fd, nbytes)
    mm = mmap.mmap(fd, nbytes)
    arr = np.frombuffer(mm, dtype=np.uint8)
    arr[:] = 1
    return fd, mm, arr


def _perm(nblocks: int, bs: int) -> np.ndarray:
    return np.random.default_rng(bs).permutation(nblocks).astype(U64)


def peer_main(name: str, nbytes: int, memory: str) -> None:
    """Serving side: a transport (or a raw TCP sender) over a memfd segment or anonymous memory."""
    if memory == "anon" and name != "shm":  # anonymous memory gets transparent huge pages
        arr, shm_name = np.ones(nbytes, dtype=np.uint8), None
    else:  # like the engine's pools: a memfd segment (4 KiB pages unless shmem THP is enabled)
        fd, mm, arr = _segment(nbytes)
        shm_name = f"/proc/{os.getpid()}/fd/{fd}"
    if name == "raw":
        raw_sender(arr)
        return
    transport = transport_class(name)(_ctx())
    transport.register(Region(arr.ctypes.data, nbytes, shm_name=shm_name))
    print(json.dumps({"pid": os.getpid(), "addr": arr.ctypes.data, "desc": transport.local_info().hex()}),
          flush=True)
    sys.stdin.read()
    transport.close()


def raw_sender(arr: np.ndarray) -> None:
    """Raw loopback baseline: send the requested blocks in permuted order with sendmsg batches."""
    listener = socket.socket()
    wire.set_buffers(listener)  # same socket settings as the tcp transport
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    sock, _ = listener.accept()
    wire.tune(sock)
    while True:
        req = sock.recv(8, socket.MSG_WAITALL)
        if len(req) < 8:
            break
        bs = int.from_bytes(req, "little")
        n = arr.size // bs
        sizes = np.full(n, bs, dtype=U64)
        scatter_io(sock.sendmsg, (_perm(n, bs) * U64(bs) + U64(arr.ctypes.data)).tolist(), sizes.tolist(), lambda: None)
    sock.close()
    listener.close()


PEER_MEMORY = "memfd"


def _spawn(name: str, nbytes: int):
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--peer", name, str(nbytes), PEER_MEMORY],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())


class Runner:
    """Round-robin timing: every method runs once per round, so machine noise hits all alike."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.methods = {}

    def add(self, label: str, fn) -> None:
        self.methods[label] = fn

    def run(self, runs: int) -> dict:
        rates = {label: [] for label in self.methods}
        for fn in self.methods.values():
            fn()  # warm-up: page faults, connections, lazy mappings
        for _ in range(runs):
            for label, fn in self.methods.items():
                start = time.perf_counter()
                fn()
                rates[label].append(self.nbytes / (time.perf_counter() - start) / 1e9)
        return {label: statistics.median(r) for label, r in rates.items()}


def add_memcpy(runner: Runner, dst: np.ndarray, src: np.ndarray, bs: int) -> None:
    n = src.size // bs
    perm = _perm(n, bs)
    s2, d2, idx = src.reshape(n, bs), dst.reshape(n, bs), perm.astype(np.intp)
    plan = CopyPlan(np.arange(n, dtype=U64) * U64(bs) + U64(dst.ctypes.data),
                    perm * U64(bs) + U64(src.ctypes.data), np.full(n, bs))
    runner.add("memcpy", lambda: np.take(s2, idx, axis=0, out=d2, mode="clip"))
    runner.add("memmove-loop", lambda: copies.copy(plan, checked=False))
    runner.add("pvm-self", lambda: copies.copy(plan, checked=True))


class RawTcp:
    """Client of the raw sender: the same blocks over a plain socket, no protocol."""

    def __init__(self, nbytes: int) -> None:
        self.proc, info = _spawn("raw", nbytes)
        self.sock = wire.connect(("127.0.0.1", info["port"]), 10.0)

    def add(self, runner: Runner, dst: np.ndarray, bs: int) -> None:
        n = dst.size // bs
        sizes = np.full(n, bs, dtype=U64)
        local_list = (np.arange(n, dtype=U64) * U64(bs) + U64(dst.ctypes.data)).tolist()
        size_list = sizes.tolist()
        sock = self.sock

        def once() -> None:
            sock.sendall(bs.to_bytes(8, "little"))
            scatter_io(lambda c: sock.recvmsg_into(c, 0, socket.MSG_WAITALL)[0], local_list, size_list, lambda: None)

        runner.add("raw-tcp", once)

    def close(self) -> None:
        self.sock.close()
        self.proc.stdin.close()
        self.proc.wait(10)


class Pair:
    """A connected transport pair (the peer in a second process except for loopback)."""

    def __init__(self, name: str, dst: np.ndarray) -> None:
        self.name, self.proc, self.peer_t = name, None, None
        if name == "loopback":
            self.peer_t = transport_class(name)(_ctx())
            self.src = np.ones(dst.size, dtype=np.uint8)
            self.peer_t.register(Region(self.src.ctypes.data, self.src.size))
            info = {"pid": os.getpid(), "addr": self.src.ctypes.data, "desc": self.peer_t.local_info().hex()}
        else:
            self.proc, info = _spawn(name, dst.size)
        self.addr = info["addr"]
        self.t = transport_class(name)(_ctx())
        self.t.register(Region(dst.ctypes.data, dst.size))
        peer = PeerInfo(2, HOST, info["pid"], "127.0.0.1", bytes.fromhex(info["desc"]))
        self.ch = self.t.connect(peer, time.monotonic() + 10)

    def add(self, runner: Runner, dst: np.ndarray, bs: int) -> None:
        n = dst.size // bs
        plan = CopyPlan(np.arange(n, dtype=U64) * U64(bs) + U64(dst.ctypes.data),
                        _perm(n, bs) * U64(bs) + U64(self.addr), np.full(n, bs))
        runner.add(f"{self.name}.read", lambda: self.t.read(self.ch, plan, time.monotonic() + 60))
        runner.add(f"{self.name}.write", lambda: self.t.write(self.ch, plan, time.monotonic() + 60))

    def close(self) -> None:
        self.t.disconnect(self.ch)
        self.t.close()
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(10)
        if self.peer_t is not None:
            self.peer_t.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="16,64,1024", help="block sizes in KiB")
    parser.add_argument("--transports", default="", help="comma list (default: all available)")
    parser.add_argument("--peer-memory", choices=("memfd", "anon"), default="memfd",
                        help="serving memory: memfd segment like the engine's pools, or anonymous (THP)")
    args = parser.parse_args()
    global PEER_MEMORY
    PEER_MEMORY = args.peer_memory
    nbytes = args.mib << 20
    names = [n for n in (args.transports.split(",") if args.transports else available_transports())
             if n in ("loopback", "process_vm", "shm", "tcp")]
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    raw = RawTcp(nbytes)
    pairs = [Pair(name, dst) for name in names]
    print(f"{args.mib} MiB per pass in scattered blocks, median of {args.runs} round-robin runs, GB/s (1e9 B/s), "
          f"peer memory {PEER_MEMORY}; ratios: same-host reads vs memcpy, tcp vs raw-tcp")
    for kib in (int(s) for s in args.sizes.split(",")):
        runner = Runner(nbytes)
        add_memcpy(runner, dst, src, kib << 10)
        raw.add(runner, dst, kib << 10)
        for pair in pairs:
            pair.add(runner, dst, kib << 10)
        res = runner.run(args.runs)
        print(f"{kib:>5}K  " + "  ".join(f"{k} {v:.2f}" for k, v in res.items()))
        ratios = [f"{p.name} {res[p.name + '.read'] / res['raw-tcp' if p.name == 'tcp' else 'memcpy']:.2f}x"
                  for p in pairs]
        print("        read ratio: " + ", ".join(ratios))
    for pair in pairs:
        pair.close()
    raw.close()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peer":
        peer_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
