"""Tests of the control-plane wire protocol: frames, version check, limits, malformed input."""
from __future__ import annotations

import socket
import struct
import threading
import time

import msgspec
import pytest

from llm_datadist._engine import errors
from llm_datadist._engine import protocol as p
from llm_datadist.status import LLMStatusCode




@pytest.fixture()
def sockpair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _view(**over):
    fields = dict(cache_id=7, tensor_addrs=[0x7F0000000000, 2**64 - 1], tensor_nbytes=4096, stride=1024, dim0=4,
                  num_tensors=2, placement=1, is_blocks=False, remote_accessible=True, owned=False, slot=3,
                  keys=[("req", 2**64 - 1, 0, 3), ("prefix", 5, 9, 0)], blocks_model_id=-1)
    fields.update(over)
    return p.CacheView(**fields)


SAMPLES = [
    p.Hello(protocol_version=p.PROTOCOL_VERSION, cluster_id=2**64 - 1, role=1, host_id="host-a", pid=4242,
            remote_cache_accessible=True, transports={"tcp": b"\x00\x01", "shm": b""}, comm_name="comm0",
            comm_members=[1, 2, 2**64 - 1], client_nonce=b"n" * 32, listen_port=26000, dial_nonce=b"d" * 32),
    p.Hello(protocol_version=p.PROTOCOL_VERSION, cluster_id=0, role=0, host_id="", pid=0,
            remote_cache_accessible=False, transports={}),
    p.HelloAck(cluster_id=9, role=2, host_id="h", pid=1, remote_cache_accessible=True, transports={"tcp": b"x"},
               nonce=b"n" * 16, credentials={"tcp": b"k" * 32}, server_proof=b"p" * 32),
    p.HelloAck(code=int(LLMStatusCode.LLM_LINK_FAILED), message="refused"),
    p.AuthChallenge(server_nonce=b"s" * 32),
    p.AuthProof(client_proof=b"c" * 32),
    p.AuthResult(code=int(LLMStatusCode.LLM_LINK_FAILED), message="no"),
    _view(),
    _view(is_blocks=True, blocks_model_id=2**64 - 1, keys=[], tensor_addrs=[]),
    p.Resolve(kind="req", cluster_id=3, ident=2**64 - 1, model_id=0),
    p.Resolve(kind="prefix", cluster_id=3, ident=5, model_id=6),
    p.Resolve(kind="id", cluster_id=3, cache_id=11, batch_index=2),
    p.Resolve(kind="blocks", cluster_id=3, model_id=1),
    p.Consume(cache_id=1, slot=2, tensor_lo=0, tensor_hi=80),
    p.TableRequest(),
    p.TableChanged(version=7),
    p.Table(version=12, caches=[_view(), _view(cache_id=8)]),
    p.Table(version=0, caches=[]),
    p.Unlink(cluster_id=5),
    p.Ping(),
    p.Ack(),
    p.Ack(code=int(LLMStatusCode.LLM_FAILED)),
    p.Error(code=int(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST), message="cache 3 does not exist"),
    p.Error(code=int(LLMStatusCode.LLM_UNKNOWN_ERROR), message=""),
    p.Credentials(credentials={"tcp": b"t" * 32}),
    p.WriteGrant(guards=[(3, 2**64 - 1), (0, 1)]),
    p.Granted(grant_id=9),
    p.WriteRelease(grant_id=9),
    p.ConfirmDial(dial_nonce=b"d" * 32),
    p.DialConfirmed(dialing=True),
    p.DialConfirmed(dialing=False),
    p.Notify(payload=b""),
    p.Notify(payload=b"n" * p.MAX_NOTIFY_BYTES, after=p.NOTIFY_AFTER_PUSH),
    p.Usage(rows=[]),
    p.RevokeGrant(grant_id=2**64 - 1),
    p.Usage(rows=[("pull", "process_vm", 3, 2**64 - 1)] * p.MAX_USAGE_ROWS),
]


def _raw_frame(msg_type, body, version=p.PROTOCOL_VERSION, flags=0, request_id=1, length=None, magic=p.MAGIC):
    length = len(body) if length is None else length
    return p.HEADER.pack(magic, version, msg_type, flags, request_id, length) + body


