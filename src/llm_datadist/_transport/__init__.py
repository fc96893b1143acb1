"""Private transports: they move bytes between registered memory; one lazy registry of them."""
from __future__ import annotations

import importlib
import logging
import threading
from typing import Collection, Dict, List, Tuple, Type

logger = logging.getLogger(__name__)

# name -> "module:Class"; a module is imported only when its transport is asked for.
_REGISTRY: Dict[str, str] = {
    "loopback": "llm_datadist._transport.loopback:LoopbackTransport",
    "process_vm": "llm_datadist._transport.process_vm:ProcessVmTransport",
    "shm": "llm_datadist._transport.shm:ShmTransport",
    "tcp": "llm_datadist._transport.tcp:TcpTransport",
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


def unavailable_reason(name: str) -> str:
    """Why transport ``name`` cannot work in this process ("" when it can).

    Raises:
        KeyError: unknown name.
    """
    if name not in _REGISTRY:
        raise KeyError(name)
    try:
        return str(transport_class(name).unavailable_reason())
    except Exception as exc:  # noqa: BLE001 - a broken optional transport is simply unavailable
        logger.debug("transport %s failed to load", name, exc_info=True)
        return f"it failed to load: {exc}"


def available_transports() -> List[str]:
    """Names of the transports that work in this process, in registry order."""
    return [name for name in list(_REGISTRY) if not unavailable_reason(name)]


def transport_report() -> List[Tuple[str, str]]:
    """(name, reason it is unavailable or "") for every registered transport."""
    return [(name, unavailable_reason(name)) for name in list(_REGISTRY)]


def cross_host_reason(route: str, started: Collection[str]) -> str:
    """Why auto mode put a cross-host link on ``route`` rather than nixl or tcp ("" where it did not choose).

    Args:
        route: The transport the link uses.
        started: The transports of the instance (one alone: it was forced, nothing was chosen).
    """
    if route not in ("nixl", "tcp") or len(started) < 2:
        return ""
    if route == "tcp" and unavailable_reason("nixl"):
        return "nixl is not available here"
    from llm_datadist._transport import nixl_env

    return nixl_env.rank_reason()


__all__ = ["available_transports", "cross_host_reason", "register_transport", "transport_class", "transport_names",
           "transport_report", "unavailable_reason"]
