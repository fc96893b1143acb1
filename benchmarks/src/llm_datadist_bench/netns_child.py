"""A process of ``bench --hosts netns`` on one simulated host (``python -m llm_datadist_bench.netns_child``).

The first descriptor is a socket to the orchestrator, which sends the role's job as the first message; the
others (if any) are sockets to processes on other hosts. Messages are those of the local bench processes.
"""
from __future__ import annotations

import sys
import traceback
from multiprocessing.connection import Connection
from typing import List

ROLES = ("owner", "initiator", "raw-server", "raw-client", "scale")


def _raw_client(parent: Connection, job: tuple) -> None:
    from llm_datadist_bench.raw_socket import raw_tcp_client

    address, sizes, total_bytes, passes, warmup, seed = job
    records = raw_tcp_client(address, sizes, total_bytes, passes, warmup, seed,
                             lambda: parent.send(("progress", 1, "raw tcp socket")))
    for rec in records:
        parent.send(("record", rec))
    parent.send(("done",))


def main(argv: List[str]) -> int:
    """Run one role; the exit status is 0 when it finished, 1 when it failed (after telling the orchestrator)."""
    role, conns = argv[0], [Connection(int(fd)) for fd in argv[1:]]
    parent = conns[0]
    job = parent.recv()
    try:
        if role == "owner":
            from llm_datadist_bench.worker import owner_main

            owner_main(job, conns[1], parent)
        elif role == "initiator":
            from llm_datadist_bench.initiator import initiator_main

            initiator_main(job, conns[1], parent)
        elif role == "raw-server":
            from llm_datadist_bench.raw_socket import server_main

            server_main(parent, *job)
        elif role == "raw-client":
            _raw_client(parent, job)
        elif role == "scale":
            from llm_datadist_bench.netns_scale import scale_worker

            scale_worker(parent, job)
        else:
            raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    except SystemExit:  # owner_main / initiator_main reported their failure already
        raise
    except BaseException as exc:  # noqa: BLE001 - the orchestrator learns why, then we exit 1
        try:
            parent.send(("error", f"{role}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except (OSError, ValueError):
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
