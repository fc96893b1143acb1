"""Peer processes for the reliability tests and what /proc says about a process (fds, threads, RSS)."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from typing import Callable, Dict, List, Optional

from ports import free_port  # noqa: F401  (the reliability tests import it from here)
from waiting import wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SRC = os.path.join(ROOT, "src")


def behaviour_env(environ) -> List[str]:
    """The library variables that change behaviour (transport, secret, caps...): every ``LLM_DATADIST_*``
    but the log level."""
    return [n for n in environ if n.startswith("LLM_DATADIST_") and n != "LLM_DATADIST_LOG_LEVEL"]


# -- /proc ---------------------------------------------------------------------------------------------
def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def thread_count(pid: int) -> int:
    return _status(pid, "Threads")


def rss_kib(pid: int) -> int:
    return _status(pid, "VmRSS")


def accepted_on(pid: int, port: int) -> int:
    """How many connected sockets the process holds whose local port is ``port`` (what it accepted there).

    The truth about the server's side, from /proc: fd counts alone move with every socket the server opens or
    is still closing (a probe link torn down a moment ago), which is not what a test of one port asks."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed while we read
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            connected = cols[3] == "01"  # TCP_ESTABLISHED
            count += connected and local_port == port and cols[9] in inodes
    return count


def is_stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds passed (``waiting.wait_until``)."""
    return wait_until(predicate, timeout, step)


def settle(measure: Callable[[], int], limit: int, timeout: float) -> int:
    """Poll ``measure()`` until it is at most ``limit`` (or the timeout); returns the last value."""
    last = [measure()]

    def low() -> bool:
        last[0] = measure()
        return last[0] <= limit

    wait_until(low, timeout, 0.05)
    return last[0]


POOL_WORKER = re.compile(r"-w\d+$")  # workers of the engines' bounded executors ("...-w0", "...-w1")
POOL_WORKERS_PER_INSTANCE = 12  # handler and task pools together start at most this many, on demand


def thread_census(peer) -> tuple[int, int]:
    """(bounded pool workers, every other thread) of a peer process, by Python thread name."""
    names = peer.call("threads")["names"]
    pool = sum(1 for name in names if POOL_WORKER.search(name))
    return pool, len(names) - pool


class Usage:
    """fds, threads and RSS of a process at one moment."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fds = fd_count(pid)
        self.threads = thread_count(pid)
        self.rss_kib = rss_kib(pid)

    def __repr__(self) -> str:
        return f"<Usage fds={self.fds} threads={self.threads} rss={self.rss_kib} KiB>"


# -- peer processes -----------------------------------------------------------------------------------
class PeerError(AssertionError):
    """A peer command failed; ``reply`` holds the peer's answer (``code`` is an LLMStatusCode or -1)."""

    def __init__(self, op: str, reply: dict) -> None:
        super().__init__(f"peer op {op} failed: {reply}")
        self.reply = reply
        self.code = reply.get("code")


class PeerProcess:
    """A running ``tests.reliability.peer``; ``call(op, **args)`` returns its reply (PeerError if it failed)."""

    def __init__(self, env: Optional[Dict[str, str]] = None) -> None:
        environ = dict(os.environ)
        for name in behaviour_env(environ):  # only what ``env`` says
            del environ[name]
        environ["PYTHONPATH"] = os.pathsep.join([ROOT, SRC, environ.get("PYTHONPATH", "")])
        environ.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.peer"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environ)
        self._replies: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="peer-replies", daemon=True)
        self._reader.start()
        self._lock = threading.Lock()
        self.port = 0  # the listen port of its instance, when ``server()`` made it

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def try_call(self, op: str, timeout: float = 30.0, **args) -> dict:
        with self._lock:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
            try:
                line = self._replies.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"peer did not answer {op} within {timeout} s") from None
        if line is None:
            raise ConnectionError(f"peer exited during {op} (rc {self.proc.poll()})")
        return json.loads(line)

    def call(self, op: str, timeout: float = 30.0, **args) -> dict:
        reply = self.try_call(op, timeout, **args)
        if not reply.get("ok"):
            raise PeerError(op, reply)
        return reply

    def usage(self) -> Usage:
        return Usage(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        if not wait_for(lambda: is_stopped(self.pid), 5.0):
            raise AssertionError(f"process {self.pid} did not stop")

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        """Ask the peer to finalize and exit; kill it if it does not within 10 s."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except Exception:  # noqa: BLE001 - fall back to kill
                pass
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass
        self._reader.join(5)


class LocalPeer:
    """The peer's commands run in this process (for loopback, where both instances share one process)."""

    def __init__(self) -> None:
        from tests.reliability.peer import Peer

        self.peer = Peer()
        self.pid = os.getpid()

    def try_call(self, op: str, timeout: float = 30.0, **args) -> dict:
        from llm_datadist import LLMException

        try:
            return {"ok": True, **getattr(self.peer, f"op_{op}")(**args)}
        except LLMException as exc:
            return {"ok": False, "code": int(exc.status_code), "error": str(exc)}

    def call(self, op: str, timeout: float = 30.0, **args) -> dict:
        reply = self.try_call(op, timeout, **args)
        if not reply.get("ok"):
            raise PeerError(op, reply)
        return reply

    def close(self) -> None:
        for loop in list(self.peer.loops.values()):
            loop.stop()
        for dd in list(self.peer.dds.values()):
            dd.finalize()
        self.peer.dds.clear()


def server(spawn, cluster_id: int, env: Optional[Dict[str, str]] = None, *, ra: bool = False,
           config: Optional[dict] = None, inst: str = "main", role: int = 1) -> tuple[PeerProcess, int]:
    """A peer process with an instance listening on a free port of 127.0.0.1; returns (peer, port)."""
    peer = spawn(env)
    cfg = {"enable_cache_manager": True, "listen_ip_info": f"127.0.0.1:{free_port()}"}
    if ra:
        cfg["enable_remote_cache_accessible"] = True
    cfg.update(config or {})  # a listen_ip_info here wins (a restarted owner on its old port)
    peer.call("init", role=role, cluster_id=cluster_id, config=cfg, inst=inst)
    peer.port = int(cfg["listen_ip_info"].rsplit(":", 1)[1])
    return peer, peer.port
