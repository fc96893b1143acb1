"""The connector's messages between a decode worker and a prefill worker: payloads of llm_datadist notifications.

They travel over the llm_datadist link between the two workers (``llm_datadist.notifications``), which already
authenticates the peer and says who sent each one; this module only defines their schema. A payload is one
schema-version byte followed by a msgpack body of one tagged message (never pickle).

A payload whose first byte is 0 is a refusal that every version understands: ``0`` then UTF-8 JSON
``{"protocol": <the refuser's schema version>, "reason": <text>}``. A worker sends it back for a message of a schema
version it does not speak, so the sender fails its wait with both versions named instead of timing out.
"""
from __future__ import annotations

from typing import List, Optional, Union

import msgspec

__all__ = ["SCHEMA_VERSION", "Geometry", "Fingerprint", "Hello", "HelloReply", "Claim", "ClaimReply", "Release",
           "Renew", "PushReady", "PushDone", "Message", "Refusal", "MessageError", "encode", "decode",
           "encode_refusal"]

# 1: claim, claim reply, release, push ready, push done (the messages of the former control channel, over
#    llm_datadist notifications).
# 2: hello / hello reply (the compatibility fingerprint at a decode's first contact with a prefill), renew (the
#    decode's lease heartbeat), and the version-neutral refusal (payload version 0).
# 3: block ids of several KV cache groups (hybrid models): claim replies and push hand-offs carry group_sizes.
SCHEMA_VERSION = 3
REFUSAL_VERSION = 0


class MessageError(ValueError):
    """A payload that is not a message of this schema version."""


class Geometry(msgspec.Struct, frozen=True):
    """The KV layout both sides must share: regions (tensors) of ``num_blocks`` blocks of ``block_nbytes``."""

    num_regions: int
    block_nbytes: int
    block_size: int  # tokens per block
    layers: int
    heads: int = 1  # KV heads per vLLM block, each a sub-block of block_nbytes (a claim names the prefill's)


class Fingerprint(msgspec.Struct, frozen=True):
    """What a prefill and a decode must agree on before any KV moves between them (``compat.mismatches`` compares
    every field but ``tp_size``). Only facts of the model and the cache format: per-rank facts (KV heads of a rank,
    block bytes) legitimately differ between tensor-parallel sizes and are checked per transfer (``Geometry``)."""

    model: str  # the served model name (default: the model path or name given to vLLM)
    model_config: str  # a hash of the model's configuration (architecture and sizes), paths and versions left out
    dtype: str  # the model's dtype
    kv_cache_dtype: str  # the KV cache's dtype ("auto" resolved to the model's dtype)
    block_size: int  # tokens per block
    layers: int  # layers with a KV cache
    kv_heads: int  # the model's KV heads (all ranks together; an MLA latent counts as one)
    head_size: int
    kv_cache_layout: str  # vLLM's resolved KV cache layout (e.g. LBHNC)
    kv_cache_groups: str  # the KV cache groups: kind, block size, window, layers of each
    vllm_version: str  # vLLM's major.minor release
    protocol: int  # the connector's message schema version
    tp_size: int = 1  # information only: prefill and decode may have different tensor-parallel sizes


class Hello(msgspec.Struct, tag=True, frozen=True):
    """Decode -> prefill, once per link before anything else: the decode's fingerprint."""

    seq: int
    fingerprint: Fingerprint


class HelloReply(msgspec.Struct, tag=True, frozen=True):
    """Prefill -> decode: the prefill's fingerprint and default lease, and why it refuses the decode ("" if not)."""

    seq: int
    fingerprint: Optional[Fingerprint]  # None: a prefill that checks nothing (a test stand-in)
    lease_s: float
    reason: str = ""


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
    block_ids: List[int] = []  # every KV cache group's block table, one after the other (kv_groups)
    reason: str = ""
    group_sizes: List[int] = []  # block ids of each KV cache group (empty: one group)


class Release(msgspec.Struct, tag=True, frozen=True):
    """Decode -> prefill: the blocks of these requests may be freed (pulled, or no longer wanted)."""

    request_ids: List[str]


class Renew(msgspec.Struct, tag=True, frozen=True):
    """Decode -> prefill, every renewal interval: keep holding these requests (pull: the prefill's request ids;
    push: the proxy's transfer ids) for another lease; the decode still wants them (queued or loading)."""

    request_ids: List[str] = []
    transfer_ids: List[str] = []


class PushReady(msgspec.Struct, tag=True, frozen=True):
    """Decode -> prefill (push mode): write transfer ``transfer_id`` into these blocks of the sender."""

    transfer_id: str
    dst_block_ids: List[int]
    num_tokens: int
    geometry: Geometry
    first_block: int = 0
    group_sizes: List[int] = []  # dst_block_ids of each KV cache group (empty: one group)


class PushDone(msgspec.Struct, tag=True, frozen=True):
    """Prefill -> decode (push mode): the push of ``transfer_id`` finished, successfully or not. A successful one
    is sent with the push's last transfer, so the decode receives it after the bytes are in its blocks."""

    transfer_id: str
    ok: bool
    reason: str = ""
    nbytes: int = 0


class Refusal(msgspec.Struct, frozen=True):
    """A peer refused a message it could not read (payload version 0, the same in every schema version)."""

    protocol: int  # the refuser's schema version
    reason: str


Message = Union[Hello, HelloReply, Claim, ClaimReply, Release, Renew, PushReady, PushDone]
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)
_VERSION = bytes([SCHEMA_VERSION])
_REFUSAL_DECODER = msgspec.json.Decoder(Refusal)


def encode(message: Message) -> bytes:
    """The notification payload of a message."""
    return _VERSION + _ENCODER.encode(message)


def encode_refusal(reason: str) -> bytes:
    """The payload of a refusal (readable by every schema version)."""
    return bytes([REFUSAL_VERSION]) + msgspec.json.encode(Refusal(SCHEMA_VERSION, reason[:4000]))


def decode(payload: bytes) -> Union[Message, Refusal]:
    """The message (or refusal) of a notification payload.

    Raises:
        MessageError: another schema version, or not a message.
    """
    if payload and payload[0] == REFUSAL_VERSION:
        try:
            return _REFUSAL_DECODER.decode(payload[1:])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MessageError(f"malformed connector refusal: {exc}") from None
    if not payload or payload[0] != SCHEMA_VERSION:
        version = payload[0] if payload else None
        raise MessageError(f"connector message schema version {version} is not {SCHEMA_VERSION}; run the same "
                           f"llm_datadist version on prefill and decode")
    try:
        return _DECODER.decode(payload[1:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"malformed connector message: {exc}") from None

