"""Link lifecycles across real processes: orderly and forced unlinks, crashes, several comm domains, self links,
and a client that starts before its server."""
from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

from llm_datadist import LLMStatusCode
from tests.integration.conftest import free_port
from tests.integration.peer_proc import pattern

S = LLMStatusCode
NT, NB, BB = 4, 8, 4096
SEED_P, SEED_D = 7, 9
A_ID, B_ID = 301, 302


def rank_table() -> str:
    devices = [{"device_id": str(i), "device_ip": "127.0.0.1", "rank_id": str(i)} for i in range(2)]
    return json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                       "server_list": [{"server_id": "127.0.0.1", "device": devices}]})


def blocks_of(peer, name: str) -> list:
    tensors = peer.call("digest", name=name)["tensors"]
    return [np.frombuffer(bytes.fromhex(t), np.uint8).reshape(NB, BB) for t in tensors]


def expected(seed: int) -> list:
    return [pattern(seed, t, NB * BB).reshape(NB, BB) for t in range(NT)]


def start(spawn_peer, cluster_id: int, seed: int, listen_port=None, ra: bool = False, role: int = 1):
    """A peer with a seeded blocks cache "kv" (model 0) and an empty one "dst" (model 1)."""
    config = {"enable_cache_manager": True, "sync_kv_timeout": 2000}
    if listen_port is not None:
        config["listen_ip_info"] = f"127.0.0.1:{listen_port}"
    if ra:
        config["enable_remote_cache_accessible"] = True
    peer = spawn_peer()
    peer.call("init", role=role, cluster_id=cluster_id, config=config)
    peer.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=seed, model_id=0)
    peer.call("register", name="dst", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=None, model_id=1)
    peer.port = listen_port
    return peer


def link_pair(spawn_peer, ra: bool = False):
    """A (server, listening) and B (client) linked by B.link_clusters."""
    port = free_port()
    a = start(spawn_peer, A_ID, SEED_P, port, ra=ra)
    b = start(spawn_peer, B_ID, SEED_D, role=2, ra=ra)
    assert b.call("link_clusters", clusters=[{"cluster_id": A_ID, "ip": "127.0.0.1", "port": port}])["code"] == 0
    return a, b


def pull_ok(puller, owner_id: int, src, dst, seed: int) -> None:
    puller.call("pull_blocks", name="dst", cluster_id=owner_id, model_id=0, src_blocks=src, dst_blocks=dst)
    got = blocks_of(puller, "dst")
    for t in range(NT):
        for s, d in zip(src, dst):
            assert np.array_equal(got[t][d], expected(seed)[t][s]), (t, s, d)


def pull_code(puller, owner_id: int) -> int:
    reply = puller.try_call("pull_blocks", name="dst", cluster_id=owner_id, model_id=0, src_blocks=[0],
                            dst_blocks=[0])
    return 0 if reply.get("ok") else reply["code"]


@pytest.mark.parametrize("round_", range(5))
def test_orderly_unlink_is_complete_on_both_sides_when_it_returns(spawn_peer, round_):
    """The server answers NOT_YET_LINK right after the client's unlink returned (no LINK_FAILED window)."""
    a, b = link_pair(spawn_peer)
    pull_ok(a, B_ID, [1, 2], [3, 4], SEED_D)  # the link is symmetric: the server pulls from the client
    reply = b.call("unlink_clusters", cluster_id=A_ID, ip="127.0.0.1", port=a.port)
    assert reply["code"] == 0
    assert pull_code(a, B_ID) == S.LLM_NOT_YET_LINK
    assert pull_code(b, A_ID) == S.LLM_NOT_YET_LINK
    assert b.call("link_clusters", clusters=[{"cluster_id": A_ID, "ip": "127.0.0.1", "port": a.port}])["code"] == 0
    pull_ok(b, A_ID, [5], [6], SEED_P)


