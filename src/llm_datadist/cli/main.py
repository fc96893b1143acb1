"""``llm-datadist`` / ``python -m llm_datadist``: argument parsing and the demo, bench, doctor and version commands."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["build_parser", "main", "package_version"]

PROG = "llm-datadist"
BENCH_MODULE = "llm_datadist_bench.cli"  # the benchmark: a distribution of its own (./benchmarks)
BENCH_INSTALL = "pip install -e './benchmarks[plot]' (in a checkout of llm_datadist, after the library)"
_EPILOG = """examples:
  llm-datadist demo                          prefill + decode on 127.0.0.1, 50 requests, every byte verified
  llm-datadist demo --quick --link-style ranktable
  llm-datadist demo --model qwen3-235b-a22b --transport tcp
  llm-datadist doctor                        what this machine offers (transports, permissions, CUDA)
  llm-datadist doctor --peer 10.0.0.5:26000  check the link to a running instance end to end
  llm-datadist stats 127.0.0.1:9400          live transfer rates and latency of a process's /metrics endpoint
"""
Row = Tuple[str, str]


def package_version() -> str:
    """The installed distribution's version, or "unknown"."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return "unknown"
    try:
        return version("llm-datadist")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    from llm_datadist.cli import chaos, demo, doctor_peer

    parser = argparse.ArgumentParser(
        prog=PROG, description="Open LLM-DataDist: KV-cache transfer for prefill/decode disaggregated serving.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_parser = sub.add_parser(
        "demo", help="run a prefill and a decode process that stream and verify a model-shaped KV cache",
        description="Start a prefill and a decode process on 127.0.0.1 with a model-shaped paged KV cache, stream "
                    "requests (prefill writes, decode pulls all layers in one pull_blocks call, prefill frees), "
                    "verify every byte and print a summary. Exit status 0 on success, 1 on any failure.")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(handler=demo.run)
    chaos_parser = sub.add_parser(
        "chaos", help="a bounded chaos soak: prefills killed, decodes stopped, caches re-registered, links cut",
        description="Prefill and decode processes pull and push verified blocks while a seeded schedule kills and "
                    "restarts prefills, stops decodes, re-registers caches and unlinks; reports wrong-byte "
                    "successes and hangs (both must be 0) and resource growth. Exit status 1 if any.")
    chaos.add_arguments(chaos_parser)
    chaos_parser.set_defaults(handler=chaos.run)
    sub.add_parser("bench", help="the benchmark (llm-datadist-bench, installed separately; every argument after "
                                 "'bench' goes to it)", add_help=False)
    doctor_parser = sub.add_parser(
        "doctor", help="show the environment: versions, transports, permissions, CUDA, huge pages; with --peer "
                       "HOST:PORT check a link to a running instance end to end",
        description="Without --peer: what this machine offers. With --peer HOST:PORT: check a link to the instance "
                    "listening there (reachability, handshake, secret, TLS, route, RTT, a verified read); exit "
                    "status 0 when the link works, 1 when a check failed (docs/doctor.md).")
    doctor_peer.add_arguments(doctor_parser)
    doctor_parser.set_defaults(handler=_doctor)
    sub.add_parser("version", help="print the version").set_defaults(handler=_version)
    from llm_datadist.cli import stats

    stats_parser = sub.add_parser(
        "stats", help="a live view of an instance's /metrics endpoint: rates, latency, failures, links",
        description="Scrape the Prometheus endpoint of an llm_datadist process (LLM_DATADIST_METRICS_PORT) and show, "
                    "per cluster and per peer/transport/direction, transfers/s, MB/s, p50/p99 latency, failures, "
                    "links and in-flight calls, refreshed like top. Exit status 1 when it cannot be reached.")
    stats.add_arguments(stats_parser)
    stats_parser.set_defaults(handler=stats.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit status (never raises SystemExit)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "bench":
        return _bench(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version and usage errors
        return _exit_code(exc)
    handler: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `llm-datadist demo | head`: stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 2


def _version(args: argparse.Namespace) -> int:
    print(f"{PROG} {package_version()}")
    return 0


def _bench(rest: List[str]) -> int:
    """Hand the remaining arguments to ``llm_datadist_bench.cli:main``, the separate benchmark distribution,
    when it is installed; else one line saying how to install it, and status 2."""
    try:
        found = importlib.util.find_spec(BENCH_MODULE) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        print(f"{PROG} bench: the benchmark is not installed (it is the separate llm-datadist-bench "
              f"distribution): {BENCH_INSTALL}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCH_MODULE)
    try:
        return int(module.main(rest) or 0)
    except SystemExit as exc:
        return _exit_code(exc)


# ---------------------------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------------------------
def _doctor(args: argparse.Namespace) -> int:
    """Print what this machine offers; 1 when a required dependency is missing. With --peer: check a link."""
    if getattr(args, "peer", None) is not None:
        from llm_datadist.cli import doctor_peer

        return doctor_peer.run(args)
    rows: List[Row] = []
    ok = True
    for section in (_doctor_versions, _doctor_backends, _doctor_cuda, _doctor_memory, _doctor_env):
        try:
            section_rows, section_ok = section()
        except Exception as exc:  # noqa: BLE001 - one broken probe never hides the others
            section_rows, section_ok = [(section.__name__[8:], f"probe failed: {type(exc).__name__}: {exc}")], True
        rows.extend(section_rows)
        ok = ok and section_ok
    width = max(len(label) for label, _ in rows)
    print(f"{PROG} doctor")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    if not ok:
        print(f"{PROG} doctor: required packages are missing: pip install numpy msgspec", file=sys.stderr)
    return 0 if ok else 1


def _module_version(name: str) -> Tuple[str, bool]:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return f"MISSING ({exc})", False
    return str(getattr(module, "__version__", "unknown version")), True


def _doctor_versions() -> Tuple[List[Row], bool]:
    import llm_datadist

    rows = [("llm-datadist", f"{package_version()} ({os.path.dirname(llm_datadist.__file__)})"),
            ("python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
            ("platform", f"{platform.platform()}, {os.cpu_count()} CPUs")]
    ok = True
    for name in ("numpy", "msgspec"):
        text, found = _module_version(name)
        rows.append((name, text))
        ok = ok and found
    return rows, ok


def _doctor_backends() -> Tuple[List[Row], bool]:
    from llm_datadist._engine.api import diagnostics

    report = diagnostics.transport_report()
    available = [name for name, reason in report if not reason]
    rows = [("transports", f"{', '.join(available) or 'none'} available")]
    for name, reason in report:
        if reason:
            rows.append(("", f"{name}: not available ({reason})"))
    forced = os.environ.get("LLM_DATADIST_TRANSPORT")
    if forced:
        rows.append(("", f"LLM_DATADIST_TRANSPORT={forced} forces that backend"))
    rows.append(("process_vm", _pvm_status()))
    rows.append(("cross-host", diagnostics.cross_host_choice()))
    return rows, True


def _pvm_status() -> str:
    from llm_datadist._engine.api import diagnostics

    own = "permitted" if diagnostics.process_vm_status()[0] else "NOT permitted"
    scope = _read_text("/proc/sys/kernel/yama/ptrace_scope")
    scope_text = f"ptrace_scope {scope}" if scope is not None else "no Yama ptrace_scope"
    grant = " (an instance grants same-user peers: PR_SET_PTRACER_ANY)" if (scope or "").strip() == "1" and \
        os.environ.get("LLM_DATADIST_PTRACE_GRANT", "") != "0" else ""
    return (f"own process: {own}; a child: {_pvm_child_check()}; a sibling (what an independently started "
            f"peer gets): {_pvm_sibling_check()} ({scope_text}{grant})")


_TARGET = ("import ctypes, sys\nb = ctypes.create_string_buffer(%r, 32)\nprint(ctypes.addressof(b), flush=True)\n"
           "sys.stdin.read()\n")
_READER = ("import sys\nfrom llm_datadist._engine.api import diagnostics\n"
           "try:\n    print('ok' if diagnostics.read_process_memory(int(sys.argv[1]), int(sys.argv[2]), %d) == %r "
           "else 'wrong')\n"
           "except Exception as exc:\n    print('refused', exc)\n")


def _with_target(marker: bytes, read: Callable[[int, int], str]) -> str:
    """Start a short-lived child holding ``marker``; ``read(pid, address)`` says what reading it gave."""
    try:
        target = subprocess.Popen([sys.executable, "-c", _TARGET % marker], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError as exc:
        return f"unknown ({exc})"
    try:
        line = target.stdout.readline() if target.stdout else b""
        if not line.strip():
            return "unknown (the probe process did not start)"
        return read(target.pid, int(line))
    finally:
        if target.stdin:
            target.stdin.close()
        try:
            target.wait(5)
        except subprocess.TimeoutExpired:
            target.kill()
            target.wait()
        if target.stdout:
            target.stdout.close()


def _pvm_sibling_check() -> str:
    """A second child reads the first: two processes neither of which started the other."""
    marker = b"llm-datadist-sibling"

    def read(pid: int, addr: int) -> str:
        try:
            out = subprocess.run([sys.executable, "-c", _READER % (len(marker), marker), str(pid), str(addr)],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unknown ({exc})"
        if out == "ok":
            return "permitted"
        return f"NOT permitted ({out or 'no answer'}); same-host links then use shm for pool caches, else tcp"

    return _with_target(marker, read)


def _pvm_child_check() -> str:
    """Read a marker from a short-lived child with process_vm_readv: what a same-host link needs."""
    from llm_datadist._engine.api import diagnostics

    marker = b"llm-datadist-doctor"

    def read(pid: int, addr: int) -> str:
        try:
            seen = diagnostics.read_process_memory(pid, addr, len(marker))
        except Exception as exc:  # noqa: BLE001 - a refusal is the answer, not an error
            return f"NOT permitted ({exc}); same-host links fall back to shm or tcp"
        return "permitted" if seen == marker else "NOT permitted (read the wrong memory)"

    return _with_target(marker, read)


def _doctor_cuda() -> Tuple[List[Row], bool]:
    """CUDA presence without importing torch (find_spec only; torch is inspected only if already imported)."""
    parts = []
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            parts.append(f"torch {torch.__version__} (cuda available: {bool(torch.cuda.is_available())})")
        except Exception as exc:  # noqa: BLE001
            parts.append(f"torch imported, cuda check failed: {exc}")
    else:
        parts.append("torch " + ("installed (not imported)" if _has_module("torch") else "not installed"))
    parts.append("cuda-python " + ("installed" if _has_module("cuda") else "not installed"))
    smi = shutil.which("nvidia-smi")
    parts.append(f"nvidia-smi {'at ' + smi if smi else 'not found'}")
    parts.append("/dev/nvidiactl " + ("present" if os.path.exists("/dev/nvidiactl") else "absent"))
    from llm_datadist._engine.api import diagnostics

    kinds = ", ".join(diagnostics.memory_kinds())
    return [("cuda", "; ".join(parts)), ("", f"memory kinds with a backend: {kinds}; without a CUDA backend "
                                             f"Placement.DEVICE caches are host memory")], True


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _doctor_memory() -> Tuple[List[Row], bool]:
    thp = _read_text("/sys/kernel/mm/transparent_hugepage/enabled")
    thp_mode = thp[thp.index("[") + 1:thp.index("]")] if thp and "[" in thp and "]" in thp else (thp or "n/a")
    meminfo = {}
    for line in (_read_text("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        meminfo[key.strip()] = value.strip()
    huge = (f"{meminfo.get('HugePages_Total', '?')} x {meminfo.get('Hugepagesize', '?')} reserved, "
            f"{meminfo.get('HugePages_Free', '?')} free")
    rows = [("hugepages", f"transparent huge pages: {thp_mode}; {huge}"),
            ("memory", f"{_gib(meminfo.get('MemAvailable'))} available of {_gib(meminfo.get('MemTotal'))}")]
    if os.path.isdir("/dev/shm"):
        usage = shutil.disk_usage("/dev/shm")
        rows.append(("/dev/shm", f"{usage.free / 2 ** 30:.1f} GiB free of {usage.total / 2 ** 30:.1f} GiB"))
    return rows, True


def _gib(kb_text: Optional[str]) -> str:
    """``"24731708 kB"`` -> ``"23.6 GiB"``."""
    try:
        return f"{int((kb_text or '').split()[0]) / 2 ** 20:.1f} GiB"
    except (ValueError, IndexError):
        return "?"


def _doctor_env() -> Tuple[List[Row], bool]:
    names = sorted(n for n in os.environ if n.startswith("LLM_DATADIST_") or n in ("HCCL_CONNECT_TIMEOUT",
                                                                                  "ASCEND_GLOBAL_LOG_LEVEL"))
    values = [f"{n}={'(set)' if 'SECRET' in n else os.environ[n]}" for n in names]
    return [("environment", ", ".join(values) or "no LLM_DATADIST_* variables set")], True


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
