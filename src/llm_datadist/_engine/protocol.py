"""Versioned binary wire protocol of the control plane: a fixed struct header plus a msgpack body."""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import select
import socket
import struct
import threading
import time
# typing (not PEP 604/585) generics: msgspec resolves these annotations at runtime, also on Python 3.9.
from typing import Annotated, Dict, List, NamedTuple, Optional, Tuple, Type, TypeVar, Union

import msgspec
from msgspec import Meta

from llm_datadist._engine import errors
from llm_datadist._engine.types import SourceKind
from llm_datadist._transport import tls

# Changelog of the control protocol. Bump PROTOCOL_VERSION on ANY change of the header layout, of a
# message's fields or of the handshake sequence; peers with another version are refused at the header,
# before the body is decoded. The first 6 bytes of a frame (magic, version) never move.
#   1: first version. Hello/AuthChallenge/AuthProof/AuthResult/HelloAck handshake; Resolve, Consume,
#      TableRequest, TableChanged, Unlink, Ping requests; CacheView, Table, Ack, Error replies.
#   2: instance nonces in Hello/HelloAck; per-link data-plane credentials (HelloAck.credentials, then the
#      client's Credentials request) instead of secrets in the transport descriptors; CacheView carries the
#      memory kind, the generation guard and the region descriptors of the cache; WriteGrant/Granted and
#      WriteRelease for one-sided writes; request id 0 marks a notification (no reply).
#   3: the client proves the secret first: AuthChallenge carries only the server's nonce, the server's proof
#      rides in HelloAck.server_proof (so a stranger who connects learns no HMAC of the secret); proofs are
#      keyed by a scrypt-stretched secret; Hello.dial_nonce names one dial, and ConfirmDial -> DialConfirmed
#      asks a linked peer over its link whether it is making that dial (an incoming handshake that claims a
#      linked cluster's id is admitted only when that cluster vouches for it or its link is dead);
#      Notify carries an application notification over a link (at most MAX_NOTIFY_BYTES of payload; ``after``
#      says it follows a push or a pull of the sender); the receiver answers Ack once it queued it, or Error
#      (LLM_LINK_BUSY when its notification queue is full).
#   4: Usage (a notification): what the sender moved in or out of the receiver's memory since its last report,
#      as (direction, transport, transfers, bytes) rows, for the receiver's served-bytes statistics; write grants
#      are kept by the writer for later writes to the same generation, and RevokeGrant (a notification, owner to
#      writer) asks for one back (the writer answers with WriteRelease once its writes under it end).
PROTOCOL_VERSION = 4

# Frame: a 22-byte big-endian header, magic(4s) version(u16) type(u16) flags(u16) request_id(u64)
# length(u32), then ``length`` bytes of msgpack holding one tagged Struct of the type the header names.
# FLAG_REPLY marks replies; the requester picks request ids, a reply repeats its request's id.
# Handshake, client first: Hello -> [AuthChallenge -> AuthProof ->] HelloAck (with a secret, the client
# proves it first and HelloAck.server_proof answers). Refusals: HelloAck with
# code != 0 (version mismatch, decide()), or AuthResult (authentication). Never pickle.

MAGIC = b"LDD\x01"
HEADER = struct.Struct("!4sHHHQI")  # magic, version, msg type, flags, request id, payload length
HEADER_SIZE = HEADER.size  # 22 bytes
FLAG_REPLY = 0x0001
_KNOWN_FLAGS = FLAG_REPLY

