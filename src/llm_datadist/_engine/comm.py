"""Rank-table comm domains: link()/unlink()/query_register_mem_status() without any configured port.

Rendezvous rule (documented in the README): every member of a domain listens on a port derived from the
domain identity and its own rank, ``base + crc32("<comm_name>|<sorted member ids>|<rank>") % span``
(base ``LLM_DATADIST_RANK_PORT_BASE``, default 40000; span ``LLM_DATADIST_RANK_PORT_SPAN``, default 20000),
probing up to 16 following ports when one is taken. Each member connects to every member of lower rank at
that member's rank-table address (``device_ip``, or ``server_id`` when ``LLM_DATADIST_RANK_ADDR=server_id``)
and the handshake carries the domain identity, so a port held by another domain or process is skipped.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import zlib
from typing import Dict, List, Optional

from llm_datadist._engine.errors import EngineError, LinkFailed, ParamInvalid
from llm_datadist._engine.listener import Listener
from llm_datadist.status import LLMException
from llm_datadist.utils.addresses import rank_table_addresses
from llm_datadist.utils.log import warn_unauthenticated_listener

_log = logging.getLogger(__name__)
PREPARING, OK, FAILED = 1, 0, 2
PORT_PROBES = 16


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default


def member_ports(comm_name: str, members: List[int], rank: int) -> List[int]:
    """The ports a member of ``rank`` may listen on, in probe order."""
    base = _env_int("LLM_DATADIST_RANK_PORT_BASE", 40000)
    span = max(PORT_PROBES, _env_int("LLM_DATADIST_RANK_PORT_SPAN", 20000))
    ident = f"{comm_name}|{','.join(str(m) for m in sorted(members))}|{rank}".encode()
    first = zlib.crc32(ident) % span
    return [base + (first + i) % span for i in range(PORT_PROBES)]


def parse_rank_addresses(rank_table: Optional[str]) -> Dict[int, str]:
    """rank id -> address from an HCCL-style rank table (versions 1.0/1.2, one or more servers), checked."""
    use_server_id = os.environ.get("LLM_DATADIST_RANK_ADDR", "") == "server_id"
    try:
        return rank_table_addresses("rank_table", rank_table, use_server_id)
    except LLMException as exc:
        raise ParamInvalid(str(exc)) from None


class CommDomain:
    """One rank-table comm domain of this instance, prepared in a background thread."""

    def __init__(self, links, comm_id: int, comm_name: str, members: Dict[int, int], own_cluster: int,
                 addresses: Dict[int, str], timeout_s: float) -> None:
        self.comm_id = comm_id
        self.comm_name = comm_name
        self.members = dict(members)
        self.own_cluster = own_cluster
        self.rank = members[own_cluster]
        self._links = links
        self._addresses = addresses
        self._deadline = time.monotonic() + timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._linked: set = set()
        self._status = PREPARING
        self._listener: Optional[Listener] = None
        self._thread = threading.Thread(target=self._run, name=f"llm-dd-comm-{comm_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def status(self) -> int:
        return self._status

    def accepts(self, hello) -> bool:
        """Whether a handshake belongs to this domain (name, member set, a higher-ranked member)."""
        return (hello.comm_name == self.comm_name and sorted(hello.comm_members) == sorted(self.members)
                and hello.cluster_id in self.members and self.members[hello.cluster_id] > self.rank)

    def _expected(self) -> set:
        return {cid for cid in self.members if cid != self.own_cluster}

    def _note_linked(self, cluster_id: int) -> None:
        with self._lock:
            self._linked.add(cluster_id)
            if self._linked >= self._expected() and self._status == PREPARING:
                self._status = OK
                _log.info("comm domain %s (comm_id %d) is ready", self.comm_name, self.comm_id)

    def _on_accept(self, sock: socket.socket, addr) -> None:
        link = self._links.accept(sock, addr, comm=self)
        if link is not None:
            self._note_linked(link.cluster_id)

    def _bind(self) -> bool:
        address = self._addresses.get(self.rank, "127.0.0.1")
        for port in member_ports(self.comm_name, list(self.members), self.rank):
            for host in (address, "0.0.0.0"):
                try:
                    self._listener = Listener(host, port, self._on_accept, name=f"llm-dd-comm-{port}")
                    warn_unauthenticated_listener(host, self._links.link_secret, self._links.tls_on)
                    return True
                except EngineError:
                    continue
        return False

    def _run(self) -> None:
        try:
            if any(r > self.rank for r in self.members.values()) and not self._bind():
                raise LinkFailed(f"comm domain {self.comm_name}: no free port to listen on")
            lower = [cid for cid, r in self.members.items() if r < self.rank]
            for cluster_id in lower:
                self._connect_lower(cluster_id)
            while not self._stop.is_set() and self._status == PREPARING:
                if time.monotonic() > self._deadline:
                    raise LinkFailed(f"comm domain {self.comm_name}: peers did not link in time")
                self._stop.wait(0.05)
        except EngineError as exc:
            _log.info("comm domain %s (comm_id %d) failed: %s", self.comm_name, self.comm_id, exc)
            with self._lock:
                self._status = FAILED
        finally:
            self._close_listener()

    def _connect_lower(self, cluster_id: int) -> None:
        rank = self.members[cluster_id]
        address = self._addresses.get(rank, "127.0.0.1")
        ports = member_ports(self.comm_name, list(self.members), rank)
        delay = 0.02
        while not self._stop.is_set():
            for port in ports:
                if time.monotonic() > self._deadline or self._stop.is_set():
                    raise LinkFailed(f"comm domain {self.comm_name}: rank {rank} at {address} never answered")
                attempt = min(self._deadline, time.monotonic() + 2.0)
                try:
                    self._links.connect(address, port, cluster_id, attempt, comm=self)
                    self._note_linked(cluster_id)
                    return
                except EngineError as exc:
                    _log.debug("comm %s: %s:%d not ready: %s", self.comm_name, address, port, exc)
            self._stop.wait(delay)
            delay = min(delay * 2, 0.5)

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def close(self, unlink_timeout_s: float = 0.0) -> None:
        """Stop preparing and drop every link of this domain.

        With ``unlink_timeout_s`` > 0 (``unlink``) each peer is told first and drops its end before this
        returns; without (finalize) the links just close and the peers notice the closed connections.
        """
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)
        self._close_listener()
        deadline = time.monotonic() + unlink_timeout_s
        for link in self._links.links():
            if link.comm_id != self.comm_id:
                continue
            if unlink_timeout_s > 0:
                try:
                    self._links.unlink(link, deadline)
                except EngineError as exc:
                    _log.info("comm domain %s: cluster %d did not confirm the unlink: %s", self.comm_name,
                              link.cluster_id, exc)
            else:
                self._links.drop(link.key, link)
