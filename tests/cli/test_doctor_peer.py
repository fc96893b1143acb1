"""``llm-datadist doctor --peer HOST:PORT`` against live peers in other processes: a working link (route, RTT, a
verified read), a wrong and a missing secret, a closed port, TLS mismatches, another protocol version, and a peer on
another simulated host whose namespace drops its tcp data port while its listen port answers.

Each case runs the command as a subprocess and checks its exit status and that its report names the cause. The
peers are tests/multihost/host_peer.py processes (the public API only); their caches hold host_peer.pattern bytes,
so the digest of the doctor's verified read is checked against what the peer registered.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from llm_datadist.cli import main as cli
from llm_datadist.cli.netns import Host, SimulatedHosts, sweep_stale, unavailable_reason
from ports import free_port
from subsystems import skip
from tests.multihost.host_peer import pattern
from tests.multihost.peers import LISTEN_PORT, HostPeer
from waiting import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "src")
PROMPT = 1
SEED, TENSORS, BLOCKS, BLOCK_BYTES = 5, 2, 4, 8192
READ_BYTES = 4096
SECRET = "doctor-test-secret-0123456789"
EXPECTED_SHA256 = hashlib.sha256(pattern(SEED, 0, BLOCKS * BLOCK_BYTES)[:READ_BYTES].tobytes()).hexdigest()


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This environment without the library's behaviour variables (the test says what it wants), src importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_DATADIST_")}
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def _argv(peer: str, *args: str) -> List[str]:
    return [sys.executable, "-m", "llm_datadist", "doctor", "--peer", peer, *args]


def doctor(peer: str, *args: str, env: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
    """Run ``doctor --peer`` here; (exit status, stdout and stderr)."""
    proc = subprocess.run(_argv(peer, *args), capture_output=True, text=True, env=_env(env), timeout=60, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def doctor_json(peer: str, *args: str, env: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, Any]]:
    code, out = doctor(peer, "--json", *args, env=env)
    try:
        return code, json.loads(out)
    except ValueError:
        raise AssertionError(f"doctor --json printed no JSON object (status {code}):\n{out}") from None


def check(report: Dict[str, Any], name: str) -> Dict[str, Any]:
    found = [c for c in report["checks"] if c["name"] == name]
    assert found, f"no {name!r} check in {report}"
    return found[0]


class _ThisMachine:
    """HostPeer's ``hosts`` for a peer process on this machine (no simulated host)."""

    def popen(self, host: Host, argv: List[str], **popen_args: Any) -> subprocess.Popen:
        return subprocess.Popen(argv, **popen_args)


def _local_peer(log_dir: str, name: str, **config: Any) -> Tuple[HostPeer, int]:
    """A host_peer.py process on 127.0.0.1 listening on a free port, with a blocks cache of SEED bytes."""
    host = Host(index=0, netns="", ip="127.0.0.1", hostname=socket.gethostname())
    peer = HostPeer(_ThisMachine(), host, os.path.join(log_dir, f"{name}.log"), _env())  # type: ignore[arg-type]
    port = free_port()
    cfg = {"enable_cache_manager": True, "listen_ip_info": f"127.0.0.1:{port}", **config}
    peer.call("init", role=PROMPT, cluster_id=11, config=cfg)
    peer.call("register", name="kv", num_tensors=TENSORS, num_blocks=BLOCKS, block_bytes=BLOCK_BYTES, seed=SEED)
    return peer, port


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("doctor-peer"))


@pytest.fixture(scope="module")
def pki_dir(logs) -> str:
    """A CA with a certificate for the peer and one for us, and a second CA with a certificate of its own."""
    import pki

    path = os.path.join(logs, "pki")
    os.makedirs(path)
    pki.make_ca(path, "ca")
    pki.make_cert(path, "peer", "ca")
    pki.make_cert(path, "me", "ca")
    pki.make_ca(path, "other")
    pki.make_cert(path, "stranger", "other")
    return path


def _tls_args(pki_dir: str, cert: str, ca: str) -> List[str]:
    return ["--tls-cert", os.path.join(pki_dir, f"{cert}.pem"), "--tls-key", os.path.join(pki_dir, f"{cert}.key"),
            "--tls-ca", os.path.join(pki_dir, f"{ca}.pem")]


@pytest.fixture(scope="module")
def plain_peer(logs) -> Iterator[str]:
    peer, port = _local_peer(logs, "plain")
    yield f"127.0.0.1:{port}"
    peer.close()


@pytest.fixture(scope="module")
def secret_peer(logs) -> Iterator[str]:
    peer, port = _local_peer(logs, "secret", link_secret=SECRET)
    yield f"127.0.0.1:{port}"
    peer.close()


@pytest.fixture(scope="module")
def tls_peer(logs, pki_dir) -> Iterator[str]:
    files = {"tls_cert_file": os.path.join(pki_dir, "peer.pem"), "tls_key_file": os.path.join(pki_dir, "peer.key"),
             "tls_ca_file": os.path.join(pki_dir, "ca.pem")}
    peer, port = _local_peer(logs, "tls", **files)
    yield f"127.0.0.1:{port}"
    peer.close()


