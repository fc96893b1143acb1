"""Where NIXL can run and how UCX is set up for it: availability, RDMA/GPU detection, UCX defaults."""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import Dict, List

BACKEND_PACKAGES = ("nixl_cu13", "nixl_cu12", "nixl_rocm")  # the wheels that carry NIXL's bindings and UCX
RDMA_CLASS_DIR = "/sys/class/infiniband"  # every RDMA device (InfiniBand, RoCE, iWARP, EFA) shows up here
NVIDIA_PROC = "/proc/driver/nvidia/gpus"

# Without RDMA, UCX over TCP between hosts; "self" serves a link of an instance to itself. UCX loads only the
# CMA module then: with Debian's libibverbs installed, the InfiniBand modules make UCX crash at process exit.
TCP_TLS = "tcp,self"
GPU_TLS = "tcp,self,cuda_copy,cuda_ipc"
NO_RDMA_MODULES = "cma"
GPU_MODULES = "cma,cuda"


def rdma_devices() -> List[str]:
    """Names of the RDMA devices of this machine (mlx5_0, rxe0, efa0...), [] when there are none."""
    try:
        return sorted(os.listdir(RDMA_CLASS_DIR))
    except OSError:
        return []


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible (its driver lists one), without loading CUDA."""
    try:
        return bool(os.listdir(NVIDIA_PROC))
    except OSError:
        return False


def preferred_reason() -> str:
    """Why auto mode ranks nixl above our tcp on cross-host links ("" when it does not)."""
    devices = rdma_devices()
    if devices:
        return f"UCX can use RDMA devices {', '.join(devices)}"
    if gpu_present():
        return "a GPU is present (device memory moves over UCX)"
    return ""


NOT_PREFERRED = "no RDMA device or GPU here, and UCX over TCP is slower than our tcp"


def rank_reason() -> str:
    """One line on where nixl ranks in auto mode and why (for the log line of each link)."""
    reason = preferred_reason()
    if reason:
        return f"nixl is preferred over tcp across hosts: {reason}"
    return f"tcp is preferred over nixl across hosts: {NOT_PREFERRED}"


def ucx_defaults() -> Dict[str, str]:
    """The UCX variables this library sets when the user has not: nothing where RDMA devices exist."""
    if rdma_devices():
        return {"UCX_LOG_LEVEL": "error"}
    gpu = gpu_present()
    return {"UCX_TLS": GPU_TLS if gpu else TCP_TLS, "UCX_MODULES": GPU_MODULES if gpu else NO_RDMA_MODULES,
            "UCX_LOG_LEVEL": "error"}


def apply_ucx_defaults() -> Dict[str, str]:
    """Set :func:`ucx_defaults` in the environment where unset (before UCX starts); returns what UCX gets."""
    for key, value in ucx_defaults().items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("NIXL_LOG_LEVEL", "ERROR")
    return {k: os.environ[k] for k in ("UCX_TLS", "UCX_MODULES", "UCX_NET_DEVICES") if k in os.environ}


def unavailable_reason() -> str:
    """Why NIXL cannot be used here ("" when its package and UCX plugin are installed). Never raises.

    A cheap check (no import of NIXL): the engine asks every transport at init.
    """
    try:
        if sys.version_info < (3, 10):
            return "NIXL needs Python 3.10 or newer"
        if importlib.util.find_spec("nixl") is None:
            return "the nixl package is not installed (pip install 'llm-datadist[nixl]')"
        for name in BACKEND_PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.origin:
                continue
            if _ucx_plugin(os.path.dirname(spec.origin)):
                return ""
            return f"{name} has no UCX plugin"
        return f"nixl is installed without a backend package ({', '.join(BACKEND_PACKAGES)})"
    except Exception as exc:  # noqa: BLE001 - never raises
        return f"nixl cannot be inspected: {exc}"


def _ucx_plugin(package_dir: str) -> bool:
    patterns = (os.path.join(package_dir + ".libs", "nixl", "libplugin_UCX*.so*"),
                os.path.join(package_dir, "**", "libplugin_UCX*.so*"))
    return any(glob.glob(pattern, recursive=True) for pattern in patterns)
