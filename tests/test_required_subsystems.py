"""LLM_DATADIST_REQUIRE turns the skips of a required subsystem into failures; unset, they stay skips with reasons.
.ci/run runs the README's test command as written there."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Optional

import pytest

import subsystems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the vLLM end-to-end tests skip at once, tagged vllm, when their Python is "none"
VLLM_TESTS = "tests/vllm_connector/test_vllm_e2e.py::test_pull_matches_single_instance"


def _pytest(require: Optional[str], *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLM_DATADIST_VLLM_PYTHON="none")
    env.pop(subsystems.REQUIRE_ENV, None)
    if require is not None:
        env[subsystems.REQUIRE_ENV] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_subsystem_skips_with_its_reason_when_not_required():
    for require in (None, "", "nixl,netns"):
        proc = _pytest(require, VLLM_TESTS)
        assert proc.returncode == 0, proc.stdout[-2000:]
        assert "1 skipped" in proc.stdout and "[vllm] vLLM end-to-end tests disabled" in proc.stdout, proc.stdout


def test_a_missing_subsystem_fails_the_run_when_required():
    proc = _pytest("netns, vllm", VLLM_TESTS)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 error" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
    assert "vllm is required (LLM_DATADIST_REQUIRE=netns, vllm) but this test would skip" in proc.stdout
    assert "To get vllm: bash .ci/setup_vllm.sh" in proc.stdout


def test_an_unknown_subsystem_is_a_usage_error():
    proc = _pytest("nixl,vlm", VLLM_TESTS)
    assert proc.returncode == 4 and "unknown subsystems ['vlm']" in proc.stderr, proc.stderr


def test_tags_name_known_subsystems_only():
    assert subsystems.subsystem_of("Skipped: [nixl] no package") == "nixl"
    assert subsystems.subsystem_of(subsystems.tag("torch", "not installed")) == "torch"
    assert subsystems.subsystem_of("Skipped: nixl: no package") is None
    assert subsystems.subsystem_of("Skipped: [gpu] no CUDA") is None
    with pytest.raises(ValueError):
        subsystems.tag("gpu", "no CUDA")


def test_ci_runs_the_readme_test_command_and_requires_every_subsystem():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    command = re.search(r"Install and run the tests:\n\n```bash\n(.*?)\n```", readme).group(1)
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        ci = handle.read()
    assert ci.rstrip("\n").splitlines()[-1] == command  # the last command, so its status is the run's
    default = re.search(r'LLM_DATADIST_REQUIRE="\$\{LLM_DATADIST_REQUIRE-([a-z0-9,]+)\}"', ci).group(1)
    assert set(default.split(",")) == set(subsystems.SUBSYSTEMS) - {"netem"}  # this kernel kind has no sch_netem