def _raw_body(cls, **fields):
    """A msgpack body that bypasses the Struct constructors (for out-of-limit values)."""
    return msgspec.msgpack.encode({"type": cls.__name__, **fields})


def test_header_layout():
    assert p.HEADER_SIZE == 22
    frame = p.encode(p.Ping(), 77, is_reply=True)
    magic, version, msg_type, flags, request_id, length = p.HEADER.unpack(frame[:p.HEADER_SIZE])
    assert magic == p.MAGIC and version == p.PROTOCOL_VERSION
    assert msg_type == p.message_type_id(p.Ping) and flags == p.FLAG_REPLY
    assert request_id == 77 and length == len(frame) - p.HEADER_SIZE


def test_every_message_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(p.Message.__args__)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_in_memory(msg):
    header, back = p.decode(p.encode(msg, 2**64 - 1))
    assert back == msg and type(back) is type(msg)
    assert header.request_id == 2**64 - 1 and not header.is_reply


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_over_socket(sockpair, msg):
    a, b = sockpair
    p.send_all(a, p.encode(msg, 5, is_reply=True), time.monotonic() + 5)
    header, back = p.read_frame(b, time.monotonic() + 5)
    assert back == msg and header.is_reply and header.request_id == 5


def test_mutable_defaults_are_not_shared():
    one = p.Hello(protocol_version=1, cluster_id=1, role=0, host_id="", pid=0, remote_cache_accessible=False,
                  transports={})
    two = p.HelloAck()
    one.comm_members.append(3)
    two.transports["x"] = b""
    assert p.Hello(protocol_version=1, cluster_id=1, role=0, host_id="", pid=0, remote_cache_accessible=False,
                   transports={}).comm_members == []
    assert p.HelloAck().transports == {}


def test_version_mismatch_is_rejected_before_the_body(sockpair):
    a, b = sockpair
    # A huge announced body that never comes: the reader must fail on the header alone.
    a.sendall(_raw_frame(1, b"", version=p.PROTOCOL_VERSION + 1, length=p.MAX_FRAME_BYTES))
    with pytest.raises(p.VersionMismatch) as info:  # waiting for the body would end in Timeout instead
        p.read_frame(b, time.monotonic() + 5)
    assert info.value.peer_version == p.PROTOCOL_VERSION + 1
    assert "version" in str(info.value) and info.value.code == LLMStatusCode.LLM_LINK_FAILED
    assert isinstance(info.value, p.ProtocolError)


def test_version_mismatch_ignores_an_undecodable_body():
    frame = _raw_frame(1, b"\xc1\xc1garbage", version=0)
    with pytest.raises(p.VersionMismatch):
        p.decode(frame)


@pytest.mark.parametrize("frame, match", [
    (_raw_frame(1, b"", magic=b"HTTP"), "magic"),
    (_raw_frame(999, b""), "unknown message type"),
    (_raw_frame(p.message_type_id(p.Ping), b"", flags=0x8000), "flags"),
    (_raw_frame(p.message_type_id(p.Ping), b"", length=p.MAX_FRAME_BYTES + 1), "exceeds"),
])
def test_bad_headers(sockpair, frame, match):
    a, b = sockpair
    a.sendall(frame)
    with pytest.raises(p.ProtocolError, match=match):
        p.read_frame(b, time.monotonic() + 5)


def test_garbage_body_raises(sockpair):
    a, b = sockpair
    a.sendall(_raw_frame(p.message_type_id(p.Ping), b"\xc1\xff\x00garbage"))
    with pytest.raises(p.ProtocolError, match="invalid frame body"):
        p.read_frame(b, time.monotonic() + 5)


def test_truncated_header_raises_without_hanging(sockpair):
    a, b = sockpair
    a.sendall(p.encode(p.Ping(), 1)[:10])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(p.ProtocolError, match="truncated"):
        p.read_frame(b, time.monotonic() + 5)


def test_truncated_body_raises_without_hanging(sockpair):
    a, b = sockpair
    frame = p.encode(SAMPLES[0], 1)
    a.sendall(frame[:-3])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(p.ProtocolError, match="truncated"):
        p.read_frame(b, time.monotonic() + 5)


