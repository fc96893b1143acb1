"""Seeded generators of hostile frames for both ports: the control protocol and the tcp data plane."""
from __future__ import annotations

import typing
from typing import Sequence, Tuple

import msgspec
import numpy as np

from llm_datadist._engine import protocol as proto
from llm_datadist._transport import tcp_wire as dwire
from tests.reliability import wire

Case = Tuple[bytes, bool]  # (bytes to send on a fresh connection, half-close after sending)
KNOWN_TYPES = tuple(proto.message_type_id(cls) for cls in typing.get_args(proto.Message))


def junk(rng: np.random.Generator, lo: int = 1, hi: int = 300) -> bytes:
    return rng.integers(0, 256, int(rng.integers(lo, hi)), dtype=np.uint8).tobytes()


def flip(rng: np.random.Generator, data: bytes, most: int = 8) -> bytes:
    """``data`` with 1..most random bytes replaced by different values."""
    out = bytearray(data)
    for pos in rng.integers(0, len(out), int(rng.integers(1, most + 1))).tolist():
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


def control_header(msg_type: int, length: int, version: int = proto.PROTOCOL_VERSION, flags: int = 0,
                   request_id: int = 0, magic: bytes = proto.MAGIC) -> bytes:
    return proto.HEADER.pack(magic, version, msg_type, flags, request_id, length)


def _u(rng: np.random.Generator, bits: int) -> int:
    """A random unsigned integer of ``bits`` bits."""
    return int.from_bytes(rng.bytes(8), "little") >> (64 - bits)


def random_message(rng: np.random.Generator):
    """A well-formed message of any type with random field values (what a confused or hostile peer sends)."""
    pick = int(rng.integers(0, 17))
    if pick == 0:
        return proto.Resolve(kind=["req", "prefix", "id", "blocks"][int(rng.integers(0, 4))],
                             cluster_id=_u(rng, 64), ident=int(rng.integers(-2**63, 2**63 - 1)),
                             model_id=int(rng.integers(-1, 4)), cache_id=int(rng.integers(-1, 8)),
                             batch_index=_u(rng, 32))
    if pick == 1:
        return proto.Consume(cache_id=int(rng.integers(-1, 8)), slot=_u(rng, 32), tensor_lo=_u(rng, 32),
                             tensor_hi=_u(rng, 32))
    if pick == 2:
        return proto.TableRequest()
    if pick == 3:
        return proto.Ping()
    if pick == 4:
        return proto.TableChanged(version=_u(rng, 64))
    if pick == 5:
        return proto.WriteGrant(guards=[(_u(rng, 32), _u(rng, 64)) for _ in range(int(rng.integers(0, 6)))])
    if pick == 6:
        return proto.WriteRelease(grant_id=_u(rng, 64))
    if pick == 7:
        return proto.Credentials(credentials={"tcp": junk(rng, 0, 64), "x" * int(rng.integers(1, 9)): b""})
    if pick == 8:
        return wire.hello(_u(rng, 64))
    if pick == 9:
        return proto.HelloAck(code=int(rng.integers(0, 5)), credentials={"tcp": junk(rng, 32, 33)})
    if pick == 10:
        return proto.AuthProof(client_proof=junk(rng, 0, 64))
    if pick == 11:
        return proto.Error(code=int(rng.integers(-1, 10)), message="x" * int(rng.integers(0, 100)))
    if pick == 12:
        return proto.Granted(grant_id=_u(rng, 64))
    if pick == 13:
        return proto.Table(version=_u(rng, 64), caches=[])
    if pick == 14:
        return proto.ConfirmDial(dial_nonce=junk(rng, 0, 64))
    if pick == 15:
        return proto.DialConfirmed(dialing=bool(rng.integers(0, 2)))
    return proto.Ack(code=int(rng.integers(-5, 5)))


