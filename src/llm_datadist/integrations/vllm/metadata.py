"""What the scheduler side tells the worker side each step, and the transfer parameters requests carry."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Tuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata, KVConnectorMetadata

from llm_datadist.integrations.vllm.datadist import parse_endpoint

__all__ = ["LoadJob", "HoldJob", "StepMetadata", "WorkerEndpoint", "TransferParams", "endpoints_param"]


@dataclasses.dataclass
class WorkerEndpoint(KVConnectorHandshakeMetadata):
    """A prefill worker's llm_datadist listen address and cluster id, reported to its scheduler at start-up."""

    host: str
    port: int
    cluster_id: int = 0  # 0: the id a fixed port implies (datadist.prefill_cluster_id)


@dataclasses.dataclass(frozen=True)
class TransferParams:
    """The decode-side view of a request's ``kv_transfer_params``."""

    mode: str
    endpoints: Tuple[Tuple[str, int, int], ...]  # (host, port, cluster id) of each prefill TP rank's llm_datadist
    request_id: str  # the prefill's request id (pull) or the proxy's transfer id (push)
    block_ids: Tuple[int, ...] = ()

    @classmethod
    def parse(cls, params: Mapping[str, Any], default_mode: str) -> TransferParams:
        """Read the parameters a prefill (pull) or a proxy (push) gave a decode request.

        Raises:
            ValueError: a missing or malformed field.
        """
        mode = str(params.get("transfer_mode") or default_mode)
        if mode not in ("pull", "push"):
            raise ValueError(f"kv_transfer_params transfer_mode must be 'pull' or 'push', not {mode!r}")
        raw = params.get("remote_endpoints")
        if not raw:
            raise ValueError("kv_transfer_params has no remote_endpoints (the prefill's llm_datadist addresses)")
        endpoints = tuple(parse_endpoint(entry) for entry in raw)
        key = "transfer_id" if mode == "push" else "remote_request_id"
        request_id = params.get(key)
        if not request_id:
            raise ValueError(f"kv_transfer_params has no {key}")
        blocks = tuple(int(b) for b in params.get("remote_block_ids") or ())
        return cls(mode, endpoints, str(request_id), blocks)


@dataclasses.dataclass(frozen=True)
class LoadJob:
    """Decode side: fill ``local_block_ids`` (all blocks of the request, in order) from a prefill.

    ``num_tokens`` prompt tokens are wanted; the first ``first_block`` blocks are already computed locally.
    ``num_tokens == 0`` only releases the prefill's blocks (the request was aborted or fully cached).
    """

    request_id: str
    params: TransferParams
    local_block_ids: Tuple[int, ...]
    num_tokens: int
    first_block: int = 0
    group_sizes: Tuple[int, ...] = ()  # local_block_ids of each KV cache group, one after the other (empty: one)


@dataclasses.dataclass(frozen=True)
class HoldJob:
    """Prefill side: the prompt of ``request_id`` is fully computed in this step; keep (and maybe push) it."""

    request_id: str
    block_ids: Tuple[int, ...]
    num_tokens: int
    mode: str
    transfer_id: str = ""
    lease_s: float = 0.0  # 0: the connector's lease_s
    group_sizes: Tuple[int, ...] = ()  # block_ids of each KV cache group, one after the other (empty: one)


@dataclasses.dataclass
class StepMetadata(KVConnectorMetadata):
    """One step's work for the worker side."""

    loads: List[LoadJob] = dataclasses.field(default_factory=list)
    holds: List[HoldJob] = dataclasses.field(default_factory=list)
    not_kept: List[str] = dataclasses.field(default_factory=list)  # finished without keeping their blocks
    # decode requests taken in since the last step: their prefills' holds are renewed until their loads end
    wanted: List[Tuple[str, TransferParams]] = dataclasses.field(default_factory=list)

    def is_empty(self) -> bool:
        """Whether the step has no connector work."""
        return not (self.loads or self.holds or self.not_kept or self.wanted)


def endpoints_param(endpoints: Dict[int, WorkerEndpoint]) -> List[List[Any]]:
    """``remote_endpoints`` for kv_transfer_params: ``[[host, port, cluster_id], ...]`` in TP rank order."""
    return [[endpoints[rank].host, endpoints[rank].port, endpoints[rank].cluster_id] for rank in sorted(endpoints)]
