"""Names that modules outside the transport package still import from here (the engine, tests, benchmarks).

The transports use the modules by subject: ``pvm`` (process_vm system calls), ``scatter`` (socket scatter/gather
I/O), ``ranges`` (range tables), ``copies`` (copies inside this process) and ``parallel`` (helper threads).
"""
from __future__ import annotations

from typing import Callable, List

import numpy as np

from llm_datadist._transport.copies import local_copy
from llm_datadist._transport.parallel import COPY_THREADS, acquire_helpers, release_helpers, run_parallel
from llm_datadist._transport.pvm import peek as pvm_peek
from llm_datadist._transport.pvm import self_permitted as self_pvm_permitted
from llm_datadist._transport.ranges import RangeTable
from llm_datadist._transport.scatter import scatter_io as _scatter_io

__all__ = ["COPY_THREADS", "RangeTable", "acquire_helpers", "local_copy", "pvm_peek", "release_helpers",
           "run_parallel", "scatter_io", "self_pvm_permitted"]


def scatter_io(op: Callable[[List[memoryview]], int], addrs, sizes, on_stall: Callable[[], None],
               max_bytes: int = 1 << 20) -> None:
    """:func:`scatter.scatter_io` of ranges given as uint64 arrays (or int sequences)."""
    _scatter_io(op, np.asarray(addrs, dtype=np.uint64).tolist(), np.asarray(sizes, dtype=np.uint64).tolist(),
                on_stall, max_bytes)
