"""``llm-datadist doctor --peer HOST:PORT``: check a link to a running instance end to end.

The checks run in order, each on what the one before established: the address (DNS), TCP reachability of the
listen port, the link handshake (protocol version, shared secret, TLS) made by a temporary decode-side engine with
this side's settings, the round-trip time of the control link, the data route both sides choose (and whether it
connects: the tcp data port, process_vm under Yama), and a small read of one of the peer's caches over every route
that reaches it, compared byte for byte. A failed check names its cause and its fix; the checks after it that need
what failed are not run. Everything the run creates (the engine, its link, its sockets and threads) is closed
before it returns: the peer sees one link come and go, as with any decode.

Exit status: 0 the link works (warnings included), 1 a check failed, 2 bad arguments. ``--json`` prints one JSON
object instead of the table (docs/doctor.md describes it).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import secrets
import socket
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["add_arguments", "run", "Check"]

PROG = "llm-datadist doctor"
OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
DECODER = 2  # the role of the temporary instance (LLMRole.DECODER)


@dataclasses.dataclass
class Check:
    """One line of the report: what was checked, how it went, and for a failure or a warning why and what to do."""

    name: str
    status: str
    detail: str
    cause: str = ""
    fix: str = ""
    notes: List[str] = dataclasses.field(default_factory=list)  # more lines of detail (the route's transports)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``doctor`` that check a link to a running peer (``--peer`` turns them on)."""
    group = parser.add_argument_group("checking a link to a running instance")
    group.add_argument("--peer", metavar="HOST:PORT",
                       help="check the link to the instance listening there (its listen_ip_info) instead of this "
                            "machine")
    group.add_argument("--secret", default=None,
                       help="the shared link secret (default: $LLM_DATADIST_LINK_SECRET; unset: no secret)")
    group.add_argument("--tls-cert", metavar="PEM", default=None,
                       help="this side's TLS certificate (default: $LLM_DATADIST_TLS_CERT)")
    group.add_argument("--tls-key", metavar="PEM", default=None,
                       help="its private key (default: $LLM_DATADIST_TLS_KEY)")
    group.add_argument("--tls-ca", metavar="PEM", default=None,
                       help="the CA that signs the peers' certificates (default: $LLM_DATADIST_TLS_CA)")
    group.add_argument("--timeout", type=float, default=3.0, metavar="S",
                       help="seconds each step may take (connect, handshake, a route, a read; default 3)")
    group.add_argument("--pings", type=int, default=5, metavar="N", help="control-link pings for the RTT (default 5)")
    group.add_argument("--read-bytes", type=int, default=4096, metavar="N",
                       help="bytes of the peer's cache to read and verify (default 4096; 0 skips the read)")
    group.add_argument("--cache-id", type=int, default=None, metavar="ID",
                       help="the peer's cache to read (default: the first one peers may read)")
    group.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")


def run(args: argparse.Namespace) -> int:
    """Run every check against ``args.peer``, print the report, return the exit status."""
    try:
        host, port = parse_peer(args.peer)
        if args.timeout <= 0 or args.pings < 1 or args.read_bytes < 0:
            raise ValueError("--timeout must be > 0, --pings >= 1 and --read-bytes >= 0")
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    quiet = _quiet_library_log()
    try:
        report = Doctor(args, host, port).run()
    except _UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    finally:
        quiet()
    ok = all(check.status != FAIL for check in report.checks)
    if args.json:
        print(json.dumps(report.as_json(ok), indent=2))
    else:
        print(report.table(ok))
    return 0 if ok else 1