def test_eof_between_frames_is_peer_closed(sockpair):
    a, b = sockpair
    a.sendall(p.encode(p.Ping(), 1))
    a.shutdown(socket.SHUT_WR)
    p.read_frame(b, time.monotonic() + 5)
    with pytest.raises(p.PeerClosed):
        p.read_frame(b, time.monotonic() + 5)


def test_read_deadline_raises_timeout(sockpair):
    _, b = sockpair
    start = time.monotonic()
    with pytest.raises(errors.Timeout):
        p.read_frame(b, time.monotonic() + 0.3)
    assert 0.25 < time.monotonic() - start < 2.0  # not before its deadline, and it never hangs


def test_partial_frame_then_deadline_raises_timeout(sockpair):
    a, b = sockpair
    a.sendall(p.encode(p.Ping(), 1)[:5])
    with pytest.raises(errors.Timeout):
        p.read_frame(b, time.monotonic() + 0.3)


def test_stop_event_aborts_read(sockpair):
    _, b = sockpair
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    with pytest.raises(errors.LinkFailed):
        p.read_frame(b, None, stop)


def test_header_and_body_types_must_agree():
    body = msgspec.msgpack.encode(p.Ack())
    with pytest.raises(p.ProtocolError, match="header says"):
        p.decode(_raw_frame(p.message_type_id(p.Ping), body))


def test_length_must_match_in_memory():
    frame = p.encode(p.Ack(), 1)
    with pytest.raises(p.ProtocolError):
        p.decode(frame + b"\x00")
    with pytest.raises(p.ProtocolError):
        p.decode(frame[:-1])


@pytest.mark.parametrize("cls, fields", [
    (p.Consume, dict(cache_id=1, slot=2**32, tensor_lo=0, tensor_hi=1)),
    (p.Consume, dict(cache_id=1, slot=-1, tensor_lo=0, tensor_hi=1)),
    (p.Unlink, dict(cluster_id=-1)),
    (p.Ack, dict(code=2**32)),
    (p.Hello, dict(protocol_version=1, cluster_id=1, role=2**16, host_id="", pid=0,
                   remote_cache_accessible=False, transports={})),
    (p.Hello, dict(protocol_version=1, cluster_id=1, role=0, host_id="", pid=0,
                   remote_cache_accessible=False, transports={}, listen_port=70000)),
    (p.Resolve, dict(kind="other", cluster_id=1)),
    (p.Resolve, dict(kind="req", cluster_id="1")),
    (p.Ping, dict(unexpected=1)),
    (p.Table, dict(version=1)),
    (p.Notify, dict(payload=b"", after=3)),
])
def test_out_of_range_and_malformed_fields_rejected(cls, fields):
    with pytest.raises(p.ProtocolError, match="invalid frame body"):
        p.decode(_raw_frame(p.message_type_id(cls), _raw_body(cls, **fields)))


def _hello_fields(**over):
    fields = dict(protocol_version=1, cluster_id=1, role=0, host_id="", pid=0, remote_cache_accessible=False,
                  transports={})
    fields.update(over)
    return fields


@pytest.mark.parametrize("cls, fields", [
    (p.Hello, _hello_fields(host_id="h" * (p.MAX_NAME_CHARS + 1))),
    (p.Hello, _hello_fields(comm_members=list(range(p.MAX_MEMBERS + 1)))),
    (p.Hello, _hello_fields(client_nonce=b"n" * 65)),
    (p.Hello, _hello_fields(transports={f"t{i}": b"" for i in range(p.MAX_TRANSPORTS + 1)})),
    (p.CacheView, dict(cache_id=1, tensor_addrs=[0] * (p.MAX_TENSORS + 1), tensor_nbytes=1, stride=1, dim0=1,
                       num_tensors=1, placement=0, is_blocks=False, remote_accessible=True, owned=True)),
    (p.Error, dict(code=1, message="m" * (p.MAX_MESSAGE_CHARS + 1))),
    (p.Notify, dict(payload=b"n" * (p.MAX_NOTIFY_BYTES + 1))),
])
def test_too_long_fields_rejected(cls, fields):
    with pytest.raises(p.ProtocolError, match="invalid frame body"):
        p.decode(_raw_frame(p.message_type_id(cls), _raw_body(cls, **fields)))


