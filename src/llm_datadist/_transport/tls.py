"""Optional mutual TLS for the control plane and the tcp data plane (stdlib ``ssl``), and socket I/O helpers for it."""
from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
from typing import Optional

# An SSLSocket's reads and writes may each need the other direction (renegotiation, key updates): callers
# treat both as "try again when the socket is ready".
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of one instance: its certificate (chain), its private key, and the CA that signs its peers."""

    cert: str
    key: str
    ca: str


class Tls:
    """The two SSL contexts of an instance: both sides present a certificate signed by the shared CA.

    Peers are addressed by IP, so host names are not checked: a peer is trusted because the CA signed it.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._server: Optional[ssl.SSLContext] = None
        self._client: Optional[ssl.SSLContext] = None

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.create_default_context(purpose, cafile=self.files.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self.files.cert, self.files.key)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._server is None:
                self._server = self._context(ssl.Purpose.CLIENT_AUTH)
            return self._server

    def client_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._client is None:
                self._client = self._context(ssl.Purpose.SERVER_AUTH)
            return self._client

    def check(self) -> None:
        """Load both contexts now (ssl.SSLError / OSError for unreadable or mismatched files)."""
        self.server_context()
        self.client_context()

    def wrap_client(self, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
        """TLS handshake as the client on a connected socket (blocking, bounded by ``timeout``)."""
        sock.settimeout(max(timeout, 0.001))
        return self.client_context().wrap_socket(sock, server_side=False)

    def wrap_server(self, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
        """TLS handshake as the server on an accepted socket (blocking, bounded by ``timeout``)."""
        sock.settimeout(max(timeout, 0.001))
        return self.server_context().wrap_socket(sock, server_side=True)

    def wrap_server_nonblocking(self, sock: socket.socket) -> ssl.SSLSocket:
        """An accepted non-blocking socket whose handshake the caller drives (``do_handshake`` in a poller)."""
        return self.server_context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def pending(sock: socket.socket) -> int:
    """Decrypted bytes an SSLSocket holds that a poll on its fd would not announce (0 for plain sockets)."""
    return sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
