"""Write grants are bounded: none empty or repeated, at most MAX_GRANTS_PER_LINK per link, all freed at close.

A raw client links by hand and sends ``WriteGrant`` requests a well-behaved pusher never would. Each refusal is
checked on the wire (the exact status code), each has its positive control (a valid grant is granted, a released
one makes room), and the owner's truth is read back: a cache a grant holds cannot be released (LLM_TIMEOUT after
``sync_kv_timeout``), one whose grants ended with the link can.
"""
from __future__ import annotations

from llm_datadist._engine import protocol as proto
from llm_datadist._engine.link_manager import MAX_GRANTS_PER_LINK
from llm_datadist.status import LLMStatusCode
from tests.reliability import wire
from tests.reliability.procs import rss_kib, server

P = 71
NT, NB, BB = 2, 4, 256
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID


def _owner(spawn):
    """An owner whose three caches take writes (registered remote_accessible=True), with a short timeout."""
    peer, port = server(spawn, P, config={"sync_kv_timeout": 500})
    for model, name in enumerate(("a", "b", "c")):
        peer.call("blocks", name=name, num_tensors=NT, num_blocks=NB, block_bytes=BB, model_id=model,
                  remote_accessible=True)
    return peer, port


def _refused(reply, code=PARAM_INVALID) -> bool:
    return isinstance(reply, proto.Error) and reply.code == code


def test_empty_repeated_and_excess_grants_are_refused(spawn, figures):
    peer, port = _owner(spawn)
    link = wire.RawLink(port, 701)
    a, c = wire.guard_of(link.blocks_view(P, 0)), wire.guard_of(link.blocks_view(P, 2))
    assert _refused(link.call(proto.WriteGrant(guards=[])))
    assert _refused(link.call(proto.WriteGrant(guards=a * 2)))
    assert _refused(link.call(proto.WriteGrant(guards=a + a + c)))
    first = link.call(proto.WriteGrant(guards=c))  # positive control: a valid grant
    assert isinstance(first, proto.Granted), first
    granted = [first.grant_id]
    while len(granted) < MAX_GRANTS_PER_LINK:
        reply = link.call(proto.WriteGrant(guards=a))
        assert isinstance(reply, proto.Granted), (len(granted), reply)
        granted.append(reply.grant_id)
    assert len(set(granted)) == MAX_GRANTS_PER_LINK
    before = rss_kib(peer.pid)
    for _ in range(2000):  # what a hostile peer keeps sending once it hit the cap
        assert _refused(link.call(proto.WriteGrant(guards=a)))
    figures.add("owner RSS growth over 2,000 refused grants at the cap", rss_kib(peer.pid) - before, "KiB")
    link.send(wire.frame(proto.WriteRelease(grant_id=granted.pop())))  # a notification, no reply
    assert isinstance(link.call(proto.WriteGrant(guards=a)), proto.Granted)  # the released one made room
    # the owner's truth: a held cache cannot be released; cache b, never granted, can (control)
    assert peer.try_call("release", name="a")["code"] == LLMStatusCode.LLM_TIMEOUT
    assert peer.call("release", name="b")["ok"]
    link.close()
    # every grant ended with the link: cache c, held until now, is released at once
    assert peer.call("release", name="c")["ok"]


def test_grants_of_an_unlinked_peer_are_freed(spawn):
    peer, port = _owner(spawn)
    link = wire.RawLink(port, 702)
    b = wire.guard_of(link.blocks_view(P, 1))
    for _ in range(10):
        assert isinstance(link.call(proto.WriteGrant(guards=b)), proto.Granted)
    link.unlink()  # the orderly way: Unlink -> Ack, then close
    assert peer.call("release", name="b")["ok"]
