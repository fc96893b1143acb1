"""Fixtures for two-process tests: a peer process driven by JSON-line commands (see peer_proc.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import List

import pytest
from ports import free_port  # noqa: F401  (the integration tests import it from here)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "src")


class PeerProcess:
    """A running peer_proc.py; ``call(op, **args)`` returns its reply dict (raises on timeout)."""

    def __init__(self, env=None, prefix=(), stderr=None) -> None:
        environ = dict(os.environ)
        environ["PYTHONPATH"] = SRC + os.pathsep + environ.get("PYTHONPATH", "")
        environ.update(env or {})
        self.proc = subprocess.Popen([*prefix, sys.executable, os.path.join(HERE, "peer_proc.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                     env=environ)
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, op: str, **args) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 30.0) -> dict:
        result: List[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise TimeoutError("peer did not answer")
        return json.loads(result[0])

    def call(self, op: str, timeout: float = 30.0, **args) -> dict:
        with self._lock:
            self.send(op, **args)
            reply = self.recv(timeout)
        if not reply.get("ok"):
            raise AssertionError(f"peer op {op} failed: {reply}")
        return reply

    def try_call(self, op: str, timeout: float = 30.0, **args) -> dict:
        with self._lock:
            self.send(op, **args)
            return self.recv(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cont()
                self.send("exit")
                self.proc.wait(10)
            except Exception:  # noqa: BLE001 - fall back to kill
                pass
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass


@pytest.fixture
def spawn_peer():
    peers: List[PeerProcess] = []

    def spawn(env=None, prefix=(), stderr=None) -> PeerProcess:
        peer = PeerProcess(env, prefix, stderr)
        peers.append(peer)
        return peer

    yield spawn
    for peer in peers:
        peer.close()