@pytest.mark.parametrize("side", ["client", "server"])
def test_forced_unlink_drops_the_survivors_link_and_relinks(spawn_peer, side):
    """A forced unlink tells nobody; the other side notices the closed connection and drops its link."""
    a, b = link_pair(spawn_peer)
    if side == "client":
        forcer, survivor, survivor_peer_id = b, a, B_ID
        forcer.call("unlink_clusters", cluster_id=A_ID, ip="127.0.0.1", port=a.port, force=True)
    else:
        forcer, survivor, survivor_peer_id = a, b, A_ID
        forcer.call("unlink_clusters", cluster_id=B_ID, ip="127.0.0.1", port=a.port, force=True)
    # the survivor may see the closed connection a moment later; it must end up NOT_YET_LINK, never succeed
    # with bytes of a dead link, and never hang
    reply = survivor.call("pull_code_after", name="dst", cluster_id=survivor_peer_id, model_id=0, src_blocks=[0],
                          dst_blocks=[0], timeout=5.0)
    assert reply["code"] in (S.LLM_NOT_YET_LINK, S.LLM_LINK_FAILED)
    assert pull_code(survivor, survivor_peer_id) == S.LLM_NOT_YET_LINK
    assert pull_code(forcer, A_ID if forcer is b else B_ID) == S.LLM_NOT_YET_LINK
    assert b.call("link_clusters", clusters=[{"cluster_id": A_ID, "ip": "127.0.0.1", "port": a.port}])["code"] == 0
    pull_ok(b, A_ID, [2], [1], SEED_P)
    pull_ok(a, B_ID, [3], [7], SEED_D)


def test_peer_crash_drops_the_link_on_both_link_styles(spawn_peer):
    a, b = link_pair(spawn_peer)
    name = "crash-" + uuid.uuid4().hex[:8]
    members = [[A_ID, 0], [B_ID, 1]]
    comm_a = a.call("link", comm_name=name, ranks=members, rank_table=rank_table())["comm_id"]
    comm_b = b.call("link", comm_name=name, ranks=members, rank_table=rank_table())["comm_id"]
    assert a.call("wait_comm", comm_id=comm_a)["status"] == 0
    assert b.call("wait_comm", comm_id=comm_b)["status"] == 0
    b.kill()
    reply = a.call("pull_code_after", name="dst", cluster_id=B_ID, model_id=0, src_blocks=[0], dst_blocks=[0],
                   timeout=5.0)
    assert reply["code"] in (S.LLM_NOT_YET_LINK, S.LLM_LINK_FAILED)
    assert pull_code(a, B_ID) == S.LLM_NOT_YET_LINK  # both the link_clusters and the comm link are gone
    a.call("unlink", comm_id=comm_a)


def test_rank_table_unlink_is_complete_on_both_sides(spawn_peer):
    a = start(spawn_peer, A_ID, SEED_P)
    b = start(spawn_peer, B_ID, SEED_D)
    name = "unlink-" + uuid.uuid4().hex[:8]
    members = [[A_ID, 0], [B_ID, 1]]
    comm_a = a.call("link", comm_name=name, ranks=members, rank_table=rank_table())["comm_id"]
    comm_b = b.call("link", comm_name=name, ranks=members, rank_table=rank_table())["comm_id"]
    assert a.call("wait_comm", comm_id=comm_a)["status"] == 0
    assert b.call("wait_comm", comm_id=comm_b)["status"] == 0
    pull_ok(b, A_ID, [0, 1], [2, 3], SEED_P)
    a.call("unlink", comm_id=comm_a)
    assert pull_code(b, A_ID) == S.LLM_NOT_YET_LINK
    assert pull_code(a, B_ID) == S.LLM_NOT_YET_LINK
    b.call("unlink", comm_id=comm_b)


def test_two_comm_domains_with_the_same_members(spawn_peer):
    """Each domain reaches OK on its own; unlinking one leaves the other carrying transfers."""
    a = start(spawn_peer, A_ID, SEED_P)
    b = start(spawn_peer, B_ID, SEED_D)
    members = [[A_ID, 0], [B_ID, 1]]
    comms = []
    for name in ("link-" + uuid.uuid4().hex[:8], "link2-" + uuid.uuid4().hex[:8]):
        ca = a.call("link", comm_name=name, ranks=members, rank_table=rank_table())["comm_id"]
        cb = b.call("link", comm_name=name, ranks=members, rank_table=rank_table())["comm_id"]
        comms.append((ca, cb))
    for ca, cb in comms:
        assert a.call("wait_comm", comm_id=ca)["status"] == 0
        assert b.call("wait_comm", comm_id=cb)["status"] == 0
    pull_ok(b, A_ID, [1], [1], SEED_P)
    pull_ok(a, B_ID, [2], [2], SEED_D)
    newest_a, newest_b = comms[1]
    a.call("unlink", comm_id=newest_a)
    b.call("unlink", comm_id=newest_b)
    pull_ok(b, A_ID, [3, 4], [5, 6], SEED_P)  # the first domain still works
    pull_ok(a, B_ID, [6], [0], SEED_D)
    first_a, first_b = comms[0]
    a.call("unlink", comm_id=first_a)
    assert pull_code(b, A_ID) == S.LLM_NOT_YET_LINK
    b.call("unlink", comm_id=first_b)


