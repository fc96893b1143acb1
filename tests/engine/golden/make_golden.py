"""Golden wire frames: the exact bytes of every control message and of the tcp data-plane frames.

    python tests/engine/golden/make_golden.py           # write the goldens of the CURRENT versions
    python tests/engine/golden/make_golden.py --force   # rewrite them (only for a version never released)

Writes ``control-v<N>.json`` (N = ``_engine/protocol.PROTOCOL_VERSION``) and ``tcp-v<M>.json``
(M = ``_transport/tcp_wire.PROTOCOL_VERSION``) next to this script. A file that exists is never rewritten
without ``--force``: the goldens of a version are its wire format, and tests/engine/test_golden_frames.py fails
when today's code encodes another byte under the same version.

After changing a message (a field added, removed, renamed, reordered or retyped, a new message class, a new
type id) or the frame header:
  1. bump PROTOCOL_VERSION in src/llm_datadist/_engine/protocol.py and add its changelog line;
  2. give every new message class and every new field a sample in SAMPLES below (every field, non-default
     values; a removed field leaves its sample);
  3. run this script: it writes control-v<new>.json and leaves the goldens of earlier versions as they are.
The same holds for the tcp frames with tcp_wire.PROTOCOL_VERSION and TCP_* below.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.append(os.path.join(ROOT, "src"))  # after PYTHONPATH and an installed llm_datadist

import msgspec  # noqa: E402

from llm_datadist._engine import protocol as p  # noqa: E402
from llm_datadist._transport import tcp  # noqa: E402
from llm_datadist._transport import tcp_wire as wire  # noqa: E402
from llm_datadist._transport.base import CopyPlan, Guard  # noqa: E402

GENERATOR = "python tests/engine/golden/make_golden.py"
U64_MAX = 2**64 - 1


class SampleMismatch(Exception):
    """SAMPLES does not describe today's message classes (the generator writes nothing then)."""


class Sample:
    """In SAMPLES: the sample message of another class (a message nested in a field)."""

    def __init__(self, name: str) -> None:
        self.name = name


# The one definition of the sample messages: class name -> constructor keyword arguments. Every field of every
# message class of protocol.py appears here with a value other than its default (the test checks it), chosen
# to exercise the encoding: u64 extremes, negative codes, empty and non-empty bytes, nested tuples and dicts.
# Tuple-typed fields take tuples (a decoded frame gives tuples back).
_VIEW_KEYS = [("req", U64_MAX, 0, 3), ("prefix", 5, 9, 0)]
SAMPLES: Dict[str, Dict[str, Any]] = {
    "Hello": dict(protocol_version=p.PROTOCOL_VERSION, cluster_id=U64_MAX, role=1, host_id="host-a/1b2c",
                  pid=4242, remote_cache_accessible=True, transports={"tcp": b"TCP2\x10\x27", "shm": b"\x00\xff"},
                  comm_name="comm0", comm_members=[1, 2, U64_MAX], client_nonce=bytes(range(32)),
                  listen_port=26000, target_cluster_id=7, nonce=bytes(range(100, 132)),
                  dial_nonce=bytes(range(140, 172))),
    "HelloAck": dict(cluster_id=9, role=2, host_id="host-b/9f8e", pid=77, remote_cache_accessible=True,
                     transports={"tcp": b"x"}, code=1343270921, message="refused: version",
                     nonce=b"N" * 16, credentials={"tcp": b"k" * 32}, server_proof=b"P" * 32),
    "AuthChallenge": dict(server_nonce=b"s" * 32),
    "AuthProof": dict(client_proof=b"c" * 32),
    "AuthResult": dict(code=-1, message="authentication failed"),
    "CacheView": dict(cache_id=2**63 + 5, tensor_addrs=[0x7F0000000000, U64_MAX], tensor_nbytes=4096, stride=1024,
                      dim0=4, num_tensors=2, placement=1, is_blocks=True, remote_accessible=True, owned=True,
                      slot=3, keys=_VIEW_KEYS, blocks_model_id=2, kind="device",
                      guard=(3, 2**40 + 1, 0x7F0000001000),
                      regions=[(0x7F0000000000, 8192, "host", {"tcp": b"", "shm": b"seg"})]),
    "Resolve": dict(kind="blocks", cluster_id=3, ident=-1, model_id=6, cache_id=11, batch_index=2),
    "Consume": dict(cache_id=1, slot=2, tensor_lo=7, tensor_hi=80),
    "TableRequest": dict(),
    "Table": dict(version=12, caches=[Sample("CacheView")]),
    "Unlink": dict(cluster_id=5),
    "Ping": dict(),
    "TableChanged": dict(version=2**32),
    "Credentials": dict(credentials={"tcp": b"t" * 32, "nixl": b"\x01"}),
    "WriteGrant": dict(guards=[(3, U64_MAX), (0, 1)]),
    "Granted": dict(grant_id=9),
    "WriteRelease": dict(grant_id=2**33 + 1),
    "ConfirmDial": dict(dial_nonce=bytes(range(40, 72))),
    "DialConfirmed": dict(dialing=True),
    "Notify": dict(payload=bytes(range(256)) * 3 + b"\x00", after=2),
    "Usage": dict(rows=[("pull", "process_vm", 7, U64_MAX), ("push", "tcp", 0, 1)]),
    "RevokeGrant": dict(grant_id=U64_MAX - 1),
    "Ack": dict(code=4294967295),
    "Error": dict(code=1343270914, message="cache 3 does not exist"),
}
REQUEST_ID = 0x0102030405060708  # every sample frame's request id (a request: no reply flag)
HEADER_SAMPLE = dict(msg_type=17, flags=p.FLAG_REPLY, request_id=U64_MAX - 1, length=0x00A1B2C3)

