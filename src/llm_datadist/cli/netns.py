"""Simulated hosts on one machine: a network namespace per host, joined by veth pairs to a private bridge.

Each host runs its processes in its own network namespace and, through ``unshare``, its own pid, mount
(private ``/proc`` and ``/dev/shm``), IPC and UTS namespaces, with a hostname of its own, so two "hosts" share
no loopback, no address, no pid, no shared memory and no host identity (hostname + boot id), as between
real hosts or containers. The bridge lives in a namespace of its own too: nothing is added to the machine's
own network, and every packet stays between the namespaces one ``SimulatedHosts`` made. Needs root
(CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip`` and ``tc`` (iproute2) and ``unshare`` (util-linux);
:func:`unavailable_reason` says why not where they are missing.

Links between hosts can be taken down and up (:meth:`SimulatedHosts.link_down`), rate limited with ``tc``
``tbf`` (:meth:`SimulatedHosts.rate_limit`) and, where the kernel has ``sch_netem``, delayed or made lossy
(:meth:`SimulatedHosts.netem`; :func:`netem_unavailable_reason` says why not).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Dict, List, Optional, Sequence

__all__ = ["CROSS_HOST_TRANSPORTS", "Host", "NetnsError", "SimulatedHosts", "netem_unavailable_reason",
           "sweep_stale", "unavailable_reason"]

#: The library's transports that run between hosts, each tested and benchmarked across namespaces.
CROSS_HOST_TRANSPORTS = ("tcp", "nixl")  # nixl only where its package is installed (UCX over TCP here)
PREFIX = "lldd"  # namespace names: lldd-<pid>-<run>-<host>; a run of a dead pid is stale
HOST_IF = "eth0"  # the host's end of its veth pair (names are per namespace)
_CMD_TIMEOUT_S = 20.0
# Runs first in a host's new namespaces: its hostname, a /dev/shm of its own (a tmpfs in its mount namespace),
# then the command.
_HOST_SHIM = "\n".join([
    "import ctypes, os, socket, sys",
    "socket.sethostname(sys.argv[1])",
    "libc = ctypes.CDLL(None, use_errno=True)",
    "if os.path.isdir('/dev/shm') and libc.mount(b'tmpfs', b'/dev/shm', b'tmpfs', 0, b'mode=1777') != 0:",
    "    sys.exit('cannot mount a private /dev/shm: ' + os.strerror(ctypes.get_errno()))",
    "os.execvp(sys.argv[2], sys.argv[2:])",
])
_open_runs: Dict[int, SimulatedHosts] = {}
_runs_lock = threading.Lock()
_counter = [0]


class NetnsError(RuntimeError):
    """A namespace, link or traffic-control command failed; the message carries the command and its error."""


@dataclasses.dataclass(frozen=True)
class Host:
    """One simulated host: its network namespace, address, interface and hostname."""

    index: int
    netns: str
    ip: str
    hostname: str
    ifname: str = HOST_IF
    bridge_port: str = ""  # the other end of its veth pair, a port of the bridge (in the switch namespace)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip() or 'exit ' + str(proc.returncode)}")
    return proc


_reason_cache: Dict[str, Optional[str]] = {}


def unavailable_reason() -> Optional[str]:
    """None when simulated hosts can be made here, else why not (checked once per process)."""
    if "netns" not in _reason_cache:
        _reason_cache["netns"] = _probe()
    return _reason_cache["netns"]


def _probe() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"'{tool}' ({package}) is not installed"
    name = f"{PREFIX}-{os.getpid()}-probe"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace (needs CAP_NET_ADMIN / root): {made.stderr.strip()}"
    try:
        veth = _ip("-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
        argv = _host_argv(name, "llmdd-probe", ["true"])
        ns = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
        if ns.returncode != 0:
            return f"cannot create pid/mount/IPC/UTS namespaces (unshare): {ns.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def _host_argv(netns: str, hostname: str, argv: Sequence[str]) -> List[str]:
    """``argv`` in network namespace ``netns`` and new pid/mount/IPC/UTS namespaces, as host ``hostname``."""
    # --kill-child: when unshare dies (the process the caller holds), the host's process tree dies with it
    return ["ip", "netns", "exec", netns, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc",
            "--uts", "--", sys.executable, "-c", _HOST_SHIM, hostname, *argv]


def netem_unavailable_reason() -> Optional[str]:
    """None when ``tc qdisc ... netem`` works here, else why not (the kernel's answer)."""
    if "netem" not in _reason_cache:
        reason = unavailable_reason()
        if reason is None:
            with SimulatedHosts(1) as hosts:
                try:
                    hosts.netem(hosts[0], "delay", "1ms")
                except NetnsError as exc:
                    reason = f"the kernel has no sch_netem ({exc})"
        _reason_cache["netem"] = reason
    return _reason_cache["netem"]


def sweep_stale() -> List[str]:
    """Delete namespaces left by runs whose process is gone (a killed test run); returns their names."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    gone = []
    for line in listed:
        name = line.split(" ")[0].strip()
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if not os.path.exists(f"/proc/{parts[1]}"):
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


class SimulatedHosts:
    """``count`` hosts on one bridge, addresses ``10.231.<subnet>.<index + 1>/24``.

    Use as a context manager (or call :meth:`close`): every process started with :meth:`popen` is killed
    and every namespace deleted, also on errors; an ``atexit`` hook closes what a crashed caller left.

    Args:
        count: Number of hosts (1-200).
        subnet: Third octet of the private /24; default: derived from the pid and a per-process counter,
            so concurrent runs use different subnets (they could not collide anyway: the bridge is private).
        mtu: MTU of every link (default: the kernel's, 1500).
    """

    def __init__(self, count: int, subnet: Optional[int] = None, mtu: Optional[int] = None) -> None:
        if not 1 <= count <= 200:
            raise ValueError(f"count must be in 1..200, not {count}")
        with _runs_lock:
            _counter[0] += 1
            run = _counter[0]
        self.run_id = f"{PREFIX}-{os.getpid()}-{run}"
        self.subnet = subnet if subnet is not None else (os.getpid() * 7 + run) % 250 + 1
        self.switch = f"{self.run_id}-sw"
        self.hosts: List[Host] = [
            Host(index=i, netns=f"{self.run_id}-h{i}", ip=f"10.231.{self.subnet}.{i + 1}",
                 hostname=f"simhost{i}-{os.getpid()}-{run}", bridge_port=f"p{i}")
            for i in range(count)]
        self.mtu = mtu
        self._procs: List[subprocess.Popen] = []
        self._made: List[str] = []
        self._closed = False
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> SimulatedHosts:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __len__(self) -> int:
        return len(self.hosts)

    def start(self) -> SimulatedHosts:
        """Create the switch namespace, its bridge, and every host with its veth pair and address."""
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        with _runs_lock:
            _open_runs[id(self)] = self
        try:
            self._add_netns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            if self.mtu:
                _ip("-n", self.switch, "link", "set", "br0", "mtu", str(self.mtu))
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host in self.hosts:
                self._add_host(host)
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _add_host(self, host: Host) -> None:
        self._add_netns(host.netns)
        _ip("-n", self.switch, "link", "add", host.bridge_port, "type", "veth", "peer", "name", host.ifname, "netns",
            host.netns)
        if self.mtu:
            for netns, ifname in ((self.switch, host.bridge_port), (host.netns, host.ifname)):
                _ip("-n", netns, "link", "set", ifname, "mtu", str(self.mtu))
        _ip("-n", self.switch, "link", "set", host.bridge_port, "master", "br0")
        _ip("-n", self.switch, "link", "set", host.bridge_port, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", host.ifname)
        _ip("-n", host.netns, "link", "set", host.ifname, "up")

    def close(self) -> None:
        """Kill the hosts' processes and delete every namespace (idempotent, never raises)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._procs = self._procs, []
        for proc in procs:
            _kill(proc)
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made = []
        with _runs_lock:
            _open_runs.pop(id(self), None)

    # -- processes ------------------------------------------------------------------------------
    def command(self, host: Host, argv: Sequence[str]) -> List[str]:
        """The command line that runs ``argv`` on ``host`` (its namespaces, hostname and /dev/shm)."""
        return _host_argv(host.netns, host.hostname, argv)

    def popen(self, host: Host, argv: Sequence[str], **popen_args) -> subprocess.Popen:
        """Start ``argv`` on ``host``; the process is killed by :meth:`close` if still running.

        Killing the returned process (``unshare``) kills the host's whole process tree (its pid 1 dies).
        """
        if self._closed:
            raise NetnsError("these simulated hosts are closed")
        proc = subprocess.Popen(self.command(host, argv), **popen_args)
        with self._lock:
            self._procs.append(proc)
        return proc

    def run_in(self, host: Host, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        """Run a short command in the host's network namespace only (``tc``, ``cat /sys/...``)."""
        return _run(["ip", "netns", "exec", host.netns, *argv], check=check)

    # -- links and traffic control ----------------------------------------------------------------
    def link_down(self, host: Host) -> None:
        """Take the host's interface down: its packets stop, its sockets see no error (a pulled cable)."""
        _ip("-n", host.netns, "link", "set", host.ifname, "down")

    def link_up(self, host: Host) -> None:
        """Bring the host's interface back up with its address (routes return with it)."""
        _ip("-n", host.netns, "link", "set", host.ifname, "up")
        if host.ip not in _ip("-n", host.netns, "-o", "addr", "show", "dev", host.ifname).stdout:
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", host.ifname)

    def rate_limit(self, host: Host, rate: str, burst: str = "1mb", latency: str = "100ms") -> None:
        """Limit the host's traffic in both directions with a token bucket (``tc ... tbf``).

        Args:
            host: The host whose link is limited.
            rate: A ``tc`` rate, e.g. ``"200mbit"``, ``"2gbit"``.
            burst: Bucket size (``tc`` size, e.g. ``"1mb"``).
            latency: Longest time a packet may wait in the bucket before it is dropped.
        """
        for netns, ifname in ((host.netns, host.ifname), (self.switch, host.bridge_port)):
            _run(["tc", "-n", netns, "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", rate, "burst", burst,
                  "latency", latency])

    def netem(self, host: Host, *spec: str) -> None:
        """Delay or lose the host's outgoing packets (``tc ... netem <spec>``); NetnsError without sch_netem."""
        _run(["tc", "-n", host.netns, "qdisc", "replace", "dev", host.ifname, "root", "netem", *spec])

    def clear_traffic_control(self, host: Host) -> None:
        """Remove any rate limit or netem qdisc from the host's link (both directions)."""
        for netns, ifname in ((host.netns, host.ifname), (self.switch, host.bridge_port)):
            _run(["tc", "-n", netns, "qdisc", "del", "dev", ifname, "root"], check=False)

    def counters(self, host: Host) -> Dict[str, int]:
        """The host interface's byte counters: ``{"rx_bytes": ..., "tx_bytes": ...}``."""
        out = _ip("-n", host.netns, "-s", "-j", "link", "show", "dev", host.ifname).stdout
        stats = json.loads(out)[0].get("stats64", {})
        return {"rx_bytes": int(stats.get("rx", {}).get("bytes", 0)),
                "tx_bytes": int(stats.get("tx", {}).get("bytes", 0))}


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


@atexit.register
def _close_open_runs() -> None:
    with _runs_lock:
        runs = list(_open_runs.values())
    for run in runs:
        run.close()
