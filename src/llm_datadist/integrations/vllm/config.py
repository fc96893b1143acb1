"""Options of the vLLM connector, read from ``kv_connector_extra_config`` and validated once."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional

__all__ = ["ConnectorConfig", "MODES", "PLACEMENTS", "SECRET_ENV", "connector_logger"]

MODES = ("pull", "push")
PLACEMENTS = ("auto", "device", "host")
SECRET_ENV = "LLM_DATADIST_LINK_SECRET"


def connector_logger(module_name: str) -> logging.Logger:
    """The connector runs inside vLLM: log under vLLM's ``vllm`` logger so its handlers and level apply."""
    return logging.getLogger("vllm.llm_datadist." + module_name.rsplit(".", 1)[-1])


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """Connector options; every field is a key of ``kv_connector_extra_config``.

    Attributes:
        mode: default transfer mode for requests whose ``kv_transfer_params`` name none: ``"pull"`` (the decode
            pulls the finished prefill's blocks) or ``"push"`` (the prefill pushes each layer as it is computed).
        host: address the prefill's llm_datadist listener binds to and advertises to decodes.
        datadist_port: llm_datadist listen port of a prefill's TP rank 0 (rank r listens on ``port + r``); decodes
            link there, and claims, releases and push hand-offs travel as notifications over that link. 0: each
            worker's listener binds a free port (decodes learn it from the request's ``kv_transfer_params``).
        side_channel_port: the former name of ``datadist_port`` (the connector's control messages now travel over
            the llm_datadist link, on that one port); accepted when ``datadist_port`` is not set.
        link_secret: shared secret authenticating the llm_datadist links (and so every control message); default
            ``$LLM_DATADIST_LINK_SECRET``; empty means no authentication.
        transport: llm_datadist ``transfer_backend`` (``None``: the library's choice per link).
        placement: memory kind of the KV tensors: ``"device"``, ``"host"`` or ``"auto"`` (device memory, which is
            host memory on a machine without CUDA).
        lease_s: how long a prefill keeps a finished request's blocks without hearing from its decode: from the end
            of the prefill to the decode's first claim or renewal, then from each renewal to the next. Decodes renew
            the requests they still want (queued or loading), so it may be a few seconds; a decode that dies is let
            go at once (its link goes down), one that stops renewing after this long.
        lease_renew_s: how often a decode renews the holds of the requests it still wants; a prefill with a shorter
            lease is renewed three times per lease (it announces its lease at first contact).
        transfer_timeout_ms: bound of each llm_datadist transfer (``sync_kv_timeout``).
        link_timeout_ms: bound of ``link_clusters``, of each control message and of the wait for a claim's reply.
        push_timeout_s: how long a decode waits for a prefill's push before it reports a load error.
        load_threads: decode threads running loads (one per prefill at a time is enough for most setups).
        model_id: ``BlocksCacheKey.model_id`` under which the KV cache is registered.
    """

    mode: str = "pull"
    host: str = "127.0.0.1"
    side_channel_port: int = 0
    datadist_port: int = 0
    link_secret: str = ""
    transport: Optional[str] = None
    placement: str = "auto"
    lease_s: float = 30.0
    lease_renew_s: float = 1.0
    transfer_timeout_ms: int = 10000
    link_timeout_ms: int = 5000
    push_timeout_s: float = 30.0
    load_threads: int = 2
    model_id: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"kv_connector_extra_config 'mode' must be one of {MODES}, not {self.mode!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"kv_connector_extra_config 'placement' must be one of {PLACEMENTS}, "
                             f"not {self.placement!r}")
        for name in ("side_channel_port", "datadist_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"kv_connector_extra_config {name!r} must be a port (0-65535), "
                                 f"not {getattr(self, name)}")
        for name in ("lease_s", "lease_renew_s", "transfer_timeout_ms", "link_timeout_ms", "push_timeout_s",
                     "load_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"kv_connector_extra_config {name!r} must be > 0, not {getattr(self, name)}")
        if self.model_id < 0:
            raise ValueError(f"kv_connector_extra_config 'model_id' must be >= 0, not {self.model_id}")
        if not self.host:
            raise ValueError("kv_connector_extra_config 'host' can not be empty")
        if self.side_channel_port and self.datadist_port and self.side_channel_port != self.datadist_port:
            raise ValueError("kv_connector_extra_config 'side_channel_port' is the former name of 'datadist_port': "
                             "give one of them")

    @property
    def listen_port(self) -> int:
        """The llm_datadist listen port of TP rank 0 (0: a free port per worker)."""
        return self.datadist_port or self.side_channel_port

    @property
    def link_timeout_s(self) -> float:
        """``link_timeout_ms`` in seconds."""
        return self.link_timeout_ms / 1000.0

    @classmethod
    def from_extra(cls, extra: Optional[Mapping[str, Any]]) -> ConnectorConfig:
        """Parse ``kv_connector_extra_config``; numbers may be given as strings (CLI JSON).

        Raises:
            ValueError: an unknown key, or a value of the wrong type or range.
        """
        extra = dict(extra or {})
        known = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys {unknown}; known keys: {sorted(known)}")
        values: Dict[str, Any] = {}
        for name, raw in extra.items():
            values[name] = _coerce(name, raw, _PARSERS[name])
        if "link_secret" not in values:
            values["link_secret"] = os.environ.get(SECRET_ENV, "")
        if values.get("transport") == "":
            values["transport"] = None
        return cls(**values)


def _coerce(name: str, raw: Any, parse: Callable[[Any], Any]) -> Any:
    try:
        return parse(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"kv_connector_extra_config {name!r}: invalid value {raw!r} ({exc})") from None


def _as_int(raw: Any) -> int:
    if isinstance(raw, bool) or isinstance(raw, float):
        raise TypeError("an integer is required")
    return int(raw)


def _as_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise TypeError("a number is required")
    return float(raw)


def _as_str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise TypeError("a string is required")
    return raw


def _as_optional_str(raw: Any) -> Optional[str]:
    return None if raw is None else _as_str(raw)


_PARSERS: Dict[str, Callable[[Any], Any]] = {
    "mode": _as_str, "host": _as_str, "side_channel_port": _as_int, "datadist_port": _as_int,
    "link_secret": _as_str, "transport": _as_optional_str, "placement": _as_str, "lease_s": _as_float,
    "lease_renew_s": _as_float, "transfer_timeout_ms": _as_int, "link_timeout_ms": _as_int, "push_timeout_s": _as_float,
    "load_threads": _as_int, "model_id": _as_int,
}
