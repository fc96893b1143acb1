"""Every example of ``examples/`` runs as a user runs it (its own processes, real sockets, every byte checked by
the receiving side) and exits 0; the README's "Using it" snippet is ``examples/quickstart.py`` and runs too."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from subsystems import importorskip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
TIMEOUT_S = 90
OK_LINE = "OK, every byte checked"

# (script, extra arguments): the nine flows of the official Python samples
FLOWS = [
    ("pull_cache.py", []),
    ("pull_blocks.py", []),
    ("pull_blocks_xpyd.py", []),
    ("pull_cache_to_blocks.py", []),
    ("push_cache.py", []),
    ("push_blocks.py", []),
    ("switch_role.py", []),
    ("transfer_cache_async.py", []),
    ("transfer_backend.py", []),
    ("transfer_backend.py", ["--backend", "tcp"]),
]
TORCH_FLOWS = [("pull_blocks.py", []), ("push_blocks.py", [])]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(script_path, args=(), cwd=ROOT):
    result = subprocess.run([sys.executable, script_path, *args], cwd=cwd, env=_env(), capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    return result.returncode, result.stdout + result.stderr


def _ids(flows):
    return [" ".join([script[:-3], *args]) for script, args in flows]


@pytest.mark.parametrize("script, args", FLOWS, ids=_ids(FLOWS))
def test_example_runs_and_checks_every_byte(script, args):
    code, output = _run(os.path.join(EXAMPLES, script), args)
    assert code == 0, output
    assert OK_LINE in output, output
    assert "[prompt" in output and "[decoder] done" in output, output


@pytest.mark.torch
@pytest.mark.parametrize("script, args", TORCH_FLOWS, ids=_ids(TORCH_FLOWS))
def test_example_with_torch_tensors(script, args):
    importorskip("torch", "torch", "torch is not installed: the --torch form of the examples can not run")
    code, output = _run(os.path.join(EXAMPLES, script), [*args, "--torch"])
    assert code == 0, output
    assert OK_LINE in output, output


def test_every_example_is_listed_and_tested():
    scripts = sorted(name for name in os.listdir(EXAMPLES) if name.endswith(".py") and name != "common.py")
    tested = {script for script, _ in FLOWS} | {"quickstart.py"}
    assert set(scripts) == tested
    with open(os.path.join(EXAMPLES, "README.md"), encoding="utf-8") as handle:
        listing = handle.read()
    for script in scripts:
        assert f"`{script}`" in listing, script


def test_readme_snippet_is_the_quickstart_example_and_runs(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    section = readme.split("## Using it", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    with open(os.path.join(EXAMPLES, "quickstart.py"), encoding="utf-8") as handle:
        assert snippet == handle.read(), "README's Using it snippet and examples/quickstart.py differ"
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    code, output = _run(str(script), cwd=str(tmp_path))  # as written, outside the repository
    assert code == 0, output
    assert "pulled blocks match" in output, output


def test_a_mismatch_found_by_a_role_fails_the_example(tmp_path):
    script = tmp_path / "broken_example.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {EXAMPLES!r})
        import numpy as np
        import common

        def prompt(ch, args):
            ch.send("bytes", np.arange(8, dtype=np.uint8))

        def decoder(ch, args):
            got = ch.recv("bytes")
            got[3] = 0  # a byte that arrived wrong
            common.check_rows("tensor 0", got.reshape(8, 1), range(8), np.arange(8, dtype=np.uint8).reshape(8, 1),
                              range(8))

        if __name__ == "__main__":
            sys.exit(common.run_roles("broken", ("decoder", decoder), [("prompt", prompt)], common.parse_args("x")))
    """))
    code, output = _run(str(script), cwd=str(tmp_path))
    assert code == 1, output
    assert "Mismatch: tensor 0: row 3 differs" in output and "broken: FAILED" in output, output


def test_readme_links_the_compatibility_page():
    """The page exists with its sections (tests/test_stands_alone.py checks that nothing points outside)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert "(docs/compatibility.md)" in readme
    with open(os.path.join(ROOT, "docs", "compatibility.md"), encoding="utf-8") as handle:
        page = handle.read()
    for heading in ("## Which official version", "## Deliberate differences", "## Not supported"):
        assert heading in page
