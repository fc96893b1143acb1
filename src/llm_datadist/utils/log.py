"""The ``LLM_DATADIST`` logger: one stdout handler, level taken from environment variables."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

__all__ = ["LOGGER_NAME", "PACKAGE_LOGGER_NAME", "logger", "level_from_env", "set_log_level"]

LOGGER_NAME = "LLM_DATADIST"
PACKAGE_LOGGER_NAME = "llm_datadist"

_ASCEND_LEVELS = {"0": logging.DEBUG, "1": logging.INFO, "2": logging.WARNING, "3": logging.ERROR}
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


def _parse_level(text: str) -> Optional[int]:
    """Turn ``"INFO"``, ``"info"``, ``"0"``..``"3"`` or a numeric logging level into a level, else None."""
    value = text.strip()
    if not value:
        return None
    if value in _ASCEND_LEVELS:
        return _ASCEND_LEVELS[value]
    if value.isdigit():
        return int(value)
    return _NAMED_LEVELS.get(value.upper())


def level_from_env() -> int:
    """Return the log level chosen by the environment.

    ``LLM_DATADIST_LOG_LEVEL`` (a level name such as ``INFO`` or a digit) wins when set and valid;
    otherwise ``ASCEND_GLOBAL_LOG_LEVEL`` ("0" DEBUG, "1" INFO, "2" WARNING, "3" ERROR); default ERROR.

    Returns:
        A :mod:`logging` level.
    """
    override = _parse_level(os.environ.get("LLM_DATADIST_LOG_LEVEL", ""))
    if override is not None:
        return override
    return _ASCEND_LEVELS.get(os.environ.get("ASCEND_GLOBAL_LOG_LEVEL", "").strip(), logging.ERROR)


class _StdoutHandler(logging.StreamHandler):
    """A stream handler that always writes to the current ``sys.stdout`` (works with redirection)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401 - property of the base class
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; the live sys.stdout is used instead
        pass


def _configure() -> logging.Logger:
    """Attach the shared stdout handler to the public and the package loggers, once per process."""
    public = logging.getLogger(LOGGER_NAME)
    package = logging.getLogger(PACKAGE_LOGGER_NAME)
    level = level_from_env()
    handler = next((h for h in public.handlers if isinstance(h, _StdoutHandler)), None)
    if handler is None:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        public.addHandler(handler)
    for target in (public, package):
        target.setLevel(level)
        if handler not in target.handlers:
            target.addHandler(handler)
    return public


def set_log_level(level: int) -> None:
    """Set the level of the ``LLM_DATADIST`` logger and of the ``llm_datadist`` logger hierarchy.

    Args:
        level: a :mod:`logging` level such as ``logging.INFO``.
    """
    logging.getLogger(LOGGER_NAME).setLevel(level)
    logging.getLogger(PACKAGE_LOGGER_NAME).setLevel(level)


logger = _configure()
