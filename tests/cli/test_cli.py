"""The llm-datadist command line: version, doctor, bench delegation, the progress bar and the end-to-end demo."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import llm_datadist
from llm_datadist.cli import main as cli_main
from llm_datadist.cli.demo import PRESETS, build_config
from llm_datadist.cli.demo_worker import Pattern
from llm_datadist.cli.main import build_parser, main
from llm_datadist.cli.progress import Progress, format_duration

SRC = os.path.dirname(os.path.dirname(os.path.abspath(llm_datadist.__file__)))


def _run_cli(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("LLM_DATADIST_TRANSPORT", None)
    return subprocess.run([sys.executable, "-m", "llm_datadist", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


# -- version, doctor, help, bench ------------------------------------------------------------------------------
def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("llm-datadist ")


def test_doctor(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for label in ("python", "numpy", "msgspec", "transports", "process_vm", "cuda", "hugepages"):
        assert f"  {label}" in out


def test_doctor_does_not_import_torch():
    code = "import sys; from llm_datadist.cli.main import main; main(['doctor']); print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_help_and_usage_errors_return_codes(capsys):
    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
    assert main(["demo", "--link-style", "bogus"]) == 2
    capsys.readouterr()


def test_module_help():
    out = _run_cli("--help", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "demo" in out.stdout and "doctor" in out.stdout and "bench" in out.stdout


def test_bench_not_installed_says_how_to_install_it(monkeypatch, capsys):
    # the benchmark is the separate llm-datadist-bench distribution: as if it were not installed
    monkeypatch.setitem(sys.modules, "llm_datadist_bench", None)
    monkeypatch.setitem(sys.modules, "llm_datadist_bench.cli", None)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the benchmark is not installed" in err
    assert "pip install -e './benchmarks[plot]'" in err


def test_bench_module_missing(monkeypatch, capsys):
    monkeypatch.setattr(cli_main, "BENCH_MODULE", "llm_datadist.cli._no_such_bench_module")
    assert main(["bench", "--anything"]) == 2
    assert "not installed" in capsys.readouterr().err


def test_bench_dispatches_to_the_bench_distribution(capsys):
    # the README's test command installs the bench distribution (./benchmarks) next to the library
    import llm_datadist_bench.cli

    assert llm_datadist_bench.cli.PROG == "llm-datadist bench"
    assert cli_main.BENCH_MODULE == "llm_datadist_bench.cli"
    assert main(["bench", "--directions", "sideways"]) == 2  # its own usage error, from its own parser
    assert "--directions takes pull and/or push" in capsys.readouterr().err


def test_bench_delegates_remaining_arguments(monkeypatch, tmp_path):
    (tmp_path / "fake_llmdd_bench.py").write_text(textwrap.dedent("""
        SEEN = []
        def main(args):
            SEEN.append(list(args))
            return 7
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli_main, "BENCH_MODULE", "fake_llmdd_bench")
    assert main(["bench", "--size", "64k", "-v"]) == 7
    import fake_llmdd_bench

    assert fake_llmdd_bench.SEEN == [["--size", "64k", "-v"]]


# -- progress bar ------------------------------------------------------------------------------------------------
def test_progress_not_a_tty_writes_lines():
    stream = io.StringIO()
    with Progress(4, label="pulling", stream=stream, line_interval=0.0) as bar:
        for _ in range(4):
            bar.update(1, note="1.00 GB/s")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("pulling [") and "1/4" in lines[0]
    assert "4/4 100%" in lines[-1] and "1.00 GB/s" in lines[-1]


def test_progress_disabled_and_tty():
    quiet = io.StringIO()
    bar = Progress(3, stream=quiet, enabled=False)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = Progress(2, stream=tty, min_interval=0.0)
    bar.update()
    bar.update()
    bar.close()
    bar.close()
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1
    assert format_duration(3.04) == "3.0s" and format_duration(75.2) == "1m15s"


# -- demo pieces -------------------------------------------------------------------------------------------------
def _config(*extra: str):
    args = build_parser().parse_args(["demo", *extra])
    return build_config(args)


