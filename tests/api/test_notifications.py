"""llm_datadist.notifications between two real processes over 127.0.0.1: order, transfer-attached delivery (the
receiver checks every byte when the notification arrives), the queue and size bounds, unlinked clusters, link-down
events; and the extension's argument checks in this process."""
from __future__ import annotations

import threading
from typing import List

import pytest

from llm_datadist import LLMConfig, LLMDataDist, LLMException, LLMRole, LLMStatusCode, notifications
from notify_peer import PeerClient as Peer
from waiting import wait_until

PREFILL, DECODE = 101, 202


@pytest.fixture
def pair():
    """A listening peer (PREFILL) and one that linked to it (DECODE)."""
    server, client = Peer(), Peer()
    try:
        server.port = server.call("init", cluster_id=PREFILL, listen=True)["port"]
        client.call("init", cluster_id=DECODE)
        assert client.call("link", cluster_id=PREFILL, port=server.port)["code"] == "LLM_SUCCESS"
        yield server, client
    finally:
        client.close()
        server.close()


def _await_verdicts(peer: Peer, count: int) -> None:
    """Until the peer's callback has handled ``count`` notifications (queued before the call that sent the last one
    returned; the callback takes them on its own thread)."""
    assert wait_until(lambda: len(peer.call("verdicts")["verdicts"]) >= count)


def _hex(*payloads: bytes) -> List[str]:
    return [p.hex() for p in payloads]


def test_notifications_arrive_in_order_both_ways(pair):
    server, client = pair
    payloads = [f"message {i}".encode() * (i % 7 + 1) for i in range(200)] + [b""]
    assert client.call("send", cluster_id=PREFILL, payloads=_hex(*payloads)) == {"sent": 201, "code": "LLM_SUCCESS"}
    notes = server.call("poll", max_count=1000)["notes"]  # every send returned: all of them are queued
    assert [bytes.fromhex(n[1]) for n in notes] == payloads
    assert {(n[0], n[2]) for n in notes} == {(DECODE, "")}
    assert len({n[3] for n in notes}) == 1  # one link
    assert server.call("queued")["queued"] == [0, 0]
    # the server answers over the link the client made
    assert server.call("send", cluster_id=DECODE, payloads=_hex(b"reply"))["code"] == "LLM_SUCCESS"
    assert [n[:3] for n in client.call("poll")["notes"]] == [[PREFILL, b"reply".hex(), ""]]


def test_push_notification_arrives_after_the_pushed_bytes(pair):
    """Every round rewrites the same destination blocks with new bytes; the receiver checks all of them the moment
    the round's notification arrives, so a notification ahead of its bytes would find the previous round's."""
    server, client = pair
    server.call("watch")
    rounds = 30
    for seed in range(1, rounds + 1):
        src = [seed % 4, 4 + seed % 3]
        assert client.call("push", cluster_id=PREFILL, src_blocks=src, dst_blocks=[8, 9], seed=seed)["code"] == \
            "LLM_SUCCESS"
        _await_verdicts(server, seed)  # the next round writes those blocks again only once this one was checked
    verdicts = server.call("verdicts")["verdicts"]
    assert verdicts == [["push", seed, True, DECODE] for seed in range(1, rounds + 1)]


def test_pull_notification_arrives_after_the_puller_has_the_bytes(pair):
    """The owner overwrites the pulled blocks the moment the pull's notification arrives; the puller checks every
    byte it pulled: a notification ahead of the bytes would have the puller read the overwritten blocks."""
    server, client = pair
    server.call("watch")
    rounds = 30
    for seed in range(1, rounds + 1):
        server.call("fill", blocks=[2, 3, 4], seed=seed)
        reply = client.call("pull", cluster_id=PREFILL, src_blocks=[2, 3, 4], dst_blocks=[10, 12, 11], seed=seed)
        assert reply == {"code": "LLM_SUCCESS", "right": True}
        _await_verdicts(server, seed)
        assert server.call("check", blocks=[2, 3, 4], seed=seed + 1_000_000)["right"]  # the owner reused them
    assert server.call("verdicts")["verdicts"] == [["pull", seed, True, DECODE] for seed in range(1, rounds + 1)]


def test_a_full_queue_refuses_and_the_sender_learns_it(pair):
    server, client = pair
    assert server.call("limit", max_count=3)["queued"] == [0, 0]
    reply = client.call("send", cluster_id=PREFILL, payloads=_hex(b"a", b"b", b"c", b"d", b"e"))
    assert reply == {"sent": 3, "code": "LLM_LINK_BUSY"}  # the 4th was refused, and its sender knows it
    assert server.call("queued")["queued"] == [3, 3]
    assert [bytes.fromhex(n[1]) for n in server.call("poll", max_count=2)["notes"]] == [b"a", b"b"]
    assert client.call("send", cluster_id=PREFILL, payloads=_hex(b"d", b"e", b"f")) == \
        {"sent": 2, "code": "LLM_LINK_BUSY"}
    # nothing lost, nothing twice: exactly what was acknowledged, in order
    assert [bytes.fromhex(n[1]) for n in server.call("poll")["notes"]] == [b"c", b"d", b"e"]