@pytest.mark.parametrize("ra", [False, True])
def test_self_link_pulls_and_pushes_own_caches(spawn_peer, ra):
    port = free_port()
    a = start(spawn_peer, A_ID, SEED_P, port, ra=ra)
    reply = a.call("link_clusters", clusters=[{"cluster_id": A_ID, "ip": "127.0.0.1", "port": port}])
    assert reply["code"] == 0
    pull_ok(a, A_ID, [7, 0, 3], [1, 2, 0], SEED_P)
    if ra:
        a.call("push_blocks", name="kv", cluster_id=A_ID, model_id=1, src_blocks=[4], dst_blocks=[5])
        got = blocks_of(a, "dst")
        assert all(np.array_equal(got[t][5], expected(SEED_P)[t][4]) for t in range(NT))
    reply = a.call("link_clusters", clusters=[{"cluster_id": A_ID, "ip": "127.0.0.1", "port": port}])
    assert reply["code"] == S.LLM_ALREADY_LINK
    assert a.call("unlink_clusters", cluster_id=A_ID, ip="127.0.0.1", port=port)["code"] == 0
    assert pull_code(a, A_ID) == S.LLM_PARAM_INVALID  # no self link any more: own cluster again


def test_client_started_before_its_server_links_when_the_server_comes_up(spawn_peer):
    """link_clusters retries a refused connection within its timeout."""
    port = free_port()
    b = start(spawn_peer, B_ID, SEED_D, role=2)
    b.send("link_clusters", clusters=[{"cluster_id": A_ID, "ip": "127.0.0.1", "port": port}], timeout=8000)
    time.sleep(0.3)  # let the client meet a closed port first (the point of the test, not synchronisation)
    start(spawn_peer, A_ID, SEED_P, port)
    reply = b.recv(timeout=15)
    assert reply["ok"] and reply["code"] == 0, reply
    pull_ok(b, A_ID, [1, 6], [0, 7], SEED_P)


def test_refused_connection_still_fails_within_the_timeout(spawn_peer):
    b = start(spawn_peer, B_ID, SEED_D, role=2)
    started = time.monotonic()
    reply = b.call("link_clusters", clusters=[{"cluster_id": A_ID, "ip": "127.0.0.1", "port": free_port()}],
                   timeout=400)
    assert reply["code"] == S.LLM_LINK_FAILED
    assert time.monotonic() - started < 10  # generous bound: it gives up at its timeout, never hangs


def test_both_sides_link_to_each_other_and_unlink_their_own(spawn_peer):
    """Every endpoint is client and server (the hixl sample): two links; each side's unlink removes its own."""
    port_a, port_b = free_port(), free_port()
    a = start(spawn_peer, A_ID, SEED_P, port_a)
    b = start(spawn_peer, B_ID, SEED_D, port_b, role=2)
    assert b.call("link_clusters", clusters=[{"cluster_id": A_ID, "ip": "127.0.0.1", "port": port_a}])["code"] == 0
    assert a.call("link_clusters", clusters=[{"cluster_id": B_ID, "ip": "127.0.0.1", "port": port_b}])["code"] == 0
    assert a.call("link_clusters", clusters=[{"cluster_id": B_ID, "ip": "127.0.0.1", "port": port_b}])["code"] \
        == S.LLM_ALREADY_LINK
    pull_ok(a, B_ID, [1], [2], SEED_D)
    pull_ok(b, A_ID, [3], [4], SEED_P)
    assert a.call("unlink_clusters", cluster_id=B_ID, ip="127.0.0.1", port=port_b)["code"] == 0
    pull_ok(a, B_ID, [5], [6], SEED_D)  # B's link to A still carries A's pulls
    assert b.call("unlink_clusters", cluster_id=A_ID, ip="127.0.0.1", port=port_a)["code"] == 0
    assert pull_code(a, B_ID) == S.LLM_NOT_YET_LINK
    assert pull_code(b, A_ID) == S.LLM_NOT_YET_LINK