def test_presets_match_clients_sizes():
    sizes = {name: [(c.num_tensors, c.block_bytes(128)) for c in p.caches] for name, p in PRESETS.items()}
    assert sizes["qwen2.5-1.5b"] == [(56, 64 << 10)]
    assert sizes["qwen2.5-vl-7b"] == [(56, 128 << 10)]
    assert sizes["qwen3-30b-a3b"] == [(96, 64 << 10)]
    assert sizes["qwen3-235b-a22b"] == [(188, 32 << 10)]
    cfg = _config()
    assert (cfg.blocks_per_request, cfg.requests, cfg.request_bytes) == (32, 50, 112 << 20)


def test_pattern_roundtrip_and_detects_one_flipped_byte():
    cfg = _config("--quick", "--model", "deepseek-r1")
    pattern = Pattern(cfg)
    shape = cfg.caches[1]
    arrays = [np.zeros((20, shape.block_bytes(cfg.block_size) // 8), dtype=np.uint64) for _ in range(shape.num_tensors)]
    blocks = np.array([3, 17, 0, 9, 11, 2, 5, 19])
    pattern.write(arrays, 1, 42, blocks)
    assert pattern.verify(arrays, 1, 42, blocks) is None
    assert pattern.verify(arrays, 1, 43, blocks) is not None  # another request's data never passes
    arrays[7].view(np.uint8)[blocks[5], 1001] ^= 0x01
    problem = pattern.verify(arrays, 1, 42, blocks)
    assert "tensor 7" in problem and "block 5 of the request" in problem and "byte offset 1001" in problem


def test_sweep_finds_writes_outside_destinations():
    cfg = _config("--quick")
    pattern = Pattern(cfg)
    words = cfg.caches[0].block_bytes(cfg.block_size) // 8
    arrays = [np.zeros((12, words), dtype=np.uint64) for _ in range(cfg.caches[0].num_tensors)]
    blocks = np.array([7, 1, 4, 10, 0, 3, 9, 2])
    pattern.write(arrays, 0, 5, blocks)
    owner, position = np.full(12, -1), np.zeros(12, dtype=np.int64)
    owner[blocks], position[blocks] = 5, np.arange(8)
    assert pattern.sweep(arrays, 0, owner, position) is None
    arrays[3][11, 0] = 1  # block 11 was never a destination
    assert "no pull targeted" in pattern.sweep(arrays, 0, owner, position)
    arrays[3][11, 0] = 0
    arrays[0][blocks[2], 5] ^= np.uint64(1 << 40)  # a later pull overwrote part of request 5's block 2
    assert "block 2 of the request" in pattern.sweep(arrays, 0, owner, position)


def test_demo_rejects_bad_options(capsys):
    assert main(["demo", "--model", "no-such-model"]) == 2
    assert main(["demo", "--num-blocks", "3"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["demo", "--list-models"]) == 0
    assert "qwen3-235b-a22b" in capsys.readouterr().out


# -- the demo end to end (two spawned processes each) ----------------------------------------------------------------
@pytest.mark.parametrize("link_style", ["clusters", "ranktable"])
def test_demo_quick_end_to_end(link_style):
    out = _run_cli("demo", "--quick", "--no-progress", "--link-style", link_style)
    assert out.returncode == 0, out.stdout + out.stderr
    for field in ("requests     : 5 x 1024 tokens", "bytes moved", "GB/s", "p50", "p99", "transport",
                  "verified     : all bytes OK"):
        assert field in out.stdout, out.stdout
    assert ("link_clusters" if link_style == "clusters" else "rank-table link") in out.stdout


def test_demo_detects_corruption():
    out = _run_cli("demo", "--quick", "--no-progress", "--inject-corruption")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "verification failed" in out.stderr and "request 2" in out.stderr
    assert "all bytes OK" not in out.stdout


def test_demo_reports_an_unusable_transport():
    out = _run_cli("demo", "--quick", "--no-progress", "--transport", "no-such-transport")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED" in out.stderr and "no-such-transport" in out.stderr
