"""Fixtures for the transport conformance suite: a local transport, a serving peer, a channel."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

import numpy as np
import pytest

from llm_datadist._transport import available_transports, transport_class, unavailable_reason
from llm_datadist._transport.base import SMALL_OPS, CopyPlan, Guard, PeerInfo, Region, RemoteRegion, TransportContext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from peer_server import HOST_ID, Peer, pattern  # noqa: E402
from subsystems import tag  # noqa: E402
from waiting import wait_until  # noqa: E402

PEER_BYTES = 72 << 20
LOCAL_BYTES = 80 << 20
# The one list of transports the suite runs against; a new backend is tested by adding it here (with a skip
# mark when it needs an optional package or a GPU).
ALL = ["loopback", "process_vm", "shm", "tcp", "nixl"]
TESTED = [n for n in ALL if n in available_transports()]
# Transports this machine lacks are reported as skips with the reason (nixl without its package, say); nixl's
# skips are tagged with its subsystem, so that LLM_DATADIST_REQUIRE=nixl turns them into failures.
PARAMS = [n if n in TESTED else pytest.param(n, marks=pytest.mark.skip(
    reason=tag(n, str(unavailable_reason(n))) if n == "nixl" else f"{n}: {unavailable_reason(n)}")) for n in ALL]
ONE_SIDED = {"loopback", "process_vm", "shm"}  # the serving side does no work during a transfer


def ctx() -> TransportContext:
    return TransportContext(host_id=HOST_ID, pid=os.getpid(), bind_host="127.0.0.1")


def _described(info: dict) -> dict:
    """A peer's JSON description with bytes and the guard decoded."""
    out = dict(info)
    for key in ("descriptor", "local_info", "nonce", "credential"):
        if key in out:
            out[key] = bytes.fromhex(out[key])
    if "guard" in out:
        out["guard"] = Guard(*out["guard"])
    return out


class InProcessPeer:
    """The serving side of a loopback pair: a second transport instance in this process."""

    def __init__(self, name: str, nbytes: int) -> None:
        self._peer = Peer(name, nbytes)
        self.transport = self._peer.transport
        self.pid = os.getpid()
        self.info = _described(self._peer.hello())

    def command(self, *words: str) -> dict:
        return _described(self._peer.command(list(words)))

    def close(self) -> None:
        self._peer.close()


class ProcessPeer:
    """The serving side in a second process (tests/transport/peer_server.py)."""

    def __init__(self, name: str, nbytes: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "peer_server.py"), name, str(nbytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = _described(json.loads(self._line(30.0)))
        self.pid = self.info["pid"]

    def _line(self, timeout: float) -> str:
        result: List[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise RuntimeError("peer did not answer")
        return result[0]

    def command(self, *words: str) -> dict:
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        return _described(json.loads(self._line(30.0)))

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:  # group stop reaches the other threads later: wait for all of them
            assert wait_until(self._all_threads_stopped, interval_s=0.002), "the peer did not stop"

    def _all_threads_stopped(self) -> bool:
        task_dir = f"/proc/{self.proc.pid}/task"
        try:
            states = []
            for tid in os.listdir(task_dir):
                with open(f"{task_dir}/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            return False
        return all(state in ("T", "t") for state in states)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class Setup:
    """A local transport connected to a serving peer as an engine would connect it, plus plan helpers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._expected: Optional[np.ndarray] = None
        self.one_sided = name in ONE_SIDED
        self.peer = InProcessPeer(name, PEER_BYTES) if name == "loopback" else ProcessPeer(name, PEER_BYTES)
        info = self.peer.info
        self.addr, self.nbytes, self.seed, self.guard = info["addr"], info["nbytes"], info["seed"], info["guard"]
        self.transport = transport_class(name)(ctx())
        self.local = np.zeros(LOCAL_BYTES, dtype=np.uint8)
        self.transport.register(Region(self.local.ctypes.data, LOCAL_BYTES))  # as an engine registers its caches
        self.peer_info = PeerInfo(cluster_id=2, host_id=HOST_ID, pid=self.peer.pid, address="127.0.0.1",
                                  descriptor=info["local_info"], credential=info["credential"], nonce=info["nonce"])
        self.regions = [RemoteRegion(self.addr, self.nbytes, "host", info["descriptor"])]
        self.channel = self.connect()

    def connect(self):
        channel = self.transport.connect(self.peer_info, time.monotonic() + 10)
        self.transport.learn(channel, self.regions)
        return channel

    def add(self, nbytes: int) -> dict:
        """A region the peer registers after we connected; learned the way an engine learns it."""
        info = self.peer.command("add", str(nbytes))
        self.regions.append(RemoteRegion(info["addr"], info["nbytes"], "host", info["descriptor"]))
        self.transport.learn(self.channel, self.regions)
        return info

    def expected(self) -> np.ndarray:
        """The peer region's content after a reset (computed once)."""
        if self._expected is None:
            self._expected = pattern(self.nbytes, self.seed)
            self._expected.flags.writeable = False
        return self._expected

    def plan(self, local_off, remote_off, sizes, guard: Optional[Guard] = None, base: Optional[int] = None,
             ints: bool = False) -> CopyPlan:
        """A plan from offsets into our local buffer and the peer's region, guarded by that region's guard.

        ``ints``: built from Python int lists, as the planner builds a plan of at most SMALL_OPS ops (the plan
        then keeps them as ints); else from uint64 arrays.
        """
        local = np.asarray(local_off, dtype=np.uint64) + np.uint64(self.local.ctypes.data)
        remote = np.asarray(remote_off, dtype=np.uint64) + np.uint64(self.addr if base is None else base)
        sizes = np.asarray(sizes, dtype=np.uint64)
        if ints:
            assert len(sizes) <= SMALL_OPS
            plan = CopyPlan(local.tolist(), remote.tolist(), sizes.tolist(), guards=(guard or self.guard,))
            assert plan.ops is not None
            return plan
        return CopyPlan(local, remote, sizes, guards=(guard or self.guard,))

    def raw_plan(self, local, remote, sizes) -> CopyPlan:
        """A plan over absolute addresses (for refusals), guarded by the peer's guard."""
        return CopyPlan(np.asarray(local, dtype=np.uint64), np.asarray(remote, dtype=np.uint64),
                        np.asarray(sizes, dtype=np.uint64), guards=(self.guard,))

    def deadline(self, seconds: float = 20.0) -> float:
        return time.monotonic() + seconds

    def close(self) -> None:
        self.transport.disconnect(self.channel)
        self.transport.close()
        self.peer.close()


@pytest.fixture(scope="module", params=PARAMS)
def setup(request) -> Setup:
    """One connected pair per transport, shared by the non-destructive tests of a module."""
    pair = Setup(request.param)
    yield pair
    pair.close()


@pytest.fixture(params=PARAMS)
def fresh(request) -> Setup:
    """A connected pair of its own, for tests that stop, kill or close things."""
    pair = Setup(request.param)
    yield pair
    pair.close()
