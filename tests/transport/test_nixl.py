"""What only the nixl transport has: its asynchronous form, requests freed after a timeout, ops cut at regions."""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from conftest import Setup
from peer_server import pattern
from llm_datadist._transport import unavailable_reason
from llm_datadist._transport.base import CopyPlan, RemoteRegion, RemoteRejected, TransferTimeout
from llm_datadist._transport.nixl_ops import Regions, rows
from subsystems import skip, skip_if_missing

REASON = unavailable_reason("nixl")
needs_nixl = skip_if_missing("nixl", REASON)


@pytest.fixture
def pair():
    if REASON:
        skip("nixl", str(REASON))
    setup = Setup("nixl")
    yield setup
    setup.close()


@needs_nixl
def test_start_returns_a_pending_transfer_that_wait_completes(pair):
    bs, n = 16384, 512
    rng = np.random.default_rng(4)
    local, remote = rng.permutation(n) * bs, rng.permutation(pair.nbytes // bs)[:n] * bs
    pair.local[:] = 0
    pending = pair.transport.start(pair.channel, pair.plan(local, remote, np.full(n, bs)), pair.deadline(), False)
    pending.wait(pair.deadline())
    assert pending.poll()
    got = pair.local[:n * bs].reshape(n, bs)[local // bs]
    assert np.array_equal(got, pair.expected().reshape(-1, bs)[remote // bs])


@needs_nixl
def test_a_timed_out_request_is_freed_once_the_peer_runs_again(pair):
    plan = pair.plan([0], [0], [8 << 20])
    pair.peer.signal(signal.SIGSTOP)
    try:
        with pytest.raises(TransferTimeout):
            pair.transport.read(pair.channel, plan, time.monotonic() + 0.3)
    finally:
        pair.peer.signal(signal.SIGCONT)
    pair.local[:] = 0
    pair.transport.read(pair.channel, plan, pair.deadline())  # the same channel works again
    assert np.array_equal(pair.local[:8 << 20], pair.expected()[:8 << 20])
    deadline = time.monotonic() + 10
    while pair.transport.agent.pending and time.monotonic() < deadline:
        pair.transport.read(pair.channel, pair.plan([0], [0], [16]), pair.deadline())  # each transfer reaps
        time.sleep(0.05)
    assert pair.transport.agent.pending == 0


@needs_nixl
def test_memory_registered_again_in_other_bounds_is_read_through_the_new_registration(pair):
    """The peer releases a region and registers its memory again, first as a part, then whole: NIXL must not be
    left with the overlapping earlier registrations (it refuses transfers over them), so the peer is reloaded."""
    seg = pair.add(4 << 20)
    base, seed = seg["addr"], seg["seed"]
    expected = pattern(4 << 20, seed)
    parts = [(200 << 10, 256 << 10), (600 << 10, 1 << 20), (0, 4 << 20)]  # the last overlaps the ones before
    for offset, nbytes in parts:
        info = pair.peer.command("recut", str(len(pair.regions) - 1), str(offset), str(nbytes))
        pair.regions[-1] = RemoteRegion(info["addr"], info["nbytes"], "host", info["descriptor"])
        pair.transport.learn(pair.channel, pair.regions)
        pieces = np.arange(0, nbytes - (nbytes % 65536), 65536, dtype=np.uint64)
        pair.local[:] = 0
        plan = pair.plan(pieces, pieces + np.uint64(offset), np.full(len(pieces), 65536), base=base)
        pair.transport.read(pair.channel, plan, pair.deadline())
        assert np.array_equal(pair.local[:len(pieces) * 65536], expected[offset:offset + len(pieces) * 65536])
    record = pair.transport._peers[pair.channel.agent]
    assert len(record.loaded) == len(pair.regions)  # nothing left of the released registrations


def _plan(local, remote, sizes) -> CopyPlan:
    return CopyPlan(np.array(local), np.array(remote), np.array(sizes))


def test_ops_over_neighbouring_regions_are_cut_at_the_boundary():
    local, remote = Regions([(10_000, 4096)]), Regions([(1000, 1000), (2000, 1000)])
    lrows, rrows = rows(_plan([10_000, 12_000], [1500, 2500], [1000, 0]), local, remote)
    assert lrows[:, :2].tolist() == [[10_000, 500], [10_500, 500]]  # the zero-length op is dropped
    assert rrows[:, :2].tolist() == [[1500, 500], [2000, 500]]


def test_ops_outside_registered_memory_are_refused_on_either_side():
    local, remote = Regions([(10_000, 4096)]), Regions([(1000, 1000), (2500, 1000)])
    with pytest.raises(RemoteRejected, match="remote range"):
        rows(_plan([10_000], [1500], [1000]), local, remote)  # a gap between the peer's regions
    with pytest.raises(RemoteRejected, match="local range"):
        rows(_plan([14_000], [1000], [200]), local, remote)
    with pytest.raises(RemoteRejected, match="impossible"):
        rows(_plan([0], [1000], [10]), local, remote)