MAX_FRAME_BYTES = 16 * 1024 * 1024
HANDSHAKE_FRAME_BYTES = 64 * 1024  # frames before a link exists (Hello, auth): small, so strangers cost little
MAX_NAME_CHARS = 256
MAX_MESSAGE_CHARS = 16 * 1024
MAX_TRANSPORTS = 32
MAX_DESCRIPTOR_BYTES = 4 * 1024 * 1024
MAX_MEMBERS = 65536
MAX_TENSORS = 65536
MAX_KEYS = 65536
MAX_CACHES = 65536
NONCE_BYTES = 32
MIN_DIAL_NONCE_BYTES = 16  # a shorter dial nonce is never vouched for
_MAX_AUTH_BYTES = 64
SCRYPT_N = 2**14  # cost of the secret's key stretching (see stretch_secret)
POLL_INTERVAL_S = 0.2
MAX_NOTIFY_BYTES = 64 * 1024  # payload of one notification (Notify)
NOTIFY_PLAIN, NOTIFY_AFTER_PUSH, NOTIFY_AFTER_PULL = 0, 1, 2  # Notify.after

# Field types with the limits enforced at decode time -------------------------------------------
U16 = Annotated[int, Meta(ge=0, le=2**16 - 1)]
U32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
# msgpack integers already span exactly [-2**63, 2**64 - 1] (msgspec rejects wider bounds), so U64 only
# needs the lower bound and WireInt (u64 ids or a -1 sentinel) none.
U64 = Annotated[int, Meta(ge=0)]
WireInt = int
Code = Annotated[int, Meta(ge=-(2**31), le=2**32 - 1)]  # LLMStatusCode values (LLM_FAILED, -1 ...)
Name = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
Text = Annotated[str, Meta(max_length=MAX_MESSAGE_CHARS)]
AuthBytes = Annotated[bytes, Meta(max_length=_MAX_AUTH_BYTES)]
Descriptor = Annotated[bytes, Meta(max_length=MAX_DESCRIPTOR_BYTES)]
Transports = Annotated[Dict[Name, Descriptor], Meta(max_length=MAX_TRANSPORTS)]
Members = Annotated[List[U64], Meta(max_length=MAX_MEMBERS)]
Addrs = Annotated[List[U64], Meta(max_length=MAX_TENSORS)]
Key = Tuple[Name, WireInt, WireInt, U32]  # (namespace, ident, model_id, slot)
Keys = Annotated[List[Key], Meta(max_length=MAX_KEYS)]
ResolveKind = SourceKind
Nonce = Annotated[bytes, Meta(max_length=64)]
GuardRef = Tuple[U32, U64, U64]  # (slot, value, address of the word in the owner)
Kind = Annotated[str, Meta(max_length=16)]
RegionView = Tuple[U64, U64, Kind, Transports]  # (addr, nbytes, memory kind, {transport: descriptor})
Regions = Annotated[List[RegionView], Meta(max_length=MAX_TENSORS)]
GuardPairs = Annotated[List[Tuple[U32, U64]], Meta(max_length=MAX_CACHES)]


