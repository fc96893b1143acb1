"""Helpers of the vLLM connector tests: where the vLLM venv is, vLLM instances in subprocesses, a fake decode.

vLLM never runs in the test venv: the instances run ``vllm_driver.py`` with the Python of ``.venv-vllm``
(built by ``.ci/setup_vllm.sh``) or of ``$LLM_DATADIST_VLLM_PYTHON``; without one (or with that variable set to
``none``), the end-to-end tests skip.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SRC = os.path.join(REPO, "src")
EXAMPLE = os.path.join(REPO, "examples", "vllm_disagg")
VLLM_PYTHON_ENV = "LLM_DATADIST_VLLM_PYTHON"
START_TIMEOUT_S = 240.0
CALL_TIMEOUT_S = 120.0


def vllm_python_path() -> str:
    return os.environ.get(VLLM_PYTHON_ENV) or os.path.join(REPO, ".venv-vllm", "bin", "python")


def vllm_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of a vLLM subprocess: this checkout's sources and test helpers first, offline, 1 GiB KV."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, HERE, EXAMPLE, env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_CPU_KVCACHE_SPACE="1",
               OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


class VllmInstance:
    """A ``vllm_driver.py`` subprocess; ``call`` sends one command and returns its reply (raising on failure)."""

    def __init__(self, python: str, name: str, log_dir: str, env: Optional[Dict[str, str]] = None,
                 script: str = "vllm_driver.py") -> None:
        self.name = name
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, os.path.join(HERE, script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=vllm_env(env))
        self._replies: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.endpoint: Optional[List[Any]] = None  # a producer's [host, port, cluster id] of its llm_datadist
        self.geometry: Optional[List[int]] = None  # [regions, block bytes, block size, layers]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def send(self, op: str, **args: Any) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = CALL_TIMEOUT_S) -> Dict[str, Any]:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no reply within {timeout} s (log: {self.log_path})") from None
        if line is None:
            raise AssertionError(f"{self.name} exited with {self.proc.wait()}; log tail:\n{self.log_tail()}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise AssertionError(f"{self.name}: {reply['error']}\n{reply['traceback']}\nlog tail:\n{self.log_tail()}")
        return reply

    def call(self, op: str, timeout: float = CALL_TIMEOUT_S, **args: Any) -> Dict[str, Any]:
        self.send(op, **args)
        return self.recv(timeout)

    def log_tail(self, nbytes: int = 3000) -> str:
        self._log.flush()
        with open(self.log_path) as handle:
            return handle.read()[-nbytes:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout=30)
                self.proc.wait(30)
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                self.kill()
        self._log.close()


def start_instances(python: str, model: str, log_dir: str, specs: Dict[str, Dict[str, Any]],
                    envs: Optional[Dict[str, Dict[str, str]]] = None) -> Dict[str, VllmInstance]:
    """Start several instances at once (each start takes ~15 s of one core) and wait for all of them."""
    instances = {name: VllmInstance(python, name, log_dir, (envs or {}).get(name)) for name in specs}
    try:
        for name, spec in specs.items():
            instances[name].send("start", model=model, **spec)
        for instance in instances.values():
            started = instance.recv(START_TIMEOUT_S)
            instance.endpoint, instance.geometry = started.get("endpoint"), started.get("geometry")
    except BaseException:
        for instance in instances.values():
            instance.kill()
        raise
    return instances


def run_fake_decode(endpoint: List[Any], geometry: List[int], request_ids: List[str]) -> subprocess.Popen:
    """A process (this venv) that links to a prefill's llm_datadist (``endpoint``: host, port, cluster id), claims
    ``request_ids`` with the connector's messages and then waits."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    host, port, cluster_id = endpoint
    return subprocess.Popen([sys.executable, os.path.join(HERE, "fake_decode.py"), host, str(port), str(cluster_id),
                             json.dumps(geometry)] + request_ids,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
