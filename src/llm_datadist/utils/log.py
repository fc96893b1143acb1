"""The ``llm_datadist`` logger hierarchy and its official alias ``LLM_DATADIST``: stderr, WARNING unless set."""
from __future__ import annotations

import ipaddress
import logging
import os
import sys
import threading
from typing import List, Optional, Tuple

__all__ = ["LOGGER_NAME", "PACKAGE_LOGGER_NAME", "logger", "level_from_env", "set_log_level",
           "warn_unauthenticated_listener"]

LOGGER_NAME = "LLM_DATADIST"
PACKAGE_LOGGER_NAME = "llm_datadist"
DEFAULT_LEVEL = logging.WARNING
ENV_LEVEL = "LLM_DATADIST_LOG_LEVEL"
ENV_ASCEND_LEVEL = "ASCEND_GLOBAL_LOG_LEVEL"

_OFF = logging.CRITICAL + 10  # above every level: nothing is logged
_ASCEND_LEVELS = {"0": logging.DEBUG, "1": logging.INFO, "2": logging.WARNING, "3": logging.ERROR, "4": _OFF}
_NAMED_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
}
_FORMAT = "[%(levelname)s] %(name)s(%(process)d,%(threadName)s) %(asctime)s [%(filename)s:%(lineno)d] %(message)s"

_package = logging.getLogger(PACKAGE_LOGGER_NAME)
_log = logging.getLogger(__name__)
_warned_lock = threading.Lock()
_warned: set = set()


def _parse_level(text: str) -> Optional[int]:
    """Turn ``"INFO"``, ``"info"``, ``"0"``..``"4"`` or a numeric logging level into a level, else None."""
    value = text.strip()
    if value in _ASCEND_LEVELS:
        return _ASCEND_LEVELS[value]
    if value.isdigit():
        return int(value)
    return _NAMED_LEVELS.get(value.upper())


def _env_level() -> Tuple[int, List[str]]:
    """The level the environment chooses and a complaint for each variable whose value is not a level."""
    complaints: List[str] = []
    for name, parse in ((ENV_LEVEL, _parse_level), (ENV_ASCEND_LEVEL, lambda v: _ASCEND_LEVELS.get(v.strip()))):
        text = os.environ.get(name, "")
        if not text.strip():
            continue
        level = parse(text)
        if level is not None:
            return level, complaints
        complaints.append(f"{name}={text!r} is not a log level; it is ignored")
    return DEFAULT_LEVEL, complaints


def _warn_once(key: Tuple[str, ...], message: str, *args: object) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    _log.warning(message, *args)


def level_from_env() -> int:
    """Return the log level chosen by the environment.

    ``LLM_DATADIST_LOG_LEVEL`` (a level name such as ``INFO`` or a digit) wins when set and valid; otherwise
    ``ASCEND_GLOBAL_LOG_LEVEL`` ("0" DEBUG, "1" INFO, "2" WARNING, "3" ERROR, "4" nothing); default WARNING.
    A value that is not a level is ignored, with one warning per process and value.

    Returns:
        A :mod:`logging` level.
    """
    level, complaints = _env_level()
    for text in complaints:
        _warn_once(("env", text), "%s", text)
    return level


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr``, unless the application has configured the root logger itself."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401 - property of the base class
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; the live sys.stderr is used instead
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # the record propagates to the application's own handlers
            return
        super().emit(record)


def _configure() -> logging.Logger:
    """Attach the stderr handler to ``llm_datadist`` and hang the alias below it, once per process.

    ``LLM_DATADIST`` becomes a child of ``llm_datadist`` (its ``parent``), so its records go to the same handlers
    (and on to the application's) and it has no level of its own: the package level applies to both.

    Returns:
        The ``LLM_DATADIST`` logger.
    """
    alias = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StderrHandler) for h in _package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        _package.addHandler(handler)
    alias.parent = _package
    set_log_level(level_from_env())
    return alias


def set_log_level(level: int) -> None:
    """Set the level of the ``llm_datadist`` logger hierarchy, which its alias ``LLM_DATADIST`` follows.

    Args:
        level: a :mod:`logging` level such as ``logging.INFO``.
    """
    _package.setLevel(level)
    logging.getLogger(LOGGER_NAME).setLevel(logging.NOTSET)


def warn_unauthenticated_listener(host: str, secret: Optional[bytes], tls: bool = False) -> None:
    """Warn once per process when links are accepted on a non-loopback address with neither a secret nor TLS.

    Args:
        host: the address the listener is bound to.
        secret: the instance's link secret (empty or None: none).
        tls: whether mutual TLS authenticates the listener's peers.
    """
    if secret or tls:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    _warn_once(("listener",), "listening on %s without a link secret or TLS: anyone who reaches this port can link "
               "under any cluster id, read every cache registered remote_accessible and write every cache that "
               "accepts pushes; set LLMConfig.link_secret (or LLM_DATADIST_LINK_SECRET) to the same strong secret "
               "on every side, and on untrusted networks mutual TLS as well (tls_cert_file, tls_key_file, "
               "tls_ca_file)", host)


MIN_SECRET_BYTES = 16  # shorter link secrets are accepted, with a warning


def warn_weak_secret(secret: Optional[bytes]) -> None:
    """Warn once per process when the link secret is too short to resist guessing."""
    if not secret or len(secret) >= MIN_SECRET_BYTES:
        return
    _warn_once(("weak-secret",), "the link secret has only %d bytes: a peer that can make this instance dial it "
               "may guess a short secret offline; use at least %d random characters, e.g. "
               "python -c 'import secrets; print(secrets.token_urlsafe(24))'", len(secret), MIN_SECRET_BYTES)


logger = _configure()
