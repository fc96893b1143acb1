"""One parser for every address-like option: IP literals, "ip:port" ("[ipv6]:port" where allowed), rank tables."""
from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any, Dict, Optional, Tuple

from llm_datadist.status import LLMException, LLMStatusCode

__all__ = ["PORT_MAX", "parse_ip", "parse_port", "parse_ip_port", "rank_table_addresses"]

PORT_MAX = 65535
_log = logging.getLogger(__name__)


def _invalid(message: str) -> LLMException:
    _log.debug("%s", message)  # raised to the caller
    return LLMException(message, status_code=LLMStatusCode.LLM_PARAM_INVALID)


def parse_ip(option: str, text: Any, allow_ipv6: bool = True) -> str:
    """Check an IP literal (no host names, no port).

    Args:
        option: the option or field name used in the message.
        text: the value to check.
        allow_ipv6: whether an IPv6 literal (without brackets) is accepted.

    Returns:
        ``text``, unchanged.

    Raises:
        LLMException: LLM_PARAM_INVALID, naming ``option`` and the bad value.
    """
    kinds = "an IPv4 or IPv6 address" if allow_ipv6 else "an IPv4 address"
    if not isinstance(text, str) or not text:
        raise _invalid(f"{option} must be {kinds}, but got {text!r}")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise _invalid(f"{option} must be {kinds}, but got {text!r}") from None
    if address.version == 6 and not allow_ipv6:
        raise _invalid(f"{option} must be {kinds} (IPv6 is not supported here), but got {text!r}")
    return text


def parse_port(option: str, port: Any) -> int:
    """Check a port given as an int or a decimal string, in 0..65535.

    Args:
        option: the option or field name used in the message.
        port: the value to check (``bool`` is refused).

    Returns:
        The port as an int.

    Raises:
        LLMException: LLM_PARAM_INVALID, naming ``option`` and the bad value.
    """
    if isinstance(port, str) and port.isascii() and port.isdigit():
        value = int(port)
    elif isinstance(port, int) and not isinstance(port, bool):
        value = port
    else:
        raise _invalid(f"{option} port must be an integer in 0..{PORT_MAX}, but got {port!r}")
    if not 0 <= value <= PORT_MAX:
        raise _invalid(f"{option} port must be in 0..{PORT_MAX}, but got {port!r}")
    return value


def parse_ip_port(option: str, text: Any, allow_ipv6: bool = False) -> Tuple[str, int]:
    """Split and check ``"ip:port"`` (and ``"[ipv6]:port"`` when ``allow_ipv6``).

    Args:
        option: the option name used in the message, e.g. ``listen_ip_info`` or ``llm.listenIpInfo``.
        text: the value to check.
        allow_ipv6: whether the bracketed IPv6 form is accepted.

    Returns:
        ``(ip, port)``; an IPv6 ip is returned without its brackets.

    Raises:
        LLMException: LLM_PARAM_INVALID, naming ``option`` and the bad value.
    """
    form = '"ip:port" or "[ipv6]:port"' if allow_ipv6 else '"ip:port" with an IPv4 address'
    if not isinstance(text, str):
        raise _invalid(f"{option} must be {form}, but got {text!r}")
    if allow_ipv6 and text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise _invalid(f"{option} must be {form}, but got {text!r}")
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError(host)
        except ValueError:
            raise _invalid(f"{option} must be {form}: {host!r} is not an IPv6 address in {text!r}") from None
    else:
        parts = text.split(":")
        if len(parts) != 2:
            raise _invalid(f"{option} must be {form}, but got {text!r}")
        host, port = parts
        try:
            if ipaddress.ip_address(host).version != 4:
                raise ValueError(host)
        except ValueError:
            raise _invalid(f"{option} must be {form}: {host!r} is not an IPv4 address in {text!r}") from None
    if not (port.isascii() and port.isdigit()) or int(port) > PORT_MAX:
        raise _invalid(f"{option} must be {form}: the port {port!r} is not an integer in 0..{PORT_MAX} "
                       f"in {text!r}")
    return host, int(port)


def _rank_id(option: str, device: dict) -> Optional[int]:
    if "rank_id" not in device:
        return None
    rank = device["rank_id"]
    if isinstance(rank, bool) or not (isinstance(rank, int) or (isinstance(rank, str) and rank.isdigit())):
        raise _invalid(f"{option}: rank_id {rank!r} is not a non-negative integer")
    return int(rank)


def rank_table_addresses(option: str, text: Optional[str], use_server_id: bool = False) -> Dict[int, str]:
    """Check an HCCL-style rank table and map each rank to the address its members connect to.

    Devices without ``rank_id`` (a ``local_comm_res`` lists only its own devices) are checked but not mapped.
    The address of a rank is its ``device_ip`` (checked: an IP literal), or its server's ``server_id`` when
    ``use_server_id`` (then checked too); a missing one falls back to ``server_id``, then to ``127.0.0.1``.

    Args:
        option: the option name used in messages (``rank_table``, ``local_comm_res``).
        text: the JSON text; ``None`` or ``""`` gives an empty map.
        use_server_id: whether ``server_id`` is the address instead of ``device_ip``.

    Returns:
        rank id -> address.

    Raises:
        LLMException: LLM_PARAM_INVALID for invalid JSON, a bad ``rank_id`` or an address that is not an IP.
    """
    if text is None or text == "":
        return {}
    if not isinstance(text, str):
        raise _invalid(f"{option} must be a JSON string, but got {text!r}")
    try:
        table = json.loads(text)
    except ValueError as exc:
        raise _invalid(f"{option} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(table, dict):
        raise _invalid(f"{option} must be a JSON object, but got {text!r}")
    servers = table.get("server_list", [])
    if not isinstance(servers, list):
        raise _invalid(f"{option}: server_list must be a list, but got {servers!r}")
    addresses: Dict[int, str] = {}
    for server in servers:
        if not isinstance(server, dict):
            raise _invalid(f"{option}: every server_list entry must be an object, but got {server!r}")
        devices = server.get("device", []) or []
        if not isinstance(devices, list):
            raise _invalid(f"{option}: device must be a list, but got {devices!r}")
        for device in devices:
            if not isinstance(device, dict):
                raise _invalid(f"{option}: every device entry must be an object, but got {device!r}")
            rank = _rank_id(option, device)
            where = f"{option}: rank {rank}" if rank is not None else f"{option}: a device"
            device_ip, server_id = device.get("device_ip"), server.get("server_id")
            if device_ip:
                parse_ip(f"{where} device_ip", str(device_ip))
            if use_server_id and server_id:
                parse_ip(f"{where} server_id", str(server_id))
            if rank is not None:
                address = server_id if use_server_id else device_ip
                addresses[rank] = str(address or server_id or "127.0.0.1")
    return addresses
