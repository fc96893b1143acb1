"""A tcp client over TLS keeps its deadline against a data server that goes silent.

The ssl module retries a read that the socket's SO_RCVTIMEO cut short and never returns, so without the TLS
socket's own timeout a pull from a peer that accepted the request and then stopped answering would block
forever. A fake data server (TLS, the real frame layout) answers the HELLO, then says nothing more; the client's
pull must end with TransferTimeout soon after its deadline, and the same server that answers proves the path
works (the positive control).
"""
from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time

import numpy as np
import pki
import pytest

from llm_datadist._transport import tcp
from llm_datadist._transport import tcp_wire as wire
from llm_datadist._transport.base import CopyPlan, PeerInfo, TransferTimeout
from llm_datadist._transport.tls import Tls, TlsFiles

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
DEADLINE_S = 1.0
NBYTES = 4096


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Tls:
    cwd = str(tmp_path_factory.mktemp("pki"))
    pki.make_ca(cwd, "ca")
    pki.make_cert(cwd, "me", "ca")
    names = pki.files(cwd, "me")
    return Tls(TlsFiles(cert=names["tls_cert_file"], key=names["tls_key_file"], ca=names["tls_ca_file"]))


class FakeDataServer:
    """Accepts one TLS data connection, answers HELLO, then either serves one READ of ``payload`` or goes silent."""

    def __init__(self, tls: Tls, payload: bytes, answer: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.payload, self.answer = payload, answer
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(tls,), daemon=True)
        self.thread.start()

    def _recv(self, sock: ssl.SSLSocket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("client closed")
            data += chunk
        return data

    def _serve(self, tls: Tls) -> None:
        raw, _ = self.listener.accept()
        raw.settimeout(10)
        with tls.server_context().wrap_socket(raw, server_side=True) as sock:
            _op, _st, _c, _g, nbytes = wire.parse_header(self._recv(sock, wire.HDR.size))
            self._recv(sock, nbytes)  # the token
            sock.sendall(wire.header(wire.OP_REPLY, wire.ST_OK))
            _op, _st, count, guards, _n = wire.parse_header(self._recv(sock, wire.HDR.size))
            self._recv(sock, 16 * (count + guards))
            if self.answer:
                sock.sendall(wire.header(wire.OP_REPLY, wire.ST_OK, nbytes=len(self.payload)) + self.payload)
            self.release.wait(15)  # silent: the client must give up on its own
        self.listener.close()


def _pull(tls: Tls, port: int, dst: np.ndarray) -> None:
    peer = PeerInfo(cluster_id=1, host_id="fake", pid=1, address="127.0.0.1", descriptor=b"")
    channel = tcp.TcpChannel(peer, port, b"T" * wire.TOKEN_BYTES, tls_config=tls)
    try:
        plan = CopyPlan([dst.ctypes.data], [0x10000], [NBYTES])
        tcp._transfer(channel, plan.merged(), time.monotonic() + DEADLINE_S, tcp.READ)
    finally:
        channel.close()


def test_a_tls_pull_from_a_silent_server_times_out_at_its_deadline(tls):
    server = FakeDataServer(tls, b"", answer=False)
    dst = np.zeros(NBYTES, np.uint8)
    result: dict = {}

    def pull() -> None:
        started = time.monotonic()
        try:
            _pull(tls, server.port, dst)
            result["error"] = None
        except Exception as exc:  # noqa: BLE001 - examined below
            result["error"] = exc
        result["took"] = time.monotonic() - started

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    thread.join(DEADLINE_S + 10)  # a bound for the test itself, far beyond the deadline
    server.release.set()
    assert not thread.is_alive(), "the TLS pull ignored its deadline"
    assert isinstance(result["error"], TransferTimeout), result
    assert not dst.any()


def test_a_tls_pull_from_an_answering_server_gets_its_bytes(tls):
    payload = np.random.default_rng(5).integers(0, 256, NBYTES, dtype=np.uint8)
    server = FakeDataServer(tls, payload.tobytes(), answer=True)
    dst = np.zeros(NBYTES, np.uint8)
    try:
        _pull(tls, server.port, dst)
    finally:
        server.release.set()
    assert np.array_equal(dst, payload)
