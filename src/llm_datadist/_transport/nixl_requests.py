"""Requests of one nixl transfer, posted one after the other and polled without blocking; guard scratch buffers."""
from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional, Protocol, Tuple

import numpy as np

from llm_datadist._transport.base import HOST, TransferTimeout, TransportClosed, TransportError
from llm_datadist._transport.nixl_agent import Agent


class NixlOwner(Protocol):
    """What the requests need of the nixl transport (the transport module imports this one, not the reverse)."""

    agent: Agent
    closed: bool

    def give_back(self, scratch: Optional[Scratch]) -> None: ...

    def mark_broken(self, name: str) -> None: ...


class NixlPeer(Protocol):
    """What the requests need of a channel: the peer agent's name and where to say why it broke."""

    agent: str
    broken: str

SCRATCH_WORDS = 512  # guard words one request reads into a scratch buffer
_POLL_FIRST_S = 20e-6
_POLL_MAX_S = 1e-3


class Scratch:
    """A registered buffer guard words are read into."""

    def __init__(self, transport: NixlOwner) -> None:
        self.words = np.zeros(SCRATCH_WORDS, dtype=np.uint64)
        self.addr = self.words.ctypes.data
        self.descs = transport.agent.register(self.addr, self.words.nbytes, HOST, 0)


class Requests:
    """Requests posted one after the other; ``poll`` advances without blocking."""

    def __init__(self, transport: NixlOwner, channel: NixlPeer,
                 stages: List[Tuple[Callable[[], int], Optional[Callable[[], None]]]],
                 scratch: Optional[Scratch]) -> None:
        self._t = transport
        self._ch = channel
        self._stages = stages
        self._scratch = scratch
        self._index = 0
        self._handle: Optional[int] = None
        self._error: Optional[BaseException] = None
        self._done = False
        self._lock = threading.Lock()

    def poll(self) -> bool:
        with self._lock:
            if self._error is not None:
                raise self._error
            try:
                return self._advance()
            except TransportError as exc:
                self._fail(exc)
                raise

    def _advance(self) -> bool:
        agent = self._t.agent
        while not self._done:
            if self._handle is None:
                if self._index == len(self._stages):
                    self._finish()
                    return True
                self._handle = self._stages[self._index][0]()
            if not agent.done(self._handle):
                return False
            agent.abandon(self._handle)
            self._handle = None
            after = self._stages[self._index][1]
            self._index += 1
            if after is not None:
                after()
        return True

    def _finish(self) -> None:
        self._done = True
        self._t.give_back(self._scratch)
        self._scratch = None

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._done = True
        if isinstance(exc, TransportClosed) and not self._t.closed:
            self._ch.broken = str(exc)
            self._t.mark_broken(self._ch.agent)
        if self._handle is None or self._t.agent.abandon(self._handle, self._scratch):
            self._t.give_back(self._scratch)  # else it goes back once UCX lets go of the request
        self._handle = None
        self._scratch = None

    def wait(self, deadline: float) -> None:
        pause = _POLL_FIRST_S
        while not self.poll():
            now = time.monotonic()
            if now >= deadline:
                with self._lock:
                    if not self._done:
                        self._fail(TransferTimeout("nixl transfer deadline passed"))
                raise TransferTimeout("nixl transfer deadline passed")
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, _POLL_MAX_S)