def parse_peer(text: Optional[str]) -> Tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 literal) -> (host, port); ValueError when malformed."""
    if not text or ":" not in text:
        raise ValueError(f"--peer needs HOST:PORT, got {text!r}")
    host, _, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--peer needs HOST:PORT with a port in 1-65535, got {text!r}")
    return host, int(port_text)


class _UsageError(Exception):
    """The options cannot make an instance (an incomplete or unreadable TLS configuration)."""


def _quiet_library_log():
    """The report names every failure itself: the library's own warnings (a refused handshake...) stay out of
    it, unless LLM_DATADIST_LOG_LEVEL asks for them. Returns the undo."""
    if os.environ.get("LLM_DATADIST_LOG_LEVEL"):
        return lambda: None
    logger = logging.getLogger("llm_datadist")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    return lambda: logger.setLevel(level)


@dataclasses.dataclass
class Report:
    peer: str
    checks: List[Check]
    facts: Dict[str, Any]

    def as_json(self, ok: bool) -> Dict[str, Any]:
        return {"peer": self.peer, "ok": ok, "checks": [dataclasses.asdict(c) for c in self.checks], **self.facts}

    def table(self, ok: bool) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{PROG} --peer {self.peer}"]
        for check in self.checks:
            lines.append(f"  {check.name:<{width}}  {check.status.upper() if check.status == FAIL else check.status:<4}"
                         f"  {check.detail}")
            pad = " " * (width + 10)
            for note in check.notes:
                lines.append(f"{pad}{note}")
            if check.cause:
                lines.append(f"{pad}cause: {check.cause}")
            if check.fix:
                lines.append(f"{pad}fix:   {check.fix}")
        failed = [c.name for c in self.checks if c.status == FAIL]
        lines.append(f"{PROG}: the link works" if ok else f"{PROG}: the link does not work (failed: "
                                                           f"{', '.join(failed)})")
        return "\n".join(lines)


class Doctor:
    """One run of the checks; ``run`` returns the report."""

    def __init__(self, args: argparse.Namespace, host: str, port: int) -> None:
        self.args = args
        self.host, self.port = host, port
        self.timeout = float(args.timeout)
        self.checks: List[Check] = []
        self.facts: Dict[str, Any] = {}

    def add(self, name: str, status: str, detail: str, cause: str = "", fix: str = "") -> Check:
        check = Check(name, status, detail, cause, fix)
        self.checks.append(check)
        return check

    def not_run(self, *names: str, why: str) -> None:
        for name in names:
            self.add(name, SKIP, f"not run: {why}")

    def run(self) -> Report:
        later = ("handshake", "rtt", "route", "read")
        ip = self._resolve()
        if ip is None:
            self.not_run("tcp", *later, why="the address does not resolve")
        elif not self._tcp(ip):
            self.not_run(*later, why="the listen port cannot be reached")
        else:
            self._link(ip)
        return Report(f"{self.host}:{self.port}", self.checks, self.facts)

    # -- 1. the address and the listen port ---------------------------------------------------------------------
    def _resolve(self) -> Optional[str]:
        try:
            infos = socket.getaddrinfo(self.host, self.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            self.add("address", FAIL, f"cannot resolve {self.host}",
                     cause=f"DNS: the host name {self.host!r} does not resolve ({reason})",
                     fix="check the name (DNS, /etc/hosts) or give the peer's IP address, the one in its "
                         "listen_ip_info")
            return None
        ipv4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
        ip = str(ipv4[0] if ipv4 else infos[0][4][0])
        self.facts["address"] = ip
        self.add("address", OK, ip if ip == self.host else f"{self.host} is {ip}")
        return ip

    def _tcp(self, ip: str) -> bool:
        error, elapsed = tcp_connect(ip, self.port, self.timeout)
        where = f"{ip}:{self.port}"
        if error is None:
            self.add("tcp", OK, f"{where} accepts connections (connected in {elapsed * 1000:.1f} ms)")
            return True
        kind, text = error
        if kind == "refused":
            self.add("tcp", FAIL, f"{where} refused the connection", cause=f"nothing listens on {where} ({text})",
                     fix=f"start the peer with listen_ip_info={where} (LLMConfig.listen_ip_info), or give the port "
                         f"it listens on; a firewall that rejects (REJECT) also answers this way")
        elif kind == "timeout":
            self.add("tcp", FAIL, f"no answer from {where} within {self.timeout:g} s",
                     cause=f"the connection attempt timed out: a firewall drops packets to port {self.port}, or "
                           f"the host {ip} is down",
                     fix=f"open TCP port {self.port} from this host to {ip} (firewall, security group) and check "
                         f"that the host is up")
        else:
            self.add("tcp", FAIL, f"cannot connect to {where}", cause=text,
                     fix=f"check the address and this host's routing to it (ip route get {ip})")
        return False

    # -- 2. the handshake -----------------------------------------------------------------------------------------
    def _options(self, ra: bool) -> Any:
        from llm_datadist._engine import api

        opts = {"llm.EnableCacheManager": "1", "llm.EnableRemoteCacheAccessible": "1" if ra else "0",
                "llm.SyncKvCacheWaitTime": str(max(1, int(self.timeout * 1000)))}
        for key, value in (("llm.LinkSecret", self.args.secret), ("llm.TlsCertFile", self.args.tls_cert),
                           ("llm.TlsKeyFile", self.args.tls_key), ("llm.TlsCaFile", self.args.tls_ca)):
            if value:
                opts[key] = value
        cluster_id = (1 << 62) | secrets.randbits(61)  # far from the ids a deployment hands out
        try:
            return api.options.parse_options(opts, DECODER, cluster_id)
        except Exception as exc:  # noqa: BLE001 - LLMException (bad TLS files) or TypeError/ValueError
            raise _UsageError(str(exc)) from exc

    def _link(self, ip: str) -> None:
        from llm_datadist._engine import api

        diagnostics = api.diagnostics
        ra = False
        opts = self._options(ra)
        self.facts["here"] = {"secret": bool(opts.link_secret), "tls": opts.tls is not None}
        engine = probe = None
        try:
            for attempt in range(2):
                try:
                    engine = api.open_engine(opts)
                except api.EngineError as exc:
                    self.add("handshake", FAIL, "no instance could be started here", cause=str(exc),
                             fix="check the TLS files and LLM_DATADIST_TRANSPORT")
                    self.not_run("rtt", "route", "read", why="no instance here")
                    return
                try:
                    probe = diagnostics.connect_peer(engine, ip, self.port, self.timeout)
                    break
                except Exception as exc:  # noqa: BLE001 - every failure is classified and reported
                    failure = diagnostics.link_failure(exc, opts.tls is not None)
                engine.close()
                engine = None
                if failure.kind == diagnostics.MODE and attempt == 0:
                    ra = not ra  # the peer runs in the other remote-cache-accessible mode: link as it does
                    opts = self._options(ra)
                    continue
                self._handshake_failed(failure, ip, opts)
                self.not_run("rtt", "route", "read", why="no link")
                return
            assert probe is not None and engine is not None
            self._linked(probe, opts, ra)
            self._rtt(probe)
            route = self._route(probe, ip)
            if route:
                self._read(probe)
            else:
                self.not_run("read", why="no data route")
        finally:
            if probe is not None:
                probe.close(self.timeout)
            if engine is not None:
                engine.close()

    def _handshake_failed(self, failure: Any, ip: str, opts: Any) -> None:
        from llm_datadist._engine import api

        d = api.diagnostics
        kind = failure.kind
        if kind == d.CLOSED and opts.tls is None and d.speaks_tls(ip, self.port, self.timeout):
            kind = d.TLS_REQUIRED
        self.facts["failure"] = {"kind": kind, "message": failure.message, "code": failure.code}
        here_version = _protocol_version()
        causes: Dict[str, Tuple[str, str, str]] = {
            d.VERSION: ("protocol version mismatch",
                        f"the peer speaks control protocol version {failure.peer_version}, this side speaks "
                        f"{here_version}",
                        "run the same llm_datadist version on both sides"),
            d.SECRET_REQUIRED: ("shared secret missing here",
                                "the peer requires a shared link secret and none is set here",
                                "pass the peer's secret (--secret, or LLM_DATADIST_LINK_SECRET; in an instance "
                                "LLMConfig.link_secret)"),
            d.SECRET_WRONG: ("wrong shared secret",
                             "both sides have a link secret and they differ: the peer refused this side's proof",
                             "set the same secret on both sides (--secret / LLM_DATADIST_LINK_SECRET / "
                             "LLMConfig.link_secret)"),
            d.SECRET_UNEXPECTED: ("shared secret missing on the peer",
                                  "a link secret is set here but the peer authenticates no link; an instance with "
                                  "a secret refuses such a peer",
                                  "set the same secret on the peer (LLMConfig.link_secret or "
                                  "LLM_DATADIST_LINK_SECRET), or none here"),
            d.SECRET_PROOF: ("the peer did not prove the secret",
                             "the listener accepted this side's proof but did not prove the secret itself: it may "
                             "not be the instance you meant", "check that HOST:PORT is your instance"),
            d.TLS_REQUIRED: ("TLS mismatch: the peer requires TLS",
                             "the peer speaks TLS on its listen port and TLS is off here",
                             "give this side a certificate of the peer's CA: --tls-cert, --tls-key, --tls-ca (or "
                             "LLM_DATADIST_TLS_CERT/KEY/CA; LLMConfig.tls_*_file)"),
            d.TLS_NOT_OFFERED: ("TLS mismatch: the peer does not use TLS",
                                "TLS is on here and the peer does not speak it (it hung up on the TLS handshake)",
                                "turn TLS on at the peer too (LLMConfig.tls_cert_file, tls_key_file, tls_ca_file), "
                                "or off here"),
            d.TLS_UNTRUSTED: ("TLS: the peer's certificate is not trusted",
                              "the peer's certificate is not signed by the CA given here",
                              "give the CA that signed the peer's certificate (--tls-ca), or sign the peer's "
                              "certificate with this CA"),
            d.TLS_REJECTED: ("TLS: the peer refused this side's certificate",
                             "the peer does not trust this side's certificate (its CA did not sign it)",
                             "use a certificate signed by the CA the peer trusts (--tls-cert/--tls-key), or add "
                             "this CA to the peer's tls_ca_file"),
            d.TLS_FAILED: ("TLS handshake failed", "the TLS handshake failed",
                           "check both sides' certificates, keys and CA files"),
            d.MODE: ("remote-cache-accessible mode differs", "the peer refused both modes",
                     "check the peer's enable_remote_cache_accessible"),
            d.PEER_REFUSED: ("the peer refused the link", "the peer refused the link",
                             "see the peer's reason below"),
            d.NOT_LLM_DATADIST: ("not an llm_datadist listener",
                                 f"something listens on {ip}:{self.port} but does not speak the llm_datadist "
                                 f"control protocol", "check the port: it is the peer's listen_ip_info port"),
            d.CLOSED: ("the peer closed the connection during the handshake",
                       "the listener hung up before the handshake ended (overloaded, shutting down, or not an "
                       "llm_datadist listener)", "check the peer's log for 'handshake from ... failed'"),
            d.UNREACHABLE: ("the link's connection failed", "the connection could not be made",
                            f"open TCP port {self.port} from this host"),
            d.HANDSHAKE_TIMEOUT: ("no handshake answer",
                                  f"{ip}:{self.port} accepted the connection but did not answer the handshake "
                                  f"within {self.timeout:g} s (a stopped or overloaded peer, or not an llm_datadist "
                                  f"listener)", "check that the peer runs and is not stopped; raise --timeout"),
            d.REFUSED: ("the listen port refused the link", "nothing listens any more",
                        f"start the peer with listen_ip_info={ip}:{self.port}"),
        }
        detail, cause, fix = causes.get(kind, ("the link could not be made", "see the message below",
                                               "check the peer's log"))
        self.add("handshake", FAIL, detail, cause=f"{cause} (engine: {failure.message})", fix=fix)

    def _linked(self, probe: Any, opts: Any, ra: bool) -> None:
        peer = probe.identity()
        self.facts["identity"] = peer
        mode = "remote-cache-accessible mode" if ra else "pull mode"
        self.add("handshake", OK, f"protocol v{peer['protocol_version']}, cluster {peer['cluster_id']}, pid "
                                  f"{peer['pid']}, {mode}")
        if opts.link_secret:
            self.add("secret", OK, "both sides proved the shared secret")
        else:
            self.add("secret", WARN, "no shared secret on either side: anyone who reaches the port can link",
                     cause="links are not authenticated",
                     fix="set the same LLMConfig.link_secret (or LLM_DATADIST_LINK_SECRET) on every instance")
        if opts.tls is not None:
            self.add("tls", OK, "mutual TLS: each side's certificate is signed by the other's CA")
        else:
            self.add("tls", OK, "off on both sides (control and tcp data in clear)")

    # -- 3. the control link's round trip ----------------------------------------------------------------------
    def _rtt(self, probe: Any) -> None:
        try:
            times = probe.ping(int(self.args.pings), self.timeout)
        except Exception as exc:  # noqa: BLE001
            self.add("rtt", FAIL, "the peer did not answer a Ping", cause=str(exc),
                     fix="check the peer is not stopped or overloaded")
            return
        low, median = min(times) * 1000, statistics.median(times) * 1000
        self.facts["rtt_ms"] = {"min": low, "median": median, "pings": len(times)}
        self.add("rtt", OK, f"min {low:.3f} ms, median {median:.3f} ms over {len(times)} pings")

    # -- 4. the data route -------------------------------------------------------------------------------------
    def _route(self, probe: Any, ip: str) -> bool:
        peer = probe.identity()
        data_port = probe.data_port()
        tcp_here = "tcp" in probe.routes(self.timeout, connect=False).here
        tcp_general = not peer["same_host"] and "nixl" not in peer["transports"]
        port_ok = True
        if data_port is not None and tcp_here:
            error, elapsed = tcp_connect(peer["address"], data_port, self.timeout)
            where = f"{peer['address']}:{data_port}"
            self.facts["data_port"] = {"port": data_port, "reachable": error is None}
            if error is None:
                self.add("data port", OK, f"tcp data port {where} accepts connections ({elapsed * 1000:.1f} ms)")
            else:
                port_ok = False
                kind, text = error
                blocked = (f"the tcp data port {data_port} of {peer['address']} does not answer "
                           f"({text}) while its listen port {self.port} does: a firewall "
                           f"{'drops' if kind == 'timeout' else 'rejects'} the data port")
                fix = (f"open TCP port {data_port} of {peer['address']} to this host; the data server takes a port "
                       f"of the peer host's ephemeral range (net.ipv4.ip_local_port_range, e.g. 32768-60999): "
                       f"open that range between the cluster's hosts (docs/multi-host.md, Ports to open)")
                status = FAIL if tcp_general else WARN
                self.add("data port", status, f"tcp data port {where} is blocked"
                         + ("" if tcp_general else " (tcp is only the fallback route here)"), cause=blocked, fix=fix)
        if tcp_general and not port_ok:
            report = probe.routes(self.timeout, connect=False)
            self.facts["route"] = _route_json(report)
            self.add("route", FAIL, "tcp: different hosts, and the data port is blocked",
                     cause="across hosts the link moves bytes over tcp; its data port is unreachable",
                     fix=f"open the peer's tcp data port {data_port} (see 'data port' above)")
            return False
        report = probe.routes(self.timeout)
        self.facts["route"] = _route_json(report)
        offers = f"here: {', '.join(report.here)}; peer: {', '.join(report.peer)}"
        if not report.chosen:
            self.add("route", FAIL, "no data route connects", cause=report.error or "no shared transport",
                     fix="see the transports below; both sides need a transport in common " + f"({offers})"
                     ).notes.extend(_notes(report))
            return False
        pvm_refused = [text for name, text in report.notes if name == "process_vm" and "not permitted" in text]
        if report.same_host and pvm_refused:
            check = self.add("route", WARN, report.why, cause=f"process_vm is refused: {pvm_refused[0]}",
                             fix="see the cause (the sysctl is kernel.yama.ptrace_scope); the link works over "
                                 f"{report.chosen[-1]}, slower")
        else:
            check = self.add("route", OK, report.why)
        check.notes.extend([f"transports {offers}"] + _notes(report))
        return True

    # -- 5. a verified read ------------------------------------------------------------------------------------
    def _read(self, probe: Any) -> None:
        if self.args.read_bytes == 0:
            self.add("read", SKIP, "not run (--read-bytes 0)")
            return
        result = probe.verified_read(int(self.args.read_bytes), self.args.cache_id, self.timeout)
        self.facts["read"] = dataclasses.asdict(result)
        if result.status == "ok":
            self.add("read", OK, f"{result.detail}; sha256 {result.sha256[:16]}...")
        elif result.status == "skip":
            self.add("read", SKIP, f"not run: {result.detail}",
                     fix="register a cache on the peer (or name one with --cache-id) to verify a read")
        elif result.status == "changing":
            self.add("read", WARN, result.detail, cause="the cache is in use",
                     fix="run again, or name an idle cache with --cache-id")
        else:
            self.add("read", FAIL, result.detail,
                     cause="the data route connects but does not deliver the cache's bytes"
                     if result.status == "mismatch" else "the read failed",
                     fix="run with LLM_DATADIST_LOG_LEVEL=INFO on both sides and report the log")


def _notes(report: Any) -> List[str]:
    return [f"{name}: {text}" for name, text in report.notes]


def _route_json(report: Any) -> Dict[str, Any]:
    return {"chosen": report.chosen, "why": report.why, "same_host": report.same_host, "here": report.here,
            "peer": report.peer, "notes": [{"transport": n, "why": w} for n, w in report.notes],
            "error": report.error}


def _protocol_version() -> int:
    from llm_datadist._engine import api

    return int(api.diagnostics.protocol_version())


def tcp_connect(ip: str, port: int, timeout_s: float) -> Tuple[Optional[Tuple[str, str]], float]:
    """Connect to ``ip:port`` and close at once: (None, seconds) or ((kind, text), seconds) where kind is
    "refused", "timeout" or "unreachable"."""
    start = time.perf_counter()
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            pass
    except ConnectionRefusedError:
        return ("refused", "connection refused"), time.perf_counter() - start
    except (socket.timeout, TimeoutError):
        return ("timeout", f"timed out after {timeout_s:g} s"), time.perf_counter() - start
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            text = f"no route to host {ip} ({exc.strerror})"
        else:
            text = f"{exc.strerror or exc}"
        return ("unreachable", text), time.perf_counter() - start
    return None, time.perf_counter() - start
