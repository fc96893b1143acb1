"""A NIXL agent with its UCX backend, through NIXL's own bindings: registration, metadata, transfer requests.

The bindings are used directly (not the ``nixl_agent`` wrapper) for one setting the wrapper fixes: the delay of
the progress thread's poll. The wrapper passes 0, which makes that thread spin on an idle worker (about half a
core each); with a delay it sleeps in poll() and still wakes at once on UCX events.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np

from llm_datadist._transport import nixl_env
from llm_datadist._transport.base import CUDA, RemoteRejected, TransportClosed, TransportError

logger = logging.getLogger(__name__)

PROGRESS_DELAY_US = 10_000  # the progress thread's poll timeout; UCX events wake it before that
DRAIN_TIMEOUT_S = 2.0  # how long a reload of a peer's metadata waits for the requests in flight to end
_DRAINING, _RELOADING = "draining", "reloading"
_BIND_LOCK = threading.Lock()
_BIND: List[object] = []


def bindings():
    """NIXL's compiled bindings, imported once, after the UCX defaults are in the environment.

    Raises:
        TransportError: NIXL or its backend does not import.
    """
    with _BIND_LOCK:
        if not _BIND:
            ucx = nixl_env.apply_ucx_defaults()
            try:
                from nixl import _api
            except Exception as exc:  # noqa: BLE001 - ImportError, OSError of a missing library...
                raise TransportError(f"nixl does not import: {exc}") from exc
            logger.info("nixl loaded from %s (UCX settings %s)", getattr(_api, "__file__", "?"), ucx or "UCX's own")
            _BIND.append(_api.nixlBind)
        return _BIND[0]


def mapped(exc: BaseException, what: str) -> TransportError:
    """The transport error for an exception of NIXL's bindings."""
    kind = type(exc).__name__
    if kind in ("nixlNotFoundError", "nixlInvalidParamError", "nixlMismatchError"):
        return RemoteRejected(f"{what}: NIXL refused the descriptors ({kind})")
    if kind == "nixlRemoteDisconnectError":
        return TransportClosed(f"{what}: the peer disconnected")
    return TransportClosed(f"{what} failed: {kind}: {exc}")


