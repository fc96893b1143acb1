"""Golden wire frames: today's code must encode every message exactly as the golden file of its version says.

The goldens live in tests/engine/golden/ (control-v<N>.json for the control protocol, tcp-v<M>.json for the
tcp data plane), written by tests/engine/golden/make_golden.py from the samples defined there. A message whose
bytes change without a version bump, a message class without a sample or without a golden frame, and a bumped
version without its golden file all fail here, saying what to do.
"""
from __future__ import annotations

import json
import os
import sys
import typing
from typing import Any, Dict

import pytest

from llm_datadist._engine import protocol as p
from llm_datadist._transport import tcp
from llm_datadist._transport import tcp_wire as wire

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden"))

import make_golden as g  # noqa: E402

CLASSES = g.message_classes()
BUMP = (f"bump PROTOCOL_VERSION in src/llm_datadist/_engine/protocol.py (with its changelog line), give new "
        f"messages and fields their samples in SAMPLES of tests/engine/golden/make_golden.py and run "
        f"`{g.GENERATOR}`: it writes the golden of the new version and keeps the old ones")


def _missing(path: str, what: str, version: int) -> str:
    return (f"{what} is at version {version} and there is no golden file for it ({os.path.relpath(path, g.ROOT)}): "
            f"after a version bump, update SAMPLES (or the TCP_* samples) in tests/engine/golden/make_golden.py for "
            f"what changed and run `{g.GENERATOR}`; commit the new file (goldens of earlier versions stay as they "
            f"are)")


CONTROL = (g.control_path(), "the control protocol (protocol.PROTOCOL_VERSION)", p.PROTOCOL_VERSION)
DATA_PLANE = (g.tcp_path(), "the tcp data plane (tcp_wire.PROTOCOL_VERSION)", wire.PROTOCOL_VERSION)


def _load(path: str, what: str, version: int) -> Dict[str, Any]:
    if not os.path.exists(path):
        pytest.skip(f"no golden file at version {version}: test_golden_files_exist_at_the_current_versions fails")
    with open(path) as f:
        content = json.load(f)
    assert content["version"] == version, f"{path} holds version {content['version']}"
    return content


def test_golden_files_exist_at_the_current_versions():
    """A bumped version needs its golden file: the generator writes it (the one failure of this module then)."""
    missing = [_missing(*which) for which in (CONTROL, DATA_PLANE) if not os.path.exists(which[0])]
    if missing:
        pytest.fail("\n".join(missing), pytrace=False)


@pytest.fixture(scope="module")
def control() -> Dict[str, Any]:
    return _load(*CONTROL)


@pytest.fixture(scope="module")
def data_plane() -> Dict[str, Any]:
    return _load(*DATA_PLANE)


def _differs(name: str, got: bytes, want: bytes, version: int, what: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"{name}: the frame encoded today differs from the golden of {what} version {version} at byte {at} "
            f"({len(got)} bytes now, {len(want)} in the golden). Never change the wire under the same version: "
            f"{BUMP}.\n now:    {got.hex()}\n golden: {want.hex()}")


def test_the_message_classes_are_the_protocols_messages():
    """The introspected classes are the message union and the type-id table (nothing hides from the goldens)."""
    assert set(CLASSES.values()) == set(typing.get_args(p.Message))
    assert set(CLASSES.values()) == set(p._TYPE_IDS)


def test_every_message_class_has_a_sample_with_every_field_set():
    problems = g.sample_problems()
    assert not problems, "SAMPLES in tests/engine/golden/make_golden.py does not match protocol.py:\n  " + \
        "\n  ".join(problems) + f"\n(a changed message also means: {BUMP})"


def test_every_message_class_has_a_golden_frame_at_this_version(control):
    missing = sorted(set(CLASSES) - set(control["messages"]))
    gone = sorted(set(control["messages"]) - set(CLASSES))
    assert not missing and not gone, (
        f"message classes without a golden frame at version {p.PROTOCOL_VERSION}: {missing}; golden frames of "
        f"classes that no longer exist: {gone}. A new or removed message changes the protocol: {BUMP}.")
    assert control["type_ids"] == {name: p.message_type_id(cls) for name, cls in CLASSES.items()}, (
        f"message type ids changed under version {p.PROTOCOL_VERSION}: {BUMP}")


def test_the_frame_header_is_the_golden(control):
    fields = control["header"]["fields"]
    want = bytes.fromhex(control["header"]["hex"])
    got = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, fields["msg_type"], fields["flags"], fields["request_id"],
                        fields["length"])
    assert got == want, _differs("frame header", got, want, p.PROTOCOL_VERSION, "the control protocol")
    assert p.HEADER_SIZE == len(want)
    assert tuple(p.parse_header(want)) == (p.PROTOCOL_VERSION, fields["msg_type"], fields["flags"],
                                           fields["request_id"], fields["length"])


@pytest.mark.parametrize("name", list(CLASSES))
def test_encoding_is_the_golden_frame(control, name):
    if name not in g.SAMPLES or name not in control["messages"]:
        pytest.fail(f"{name} has no sample or no golden frame (see the tests above): {BUMP}", pytrace=False)
    got = p.encode(g.sample(name), control["request_id"])
    want = bytes.fromhex(control["messages"][name])
    assert got == want, _differs(name, got, want, p.PROTOCOL_VERSION, "the control protocol")