class _Msg(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """Base of every wire message; the tag is the class name."""


# Handshake ----------------------------------------------------------------------------------------
class Hello(_Msg):
    """First frame of a link, client to server: who I am and how I can be reached."""

    protocol_version: U16
    cluster_id: U64
    role: U16
    host_id: Name
    pid: U32
    remote_cache_accessible: bool
    transports: Transports
    comm_name: Name = ""
    comm_members: Members = msgspec.field(default_factory=list)
    client_nonce: AuthBytes = b""
    listen_port: U16 = 0
    target_cluster_id: Optional[U64] = None  # the cluster the client means to reach, when it knows it
    nonce: Nonce = b""  # the client instance's identity (its guard table proves it on one host)
    dial_nonce: Nonce = b""  # random per dial: the client vouches for this dial when asked over another link


class HelloAck(_Msg):
    """Server's answer to Hello; ``code`` != 0 refuses the link (identity fields may then be empty)."""

    cluster_id: U64 = 0
    role: U16 = 0
    host_id: Name = ""
    pid: U32 = 0
    remote_cache_accessible: bool = False
    transports: Transports = msgspec.field(default_factory=dict)
    code: Code = 0
    message: Text = ""
    nonce: Nonce = b""
    credentials: Transports = msgspec.field(default_factory=dict)  # granted to the client for this link
    server_proof: AuthBytes = b""  # with a secret: the server's proof, sent only after the client proved it


class AuthChallenge(_Msg):
    """Server to client when a secret is configured: its nonce (the server proves nothing before the client)."""

    server_nonce: AuthBytes


class AuthProof(_Msg):
    """Client to server: proof of the secret over both nonces (the first proof of the handshake)."""

    client_proof: AuthBytes


class AuthResult(_Msg):
    """Server to client: authentication refused (code != 0); the connection is closed after it."""

    code: Code
    message: Text = ""


# Requests and replies -----------------------------------------------------------------------------
class CacheView(_Msg):
    """Description of one cache on the serving side; keys are (namespace, ident, model_id, slot)."""

    cache_id: WireInt
    tensor_addrs: Addrs
    tensor_nbytes: U64
    stride: U64
    dim0: U64
    num_tensors: U32
    placement: U16
    is_blocks: bool
    remote_accessible: bool
    owned: bool
    slot: U32 = 0
    keys: Keys = msgspec.field(default_factory=list)
    blocks_model_id: WireInt = -1
    kind: Kind = "host"
    guard: GuardRef = (0, 0, 0)
    regions: Regions = msgspec.field(default_factory=list)


class Resolve(_Msg):
    """Look up a cache on the peer by request/prefix key, cache id or blocks; reply CacheView."""

    kind: ResolveKind
    cluster_id: U64
    ident: WireInt = 0
    model_id: WireInt = 0
    cache_id: WireInt = 0
    batch_index: U32 = 0


class Consume(_Msg):
    """Tell the owner that tensors [tensor_lo, tensor_hi) of a slot were pulled; reply Ack."""

    cache_id: WireInt
    slot: U32
    tensor_lo: U32
    tensor_hi: U32


class TableRequest(_Msg):
    """Ask for the peer's whole cache table; reply Table."""


class Table(_Msg):
    """The peer's cache table at ``version``."""

    version: U64
    caches: Annotated[List[CacheView], Meta(max_length=MAX_CACHES)]


class Unlink(_Msg):
    """The caller is dropping the link to ``cluster_id``; reply Ack."""

    cluster_id: U64


class Ping(_Msg):
    """Liveness probe; reply Ack."""


class TableChanged(_Msg):
    """The sender's cache table changed (register, unregister, free): drop any snapshot; reply Ack."""

    version: U64


class Credentials(_Msg):
    """Client to server right after the handshake: what the client grants the server for this link; Ack."""

    credentials: Transports


class WriteGrant(_Msg):
    """Ask the owner to hold caches (by generation) while a one-sided write runs; reply Granted."""

    guards: GuardPairs


class Granted(_Msg):
    """The caches are held until WriteRelease(grant_id) or the link closes."""

    grant_id: U64


class WriteRelease(_Msg):
    """The one-sided write of a grant is over (a notification)."""

    grant_id: U64


class RevokeGrant(_Msg):
    """Owner to writer (a notification): give the grant back (WriteRelease) once no write uses it; the owner
    wants to free one of its caches."""

    grant_id: U64


class ConfirmDial(_Msg):
    """Over an existing link: are you making the dial with this ``dial_nonce`` right now? Reply DialConfirmed."""

    dial_nonce: Nonce


class DialConfirmed(_Msg):
    """Whether the asked peer is making that dial (it vouches for the new link's claimed identity)."""

    dialing: bool


class Notify(_Msg):
    """An application notification for the receiver's queue; reply Ack once queued, Error if refused.

    ``after`` is NOTIFY_AFTER_PUSH when the sender sends it after a push into the receiver's caches returned (the
    bytes are in place), NOTIFY_AFTER_PULL after a pull from them returned (the sender has the bytes),
    NOTIFY_PLAIN otherwise.
    """

    payload: Annotated[bytes, Meta(max_length=MAX_NOTIFY_BYTES)]
    after: Annotated[int, Meta(ge=0, le=2)] = NOTIFY_PLAIN


MAX_USAGE_ROWS = 64
UsageRow = Tuple[Name, Name, U64, U64]  # direction ("pull": read from the receiver, "push": written into it), ...


class Usage(_Msg):
    """What the sender moved in or out of the receiver's memory since its previous report (a notification): the
    receiver's served-bytes statistics. Rows are (direction, transport, transfers, bytes)."""

    rows: Annotated[List[UsageRow], Meta(max_length=MAX_USAGE_ROWS)]


class Ack(_Msg):
    """Generic success reply."""

    code: Code = 0


class Error(_Msg):
    """Failure reply to any request; the caller re-raises ``errors.error_for_code(code, message)``."""

    code: Code
    message: Text = ""


Message = Union[Hello, HelloAck, AuthChallenge, AuthProof, AuthResult, CacheView, Resolve, Consume,
                TableRequest, Table, TableChanged, Unlink, Ping, Ack, Error, Credentials, WriteGrant, Granted,
                WriteRelease, ConfirmDial, DialConfirmed, Notify, Usage, RevokeGrant]

_TYPE_IDS: Dict[type, int] = {
    Hello: 1, HelloAck: 2, AuthChallenge: 3, AuthProof: 4, AuthResult: 5,
    Resolve: 16, CacheView: 17, Consume: 18, TableRequest: 19, Table: 20, Unlink: 21, Ping: 22,
    Ack: 23, Error: 24, TableChanged: 25, Credentials: 26, WriteGrant: 27, Granted: 28, WriteRelease: 29,
    ConfirmDial: 30, DialConfirmed: 31, Notify: 32, Usage: 33, RevokeGrant: 34,
}
_BY_TYPE_ID: Dict[int, type] = {v: k for k, v in _TYPE_IDS.items()}
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)


