"""Processes of the bench on simulated hosts: the child entry (``netns_child``) started inside a host's
namespaces, joined to the parent by a socket pair, with this package and the library on its path."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Any, Dict, List, Optional, Sequence, Tuple

from llm_datadist.cli.netns import SimulatedHosts

__all__ = ["CHILD_MODULE", "HostProcess", "child_env", "start_child", "start_process"]

CHILD_MODULE = "llm_datadist_bench.netns_child"


def _package_roots() -> List[str]:
    """The folders holding the library and this package (a checkout's src folders, or site-packages)."""
    import llm_datadist
    import llm_datadist_bench

    roots = []
    for package in (llm_datadist, llm_datadist_bench):
        root = os.path.dirname(os.path.dirname(os.path.abspath(package.__file__ or "")))
        if root not in roots:
            roots.append(root)
    return roots


class HostProcess:
    """A process on a simulated host, with the parts of ``multiprocessing.Process`` the suite runner uses."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> Optional[int]:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: Optional[float] = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self.popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of the bench's processes on the hosts: the library and this package first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(_package_roots() + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


def start_process(hosts: SimulatedHosts, index: int, argv: List[str], inherit: Sequence[socket.socket] = (),
                  env: Optional[Dict[str, str]] = None, **popen_args: Any) -> HostProcess:
    """Start ``argv`` on host ``index``; it inherits the descriptors of the ``inherit`` sockets."""
    fds = [s.fileno() for s in inherit]
    return HostProcess(hosts.popen(hosts[index], argv, pass_fds=fds, env=env or child_env(), **popen_args))


def start_child(hosts: SimulatedHosts, index: int, role: str, job: Any,
                extra: Sequence[socket.socket] = ()) -> Tuple[HostProcess, Connection]:
    """Start the bench's child entry with ``role`` on host ``index``; returns it and a connection to it.

    ``job`` is the first message on the connection. The child gets the descriptors of its end of the
    connection and of ``extra`` (sockets to other children) as arguments.
    """
    mine, theirs = socket.socketpair()
    inherit = [theirs, *extra]
    argv = [sys.executable, "-m", CHILD_MODULE, role, *(str(s.fileno()) for s in inherit)]
    try:
        proc = start_process(hosts, index, argv, inherit)
    finally:
        theirs.close()
    conn = Connection(mine.detach())
    conn.send(job)
    return proc, conn