# The tcp data plane: a HELLO with its token, READ/WRITE requests (guards, then ranges), the verdicts/replies.
TCP_TOKEN = bytes(range(200, 232))
TCP_GUARDS = [(5, U64_MAX), (0, 2**32 + 3)]  # (slot, generation value)
TCP_RANGES = [(0x10000, 0x7F0000000000, 1), (0x20000, 0x7F0000100000, 4096), (0x30000, U64_MAX - 4096, 4096)]
TCP_PORT = 0xC0DE


def message_classes() -> Dict[str, type]:
    """Every message class of protocol.py: the subclasses of its ``_Msg`` base, by name."""
    out: Dict[str, type] = {}
    todo = list(p._Msg.__subclasses__())
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo += cls.__subclasses__()
    return dict(sorted(out.items()))


def sample_problems() -> List[str]:
    """What keeps SAMPLES from describing today's messages (empty when every class and field has a sample)."""
    problems = []
    classes = message_classes()
    for name, cls in classes.items():
        if name not in SAMPLES:
            problems.append(f"message class {name} has no sample in SAMPLES")
            continue
        fields = {f.name: f for f in msgspec.structs.fields(cls)}
        kwargs = SAMPLES[name]
        for extra in sorted(set(kwargs) - set(fields)):
            problems.append(f"SAMPLES[{name!r}] sets {extra!r}, which {name} no longer has")
        for field in fields.values():
            if field.name not in kwargs:
                problems.append(f"SAMPLES[{name!r}] lacks field {field.name!r}")
                continue
            if field.default is not msgspec.NODEFAULT:
                default = field.default
            elif field.default_factory is not msgspec.NODEFAULT:
                default = field.default_factory()
            else:
                continue
            if _resolve(kwargs[field.name]) == default:
                problems.append(f"SAMPLES[{name!r}][{field.name!r}] equals the field's default: give it another "
                                f"value, so the golden shows the field")
    for name in sorted(set(SAMPLES) - set(classes)):
        problems.append(f"SAMPLES has {name!r}, which is no message class of protocol.py")
    return problems


def _resolve(value: Any) -> Any:
    if isinstance(value, Sample):
        return sample(value.name)
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    return value


def sample(name: str) -> Any:
    """The sample message of class ``name``, built from SAMPLES."""
    cls = message_classes()[name]
    return cls(**{key: _resolve(value) for key, value in SAMPLES[name].items()})


def control_golden() -> Dict[str, Any]:
    """The control protocol's golden content at the current PROTOCOL_VERSION."""
    problems = sample_problems()
    if problems:
        raise SampleMismatch("SAMPLES in tests/engine/golden/make_golden.py does not match protocol.py:\n  "
                             + "\n  ".join(problems) + "\nGive every message class and every field a sample "
                             "(non-default values), drop the fields that are gone, and run this again.")
    header = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, HEADER_SAMPLE["msg_type"], HEADER_SAMPLE["flags"],
                           HEADER_SAMPLE["request_id"], HEADER_SAMPLE["length"])
    classes = message_classes()
    return {
        "about": f"control-protocol frames at PROTOCOL_VERSION {p.PROTOCOL_VERSION}, written by {GENERATOR}; "
                 "never edit nor rewrite: a wire change bumps the version and gets a file of its own",
        "version": p.PROTOCOL_VERSION,
        "header": {"fields": HEADER_SAMPLE, "hex": header.hex()},
        "type_ids": {name: p.message_type_id(cls) for name, cls in classes.items()},
        "request_id": REQUEST_ID,
        "messages": {name: p.encode(sample(name), REQUEST_ID).hex() for name in classes},
    }