@pytest.mark.parametrize("name", list(CLASSES))
def test_golden_frame_decodes_to_the_sample(control, name):
    if name not in g.SAMPLES or name not in control["messages"]:
        pytest.fail(f"{name} has no sample or no golden frame (see the tests above): {BUMP}", pytrace=False)
    header, msg = p.decode(bytes.fromhex(control["messages"][name]))
    assert type(msg) is CLASSES[name]
    assert msg == g.sample(name), f"the golden {name} frame decodes to {msg!r}; {BUMP}"
    assert header.msg_type == p.message_type_id(CLASSES[name])
    assert header.request_id == control["request_id"] and not header.is_reply


# The tcp data plane -------------------------------------------------------------------------------------------
def _tcp_frame(data_plane, name: str) -> bytes:
    return bytes.fromhex(data_plane["frames"][name])


def test_tcp_samples_are_the_golden_ones(data_plane):
    assert (data_plane["token"], data_plane["port"]) == (g.TCP_TOKEN.hex(), g.TCP_PORT)
    assert [tuple(x) for x in data_plane["guards"]] == g.TCP_GUARDS
    assert [tuple(x) for x in data_plane["ranges"]] == g.TCP_RANGES


@pytest.mark.parametrize("name", ["hello", "reply_ok", "reply_rejected", "reply_bad_frame", "reply_stale",
                                  "descriptor"])
def test_tcp_frame_is_the_golden(data_plane, name):
    got = bytes.fromhex(g.tcp_golden()["frames"][name])
    want = _tcp_frame(data_plane, name)
    assert got == want, _differs(name, got, want, wire.PROTOCOL_VERSION, "the tcp data plane (tcp_wire)")


REQUESTS = pytest.mark.parametrize("op, name", [(wire.OP_READ, "read_request"), (wire.OP_WRITE, "write_request")],
                                   ids=["read", "write"])


@pytest.mark.parametrize("path", [0, 1], ids=["ints", "arrays"])
@REQUESTS
def test_tcp_request_is_the_golden_from_both_plan_paths(data_plane, path, op, name):
    """The client's request framing, from a small plan (Python ints) and from arrays: the same golden bytes."""
    got = g.tcp_request(op, g.tcp_plans()[path])
    want = _tcp_frame(data_plane, name)
    assert got == want, _differs(name, got, want, wire.PROTOCOL_VERSION, "the tcp data plane (tcp_wire)")


@REQUESTS
def test_tcp_golden_request_decodes_to_the_sample(data_plane, op, name):
    frame = _tcp_frame(data_plane, name)
    total = sum(r[2] for r in g.TCP_RANGES)
    head = frame[:wire.HDR.size]
    assert wire.parse_header(head) == (op, wire.ST_OK, len(g.TCP_RANGES), len(g.TCP_GUARDS), total)
    words = [int.from_bytes(frame[i:i + 8], "little") for i in range(wire.HDR.size, len(frame), 8)]
    pairs = list(zip(words[0::2], words[1::2]))
    assert pairs == g.TCP_GUARDS + [(remote, nbytes) for _local, remote, nbytes in g.TCP_RANGES]


def test_tcp_golden_headers_and_descriptor_decode_to_the_sample(data_plane):
    hello = _tcp_frame(data_plane, "hello")
    assert wire.parse_header(hello[:wire.HDR.size]) == (wire.OP_HELLO, wire.ST_OK, 0, 0, wire.TOKEN_BYTES)
    assert hello[wire.HDR.size:] == g.TCP_TOKEN
    total = sum(r[2] for r in g.TCP_RANGES)
    assert wire.parse_header(_tcp_frame(data_plane, "reply_ok")) == (wire.OP_REPLY, wire.ST_OK, len(g.TCP_RANGES),
                                                                     0, total)
    for name, status in (("reply_rejected", wire.ST_REJECTED), ("reply_bad_frame", wire.ST_BAD_FRAME),
                         ("reply_stale", wire.ST_STALE)):
        assert wire.parse_header(_tcp_frame(data_plane, name)) == (wire.OP_REPLY, status, 0, 0, 0)
    assert tcp._DESC.unpack(_tcp_frame(data_plane, "descriptor")) == (tcp._DESC_MAGIC, g.TCP_PORT)


def test_the_generator_refuses_to_rewrite_a_versions_golden(tmp_path, monkeypatch, capsys):
    """An existing golden that differs is never overwritten without --force; a missing one is written."""
    monkeypatch.setattr(g, "HERE", str(tmp_path))
    today = {"control": {"version": 7, "messages": {"Ping": "aa"}}, "tcp": {"version": 5, "frames": {"x": "bb"}}}
    monkeypatch.setattr(g, "control_golden", lambda: today["control"])
    monkeypatch.setattr(g, "tcp_golden", lambda: today["tcp"])
    assert g.main([]) == 0  # none there: both written
    names = [os.path.basename(g.control_path()), os.path.basename(g.tcp_path())]
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    assert g.main([]) == 0 and "up to date" in capsys.readouterr().out
    today["control"] = {"version": 7, "messages": {"Ping": "cc"}}  # the wire changed, the version did not
    assert g.main([]) == 1
    assert "REFUSED" in capsys.readouterr().err
    with open(g.control_path()) as f:
        assert json.load(f)["messages"]["Ping"] == "aa", "the refused golden was left as it was"
    assert g.main(["--force"]) == 0
    with open(g.control_path()) as f:
        assert json.load(f)["messages"]["Ping"] == "cc"