# Errors ---------------------------------------------------------------------------------------------
class ProtocolError(errors.LinkFailed):
    """Malformed, oversized or unexpected frame; the connection that carried it must be dropped."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version (detected from the header, body not decoded)."""

    def __init__(self, peer_version: int) -> None:
        super().__init__(f"peer speaks control protocol version {peer_version}, this side speaks "
                         f"{PROTOCOL_VERSION}; run the same llm_datadist version on both sides")
        self.peer_version = peer_version


class PeerClosed(errors.LinkFailed):
    """The peer closed the connection (or it was reset) at a frame boundary."""


class FrameHeader(NamedTuple):
    """Decoded fixed header of one frame."""

    version: int
    msg_type: int
    flags: int
    request_id: int
    length: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


# Encoding and decoding ------------------------------------------------------------------------------
def encode(msg: Message, request_id: int, is_reply: bool = False) -> bytes:
    """Encode one message as a complete frame (header + msgpack body).

    Args:
        msg: A message Struct of this module.
        request_id: Id chosen by the requester; a reply carries the id of its request.
        is_reply: Set FLAG_REPLY (the frame answers a request of the peer).

    Raises:
        ProtocolError: Unknown message type, an unencodable value (e.g. an int outside
            [-2**63, 2**64 - 1]) or a payload above MAX_FRAME_BYTES. Field limits are checked
            by the receiver (``decode_body``), the trust boundary.
    """
    msg_type = _TYPE_IDS.get(type(msg))
    if msg_type is None:
        raise ProtocolError(f"not a wire message: {type(msg).__name__}")
    if not 0 <= request_id <= 2**64 - 1:
        raise ProtocolError(f"request id out of range: {request_id}")
    try:
        body = _ENCODER.encode(msg)
    except (msgspec.EncodeError, OverflowError, TypeError) as exc:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from exc
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{type(msg).__name__} payload of {len(body)} bytes exceeds the "
                            f"{MAX_FRAME_BYTES}-byte frame limit")
    flags = FLAG_REPLY if is_reply else 0
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, flags, request_id, len(body)) + body


