"""Lease renewal: a prefill's short lease does not cut a decode that is queued or loading (it renews the hold), a
dead decode's claims are freed at once (its link goes down), and a decode that stops renewing loses the hold one
lease later. The hold table and the renewer alone first, then two connector workers in processes of their own."""
from __future__ import annotations

import threading
import time
from typing import List, Tuple

import pytest

from llm_datadist.integrations.vllm.holds import HoldTable
from llm_datadist.integrations.vllm.renewal import MIN_INTERVAL_S, Renewer

from vllm_harness import VllmInstance
from waiting import wait_until

LEASE_S = 1.0


# -- the hold table ----------------------------------------------------------------------------------
def test_renewals_and_claims_extend_a_lease():
    table = HoldTable()
    start = time.monotonic()
    table.hold("a", [1], lease_s=1)
    table.hold("b", [2], lease_s=1)
    assert table.expire(start + 0.9) == []
    wait_until(lambda: time.monotonic() > start + 0.5)
    assert table.renew(["a", "unknown"]) == ["a"]  # a lease from now: past start + 1.5
    assert table.expire(start + 1.2) == ["b"]
    wait_until(lambda: time.monotonic() > start + 1.0)
    assert table.claim("a", owner="decode")[0] is not None  # a claim renews too: past start + 2
    assert table.expire(start + 1.7) == []
    assert table.expire(time.monotonic() + 1.001) == ["a"]
    assert [entry[:2] for entry in table.release_log] == [("b", "lease expired"),
                                                         ("a", "lease expired (claimed, not renewed)")]


def test_a_hold_its_owner_ends_itself_does_not_expire():
    table = HoldTable()
    table.hold("p", [1], lease_s=1)
    assert table.claim("p", owner="push", leased=False)[0] is not None  # a running push
    assert table.expire(time.monotonic() + 100) == []
    assert table.release("p", "pushed", owner="push")


# -- the renewer -------------------------------------------------------------------------------------
class _Params:
    def __init__(self, request_id: str, mode: str = "pull") -> None:
        self.request_id, self.mode = request_id, mode


def test_renewer_groups_requests_per_prefill_and_follows_the_shortest_lease():
    sent: List[Tuple[int, List[str], List[str]]] = []
    leases = {("h", 1, 11): 30.0, ("h", 2, 12): 0.6}
    targets = {"r1": [("h", 1, 11)], "r2": [("h", 1, 11), ("h", 2, 12)], "t1": [("h", 2, 12)]}
    renewer = Renewer(1.0, lambda params: targets[params.request_id],
                      lambda endpoint: (endpoint[2], leases[endpoint]),
                      lambda cluster, pulls, pushes: sent.append((cluster, sorted(pulls), pushes)))
    assert renewer.interval_s == 1.0
    renewer.renew_now()
    assert sent == [] and renewer.rounds == 0  # nothing wanted, nothing sent
    renewer.add("local1", _Params("r1"))
    renewer.add("local2", _Params("r2"))
    renewer.add("local3", _Params("t1", "push"))
    renewer.renew_now()
    assert sorted(sent) == [(11, ["r1", "r2"], []), (12, ["r2"], ["t1"])]
    assert renewer.interval_s == pytest.approx(0.2)  # a third of the 0.6 s lease prefill 12 announced
    renewer.remove(["local1", "local2", "local3"])
    assert renewer.wanted() == []
    assert Renewer(0.001, list, tuple, print).interval_s == MIN_INTERVAL_S


def test_renewer_thread_survives_a_prefill_it_can_not_reach():
    sent = threading.Event()

    def peer(endpoint):
        if endpoint[2] == 1:
            raise ConnectionError("connection refused")
        return endpoint[2], 0.0

    renewer = Renewer(0.05, lambda params: [("h", 1, 1), ("h", 2, 2)], peer, lambda *args: sent.set())
    renewer.add("x", _Params("r"))
    renewer.start()
    try:
        assert sent.wait(10)
        assert wait_until(lambda: renewer.rounds >= 3)
    finally:
        renewer.close()