class Agent:
    """One NIXL agent (one UCX worker, one progress thread) of one transport instance; thread-safe."""

    def __init__(self, name: str) -> None:
        bind = bindings()
        self.bind = bind
        self.name = name
        config = bind.nixlAgentConfig()
        config.useProgThread = True  # UCX over TCP needs the serving side to progress without our calls
        config.useListenThread = False  # metadata travels over our own control plane
        config.pthrDelay = PROGRESS_DELAY_US
        config.syncMode = bind.NIXL_THREAD_SYNC_RW
        config.captureTelemetry = False
        try:
            self._agent = bind.nixlAgent(name, config)
            if "UCX" not in list(self._agent.getAvailPlugins()):
                raise TransportError("NIXL has no UCX plugin here")
            self._ucx = self._agent.createBackend("UCX", {})
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a backend that does not start
            raise TransportError(f"the NIXL UCX backend does not start: {exc}") from exc
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._zombies: List[Tuple[int, object]] = []  # timed-out requests UCX has not finished with yet
        self._live = 0  # requests created and not freed yet (zombies included)
        self._gate: Optional[str] = None  # set while a peer's metadata is reloaded: no new requests meanwhile

    def mem_type(self, kind: str):
        return self.bind.VRAM_SEG if kind == CUDA else self.bind.DRAM_SEG

    def register(self, addr: int, nbytes: int, kind: str, device_id: int):
        """Register one range; returns its registration list (for metadata and deregister)."""
        device = device_id if kind == CUDA else 0
        descs = self.bind.nixlRegDList(self.mem_type(kind), np.array([[addr, nbytes, device]], dtype=np.uint64))
        try:
            self._agent.registerMem(descs, [])
        except Exception as exc:  # noqa: BLE001
            raise mapped(exc, f"registering {nbytes} bytes at {addr:#x}") from exc
        return descs

    def deregister(self, descs) -> None:
        try:
            self._agent.deregisterMem(descs, [])
        except Exception:  # noqa: BLE001 - deregistration never fails the caller
            logger.debug("nixl deregistration failed", exc_info=True)

    def metadata(self, descs, with_connection: bool) -> bytes:
        """NIXL's partial metadata of ``descs`` (and, with ``with_connection``, of how to reach this agent)."""
        if descs is None:
            descs = self.bind.nixlRegDList(self.bind.DRAM_SEG, 0)
        return bytes(self._agent.getLocalPartialMD(descs, with_connection, []))

    def load_remote(self, metadata: bytes) -> str:
        """Load a peer's (partial) metadata; returns the peer agent's name.

        Raises:
            TransportError: metadata NIXL cannot load.
        """
        try:
            name = self._agent.loadRemoteMD(metadata)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"the peer's nixl metadata does not load: {exc}") from exc
        return name.decode() if isinstance(name, bytes) else str(name)

    def forget_remote(self, name: str) -> None:
        """Drop a peer agent's metadata and connection (idempotent)."""
        try:
            self._agent.invalidateRemoteMD(name)
        except Exception:  # noqa: BLE001
            logger.debug("nixl invalidateRemoteMD(%s) failed", name, exc_info=True)

    def post(self, read: bool, local: np.ndarray, remote: np.ndarray, local_kind: str, remote_kind: str,
             peer: str) -> int:
        """Create and post one request (``local``/``remote``: Nx3 uint64 rows of address, length, device).

        Returns the request handle (release it with :meth:`release`, or :meth:`abandon` it).
        """
        bind = self.bind
        op = bind.NIXL_READ if read else bind.NIXL_WRITE
        what = "nixl read" if read else "nixl write"
        with self._changed:
            while self._gate is not None:  # a reload ends within DRAIN_TIMEOUT_S plus NIXL's own calls
                self._changed.wait(0.05)
            self._live += 1
        try:
            handle = self._agent.createXferReq(op, bind.nixlXferDList(self.mem_type(local_kind), local),
                                               bind.nixlXferDList(self.mem_type(remote_kind), remote), peer, "", [])
        except Exception as exc:  # noqa: BLE001
            self._freed()
            raise mapped(exc, what) from exc
        try:
            self._agent.postXferReq(handle, "")
        except Exception as exc:  # noqa: BLE001
            self.abandon(handle)
            raise mapped(exc, what) from exc
        return handle

    def done(self, handle: int) -> bool:
        """Whether a posted request completed (True) or is still running (False); raises its failure."""
        try:
            status = self._agent.getXferStatus(handle)
        except Exception as exc:  # noqa: BLE001
            raise mapped(exc, "nixl transfer") from exc
        if status == self.bind.NIXL_SUCCESS:
            return True
        if status == self.bind.NIXL_IN_PROG:
            return False
        raise TransportClosed(f"nixl transfer failed with status {status}")

    def release(self, handle: int) -> bool:
        """Free a request; False when UCX still runs it (then call again later)."""
        try:
            self._agent.releaseXferReq(handle)
        except Exception:  # noqa: BLE001 - still in flight
            return False
        self._freed()
        return True

    def _freed(self) -> None:
        with self._changed:
            self._live -= 1
            self._changed.notify_all()

    def reload_remote(self, name: str, connection: bytes, regions: Sequence[bytes]) -> Optional[List[bytes]]:
        """Replace everything loaded of agent ``name`` with ``connection`` and ``regions`` (its partial metadata).

        NIXL cannot forget one remote registration, and a registration over memory the peer has since registered
        anew in other bounds makes NIXL refuse transfers there; so the peer is dropped and loaded again. Dropping
        it while a request of ours is in flight would leave that request pointing at freed metadata: new requests
        wait meanwhile, and the reload happens once none is in flight (any peer's: NIXL gives no per-peer count).

        Returns:
            The region metadata that loaded, or None when requests were still in flight after DRAIN_TIMEOUT_S
            (nothing was changed then).

        Raises:
            TransportError: the connection metadata does not load again (the peer cannot be reached through
                NIXL any more).
        """
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        with self._changed:
            while self._gate is not None:
                self._changed.wait(0.05)
            self._gate = _DRAINING
        try:
            while True:
                with self._changed:
                    if self._live == 0:
                        self._gate = _RELOADING
                        break
                    if time.monotonic() >= deadline:
                        logger.info("nixl: %d requests still in flight; agent %s is not reloaded", self._live, name)
                        return None
                    self._changed.wait(0.01)
                self.reap()
            self.forget_remote(name)
            self.load_remote(connection)
            loaded = []
            for metadata in regions:
                try:
                    self.load_remote(metadata)
                except TransportError as exc:
                    logger.warning("nixl: a region of agent %s does not load again: %s", name, exc)
                    continue
                loaded.append(metadata)
            return loaded
        finally:
            with self._changed:
                self._gate = None
                self._changed.notify_all()

    def abandon(self, handle: int, keep: Optional[object] = None) -> bool:
        """Free a request now (True) or, while UCX still runs it, later with ``keep`` (its scratch buffer)."""
        if self.release(handle):
            return True
        with self._lock:
            self._zombies.append((handle, keep))
        return False

    def reap(self) -> List[object]:
        """Free the kept requests UCX has finished with; returns what was kept with them."""
        with self._lock:
            zombies, self._zombies = self._zombies, []
        freed = []
        for handle, keep in zombies:
            if self.release(handle):
                freed.append(keep)
            else:
                with self._lock:
                    self._zombies.append((handle, keep))
        return freed

    @property
    def pending(self) -> int:
        """Requests that timed out and are not freed yet."""
        return len(self._zombies)

    def close(self) -> None:
        """Free what is left and destroy the agent (joins its progress thread) (idempotent)."""
        agent = getattr(self, "_agent", None)
        if agent is None:
            return
        self.reap()
        self._zombies = []
        self._agent = None
        del agent
