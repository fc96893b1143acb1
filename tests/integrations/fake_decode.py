"""A stand-in decode for failure tests: claims requests on a prefill's control channel, reports, then waits.

Usage: fake_decode.py HOST PORT REQUEST_ID...; prints one JSON line ({"claimed": {id: blocks}}) and then blocks
on stdin until it is killed or stdin closes (a graceful close).
"""
from __future__ import annotations

import json
import sys

from llm_datadist.integrations.vllm.side_channel import ControlClient


def main() -> None:
    host, port, request_ids = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    client = ControlClient(host, port, "", 424242, 10.0, lambda message: None, lambda lost: None)
    client.connect()
    claimed = {}
    for request_id in request_ids:
        reply = client.claim(request_id)
        claimed[request_id] = list(reply.block_ids) if reply.ok else reply.reason
    print(json.dumps({"claimed": claimed}), flush=True)
    sys.stdin.read()
    client.close()


if __name__ == "__main__":
    main()