def parse_header(data: bytes) -> FrameHeader:
    """Parse and check a fixed header: magic, then version, then type, flags and length.

    Raises:
        VersionMismatch: The peer's protocol version differs (checked before anything else but magic).
        ProtocolError: Bad magic, unknown type or flags, or a payload length above MAX_FRAME_BYTES.
    """
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"truncated frame header ({len(data)} of {HEADER_SIZE} bytes)")
    magic, version, msg_type, flags, request_id, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}: not an llm_datadist control connection")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)
    if msg_type not in _BY_TYPE_ID:
        raise ProtocolError(f"unknown message type {msg_type}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags 0x{flags:04x}")
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame payload of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return FrameHeader(version, msg_type, flags, request_id, length)


def decode_body(header: FrameHeader, body: bytes) -> Message:
    """Decode and validate a body against the message union; it must match the header's type.

    Raises:
        ProtocolError: Malformed msgpack, a field out of its limits, or a type that contradicts the header.
    """
    try:
        msg = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid frame body: {exc}") from exc
    if type(msg) is not _BY_TYPE_ID[header.msg_type]:
        raise ProtocolError(f"frame header says type {header.msg_type}, body is {type(msg).__name__}")
    return msg


def decode(frame: bytes) -> Tuple[FrameHeader, Message]:
    """Decode one complete frame held in memory (header + body, nothing more)."""
    header = parse_header(bytes(frame[:HEADER_SIZE]))
    body = frame[HEADER_SIZE:]
    if len(body) != header.length:
        raise ProtocolError(f"frame body is {len(body)} bytes, header says {header.length}")
    return header, decode_body(header, body)


# Socket I/O (non-blocking sockets, poll with deadlines; never blocks past a deadline) ---------------
def _wait(sock: socket.socket, events: int, deadline: Optional[float], stop: Optional[threading.Event]) -> None:
    """Wait until ``sock`` is ready for ``events``; raise Timeout at the deadline, LinkFailed on stop."""
    if events & select.POLLIN and tls.pending(sock):
        return  # TLS already holds decrypted bytes the fd will never announce
    poller = select.poll()
    try:
        poller.register(sock.fileno(), events | select.POLLERR | select.POLLHUP)
    except (OSError, ValueError) as exc:
        raise PeerClosed(f"socket is closed: {exc}") from exc
    while True:
        if stop is not None and stop.is_set():
            raise errors.LinkFailed("connection is closing")
        wait_s = POLL_INTERVAL_S
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.Timeout("control-plane deadline passed")
            wait_s = min(wait_s, remaining)
        if poller.poll(max(1, int(wait_s * 1000))):
            return


def recv_exact(sock: socket.socket, nbytes: int, deadline: Optional[float] = None,
               stop: Optional[threading.Event] = None, *, at_boundary: bool = False) -> bytearray:
    """Read exactly ``nbytes`` from a non-blocking socket.

    Args:
        sock: Socket in non-blocking mode.
        nbytes: Number of bytes to read.
        deadline: time.monotonic() deadline, or None to wait until ``stop`` is set.
        stop: threading.Event that aborts the wait (checked every POLL_INTERVAL_S).
        at_boundary: EOF before the first byte is a clean close (PeerClosed), not a truncated frame.
    """
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        _wait(sock, select.POLLIN, deadline, stop)
        try:
            n = sock.recv_into(view[got:], nbytes - got)
        except tls.WOULD_BLOCK + (socket.timeout,):
            continue
        except OSError as exc:
            raise PeerClosed(f"connection lost: {exc}") from exc
        if n == 0:
            if got == 0 and at_boundary:
                raise PeerClosed("peer closed the connection")
            raise ProtocolError(f"truncated frame: connection closed after {got} of {nbytes} bytes")
        got += n
    return buf


def read_frame(sock: socket.socket, deadline: Optional[float] = None,
               stop: Optional[threading.Event] = None,
               max_length: int = MAX_FRAME_BYTES) -> Tuple[FrameHeader, Message]:
    """Read one frame: exactly the header, check it (version first), then exactly the body.

    ``max_length`` caps the body before any of it is read (handshake frames use HANDSHAKE_FRAME_BYTES).

    Raises:
        errors.Timeout: The deadline passed.
        PeerClosed: The peer closed the connection between frames.
        VersionMismatch, ProtocolError: Malformed input; drop the connection.
    """
    header = parse_header(bytes(recv_exact(sock, HEADER_SIZE, deadline, stop, at_boundary=True)))
    if header.length > max_length:
        raise ProtocolError(f"frame payload of {header.length} bytes exceeds the {max_length}-byte limit here")
    body = recv_exact(sock, header.length, deadline, stop) if header.length else b""
    return header, decode_body(header, bytes(body))


