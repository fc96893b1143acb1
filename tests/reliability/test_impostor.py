"""No impostor at a listening decode: a handshake that claims a linked cluster's id is refused while that link lives.

A decode that listens (for pushes) and has linked a prefill must never let a stranger who says "I am that
prefill" in, whichever way the real link was made (the decode dialed it, the prefill dialed the decode, a
rank-table domain), with or without a shared secret. The attacks are raw handshakes (``wire.RawLink``) and a
real second instance that claims the prefill's id; the checks are the refusal code on the wire and the bytes the
decode's pulls return (the real prefill's generation, every block). Each refusal has its positive control: the
same handshake under an id nobody holds is accepted, and the real prefill's own second link (a mutual link)
is accepted because it vouches for its dial over its existing link.
"""
from __future__ import annotations

import json
import uuid

import pytest

from llm_datadist import BlocksCacheKey, LLMRole, LLMStatusCode
from tests.reliability import kv, local, wire
from tests.reliability.procs import server, wait_for

P = 61  # the real prefill
D = 62  # the listening decode (this process)
NT, NB, BB = 2, 8, 512
REAL_GEN, FAKE_GEN = 1, 7
SECRET = "impostor-test-secret-3b9e"
ALREADY = LLMStatusCode.LLM_ALREADY_LINK


def _prefill(spawn, secret: str = "", gen: int = REAL_GEN, cluster_id: int = P):
    config = {"link_secret": secret} if secret else {}
    peer, port = server(spawn, cluster_id, config=config)
    peer.call("blocks", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, gen=gen)
    return peer, port


def _decode(make_dd, secret: str = ""):
    attrs = {"link_secret": secret} if secret else {}
    dd = make_dd(LLMRole.DECODER, D, listen=True, **attrs)
    return dd, make_dd.port(dd)


def _pulled_generation(dd, cluster_id: int = P):
    """Pull every block of the prefill's cache into a fresh sentinel-filled cache; the one generation it holds."""
    cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB)
    try:
        blocks = list(range(NB))
        dd.cache_manager.pull_blocks(BlocksCacheKey(cluster_id, 0), cache, blocks, blocks)
        return kv.one_generation(arrays, blocks, blocks)
    finally:
        dd.cache_manager.unregister_cache(cache.cache_id)


def _raw_claim(port: int, cluster_id: int, secret: str = ""):
    """A raw handshake claiming ``cluster_id``: the HelloAck code (0: admitted; the link is closed again)."""
    try:
        link = wire.RawLink(port, cluster_id, secret=secret.encode() if secret else None)
    except wire.Refused as refused:
        return refused.ack.code
    link.close()
    return 0


@pytest.mark.parametrize("secret", ["", SECRET], ids=["no-secret", "secret"])
def test_a_stranger_cannot_claim_the_id_of_a_prefill_the_decode_dialed(spawn, make_dd, secret):
    prefill, p_port = _prefill(spawn, secret)
    dd, d_port = _decode(make_dd, secret)
    local.link(dd, P, p_port)
    # the attack over a raw socket (with the secret too: an insider still cannot take another member's identity)
    assert _raw_claim(d_port, P, secret) == ALREADY
    # a real instance that claims the prefill's id and holds other bytes
    impostor, _ = _prefill(spawn, secret, gen=FAKE_GEN)
    assert impostor.call("link_clusters", cluster_id=D, port=d_port)["code"] == ALREADY
    assert _pulled_generation(dd) == REAL_GEN
    # positive controls: a stranger under an id nobody holds is let in, and so is the real prefill's own mutual link
    assert _raw_claim(d_port, 4242, secret) == 0
    assert prefill.call("link_clusters", cluster_id=D, port=d_port)["code"] == 0
    assert _pulled_generation(dd) == REAL_GEN
    # once the prefill's links are gone, its id is free again
    assert prefill.call("unlink_clusters", cluster_id=D, port=d_port)["code"] == 0
    local.unlink(dd, P, p_port)
    assert _raw_claim(d_port, P, secret) == 0


def test_a_stranger_cannot_claim_the_id_of_a_prefill_that_dialed_the_decode(spawn, make_dd):
    prefill, _p_port = _prefill(spawn)
    dd, d_port = _decode(make_dd)
    assert prefill.call("link_clusters", cluster_id=D, port=d_port)["code"] == 0
    assert wait_for(lambda: _has_link(dd, P), 5.0)
    assert _raw_claim(d_port, P) == ALREADY
    impostor, _ = _prefill(spawn, gen=FAKE_GEN)
    assert impostor.call("link_clusters", cluster_id=D, port=d_port)["code"] == ALREADY
    assert _pulled_generation(dd) == REAL_GEN  # the decode pulls over the link the prefill made
    assert _raw_claim(d_port, 4243) == 0  # positive control
    assert prefill.call("unlink_clusters", cluster_id=D, port=d_port)["code"] == 0
    assert _raw_claim(d_port, P) == 0


def _rank_table() -> str:
    devices = [{"device_id": str(i), "device_ip": "127.0.0.1", "rank_id": str(i)} for i in range(2)]
    return json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                       "server_list": [{"server_id": "127.0.0.1", "device": devices}]})


def test_a_stranger_cannot_claim_the_id_of_a_rank_table_member(spawn, make_dd):
    prefill, _p_port = _prefill(spawn)
    dd, d_port = _decode(make_dd)
    name = "impostor-" + uuid.uuid4().hex[:8]
    ranks = [[D, 0], [P, 1]]  # the prefill has the higher rank: it dials the decode's comm listener
    comm_p = prefill.call("comm_link", comm_name=name, ranks=ranks, rank_table=_rank_table())["comm_id"]
    comm_d = dd.link(name, {D: 0, P: 1}, _rank_table())
    assert wait_for(lambda: dd.query_register_mem_status(comm_d).value == 0, 20.0)
    assert wait_for(lambda: prefill.call("comm_status", comm_id=comm_p)["status"] == 0, 20.0)
    assert _raw_claim(d_port, P) == ALREADY  # on the decode's link_clusters listener
    impostor, _ = _prefill(spawn, gen=FAKE_GEN)
    assert impostor.call("link_clusters", cluster_id=D, port=d_port)["code"] == ALREADY
    assert _pulled_generation(dd) == REAL_GEN
    assert _raw_claim(d_port, 4244) == 0  # positive control
    dd.unlink(comm_d)


def test_transfers_take_the_link_the_caller_made_even_when_a_claim_got_in(spawn, make_dd):
    """A claim is let in when the existing link does not answer (a stopped or dead peer, as a restarted prefill
    needs); even then the decode's transfers keep to the link it dialed, never the one a peer pushed in."""
    prefill, p_port = _prefill(spawn)
    dd, d_port = _decode(make_dd)
    local.link(dd, P, p_port)
    assert _pulled_generation(dd) == REAL_GEN
    impostor, _ = _prefill(spawn, gen=FAKE_GEN)
    prefill.stop()
    try:
        assert impostor.call("link_clusters", cluster_id=D, port=d_port, timeout_ms=10000)["code"] == 0
    finally:
        prefill.cont()
    assert _pulled_generation(dd) == REAL_GEN
    local.unlink(dd, P, p_port)
    assert impostor.call("unlink_clusters", cluster_id=D, port=d_port)["code"] == 0


def _has_link(dd, cluster_id: int) -> bool:
    return dd._engine.links.has_link_to(cluster_id)
