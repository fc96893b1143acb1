"""The online example: examples/vllm_disagg/launch.sh (two `vllm serve` and the proxy) answers a streamed
request through the proxy with exactly the tokens the prefill server generates alone; a second proxy in push
mode in front of the same servers does too. Then both servers' /metrics and stats log lines show the connector's
transfers: the exact KV bytes of the prompt's blocks, pulled and received by the decode, served and pushed by
the prefill."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict

import pytest

from ports import free_port as _free_port
from vllm_harness import EXAMPLE, vllm_env
from waiting import wait_until

pytestmark = pytest.mark.timeout(600)

READY_TIMEOUT_S = 300.0
PROMPT = [(7 * i + 3) % 400 + 1 for i in range(75)]
BLOCK_SIZE = 32
METRICS_TIMEOUT_S = 60.0  # stats reach the frontend with the engine's next steps: a bound only a hang reaches


def _completion(url: str, stream: bool, max_tokens: int = 8):
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}
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


def _kv_bytes(model_dir: str, num_tokens: int) -> int:
    """The KV bytes of the blocks holding ``num_tokens`` tokens: every layer's K and V, float32."""
    with open(os.path.join(model_dir, "config.json")) as handle:
        config = json.load(handle)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_block = config["num_hidden_layers"] * 2 * BLOCK_SIZE * config["num_key_value_heads"] * head_dim * 4
    return -(-num_tokens // BLOCK_SIZE) * per_block


_SAMPLE = re.compile(r'^(vllm:llm_datadist_kv_[a-z_]+)\{([^}]*)\} (\S+)$')


def _kv_metrics(url: str, model: str):
    """The connector's samples in ``url``/metrics: {(name, direction[, le or reason]): value}; every sample carries
    vLLM's labels (model name, engine 0)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        assert labels.pop("model_name") == model and labels.pop("engine") == "0", line
        direction = labels.pop("direction")
        samples[(match.group(1), direction, *labels.values())] = float(match.group(3))
    return samples


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


@contextlib.contextmanager
def launched(script: str, front_port: str, ports: Dict[str, int], env: Dict[str, str], log_path: str):
    """Run the example's ``script`` (launch.sh or launch_router.sh) with the tiny model's settings and ``env``,
    until ``front_port`` (the proxy's or the router's) answers; stop its whole session after the block."""
    env = vllm_env({"READY_TIMEOUT_S": str(READY_TIMEOUT_S), "LINK_SECRET": "example-secret",
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine and worker in one process: a faster start
                    "VLLM_ARGS": f"--dtype float32 --enforce-eager --block-size {BLOCK_SIZE} "
                                 "--no-enable-prefix-caching --num-gpu-blocks-override 128 --max-model-len 1024 "
                                 "--distributed-executor-backend uni",
                    **{k: str(v) for k, v in ports.items()}, **env})
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(["bash", os.path.join(EXAMPLE, script)], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{ports[front_port]}", launcher, log_path)
        yield
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(30)


def test_proxy_streams_the_single_instance_tokens(vllm_python, tiny_model, tmp_path):
    ports = {name: _free_port() for name in ("PREFILL_PORT", "DECODE_PORT", "PROXY_PORT", "CONTROL_PORT")}
    log_path = str(tmp_path / "example.log")
    env = {"MODEL": tiny_model, "VLLM_PYTHON": vllm_python, "PYTHON": sys.executable,
           "VLLM_LOG_STATS_INTERVAL": "1"}  # the stats log line each second
    with launched("launch.sh", "PROXY_PORT", ports, env, log_path):
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
        _check_transfer_stats(ports, tiny_model, log_path)


def _check_transfer_stats(ports, model: str, log_path: str) -> None:
    """After one pulled and one pushed request: the decode pulled and received the prompt's KV bytes, the prefill
    served and pushed them, each once, exactly, without failures; both log them in vLLM's stats line."""
    nbytes = _kv_bytes(model, len(PROMPT))
    decode = f"http://127.0.0.1:{ports['DECODE_PORT']}"
    prefill = f"http://127.0.0.1:{ports['PREFILL_PORT']}"
    once = {"pulled": 1, "received": 1}

    def decode_counted() -> bool:
        samples = _kv_metrics(decode, model)
        return all(samples.get(("vllm:llm_datadist_kv_transfers_total", d)) == n for d, n in once.items())

    assert wait_until(decode_counted, METRICS_TIMEOUT_S, 0.1), _kv_metrics(decode, model)

    # The prefill's served bytes come from its llm_datadist served counters, which the decode reports each second
    # (after the pull): they reach /metrics with the prefill's next engine step. An idle prefill takes no steps,
    # so each check that does not see them yet sends it a plain request.
    def prefill_counted() -> bool:
        samples = _kv_metrics(prefill, model)
        if samples.get(("vllm:llm_datadist_kv_bytes_total", "served")) == nbytes and \
                samples.get(("vllm:llm_datadist_kv_transfers_total", "pushed")) == 1:
            return True
        _completion(prefill, stream=False, max_tokens=1)
        return False

    assert wait_until(prefill_counted, METRICS_TIMEOUT_S, 0.2), _kv_metrics(prefill, model)

    decode_samples, prefill_samples = _kv_metrics(decode, model), _kv_metrics(prefill, model)
    for samples, directions in ((decode_samples, ("pulled", "received")), (prefill_samples, ("served", "pushed"))):
        for direction in ("pulled", "received", "served", "pushed"):
            expected = nbytes if direction in directions else 0
            assert samples[("vllm:llm_datadist_kv_bytes_total", direction)] == expected, (direction, samples)
            assert samples[("vllm:llm_datadist_kv_transfers_total", direction)] == (1 if expected else 0)
        assert not [k for k, v in samples.items() if k[0] == "vllm:llm_datadist_kv_failures_total" and v], samples
    assert decode_samples[("vllm:llm_datadist_kv_transfer_seconds_count", "pulled")] == 1
    assert decode_samples[("vllm:llm_datadist_kv_transfer_seconds_bucket", "pulled", "+Inf")] == 1
    assert prefill_samples[("vllm:llm_datadist_kv_transfer_seconds_count", "pushed")] == 1

    # vLLM's stats log line (each VLLM_LOG_STATS_INTERVAL) carries them too
    def logged() -> bool:
        with open(log_path) as handle:
            lines = [line for line in handle if "KV Transfer metrics:" in line]
        return all(any(f"{direction}_transfers=1," in line for line in lines)
                   for direction in ("pulled", "received", "served", "pushed"))

    assert wait_until(logged, METRICS_TIMEOUT_S, 0.2)
