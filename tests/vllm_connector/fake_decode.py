"""A stand-in decode for failure tests: links to a prefill's llm_datadist and claims requests with the connector's
messages, reports, then waits.

Usage: fake_decode.py HOST PORT CLUSTER_ID GEOMETRY_JSON REQUEST_ID... (link secret: $LLM_DATADIST_LINK_SECRET);
prints one JSON line ({"claimed": {id: blocks or reason}}) and then blocks on stdin until it is killed or stdin
closes (a graceful close).
"""
from __future__ import annotations

import json
import os
import sys

from llm_datadist import LLMConfig, LLMDataDist, LLMRole
from llm_datadist.integrations.vllm import messages as msg
from llm_datadist.integrations.vllm.control import Control
from llm_datadist.integrations.vllm.datadist import link_prefill


def main() -> None:
    host, port, cluster_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    geometry = msg.Geometry(*json.loads(sys.argv[4]))
    options = LLMConfig()
    options.enable_cache_manager = True
    options.enable_remote_cache_accessible = True
    if os.environ.get("LLM_DATADIST_LINK_SECRET"):
        options.link_secret = os.environ["LLM_DATADIST_LINK_SECRET"]
    datadist = LLMDataDist(LLMRole.DECODER, 424243)
    datadist.init(options.generate_options())
    link_prefill(datadist, cluster_id, host, port, 10000)
    control = Control(datadist, geometry, 10000)
    claimed = {}
    for request_id in sys.argv[5:]:
        reply = control.claim(cluster_id, request_id)
        claimed[request_id] = list(reply.block_ids) if reply.ok else reply.reason
    print(json.dumps({"claimed": claimed}), flush=True)
    sys.stdin.read()
    control.close()
    datadist.finalize()


if __name__ == "__main__":
    main()
