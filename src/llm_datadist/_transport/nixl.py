"""NIXL transport placeholder: available only when the nixl package imports; links are not wired up yet."""
from __future__ import annotations

import importlib.util

from llm_datadist._transport.base import CUDA, HOST, Channel, ConnectFailed, CopyPlan, PeerInfo, Transport


class NixlTransport(Transport):
    """Would wrap ``nixl._api.nixl_agent`` (UCX: RDMA, CMA); here only detection is implemented."""

    name = "nixl"
    priority = 40
    memory_kinds = frozenset({HOST, CUDA})

    @classmethod
    def available(cls) -> bool:
        """True when the ``nixl`` package can be imported (it is not imported here). Never raises."""
        try:
            return importlib.util.find_spec("nixl") is not None
        except (ImportError, ValueError):
            return False

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Not implemented yet.

        Raises:
            ConnectFailed: always; the engine falls back to another transport.
        """
        raise ConnectFailed("the nixl transport is not implemented yet")

    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Not implemented (no channel can exist).

        Raises:
            ConnectFailed: always.
        """
        raise ConnectFailed("the nixl transport is not implemented yet")

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Not implemented (no channel can exist).

        Raises:
            ConnectFailed: always.
        """
        raise ConnectFailed("the nixl transport is not implemented yet")