def tcp_plans() -> Tuple[CopyPlan, CopyPlan]:
    """The golden request's plan twice: from Python ints (the small-plan path) and from arrays."""
    import numpy as np

    guards = tuple(Guard(slot, value, 0x7F0000002000 + 8 * slot) for slot, value in TCP_GUARDS)
    local, remote, sizes = ([r[i] for r in TCP_RANGES] for i in range(3))
    ints = CopyPlan(local, remote, sizes, guards=guards)
    arrays = CopyPlan(np.array(local, dtype=np.uint64), np.array(remote, dtype=np.uint64),
                      np.array(sizes, dtype=np.uint64), guards=guards)
    assert ints.ops is not None and arrays.ops is None
    return ints, arrays


def tcp_request(op: int, plan: CopyPlan) -> bytes:
    """The bytes the tcp client sends to request ``plan`` (its real framing code, over a socket pair)."""
    a, b = socket.socketpair()
    try:
        tcp._request(a, op, plan, lambda: None)
        a.shutdown(socket.SHUT_WR)
        out = bytearray()
        while True:
            chunk = b.recv(65536)
            if not chunk:
                return bytes(out)
            out += chunk
    finally:
        a.close()
        b.close()


def tcp_golden() -> Dict[str, Any]:
    """The tcp data plane's golden content at the current tcp_wire.PROTOCOL_VERSION."""
    ints, _ = tcp_plans()
    total = sum(r[2] for r in TCP_RANGES)
    frames = {
        "hello": wire.header(wire.OP_HELLO, nbytes=wire.TOKEN_BYTES) + TCP_TOKEN,
        "read_request": tcp_request(wire.OP_READ, ints),
        "write_request": tcp_request(wire.OP_WRITE, ints),
        "reply_ok": wire.header(wire.OP_REPLY, wire.ST_OK, len(TCP_RANGES), total),
        "reply_rejected": wire.header(wire.OP_REPLY, wire.ST_REJECTED),
        "reply_bad_frame": wire.header(wire.OP_REPLY, wire.ST_BAD_FRAME),
        "reply_stale": wire.header(wire.OP_REPLY, wire.ST_STALE),
        "descriptor": tcp._DESC.pack(tcp._DESC_MAGIC, TCP_PORT),
    }
    return {
        "about": f"tcp data-plane frames at tcp_wire.PROTOCOL_VERSION {wire.PROTOCOL_VERSION}, written by "
                 f"{GENERATOR}; never edit nor rewrite: a wire change bumps the version and gets a file of its own",
        "version": wire.PROTOCOL_VERSION,
        "token": TCP_TOKEN.hex(),
        "guards": TCP_GUARDS,
        "ranges": TCP_RANGES,
        "port": TCP_PORT,
        "frames": {name: frame.hex() for name, frame in frames.items()},
    }


def control_path(version: int = -1) -> str:
    return os.path.join(HERE, f"control-v{p.PROTOCOL_VERSION if version < 0 else version}.json")


def tcp_path(version: int = -1) -> str:
    return os.path.join(HERE, f"tcp-v{wire.PROTOCOL_VERSION if version < 0 else version}.json")


def dumps(content: Dict[str, Any]) -> str:
    return json.dumps(content, indent=1) + "\n"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true",
                        help="rewrite an existing golden file (only for a version that was never released)")
    args = parser.parse_args(argv)
    status = 0
    try:
        goldens = [(control_path(), control_golden()), (tcp_path(), tcp_golden())]
    except SampleMismatch as exc:
        print(f"{exc}\nNothing written.", file=sys.stderr)
        return 2
    for path, content in goldens:
        name = os.path.relpath(path, ROOT)
        text = dumps(content)
        if os.path.exists(path) and not args.force:
            with open(path) as f:
                same = f.read() == text
            if same:
                print(f"{name}: up to date")
            else:
                print(f"{name}: REFUSED: it exists and today's code encodes other bytes under the same version. "
                      "The goldens of a version are immutable: bump the version (and its changelog) and run this "
                      "again; --force only for a version that was never released.", file=sys.stderr)
                status = 1
            continue
        with open(path, "w") as f:
            f.write(text)
        print(f"{name}: written")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
