"""The simulated hosts themselves: apart as real hosts are (addresses, loopback, pids, hostname), and cleaned up."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm_datadist.cli.netns import NetnsError, SimulatedHosts, netem_unavailable_reason
from subsystems import skip

PROBE = """
import json, os, socket, sys
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(1)
reached = {}
for name, address in (("peer", (sys.argv[1], int(sys.argv[2]))), ("peer_loopback", ("127.0.0.1", int(sys.argv[2])))):
    try:
        socket.create_connection(address, 3).close(); reached[name] = True
    except OSError:
        reached[name] = False
print(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(), "reached": reached,
                  "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                  "shm": sorted(os.listdir("/dev/shm"))}), flush=True)
"""
SERVER = """
import socket, sys
open("/dev/shm/" + sys.argv[1], "w").close()  # in this host's own /dev/shm
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 27000)); s.listen(8)
print("listening", flush=True)
while True:
    s.accept()[0].close()
"""


def _netns_names():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_hosts_reach_each_other_only_by_address_and_share_no_identity():
    with SimulatedHosts(2) as hosts:
        marker = f"{hosts.run_id}-marker"
        server = hosts.popen(hosts[0], [sys.executable, "-c", SERVER, marker], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        probe = hosts.popen(hosts[1], [sys.executable, "-c", PROBE, hosts[0].ip, "27000"], stdout=subprocess.PIPE,
                            text=True)
        out, _ = probe.communicate(timeout=30)
        seen = json.loads(out)
        assert seen["reached"] == {"peer": True, "peer_loopback": False}  # 127.0.0.1 is this host's own
        assert seen["pid"] == 1 and seen["processes"] == [1]  # its own pid namespace and /proc
        assert seen["hostname"] == hosts[1].hostname != hosts[0].hostname
        assert seen["shm"] == [] and not os.path.exists(f"/dev/shm/{marker}")  # no shared memory between hosts
        assert len({h.ip for h in hosts.hosts}) == 2


def test_close_removes_namespaces_and_processes_even_after_an_error():
    hosts = SimulatedHosts(3)
    with pytest.raises(RuntimeError):
        with hosts:
            proc = hosts.popen(hosts[2], [sys.executable, "-c", "import time; time.sleep(600)"])
            assert all(h.netns in _netns_names() for h in hosts.hosts)
            raise RuntimeError("a failing test")
    assert proc.poll() is not None
    names = _netns_names()
    assert not [h for h in hosts.hosts if h.netns in names] and hosts.switch not in names
    with pytest.raises(NetnsError):
        hosts.popen(hosts[0], ["true"])
    hosts.close()  # idempotent


def test_link_down_and_up_and_rate_limit():
    with SimulatedHosts(2) as hosts:
        ping = [sys.executable, "-c", "import socket, sys; socket.create_connection((sys.argv[1], 9), 1)",
                hosts[0].ip]

        def reachable() -> str:
            result = subprocess.run(hosts.command(hosts[1], ping), capture_output=True, text=True, timeout=30)
            return "refused" if "ConnectionRefused" in result.stderr else result.stderr.strip().splitlines()[-1]

        assert reachable() == "refused"  # an answer (RST) from the other host: the path works
        hosts.link_down(hosts[0])
        assert "refused" not in reachable()  # no answer at all now
        hosts.link_up(hosts[0])
        assert reachable() == "refused"
        hosts.rate_limit(hosts[1], "100mbit")
        shown = hosts.run_in(hosts[1], ["tc", "qdisc", "show", "dev", hosts[1].ifname]).stdout
        assert "tbf" in shown and "100Mbit" in shown
        hosts.clear_traffic_control(hosts[1])
        assert "tbf" not in hosts.run_in(hosts[1], ["tc", "qdisc", "show", "dev", hosts[1].ifname]).stdout


def test_netem_is_used_where_the_kernel_has_it():
    reason = netem_unavailable_reason()
    if reason is not None:
        skip("netem", reason)
    with SimulatedHosts(1) as hosts:
        hosts.netem(hosts[0], "delay", "5ms")
        assert "netem" in hosts.run_in(hosts[0], ["tc", "qdisc", "show", "dev", hosts[0].ifname]).stdout
