"""Fixtures for tests across simulated hosts: network namespaces joined by a bridge, one peer process per host.

Every test here is skipped, with the reason, where namespaces cannot be made (no root / CAP_NET_ADMIN, no
``ip`` or ``unshare``); where LLM_DATADIST_REQUIRE names netns, that is a failure instead. Namespaces and
processes are removed after each test, also when it fails or is interrupted; namespaces left by a killed run are
swept at the start of the next one.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import pytest

from llm_datadist.cli.netns import CROSS_HOST_TRANSPORTS, SimulatedHosts, sweep_stale, unavailable_reason
from subsystems import skip
from tests.multihost.peers import HostPeer, config

_swept = []


@pytest.fixture(autouse=True)
def _needs_namespaces():
    reason = unavailable_reason()
    if reason is not None:
        skip("netns", f"simulated hosts unavailable: {reason}")
    if not _swept:
        _swept.append(sweep_stale())


@pytest.fixture(params=list(CROSS_HOST_TRANSPORTS))
def transport(request) -> str:
    """Each cross-host transport in turn (forced on both peers through LLM_DATADIST_TRANSPORT)."""
    from llm_datadist._transport import unavailable_reason as transport_unavailable

    reason = transport_unavailable(request.param)
    if reason and request.param == "nixl":
        skip("nixl", f"nixl is not available: {reason}")
    if reason:
        pytest.skip(f"{request.param} is not available: {reason}")
    return request.param


class Cluster:
    """The simulated hosts of one test and the peer processes started on them."""

    def __init__(self, count: int, transport: Optional[str], log_dir: str) -> None:
        self.hosts = SimulatedHosts(count).start()
        self.transport = transport
        self.log_dir = log_dir
        self.peers: List[HostPeer] = []

    def spawn(self, index: int, env: Optional[Dict[str, str]] = None) -> HostPeer:
        """A peer process on host ``index`` (no instance yet)."""
        environ = {"LLM_DATADIST_TRANSPORT": self.transport} if self.transport else {}
        environ.update(env or {})
        host = self.hosts[index]
        peer = HostPeer(self.hosts, host, os.path.join(self.log_dir, f"host{index}-{len(self.peers)}.log"), environ)
        self.peers.append(peer)
        return peer

    def instance(self, index: int, role: int, cluster_id: int, listen: bool = True,
                 env: Optional[Dict[str, str]] = None, **cfg) -> HostPeer:
        """A peer on host ``index`` with an initialized LLMDataDist (listening on the host's address)."""
        peer = self.spawn(index, env)
        peer.call("init", role=role, cluster_id=cluster_id, config=config(self.hosts[index], listen, **cfg))
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.hosts.close()


@pytest.fixture
def make_cluster(tmp_path) -> Callable[..., Cluster]:
    """``make_cluster(count, transport)``: ``count`` simulated hosts, closed after the test whatever happens."""
    made: List[Cluster] = []

    def make(count: int, transport: Optional[str] = None) -> Cluster:
        made_cluster = Cluster(count, transport, str(tmp_path))
        made.append(made_cluster)
        return made_cluster

    yield make
    for item in made:
        item.close()