# ---------------------------------------------------------------------------------------------------------------
# A working link
# ---------------------------------------------------------------------------------------------------------------
def test_a_working_link_shows_the_route_the_rtt_and_a_verified_read(plain_peer):
    code, report = doctor_json(plain_peer, "--read-bytes", str(READ_BYTES))
    assert code == 0 and report["ok"], report
    assert {c["name"]: c["status"] for c in report["checks"]}.keys() >= {"address", "tcp", "handshake", "secret",
                                                                          "tls", "rtt", "data port", "route", "read"}
    assert all(c["status"] != "fail" for c in report["checks"]), report
    route = report["route"]
    general = route["chosen"][-1]
    assert route["same_host"] and route["why"].startswith(f"{general}: same host"), route
    if general == "process_vm":
        assert "ptrace allowed" in route["why"], route
    rtt = report["rtt_ms"]
    assert rtt["pings"] == 5 and 0 < rtt["min"] <= rtt["median"], rtt
    read = report["read"]
    assert read["status"] == "ok" and read["nbytes"] == READ_BYTES, read
    assert read["sha256"] == EXPECTED_SHA256, "the verified read did not return the peer's bytes"
    assert len(read["routes"]) >= 3, read  # the route a pull takes, another route (or a split read), the first again

    code, text = doctor(plain_peer)
    assert code == 0, text
    assert "the link works" in text and "route" in text and "median" in text and "identical" in text, text


def test_a_secret_or_tls_here_that_the_peer_lacks_is_named(plain_peer, pki_dir):
    code, text = doctor(plain_peer, "--secret", SECRET)
    assert code == 1, text
    assert "shared secret missing on the peer" in text and "fix:" in text, text
    code, text = doctor(plain_peer, *_tls_args(pki_dir, "me", "ca"))
    assert code == 1, text
    assert "TLS mismatch: the peer does not use TLS" in text, text


def test_finalizes_everything_it_creates(plain_peer, capsys):
    """In this process: after the command, no library thread and no extra descriptor remains."""
    before_threads = set(threading.enumerate())
    before_fds = len(os.listdir("/proc/self/fd"))
    assert cli.main(["doctor", "--peer", plain_peer, "--json"]) == 0, capsys.readouterr().out
    assert json.loads(capsys.readouterr().out)["ok"]

    def clean() -> bool:
        threads = [t for t in threading.enumerate() if t not in before_threads and t.is_alive()]
        return not threads and len(os.listdir("/proc/self/fd")) <= before_fds

    assert wait_until(clean), ([t.name for t in threading.enumerate() if t not in before_threads],
                               len(os.listdir("/proc/self/fd")), before_fds)


# ---------------------------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------------------------
def test_a_wrong_secret_is_named(secret_peer):
    code, text = doctor(secret_peer, "--secret", "not-the-secret-0123456789")
    assert code == 1, text
    assert "wrong shared secret" in text and "set the same secret on both sides" in text, text


def test_a_missing_secret_is_named_and_the_environment_secret_is_used(secret_peer):
    code, report = doctor_json(secret_peer)
    assert code == 1 and not report["ok"], report
    handshake = check(report, "handshake")
    assert handshake["status"] == "fail" and handshake["detail"] == "shared secret missing here", handshake
    assert "LLM_DATADIST_LINK_SECRET" in handshake["fix"], handshake
    assert report["failure"]["kind"] == "secret-required", report
    assert check(report, "rtt")["status"] == "skip"
    code, text = doctor(secret_peer, env={"LLM_DATADIST_LINK_SECRET": SECRET})
    assert code == 0, text
    assert "both sides proved the shared secret" in text, text


# ---------------------------------------------------------------------------------------------------------------
# Reachability and protocol
# ---------------------------------------------------------------------------------------------------------------
def test_a_closed_port_is_named():
    port = free_port()
    code, text = doctor(f"127.0.0.1:{port}")
    assert code == 1, text
    assert "refused the connection" in text and f"nothing listens on 127.0.0.1:{port}" in text, text
    assert f"listen_ip_info=127.0.0.1:{port}" in text, text


def test_another_protocol_version_is_named_with_both_versions():
    """A listener that answers every Hello with a frame of the next protocol version (as a newer peer does)."""
    from llm_datadist._engine import protocol

    theirs = protocol.PROTOCOL_VERSION + 1
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    stop = threading.Event()
    server.settimeout(0.1)

    def answer() -> None:  # every connection: the doctor's reachability check first, then its handshake
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if conn.recv(protocol.HEADER_SIZE):
                        conn.sendall(protocol.HEADER.pack(protocol.MAGIC, theirs, 2, protocol.FLAG_REPLY, 0, 0))
                except OSError:
                    pass

    thread = threading.Thread(target=answer, name="fake-newer-peer", daemon=True)
    thread.start()
    try:
        code, report = doctor_json(f"127.0.0.1:{port}")
    finally:
        stop.set()
        thread.join(10)
        server.close()
    assert code == 1, report
    handshake = check(report, "handshake")
    assert handshake["detail"] == "protocol version mismatch", handshake
    assert f"version {theirs}, this side speaks {protocol.PROTOCOL_VERSION}" in handshake["cause"], handshake


