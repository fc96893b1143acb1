"""Listen ports for tests, chosen below the kernel's ephemeral range so no outgoing connection can take one first."""
from __future__ import annotations

import itertools
import random
import socket
import threading
from typing import Iterator, Tuple

#: The lowest port handed out: above the well-known and most registered services' ports.
LOWEST = 20000
_FALLBACK_EPHEMERAL = (32768, 60999)


def _ephemeral_range() -> Tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL


def _candidates() -> Iterator[int]:
    """Every port of [LOWEST, ephemeral start) once, from a random start, then again (a cycle).

    A port from ``bind(0)`` lies in the ephemeral range, where the kernel also picks the local port of every
    outgoing connection: a port found free there can be taken by a connect() before the test listens on it.
    Below that range only an explicit bind takes a port, and the cycle never hands the same one out twice in a row.
    """
    top = _ephemeral_range()[0]
    if top - LOWEST < 1000:  # an unusual range: fall back to the ports above it
        ports = list(range(_ephemeral_range()[1] + 1, 65536))
    else:
        ports = list(range(LOWEST, top))
    start = random.randrange(len(ports))
    return itertools.cycle(ports[start:] + ports[:start])


_lock = threading.Lock()
_next = _candidates()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that was free a moment ago and was not handed out recently by this process."""
    with _lock:
        for _ in range(2000):
            port = next(_next)
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            return port
    raise OSError(f"no free port on {host} below the ephemeral range")