def test_payload_size_bound(pair):
    server, client = pair
    largest = bytes(range(256)) * (notifications.MAX_PAYLOAD_BYTES // 256)
    assert len(largest) == notifications.MAX_PAYLOAD_BYTES
    assert client.call("send", cluster_id=PREFILL, payloads=_hex(largest, largest + b"x")) == \
        {"sent": 1, "code": "LLM_PARAM_INVALID"}
    notes = server.call("poll")["notes"]
    assert [bytes.fromhex(n[1]) for n in notes] == [largest]


def test_unlinked_clusters_and_link_down_events(pair):
    server, client = pair
    assert client.call("send", cluster_id=999, payloads=_hex(b"x")) == {"sent": 0, "code": "LLM_NOT_YET_LINK"}
    assert server.call("send", cluster_id=999, payloads=_hex(b"x")) == {"sent": 0, "code": "LLM_NOT_YET_LINK"}
    assert client.call("unlink", cluster_id=PREFILL, port=server.port)["code"] == "LLM_SUCCESS"
    assert [d[:3] for d in client.call("link_down", timeout_ms=10000)["downs"]] == [[PREFILL, "unlinked", False]]
    assert [d[:3] for d in server.call("link_down", timeout_ms=10000)["downs"]] == [[DECODE, "peer_unlinked", False]]
    assert client.call("send", cluster_id=PREFILL, payloads=_hex(b"x")) == {"sent": 0, "code": "LLM_NOT_YET_LINK"}
    assert server.call("send", cluster_id=DECODE, payloads=_hex(b"x")) == {"sent": 0, "code": "LLM_NOT_YET_LINK"}
    # linked again: a new link, and notifications flow again
    assert client.call("link", cluster_id=PREFILL, port=server.port)["code"] == "LLM_SUCCESS"
    assert client.call("send", cluster_id=PREFILL, payloads=_hex(b"again"))["code"] == "LLM_SUCCESS"
    assert [bytes.fromhex(n[1]) for n in server.call("poll")["notes"]] == [b"again"]


# -- in this process ---------------------------------------------------------------------------------
def _instance(cluster_id: int, listen: bool) -> LLMDataDist:
    options = LLMConfig()
    options.enable_cache_manager = True
    if listen:
        options.listen_ip_info = "127.0.0.1:0"
    datadist = LLMDataDist(LLMRole.PROMPT if listen else LLMRole.DECODER, cluster_id)
    datadist.init(options.generate_options())
    return datadist


def test_argument_checks_and_uninitialized_instance():
    datadist = LLMDataDist(LLMRole.DECODER, 5)
    with pytest.raises(RuntimeError, match="not initialized"):
        notifications.send(datadist, 1, b"x")
    with pytest.raises(TypeError, match="datadist"):
        notifications.poll("not an instance")  # type: ignore[arg-type]
    datadist = _instance(5, listen=False)
    try:
        with pytest.raises(TypeError, match="payload"):
            notifications.send(datadist, 1, "text")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            notifications.send(datadist, -1, b"x")
        with pytest.raises(LLMException) as info:
            notifications.send(datadist, 1, b"x" * (notifications.MAX_PAYLOAD_BYTES + 1))
        assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        with pytest.raises(ValueError, match="timeout_ms"):
            notifications.send(datadist, 1, b"x", timeout_ms=0)
        with pytest.raises(ValueError, match="max_count"):
            notifications.poll(datadist, 0)
        with pytest.raises(TypeError, match="callable"):
            notifications.set_callback(datadist, 3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_bytes"):
            notifications.set_queue_limit(datadist, max_bytes=10)
        assert notifications.poll(datadist) == [] and notifications.poll_link_down(datadist) == []
        assert notifications.listen_address(datadist) is None
    finally:
        datadist.finalize()


def test_self_link_and_callbacks_in_arrival_order():
    datadist = _instance(7, listen=True)
    try:
        from llm_datadist import LLMClusterInfo

        info = LLMClusterInfo()
        info.remote_cluster_id = 7
        info.append_remote_ip_info("127.0.0.1", notifications.listen_address(datadist)[1])
        assert datadist.link_clusters([info], 5000)[1] == [LLMStatusCode.LLM_SUCCESS]
        for i in range(5):
            notifications.send(datadist, 7, bytes([i]))
        seen: List[object] = []
        done = threading.Event()

        def on_note(note):
            seen.append(note.payload)

        def on_down(down):
            seen.append(down)
            done.set()

        notifications.on_link_down(datadist, on_down)
        notifications.set_callback(datadist, on_note)  # the queued ones first, then new ones, then the link's end
        notifications.send(datadist, 7, b"last")
        assert datadist.unlink_clusters([info], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        assert done.wait(10)
        assert seen[:6] == [bytes([i]) for i in range(5)] + [b"last"]
        assert all(isinstance(event, notifications.LinkDown) for event in seen[6:])
        assert {(event.cluster_id, event.linked) for event in seen[6:]} == {(7, False)}
    finally:
        datadist.finalize()
