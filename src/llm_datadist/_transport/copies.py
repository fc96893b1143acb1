"""Copies inside this process: checked (process_vm_readv on our own pid) or memmove, split across threads."""
from __future__ import annotations

import collections
import ctypes
import os
import time
from typing import Optional

from llm_datadist._transport import parallel, pvm
from llm_datadist._transport.base import CopyPlan, TransferTimeout

_STEP = pvm.IOV_MAX  # memmove ops between deadline checks


def _memmove(plan: CopyPlan, deadline: Optional[float]) -> None:
    """ctypes.memmove driven by ``map`` (C-level iteration, GIL released per call), 1024 ops per step."""
    move = ctypes.memmove
    dst, src, cnt = plan.lists()
    for s in range(0, len(cnt), _STEP):
        if deadline is not None and time.monotonic() > deadline:
            raise TransferTimeout("local copy: deadline passed")
        e = s + _STEP
        collections.deque(map(move, dst[s:e], src[s:e], cnt[s:e]), maxlen=0)


def copy(plan: CopyPlan, deadline: Optional[float] = None, checked: bool = True, threads: int = 1) -> None:
    """Copy ``plan.sizes[i]`` bytes from ``plan.remote[i]`` to ``plan.local[i]``, both in this process.

    Args:
        plan: The copies (the caller merges contiguous runs first where that pays).
        deadline: ``time.monotonic()`` value checked between 1024-op steps.
        checked: True uses process_vm_readv on our own pid (when permitted), so an unmapped address
            raises RemoteRejected instead of crashing; False uses memmove (faster on 4 KiB-page
            shared mappings; callers must guarantee every range is mapped).
        threads: Threads for large plans (at least parallel.PARALLEL_MIN_BYTES), on either path.

    Raises:
        RemoteRejected: an address is not mapped (checked path).
        TransferTimeout: the deadline passed.
    """
    if deadline is not None and time.monotonic() > deadline:
        raise TransferTimeout("local copy: deadline passed")
    checked = checked and pvm.self_permitted()
    if pvm.compiled():  # the whole plan with the GIL released once
        pvm.rw_whole(False if checked else pvm.MEMCPY, os.getpid(), plan, deadline, (), threads,
                     parallel.SPLIT_BYTES_PER_THREAD)
    elif checked:
        pid = os.getpid()
        parallel.run_split(plan, threads, lambda part: pvm.read(pid, part, deadline))
    else:
        parallel.run_split(plan, threads, lambda part: _memmove(part, deadline))


def local_copy(dst, src, sizes, deadline: Optional[float] = None, checked: bool = True, threads: int = 1) -> None:
    """:func:`copy` of ``sizes[i]`` bytes from ``src[i]`` to ``dst[i]`` (uint64 arrays or int lists), for
    callers that hold addresses rather than a plan (memory backends)."""
    copy(CopyPlan(dst, src, sizes), deadline, checked, threads)