def pre_handshake_case(rng: np.random.Generator, cluster_id: int) -> Tuple[Case, bool]:
    """((bytes, half_close), must_drop): one hostile first frame for the control listener.

    ``must_drop``: the server has to close the connection on its own, without waiting for more bytes.
    """
    hello = wire.frame(wire.hello(cluster_id))
    pick = int(rng.integers(0, 10))
    if pick == 0:
        return (junk(rng), True), False
    if pick == 1:
        return (hello[:int(rng.integers(1, len(hello)))], True), False
    if pick == 2:
        return (flip(rng, hello), True), False
    if pick == 3:  # a declared length far above the handshake limit, and only a few body bytes
        length = int(rng.integers(proto.HANDSHAKE_FRAME_BYTES + 1, 2**32))
        return (control_header(1, length) + junk(rng, 1, 64), False), True
    if pick == 4:
        version = int(rng.choice([0, proto.PROTOCOL_VERSION - 1, proto.PROTOCOL_VERSION + 1, 255, 65535]))
        return (control_header(1, len(hello) - proto.HEADER_SIZE, version=version) + hello[proto.HEADER_SIZE:],
                False), True
    if pick == 5:
        msg_type = int(rng.choice([t for t in range(64) if t not in KNOWN_TYPES]))
        return (control_header(msg_type, len(hello) - proto.HEADER_SIZE) + hello[proto.HEADER_SIZE:], False), True
    if pick == 6:
        flags = int(rng.integers(2, 65536))
        return (control_header(1, len(hello) - proto.HEADER_SIZE, flags=flags) + hello[proto.HEADER_SIZE:],
                False), True
    if pick == 7:  # a valid frame of any other type first
        msg = random_message(rng)
        while isinstance(msg, proto.Hello):
            msg = random_message(rng)
        return (wire.frame(msg, int(rng.integers(0, 1000))), False), True
    if pick == 8:  # a Hello whose fields break their limits (encoders do not check limits; receivers do)
        bad = [{"host_id": "h" * 300}, {"transports": {f"t{i}": b"" for i in range(40)}}, {"nonce": b"n" * 65},
               {"client_nonce": b"c" * 65}, {"protocol_version": proto.PROTOCOL_VERSION + 1},
               {"dial_nonce": b"d" * 65}]
        fields = bad[int(rng.integers(0, len(bad)))]
        body = msgspec.msgpack.encode(msgspec.structs.replace(wire.hello(cluster_id), **fields))
        return (control_header(1, len(body)) + body, False), True
    return (control_header(1, 2**32 - 1), False), True  # the largest length, no body at all


def fatal_control_frame(rng: np.random.Generator) -> bytes:
    """A frame that must make the server drop an established link."""
    body = msgspec.msgpack.encode(proto.Ping())
    pick = int(rng.integers(0, 7))
    if pick == 0:
        return control_header(22, len(body), magic=b"XDD\x01") + body
    if pick == 1:
        version = int(rng.choice([proto.PROTOCOL_VERSION - 1, proto.PROTOCOL_VERSION + 1, 999]))
        return control_header(22, len(body), version=version) + body
    if pick == 2:
        return control_header(int(rng.integers(max(KNOWN_TYPES) + 1, 65536)), len(body)) + body
    if pick == 3:
        return control_header(22, len(body), flags=int(rng.integers(2, 65536))) + body
    if pick == 4:
        return control_header(22, proto.MAX_FRAME_BYTES + int(rng.integers(1, 2**31)))
    if pick == 5:
        garbage = junk(rng, 1, 100)
        return control_header(22, len(garbage), request_id=7) + garbage
    other = msgspec.msgpack.encode(proto.TableRequest())  # the header names another type than the body
    return control_header(22, len(other), request_id=9) + other


