"""What ``llm-datadist doctor`` and the benchmark (the separate ``llm-datadist-bench`` distribution) ask the
engine and the transports about this machine, and what ``llm-datadist doctor --peer`` asks about a link to a running
peer (why a handshake failed, the route, pings, a verified read). Nothing here takes part in a transfer of the API.

The facade reaches this module only as ``llm_datadist._engine.api.diagnostics`` (the facade imports no other
engine module); the benchmark, another distribution, imports it directly. Every import of the transports or the
engine's internals happens inside the function that needs it, so importing this module costs nothing.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["transport_report", "tcp_streams_per_transfer", "cross_host_choice", "process_vm_status",
           "read_process_memory", "memory_kinds", "plan_blocks_timing",
           "protocol_version", "LinkFailure", "link_failure", "speaks_tls", "connect_peer", "PeerProbe", "RouteReport",
           "ReadReport"]


def transport_report() -> List[Tuple[str, str]]:
    """(transport name, why it is unavailable here or "") for every transport this build has."""
    from llm_datadist._transport import transport_report as report

    return report()


def tcp_streams_per_transfer(same_machine: bool = False) -> int:
    """How many data connections the tcp transport opens for one large transfer (to a peer on this machine,
    or on another host)."""
    from llm_datadist._transport import tcp

    return tcp.streams_per_transfer(same_machine)


def cross_host_choice() -> str:
    """How auto mode moves bytes between hosts here (nixl or tcp) and why, UCX settings included."""
    from llm_datadist._transport import nixl_env, unavailable_reason

    reason = unavailable_reason("nixl")
    if reason:
        return f"tcp (nixl: {reason})"
    ucx = {k: v for k, v in nixl_env.ucx_defaults().items() if k != "UCX_LOG_LEVEL"}
    ucx.update({k: v for k, v in os.environ.items() if k in ("UCX_TLS", "UCX_MODULES", "UCX_NET_DEVICES")})
    settings = ", ".join(f"{k}={v}" for k, v in sorted(ucx.items())) or "UCX picks its transports"
    preferred = nixl_env.preferred_reason()
    why = preferred or nixl_env.NOT_PREFERRED
    return f"{'nixl' if preferred else 'tcp'} ({why}; nixl runs with {settings})"


def process_vm_status() -> Tuple[bool, int]:
    """(process_vm_readv works on our own process, threads large copies are split across)."""
    from llm_datadist._transport import parallel, pvm

    return pvm.self_permitted(), parallel.COPY_THREADS


def read_process_memory(pid: int, addr: int, nbytes: int) -> bytes:
    """``nbytes`` at ``addr`` of process ``pid`` with process_vm_readv (doctor's probe of a sibling process)."""
    from llm_datadist._transport import pvm

    return pvm.peek(pid, addr, nbytes)


def memory_kinds() -> List[str]:
    """The memory kinds this build has a backend for (``host`` always; ``cuda`` once registered)."""
    from llm_datadist._engine import memory

    return [memory.HOST] + sorted(memory.device_backends())


def plan_blocks_timing(num_tensors: int, pool_blocks: int, picked: int, block_bytes: int, iters: int,
                       seed: int = 0) -> Tuple[int, List[float]]:
    """Plan a ``picked``-block pull over ``num_tensors`` tensors ``iters`` times (scattered block ids, two fake
    caches); returns (ops in the plan, seconds per planning). The bench's planning row."""
    import time

    import numpy as np

    from llm_datadist._engine import planner
    from llm_datadist._engine.types import LayerSel

    src = planner.Side(tuple((1 << 32) + t * pool_blocks * block_bytes for t in range(num_tensors)), block_bytes,
                       pool_blocks, True)
    dst = planner.Side(tuple((1 << 40) + t * pool_blocks * block_bytes for t in range(num_tensors)), block_bytes,
                       pool_blocks, True)
    rng = np.random.default_rng(seed)
    s_blk = rng.choice(pool_blocks, picked, replace=False).tolist()
    d_blk = rng.choice(pool_blocks, picked, replace=False).tolist()
    layers = LayerSel()
    ops = 0
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        src_t, dst_t = planner.tensor_pairs(num_tensors, num_tensors, layers, num_tensors)
        plan = planner.oriented(planner.blocks_ops(src, src_t, s_blk, dst, dst_t, d_blk), src, dst, True)
        times.append(time.perf_counter() - start)
        ops = len(plan)
    return ops, times


# ---------------------------------------------------------------------------------------------------------------
# A link to a running peer (``llm-datadist doctor --peer``): why a handshake failed, the route, the RTT, a read
# ---------------------------------------------------------------------------------------------------------------
# LinkFailure.kind: what a handshake's failure means, told apart from the exception's type and AuthFailed.reason
REFUSED = "refused"  # nothing listens at the address
UNREACHABLE = "unreachable"  # the connect did not complete: a firewall drops it, or no route to the host
HANDSHAKE_TIMEOUT = "handshake-timeout"  # connected, but no handshake answer in time
VERSION = "version"  # the peer speaks another control protocol version
SECRET_REQUIRED = "secret-required"  # the peer requires a shared secret; none is set here
SECRET_WRONG = "secret-wrong"  # both sides have a secret, and they differ
SECRET_UNEXPECTED = "secret-unexpected"  # a secret is set here; the peer authenticates nothing
SECRET_PROOF = "secret-proof"  # the peer did not prove the secret
TLS_REQUIRED = "tls-required"  # the peer speaks TLS; TLS is off here
TLS_NOT_OFFERED = "tls-not-offered"  # TLS is on here; the peer does not speak it
TLS_UNTRUSTED = "tls-untrusted"  # the peer's certificate is not signed by our CA
TLS_REJECTED = "tls-rejected"  # the peer refused our certificate (not signed by its CA)
TLS_FAILED = "tls"  # another TLS failure (see the message)
MODE = "mode"  # remote-cache-accessible mode differs
PEER_REFUSED = "peer-refused"  # the peer refused the link for a reason of its own (its message says which)
NOT_LLM_DATADIST = "not-llm-datadist"  # something answers that is no llm_datadist listener
CLOSED = "closed"  # the peer closed the connection in the middle of the handshake
OTHER = "other"


@dataclasses.dataclass(frozen=True)
class LinkFailure:
    """Why a link could not be made: ``kind`` (the constants above), the engine's message, and for VERSION the
    peer's protocol version."""

    kind: str
    message: str
    code: int
    peer_version: Optional[int] = None


def link_failure(exc: BaseException, tls_here: bool) -> LinkFailure:
    """Classify a failure of ``connect_peer`` (any exception a link handshake raises)."""
    import ssl

    from llm_datadist._engine import errors, protocol, rpc

    code = int(errors.status_of(exc))
    message = str(exc)
    if isinstance(exc, protocol.VersionMismatch):
        return LinkFailure(VERSION, message, code, exc.peer_version)
    if isinstance(exc, rpc.ConnectionRefused):
        return LinkFailure(REFUSED, message, code)
    if isinstance(exc, rpc.AuthFailed):
        if exc.reason != rpc.AUTH_TLS:
            kind = {rpc.AUTH_SECRET_REQUIRED: SECRET_REQUIRED, rpc.AUTH_SECRET_WRONG: SECRET_WRONG,
                    rpc.AUTH_SECRET_UNEXPECTED: SECRET_UNEXPECTED}.get(exc.reason, SECRET_PROOF)
            return LinkFailure(kind, message, code)
        return LinkFailure(_tls_kind(_cause(exc, ssl.SSLError)), message, code)
    if tls_here and isinstance(exc, (protocol.PeerClosed, protocol.ProtocolError)):
        # the TLS handshake completed (TLS 1.3 ends it on the client's side before the server has checked the
        # client's certificate), then the peer hung up without a word: it refused our certificate
        alert = _cause(exc, ssl.SSLError)
        return LinkFailure(TLS_REJECTED if alert is None or _tls_kind(alert) != TLS_FAILED else TLS_FAILED,
                           message, code)
    if isinstance(exc, errors.Timeout):
        connecting = "connect to" in message
        return LinkFailure(UNREACHABLE if connecting else HANDSHAKE_TIMEOUT, message, code)
    if isinstance(exc, protocol.ProtocolError) and "bad frame magic" in message:
        return LinkFailure(NOT_LLM_DATADIST, message, code)
    if isinstance(exc, (protocol.PeerClosed, protocol.ProtocolError)):
        return LinkFailure(CLOSED, message, code)
    if isinstance(exc, errors.EngineError) and type(exc) is not errors.LinkFailed:
        if exc.code == errors.ParamInvalid.code and "remote cache accessible" in message:
            return LinkFailure(MODE, message, code)
        return LinkFailure(PEER_REFUSED, message, code)
    if isinstance(exc, errors.LinkFailed) and "cannot connect" in message:
        return LinkFailure(UNREACHABLE, message, code)
    if isinstance(exc, errors.LinkFailed) and "refused" not in message:
        return LinkFailure(OTHER, message, code)
    return LinkFailure(PEER_REFUSED if isinstance(exc, errors.EngineError) else OTHER, message, code)


def _cause(exc: BaseException, kind: type) -> Optional[BaseException]:
    """The first exception of type ``kind`` in ``exc``'s chain of causes (``exc`` included)."""
    seen: Optional[BaseException] = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_kind(err: Optional[BaseException]) -> str:
    """What a TLS error of the client side says about the two ends."""
    import ssl

    if isinstance(err, ssl.SSLCertVerificationError):
        return TLS_UNTRUSTED
    reason = str(getattr(err, "reason", "") or err or "").upper()
    if "ALERT" in reason and any(word in reason for word in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                                                             "CERTIFICATE_REQUIRED", "DECRYPT_ERROR")):
        return TLS_REJECTED
    if err is None or isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or "WRONG_VERSION" in reason or \
            "RECORD_LAYER" in reason or "UNEXPECTED_EOF" in reason:
        return TLS_NOT_OFFERED  # the peer hung up on our ClientHello (or answered in clear): it is no TLS server
    return TLS_FAILED