def peer_name(sock: socket.socket) -> str:
    """``host:port`` of the peer, for log lines and messages."""
    try:
        addr = sock.getpeername()
    except OSError:
        return "<unknown>"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr) or "<local>"


def prepare_socket(sock: socket.socket) -> None:
    """Switch a connected socket to non-blocking mode (all I/O here polls) and disable Nagle for TCP."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PartialWrite(errors.Timeout):
    """The deadline passed after part of a frame was sent; the stream is unusable."""


def send_all(sock: socket.socket, data: bytes, deadline: Optional[float] = None,
             stop: Optional[threading.Event] = None, lock: Optional[threading.Lock] = None) -> None:
    """Send all of ``data`` on a non-blocking socket before the deadline.

    Raises:
        errors.Timeout: Nothing was sent before the deadline (the stream is intact).
        PartialWrite: Part of the frame was sent before the deadline (the stream is broken).
        PeerClosed: The connection was closed or reset.
    """
    view = memoryview(data)
    sent = 0
    while sent < len(data):
        try:
            _wait(sock, select.POLLOUT, deadline, stop)
            if lock is None:
                sent += sock.send(view[sent:])
            else:  # a TLS socket is used by one thread at a time (the reader takes the same lock)
                with lock:
                    sent += sock.send(view[sent:])
        except tls.WOULD_BLOCK + (socket.timeout,):
            continue
        except errors.Timeout as exc:
            if sent:
                raise PartialWrite(f"deadline passed after {sent} of {len(data)} bytes") from exc
            raise
        except errors.EngineError:
            raise
        except OSError as exc:
            raise PeerClosed(f"connection lost: {exc}") from exc


# Authentication helpers ----------------------------------------------------------------------------
def make_nonce() -> bytes:
    """A fresh random nonce for the HMAC challenge."""
    return os.urandom(NONCE_BYTES)


@functools.lru_cache(maxsize=8)
def stretch_secret(secret: bytes) -> bytes:
    """The HMAC key of a link secret: scrypt (N=2**14, r=8, p=1; about 16 MiB and tens of ms, once per process).

    Whoever holds one proof (a fake listener a client dialed) must pay this for every guess of the secret.
    """
    return hashlib.scrypt(secret, salt=b"llm_datadist link secret v3", n=SCRYPT_N, r=8, p=1, maxmem=64 << 20,
                          dklen=32)


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256(stretch_secret(secret), b"server" + client_nonce + server_nonce)."""
    return hmac.new(stretch_secret(secret), b"server" + client_nonce + server_nonce, hashlib.sha256).digest()


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HMAC-SHA256(stretch_secret(secret), b"client" + server_nonce + client_nonce)."""
    return hmac.new(stretch_secret(secret), b"client" + server_nonce + client_nonce, hashlib.sha256).digest()


ReplyT = TypeVar("ReplyT", bound=msgspec.Struct)


def expect_reply(reply: Message, kind: Type[ReplyT], peer: str) -> ReplyT:
    """``reply`` as the message type its request calls for; ProtocolError (the link fails) for any other type,
    so a confused or hostile peer's answer never reaches code that reads fields it does not have."""
    if not isinstance(reply, kind):
        raise ProtocolError(f"{peer} answered with {type(reply).__name__} where {kind.__name__} was due")
    return reply


def message_type_id(cls: Type[_Msg]) -> int:
    """The header type id of a message class."""
    return _TYPE_IDS[cls]


def clip_message(text: str) -> str:
    """Truncate a message so it fits the MAX_MESSAGE_CHARS field limit."""
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[:MAX_MESSAGE_CHARS - 3] + "..."
