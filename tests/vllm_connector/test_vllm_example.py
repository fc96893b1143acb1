"""The online example: examples/vllm_disagg/launch.sh (two `vllm serve` and the proxy) answers a streamed
request through the proxy with exactly the tokens the prefill server generates alone; a second proxy in push
mode in front of the same servers does too."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from ports import free_port as _free_port
from vllm_harness import EXAMPLE, vllm_env

pytestmark = pytest.mark.timeout(600)

READY_TIMEOUT_S = 300.0
PROMPT = [(7 * i + 3) % 400 + 1 for i in range(75)]


def _completion(url: str, stream: bool):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
            "stream": stream}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        if not stream:
            return json.loads(response.read())["choices"][0]["token_ids"]
        tokens = []
        for line in response:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                tokens.extend(json.loads(line[6:])["choices"][0].get("token_ids") or [])
        return tokens


def _wait_ready(url: str, launcher: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            return
        except OSError:
            pass
        if launcher.poll() is not None or time.monotonic() > deadline:
            with open(log_path) as handle:
                tail = handle.read()[-4000:]
            pytest.fail(f"the example did not come up (launcher exit {launcher.poll()}):\n{tail}")
        time.sleep(0.5)


def test_proxy_streams_the_single_instance_tokens(vllm_python, tiny_model, tmp_path):
    ports = {name: _free_port() for name in ("PREFILL_PORT", "DECODE_PORT", "PROXY_PORT", "CONTROL_PORT")}
    env = vllm_env({"MODEL": tiny_model, "VLLM_PYTHON": vllm_python, "PYTHON": sys.executable,
                    "READY_TIMEOUT_S": str(READY_TIMEOUT_S), "LINK_SECRET": "example-secret",
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine and worker in one process: a faster start
                    "VLLM_ARGS": "--dtype float32 --enforce-eager --block-size 32 --no-enable-prefix-caching "
                                 "--num-gpu-blocks-override 128 --max-model-len 1024 "
                                 "--distributed-executor-backend uni",
                    **{k: str(v) for k, v in ports.items()}})
    log_path = str(tmp_path / "example.log")
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(["bash", os.path.join(EXAMPLE, "launch.sh")], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{ports['PROXY_PORT']}", launcher, log_path)
        expected = _completion(f"http://127.0.0.1:{ports['PREFILL_PORT']}", stream=False)
        assert len(expected) == 8
        assert _completion(f"http://127.0.0.1:{ports['PROXY_PORT']}", stream=True) == expected
        push_port = _free_port()
        push_proxy = subprocess.Popen(
            [sys.executable, os.path.join(EXAMPLE, "proxy.py"), "--port", str(push_port), "--mode", "push",
             "--prefill", f"http://127.0.0.1:{ports['PREFILL_PORT']}",
             "--decode", f"http://127.0.0.1:{ports['DECODE_PORT']}",
             "--prefill-control", f"127.0.0.1:{ports['CONTROL_PORT']}"], stdout=subprocess.PIPE, text=True)
        try:
            assert push_proxy.stdout.readline().startswith("proxy on")
            assert _completion(f"http://127.0.0.1:{push_port}", stream=False) == expected
        finally:
            push_proxy.terminate()
            push_proxy.wait(30)
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(30)
