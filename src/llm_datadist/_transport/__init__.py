"""Private transports: they move bytes between registered memory; one lazy registry of them."""
from __future__ import annotations

import importlib
import logging
import threading
from typing import Dict, List, Type

logger = logging.getLogger(__name__)

# name -> "module:Class"; a module is imported only when its transport is asked for.
_REGISTRY: Dict[str, str] = {
    "loopback": "llm_datadist._transport.loopback:LoopbackTransport",
    "process_vm": "llm_datadist._transport.process_vm:ProcessVmTransport",
    "shm": "llm_datadist._transport.shm:ShmTransport",
    "tcp": "llm_datadist._transport.tcp:TcpTransport",
    "cuda_ipc": "llm_datadist._transport.cuda_ipc:CudaIpcTransport",
    "nixl": "llm_datadist._transport.nixl:NixlTransport",
}
_CACHE: Dict[str, type] = {}
_LOCK = threading.Lock()


def transport_names() -> List[str]:
    """Every registered transport name, available or not."""
    return list(_REGISTRY)


def register_transport(name: str, target: str) -> None:
    """Add an out-of-tree transport as ``"module:Class"``; an existing name is refused (ValueError)."""
    if ":" not in target:
        raise ValueError(f"transport target must be 'module:Class', got {target!r}")
    with _LOCK:
        if name in _REGISTRY:
            raise ValueError(f"transport {name!r} is already registered")
        _REGISTRY[name] = target


def transport_class(name: str) -> Type:
    """The transport class registered under ``name``, imported on first use.

    Raises:
        KeyError: unknown name.
        ImportError: the module failed to import.
    """
    cls = _CACHE.get(name)
    if cls is not None:
        return cls
    target = _REGISTRY[name]  # KeyError for unknown names
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    with _LOCK:
        _CACHE[name] = cls
    return cls


def available_transports() -> List[str]:
    """Names of the transports whose ``available()`` is True in this process, in registry order."""
    names = []
    for name in list(_REGISTRY):
        try:
            if transport_class(name).available():
                names.append(name)
        except Exception:  # noqa: BLE001 - a broken optional transport is simply unavailable
            logger.debug("transport %s failed to load", name, exc_info=True)
    return names


__all__ = ["available_transports", "register_transport", "transport_class", "transport_names"]
