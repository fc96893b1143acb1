"""CUDA IPC transport placeholder: detects CUDA lazily; same-node device copies are not wired up yet."""
from __future__ import annotations

import importlib
import importlib.util

from llm_datadist._transport.base import CUDA, Channel, ConnectFailed, CopyPlan, PeerInfo, Transport


def _cuda_device_count() -> int:
    """CUDA devices visible through cuda-python or torch, importing them only here; 0 on any failure."""
    try:
        if importlib.util.find_spec("cuda") is not None:
            cudart = importlib.import_module("cuda.cudart")
            err, count = cudart.cudaGetDeviceCount()
            return int(count) if int(err) == 0 else 0
        if importlib.util.find_spec("torch") is not None:
            torch = importlib.import_module("torch")
            return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - detection never raises
        return 0
    return 0


class CudaIpcTransport(Transport):
    """Would map peers' device allocations with cudaIpcOpenMemHandle; only detection exists today."""

    name = "cuda_ipc"
    priority = 80
    memory_kinds = frozenset({CUDA})
    same_host_only = True

    @classmethod
    def available(cls) -> bool:
        """True when cuda-python or torch imports and sees a CUDA device. Never raises."""
        return _cuda_device_count() > 0

    def connect(self, peer: PeerInfo, deadline: float) -> Channel:
        """Not implemented yet.

        Raises:
            ConnectFailed: always; the engine falls back to another transport.
        """
        raise ConnectFailed("the cuda_ipc transport is not implemented yet")

    def read(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Not implemented (no channel can exist).

        Raises:
            ConnectFailed: always.
        """
        raise ConnectFailed("the cuda_ipc transport is not implemented yet")

    def write(self, channel: Channel, plan: CopyPlan, deadline: float) -> None:
        """Not implemented (no channel can exist).

        Raises:
            ConnectFailed: always.
        """
        raise ConnectFailed("the cuda_ipc transport is not implemented yet")