def test_a_request_taken_in_is_renewed_at_once_not_an_interval_later():
    sent: List[List[str]] = []
    renewer = Renewer(600.0, lambda params: [("h", 1, 1)], lambda endpoint: (1, 0.0),
                      lambda cluster, pulls, pushes: sent.append(pulls))
    renewer.start()
    try:
        renewer.add("x", _Params("r"))
        assert wait_until(lambda: sent == [["r"]])  # long before the 600 s interval
    finally:
        renewer.close()


# -- two connector workers, each a process -------------------------------------------------------------
@pytest.fixture(scope="module")
def prefill_rank(vllm_python, tmp_path_factory):
    """A prefill worker with a 1 s lease: (its process, its endpoint)."""
    prefill = VllmInstance(vllm_python, "prefill", str(tmp_path_factory.mktemp("lease")), script="lease_rank.py")
    try:
        yield prefill, prefill.call("start", role="prefill", extra={"lease_s": LEASE_S})["endpoint"]
    finally:
        prefill.close()


@pytest.fixture
def decode_rank(vllm_python, tmp_path):
    """A decode worker with the default renewal interval (1 s: it renews three times per lease once the prefill
    announced its 1 s lease)."""
    decode = VllmInstance(vllm_python, "decode", str(tmp_path), script="lease_rank.py")
    try:
        decode.call("start", role="decode", extra={})
        yield decode
    finally:
        decode.close()


def test_a_queued_decode_keeps_the_hold_over_several_leases_and_pulls_correct_bytes(prefill_rank, decode_rank):
    (prefill, endpoint), decode = prefill_rank, decode_rank
    prefill.call("hold", request_id="req", block_ids=[5, 9, 2], num_tokens=70)
    state = decode.call("want", request_id="dec", endpoint=endpoint, remote_request_id="req")
    assert state["wanted"] == ["dec"]
    began = time.monotonic()

    def held_long_enough() -> bool:  # the prefill steps (and expires what is due) while the decode is queued
        assert "req" in prefill.call("tick")["held"], "the hold expired while its decode renewed it"
        return time.monotonic() - began > 4 * LEASE_S and decode.call("state")["renewal_rounds"] >= 6

    assert wait_until(held_long_enough, timeout_s=60, interval_s=0.05)
    assert decode.call("state")["renewal_interval_s"] == pytest.approx(LEASE_S / 3)
    loaded = decode.call("load", request_id="dec", endpoint=endpoint, remote_request_id="req",
                         remote_block_ids=[5, 9, 2], local_block_ids=[1, 7, 3], num_tokens=70)
    assert loaded["failed_blocks"] == [] and loaded["wanted"] == []  # the load ended: no more renewals
    assert decode.call("verify", pairs=[[5, 1], [9, 7], [2, 3]])["wrong"] == []
    assert wait_until(lambda: prefill.call("tick")["release_log"][-1] == ["req", "released by the decode"])


def test_a_dead_decode_is_let_go_at_once(prefill_rank, decode_rank):
    """Renewed, then claimed: only the link going down can end the hold before the renewals stop plus a lease."""
    (prefill, endpoint), decode = prefill_rank, decode_rank
    prefill.call("hold", request_id="dies", block_ids=[2], num_tokens=10)
    decode.call("want", request_id="dec", endpoint=endpoint, remote_request_id="dies")
    assert decode.call("claim", endpoint=endpoint, remote_request_id="dies")["claimed"]
    decode.kill()
    assert wait_until(lambda: "dies" not in prefill.call("tick")["held"], timeout_s=30)
    assert prefill.call("state")["release_log"][-1] == ["dies", "decode disconnected"]


def test_a_decode_that_stops_renewing_loses_the_hold_after_the_lease(prefill_rank, decode_rank):
    (prefill, endpoint), decode = prefill_rank, decode_rank
    prefill.call("hold", request_id="hung", block_ids=[1], num_tokens=10)
    decode.call("want", request_id="dec", endpoint=endpoint, remote_request_id="hung")
    assert decode.call("claim", endpoint=endpoint, remote_request_id="hung")["claimed"]
    decode.call("stop_renewing")  # the decode hangs: its link stays up, nothing renews the claimed hold
    assert wait_until(lambda: "hung" not in prefill.call("tick")["held"], timeout_s=30)
    assert prefill.call("state")["release_log"][-1] == ["hung", "lease expired (claimed, not renewed)"]