def speaks_tls(host: str, port: int, timeout_s: float) -> Optional[bool]:
    """Whether the listener at ``host:port`` answers a TLS ClientHello (None: no answer either way).

    What any stranger can learn: the probe presents no certificate and sends nothing after the TLS handshake,
    so the listener refuses it as it refuses every client without a certificate of its CA.
    """
    import socket
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None
    try:
        with ctx.wrap_socket(raw, do_handshake_on_connect=False) as sock:
            sock.settimeout(timeout_s)
            sock.do_handshake()  # TLS 1.3: complete on our side before the server checks our (empty) certificate
            return True
    except ssl.SSLError as exc:
        reason = str(exc.reason or "").upper()
        if "ALERT" in reason and "PROTOCOL_VERSION" not in reason:
            return True  # the server answered in TLS (refusing a client without a certificate)
        return False
    except (socket.timeout, TimeoutError):
        return None
    except OSError:
        return False  # reset or closed on our ClientHello: no TLS server
    finally:
        raw.close()


@dataclasses.dataclass
class RouteReport:
    """The data routes of a probed link: what auto mode chose and why, and what each other transport would do."""

    chosen: List[str]  # connected routes in the order plans try them (e.g. ["shm", "process_vm"]); [] on error
    same_host: bool
    why: str  # e.g. "process_vm: same host, ptrace allowed (...)" or "tcp: different hosts"
    here: List[str]  # transports this side runs
    peer: List[str]  # transports the peer runs
    notes: List[Tuple[str, str]]  # (transport, why it is not used, or what it carries)
    error: str = ""  # no route connected: the engine's reason


