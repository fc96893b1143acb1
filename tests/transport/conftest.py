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

from llm_datadist._transport import available_transports, transport_class
from llm_datadist._transport.base import CopyPlan, PeerInfo, Region, TransportContext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from peer_server import HOST_ID, pattern  # noqa: E402

PEER_BYTES = 72 << 20
LOCAL_BYTES = 80 << 20
TESTED = [n for n in ("loopback", "process_vm", "shm", "tcp") if n in available_transports()]
ONE_SIDED = {"loopback", "process_vm", "shm"}  # the serving side does no work during a transfer


def ctx() -> TransportContext:
    return TransportContext(host_id=HOST_ID, pid=os.getpid(), bind_host="127.0.0.1")


class InProcessPeer:
    """The serving side of a loopback pair: a second transport instance in this process."""

    def __init__(self, name: str, nbytes: int) -> None:
        self.transport = transport_class(name)(ctx())
        self.pid = os.getpid()
        self._buffers: List[np.ndarray] = []
        self._pristine: List[np.ndarray] = []
        info = self._add(nbytes)
        self.addr, self.nbytes, self.seed = info["addr"], info["nbytes"], info["seed"]
        self.descriptor = self.transport.local_info()

    def _add(self, nbytes: int) -> dict:
        seed = len(self._buffers) + 1
        buf = pattern(nbytes, seed)
        self._buffers.append(buf)
        self._pristine.append(buf.copy())
        self.transport.register(Region(buf.ctypes.data, nbytes))
        return {"addr": buf.ctypes.data, "nbytes": nbytes, "seed": seed}

    def command(self, *words: str) -> dict:
        if words[0] == "reset":
            for buf, pristine in zip(self._buffers, self._pristine):
                buf[:] = pristine
            return {"ok": True}
        if words[0] == "add":
            return self._add(int(words[1]))
        raise ValueError(words)

    def close(self) -> None:
        self.transport.close()


class ProcessPeer:
    """The serving side in a second process (tests/transport/peer_server.py)."""

    def __init__(self, name: str, nbytes: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "peer_server.py"), name, str(nbytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = json.loads(self._line(30.0))
        self.pid = info["pid"]
        self.addr, self.nbytes, self.seed = info["addr"], info["nbytes"], info["seed"]
        self.descriptor = bytes.fromhex(info["descriptor"])

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
        return json.loads(self._line(30.0))

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:  # group stop reaches the other threads later: wait for all of them
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not self._all_threads_stopped():
                time.sleep(0.002)

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
    """A local transport connected to a serving peer, plus helpers to build and check plans."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._expected: Optional[np.ndarray] = None
        self.one_sided = name in ONE_SIDED
        self.peer = InProcessPeer(name, PEER_BYTES) if name == "loopback" else ProcessPeer(name, PEER_BYTES)
        self.transport = transport_class(name)(ctx())
        self.local = np.zeros(LOCAL_BYTES, dtype=np.uint8)
        self.transport.register(Region(self.local.ctypes.data, LOCAL_BYTES))
        self.peer_info = PeerInfo(cluster_id=2, host_id=HOST_ID, pid=self.peer.pid, address="127.0.0.1",
                                  descriptor=self.peer.descriptor)
        self.channel = self.transport.connect(self.peer_info, time.monotonic() + 10)

    def expected(self) -> np.ndarray:
        """The peer region's content after a reset (computed once)."""
        if self._expected is None:
            self._expected = pattern(self.peer.nbytes, self.peer.seed)
            self._expected.flags.writeable = False
        return self._expected

    def plan(self, local_off: np.ndarray, remote_off: np.ndarray, sizes: np.ndarray) -> CopyPlan:
        """A plan from offsets into our local buffer and the peer's region."""
        return CopyPlan(np.asarray(local_off, dtype=np.uint64) + np.uint64(self.local.ctypes.data),
                        np.asarray(remote_off, dtype=np.uint64) + np.uint64(self.peer.addr),
                        np.asarray(sizes, dtype=np.uint64))

    def deadline(self, seconds: float = 20.0) -> float:
        return time.monotonic() + seconds

    def close(self) -> None:
        self.transport.disconnect(self.channel)
        self.transport.close()
        self.peer.close()


@pytest.fixture(scope="module", params=TESTED)
def setup(request) -> Setup:
    """One connected pair per transport, shared by the non-destructive tests of a module."""
    pair = Setup(request.param)
    yield pair
    pair.close()


@pytest.fixture(params=TESTED)
def fresh(request) -> Setup:
    """A connected pair of its own, for tests that stop, kill or close things."""
    pair = Setup(request.param)
    yield pair
    pair.close()


@pytest.fixture
def two_process_fresh(fresh) -> Optional[Setup]:
    if fresh.name == "loopback":
        pytest.skip("the loopback peer lives in this process")
    return fresh