# ---------------------------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------------------------
def test_tls_mismatches_are_named(tls_peer, pki_dir):
    code, text = doctor(tls_peer)
    assert code == 1, text
    assert "TLS mismatch: the peer requires TLS" in text and "--tls-cert" in text, text
    code, text = doctor(tls_peer, *_tls_args(pki_dir, "stranger", "other"))
    assert code == 1, text
    assert "the peer's certificate is not trusted" in text, text
    code, text = doctor(tls_peer, *_tls_args(pki_dir, "stranger", "ca"))
    assert code == 1, text
    assert "the peer refused this side's certificate" in text, text
    code, text = doctor(tls_peer, *_tls_args(pki_dir, "me", "ca"))
    assert code == 0, text
    assert "mutual TLS" in text and "identical" in text, text


# ---------------------------------------------------------------------------------------------------------------
# Another host whose firewall drops the data port
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def two_hosts(logs) -> Iterator[Tuple[SimulatedHosts, HostPeer]]:
    """Two simulated hosts; on host 0 a peer listening on LISTEN_PORT with a blocks cache of SEED bytes."""
    reason = unavailable_reason()
    if reason is not None:
        skip("netns", f"simulated hosts unavailable: {reason}")
    sweep_stale()
    hosts = SimulatedHosts(2).start()
    peer = None
    try:
        peer = HostPeer(hosts, hosts[0], os.path.join(logs, "netns-peer.log"), _env())
        peer.call("init", role=PROMPT, cluster_id=21,
                  config={"enable_cache_manager": True, "listen_ip_info": f"{hosts[0].ip}:{LISTEN_PORT}"})
        peer.call("register", name="kv", num_tensors=TENSORS, num_blocks=BLOCKS, block_bytes=BLOCK_BYTES, seed=SEED)
        yield hosts, peer
    finally:
        if peer is not None:
            peer.close()
        hosts.close()


def _doctor_on(hosts: SimulatedHosts, index: int, peer: str, *args: str) -> Tuple[int, Dict[str, Any]]:
    proc = hosts.popen(hosts[index], _argv(peer, "--json", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=_env(), cwd=ROOT)
    out, err = proc.communicate(timeout=60)
    try:
        return proc.returncode, json.loads(out)
    except ValueError:
        raise AssertionError(f"no JSON from doctor (status {proc.returncode}):\n{out}\n{err}") from None


def _drop_data_ports(hosts: SimulatedHosts, host: Host) -> None:
    """A firewall in the host's namespace that drops incoming TCP to its ephemeral ports (where the tcp data
    server listens) and lets LISTEN_PORT, below that range, through: a policy-routing rule that blackholes them
    (iproute2 only), looked up before the local table (moved behind it)."""
    low, high = hosts.run_in(host, ["cat", "/proc/sys/net/ipv4/ip_local_port_range"]).stdout.split()
    assert int(low) > LISTEN_PORT
    for argv in (["ip", "rule", "add", "prio", "100", "iif", host.ifname, "ipproto", "tcp", "dport",
                  f"{low}-{high}", "blackhole"],
                 ["ip", "rule", "add", "prio", "1000", "lookup", "local"],
                 ["ip", "rule", "del", "prio", "0"]):
        hosts.run_in(host, argv)


def test_a_data_port_blocked_on_another_host_is_named(two_hosts):
    hosts, _peer = two_hosts
    target = f"{hosts[0].ip}:{LISTEN_PORT}"
    code, report = _doctor_on(hosts, 1, target, "--timeout", "2")
    assert code == 0 and report["ok"], report
    assert report["route"]["chosen"][-1] == "tcp" and report["route"]["why"].startswith("tcp: different hosts")
    assert report["read"]["status"] == "ok" and report["read"]["sha256"] == EXPECTED_SHA256, report["read"]
    assert report["read"]["routes"][1] == "tcp (in two requests)", report["read"]
    data_port = report["data_port"]["port"]

    _drop_data_ports(hosts, hosts[0])
    code, report = _doctor_on(hosts, 1, target, "--timeout", "2")
    assert code == 1 and not report["ok"], report
    assert check(report, "handshake")["status"] == "ok", report
    blocked = check(report, "data port")
    assert blocked["status"] == "fail", blocked
    port = report["data_port"]["port"]
    assert port == data_port, report  # the same data server as before
    assert f"data port {port}" in blocked["cause"] and f"listen port {LISTEN_PORT} does" in blocked["cause"]
    assert "firewall drops" in blocked["cause"] and f"open TCP port {port}" in blocked["fix"], blocked
    route = check(report, "route")
    assert route["status"] == "fail" and "different hosts" in route["detail"], route
    assert check(report, "read")["status"] == "skip", report
