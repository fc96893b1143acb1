"""Control-channel messages between a decode worker and a prefill worker: msgspec frames, never pickle."""
from __future__ import annotations

import hashlib
import hmac
import socket
import struct
from typing import List, Optional, Tuple, Union

import msgspec

__all__ = [
    "PROTOCOL_VERSION", "MAX_FRAME_BYTES", "Challenge", "Hello", "Welcome", "Claim", "ClaimReply", "Release",
    "PushReady", "PushDone", "Refused", "Message", "ProtocolError", "Geometry", "encode", "FrameReader",
    "client_proof", "server_proof", "check_proof",
]

# Version 1: challenge/hello/welcome handshake; claim, release, push-ready, push-done.
PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 << 20
_HEADER = struct.Struct(">BI")  # protocol version, body length


class ProtocolError(ConnectionError):
    """A malformed, oversized, unauthenticated or wrong-version frame; the connection is closed."""


class Geometry(msgspec.Struct, frozen=True):
    """The KV layout both sides must share: regions (tensors) of ``num_blocks`` blocks of ``block_nbytes``."""

    num_regions: int
    block_nbytes: int
    block_size: int  # tokens per block
    layers: int


class Challenge(msgspec.Struct, tag=True, frozen=True):
    """Server -> client on connect: a fresh nonce the client must sign when a secret is configured."""

    version: int
    nonce: bytes


class Hello(msgspec.Struct, tag=True, frozen=True):
    """Client -> server: who the client is, its proof of the secret, and a nonce for the server's proof."""

    version: int
    cluster_id: int
    nonce: bytes
    proof: bytes = b""


class Welcome(msgspec.Struct, tag=True, frozen=True):
    """Server -> client: the prefill's llm_datadist identity and KV geometry, with its proof of the secret."""

    cluster_id: int
    datadist_host: str
    datadist_port: int
    geometry: Geometry
    proof: bytes = b""


class Refused(msgspec.Struct, tag=True, frozen=True):
    """Server -> client before closing: why the handshake failed."""

    reason: str


class Claim(msgspec.Struct, tag=True, frozen=True):
    """Decode -> prefill: bind the held blocks of ``request_id`` to this connection (they stay until released)."""

    seq: int
    request_id: str


class ClaimReply(msgspec.Struct, tag=True, frozen=True):
    """Prefill -> decode: the claimed request's block ids, or why it is not held."""

    seq: int
    ok: bool
    block_ids: List[int] = []
    reason: str = ""


class Release(msgspec.Struct, tag=True, frozen=True):
    """Decode -> prefill: the blocks of these requests may be freed (pulled, or no longer wanted)."""

    request_ids: List[str]


class PushReady(msgspec.Struct, tag=True, frozen=True):
    """Decode -> prefill (push mode): write transfer ``transfer_id`` into these blocks of cluster ``cluster_id``."""

    transfer_id: str
    cluster_id: int
    dst_block_ids: List[int]
    num_tokens: int
    first_block: int = 0


class PushDone(msgspec.Struct, tag=True, frozen=True):
    """Prefill -> decode (push mode): the push of ``transfer_id`` finished, successfully or not."""

    transfer_id: str
    ok: bool
    reason: str = ""
    nbytes: int = 0


Message = Union[Challenge, Hello, Welcome, Refused, Claim, ClaimReply, Release, PushReady, PushDone]
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """One frame: version, length, msgpack body."""
    body = _ENCODER.encode(message)
    return _HEADER.pack(PROTOCOL_VERSION, len(body)) + body


class FrameReader:
    """Reads whole frames from a socket whose timeout is set; ``read`` returns None on timeout, raises on EOF."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def _fill(self, nbytes: int) -> bool:
        while len(self._buffer) < nbytes:
            try:
                chunk = self._sock.recv(max(65536, nbytes - len(self._buffer)))
            except socket.timeout:
                return False
            if not chunk:
                raise ConnectionError("connection closed by peer")
            self._buffer += chunk
        return True

    def read(self) -> Optional[Message]:
        """The next message, or None when the socket timed out before a whole frame arrived."""
        if not self._fill(_HEADER.size):
            return None
        version, length = _HEADER.unpack_from(self._buffer)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"control-channel protocol version {version} is not {PROTOCOL_VERSION}; "
                                f"run the same llm_datadist version on prefill and decode")
        if length > MAX_FRAME_BYTES:
            raise ProtocolError(f"control-channel frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
        if not self._fill(_HEADER.size + length):
            return None
        body = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
        del self._buffer[:_HEADER.size + length]
        try:
            return _DECODER.decode(body)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed control-channel frame: {exc}") from None


def _proof(secret: str, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret.encode("utf-8"), b"llm-datadist-vllm|" + role + b"|" + nonce, hashlib.sha256).digest()


def client_proof(secret: str, server_nonce: bytes) -> bytes:
    """The client's HMAC over the server's nonce (empty when no secret is configured)."""
    return _proof(secret, b"client", server_nonce) if secret else b""


def server_proof(secret: str, client_nonce: bytes) -> bytes:
    """The server's HMAC over the client's nonce (empty when no secret is configured)."""
    return _proof(secret, b"server", client_nonce) if secret else b""


def check_proof(expected: bytes, got: bytes) -> Tuple[bool, str]:
    """Constant-time comparison; returns (ok, reason)."""
    if not expected:
        return True, ""
    if not got:
        return False, "the peer sent no proof of the link secret (configure the same link_secret on both sides)"
    if not hmac.compare_digest(expected, got):
        return False, "the peer's proof of the link secret is wrong (the link secrets differ)"
    return True, ""
