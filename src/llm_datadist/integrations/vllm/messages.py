"""The connector's messages between a decode worker and a prefill worker: payloads of llm_datadist notifications.

They travel over the llm_datadist link between the two workers (``llm_datadist.notifications``), which already
authenticates the peer and says who sent each one; this module only defines their schema. A payload is one
schema-version byte followed by a msgpack body of one tagged message (never pickle).
"""
from __future__ import annotations

from typing import List, Union

import msgspec

__all__ = ["SCHEMA_VERSION", "Geometry", "Claim", "ClaimReply", "Release", "PushReady", "PushDone", "Message",
           "MessageError", "encode", "decode"]

# 1: claim, claim reply, release, push ready, push done (the messages of the former control channel, over
#    llm_datadist notifications).
SCHEMA_VERSION = 1


class MessageError(ValueError):
    """A payload that is not a message of this schema version."""


class Geometry(msgspec.Struct, frozen=True):
    """The KV layout both sides must share: regions (tensors) of ``num_blocks`` blocks of ``block_nbytes``."""

    num_regions: int
    block_nbytes: int
    block_size: int  # tokens per block
    layers: int
    heads: int = 1  # KV heads per vLLM block, each a sub-block of block_nbytes (a claim names the prefill's)


class Claim(msgspec.Struct, tag=True, frozen=True):
    """Decode -> prefill: bind the held blocks of ``request_id`` to this link (they stay until released)."""

    seq: int
    request_id: str
    geometry: Geometry
    sharers: int = 1  # decode ranks that claim this request on this prefill rank (it is freed after their releases)


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
    """Decode -> prefill (push mode): write transfer ``transfer_id`` into these blocks of the sender."""

    transfer_id: str
    dst_block_ids: List[int]
    num_tokens: int
    geometry: Geometry
    first_block: int = 0


class PushDone(msgspec.Struct, tag=True, frozen=True):
    """Prefill -> decode (push mode): the push of ``transfer_id`` finished, successfully or not. A successful one
    is sent with the push's last transfer, so the decode receives it after the bytes are in its blocks."""

    transfer_id: str
    ok: bool
    reason: str = ""
    nbytes: int = 0


Message = Union[Claim, ClaimReply, Release, PushReady, PushDone]
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)
_VERSION = bytes([SCHEMA_VERSION])


def encode(message: Message) -> bytes:
    """The notification payload of a message."""
    return _VERSION + _ENCODER.encode(message)


def decode(payload: bytes) -> Message:
    """The message of a notification payload.

    Raises:
        MessageError: another schema version, or not a message.
    """
    if not payload or payload[0] != SCHEMA_VERSION:
        version = payload[0] if payload else None
        raise MessageError(f"connector message schema version {version} is not {SCHEMA_VERSION}; run the same "
                           f"llm_datadist version on prefill and decode")
    try:
        return _DECODER.decode(payload[1:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"malformed connector message: {exc}") from None