def test_u64_bounds():
    ok = p.encode(p.Unlink(cluster_id=2**64 - 1), 1)
    assert p.decode(ok)[1].cluster_id == 2**64 - 1
    with pytest.raises(p.ProtocolError):
        p.encode(p.Unlink(cluster_id=2**64), 1)
    with pytest.raises(p.ProtocolError):
        p.encode(p.Ping(), -1)


def test_oversized_payload_refused_at_encode():
    big = p.Hello(protocol_version=1, cluster_id=1, role=0, host_id="", pid=0, remote_cache_accessible=False,
                  transports={f"t{i}": b"x" * p.MAX_DESCRIPTOR_BYTES for i in range(5)})
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.encode(big, 1)


def test_encode_refuses_non_messages():
    with pytest.raises(p.ProtocolError):
        p.encode(object(), 1)  # type: ignore[arg-type]


def test_send_all_deadline_on_a_full_socket(sockpair):
    a, _ = sockpair
    big = b"x" * (64 * 1024 * 1024)
    with pytest.raises(errors.Timeout) as info:
        p.send_all(a, big, time.monotonic() + 0.3)
    assert isinstance(info.value, p.PartialWrite)  # part of it fit in the socket buffer


def test_send_all_to_a_closed_peer(sockpair):
    a, b = sockpair
    b.close()
    with pytest.raises(p.PeerClosed):
        p.send_all(a, b"x" * (4 * 1024 * 1024), time.monotonic() + 5)


def test_auth_helpers():
    secret, cn, sn = b"secret", p.make_nonce(), p.make_nonce()
    assert len(cn) == p.NONCE_BYTES and cn != sn
    assert p.server_proof(secret, cn, sn) == p.server_proof(secret, cn, sn)
    assert p.server_proof(secret, cn, sn) != p.client_proof(secret, sn, cn)
    assert p.server_proof(secret, cn, sn) != p.server_proof(b"other", cn, sn)
    assert len(p.client_proof(secret, sn, cn)) == 32


def test_clip_message():
    assert p.clip_message("abc") == "abc"
    clipped = p.clip_message("x" * (p.MAX_MESSAGE_CHARS + 10))
    assert len(clipped) == p.MAX_MESSAGE_CHARS
    p.decode(p.encode(p.Error(code=1, message=clipped), 1))


def test_protocol_error_is_a_link_failure():
    assert issubclass(p.ProtocolError, errors.LinkFailed)
    assert struct.calcsize("!4sHHHQI") == p.HEADER_SIZE


@pytest.mark.parametrize("rows", [
    [["pull", "tcp", 1, 1]] * (p.MAX_USAGE_ROWS + 1),  # too many rows
    [["pull", "tcp", -1, 1]],  # a negative count
    [["pull", "x" * (p.MAX_NAME_CHARS + 1), 1, 1]],  # an overlong transport name
    [["pull", "tcp", 1]],  # a short row
])
def test_a_usage_report_out_of_its_limits_is_refused_at_decoding(sockpair, rows):
    a, b = sockpair
    a.sendall(_raw_frame(p.message_type_id(p.Usage), _raw_body(p.Usage, rows=rows)))
    with pytest.raises(p.ProtocolError, match="invalid frame body"):
        p.read_frame(b, time.monotonic() + 5)


def test_usage_rows_a_peer_may_not_report_are_dropped():
    """What reaches the served counters: the two directions a peer moves bytes in, route-like names, counts >= 0."""
    from llm_datadist._engine.stats import valid_usage

    rows = [("pull", "tcp", 2, 100), ("local", "tcp", 1, 1), ("push", "", 1, 1), ("push", "a b", 1, 1),
            ("push", "shm", 0, 0), ("pull", "x" * 33, 1, 1)]
    assert valid_usage(rows) == [("pull", "tcp", 2, 100), ("push", "shm", 0, 0)]
