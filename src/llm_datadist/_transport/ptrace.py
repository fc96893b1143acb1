"""Who may process_vm_readv this process: Yama's ptrace_scope, and the owner's grant to same-user peers."""
from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)

YAMA_SCOPE_PATH = "/proc/sys/kernel/yama/ptrace_scope"
PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value
_granted = False


def yama_scope(path: Optional[str] = None) -> Optional[int]:
    """Yama's ptrace_scope (0 classic, 1 descendants only, 2 admin only, 3 none), or None without Yama."""
    try:
        with open(path or YAMA_SCOPE_PATH) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _prctl(option: int, arg: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return int(libc.prctl(option, arg, 0, 0, 0))


def grant_same_user_peers(scope: Optional[int] = None) -> bool:
    """Under Yama ptrace_scope 1, let processes of our user read us (PR_SET_PTRACER_ANY), once per process.

    With scope 1 a process may only read its descendants, so a prefill and a decode started independently
    (by a serving framework) could not use process_vm and would fall back to tcp. The grant restores the
    classic same-user rule for this process only; ``LLM_DATADIST_PTRACE_GRANT=0`` keeps the restriction.
    Returns whether the grant is in place.
    """
    global _granted
    if _granted:
        return True
    scope = yama_scope() if scope is None else scope
    if scope != 1 or os.environ.get("LLM_DATADIST_PTRACE_GRANT", "") == "0":
        return False
    if _prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY) != 0:
        logger.info("Yama ptrace_scope is 1 and PR_SET_PTRACER failed (errno %d): same-host peers use tcp",
                    ctypes.get_errno())
        return False
    _granted = True
    logger.info("Yama ptrace_scope is 1: processes of this user may read this process's registered memory "
                "(PR_SET_PTRACER_ANY), so same-host peers use process_vm; LLM_DATADIST_PTRACE_GRANT=0 keeps "
                "the restriction")
    return True


def refusal_hint(scope: Optional[int] = None) -> str:
    """What to do when process_vm_readv of a peer is not permitted (for the fallback's log line)."""
    scope = yama_scope() if scope is None else scope
    if scope is not None and scope >= 2:
        return (f"Yama ptrace_scope is {scope} (only an administrator may read other processes): set "
                f"kernel.yama.ptrace_scope=1 or 0, or give the reading process CAP_SYS_PTRACE")
    if scope == 1:
        return ("Yama ptrace_scope is 1: the peer must grant access (it does, unless LLM_DATADIST_PTRACE_GRANT=0 "
                "there), or set kernel.yama.ptrace_scope=0")
    return ("the peer runs as another user, is not dumpable, or has capabilities this process lacks: run both as "
            "one user with the same capabilities (or give the reader CAP_SYS_PTRACE), or use pool caches (shm)")
