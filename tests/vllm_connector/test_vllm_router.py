"""vllm-router (the vLLM project's Rust load balancer) in front of the example instead of proxy.py.

First what the router sends, against two fake backends: the prefill request with ``max_tokens`` 1, no streaming and
``kv_transfer_params`` asking to keep the blocks for a remote decode, then the decode request with the prefill's
``kv_transfer_params`` verbatim. That is the connector's pull flow. Then end to end: examples/vllm_disagg/
launch_router.sh (two ``vllm serve`` and the router) streams exactly the tokens the prefill server generates alone,
and the decode took every prompt token from the prefill's KV (vLLM's own count, by source), none computed."""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Tuple

import pytest

from ports import free_port
from subsystems import skip
from test_vllm_example import PROMPT, _completion, launched
from waiting import wait_until

pytestmark = pytest.mark.timeout(600)

METRICS_TIMEOUT_S = 60.0  # vLLM's counters reach /metrics with the engine's steps: a bound only a hang reaches
ROUTER_START_TIMEOUT_S = 60.0


def _router(vllm_python: str) -> str:
    """The vllm-router command of the vLLM venv, or a skip saying how to get it."""
    router = os.path.join(os.path.dirname(vllm_python), "vllm-router")
    if not os.path.exists(router):
        skip("vllm", f"vllm-router is not installed beside {vllm_python} (bash .ci/setup_vllm.sh installs it; or "
                     "pip install vllm-router there)")
    return router


def _tail(path: str) -> str:
    with open(path) as handle:
        return handle.read()[-3000:]


class _FakeBackend(BaseHTTPRequestHandler):
    """A prefill or decode that records each POST and answers like vLLM (a prefill with its kv_transfer_params)."""

    protocol_version = "HTTP/1.1"
    role = ""
    posts: List[Tuple[str, Dict[str, Any]]] = []
    prefill_params: Dict[str, Any] = {}

    def log_message(self, fmt: str, *args: Any) -> None:
        return

    def _reply(self, status: int, payload: Dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._reply(200 if self.path == "/health" else 404, {})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.posts.append((self.role, body))
        answer: Dict[str, Any] = {"id": self.role, "object": "text_completion",
                                  "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
        if self.role == "prefill":
            answer["kv_transfer_params"] = self.prefill_params
        self._reply(200, answer)


def test_router_sends_the_prefill_first_then_its_kv_transfer_params_to_the_decode(vllm_python, tmp_path):
    prefill_params = {"do_remote_prefill": True, "do_remote_decode": False, "transfer_mode": "pull",
                      "remote_endpoints": [["127.0.0.1", 7100, 12345], ["127.0.0.1", 7101, 12346]],
                      "remote_request_id": "cmpl-x-0", "remote_block_ids": [4, 5, 6], "remote_num_tokens": 75}
    posts: List[Tuple[str, Dict[str, Any]]] = []
    servers = {}
    for role in ("prefill", "decode"):
        handler = type(role, (_FakeBackend,), {"role": role, "posts": posts, "prefill_params": prefill_params})
        servers[role] = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        threading.Thread(target=servers[role].serve_forever, daemon=True).start()
    port = free_port()
    log_path = str(tmp_path / "router.log")
    with open(log_path, "w") as log:
        router = subprocess.Popen(
            [_router(vllm_python), "--vllm-pd-disaggregation",
             "--prefill", f"http://127.0.0.1:{servers['prefill'].server_address[1]}",
             "--decode", f"http://127.0.0.1:{servers['decode'].server_address[1]}",
             "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
             "--prometheus-port", str(free_port()), "--worker-startup-check-interval", "1"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                return True
            except OSError:
                return router.poll() is not None

        assert wait_until(up, ROUTER_START_TIMEOUT_S, 0.1) and router.poll() is None, _tail(log_path)
        body = {"prompt": [11, 12, 13], "max_tokens": 8, "min_tokens": 4, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["id"] == "decode"
    finally:
        router.terminate()
        router.wait(30)
        for server in servers.values():
            server.shutdown()
            server.server_close()

    assert [role for role, _ in posts] == ["prefill", "decode"]  # one after the other: the decode's params
    prefill, decode = posts[0][1], posts[1][1]  # come from the prefill's answer
    # the prefill: one token, no streaming, keep the blocks for a remote decode; its other keys (NIXL's, all
    # null) mean nothing to the connector, and without transfer_mode the prefill runs its configured mode
    assert (prefill["prompt"], prefill["max_tokens"], prefill["min_tokens"], prefill["stream"]) == \
        ([11, 12, 13], 1, 1, False)
    assert "stream_options" not in prefill
    params = prefill["kv_transfer_params"]
    assert params["do_remote_decode"] is True and not params.get("do_remote_prefill")
    assert "transfer_mode" not in params and "lease_s" not in params
    assert all(value is None for key, value in params.items() if key not in ("do_remote_decode", "do_remote_prefill"))
    # the decode: the client's request with the prefill's kv_transfer_params, every key as it came
    assert decode["kv_transfer_params"] == prefill_params
    assert (decode["prompt"], decode["max_tokens"], decode["min_tokens"], decode["stream"]) == \
        ([11, 12, 13], 8, 4, True)


_SAMPLE = re.compile(r'^([a-z_:]+)\{([^}]*)\} (\S+)$')


def _prompt_tokens_by_source(url: str) -> Dict[str, float]:
    """vLLM's ``vllm:prompt_tokens_by_source_total`` of an instance: {source: tokens}."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    counts = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == "vllm:prompt_tokens_by_source_total":
            counts[dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))["source"]] = float(match.group(3))
    return counts


def test_router_streams_the_single_instance_tokens(vllm_python, tiny_model, tmp_path):
    ports = {name: free_port() for name in ("PREFILL_PORT", "DECODE_PORT", "ROUTER_PORT", "CONTROL_PORT",
                                            "ROUTER_METRICS_PORT")}
    env = {"MODEL": tiny_model, "VLLM_PYTHON": vllm_python, "VLLM_ROUTER": _router(vllm_python)}
    with launched("launch_router.sh", "ROUTER_PORT", ports, env, str(tmp_path / "router-example.log")):
        expected = _completion(f"http://127.0.0.1:{ports['PREFILL_PORT']}", stream=False)
        assert len(expected) == 8
        assert _completion(f"http://127.0.0.1:{ports['ROUTER_PORT']}", stream=True) == expected

        # the decode computed no prompt token: all came from the prefill through the connector
        decode = f"http://127.0.0.1:{ports['DECODE_PORT']}"
        wanted = {"external_kv_transfer": float(len(PROMPT)), "local_compute": 0.0, "local_cache_hit": 0.0}

        def loaded() -> bool:
            counts = _prompt_tokens_by_source(decode)
            return all(counts.get(source) == n for source, n in wanted.items())

        assert wait_until(loaded, METRICS_TIMEOUT_S, 0.2), _prompt_tokens_by_source(decode)