@dataclasses.dataclass
class ReadReport:
    """A small read of a peer's cache over every route that can carry it, compared byte for byte."""

    status: str  # "ok", "mismatch", "changing", "skip" or "failed"
    detail: str
    cache_id: int = -1
    nbytes: int = 0
    routes: List[str] = dataclasses.field(default_factory=list)  # the routes the bytes came over, in order
    sha256: str = ""


def connect_peer(engine: Any, host: str, port: int, timeout_s: float) -> PeerProbe:
    """Link the (temporary) engine ``engine`` to the listener at ``host:port`` for a diagnosis.

    The handshake is the engine's own (its secret, TLS and transports), so it fails exactly where a real link
    would; classify a failure with :func:`link_failure`.
    """
    import time

    link = engine.links.connect(host, port, None, time.monotonic() + timeout_s)
    return PeerProbe(engine, link)


class PeerProbe:
    """A link made by :func:`connect_peer`: the peer's identity, its routes, pings and a verified read.

    ``close`` unlinks (the peer sees an ordinary unlink); the caller closes its engine afterwards.
    """

    def __init__(self, engine: Any, link: Any) -> None:
        self._engine = engine
        self.link = link
        # what the peer's handshake answer said: its transports' descriptors and what it granted this link
        self._descriptors: Dict[str, bytes] = link.descriptors

    # -- who the peer is --------------------------------------------------------------------------------------
    def identity(self) -> Dict[str, Any]:
        from llm_datadist._engine import protocol

        peer = self.link.peer
        return {"cluster_id": peer.cluster_id, "host_id": peer.host_id, "pid": peer.pid, "address": peer.address,
                "same_host": bool(self.link.same_host), "remote_cache_accessible": bool(self.link.peer_ra),
                "protocol_version": protocol.PROTOCOL_VERSION, "transports": sorted(self._descriptors),
                "our_host_id": self._engine.host_id}

    def data_port(self) -> Optional[int]:
        """The peer's tcp data server port (from its handshake), or None when it runs no tcp transport."""
        from llm_datadist._transport.tcp import data_port_of

        return data_port_of(self._descriptors.get("tcp", b""))

    # -- the control link -------------------------------------------------------------------------------------
    def ping(self, count: int, timeout_s: float) -> List[float]:
        """Round-trip times (seconds) of ``count`` Pings over the control connection."""
        import time

        from llm_datadist._engine import protocol

        times = []
        for _ in range(count):
            start = time.perf_counter()
            self.link.call(protocol.Ping(), time.monotonic() + timeout_s)
            times.append(time.perf_counter() - start)
        return times

    # -- data routes ------------------------------------------------------------------------------------------
    def routes(self, timeout_s: float, connect: bool = True) -> RouteReport:
        """Connect the link's data routes as a transfer would (``connect``), and say why each transport is used
        or not."""
        import time

        from llm_datadist._engine import errors
        from llm_datadist._transport import base, cross_host_reason, transport_report

        engine, link = self._engine, self.link
        here = list(engine.transports)
        report = RouteReport([], bool(link.same_host), "", here, sorted(self._descriptors), [])
        if connect:
            try:
                report.chosen = [route.name for route in link.routes(time.monotonic() + timeout_s)]
            except (errors.EngineError, base.TransportError) as exc:
                report.error = str(exc)
        unavailable = dict(transport_report())
        for transport in sorted(engine.transports.values(), key=lambda t: -t.priority):
            name = transport.name
            if name in report.chosen:
                if transport.caps.partial:
                    report.notes.append((name, "carries the caches it covers (shared pool segments), the next "
                                               "route the rest"))
                continue
            report.notes.append((name, self._unused(transport, report, timeout_s)))
        for name, reason in sorted(unavailable.items()):
            if name not in engine.transports and name in self._descriptors:
                report.notes.append((name, f"the peer runs it, this side does not ({reason or 'not chosen here'})"))
        if report.chosen:
            general = report.chosen[-1]
            where = "same host" if link.same_host else "different hosts"
            why = f"{general}: {where}"
            if general == "process_vm":
                why += f", ptrace allowed ({_ptrace_text()})"
            elif not link.same_host:
                reason = cross_host_reason(general, here)
                why += f" ({reason})" if reason else ""
            elif general in ("tcp", "nixl"):
                refused = [text for name, text in report.notes if name == "process_vm"]
                why += f", but process_vm is not usable ({refused[0]})" if refused else ""
            if len(report.chosen) > 1:
                why += f"; {' then '.join(report.chosen[:-1])} first for the caches it covers (pool segments)"
            report.why = why
        return report

    def _unused(self, transport: Any, report: RouteReport, timeout_s: float) -> str:
        """Why ``transport`` carries nothing on this link."""
        import time

        from llm_datadist._transport import base

        name = transport.name
        desc = self._descriptors.get(name)
        if desc is None:
            return "the peer does not run it"
        locality = transport.caps.locality
        if locality in (base.PROCESS, base.SAME_HOST) and not self.link.same_host:
            return "needs both ends on one host (the host ids differ)"
        peer = self._peer_info(name)
        if not transport.can_reach(peer):
            return "the peer is another process" if locality == base.PROCESS else "the peer offers nothing it can use"
        if report.chosen and transport.priority < _priority(self._engine, report.chosen[-1]):
            return f"not needed: {report.chosen[-1]} comes first"
        if name in ("tcp", "nixl"):
            return report.error or "not connected"
        try:
            channel = transport.connect(peer, time.monotonic() + timeout_s)
        except base.TransportError as exc:
            return str(exc)
        transport.disconnect(channel)
        return "connects, but was not chosen"

    def _peer_info(self, name: str) -> Any:
        return self.link.peer_info(name)

    # -- a verified read --------------------------------------------------------------------------------------
    def verified_read(self, nbytes: int, cache_id: Optional[int], timeout_s: float) -> ReadReport:
        """Read the first ``nbytes`` of one of the peer's caches over the route a pull takes, over every other
        route that reaches it, and over the first again; the bytes must be equal.

        With one route only (across hosts), the range is read whole and then in two halves in reverse order.
        The first read again tells a cache that changed meanwhile (a busy peer) from a route that reads wrong.
        """
        import hashlib
        import time

        import numpy as np

        from llm_datadist._engine import errors, planner
        from llm_datadist._transport import base

        deadline = time.monotonic() + timeout_s
        table = self.link.table(deadline, fresh=True)
        views = [v for v in table.caches if v.tensor_addrs and (cache_id is None or v.cache_id == cache_id)]
        if not views:
            what = f"no cache {cache_id}" if cache_id is not None else "no cache registered"
            return ReadReport("skip", f"the peer has {what} that it lets peers read")
        views.sort(key=lambda v: (not v.remote_accessible, v.kind != base.HOST))
        view = views[0]
        if view.kind != base.HOST:
            return ReadReport("skip", f"cache {view.cache_id} is {view.kind} memory; doctor reads host memory only",
                              view.cache_id)
        size = max(1, min(nbytes, int(view.tensor_nbytes)))
        remote = int(view.tensor_addrs[0])
        guards = planner.guards_of(view)
        self.link.note_view(view)

        def plan(buf: Any, offset: int = 0, length: int = size) -> base.CopyPlan:
            return base.CopyPlan([int(buf.ctypes.data) + offset], [remote + offset], [length], base.HOST, view.kind,
                                 guards)

        extra: List[Tuple[Any, Any]] = []
        reads: List[Tuple[str, bytes]] = []
        try:
            buf = np.zeros(size, np.uint8)
            route = self.link.route_for(plan(buf), deadline)
            route.transport.read(route.channel, plan(buf), deadline)
            reads.append((route.name, buf.tobytes()))
            for transport, channel in self._other_channels(route.name, view, deadline, extra):
                if transport.covers(channel, plan(buf)):
                    other = np.zeros(size, np.uint8)
                    transport.read(channel, plan(other), deadline)
                    reads.append((transport.name, other.tobytes()))
            if len(reads) == 1:  # one route: the same range in two requests, the second half first
                halves = np.zeros(size, np.uint8)
                half = size // 2
                if half:
                    route.transport.read(route.channel, plan(halves, half, size - half), deadline)
                    route.transport.read(route.channel, plan(halves, 0, half), deadline)
                else:
                    route.transport.read(route.channel, plan(halves), deadline)
                reads.append((f"{route.name} (in two requests)", halves.tobytes()))
            again = np.zeros(size, np.uint8)
            route.transport.read(route.channel, plan(again), deadline)
            reads.append((route.name, again.tobytes()))
        except base.StaleMemory:
            return ReadReport("failed", f"cache {view.cache_id} was released while it was read; run again",
                              view.cache_id, size)
        except (errors.EngineError, base.TransportError) as exc:
            return ReadReport("failed", f"reading cache {view.cache_id} over "
                                        f"{reads[-1][0] if reads else 'the chosen route'} failed: {exc}",
                              view.cache_id, size, [name for name, _ in reads])
        finally:
            for transport, channel in extra:
                transport.disconnect(channel)
        names = [name for name, _ in reads]
        first, last = reads[0][1], reads[-1][1]
        digest = hashlib.sha256(first).hexdigest()
        if first != last:
            return ReadReport("changing", f"cache {view.cache_id} changed between two reads over {names[0]} (the "
                                          f"peer is writing it): nothing compared", view.cache_id, size, names, digest)
        wrong = [name for name, data in reads[1:-1] if data != first]
        if wrong:
            return ReadReport("mismatch", f"{', '.join(wrong)} returned other bytes than {names[0]} for the same "
                                          f"range of cache {view.cache_id}", view.cache_id, size, names, digest)
        return ReadReport("ok", f"{size} bytes of cache {view.cache_id} (tensor 0) read over {', '.join(names)}: "
                                f"identical", view.cache_id, size, names, digest)

    def _other_channels(self, chosen: str, view: Any, deadline: float, made: List[Tuple[Any, Any]]
                        ) -> List[Tuple[Any, Any]]:
        """Channels of the transports other than ``chosen`` that reach the peer (connected here; the caller
        disconnects those listed in ``made``)."""
        from llm_datadist._transport import base

        channels = []
        for route in self.link.routes(deadline):
            if route.name != chosen:
                channels.append((route.transport, route.channel))
        connected = {chosen} | {t.name for t, _ in channels}
        for name, transport in self._engine.transports.items():
            if name in connected or name not in self._descriptors or name == "loopback":
                continue
            if transport.caps.locality != base.NETWORK and not self.link.same_host:
                continue
            peer = self._peer_info(name)
            if not transport.can_reach(peer):
                continue
            try:
                channel = transport.connect(peer, deadline)
            except base.TransportError:
                continue
            made.append((transport, channel))
            transport.learn(channel, [base.RemoteRegion(a, n, k, d[name]) for a, n, k, d in view.regions
                                      if name in d])
            channels.append((transport, channel))
        return channels

    def close(self, timeout_s: float) -> None:
        """Unlink (the peer drops its end as for any unlink); never raises."""
        import time

        from llm_datadist._engine import errors

        try:
            self._engine.links.unlink(self.link, time.monotonic() + timeout_s)
        except errors.EngineError:
            pass


def _priority(engine: Any, name: str) -> int:
    transport = engine.transports.get(name)
    return int(transport.priority) if transport is not None else 0


def _ptrace_text() -> str:
    """Who may read whom on this host under Yama, for the process_vm route's reason."""
    from llm_datadist._transport import ptrace

    scope = ptrace.yama_scope()
    if scope is None:
        return "no Yama: processes of one user read each other"
    if scope == 0:
        return "Yama ptrace_scope 0: processes of one user read each other"
    if scope == 1:
        return "Yama ptrace_scope 1: the peer lets processes of its user read it (PR_SET_PTRACER_ANY)"
    return f"Yama ptrace_scope {scope}: this process may read others (CAP_SYS_PTRACE)"


def protocol_version() -> int:
    """The control protocol version this build speaks."""
    from llm_datadist._engine import protocol

    return int(protocol.PROTOCOL_VERSION)