# -- data plane ----------------------------------------------------------------------------------------
def data_pre_auth_case(rng: np.random.Generator, token: bytes) -> Tuple[Case, bool]:
    """((bytes, half_close), must_drop): one hostile opening of a tcp data connection (no valid HELLO)."""
    hello = wire.data_header(dwire.OP_HELLO, nbytes=len(token)) + token
    pick = int(rng.integers(0, 8))
    if pick == 0:
        return (junk(rng), True), False
    if pick == 1:
        return (hello[:int(rng.integers(1, len(hello)))], True), False
    if pick == 2:
        return (wire.data_header(dwire.OP_HELLO, nbytes=32) + junk(rng, 32, 33), False), True  # a wrong token
    if pick == 3:
        nbytes = [0, 31, 33, 2**32, 2**63, 2**64 - 1][int(rng.integers(0, 6))]
        return (wire.data_header(dwire.OP_HELLO, nbytes=nbytes) + token, False), True
    if pick == 4:
        return (wire.data_header(dwire.OP_HELLO, nbytes=32, magic=b"XDT1") + token, False), True
    if pick == 5:
        version = int(rng.choice([0, dwire.PROTOCOL_VERSION - 1, dwire.PROTOCOL_VERSION + 1, 255]))
        return (wire.data_header(dwire.OP_HELLO, nbytes=32, version=version) + token, False), True
    if pick == 6:
        op = int(rng.choice([0, dwire.OP_READ, dwire.OP_WRITE, dwire.OP_REPLY, 99]))
        return (wire.data_header(op, nbytes=32) + token, False), True
    flipped = flip(rng, hello, 3)  # may still be a valid HELLO (the status/count fields are not checked)
    return (flipped, True), False


FatalData = Tuple[bytes, bool]  # (frame, the server answers BAD_FRAME before closing)


def fatal_data_frame(rng: np.random.Generator, valid: Tuple[int, int], guard: Tuple[int, int]) -> FatalData:
    """A frame that must end an authenticated data connection."""
    pick = int(rng.integers(0, 6))
    if pick == 0:
        return wire.data_header(int(rng.choice([0, 1, 4, 5, 200]))), True
    if pick == 1:
        return wire.data_header(dwire.OP_READ, count=dwire.MAX_OPS + int(rng.integers(1, 2**31))), True
    if pick == 2:
        return wire.data_header(dwire.OP_READ, count=1, guards=dwire.MAX_GUARDS + int(rng.integers(1, 1000))), True
    if pick == 3:  # a valid range and guard, but the byte count contradicts the ranges
        return wire.request_frame(dwire.OP_READ, [valid], [guard], nbytes=valid[1] + 1), True
    if pick == 4:
        return wire.data_header(dwire.OP_READ, magic=b"LDT9"), False
    return junk(rng, 24, 200), False


def _covered(rng_: Tuple[int, int], spans: Sequence[Tuple[int, int]]) -> bool:
    """Whether ``[addr, addr + n)`` lies inside the union of ``spans`` (the server coalesces adjacent ones)."""
    addr, n = rng_
    pos, end = addr, addr + n
    for lo, size in sorted(spans):
        if lo <= pos < lo + size:
            pos = lo + size
        if pos >= end:
            return True
    return False


def soft_data_request(rng: np.random.Generator, valid: Tuple[int, int], guard: Tuple[int, int],
                      registered: Sequence[Tuple[int, int]] = ()):
    """(op, ranges, guards) of a request the server refuses but survives: outside ranges, stale guards.

    ``registered`` lists every range the server serves besides ``valid`` (other tensors of the cache): a range
    meant to miss ``valid`` may land in one of them, and then it counts as a valid range.
    """
    start, size = valid
    op = dwire.OP_WRITE if rng.integers(0, 4) == 0 else dwire.OP_READ
    ranges = []
    for _ in range(int(rng.integers(1, 9))):
        kind = int(rng.integers(0, 4))
        if kind == 0:
            ranges.append((int(rng.integers(0, 2**63)), int(rng.integers(1, 2**20))))
        elif kind == 1:
            ranges.append((start + size - int(rng.integers(0, 64)), int(rng.integers(65, 4096))))
        elif kind == 2:
            ranges.append((start - int(rng.integers(1, 4096)), int(rng.integers(1, 8192))))
        else:
            ranges.append((start, size))
    guards = [guard] if rng.integers(0, 2) else [(guard[0], int(rng.integers(0, 2**63)))]
    spans = [valid, *registered]
    if op == dwire.OP_READ and all(_covered(r, spans) for r in ranges) and guards == [guard]:
        guards = [(guard[0], guard[1] ^ 2)]  # keep it a refusal: a stale guard
    return op, ranges, guards
